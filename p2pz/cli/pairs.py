"""``p2pz generate`` (the teacher's pairs into shards) and ``p2pz shards inspect``.

``p2pz generate`` is configured like the training CLI: a jsonargparse parser built from the settings
dataclass (:class:`p2pz.data.pairs.settings.Settings`), a ``--config`` YAML whose keys are the flags'
names, flags that override it. The ``p2pz`` command (argparse) hands every argument after the word
``generate`` to that parser, which is built only when the command runs (``p2pz --help`` stays fast).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import re
import typing
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from p2pz.cli import add_passthrough_command, check_config_files, split_config_args
from p2pz.cli.options import hidden_alias
from p2pz.utils.errors import UserError
from p2pz.utils.values import non_negative_int

if TYPE_CHECKING:
    import jsonargparse

    from p2pz.data.pairs.settings import Settings

GENERATE_DESCRIPTION = """\
Run the pix2pix-zero teacher over many inputs and store (input, edited) pairs as
WebDataset shards pairs-000000.tar, ... in --out, with dataset.json and one manifest
(JSON lines: shards, counts, skipped inputs and why, pairs/hour and the teacher's
UNet evaluations per pair) per task. Several edits of the same inputs share each
input's inversion and reference pass (shards stay per edit; --no-share-inversion:
every pair on its own).

Every setting can come from a YAML config (--config, keys = flag names, with _ or -)
and be overridden by its flag, wherever --config stands. Safe to kill and re-run:
finished shards are kept, unfinished ones redone, giving exactly the samples of an
uninterrupted run. On a cluster, run one task per array index (--task-index/--num-tasks,
default SLURM_ARRAY_TASK_ID/COUNT)."""

GENERATE_EPILOG = """\
examples:
  p2pz generate --model CompVis/stable-diffusion-v1-4 --edit cat:dog \\
      --inputs photos/ --out pairs/
  p2pz generate --model CompVis/stable-diffusion-v1-4 --edit cat:dog cat:lion \\
      "cat:cat wearing a hat" --inputs photos/ --out pairs/   # one inversion per photo
  p2pz generate --config configs/generate-cat-dog.yaml --task-index 3 --num-tasks 16
  p2pz generate --config configs/generate-cat-dog.yaml --print_config   # the merged settings"""

# Other names of a setting, as flags and YAML keys (a plural reads naturally over a YAML list).
ALIASES = {"edit": ["edits"]}


def register(subparsers: argparse._SubParsersAction) -> None:
    _register_generate(subparsers)
    _register_shards(subparsers)


# --------------------------------------------------------------------------------------------------
# p2pz generate


def _register_generate(subparsers: argparse._SubParsersAction) -> None:
    help_line = "make (input, edit) pairs with the teacher into WebDataset shards"
    add_passthrough_command(
        subparsers, "generate", _generate, help=help_line, description=GENERATE_DESCRIPTION
    )


def _generate(argv: list[str]) -> int:
    from p2pz.data.pairs.generate import run

    settings = parse_generate_args(argv)
    scorer = build_scorer(settings)
    settings, teacher = calibrate_if_asked(settings, scorer)
    done = run(settings, teacher=teacher, scorer=scorer)
    evals = done.get("unet_evals_per_pair") or {}
    cost = (
        f", {evals['forward']:g} forward + {evals['backward']:g} backward UNet evaluations per pair"
        if evals.get("forward") is not None
        else ""
    )
    kept_out = f", {done['rejected']} kept out by --keep-if" if done.get("keep_if") else ""
    print(
        f"task {done['task_index']}/{done['num_tasks']}: wrote {done['shards_written']} shards, "
        f"{done['samples_written']} pairs ({done['skipped']} skipped{kept_out}) to {settings.out}{cost}"
    )
    return 0


def calibrate_if_asked(settings: Settings, scorer: Any) -> tuple[Settings, Any]:
    """``--xa-guidance auto``: the settings with the step calibrated for the edit on its first inputs
    (``p2pz.data.eval.calibration``; the sweep goes to ``OUT/calibration.json``), and the teacher it
    loaded (reused for the pairs). Other settings pass through, with no teacher."""
    if settings.xa_guidance != "auto":
        return settings, None
    from p2pz.data.eval.calibration import CALIBRATION_SCENES, calibrate_guidance
    from p2pz.data.pairs.generate import ensure_direction, load_teacher, open_inputs, resolve_edits
    from p2pz.data.shapes import teacher_settings as toy
    from p2pz.data.shapes.edits import model_vocabulary
    from p2pz.utils.atomic import atomic_path

    edits = resolve_edits(settings)
    if len(edits) != 1 or settings.synthetic:
        raise UserError(
            "--xa-guidance auto calibrates one edit on --inputs images: run generate per edit, or give "
            "each edit's step (p2pz calibrate prints it)"
        )
    if scorer is None:
        raise UserError("--xa-guidance auto needs pair scores to choose by: --score world or --score paper")
    source, job = open_inputs(settings), edits[0]
    images = [source.load(i).image for i in source.ids(job.source)[:CALIBRATION_SCENES]]
    teacher = load_teacher(settings)
    world_model = model_vocabulary(settings.model) is not None
    base = toy.toy_calibration_base(teacher.preset) if world_model else teacher.preset.xa_guidance_real
    calibration = calibrate_guidance(
        teacher,
        job.edit,
        ensure_direction(teacher, job, settings),
        images,
        scorer,
        base,
        num_steps=settings.steps,
        guidance_scale=settings.guidance_scale,
        seed=settings.seed,
    )
    print(calibration.summary())
    Path(settings.out).mkdir(parents=True, exist_ok=True)
    with atomic_path(Path(settings.out) / "calibration.json") as tmp:
        Path(tmp).write_text(json.dumps(calibration.to_dict(), indent=1) + "\n")
    return dataclasses.replace(settings, xa_guidance=calibration.chosen), teacher


def build_scorer(settings: Settings):  # -> PairScorer | None
    """The pair scorer ``--score`` names (``auto``: the oracle for shapes-world edits), built here, above
    the layer that uses it (``p2pz.data.pairs`` must not import the metrics of ``p2pz.data.eval``)."""
    from p2pz.data.eval.pair_scores import make_pair_scorer
    from p2pz.data.pairs.generate import resolve_edits

    return make_pair_scorer(
        settings.score,
        edits=[job.edit for job in resolve_edits(settings)],
        clip_model=settings.clip_model,
        dino_model=settings.dino_model,
        device=settings.device,
    )


def parse_generate_args(argv: Sequence[str], environ: Mapping[str, str] | None = None) -> Settings:
    """``p2pz generate``'s arguments as validated settings: defaults < ``--config`` YAML < flags; an
    unset task split comes from a SLURM array's environment (``environ``, default ``os.environ``).

    Anything wrong raises a one-line :class:`UserError`; ``--help`` and ``--print_config`` print and
    exit (``SystemExit``) as in every jsonargparse command.
    """
    from p2pz.data.pairs.settings import Settings, validate, with_task_split
    from p2pz.utils.devices import dtype_name

    # jsonargparse applies arguments in order, and flags override the config wherever they stand
    configs, rest = split_config_args(argv)
    argv = configs + rest
    check_config_files(argv)  # missing, binary, empty or broken YAML: one line naming the file
    try:
        namespace = generate_parser().parse_args(argv)
    except argparse.ArgumentError as err:
        raise UserError(_one_line(str(err), argv)) from None
    values = {f.name: namespace[f.name] for f in dataclasses.fields(Settings)}
    for name in _list_fields():
        if isinstance(values[name], str):  # "edit: cat:dog" in a YAML: one item
            values[name] = [values[name]]
    settings = with_task_split(Settings(**values), environ)
    validate(settings)
    return dataclasses.replace(settings, dtype=dtype_name(settings.dtype, allow_auto=True))  # fp16 -> float16


def generate_parser() -> jsonargparse.ArgumentParser:
    """The jsonargparse parser of ``p2pz generate``: a flag per field of ``Settings`` (``--seed``,
    ``--samples-per-shard``), of the field's type, with the ``Args:`` of its docstring as help."""
    import docstring_parser
    from jsonargparse import ActionConfigFile, ActionYesNo, ArgumentParser, DefaultHelpFormatter

    from p2pz.data.pairs.settings import Settings
    from p2pz.teacher.presets import available_presets, describe_presets

    class Formatter(DefaultHelpFormatter, argparse.RawDescriptionHelpFormatter):
        """jsonargparse's help (every flag's type and default) with the description's line breaks."""

        def _get_type_str(self, action: argparse.Action) -> str | None:
            if isinstance(action, _Repeatable):
                return "list[str]"
            return "str" if action.choices else super()._get_type_str(action)  # not the choices' wrapper

    parser = ArgumentParser(
        prog="p2pz generate",
        description=GENERATE_DESCRIPTION,
        epilog=GENERATE_EPILOG,
        formatter_class=Formatter,
        exit_on_error=False,
        default_env=False,
    )
    parser.add_argument(
        "--config", action=ActionConfigFile, help="YAML file whose keys are these flags' names (without --)"
    )
    docs = {
        p.arg_name: " ".join(p.description.split()) for p in docstring_parser.parse(Settings.__doc__).params
    }
    hints = typing.get_type_hints(Settings)
    lists = _list_fields()
    for f in dataclasses.fields(Settings):
        flags = ["--" + name.replace("_", "-") for name in [f.name, *ALIASES.get(f.name, [])]]
        kwargs = {
            "help": docs[f.name],
            **({"metavar": f.metadata["metavar"]} if "metavar" in f.metadata else {}),
        }
        if f.name == "preset":  # the presets' one description, and every installed world's
            kwargs.update(help=f"{docs[f.name]}: {describe_presets()}", choices=list(available_presets()))
        if hints[f.name] is bool:
            parser.add_argument(*flags, action=ActionYesNo(no_prefix="no-"), default=f.default, **kwargs)
        elif f.name in lists:
            parser.add_argument(
                *flags, action=_Repeatable, nargs="+", type=_text_or_texts, default=[], **kwargs
            )
        else:
            parser.add_argument(*flags, type=hints[f.name], default=f.default, **kwargs)
    return parser


def _list_fields() -> set[str]:
    from p2pz.data.pairs.settings import Settings

    return {name for name, hint in typing.get_type_hints(Settings).items() if typing.get_origin(hint) is list}


def _text_or_texts(value: object) -> str | list[str]:
    """The type of a repeatable flag: one text from the command line; a text or a list in a YAML."""
    if isinstance(value, str):
        return value
    if isinstance(value, list) and all(isinstance(v, str) for v in value):
        return list(value)
    raise TypeError("must be a text or a list of texts")


class _Repeatable(argparse.Action):
    """A list flag in the ``p2pz`` list syntax: space-separated values (``--edit a:b c:d``), the flag
    repeatable (``--edit a:b --edit c:d``); its first use on the command line replaces the config's
    list, the following ones add to it."""

    def __call__(self, parser, namespace, values, option_string=None) -> None:
        for value in values if isinstance(values, list) else [values]:
            current = getattr(namespace, self.dest, None)
            if current is not None and current is getattr(self, "_made", None):
                current.append(value)
            else:
                self._made = [value]
                setattr(namespace, self.dest, self._made)


def _one_line(message: str, argv: Sequence[str]) -> str:
    """jsonargparse's error message, often several lines, as one line naming the setting and its flag."""
    from p2pz.data.pairs.settings import Settings

    hints = typing.get_type_hints(Settings)
    configs = [a.removeprefix("--config=") for a in argv if a.startswith("--config=")]
    configs += [argv[i + 1] for i, a in enumerate(argv[:-1]) if a == "--config"]
    where = f"config {', '.join(configs)}: " if configs else ""
    unknown = re.search(r"(?:Option|Key) '([^']+)' is not (?:accepted|expected)", message)
    if unknown:
        return f"{where}unknown setting {unknown.group(1)!r}; known: {', '.join(sorted(hints))}"
    bad = re.match(r'Parser key "([\w-]+)":', message)
    name = bad.group(1).replace("-", "_") if bad else None
    if name in hints:
        given = re.search(r"(?:Got|Given) value: (.*)$", message, flags=re.M)
        got = f", got {given.group(1).strip()!r}" if given else ""
        return f"--{name.replace('_', '-')} ({name}: in a config) must be {_kind(hints[name])}{got}"
    if name == "config":  # the file itself: missing, unreadable
        return f"cannot read --config: {' '.join(message.split()[3:])}"
    if message.startswith("Problems parsing config"):
        return f"{where}not valid YAML: {' '.join(message.split())}"
    if message.startswith("Unexpected config"):
        return f"{where}must be a mapping of setting: value"
    return " ".join(message.split())


def _kind(hint: object) -> str:
    """What a setting's type takes, in words: ``int | None`` -> "an integer"."""
    if typing.get_origin(hint) is list:
        return "a text or a list of texts"
    kinds = {int: "an integer", float: "a number", bool: "true or false", str: "a text"}
    inner = [a for a in typing.get_args(hint) if a is not type(None)] or [hint]
    return kinds.get(inner[0], str(hint))


# --------------------------------------------------------------------------------------------------
# p2pz shards inspect


def _inspect(args: argparse.Namespace) -> int:
    from p2pz.data.pairs.inspect import SHEET_NAME, contact_sheet, format_summary, summarise
    from p2pz.utils.atomic import atomic_path

    summary = summarise(args.folder, sheet_pairs=args.grid_pairs)
    pairs = summary.pop("_sheet")
    damaged = summary["damaged_shards"]
    sheet_path = None
    if args.grid_pairs > 0 and pairs and not damaged:  # a run that ends in an error writes nothing
        sheet_path = Path(args.sheet) if args.sheet else Path(args.folder) / SHEET_NAME
        with atomic_path(sheet_path, suffix=".png") as tmp:
            contact_sheet(pairs).save(tmp, format="PNG")
    summary["contact_sheet"] = str(sheet_path) if sheet_path else None
    if args.json:
        print(json.dumps(summary, indent=2, default=list))
    else:
        print(format_summary(summary))
        if sheet_path:
            print(f"  sheet       {sheet_path} ({len(pairs)} pairs)")
    if damaged:  # the summary above says what is left; the one error line says what to do
        first = Path(args.folder) / damaged[0]["shard"]
        more = f" and {len(damaged) - 1} more" if len(damaged) > 1 else ""
        raise UserError(
            f"damaged shard {first} ({damaged[0]['error']}){more}: delete the damaged shards and re-run "
            "the same 'p2pz generate' command, which writes them again (no contact sheet written)"
        )
    return 0


def _register_shards(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "shards",
        help="look at generated datasets (see 'p2pz shards inspect')",
        description="Tools for the WebDataset shards that 'p2pz generate' writes.",
    )
    sub = parser.add_subparsers(dest="shards_command", metavar="ACTION", required=True)
    inspect = sub.add_parser(
        "inspect",
        help="summarise a dataset and draw a contact sheet of a few pairs",
        description="Count shards, pairs, edits and skipped inputs of a 'p2pz generate' output folder, show "
        "the teacher settings used, and save a contact sheet PNG (input | edit | reconstruction).",
    )
    inspect.add_argument("folder", metavar="DIR", help="the --out folder of 'p2pz generate'")
    inspect.add_argument(
        "--grid-pairs",
        type=non_negative_int,
        default=8,
        metavar="N",
        help="pairs on the contact sheet (0: none; default 8)",
    )
    hidden_alias(inspect, "--pairs", "grid_pairs", type=non_negative_int)  # its name before --grid-pairs
    inspect.add_argument(
        "--sheet", metavar="PNG", help="where to save the contact sheet (default DIR/contact-sheet.png)"
    )
    inspect.add_argument("--json", action="store_true", help="print the summary as JSON")
    inspect.set_defaults(func=_inspect)
    _register_filter(sub)


# --------------------------------------------------------------------------------------------------
# p2pz shards filter

FILTER_EPILOG = """rule: clauses joined by 'and', each NAME (true / non-zero) or NAME OP NUMBER, OP one of
>= > <= < == != (true/false stand for 1/0). A pair missing a score fails its clause.
  shapes world (--score world, the default for its edits): success, target, kept,
      others_kept, found, iou, iou_input, centre_shift_px, psnr_outside
  real images (--score paper): clip_direction, clip_target_prob, clip_acc, structure_dist

examples:
  p2pz shards filter pairs/ pairs-good/ --keep-if "success and iou >= 0.8"
  p2pz shards filter pairs/ pairs-good/ --keep-if 'clip_acc and structure_dist <= 0.05'
"""


def _register_filter(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser(
        "filter",
        help="copy only the pairs whose scores pass a rule into new shards",
        description="Copy the pairs of SRC whose scores (written by 'p2pz generate' into each pair's\n"
        "json) pass --keep-if into new shards in DST, with dataset.json and filter.json (the\n"
        "rule, counts per shard, the kept fraction). DST must not exist; it appears only\n"
        "when complete.",
        epilog=FILTER_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("src", metavar="SRC", help="the --out folder of 'p2pz generate'")
    parser.add_argument("dst", metavar="DST", help="a new folder for the kept pairs")
    parser.add_argument("--keep-if", required=True, metavar="RULE", help="e.g. 'success and iou >= 0.8'")
    parser.add_argument(
        "--score",
        choices=("world", "paper"),
        help="score the pairs that carry no scores (made before scoring existed) with this scorer",
    )
    parser.add_argument("--clip-model", metavar="PATH_OR_ID", help="CLIP for --score paper")
    parser.add_argument("--dino-model", metavar="PATH_OR_ID", help="DINO ViT for --score paper")
    parser.add_argument("--json", action="store_true", help="print filter.json's record as JSON")
    parser.set_defaults(func=_filter)


def _filter(args: argparse.Namespace) -> int:
    from p2pz.data.pairs.filtering import filter_shards, parse_keep_if

    parse_keep_if(args.keep_if)  # a rule that does not parse stops before any model loads
    scorer = None
    if args.score:
        from p2pz.data.eval.pair_scores import make_pair_scorer

        scorer = make_pair_scorer(
            args.score, clip_model=args.clip_model, dino_model=args.dino_model, device="auto"
        )
    report = filter_shards(args.src, args.dst, args.keep_if, scorer=scorer, progress=not args.json)
    if args.json:
        print(json.dumps(report, indent=2))
        return 0
    fraction = report["kept_fraction"]
    print(
        f"kept {report['pairs_kept']} of {report['pairs_in']} pairs"
        + (f" ({fraction:.1%})" if fraction is not None else "")
        + f" with {report['keep_if']!r} into {args.dst}"
    )
    for clause, count in sorted(report["failed_clauses"].items(), key=lambda kv: -kv[1]):
        print(f"  {count:6d} pairs fail {clause}")
    return 0
