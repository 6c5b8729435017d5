"""The student: CoModGAN-style generator and conditional discriminator (see ``networks.py``),
its custom ops (``ops/``), training (``training.py``), export to packages (``export.py``) and
latency benchmark (``bench.py``)."""

from p2pz.utils import require_namespace

require_namespace(__name__, "p2pz.student")

from p2pz.student.networks import Discriminator, Generator  # noqa: E402
from p2pz.student.package import Student, load_package  # noqa: E402

__all__ = ["Discriminator", "Generator", "Student", "load_package"]
