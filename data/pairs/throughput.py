"""What a ``p2pz generate`` run costs: pairs per hour and the teacher's UNet evaluations per pair.

The evaluations come from the teacher's own counter (``Pix2PixZero.unet_evals``, hooks on the UNet
module, see ``p2pz.teacher.evals``): the progress bar shows them beside pairs/hour, and the manifest's
shard and done records carry them per stage (inversion, reference, guidance, prediction).
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

from p2pz.teacher.evals import evals_between, per_pair

if TYPE_CHECKING:
    from tqdm import tqdm


def evals_snapshot(teacher: Any) -> dict[str, Any] | None:
    """The teacher's UNet evaluation counts so far (None for a teacher without a counter)."""
    counter = getattr(teacher, "unet_evals", None)
    return counter.snapshot() if counter is not None else None


def evals_per_pair(teacher: Any, since: dict[str, Any] | None, pairs: int) -> dict[str, Any] | None:
    """UNet evaluations per pair made since the snapshot ``since``: forward, backward, by stage."""
    now = evals_snapshot(teacher)
    if since is None or now is None:
        return None
    return per_pair(evals_between(since, now), pairs)


class Throughput:
    """The progress bar's postfix: pairs/hour of this run (restarts excluded) and UNet evaluations
    per pair the teacher made in this run."""

    def __init__(self, bar: tqdm, teacher: Any) -> None:
        self.bar, self.teacher = bar, teacher
        self.start, self.first = time.perf_counter(), bar.n
        self.evals_start = evals_snapshot(teacher)
        self.pairs_made = 0  # teacher results, written or not (a resumed group remakes finished ones)

    def made(self, pairs: int) -> None:
        self.pairs_made += pairs

    def evals_per_pair(self) -> dict[str, Any] | None:
        return evals_per_pair(self.teacher, self.evals_start, self.pairs_made)

    def update(self, n: int) -> None:
        if n <= 0:
            return
        self.bar.update(n)
        elapsed = time.perf_counter() - self.start
        rate = (self.bar.n - self.first) / elapsed * 3600 if elapsed > 0 else 0.0
        text = f"{rate:,.0f} pairs/h"
        evals = self.evals_per_pair()
        if evals and evals["forward"] is not None:
            text += f", UNet evals/pair {evals['forward']:.0f} fwd + {evals['backward']:.0f} bwd"
        self.bar.set_postfix_str(text, refresh=False)
