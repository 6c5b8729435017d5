"""The demo as a newcomer sees it: a progress bar while the student trains, the time of each stage,
and no library noise they can do nothing about (while the project's own warnings still show)."""

from __future__ import annotations

import functools
import logging
import warnings

import pytest
from test_training import TINY, write_pair_shards

from p2pz.cli import demo
from p2pz.cli.quiet import library_noise_filtered


@pytest.fixture
def quiet():
    """The filters every command runs under (p2pz.cli.quiet), installed for one test."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with library_noise_filtered():
            yield caught


class _Records(logging.Handler):
    """The records a logger lets through to its handlers (after its level and its filters)."""

    def __init__(self) -> None:
        super().__init__(logging.NOTSET)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


def test_library_noise_is_filtered_narrowly(quiet, caplog, capfd):
    warn = functools.partial(warnings.warn, stacklevel=1)
    warn("The `srun` command is available on your system but is not used. HINT: ...")
    warn("`isinstance(treespec, LeafSpec)` is deprecated, use ...", DeprecationWarning)
    warn("Total length of `list` across ranks is zero. Please make sure this was your intention.")
    warn("only one shard and no --data.val_shards: training runs without validation")  # ours
    warn("`something_else` is deprecated", DeprecationWarning)  # another library's: shown
    assert [str(w.message) for w in quiet] == [
        "only one shard and no --data.val_shards: training runs without validation",
        "`something_else` is deprecated",
    ]
    # What passes the filters is read on the loggers themselves: what reaches the root logger (and
    # caplog) depends on propagation and handlers that Lightning's import and other tests change
    lightning, onnx = (
        logging.getLogger(n) for n in ("lightning.pytorch.utilities.rank_zero", "onnxscript.optimizer")
    )
    seen = _Records()
    caplog.set_level(logging.INFO, logger=lightning.name)  # whatever level was left on it (restored after)
    with caplog.at_level(logging.INFO):  # the root's level: the loggers' own levels still apply
        for logger in (lightning, onnx):
            logger.addHandler(seen)
        try:
            logging.getLogger("torch.utils.cpp_extension").warning(
                "No CUDA runtime is found, using CUDA_HOME='%s'", "/x"
            )
            logging.getLogger("torch.utils.cpp_extension").warning("Error building extension 'p2pz_ops_cpu'")
            lightning.info("💡 Tip: For seamless cloud logging ...")
            lightning.info("`Trainer.fit` stopped: `max_steps=3` reached.")
            onnx.info("Skipping constant folding for node ...")
            onnx.warning("a real problem")
        finally:
            for logger in (lightning, onnx):
                logger.removeHandler(seen)
    torch_lines = capfd.readouterr().err  # torch's loggers print through their own handler
    assert "Error building extension" in torch_lines and "No CUDA runtime" not in torch_lines
    assert [r.getMessage() for r in seen.records] == [
        "`Trainer.fit` stopped: `max_steps=3` reached.",
        "a real problem",
    ]


def test_stage_split_names_every_stage_and_the_total():
    line = demo.stage_split(
        {"teacher (generate)": 200.0, "student (train)": 290.0, "bench": 50.0, "total": 563.0}
    )
    assert line == (
        "time per stage: teacher (generate) 200 s (36%), student (train) 290 s (52%), bench 50 s (9%); "
        "total 9 min 23 s"
    )


def test_the_total_floors_its_minutes():
    """829 s is 13 min 49 s (13.8 minutes rounded would say 14 min)."""
    assert demo.stage_split({"bench": 829.0}).endswith("; total 13 min 49 s")
    assert demo.stage_split({"bench": 42.0}).endswith("; total 42 s")


@pytest.mark.parametrize(
    ("ratio", "shown"), [(1250.3, "1,250×"), (42.17, "42.2×"), (3.14159, "3.14×"), (99.96, "100×")]
)
def test_the_headline_prints_the_speedup_as_people_read_it(ratio, shown):
    bench = {"teacher_over_student": ratio, "teacher_ms": 900.0, "device": "cpu", "student": {}}
    assert f"<b>{shown}</b> faster" in demo._headline(bench)


def test_the_report_prints_no_figure_in_e_notation():
    """The headline's teacher time of 1,250 ms reads as 1,250, not 1.25e+03."""
    bench = {"teacher_over_student": 700.0, "teacher_ms": 1250.4, "device": "cpu", "student": {}}
    headline = demo._headline(bench)
    assert "(1,250 ms vs" in headline and "e+" not in headline


def test_the_bench_chart_title_prints_the_speedup_as_people_read_it(tmp_path, monkeypatch):
    from matplotlib.axes import Axes

    from p2pz.student.bench import plot_latency

    titles = []
    monkeypatch.setattr(Axes, "set_title", lambda self, text, **kw: titles.append(text))
    report = {"teacher_over_student": 3.14159, "teacher_ms": 900.0, "resolution": 64, "device": "cpu"}
    plot_latency({**report, "student": {"eager": {"1": {"p50_ms": 3.0}}}}, tmp_path / "chart.png")
    assert titles and titles[0].endswith(" — 3.14× faster than the teacher")


def test_training_shows_iterations_of_max_steps_and_the_loss(tmp_path, capsys):
    """`p2pz train` draws one bar over the run's iterations (Lightning's counts batches per epoch)."""
    from p2pz.cli import train
    from p2pz.student.callbacks import IterationProgressBar

    shards = write_pair_shards(tmp_path / "pairs", shards=2, per_shard=4)
    args = [
        "--config",
        TINY,
        "--data.shards",
        str(shards),
        "--trainer.default_root_dir",
        str(tmp_path / "run"),
    ]
    cli = train.main(args=[*args, "--trainer.max_steps", "4", "--data.epoch_length", "3"], run=False)
    assert isinstance(cli.trainer.progress_bar_callback, IterationProgressBar)
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    err = capsys.readouterr().err.replace("\r", "\n")
    final = [line for line in err.splitlines() if line.startswith("training:")][-1]
    assert "4/4" in final and "l1=" in final  # across two epochs of 3 batches: one bar, to max_steps

    off = train.main(args=[*args, "--trainer.enable_progress_bar", "false"], run=False)
    assert off.trainer.progress_bar_callback is None


@pytest.mark.parametrize(
    "rule, says", [("ioux >= 0.8", "unknown score 'ioux'"), ("success or iou", "cannot read")]
)
def test_demo_checks_its_keep_rule_before_writing(tmp_path, capsys, rule, says):
    from p2pz.cli.main import main

    out = tmp_path / "demo"
    assert main(["demo", "--out", str(out), "--keep-if", rule]) == 2
    assert says in capsys.readouterr().err
    assert not out.exists()


def test_the_report_says_why_its_teacher_is_not_the_worlds_best():
    """#34: the demo's teacher is joint, not box_edges; the report says why and where the figures are."""
    from pathlib import Path

    from p2pz.cli.demo import _why_this_teacher
    from p2pz.data.shapes.teacher_settings import DEMO_PRESET, TOY_PRESET

    why = _why_this_teacher(DEMO_PRESET)
    assert why.startswith(f"{DEMO_PRESET}, not {TOY_PRESET}") and "docs/results/demo.md" in why
    page = (Path(__file__).parents[1] / "docs" / "results" / "demo.md").read_text()
    assert f"## Why the demo's teacher is `{DEMO_PRESET}`" in page and f"`{TOY_PRESET}`, 5 |" in page
    assert _why_this_teacher("box") == "box, as asked (--preset)"
