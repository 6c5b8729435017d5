"""Student training: losses, the LightningModule, the DataModule, the CLI (`p2pz train` = train.py),
checkpoints, DDP.

Everything runs on the CPU with tiny students at 64 px and pair shards drawn here (shapes on a
background, edited by a known transform), written with webdataset's TarWriter in the teacher's format.
"""

from __future__ import annotations

import copy
import io
import json
import math
import runpy
import subprocess
import sys
from pathlib import Path

import lightning.pytorch as pl
import numpy as np
import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
TINY = str(REPO / "configs" / "tiny.yaml")


# --------------------------------------------------------------------------------------------------
# Procedural pairs in the teacher's shard format


def draw_shapes(rng: np.random.Generator, size: int) -> np.ndarray:
    """An RGB uint8 image: a flat background with 1-3 coloured discs, squares and triangles."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) + 0.5
    image = np.empty((size, size, 3), np.float32)
    image[:] = rng.uniform(0.1, 0.5, size=3) * 255
    for _ in range(rng.integers(1, 4)):
        kind = rng.integers(3)
        cx, cy = rng.uniform(0.2, 0.8, size=2) * size
        r = rng.uniform(0.1, 0.22) * size
        if kind == 0:
            mask = (xx - cx) ** 2 + (yy - cy) ** 2 <= r * r
        elif kind == 1:
            mask = (np.abs(xx - cx) <= r) & (np.abs(yy - cy) <= r)
        else:
            mask = (yy <= cy + r) & (yy >= cy - r) & (np.abs(xx - cx) <= (yy - (cy - r)) / 2)
        image[mask] = rng.uniform(0.5, 1.0, size=3) * 255 * rng.permutation([1.0, 1.0, 0.3])
    return image.round().clip(0, 255).astype(np.uint8)


def mirror_and_swap(image: np.ndarray) -> np.ndarray:
    """The known edit: mirror left-right and rotate the colour channels (RGB -> GBR)."""
    return np.ascontiguousarray(image[:, ::-1, [1, 2, 0]])


def _png(array: np.ndarray) -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


def write_pair_shards(
    directory: Path, shards: int, per_shard: int, size: int = 64, seed: int = 0, edit=mirror_and_swap
) -> Path:
    """``pairs-%06d.tar`` shards of (src, edit, json) samples with unique keys ``s<shard>-<index>``."""
    import webdataset as wds

    directory.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for shard in range(shards):
        with wds.TarWriter(str(directory / f"pairs-{shard:06d}.tar")) as sink:
            for index in range(per_shard):
                src = draw_shapes(rng, size)
                meta = {"caption": "shapes", "edit": {"source": "shapes", "target": "mirrored shapes"}}
                sink.write(
                    {
                        "__key__": f"s{shard:03d}-{index:05d}",
                        "src.png": _png(src),
                        "edit.png": _png(edit(src)),
                        "json": json.dumps(meta).encode(),
                    }
                )
    return directory


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    """Four training-size shards of 8 pairs (three for training, one held out for validation)."""
    return write_pair_shards(tmp_path_factory.mktemp("pairs"), shards=4, per_shard=8)


def fit(shards: Path, run: Path, *extra: str, ckpt_path: str | None = None, callbacks=()):
    """``p2pz train fit --config configs/tiny.yaml ...`` in this process, plus test callbacks."""
    from p2pz.cli import train

    args = [
        "--config",
        TINY,
        "--data.shards",
        str(shards),
        "--trainer.default_root_dir",
        str(run),
        "--trainer.enable_progress_bar",
        "false",
        *extra,
    ]
    cli = train.main(args=args, run=False)
    cli.trainer.callbacks.extend(callbacks)
    cli.trainer.fit(cli.model, datamodule=cli.datamodule, ckpt_path=ckpt_path)
    return cli


def load_ckpt(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=False)


# --------------------------------------------------------------------------------------------------
# What a run shows in TensorBoard


def test_a_20_step_run_leaves_tensorboard_scalars_and_the_same_held_out_grid(shards, tmp_path, capsys):
    """configs/tiny.yaml (20 iterations, validation every 10): the event file holds val/psnr_to_teacher
    and the L1s at both validations, and val/grid drawn from the same held-out pairs both times."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run = tmp_path / "run"
    fit(shards, run)
    assert f"tensorboard --logdir {run / 'lightning_logs'}" in capsys.readouterr().out
    [version] = run.glob("lightning_logs/version_*")
    assert list(version.glob("events.out.tfevents.*")) and (version / "metrics.csv").is_file()
    events = EventAccumulator(str(version), size_guidance={"images": 0, "scalars": 0}).Reload()
    scalars = events.Tags()["scalars"]
    for tag in ("val/psnr_to_teacher", "val/psnr_copy", "val/l1", "val/l1_copy", "train/g_l1"):
        assert tag in scalars, tag
    psnr = events.Scalars("val/psnr_to_teacher")
    assert len(psnr) == 2 and all(0 < e.value < 100 for e in psnr)  # one per validation
    grids = events.Images("val/grid")
    assert [g.step for g in grids] == [10, 20]
    assert grids[0].width == grids[1].width > 0 and grids[0].height == grids[1].height > 0

    # the same pairs in both grids: the input and teacher columns are identical, the student's may change
    from PIL import Image

    first, last = (np.asarray(Image.open(run / "grids" / f"val-step-{s:07d}.png")) for s in (10, 20))
    column = first.shape[1] // 3
    np.testing.assert_array_equal(first[:, : 2 * column], last[:, : 2 * column])


# --------------------------------------------------------------------------------------------------
# Losses


def test_r1_is_the_squared_input_gradient_and_reaches_the_weights():
    from p2pz.student.losses import r1_penalty

    torch.manual_seed(0)
    weight = torch.randn(3 * 4 * 4, requires_grad=True)

    def critic(y):  # D(y) = sum(w * y)^2 per sample: grad_y = 2 * (w.y) * w
        return (y.flatten(1) @ weight).square().unsqueeze(1)

    y = torch.randn(2, 3, 4, 4, requires_grad=True)
    penalty = r1_penalty(critic(y), y)
    dots = (y.flatten(1) @ weight).detach()
    expected = (4 * dots.square() * weight.detach().square().sum()).mean()
    torch.testing.assert_close(penalty, expected)
    penalty.backward()  # second order: d/dw of ||grad_y D||^2
    assert weight.grad is not None and weight.grad.abs().sum() > 0


def test_gan_losses_are_the_logistic_ones():
    from p2pz.student.losses import discriminator_gan_loss, generator_gan_loss

    real, fake = torch.tensor([[2.0], [-1.0]]), torch.tensor([[0.5], [-3.0]])
    torch.testing.assert_close(generator_gan_loss(fake), torch.log1p(torch.exp(-fake)).mean())
    torch.testing.assert_close(
        discriminator_gan_loss(real, fake),
        torch.log1p(torch.exp(fake)).mean() + torch.log1p(torch.exp(-real)).mean(),
    )


def test_lpips_loads_a_user_backbone_and_refuses_to_run_without_one(tmp_path):
    import torchvision

    from p2pz.student.losses import PerceptualLoss
    from p2pz.utils.errors import UserError

    with pytest.raises(UserError, match="lpips_backbone"):
        PerceptualLoss("alex")
    alexnet = torchvision.models.alexnet(weights=None)
    path = tmp_path / "alexnet-owt-7be5be79.pth"
    torch.save(alexnet.state_dict(), path)
    loss = PerceptualLoss("alex", str(path))
    torch.testing.assert_close(loss.lpips.net.slice5._modules["10"].weight, alexnet.features[10].weight)
    assert not loss.random_backbone and not any(p.requires_grad for p in loss.parameters())
    a, b = torch.rand(2, 3, 64, 64) * 2 - 1, torch.rand(2, 3, 64, 64) * 2 - 1
    assert loss(a, a).item() == pytest.approx(0.0, abs=1e-6) and loss(a, b).item() > 0
    torch.save(torchvision.models.vgg16(weights=None).state_dict(), tmp_path / "vgg.pth")
    with pytest.raises(UserError, match="does not match"):
        PerceptualLoss("alex", str(tmp_path / "vgg.pth"))


# --------------------------------------------------------------------------------------------------
# Training runs


def test_tiny_fit_counts_iterations_saves_and_logs(shards, tmp_path):
    """max_steps counts iterations; last.ckpt, grids, validation metrics and the config all land."""
    run = tmp_path / "run"
    cli = fit(shards, run, "--trainer.max_steps", "3", "--trainer.val_check_interval", "3")
    assert cli.trainer.global_step == 3
    ckpt = load_ckpt(run / "checkpoints" / "last.ckpt")
    assert ckpt["global_step"] == 3
    g_state, d_state = (s["state"] for s in ckpt["optimizer_states"])
    assert {int(s["step"]) for s in g_state.values()} == {3}  # one G and one D update per iteration
    assert {int(s["step"]) for s in d_state.values()} == {3}
    assert any(k.startswith("g_ema.") for k in ckpt["state_dict"])
    assert not any(k.startswith("_perceptual") or "lpips" in k for k in ckpt["state_dict"])
    assert "resolution" in ckpt["generator_config"]
    assert sorted(p.name for p in (run / "grids").glob("*.png")) == [
        "step-0000001.png",
        "val-step-0000003.png",
    ]
    metrics = next(run.glob("lightning_logs/version_*/metrics.csv")).read_text()
    assert "val/l1" in metrics and "val/l1_copy" in metrics and "train/g_l1" in metrics
    assert "val/psnr_to_teacher" in metrics

    from p2pz.student.training import load_generator

    generator = load_generator(run / "checkpoints" / "last.ckpt")
    x = torch.rand(2, 3, 64, 64) * 2 - 1
    with torch.no_grad():
        torch.testing.assert_close(generator(x), cli.model.g_ema.eval()(x))


class _Crash(Exception):
    pass


def _crash_at(step: int):
    import lightning.pytorch as pl

    class CrashAt(pl.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            if trainer.global_step == step:
                raise _Crash(f"killed at step {step}")

    return CrashAt()


def _snapshot(module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def test_killed_run_resumes_to_the_same_step_with_optimiser_and_ema_state(shards, tmp_path):
    import lightning.pytorch as pl

    run = tmp_path / "run"
    common = [
        "--trainer.max_steps",
        "5",
        "--checkpoint.every_n_train_steps",
        "2",
        "--trainer.limit_val_batches",
        "0",
    ]
    with pytest.raises(_Crash):
        fit(shards, run, *common, callbacks=[_crash_at(3)])
    saved = load_ckpt(run / "checkpoints" / "last.ckpt")
    assert saved["global_step"] == 2  # the save at step 2 survives, nothing was written at the crash

    seen = {}

    class Inspect(pl.Callback):
        def on_train_start(self, trainer, pl_module):
            seen["step"] = trainer.global_step
            seen["g_ema"] = _snapshot(pl_module.g_ema)
            seen["opt_d"] = copy.deepcopy(trainer.optimizers[1].state_dict())

    cli = fit(shards, run, *common, ckpt_path="last", callbacks=[Inspect()])
    assert seen["step"] == 2 and cli.trainer.global_step == 5
    for name, value in seen["g_ema"].items():
        torch.testing.assert_close(value, saved["state_dict"][f"g_ema.{name}"])
    d_state = seen["opt_d"]["state"]
    for index, state in saved["optimizer_states"][1]["state"].items():
        torch.testing.assert_close(d_state[index]["exp_avg_sq"], state["exp_avg_sq"])
    assert load_ckpt(run / "checkpoints" / "last.ckpt")["global_step"] == 5

    uninterrupted = fit(shards, tmp_path / "straight", *common)
    assert uninterrupted.trainer.global_step == cli.trainer.global_step


def test_a_nan_loss_stops_the_run_and_keeps_the_last_good_checkpoint(shards, tmp_path):
    import lightning.pytorch as pl

    from p2pz.student.training import NonFiniteLossError

    class Diverge(pl.Callback):  # fault injection: the generator's weights blow up at step 3
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            if trainer.global_step == 3:
                with torch.no_grad():
                    next(pl_module.G.parameters()).fill_(float("nan"))

    run = tmp_path / "run"
    with pytest.raises(NonFiniteLossError, match="step 3.*last good checkpoint is .*last.ckpt"):
        fit(
            shards,
            run,
            "--trainer.max_steps",
            "6",
            "--checkpoint.every_n_train_steps",
            "2",
            "--trainer.limit_val_batches",
            "0",
            callbacks=[Diverge()],
        )
    kept = load_ckpt(run / "checkpoints" / "last.ckpt")
    assert kept["global_step"] == 2
    assert all(torch.isfinite(v).all() for v in kept["state_dict"].values() if v.is_floating_point())


def test_rank_seed_follows_nvlabs_and_keeps_one_process_seed():
    from p2pz.student.training import rank_seed, seed_rank

    assert rank_seed(7, 0, 1) == 7  # one process: the configured seed itself
    assert [rank_seed(7, r, 4) for r in range(4)] == [28, 29, 30, 31]  # seed * world_size + rank
    assert len({rank_seed(s, r, 8) for s in range(3) for r in range(8)}) == 24  # no two runs/ranks alike
    assert rank_seed(7, 1, 4, step=100) != rank_seed(7, 1, 4)  # a resumed run draws afresh
    draws = []
    for rank in (0, 1, 0):
        seed_rank(7, rank, 2)
        draws.append(torch.randn(8))
    assert torch.equal(draws[0], draws[2]) and not torch.equal(draws[0], draws[1])


def test_non_finite_gradients_skip_that_update_and_are_counted(shards, tmp_path):
    """A NaN gradient in G at iteration 1: G's weights and Adam state stay as they were, D still
    steps, the iteration counts, and the skip is logged."""
    seen: dict[str, object] = {}

    def weights(module) -> dict[str, torch.Tensor]:  # parameters only: buffers (w_avg) move in forward
        return {k: v.detach().clone() for k, v in module.named_parameters()}

    def adam_state(optimizer) -> dict:
        return copy.deepcopy(optimizer.state_dict()["state"])  # {param index: {step, exp_avg, ...}}

    class PoisonGeneratorGradient(pl.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            if trainer.global_step == 1:
                seen["G"], seen["D"] = weights(pl_module.G), weights(pl_module.D)
                seen["adam_g"] = adam_state(trainer.optimizers[0])
                param = next(pl_module.G.parameters())
                seen["hook"] = param.register_hook(lambda g: torch.full_like(g, float("nan")))

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            if "hook" in seen and "G_after" not in seen:
                seen["hook"].remove()
                seen["G_after"], seen["D_after"] = weights(pl_module.G), weights(pl_module.D)
                seen["adam_g_after"] = adam_state(trainer.optimizers[0])
                seen["step"] = trainer.global_step
                seen["skipped"] = float(trainer.callback_metrics["train/skipped_generator_steps"])

    with pytest.warns(UserWarning, match="non-finite generator gradients"):
        cli = fit(
            shards,
            tmp_path / "run",
            "--trainer.max_steps",
            "3",
            "--trainer.limit_val_batches",
            "0",
            callbacks=[PoisonGeneratorGradient()],
        )
    assert seen["step"] == 2 and cli.trainer.global_step == 3
    for name, value in seen["G"].items():
        assert torch.equal(value, seen["G_after"][name]), name
    before, after = seen["adam_g"], seen["adam_g_after"]
    assert before.keys() == after.keys() and before
    for key in before:
        for field, value in before[key].items():
            assert torch.equal(torch.as_tensor(value), torch.as_tensor(after[key][field])), field
    assert any(not torch.equal(v, seen["D_after"][k]) for k, v in seen["D"].items())  # D did step
    assert seen["skipped"] == 1.0
    assert all(torch.isfinite(p).all() for p in cli.model.G.parameters())


def test_discriminator_steps_through_the_precision_plugin_without_advancing_global_step(shards, tmp_path):
    """D's step is not counted, yet goes where a counted one goes: the strategy and the precision plugin
    (AMP's unscaling and GradScaler, on_before_optimizer_step hooks)."""
    from lightning.pytorch.plugins.precision import Precision

    class SpyPrecision(Precision):
        def __init__(self):
            super().__init__()
            self.stepped: list[str] = []

        def optimizer_step(self, optimizer, model, closure, **kwargs):
            which = "D" if optimizer.param_groups[0]["params"][0] is next(model.D.parameters()) else "G"
            self.stepped.append(f"{which}@{model.trainer.global_step}")
            return super().optimizer_step(optimizer, model=model, closure=closure, **kwargs)

    hooks: list[int] = []

    class CountHooks(pl.Callback):
        def on_before_optimizer_step(self, trainer, pl_module, optimizer):
            hooks.append(trainer.global_step)

    from p2pz.cli import train

    cli = train.main(["--config", TINY, "--data.shards", str(shards)], run=False)  # the module and data
    spy = SpyPrecision()
    trainer = pl.Trainer(
        accelerator="cpu",
        plugins=[spy],
        max_steps=2,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        limit_val_batches=0,
        default_root_dir=str(tmp_path / "run"),  # the iteration-1 grid lands there
        callbacks=[CountHooks()],
    )
    trainer.fit(cli.model, datamodule=cli.datamodule)
    assert trainer.global_step == 2
    # G's step (counted) and D's (not) in iteration 0, then the same in iteration 1
    assert spy.stepped == ["G@0", "D@1", "G@1", "D@2"]
    assert hooks == [0, 1, 1, 2]


def test_the_run_logs_and_records_which_ops_implementation_runs(shards, tmp_path, monkeypatch):
    """One ``student ops:`` line on rank 0 and ``ops_impl`` in the run's hparams.yaml, following what runs
    ($P2PZ_OPS_IMPL here); an explicit request whose kernels cannot be built stops before the first step."""
    import logging

    import yaml

    from p2pz.student.ops import _runtime

    lines: list[str] = []
    handler = logging.Handler(logging.INFO)
    handler.emit = lambda record: lines.append(record.getMessage())
    logger = logging.getLogger("lightning.pytorch.utilities.rank_zero")
    logger.addHandler(handler)
    monkeypatch.setattr(logger, "level", logging.INFO)
    try:
        for impl, meaning in (("ref", "the pure-PyTorch reference"), ("cpu", "the compiled C++ kernels")):
            monkeypatch.setenv(_runtime.ENV_VAR, impl)
            run = tmp_path / impl
            lines.clear()
            fit(shards, run, "--trainer.max_steps", "1")
            [version] = run.glob("lightning_logs/version_*")
            assert yaml.safe_load((version / "hparams.yaml").read_text())["ops_impl"] == impl
            assert [line for line in lines if line.startswith("student ops:")] == [
                f"student ops: {impl} ({meaning})"
            ]
    finally:
        logger.removeHandler(handler)

    for name, value in (("_state", {}), ("_errors", {}), ("_warned", set())):  # as in a new process
        monkeypatch.setattr(_runtime, name, value)
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path / "ext"))
    monkeypatch.setenv("CXX", "/bin/false")
    with pytest.raises(_runtime.OpsUnavailableError, match="P2PZ_OPS_IMPL=cpu asks for the CPU kernels"):
        fit(shards, tmp_path / "broken", "--trainer.max_steps", "1")
    assert not (tmp_path / "broken" / "checkpoints").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="tells what happens without a GPU")
def test_a_gpu_config_in_a_job_without_gpus_stops_in_one_line(shards, tmp_path, monkeypatch, capsys):
    """A GPU config submitted without --gpus-per-node: one error line per rank naming the option, before
    the trainer (or the run folder) exists, instead of Lightning's traceback on every rank."""
    from p2pz.cli.train import script_main

    monkeypatch.setenv("SLURM_JOB_ID", "4242")
    run = tmp_path / "run"
    args = ["fit", "--config", TINY, "--data.shards", str(shards), "--trainer.accelerator", "gpu"]
    assert script_main([*args, "--trainer.default_root_dir", str(run)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: trainer.accelerator is gpu"), err
    assert "SLURM job 4242" in err[0] and "--gpus-per-node" in err[0]
    assert not run.exists()


def test_p2pz_train_is_the_same_cli_as_train_py(shards, tmp_path, capsys):
    from p2pz.cli.main import main

    args = ["fit", "--config", TINY, "--data.shards", str(shards), "--print_config"]
    printed = []
    train_py = runpy.run_path(str(REPO / "train.py"))  # the script's globals, without running it
    for run in (lambda: main(["train", *args]), lambda: train_py["main"](args)):
        with pytest.raises(SystemExit) as exit_info:
            run()
        assert exit_info.value.code == 0
        printed.append(capsys.readouterr().out)
    assert printed[0] == printed[1] and "checkpoint:" in printed[0] and "lpips_backbone" in printed[0]


@pytest.mark.parametrize(
    "command", [[str(REPO / "train.py")], ["-m", "p2pz", "train"]], ids=["train.py", "p2pz-train"]
)
def test_train_reports_a_missing_lpips_backbone_in_one_line(shards, tmp_path, command):
    result = subprocess.run(
        [
            sys.executable,
            *command,
            "fit",
            "--config",
            TINY,
            "--data.shards",
            str(shards),
            "--trainer.default_root_dir",
            str(tmp_path),
            "--model.lpips_weight",
            "1",
        ],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=300,
    )
    assert result.returncode == 2, result.stderr[-2000:]
    assert result.stderr.strip().splitlines()[-1].startswith("error: LPIPS needs ImageNet weights")
    assert "Traceback" not in result.stderr


# --------------------------------------------------------------------------------------------------
# DDP on the CPU


class RecordRank(pl.Callback):
    """Each rank's sample keys, and its weights before and after training (picklable for ddp_spawn)."""

    def __init__(self, out_dir: str):
        self.out_dir = out_dir
        self.keys: list[str] = []

    def on_train_start(self, trainer, pl_module):
        torch.save(_snapshot(pl_module), Path(self.out_dir, f"initial-{trainer.global_rank}.pt"))

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if batch_idx == 0:  # this rank's next random draws (generator noise, dropout), left unconsumed
            state = torch.get_rng_state()
            torch.save(torch.randn(16), Path(self.out_dir, f"draws-{trainer.global_rank}.pt"))
            torch.set_rng_state(state)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.keys.extend(batch["__key__"])

    def on_train_end(self, trainer, pl_module):
        rank = trainer.global_rank
        Path(self.out_dir, f"keys-{rank}.json").write_text(json.dumps(self.keys))
        torch.save(_snapshot(pl_module), Path(self.out_dir, f"weights-{rank}.pt"))


def test_ddp_two_cpu_ranks_see_disjoint_data_and_keep_identical_weights(shards, tmp_path):
    import lightning.pytorch as pl

    from p2pz.student.callbacks import StepCheckpoint
    from p2pz.student.datamodule import PairDataModule
    from p2pz.student.training import StudentModule

    # four training shards, two per rank; validation from its own shard
    train_dir = write_pair_shards(tmp_path / "train", shards=4, per_shard=6, seed=1)
    import yaml

    config = yaml.safe_load(Path(TINY).read_text())
    model = StudentModule(**{**config["model"], "r1_interval": 1})
    data = PairDataModule(
        shards=str(train_dir),
        val_shards=str(shards / "pairs-000003.tar"),
        resolution=model.hparams.resolution,
        batch_size=2,
        epoch_length=2,
        val_samples=2,
        num_workers=0,
    )
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=2,
        strategy="ddp_spawn_find_unused_parameters_true",
        max_steps=2,
        default_root_dir=str(tmp_path / "run"),
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        limit_val_batches=0,
        callbacks=[StepCheckpoint(every_n_train_steps=2), RecordRank(str(tmp_path))],
    )
    trainer.fit(model, datamodule=data)

    keys = [json.loads((tmp_path / f"keys-{rank}.json").read_text()) for rank in (0, 1)]
    assert len(keys[0]) == len(keys[1]) == 4
    shard_of = [{k.split("-")[0] for k in rank_keys} for rank_keys in keys]
    assert not set(keys[0]) & set(keys[1]) and not shard_of[0] & shard_of[1]
    weights = [torch.load(tmp_path / f"weights-{rank}.pt") for rank in (0, 1)]
    initial = torch.load(tmp_path / "initial-0.pt")
    changed = 0
    for name, value in weights[0].items():
        if name.endswith("mapping.w_avg"):
            # the running mean of w: each rank adds its own z's in forward (DDP broadcasts rank 0's at
            # the next forward, and rank 0 writes the checkpoints); not a weight the ranks must share
            continue
        torch.testing.assert_close(value, weights[1][name], rtol=0, atol=0, msg=name)
        changed += not torch.equal(value, initial[name])
    assert changed > 0  # they trained, and stayed in sync
    # seed_everything seeded both ranks alike; the per-rank seed gives each its own noise and dropout
    draws = [torch.load(tmp_path / f"draws-{rank}.pt") for rank in (0, 1)]
    assert not torch.equal(draws[0], draws[1])
    assert load_ckpt(tmp_path / "run" / "checkpoints" / "last.ckpt")["global_step"] == 2


def test_dataloader_workers_are_capped_by_the_cpus_the_task_has(shards, monkeypatch):
    """configs/sd14-512.yaml's 6 workers on a SLURM task of 1 CPU: one worker and a warning naming
    --cpus-per-task; the affinity mask counts as well; within the CPUs, what was asked for."""
    import os
    import warnings

    from p2pz.student.datamodule import PairDataModule
    from p2pz.utils.cpu import usable_cpus

    def workers(loader) -> int:  # PairLoader -> webdataset's WebLoader -> its torch DataLoader
        return loader._loader.pipeline[0].num_workers

    data = PairDataModule(shards=str(shards), resolution=64, batch_size=2, epoch_length=2, num_workers=6)
    data.setup("fit")
    monkeypatch.setenv("SLURM_CPUS_PER_TASK", "1")
    with pytest.warns(UserWarning, match=r"num_workers is 6 but this process has 1 CPU.*--cpus-per-task=7"):
        assert workers(data.train_dataloader()) == 1

    monkeypatch.delenv("SLURM_CPUS_PER_TASK")
    mask = os.sched_getaffinity(0)
    os.sched_setaffinity(0, {min(mask)})  # a task bound to one CPU
    try:
        assert usable_cpus() == 1
    finally:
        os.sched_setaffinity(0, mask)
    monkeypatch.setenv("SLURM_CPUS_PER_TASK", "64")
    assert usable_cpus() == min(len(mask), 64)
    data.hparams.num_workers = usable_cpus()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no cap, no warning
        assert workers(data.train_dataloader()) == usable_cpus()


def test_datamodule_holds_out_validation_shards(shards):
    from p2pz.student.datamodule import PairDataModule

    data = PairDataModule(shards=str(shards), val_fraction=0.25, resolution=64, batch_size=3, val_samples=5)
    data.setup("fit")
    assert [Path(u).name for u in data.val_urls] == ["pairs-000003.tar"]
    assert len(data.train_urls) == 3
    batches = list(data.val_dataloader())
    assert [b["src"].shape[0] for b in batches] == [3, 3]  # ceil(5 / 3) batches, deterministic
    assert [b["__key__"] for b in batches] == [b["__key__"] for b in data.val_dataloader()]
    assert math.isclose(float(batches[0]["src"].min()), -1.0, abs_tol=0.5)


def test_a_network_override_on_the_command_line_keeps_its_type(shards):
    from p2pz.cli import train

    args = ["--config", TINY, "--data.shards", str(shards), "--trainer.logger", "false"]
    args += ["--model.generator.dropout", "0.3", "--model.generator.input_residual", "true"]
    args += ["--model.discriminator.channel_max", "16"]
    cli = train.main(args, run=False)
    generator = cli.model.hparams.generator
    assert generator["dropout"] == 0.3 and generator["input_residual"] is True, generator
    assert cli.model.hparams.discriminator["channel_max"] == 16
    assert cli.model.G.encoder.dropout.p == 0.3  # a number reached nn.Dropout, not the string "0.3"
