"""The documentation stays true: links resolve, command lines parse, docs/cli/ matches the commands.

Every ``p2pz ...`` line in a ```bash block of README.md or docs/**/*.md is parsed by the real parser
(``build_parser().parse_args``) without running it; ``p2pz generate``'s arguments also by its own
jsonargparse parser. ``p2pz train`` is a LightningCLI whose parsing instantiates the model and data:
for it the subcommand and the ``--config`` files are checked. Other lines (``python X.py``, ``sbatch``)
are checked for the repository files they name.
"""

from __future__ import annotations

import importlib.util
import re
import shlex
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PAGES = [REPO / "README.md", REPO / "ARCHITECTURE.md", *sorted((REPO / "docs").rglob("*.md"))]
FENCE = re.compile(r"^```(\w*)\n(.*?)^```", re.S | re.M)
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")
TRAIN_SUBCOMMANDS = {"fit", "validate", "test", "predict"}
REPO_FILE = re.compile(r"^[\w.\-/]+\.(?:py|yaml|yml|sbatch|sh|md|txt|png|json)$")


def _rel(page: Path) -> str:
    return str(page.relative_to(REPO))


def _prose(text: str) -> str:
    """The page without fenced blocks and inline code, where a bracket is not a link."""
    text = FENCE.sub("", text)
    return re.sub(r"`[^`\n]*`", "", text)


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation but - and _ dropped, spaces to -."""
    text = re.sub(r"[`*]", "", heading.strip().lower())
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def anchors(page: Path) -> set[str]:
    headings = re.findall(r"^#{1,6}\s+(.+?)\s*#*$", FENCE.sub("", page.read_text()), re.M)
    return {slug(h) for h in headings}


def links() -> list[tuple[Path, str]]:
    return [(page, target) for page in PAGES for target in LINK.findall(_prose(page.read_text()))]


@pytest.mark.parametrize("page", PAGES, ids=_rel)
def test_every_relative_link_resolves(page: Path):
    broken = []
    for target in LINK.findall(_prose(page.read_text())):
        if re.match(r"^[a-z]+:", target):  # https:, mailto:
            continue
        path_part, _, anchor = target.partition("#")
        path = (page.parent / path_part).resolve() if path_part else page
        if not path.exists():
            broken.append(f"{target} (no such file)")
        elif anchor and path.suffix == ".md" and anchor not in anchors(path):
            broken.append(f"{target} (no heading '{anchor}' in {path.name})")
    assert not broken, f"{_rel(page)}: broken links: {broken}"


def command_lines(text: str) -> list[str]:
    """The commands of a page's ```bash blocks: continuations joined, comments and `$ ` dropped."""
    lines = []
    for lang, body in FENCE.findall(text):
        if lang not in ("bash", "sh", "shell", "console"):
            continue
        body = re.sub(r"\\\n", " ", body)
        for line in body.splitlines():
            line = re.sub(r"^\s*\$\s+", "", line).strip()
            if line and not line.startswith("#"):
                lines.append(line)
    return lines


def commands(line: str) -> list[list[str]]:
    """A shell line's simple commands (split at && || ; |), each without leading VAR=value words."""
    words = shlex.split(line, comments=True)
    out: list[list[str]] = [[]]
    for word in words:
        if word in ("&&", "||", ";", "|"):
            out.append([])
        else:
            out[-1].append(word)
    return [cmd for cmd in out if cmd]


def env_and_argv(cmd: list[str]) -> tuple[dict[str, str], list[str]]:
    env = {}
    while cmd and re.match(r"^[A-Z_][A-Z0-9_]*=", cmd[0]):
        key, _, value = cmd[0].partition("=")
        env[key] = value
        cmd = cmd[1:]
    return env, cmd


DOC_COMMANDS = [
    (page, line, cmd) for page in PAGES for line in command_lines(page.read_text()) for cmd in commands(line)
]


def test_the_docs_have_command_lines_to_check():
    p2pz_lines = [cmd for _, _, cmd in DOC_COMMANDS if env_and_argv(cmd)[1][:1] == ["p2pz"]]
    assert len(p2pz_lines) >= 20  # a broken extractor would otherwise pass every check below


def check_p2pz(argv: list[str]) -> None:
    """Parse ``p2pz ARGV`` as the command would, running nothing; AssertionError on a bad line."""
    from p2pz.cli import config_files, split_config_args
    from p2pz.cli.main import build_parser

    try:
        args = build_parser().parse_args(argv)
    except SystemExit as exit:
        raise AssertionError(f"'p2pz {shlex.join(argv)}' does not parse (exit {exit.code})") from None
    if args.command == "generate":
        import argparse

        from p2pz.cli.pairs import generate_parser

        configs, rest = split_config_args(list(args.rest))
        try:
            generate_parser().parse_args(configs + rest)
        except (argparse.ArgumentError, SystemExit) as err:
            raise AssertionError(f"'p2pz {shlex.join(argv)}': {err}") from None
    if args.command == "train":
        rest = [arg for arg in args.rest if arg not in ("-c",)]
        assert rest and rest[0] in TRAIN_SUBCOMMANDS, f"'p2pz {shlex.join(argv)}': no subcommand"
        for path in config_files(rest):
            assert (REPO / path).is_file(), f"'p2pz {shlex.join(argv)}': no config {path}"


def check_files(argv: list[str], env: dict[str, str]) -> None:
    """The repository files a ``python X.py`` / ``python -m MODULE`` / ``sbatch`` line names exist."""
    words = [*env.values(), *argv[1:]]
    if argv[0] == "python" and argv[1:2] == ["-m"]:
        module = argv[2]
        if module.startswith("p2pz"):
            assert importlib.util.find_spec(module) is not None, f"no module {module}"
        words = words[2:]
    for word in words:
        if REPO_FILE.match(word) and "/" in word and not word.startswith(("/", "out/", "runs/", "models/")):
            if argv[0] == "sbatch" or word.startswith(("slurm/", "configs/", "benchmarks/", "docs/", ".ci/")):
                assert (REPO / word).exists(), f"{shlex.join(argv)}: no file {word}"
        elif word.endswith(".py") and "/" not in word:
            assert (REPO / word).is_file(), f"{shlex.join(argv)}: no file {word}"


@pytest.mark.parametrize(
    "page,line,cmd",
    DOC_COMMANDS,
    ids=[f"{_rel(p)}:{' '.join(c[:3])}" for p, _, c in DOC_COMMANDS],
)
def test_every_command_line_parses(page: Path, line: str, cmd: list[str]):
    env, argv = env_and_argv(cmd)
    if not argv:
        return
    if argv[0] == "p2pz":
        check_p2pz(argv[1:])
    elif argv[0] in ("python", "sbatch", "bash"):
        check_files(argv, env)


def test_command_line_checks_can_fail():
    """The checks above reject what they should: an unknown flag, a missing config, a dead link."""
    with pytest.raises(AssertionError):
        check_p2pz(["edit", "--no-such-flag"])
    with pytest.raises(AssertionError):
        check_p2pz(["generate", "--model", "m", "--no-such-setting", "1"])
    with pytest.raises(AssertionError):
        check_p2pz(["train", "fit", "--config", "configs/no-such.yaml"])
    with pytest.raises(AssertionError):
        check_files(["sbatch", "slurm/no-such.sbatch"], {})
    assert commands('A=1 p2pz x "a b" && p2pz y # c') == [["A=1", "p2pz", "x", "a b"], ["p2pz", "y"]]
    assert slug("`box_edges`: half the caption, and more") == "box_edges-half-the-caption-and-more"


def _cli_maker():
    spec = importlib.util.spec_from_file_location("docs_cli_make", REPO / "docs" / "cli" / "make.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_cli_help_files_are_up_to_date(tmp_path):
    """docs/cli/*.txt are each command's --help now; a stale or missing one names the fix."""
    maker = _cli_maker()
    rendered = maker.render_all()
    stale = maker.stale(rendered=rendered)
    assert not stale, f"stale docs/cli files {stale}: run python docs/cli/make.py"
    # ...and the comparison notices a changed, a missing and a left-over file
    for name, text in rendered.items():
        (tmp_path / name).write_text(text)
    (tmp_path / maker.file_name(["export"])).write_text("old help\n")
    (tmp_path / maker.file_name(["apply"])).unlink()
    (tmp_path / "p2pz-gone.txt").write_text("")
    expected = {maker.file_name(["apply"]), maker.file_name(["export"]), "p2pz-gone.txt"}
    assert set(maker.stale(tmp_path, rendered)) == expected


def test_the_preset_table_lists_every_preset_with_its_one_summary():
    """docs/teacher.md's preset table names exactly the presets the code has, the teacher's and the
    shapes world's (a list that went stale once: the README's omitted box_edges), each described by
    its ``Preset.summary``, the text ``--preset``'s help prints."""
    from p2pz.teacher.presets import available_presets

    presets = available_presets()
    text = (REPO / "docs" / "teacher.md").read_text()
    table = text.split("## Presets", 1)[1].split("\n## ", 1)[0]
    rows = dict(re.findall(r"^\| `(\w+)` \| ([^|]*) \|", table, re.M))
    assert sorted(rows) == sorted(presets), f"docs/teacher.md: {sorted(rows)}; the code: {sorted(presets)}"
    assert {name: rows[name] for name in presets} == {name: p.summary for name, p in presets.items()}


# ------------------------------------------------------------------------------------------------
# slurm/train.sbatch submissions request what their config needs

TRAIN_SBATCH = REPO / "slurm" / "train.sbatch"


def sbatch_usage_lines(script: str) -> list[str]:
    """The ``sbatch ...`` lines of the script's usage comment (``#   CMD``, continuations joined)."""
    body = "\n".join(line[1:].strip() for line in script.splitlines() if line.startswith("#   "))
    body = re.sub(r"\\\n", " ", body)
    return [line for line in body.splitlines() if re.match(r"^([A-Z_]+=\S+\s+)*sbatch\s", line)]


def train_submissions() -> list[tuple[str, dict[str, str], list[str]]]:
    """(where, environment, argv) of every ``sbatch ... slurm/train.sbatch`` in the docs' bash blocks
    and in the script's own usage comment."""
    lines = [(_rel(page), line) for page in PAGES for line in command_lines(page.read_text())]
    lines += [(_rel(TRAIN_SBATCH), line) for line in sbatch_usage_lines(TRAIN_SBATCH.read_text())]
    found = []
    for where, line in lines:
        for cmd in commands(line):
            env, argv = env_and_argv(cmd)
            if argv[:1] == ["sbatch"] and "slurm/train.sbatch" in argv:
                found.append((where, env, argv))
    return found


def sbatch_options(words: list[str]) -> dict[str, str]:
    """``--name=value`` / ``--name value`` options (sbatch's, before the script) as a dict."""
    options, i = {}, 0
    while i < len(words):
        name, eq, value = words[i].partition("=")
        if not eq and i + 1 < len(words) and not words[i + 1].startswith("-"):
            value, i = words[i + 1], i + 1
        options[name] = value
        i += 1
    return options


def script_directives(script: str, prefix: str = "#SBATCH") -> dict[str, str]:
    """The script's ``#SBATCH --name=value`` lines (``##SBATCH``: the commented-out GPU ones)."""
    return dict(re.findall(rf"^{prefix}\s+(--[\w-]+)=(\S+)", script, re.M))


def resource_problems(config_path: str, options: dict[str, str]) -> list[str]:
    """What a job with these sbatch options lacks for the config: one GPU per task on a GPU config, and
    a CPU per DataLoader worker plus one for the training process."""
    import yaml

    config = yaml.safe_load((REPO / config_path).read_text())
    if str(config.get("trainer", {}).get("accelerator")) not in ("gpu", "cuda"):
        return []
    tasks = int(options.get("--ntasks-per-node", "1"))
    gpus = int(options.get("--gpus-per-node", "0").split(":")[-1])  # gpus-per-node=a100:8 too
    if "--gpus-per-task" in options:
        gpus = tasks * int(options["--gpus-per-task"].split(":")[-1])
    if options.get("--gres", "").startswith("gpu"):
        gpus = int(options["--gres"].split(":")[-1])
    workers = int(config.get("data", {}).get("num_workers", 2))  # PairDataModule's default
    cpus = int(options.get("--cpus-per-task", "1"))
    problems = []
    if gpus != tasks:
        problems.append(f"{gpus} GPU(s) per node for {tasks} task(s) per node")
    if cpus < workers + 1:
        problems.append(f"{cpus} CPU(s) per task for {workers} DataLoader workers + the training process")
    return problems


def test_train_sbatch_submissions_request_the_gpus_and_cpus_their_config_needs():
    """Every documented ``sbatch ... slurm/train.sbatch`` with a GPU config (CONFIG, or the script's
    default) asks for a GPU per task and CPUs for the config's DataLoader workers, on top of the
    script's own #SBATCH lines; the README, docs/cluster.md and the script each show such a command."""
    script = TRAIN_SBATCH.read_text()
    default_config = re.search(r"^CONFIG=\$\{CONFIG:-([^}]+)\}", script, re.M).group(1)
    defaults = script_directives(script)
    with_gpus, problems = set(), []
    for where, env, argv in train_submissions():
        options = {**defaults, **sbatch_options(argv[1 : argv.index("slurm/train.sbatch")])}
        config = env.get("CONFIG", default_config)
        found = resource_problems(config, options) if (REPO / config).is_file() else [f"no config {config}"]
        problems += [f"{where}: {shlex.join(argv)}: {p}" for p in found]
        if not found and any(k in options for k in ("--gpus-per-node", "--gpus-per-task", "--gres")):
            with_gpus.add(where)
    assert not problems, problems
    assert with_gpus >= {"README.md", "docs/cluster.md", "slurm/train.sbatch"}, with_gpus


def test_train_sbatch_runs_on_cpus_by_default_and_its_gpu_lines_fit_sd14_512():
    """The script's active #SBATCH lines request no GPU (the tiny config, CPU-only clusters, the SLURM
    tests); its commented-out GPU lines, uncommented, fit configs/sd14-512.yaml."""
    script = TRAIN_SBATCH.read_text()
    defaults = script_directives(script)
    assert not {"--gpus-per-node", "--gpus-per-task", "--gres", "--gpus"} & set(defaults)
    assert resource_problems("configs/tiny.yaml", defaults) == []
    gpu_lines = {**defaults, **script_directives(script, "##SBATCH")}
    assert "--gpus-per-node" in gpu_lines
    assert resource_problems("configs/sd14-512.yaml", gpu_lines) == []


def test_resource_check_can_fail():
    """Without --gpus-per-node, or with 1 CPU for 6 workers, a sd14-512 submission is refused."""
    sd14 = "configs/sd14-512.yaml"
    bare = sbatch_options(["--nodes=4", "--ntasks-per-node", "8"])
    assert len(resource_problems(sd14, bare)) == 2
    assert len(resource_problems(sd14, {**bare, "--gpus-per-node": "8"})) == 1  # the CPUs
    assert resource_problems(sd14, {**bare, "--gpus-per-task": "1", "--cpus-per-task": "7"}) == []
    assert resource_problems("configs/tiny.yaml", bare) == []
    assert sbatch_usage_lines("#   A=1 \\\n#     sbatch --x=1 s.sbatch  # c\n#   other\n") == [
        "A=1  sbatch --x=1 s.sbatch  # c"
    ]
