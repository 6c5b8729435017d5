"""Distillation of one teacher edit into a CoModGAN student: the LightningModule.

One training iteration on a batch of teacher pairs ``(x, y)`` (input, teacher's edit):

1. **Generator step** — ``y_hat = G(x)``;
   ``L_G = w_gan * softplus(-D(x, y_hat)) + w_l1 * |y_hat - y| + w_l2 * (y_hat - y)^2
   + w_lpips * LPIPS(y_hat, y)``, the distances optionally weighted up (``change_weight``) where the
   teacher changed the input.
2. **Discriminator step** — ``L_D = softplus(D(x, y_hat)) + softplus(-D(x, y))``, plus, every
   ``r1_interval`` iterations (lazy regularisation), ``r1_interval * r1_gamma / 2 * ||grad_y D(x, y)||^2``.
   The penalty is folded into that iteration's D step (scaled by the interval so its average strength
   is that of R1 applied every step); the number of optimiser steps does not change, so Adam needs no
   ``mb_ratio`` correction.
3. **EMA** — ``g_ema`` follows ``G`` with a half-life of ``ema_half_life_kimg`` thousand images
   (ramped up over the first images, as in StyleGAN2-ADA). ``g_ema`` is what validation scores, the
   grids show and export ships; it has no optimiser.

Steps: in manual optimisation Lightning counts every ``LightningOptimizer.step()`` in
``trainer.global_step``, which would advance by 2 per iteration here. The generator steps through its
``LightningOptimizer`` (counted); the discriminator steps through ``trainer.strategy.optimizer_step`` on
its underlying optimiser, which is what ``LightningOptimizer.step`` calls between its counting hooks: the
precision plugin (AMP unscaling and ``GradScaler``, ``on_before_optimizer_step``) and the strategy (DDP)
apply as for any step, only the count is left out. So **``global_step``, ``trainer.max_steps``,
``val_check_interval`` and checkpoint intervals all count training iterations** (one G and one D update
each).

Checkpoints hold G, D, ``g_ema``, both optimisers and the loop state, plus ``generator_config``
(``Generator(**config)`` rebuilds the network; see :func:`load_generator`). The LPIPS network is
frozen, not a registered submodule: it is neither checkpointed, nor averaged, nor wrapped by DDP.
"""

from __future__ import annotations

import contextlib
import copy
import math
import os
import random
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.core.optimizer import LightningOptimizer
from lightning.pytorch.utilities import rank_zero_warn
from lightning.pytorch.utilities.types import STEP_OUTPUT
from torch import nn

from p2pz.student.losses import PerceptualLoss, discriminator_gan_loss, generator_gan_loss, r1_penalty
from p2pz.utils.errors import UserError

# A network's keyword overrides (``model.generator``, ``model.discriminator``), typed so that the
# command line's ``--model.generator.dropout 0.3`` arrives as a number, not the string "0.3".
NetworkOverrides = dict[str, bool | int | float | str | list[int | float] | None]

# g_ema (and only it) is in eval mode when training starts, on purpose
warnings.filterwarnings("ignore", message=r"Found \d+ module\(s\) in eval mode at the start of training")


class NonFiniteLossError(UserError):
    """A loss became NaN or infinite; training stops before the weights are touched."""


@contextlib.contextmanager
def _onednn_off() -> Iterator[None]:
    """PyTorch's CPU kernels instead of oneDNN's in this block (only that flag: the others stay)."""
    before = torch.backends.mkldnn.enabled
    torch.backends.mkldnn.enabled = False
    try:
        yield
    finally:
        torch.backends.mkldnn.enabled = before


def rank_seed(seed: int, rank: int, world_size: int, step: int = 0) -> int:
    """The seed of one rank's random draws: ``seed * world_size + rank``, as NVlabs' StyleGAN2-ADA.

    One process (``world_size`` 1, rank 0) keeps ``seed`` itself. ``step`` > 0 (a resumed run) gives
    a fresh stream, as the data module does, instead of replaying the first iterations' draws.
    """
    return ((seed + 1_000_003 * step) * world_size + rank) % 2**32


def seed_rank(seed: int, rank: int, world_size: int, step: int = 0) -> int:
    """Seed torch (CPU and every GPU), numpy and ``random`` with :func:`rank_seed`; returns it.

    ``seed_everything`` seeds every rank the same, so without this the generator's noise and dropout
    masks would be identical on every GPU: the ranks' batches differ but their randomness does not.
    """
    import numpy as np

    value = rank_seed(seed, rank, world_size, step)
    torch.manual_seed(value)
    np.random.seed(value)
    random.seed(value)
    return value


def _no_closure() -> None:
    """Manual optimisation's closure: the backward pass already ran (``manual_backward``)."""


def fused_adam_runs_on(device: torch.device) -> bool:
    """Whether ``torch.optim.Adam(fused=True)`` has kernels for ``device`` (CUDA, CPU, MPS, XPU...)."""
    try:
        torch.optim.Adam([torch.zeros(1, device=device, requires_grad=True)], fused=True)
    except (RuntimeError, ValueError):
        return False
    return True


class IterationChecks:
    """An iteration's yes/no checks (a NaN loss term, non-finite gradients, a requeue signal), kept on
    the device as they are made and read back together at its end: one all-reduce over the ranks and
    one host sync an iteration, where reading each check as it is made would wait for the GPU five
    times. Names: ``loss/<phase>/<term>``, ``gradients/<phase>``, ``signal``."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.names: list[str] = []
        self.flags: list[torch.Tensor] = []

    @property
    def loss_names(self) -> list[str]:
        return [name for name in self.names if name.startswith("loss/")]

    def add(self, name: str, flag: torch.Tensor | bool) -> torch.Tensor:
        """Record ``flag`` (a 0-dim tensor, or a Python bool: filled on the device, not copied there)."""
        if not isinstance(flag, torch.Tensor):
            flag = torch.full((), bool(flag), device=self.device)
        self.names.append(name)
        self.flags.append(flag.detach().reshape(()).float())
        return flag

    def losses(self, phase: str, terms: dict[str, torch.Tensor]) -> torch.Tensor:
        """Record, per term, whether it is NaN or infinite; returns whether any is (on the device)."""
        bad = ~torch.stack([term.detach().float().reshape(()) for term in terms.values()]).isfinite()
        for name, flag in zip(terms, bad.unbind()):
            self.add(f"loss/{phase}/{name}", flag)
        return bad.any()

    def any_loss(self) -> torch.Tensor:
        """Whether any loss recorded so far is NaN or infinite (on the device)."""
        flags = [flag for name, flag in zip(self.names, self.flags) if name.startswith("loss/")]
        return torch.stack(flags).any() if flags else torch.zeros((), dtype=torch.bool, device=self.device)

    def gradients(self, phase: str, optimizer: torch.optim.Optimizer) -> torch.Tensor:
        """Record whether any gradient of ``optimizer``'s parameters is NaN or infinite; returns it."""
        grads = [p.grad for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
        if not grads:
            return self.add(f"gradients/{phase}", False)
        # each gradient's largest |g| (one foreach kernel per dtype): NaN or inf where one element is
        largest = torch._foreach_norm(grads, math.inf)
        return self.add(f"gradients/{phase}", ~torch.stack([n.float() for n in largest]).isfinite().all())

    def read(self) -> tuple[dict[str, bool], dict[str, bool]]:
        """``(this rank's, any rank's)`` flags by name: one all-reduce (a sum), one host sync.

        ``torch.distributed`` directly: Lightning's ``strategy.reduce`` adds a blocking barrier first."""
        local = torch.stack(self.flags)
        total = local.clone()
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.all_reduce(total, op=torch.distributed.ReduceOp.SUM)
        values = torch.cat([local, total]).tolist()
        count = len(self.names)
        here = {name: value > 0 for name, value in zip(self.names, values[:count])}
        return here, {name: value > 0 for name, value in zip(self.names, values[count:])}


class StudentModule(pl.LightningModule):
    """CoModGAN student trained on teacher pairs with a conditional GAN, R1, L1 and LPIPS.

    Args:
        resolution: image size the student works at (64-1024, a power of two).
        preset: generator/discriminator size preset: ``lite`` (CPU real time) or ``comod`` (CoModGAN).
        generator: overrides passed to ``Generator`` (e.g. ``{channel_base: 4096, channel_max: 128}``).
        discriminator: overrides passed to ``Discriminator``.
        lr_g: Adam learning rate of the generator.
        lr_d: Adam learning rate of the discriminator.
        betas: Adam betas (StyleGAN2/CoModGAN: no first-moment momentum).
        gan_weight: weight of the non-saturating adversarial loss (0 trains by reconstruction only).
        l1_weight: weight of the L1 distance to the teacher's edit.
        lpips_weight: weight of the LPIPS distance to the teacher's edit (needs ``lpips_backbone``).
        r1_gamma: R1 strength on real pairs (0 turns it off).
        r1_interval: lazy regularisation: apply R1 every this many iterations.
        lpips_net: LPIPS backbone: ``alex``, ``vgg`` or ``squeeze``.
        lpips_backbone: path to torchvision's ImageNet weights of that backbone (e.g.
            ``alexnet-owt-7be5be79.pth``); nothing is downloaded.
        lpips_random_backbone: build LPIPS on a random backbone (tests only: not a perceptual metric).
        ema_half_life_kimg: half-life of the generator EMA in thousands of images.
        ema_rampup: the half-life is at most ``ema_rampup * images seen`` (None: no ramp-up).
        grid_every_n_steps: save an (input | teacher | student) image grid every this many iterations
            (and at iteration 1); 0 turns grids off.
        grid_samples: rows in the grid.
        l2_weight: weight of the mean squared distance to the teacher's edit (PSNR is an MSE).
        change_weight: extra weight of the reconstruction terms where the teacher changed the image
            (|edit - input| above ``change_threshold`` in any channel, grown by 1 px): those few pixels
            are the edit itself, and an average over the whole image barely sees them.
        change_threshold: the change (in [-1, 1] units) that marks a pixel as edited.
        lr_decay: ``cosine`` decays both learning rates to ``lr_final_ratio`` of their value over
            ``trainer.max_steps`` iterations; None keeps them constant (StyleGAN2, CoModGAN).
        lr_final_ratio: the learning rates' last value, as a fraction of the first, with ``lr_decay``.
        gradient_weight: weight of the L1 distance between the images' horizontal and vertical pixel
            differences (an edge's position and sharpness), weighted as the L1 term where the teacher
            changed the image.
        edits: one student for many edits: each edit's name and conditioning vector
            (``p2pz.student.conditioning``). ``p2pz train`` fills it from the shards when they hold
            several edits (None: a per-edit student). Each pair's edit is read from its key.
    """

    def __init__(
        self,
        resolution: int = 256,
        preset: str = "lite",
        generator: NetworkOverrides | None = None,
        discriminator: NetworkOverrides | None = None,
        lr_g: float = 0.002,
        lr_d: float = 0.002,
        betas: tuple[float, float] = (0.0, 0.99),
        gan_weight: float = 1.0,
        l1_weight: float = 10.0,
        lpips_weight: float = 5.0,
        r1_gamma: float = 10.0,
        r1_interval: int = 16,
        lpips_net: str = "alex",
        lpips_backbone: str | None = None,
        lpips_random_backbone: bool = False,
        ema_half_life_kimg: float = 10.0,
        ema_rampup: float | None = 0.05,
        grid_every_n_steps: int = 500,
        grid_samples: int = 8,
        l2_weight: float = 0.0,
        change_weight: float = 0.0,
        change_threshold: float = 0.05,
        lr_decay: str | None = None,
        lr_final_ratio: float = 0.05,
        edits: dict[str, list[float]] | None = None,
        gradient_weight: float = 0.0,
    ) -> None:
        super().__init__()
        from p2pz.student.networks import Discriminator, Generator

        self.save_hyperparameters()
        self.automatic_optimization = False
        if r1_interval < 1:
            raise UserError(f"r1_interval must be at least 1, got {r1_interval}")
        if lr_decay not in (None, "cosine"):
            raise UserError(f"lr_decay must be 'cosine' or null, got {lr_decay!r}")

        generator = dict(generator or {})
        self.edit_names: list[str] = list(edits or {})
        if edits:  # conditioning vectors: not checkpointed as tensors, the hyper-parameters hold them
            vectors = torch.tensor([edits[name] for name in self.edit_names], dtype=torch.float32)
            generator["edit_dim"] = vectors.shape[1]
            self.register_buffer("edit_vectors", vectors, persistent=False)
        self.G = Generator(resolution=resolution, img_channels=3, preset=preset, **generator)
        if edits:
            self.G.edit_mapping.set_statistics(vectors)
        self.D = Discriminator(resolution=resolution, img_channels=3, preset=preset, **(discriminator or {}))
        self.g_ema = copy.deepcopy(self.G).requires_grad_(False).eval()
        self._val_edit_sums: torch.Tensor | None = None  # per edit: PSNR sum, pairs (a validation's)

        # LPIPS: for the loss when weighted, for validation whenever weights (or a random stand-in) are given.
        # Stored outside nn.Module registration: frozen, not checkpointed, not averaged, not DDP-wrapped.
        perceptual = None
        if lpips_weight > 0 or lpips_backbone is not None or lpips_random_backbone:
            perceptual = PerceptualLoss(lpips_net, lpips_backbone, random_backbone=lpips_random_backbone)
        object.__setattr__(self, "_perceptual", perceptual)
        self._skipped_steps: dict[str, int] = {"generator": 0, "discriminator": 0}

    # ----------------------------------------------------------------------------------------------
    # Setup

    def configure_optimizers(self) -> tuple[torch.optim.Adam, torch.optim.Adam]:
        hp = self.hparams
        # fused: a step can then be skipped on the device (see _skip_step_if_non_finite)
        fused = fused_adam_runs_on(next(self.G.parameters()).device)
        adam = {"betas": tuple(hp.betas), "eps": 1e-8, "fused": fused}
        opt_g = torch.optim.Adam(self.G.parameters(), lr=hp.lr_g, **adam)
        opt_d = torch.optim.Adam(self.D.parameters(), lr=hp.lr_d, **adam)
        return opt_g, opt_d

    def on_train_start(self) -> None:
        """Per-rank randomness (the generator's noise and dropout): see :func:`seed_rank`. Runs after a
        resume restored ``global_step``. The data order has its own seeds (``PairDataModule.seed``)."""
        base = os.environ.get("PL_GLOBAL_SEED")  # set by seed_everything (the configs' seed_everything)
        seed = int(base) if base is not None else torch.initial_seed()
        seed_rank(seed, self.trainer.global_rank, self.trainer.world_size, self.global_step)

    def train(self, mode: bool = True) -> StudentModule:
        super().train(mode)
        self.g_ema.eval()  # the EMA generator is only ever evaluated
        return self

    def forward(self, x: torch.Tensor, edit: torch.Tensor | None = None) -> torch.Tensor:
        """The student's edit of ``x`` (``[N, 3, H, W]`` in [-1, 1]) by the EMA generator (``edit``: the
        conditioning vectors of a student of many edits)."""
        return self.g_ema(x, edit=edit)

    def edit_indices(self, keys: list[str]) -> torch.Tensor:
        """The index in ``edits`` of each pair's edit, read from its sample key."""
        from p2pz.data.pairs.shards import key_edit

        index = {name: i for i, name in enumerate(self.edit_names)}
        names = [key_edit(k) for k in keys]
        unknown = sorted({n for n in names if n not in index})
        if unknown:
            raise UserError(
                f"pairs of edit(s) {', '.join(unknown)} in the data, but this student was made for "
                f"{', '.join(self.edit_names)}"
            )
        return torch.tensor([index[n] for n in names], device=self.edit_vectors.device)

    def batch_edit(self, batch: dict[str, Any]) -> torch.Tensor | None:
        """The conditioning vectors of a batch's pairs (None for a per-edit student)."""
        if not self.edit_names:
            return None
        return self.edit_vectors[self.edit_indices(batch["__key__"])]

    def perceptual(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        module = self._perceptual
        if next(module.parameters()).device != a.device:
            module.to(a.device)
        return module(a, b)

    # ----------------------------------------------------------------------------------------------
    # Training

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        hp = self.hparams
        x, target = batch["src"], batch["edit"]
        opt_g, opt_d = self.optimizers()
        iteration = self.global_step  # iterations completed before this one
        use_gan = hp.gan_weight > 0
        checks = IterationChecks(x.device)  # device-side flags, read once at the end of the iteration

        self._set_learning_rates(opt_g, opt_d, iteration)

        # 1. generator step
        edit = self.batch_edit(batch)
        with self.toggled_optimizer(opt_g):
            fake = self.G(x, edit=edit)
            g_terms = self._reconstruction_terms(fake, target, x)
            if hp.lpips_weight > 0:
                g_terms["lpips"] = self.perceptual(fake, target)
            if use_gan:
                g_terms["gan"] = generator_gan_loss(self.D(x, fake))
            g_total = (
                hp.l1_weight * g_terms["l1"]
                + hp.l2_weight * g_terms.get("l2", 0.0)
                + hp.lpips_weight * g_terms.get("lpips", 0.0)
                + hp.gradient_weight * g_terms.get("gradient", 0.0)
                + hp.gan_weight * g_terms.get("gan", 0.0)
            )
            g_loss_bad = checks.losses("generator", {**g_terms, "total": g_total})
            opt_g.zero_grad(set_to_none=True)
            self.manual_backward(g_total)
            with self._skip_step_if_non_finite("generator", opt_g, g_loss_bad, checks):
                opt_g.step()

        # 2. discriminator step (with lazy R1)
        d_terms: dict[str, torch.Tensor] = {}
        if use_gan:
            with self.toggled_optimizer(opt_d):
                do_r1 = hp.r1_gamma > 0 and iteration % hp.r1_interval == 0
                real = target.detach().requires_grad_(do_r1)
                real_logits = self.D(x, real)
                fake_logits = self.D(x, fake.detach())
                d_terms["gan"] = discriminator_gan_loss(real_logits, fake_logits)
                d_total = d_terms["gan"]
                if do_r1:
                    d_terms["r1"] = r1_penalty(real_logits, real)
                    d_total = d_total + d_terms["r1"] * (hp.r1_gamma / 2 * hp.r1_interval)
                d_loss_bad = checks.losses("discriminator", {**d_terms, "total": d_total})
                opt_d.zero_grad(set_to_none=True)
                with self._r1_backward_context(do_r1, real):
                    self.manual_backward(d_total)
                with self._skip_step_if_non_finite("discriminator", opt_d, g_loss_bad | d_loss_bad, checks):
                    self._step_uncounted(opt_d)
                d_terms["real_logit"] = real_logits.detach().mean()
                d_terms["fake_logit"] = fake_logits.detach().mean()

        # 3. EMA (held where a loss is non-finite: the run stops below with every weight as it was)
        self._update_ema(batch_size=x.shape[0], hold=checks.any_loss())

        # the iteration's one read of the device: raise, count skipped steps, requeue
        self._act_on_checks(checks, iteration)

        logs = {f"train/g_{k}": v.detach() for k, v in g_terms.items()}
        logs["train/g_total"] = g_total.detach()
        logs.update({f"train/skipped_{k}_steps": float(v) for k, v in self._skipped_steps.items()})
        logs.update({f"train/d_{k}": v.detach() for k, v in d_terms.items()})
        self.log_dict(logs, on_step=True, on_epoch=False, batch_size=x.shape[0])
        self.log("l1", g_terms["l1"].detach(), prog_bar=True, logger=False, batch_size=x.shape[0])
        if "gan" in d_terms:
            self.log("d", d_terms["gan"].detach(), prog_bar=True, logger=False, batch_size=x.shape[0])

    @staticmethod
    def _r1_backward_context(do_r1: bool, real: torch.Tensor) -> contextlib.AbstractContextManager:
        """oneDNN off for R1's backward on the CPU in bf16 (autocast or bf16 weights).

        R1's double backward asks for convolutions no other pass does: for each strided convolution,
        the weight gradient of the gradient is a convolution with stride and dilation swapped, whose
        kernel is the whole output map and whose input channels are the batch (e.g. input [64, 1, 513,
        513], weight [128, 1, 256, 256], dilation 2 at 512 px, batch 1). PyTorch hands bf16
        convolutions to oneDNN only where the CPU has native bf16 (AVX-512), and there this backward
        died with SIGFPE in bf16-mixed (the real-size test, issue 33). oneDNN is the one kernel that
        differs between native and emulated bf16, and it has had integer divisions by zero on AVX-512
        for particular convolution shapes (tensorflow/tensorflow#57749); the crash was not reproduced
        on an AVX2 CPU, so the kernel is inferred, not seen. With oneDNN off, bf16 convolutions take
        ATen's own kernels, the path CPUs that emulate bf16 always run. Elsewhere (CUDA, float32,
        steps without R1) nothing changes.
        """
        bf16 = real.dtype == torch.bfloat16 or (
            torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") == torch.bfloat16
        )
        return _onednn_off() if do_r1 and real.device.type == "cpu" and bf16 else contextlib.nullcontext()

    @contextlib.contextmanager
    def _skip_step_if_non_finite(
        self, phase: str, optimizer: LightningOptimizer, loss_bad: torch.Tensor, checks: IterationChecks
    ) -> Iterator[None]:
        """Skip the optimiser step in this block when a loss (``loss_bad``) or a gradient is NaN/inf,
        decided on the device: fused Adam's ``found_inf`` (what GradScaler sets) leaves the weights, both
        moments and the step count as they were, and nothing waits for the flag. The iteration still
        counts; a skip is counted in ``train/skipped_<phase>_steps`` (:meth:`_act_on_checks`). Under DDP
        the gradients were averaged over the ranks before this check, so every rank decides alike.

        Skipping, rather than NVlabs' ``nan_to_num`` on the gradients (inf -> +-1e5, then a step),
        keeps one bad batch from writing huge values into Adam's second moment, which would shrink
        the effective learning rate for thousands of steps; it is also what GradScaler does under fp16.
        With a GradScaler ('16-mixed') the scaler owns this decision: the gradients are still scaled
        here, overflow is its cue to lower the scale, and it skips the step itself.
        """
        inner = optimizer.optimizer
        if getattr(self.trainer.precision_plugin, "scaler", None) is not None:
            yield
            return
        skip = loss_bad | checks.gradients(phase, inner)
        if not inner.param_groups[0].get("fused"):  # an unfused Adam (resumed from one): read the flag
            if skip.item():
                optimizer.zero_grad(set_to_none=True)  # Adam leaves parameters without gradients alone
            yield
            return
        inner.found_inf = skip.float()
        try:
            yield
        finally:
            del inner.found_inf

    def _reconstruction_terms(
        self, fake: torch.Tensor, target: torch.Tensor, x: torch.Tensor
    ) -> dict[str, torch.Tensor]:
        """L1 (and L2) to the teacher's edit, weighted up where the teacher changed the input."""
        hp = self.hparams
        weight = None
        if hp.change_weight > 0:
            changed = ((target - x).abs().amax(dim=1, keepdim=True) > hp.change_threshold).float()
            changed = torch.nn.functional.max_pool2d(changed, 3, stride=1, padding=1)  # the rim's pixels too
            weight = 1.0 + hp.change_weight * changed
            weight = weight / weight.mean()  # the loss keeps its scale; only its focus moves
        diff = fake - target
        terms = {"l1": diff.abs().mean() if weight is None else (weight * diff.abs()).mean()}
        if hp.l2_weight > 0:
            terms["l2"] = diff.square().mean() if weight is None else (weight * diff.square()).mean()
        if hp.gradient_weight > 0:
            terms["gradient"] = gradient_l1(diff, weight)
        return terms

    def _set_learning_rates(self, opt_g: Any, opt_d: Any, iteration: int) -> None:
        """Cosine decay of both learning rates over ``trainer.max_steps`` (with ``lr_decay``)."""
        hp = self.hparams
        total = self.trainer.max_steps if self.trainer is not None else -1
        if hp.lr_decay is None or total is None or total <= 0:
            return
        progress = min(1.0, iteration / total)
        factor = hp.lr_final_ratio + (1 - hp.lr_final_ratio) * 0.5 * (1 + math.cos(math.pi * progress))
        for optimizer, base in ((opt_g, hp.lr_g), (opt_d, hp.lr_d)):
            for group in optimizer.param_groups:
                group["lr"] = base * factor

    def _step_uncounted(self, optimizer: LightningOptimizer) -> None:
        """``optimizer.step()`` without advancing ``global_step`` (see the module docstring).

        ``LightningOptimizer.step`` is the loop's step-count hooks around
        ``strategy.optimizer_step(optimizer.optimizer, closure)``; this calls the latter alone, so the
        precision plugin (AMP, hooks) and the strategy (DDP) handle the step exactly as a counted one.
        """
        with self.trainer.profiler.profile("optimizer_step"):
            self.trainer.strategy.optimizer_step(optimizer.optimizer, closure=_no_closure)

    @torch.no_grad()
    def _update_ema(self, batch_size: int, hold: torch.Tensor | None = None) -> None:
        """``g_ema`` a step towards ``G``; none where the device flag ``hold`` is set (read by no one)."""
        hp = self.hparams
        batch = batch_size * self.trainer.world_size
        half_life = hp.ema_half_life_kimg * 1000
        if hp.ema_rampup is not None:
            half_life = min(half_life, self.global_step * batch * hp.ema_rampup)
        beta = 0.5 ** (batch / max(half_life, 1e-8))
        weight = 1.0 - beta if hold is None else torch.where(hold, 0.0, 1.0 - beta)
        for p_ema, p in zip(self.g_ema.parameters(), self.G.parameters()):
            p_ema.lerp_(p.detach(), weight if hold is None else weight.to(p_ema.dtype))
        for b_ema, b in zip(self.g_ema.buffers(), self.G.buffers()):
            b_ema.copy_(b)

    def _act_on_checks(self, checks: IterationChecks, iteration: int) -> None:
        """The end of an iteration: its checks and the requeue vote read in one all-reduce and one host
        sync; a non-finite loss on any rank stops the run, skipped steps are counted, the requeue is
        told whether any rank got its signal."""
        from p2pz.student.requeue import RequeueOnSignal

        requeues = [c for c in self.trainer.callbacks if isinstance(c, RequeueOnSignal)]
        checks.add("signal", any(c.signal_received for c in requeues))
        here, anywhere = checks.read()
        if any(anywhere[name] for name in checks.loss_names):
            self._stop_non_finite(iteration, [name for name in checks.loss_names if here[name]])
        for phase in self._skipped_steps:
            if anywhere.get(f"gradients/{phase}"):
                self._skipped_steps[phase] += 1
                rank_zero_warn(
                    f"step {iteration}: non-finite {phase} gradients; that {phase} update was skipped "
                    f"({self._skipped_steps[phase]} so far in this run)"
                )
        for callback in requeues:
            callback.agree(anywhere["signal"])

    def _stop_non_finite(self, iteration: int, bad: list[str]) -> None:
        """Raise: a loss was NaN/inf (``bad``: ``loss/<phase>/<term>`` on this rank, none when it was on
        another). Every rank raises at the same iteration, and no step of it touched the weights."""
        last = None
        for callback in self.trainer.checkpoint_callbacks:
            last = getattr(callback, "last_model_path", None) or last
        kept = f"the last good checkpoint is {last}" if last else "no checkpoint was saved yet"
        terms: dict[str, list[str]] = {}
        for name in bad:
            _, phase, term = name.split("/")
            terms.setdefault(phase, []).append(term)
        where = " and ".join(f"the {phase} loss ({', '.join(names)})" for phase, names in terms.items())
        raise NonFiniteLossError(
            f"training stopped at step {iteration}: {where or 'a loss on another rank'} is NaN or infinite; "
            f"the weights were not updated and {kept}. Lower the learning rates (--model.lr_g/--model.lr_d), "
            "raise --model.r1_gamma or train in 32-true precision, then resume with --ckpt_path last"
        )

    # ----------------------------------------------------------------------------------------------
    # Grids, validation, checkpoints

    def on_train_batch_end(self, outputs: STEP_OUTPUT, batch: dict[str, Any], batch_idx: int) -> None:
        every = self.hparams.grid_every_n_steps
        step = self.global_step
        if every > 0 and (step == 1 or step % every == 0) and self.trainer.is_global_zero:
            self.save_grid(batch["src"], batch["edit"], tag=f"step-{step:07d}", edit=self.batch_edit(batch))

    @torch.no_grad()
    def save_grid(
        self,
        x: torch.Tensor,
        target: torch.Tensor,
        tag: str,
        key: str = "grid",
        edit: torch.Tensor | None = None,
    ) -> Path:
        """Rows of (input | teacher | student-EMA): ``<default_root_dir>/grids/<tag>.png`` and the loggers
        (as ``key``)."""
        import torchvision.utils as vutils

        from p2pz.utils.atomic import atomic_path

        n = min(self.hparams.grid_samples, x.shape[0])
        x, target = x[:n], target[:n]
        student = self.g_ema(x, edit=None if edit is None else edit[:n]).float()
        rows = torch.stack([x.float(), target.float(), student], dim=1).flatten(0, 1)
        grid = vutils.make_grid((rows.clamp(-1, 1) + 1) / 2, nrow=3, padding=2, pad_value=1.0).cpu()
        path = Path(self.trainer.default_root_dir) / "grids" / f"{tag}.png"
        with atomic_path(path, suffix=".png") as tmp:
            vutils.save_image(grid, tmp, format="PNG")
        for logger in self.loggers:
            experiment = getattr(logger, "experiment", None)
            if hasattr(logger, "log_image"):  # e.g. WandbLogger
                logger.log_image(key=key, images=[grid], step=self.global_step)
            elif hasattr(experiment, "add_image"):  # TensorBoard
                experiment.add_image(key, grid, self.global_step)
        return path

    def on_validation_start(self) -> None:
        """Each rank scores its share of the validation pairs (``validation_positions``) with rank 0's
        ``g_ema``: its buffers (``w_avg``, which each rank's forward moves) are made rank 0's, as DDP
        makes the training modules' buffers at every forward."""
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            for buffer in self.g_ema.buffers():
                torch.distributed.broadcast(buffer, src=0)

    def validation_step(self, batch: dict[str, Any], batch_idx: int, dataloader_idx: int = 0) -> None:
        """Score ``g_ema`` against the teacher, next to the copy-the-input baseline; the first batch
        (the same held-out pairs every time: validation reads them in order, unaugmented) is drawn as
        the ``val/grid`` image. A student of many edits (one loader per edit) is scored per edit too:
        ``val/psnr_to_teacher/<edit>`` (see :meth:`on_validation_epoch_end`)."""
        x, target = batch["src"], batch["edit"]
        edit = self.batch_edit(batch)
        out = self.g_ema(x, edit=edit)
        grids_on = self.hparams.grid_every_n_steps > 0 and not self.trainer.sanity_checking
        if batch_idx == 0 and dataloader_idx == 0 and grids_on and self.trainer.is_global_zero:
            self.save_grid(x, target, tag=f"val-step-{self.global_step:07d}", key="val/grid", edit=edit)
        if edit is not None:
            self._add_edit_scores(out, target, x, batch["__key__"])
            return
        metrics = {
            "val/l1": (out - target).abs().mean(),
            "val/l1_copy": (x - target).abs().mean(),
            "val/psnr_to_teacher": psnr_db(out, target),
            "val/psnr_copy": psnr_db(x, target),
        }
        if self._perceptual is not None:
            metrics["val/lpips"] = self.perceptual(out, target)
            metrics["val/lpips_copy"] = self.perceptual(x, target)
        self.log_dict(metrics, on_step=False, on_epoch=True, batch_size=x.shape[0], sync_dist=True)

    VAL_SCORES = ("val/l1", "val/l1_copy", "val/psnr_to_teacher", "val/psnr_copy")

    def _new_edit_sums(self, device: torch.device) -> torch.Tensor:
        return torch.zeros(len(self.edit_names), len(self.VAL_SCORES) + 1, device=device)

    def _add_edit_scores(
        self, out: torch.Tensor, target: torch.Tensor, x: torch.Tensor, keys: list[str]
    ) -> None:
        """Per edit, the sums of :attr:`VAL_SCORES` over its pairs and their count."""
        if self._val_edit_sums is None:
            self._val_edit_sums = self._new_edit_sums(out.device)
        per_image = torch.stack(
            [
                (out - target).abs().flatten(1).mean(1),
                (x - target).abs().flatten(1).mean(1),
                psnr_per_image(out, target),
                psnr_per_image(x, target),
                torch.ones(len(out), device=out.device),
            ],
            dim=1,
        ).float()
        self._val_edit_sums.index_add_(0, self.edit_indices(keys).to(out.device), per_image)

    def on_validation_epoch_end(self) -> None:
        """A student of many edits: the scores over all its validation pairs (as a per-edit student
        logs them) and ``val/psnr_to_teacher/<edit>``, summed over the ranks first."""
        sums, self._val_edit_sums = self._val_edit_sums, None
        if not self.edit_names:
            return
        if sums is None:  # this rank scored nothing: it still takes part in the reduction
            sums = self._new_edit_sums(self.edit_vectors.device)
        if self.trainer.world_size > 1:
            sums = self.trainer.strategy.reduce(sums, reduce_op="sum")
        total = sums.sum(dim=0)
        if total[-1] > 0:
            self.log_dict({k: total[i] / total[-1] for i, k in enumerate(self.VAL_SCORES)}, sync_dist=False)
        for name, row in zip(self.edit_names, sums):
            if row[-1] > 0:
                self.log(f"val/psnr_to_teacher/{name}", row[2] / row[-1], sync_dist=False)

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["generator_config"] = dict(self.g_ema.config)


def gradient_l1(diff: torch.Tensor, weight: torch.Tensor | None = None) -> torch.Tensor:
    """Mean |d/dx diff| + |d/dy diff| of ``diff = fake - target`` (the images' finite differences
    disagree where an edge is misplaced or blurred), optionally weighted per pixel."""
    dx, dy = diff[..., :, 1:] - diff[..., :, :-1], diff[..., 1:, :] - diff[..., :-1, :]
    if weight is None:
        return dx.abs().mean() + dy.abs().mean()
    return (weight[..., :, 1:] * dx.abs()).mean() + (weight[..., 1:, :] * dy.abs()).mean()


def psnr_db(images: torch.Tensor, reference: torch.Tensor, cap: float = 100.0) -> torch.Tensor:
    """Mean per-image PSNR (dB) of ``[N, C, H, W]`` batches in [-1, 1]: see :func:`psnr_per_image`."""
    return psnr_per_image(images, reference, cap).mean()


def psnr_per_image(images: torch.Tensor, reference: torch.Tensor, cap: float = 100.0) -> torch.Tensor:
    """``[N]`` PSNRs (dB) of ``[N, C, H, W]`` batches in [-1, 1] (clamped), a perfect image counting
    ``cap``: torchmetrics' PSNR on the [0, 1] range."""
    from torchmetrics.functional.image import peak_signal_noise_ratio

    a, b = ((t.detach().float().clamp(-1, 1) + 1) / 2 for t in (images, reference))
    per_image = peak_signal_noise_ratio(a, b, data_range=1.0, reduction="none", dim=(1, 2, 3))
    return torch.nan_to_num(per_image, posinf=cap).clamp(max=cap)


def load_generator(checkpoint_path: str | os.PathLike, ema: bool = True) -> nn.Module:
    """The (EMA, by default) generator of a training checkpoint, in eval mode, on the CPU.

    The file is read by :func:`p2pz.student.checkpoints.read_checkpoint`: weights-only, so a
    checkpoint from elsewhere runs no code; anything but a student checkpoint is a ``UserError``.
    """
    from p2pz.student.checkpoints import generator_from_checkpoint, read_checkpoint

    return generator_from_checkpoint(read_checkpoint(checkpoint_path), checkpoint_path, ema=ema)
