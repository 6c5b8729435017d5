"""The student's discriminator and R1 penalty in reduced precision (fp16 / bf16 autocast, half inputs)."""

from __future__ import annotations

import math

import pytest
import torch
from lightning.pytorch.callbacks import Callback

from p2pz.student.losses import r1_penalty


def test_r1_penalty_squares_and_sums_in_fp32_for_half_inputs():
    """A gradient of 300 per pixel: its square (9e4) overflows fp16, the fp32 sum does not."""
    y = torch.zeros(2, 3, 8, 8, dtype=torch.float16, requires_grad=True)
    logits = (y * 300).sum(dim=[1, 2, 3])  # d logits / d y = 300 everywhere
    penalty = r1_penalty(logits, y)
    assert penalty.dtype == torch.float32
    assert float(penalty) == pytest.approx(300.0**2 * 3 * 8 * 8)


def _discriminator_r1(dtype: torch.dtype | None) -> tuple[float, bool]:
    from p2pz.student.networks import Discriminator

    torch.manual_seed(0)
    D = Discriminator(resolution=64, img_channels=3, preset="lite", channel_base=1024, channel_max=32)
    x = torch.rand(2, 3, 64, 64) * 2 - 1
    y = (torch.rand(2, 3, 64, 64) * 2 - 1).requires_grad_(True)
    with torch.autocast("cpu", dtype=dtype or torch.float32, enabled=dtype is not None):
        penalty = r1_penalty(D(x, y), y)
    penalty.backward()
    grads = [p.grad for p in D.parameters() if p.grad is not None]
    return float(penalty), all(torch.isfinite(g).all() for g in grads)


def test_r1_penalty_under_bf16_autocast_is_finite_and_close_to_fp32():
    exact, _ = _discriminator_r1(None)
    value, finite = _discriminator_r1(torch.bfloat16)
    assert finite and value == pytest.approx(exact, rel=0.05)


def test_r1_penalty_under_fp16_autocast_is_finite_and_close_to_fp32():
    exact, _ = _discriminator_r1(None)
    value, finite = _discriminator_r1(torch.float16)
    assert finite and value == pytest.approx(exact, rel=0.05)


class _RecordTrainLosses(Callback):
    """Lightning callback: the logged train/* values of every iteration, as floats."""

    def __init__(self) -> None:
        self.steps: list[dict[str, float]] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        logged = trainer.callback_metrics
        self.steps.append({k: float(v) for k, v in logged.items() if k.startswith("train/")})


def test_bf16_mixed_training_steps_with_r1_give_finite_losses(tmp_path):
    """Two iterations of G and D with R1 at every one of them, under bf16-mixed, as the real-size run on a
    native-bf16 CPU does: the ops' compiled kernels and R1's double backward in bf16. Tiny, so that it is
    quick even where the CPU emulates bf16."""
    from test_training import fit, write_pair_shards

    shards = write_pair_shards(tmp_path / "pairs", shards=1, per_shard=4)
    record = _RecordTrainLosses()
    args = ["--trainer.precision", "bf16-mixed", "--trainer.max_steps", "2"]
    args += ["--trainer.limit_val_batches", "0"]
    # batch 1, as the real-size run: R1's double backward then convolves with the batch as channels
    args += ["--model.r1_interval", "1", "--model.r1_gamma", "10", "--data.batch_size", "1"]
    args += ["--model.grid_every_n_steps", "0"]
    cli = fit(shards, tmp_path / "run", *args, callbacks=[record])

    assert cli.trainer.precision == "bf16-mixed" and cli.trainer.global_step == 2
    assert len(record.steps) == 2
    for losses in record.steps:
        for name in ("train/g_l1", "train/g_gan", "train/d_gan", "train/d_r1", "train/g_total"):
            assert math.isfinite(losses[name]), (name, losses)
        assert losses["train/d_r1"] > 0  # R1 ran, and its gradient reached the real images
        assert not any(v for k, v in losses.items() if k.startswith("train/skipped_")), losses


def test_r1_backward_runs_without_onednn_on_the_cpu_in_bf16_only():
    """oneDNN's native-bf16 convolutions are kept out of R1's double backward (SIGFPE there), and only
    there: float32, steps without R1 and the flag's value after the block are untouched."""
    from p2pz.student.training import StudentModule

    context = StudentModule._r1_backward_context
    bf16 = torch.zeros(1, dtype=torch.bfloat16)
    fp32 = torch.zeros(1)
    assert torch.backends.mkldnn.enabled
    with context(True, bf16):
        assert not torch.backends.mkldnn.enabled
    assert torch.backends.mkldnn.enabled
    with torch.autocast("cpu", dtype=torch.bfloat16), context(True, fp32):  # bf16-mixed: fp32 images
        assert not torch.backends.mkldnn.enabled
    for do_r1, real in ((False, bf16), (True, fp32)):
        with context(do_r1, real):
            assert torch.backends.mkldnn.enabled
    with torch.autocast("cpu", dtype=torch.float16), context(True, fp32):
        assert torch.backends.mkldnn.enabled
