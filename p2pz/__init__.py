"""pix2pix-zero edits distilled into fast single-pass students: the one installed import name.

The layers, bottom to top (a module imports only from layers below its own):

- ``p2pz.utils``: errors and atomic writes, shared by everything;
- ``p2pz.teacher`` (``teacher/``): pix2pix-zero on Stable Diffusion 1.x;
- ``p2pz.data`` (``data/``): the shapes world, model building, the teacher's pairs in shards,
  and the metrics that score edits;
- ``p2pz.student`` (``student/``): the CoModGAN student, its ops, training, export and bench;
- ``p2pz.cli``: the ``p2pz`` command.

See ARCHITECTURE.md for the data's path from teacher to shards to student to package.
"""

__version__ = "0.1.0"
__all__ = ["Student"]


def __getattr__(name: str):
    """``from p2pz import Student`` (the Hugging Face model class), imported on first use: ``import p2pz``
    and ``p2pz --help`` stay free of torch."""
    if name == "Student":
        from p2pz.student.package import Student

        return Student
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
