"""Library noise, kept out of every command's output.

Messages from libraries that a user can do nothing about (deprecations inside Lightning, "No CUDA
runtime is found" on a CPU machine, Lightning's tips, the ONNX exporter's optimiser listing every node
it does not fold) are filtered, each by its own text or logger; everything else, the project's own
warnings included, still shows. ``p2pz``'s ``main()`` runs every command inside
:func:`library_noise_filtered`, and so do the training scripts (``python train.py``).
"""

from __future__ import annotations

import contextlib
import logging
import warnings
from collections.abc import Iterator

# Warnings from libraries, each matched by the start of its text (other libraries' warnings still show).
LIBRARY_WARNINGS = (
    r"The `srun` command is available on your system but is not used",  # Lightning, on a SLURM login node
    r"Starting from v1\.9\.0, `tensorboardX` has been removed",  # Lightning's note on its default logger
    r"`isinstance\(treespec, LeafSpec\)` is deprecated",  # Lightning's own use of torch's pytree
    r"Your `IterableDataset` has `__len__` defined",  # the pair stream's epoch length is nominal
    r"Total length of `\w+` across ranks is zero",  # a run without validation pairs
)
# Log lines of the same kind: logger name -> the lines' starts.
LIBRARY_LOG_LINES = {
    "torch.utils.cpp_extension": ("No CUDA runtime is found",),  # building the CPU ops on a CPU machine
    "lightning.pytorch.utilities.rank_zero": ("💡 Tip",),  # Lightning's advertisement of its cloud logger
}
# Loggers whose INFO lines are for their developers (the ONNX exporter's optimiser: "Skipping constant
# folding for node ..." per node, "Applied N of general pattern rewrite rules"); their warnings still show.
CHATTY_LOGGERS = ("onnxscript", "onnx_ir")


class DropLines(logging.Filter):
    """Drop a logger's records whose message starts with one of ``starts``."""

    def __init__(self, starts: tuple[str, ...]):
        super().__init__()
        self.starts = starts

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(self.starts)


@contextlib.contextmanager
def library_noise_filtered() -> Iterator[None]:
    """Filter the library messages listed above while the block runs; put everything back after it."""
    filters = {name: DropLines(starts) for name, starts in LIBRARY_LOG_LINES.items()}
    levels = {name: logging.getLogger(name).level for name in CHATTY_LOGGERS}
    with warnings.catch_warnings():
        for pattern in LIBRARY_WARNINGS:
            warnings.filterwarnings("ignore", message=pattern)
        for name, drop in filters.items():
            logging.getLogger(name).addFilter(drop)
        for name, level in levels.items():
            logging.getLogger(name).setLevel(max(level, logging.WARNING))
        try:
            yield
        finally:
            for name, drop in filters.items():
                logging.getLogger(name).removeFilter(drop)
            for name, level in levels.items():
                logging.getLogger(name).setLevel(level)
