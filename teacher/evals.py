"""UNet evaluations of the teacher, counted where they happen: hooks on the UNet module.

A pix2pix-zero pair costs hundreds of UNet evaluations (inversion, reference pass, guidance
gradient with its backward pass, guided prediction); the teacher's throughput is that count times
the cost of one. ``UNetEvals`` counts them from the module itself, so the figures cannot drift
from what the code does:

* a forward pre-hook adds the batch size of every call's ``sample`` to the current stage's
  ``forward`` count (one evaluation = one sample through the UNet);
* when the call builds an autograd graph from ``sample``, a gradient hook on that tensor adds the
  batch size to ``backward`` once the backward pass has reached the UNet's input.

The stage comes from :func:`unet_stage` (``with unet_stage("reference"): ...``) around the calls;
calls outside any stage count as ``"other"``. With ``timing=True`` the seconds spent inside the
UNet are summed too (forward: between the hooks; backward: :func:`timed_backward` around the
``autograd.grad`` call), synchronising CUDA so the times are the kernels' own.
"""

from __future__ import annotations

import contextlib
import contextvars
import time
from collections.abc import Iterator
from typing import Any

import torch

STAGES = ("inversion", "reference", "mask", "guidance", "prediction")
_STAGE: contextvars.ContextVar[str] = contextvars.ContextVar("p2pz_unet_stage", default="other")
_ATTRIBUTE = "_p2pz_unet_evals"


@contextlib.contextmanager
def unet_stage(name: str) -> Iterator[None]:
    """UNet calls inside this block count under stage ``name``."""
    token = _STAGE.set(name)
    try:
        yield
    finally:
        _STAGE.reset(token)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class UNetEvals:
    """Forward/backward evaluation counts per stage of one UNet module (see the module docstring)."""

    def __init__(self, unet: torch.nn.Module, timing: bool = False) -> None:
        self.unet = unet
        self.timing = timing
        self.forward: dict[str, int] = {}
        self.backward: dict[str, int] = {}
        self.seconds = 0.0  # inside the UNet (forward and backward), with timing=True
        self._started: float | None = None  # the running forward call's start, with timing=True
        self._handles = [
            unet.register_forward_pre_hook(self._before, with_kwargs=True),
            unet.register_forward_hook(self._after, with_kwargs=True),
        ]
        self._previous = getattr(unet, _ATTRIBUTE, None)  # restored by remove()
        setattr(unet, _ATTRIBUTE, self)

    @classmethod
    def of(cls, unet: Any) -> UNetEvals | None:
        """The counter attached to ``unet``, if any."""
        return getattr(unet, _ATTRIBUTE, None)

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        if getattr(self.unet, _ATTRIBUTE, None) is self:
            setattr(self.unet, _ATTRIBUTE, self._previous)

    # -- hooks -----------------------------------------------------------------------------------

    def _before(self, module: Any, args: tuple, kwargs: dict) -> None:
        sample = args[0] if args else kwargs.get("sample")
        stage = _STAGE.get()
        batch = int(sample.shape[0])
        self.forward[stage] = self.forward.get(stage, 0) + batch
        if torch.is_grad_enabled() and sample.requires_grad:
            sample.register_hook(lambda grad: self._count_backward(stage, batch))
        if self.timing:
            _sync(sample.device)
            self._started = time.perf_counter()

    def _after(self, module: Any, args: tuple, kwargs: dict, output: Any) -> None:
        if self.timing and self._started is not None:
            sample = args[0] if args else kwargs.get("sample")
            _sync(sample.device)
            self.seconds += time.perf_counter() - self._started
            self._started = None

    def _count_backward(self, stage: str, batch: int) -> None:
        self.backward[stage] = self.backward.get(stage, 0) + batch

    # -- reading ---------------------------------------------------------------------------------

    def snapshot(self) -> dict[str, Any]:
        """The counts so far: ``{"forward": {stage: n}, "backward": {stage: n}, "seconds": s}``."""
        return {"forward": dict(self.forward), "backward": dict(self.backward), "seconds": self.seconds}

    def reset(self) -> None:
        self.forward.clear()
        self.backward.clear()
        self.seconds = 0.0


@contextlib.contextmanager
def timed_backward(unet: Any, device: torch.device) -> Iterator[None]:
    """Adds the block's seconds (a backward pass through ``unet``) to its counter, when it times."""
    counter = UNetEvals.of(unet)
    if counter is None or not counter.timing:
        yield
        return
    _sync(device)
    start = time.perf_counter()
    try:
        yield
    finally:
        _sync(device)
        counter.seconds += time.perf_counter() - start


def evals_between(before: dict[str, Any], after: dict[str, Any]) -> dict[str, Any]:
    """The evaluations between two snapshots: per-stage forward/backward counts and their totals."""
    out: dict[str, Any] = {}
    for kind in ("forward", "backward"):
        stages = set(before[kind]) | set(after[kind])
        delta = {s: after[kind].get(s, 0) - before[kind].get(s, 0) for s in stages}
        out[kind] = {s: n for s, n in sorted(delta.items()) if n}
    out["seconds"] = after["seconds"] - before["seconds"]
    return out


def per_pair(evals: dict[str, Any], pairs: int) -> dict[str, Any]:
    """UNet evaluations per pair: ``{"forward": f, "backward": b, "by_stage": {stage: {...}}}``."""
    if pairs <= 0:
        return {"forward": None, "backward": None, "by_stage": {}}
    stages = sorted(set(evals["forward"]) | set(evals["backward"]), key=_stage_order)
    return {
        "forward": round(sum(evals["forward"].values()) / pairs, 3),
        "backward": round(sum(evals["backward"].values()) / pairs, 3),
        "by_stage": {
            s: {
                "forward": round(evals["forward"].get(s, 0) / pairs, 3),
                "backward": round(evals["backward"].get(s, 0) / pairs, 3),
            }
            for s in stages
        },
    }


def _stage_order(stage: str) -> tuple[int, str]:
    return (STAGES.index(stage) if stage in STAGES else len(STAGES), stage)
