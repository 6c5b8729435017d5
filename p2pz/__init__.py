"""Command line and shared plumbing of the pix2pix-zero distillation project.

The method lives in the `teacher`, `data` and `student` packages; this package only wires
them into the `p2pz` command and holds the few helpers they share.
"""

__version__ = "0.1.0"
