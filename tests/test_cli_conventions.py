"""One command-line convention for every ``p2pz`` command (``p2pz.cli.options``), checked on the parsers.

Only parsing here, no model runs: each command's parser is walked (``build_parser()``; ``generate``'s
jsonargparse parser and ``train``'s LightningCLI reached their own way) for the shared flags' names,
values and defaults, a help line for every option without reStructuredText markup, one list syntax,
and every numeric flag fed 0, -1, nan and inf: each is either declared allowed for that flag or stops
in parsing with exit status 2 and one line.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import re
import typing

import pytest

from p2pz.cli import options
from p2pz.cli.main import build_parser
from p2pz.utils import values
from p2pz.utils.devices import DTYPES
from p2pz.utils.errors import UserError

MARKUP = re.compile(r"``|:\w+:`|`")

# Which commands carry which shared flag (generate and train are checked on their own parsers below).
# export: its --eval
DEVICE = {"direction", "edit", "calibrate", "eval", "apply", "bench", "demo", "export", "app"}
DTYPE = {"direction", "edit", "calibrate", "eval", "apply", "bench", "demo", "app"}
SEED = {"make-tiny", "direction", "edit", "calibrate", "eval", "demo"}  # apply/bench/export: no draws
PROGRESS = {"direction", "edit", "calibrate", "eval", "apply", "bench", "demo"}
EDIT = {"direction", "edit", "calibrate", "eval", "demo", "apply"}

# The least each command needs to parse, so that a flag's value is the only thing that can fail.
REQUIRED = {
    "make-tiny": ["OUT"],
    "direction": ["--edit", "cat:dog", "--out", "d"],
    "edit": ["--model", "m", "--image", "i.png", "--edit", "cat:dog", "--out", "o.png"],
    "calibrate": ["--model", "m", "--edit", "circle:square"],
    "eval": ["--world", "--out", "o"],
    "apply": ["model", "img.png", "--out", "o"],
    "bench": ["model"],
    "export": ["last.ckpt", "--out", "o"],
    "demo": ["--out", "o"],
    "app": [],
    "shards inspect": ["dir"],
    "shards filter": ["src", "dst", "--keep-if", "success"],
}
# The numbers that may legitimately be 0 (none may be negative, nan or inf): seeds, "0 for none",
# untimed warm-up calls, and guidance (0 turns it off).
ZERO_ALLOWED = {"--seed", "--grid-pairs", "--warmup", "--guidance-scale", "--xa-guidance", "--candidates"}
NUMERIC_TYPES = {
    values.positive_int,
    values.non_negative_int,
    values.finite_float,
    values.non_negative_float,
    values.positive_float,
    values.probability,
}


def commands() -> dict[str, argparse.ArgumentParser]:
    """Every argparse subcommand, nested ones as ``shards inspect``; generate and train excluded (their
    parsers are their own, behind a passthrough)."""
    found: dict[str, argparse.ArgumentParser] = {}

    def walk(parser: argparse.ArgumentParser, prefix: str) -> None:
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                for name, sub in action.choices.items():
                    if sub.prefix_chars == "\0":  # generate, train
                        continue
                    found[f"{prefix}{name}"] = sub
                    walk(sub, f"{prefix}{name} ")

    walk(build_parser(), "")
    return {name: p for name, p in found.items() if name != "shards"}


def option(parser: argparse.ArgumentParser, flag: str) -> argparse.Action | None:
    return next((a for a in parser._actions if flag in a.option_strings), None)


def visible_options(parser: argparse.ArgumentParser) -> list[argparse.Action]:
    return [a for a in parser._actions if a.option_strings and a.help != argparse.SUPPRESS]


def parse(argv: list[str]) -> tuple[int, str, argparse.Namespace | None]:
    """(exit status, stderr, namespace) of ``p2pz ARGV``'s parsing."""
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        try:
            return 0, err.getvalue(), build_parser().parse_args(argv)
        except SystemExit as exit_info:
            return int(exit_info.code or 0), err.getvalue(), None


COMMANDS = commands()


def test_every_command_is_walked():
    assert set(COMMANDS) == set(REQUIRED)


@pytest.mark.parametrize("name", sorted(COMMANDS))
def test_every_option_has_a_plain_help_line(name):
    parser = COMMANDS[name]
    assert not MARKUP.search(parser.description or ""), f"{name}: markup in the description"
    for action in visible_options(parser):
        flag = action.option_strings[-1]
        assert action.help and action.help.strip(), f"{name} {flag} has no help"
        assert not MARKUP.search(action.help), f"{name} {flag}: markup in {action.help!r}"
        assert "comma-separated" not in action.help, f"{name} {flag}: lists are space-separated"


@pytest.mark.parametrize("name", sorted(COMMANDS))
def test_shared_flags_are_the_shared_definitions(name):
    parser = COMMANDS[name]
    flags = {s for a in parser._actions for s in a.option_strings}
    for flag, carriers in (("--device", DEVICE), ("--dtype", DTYPE), ("--seed", SEED)):
        assert (flag in flags) == (name in carriers), f"{name}: {flag}"
    assert ("--no-progress" in flags) == (name in PROGRESS), name
    assert ("--edit" in flags) == (name in EDIT), name
    if "--device" in flags:
        device = option(parser, "--device")
        assert device.type is values.device_name and device.default == "auto"
    if "--dtype" in flags:
        dtype = option(parser, "--dtype")
        assert tuple(dtype.choices) == DTYPES and dtype.default == "float32"
    if "--seed" in flags:
        seed = option(parser, "--seed")
        assert seed.type is values.non_negative_int and seed.default == 0
    if "--no-progress" in flags:
        progress = option(parser, "--no-progress")
        assert progress.dest == "progress" and progress.default is True
    if "--edit" in flags:
        assert option(parser, "--edit").type is options.edit_spec
    shown = {s for a in visible_options(parser) for s in a.option_strings}
    if "--pairs" in shown:  # one meaning: eval's shards; the older counts are renamed (hidden aliases)
        assert name == "eval" and option(parser, "--pairs").type is None


@pytest.mark.parametrize("name", sorted(COMMANDS))
def test_one_list_syntax(name):
    """Lists are values after one flag (nargs + or *), never a repeated-only flag."""
    for action in COMMANDS[name]._actions:
        assert not isinstance(action, argparse._AppendAction), f"{name} {action.option_strings}"


@pytest.mark.parametrize("alias, long", [("fp32", "float32"), ("fp16", "float16"), ("bf16", "bfloat16")])
def test_dtype_aliases_normalised_everywhere(alias, long):
    for name in DTYPE:
        code, err, args = parse([*name.split(), *REQUIRED[name], "--dtype", alias])
        assert code == 0, (name, err)
        assert args.dtype == long, name
    code, err, _ = parse(["edit", *REQUIRED["edit"], "--dtype", "float64"])
    assert code == 2 and len(err.strip().splitlines()) == 1 and "--dtype" in err


def test_edit_and_source_target_spell_the_same_edit():
    from p2pz.cli.options import source_target

    for name in ("direction", "edit"):
        base = [a for a in REQUIRED[name] if a not in ("--edit", "cat:dog")]
        _, _, by_edit = parse([name, *base, "--edit", "cat:dog"])
        _, _, by_words = parse([name, *base, "--source", "cat", "--target", "dog"])
        assert source_target(by_edit) == source_target(by_words) == ("cat", "dog")
        _, _, both = parse([name, *base, "--edit", "cat:dog", "--source", "cat"])
        with pytest.raises(UserError):
            source_target(both)
    code, err, _ = parse(["calibrate", "--model", "m", "--edit", "cat"])
    assert code == 2 and "argument --edit" in err and len(err.strip().splitlines()) == 1


def test_lists_take_spaces_repeats_and_the_older_commas():
    _, _, args = parse(["bench", "model", "--batches", "1", "4", "--batches", "16"])
    assert args.batches == [1, 4, 16]
    _, _, args = parse(["bench", "model", "--batches", "1,4,16", "--backends", "eager,onnx"])
    assert args.batches == [1, 4, 16] and args.backends == ["eager", "onnx"]
    _, _, args = parse(["export", "c.ckpt", "--out", "o", "--formats", ""])
    assert args.formats == []
    _, _, args = parse(["eval", "--world", "--out", "o", "--edit", "circle:square", "red:blue"])
    assert args.edit == ["circle:square", "red:blue"]
    code, err, _ = parse(["bench", "model", "--backends", "eager,tpu"])
    assert code == 2 and "--backends" in err and len(err.strip().splitlines()) == 1


def test_renamed_counts_keep_their_old_spelling():
    _, _, args = parse(["demo", "--out", "o", "--pairs", "16"])
    assert args.num_pairs == 16
    _, _, args = parse(["shards", "inspect", "dir", "--pairs", "2"])
    assert args.grid_pairs == 2


def test_numeric_flags_use_typed_checks():
    """No numeric flag is a bare int/float: each has the one definition of its range."""
    for name, parser in COMMANDS.items():
        for action in parser._actions:
            assert action.type not in (int, float), f"{name} {action.option_strings}: untyped range"


def numeric_flags() -> list[tuple[str, str]]:
    from p2pz.data.shapes.teacher_settings import xa_guidance_value

    found = []
    for name, parser in COMMANDS.items():
        for action in visible_options(parser):
            kind = getattr(action, "item_type", None) or action.type
            if kind in NUMERIC_TYPES or kind in (int, float, xa_guidance_value):
                found.append((name, action.option_strings[-1]))
    return found


@pytest.mark.parametrize("name, flag", numeric_flags())
@pytest.mark.parametrize("value", ["0", "-1", "nan", "inf"])
def test_bad_numbers_stop_in_one_line(name, flag, value):
    code, err, _ = parse([*name.split(), *REQUIRED[name], flag, value])
    if value == "0" and flag in ZERO_ALLOWED:
        assert code == 0, err
        return
    assert code == 2, f"{name} {flag} {value} was accepted"
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: argument {flag}"), lines


def test_the_known_cases():
    for argv in (
        ["apply", "pkg", "photos/", "--out", "o", "--batch-size", "0"],
        ["bench", "pkg", "--batches", "0"],
        ["edit", *REQUIRED["edit"], "--guidance-scale", "nan"],
    ):
        code, err, _ = parse(argv)
        assert code == 2 and len(err.strip().splitlines()) == 1, (argv, err)


def test_device_auto_is_resolved_in_one_place(monkeypatch):
    import torch

    from p2pz.utils.devices import resolve_device

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device("auto") == resolve_device(None) == "cpu"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert resolve_device("auto") == "cuda" and resolve_device("cpu") == "cpu"
    code, err, _ = parse(["bench", "pkg", "--device", "gpu0"])
    assert code == 2 and len(err.strip().splitlines()) == 1


def test_no_progress_turns_library_bars_off_for_the_command_only():
    """A command imports tqdm after main() applied --no-progress: its library bars are off (a fresh
    process, as the command line is), and the setting does not outlive the command."""
    import os
    import subprocess
    import sys

    script = (
        "from p2pz.cli.options import progress_bars\n"
        "with progress_bars(False):\n"
        "    from tqdm import tqdm\n"
        "    print(tqdm(range(2)).disable)\n"
        "import os; print(os.environ.get('TQDM_DISABLE'))\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "TQDM_DISABLE"}
    out = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["True", "None"]


# ------------------------------------------------------------------------------------------------
# generate (jsonargparse over the settings dataclass)


GENERATE_BASE = ["--out", "pairs", "--model", "m", "--edit", "cat:dog", "--synthetic"]


def test_generate_follows_the_convention():
    from p2pz.cli.pairs import generate_parser, parse_generate_args

    parser = generate_parser()
    for action in visible_options(parser):
        assert action.help and not MARKUP.search(action.help), action.option_strings
    assert option(parser, "--device").default == "auto" and option(parser, "--dtype").default == "auto"
    assert option(parser, "--no-progress") is not None and option(parser, "--seed").default == 0
    settings = parse_generate_args([*GENERATE_BASE, "--dtype", "bf16", "--no-progress"], environ={})
    assert settings.dtype == "bfloat16" and settings.progress is False
    settings = parse_generate_args([*GENERATE_BASE, "--edit", "cat:lion", "cat:fox", "--edit", "a:b"], {})
    assert settings.edit == ["cat:dog", "cat:lion", "cat:fox", "a:b"]
    with pytest.raises(UserError, match="--dtype"):
        parse_generate_args([*GENERATE_BASE, "--dtype", "float64"], environ={})


def generate_numeric_fields() -> list[str]:
    from p2pz.data.pairs.settings import Settings

    hints = typing.get_type_hints(Settings)
    numeric = []
    for name, hint in hints.items():
        kinds = set(typing.get_args(hint)) or {hint}
        if kinds & {int, float}:
            numeric.append(name)
    return numeric


@pytest.mark.parametrize("name", generate_numeric_fields())
@pytest.mark.parametrize("value", ["0", "-1", "nan", "inf"])
def test_generate_bad_numbers_are_one_line(name, value):
    from p2pz.cli.pairs import parse_generate_args

    flag = "--" + name.replace("_", "-")
    allowed_zero = {"seed", "min_size", "task_index", "guidance_scale", "xa_guidance"}
    argv = [*GENERATE_BASE, flag, value]
    if value == "0" and name in allowed_zero:
        parse_generate_args(argv, environ={})
        return
    with pytest.raises(UserError) as caught:
        parse_generate_args(argv, environ={})
    assert "\n" not in str(caught.value) and flag in str(caught.value)


# ------------------------------------------------------------------------------------------------
# train (a LightningCLI): Lightning's own flags keep its names; its help (docstrings) is plain text


def test_train_has_the_convention_where_it_applies(capsys):
    from p2pz.cli.main import main

    with pytest.raises(SystemExit) as exit_info:
        main(["train", "fit", "--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    for flag in ("--seed_everything", "--trainer.accelerator", "--trainer.enable_progress_bar"):
        assert flag in text  # seed, device and progress bars, in Lightning's names
    assert "--model.preset" in text and "--data.shards" in text
    marked = [line for line in text.splitlines() if MARKUP.search(line)]
    assert not marked, marked[:5]
