"""The student: CoModGAN-style generator and conditional discriminator (see student/networks.py)."""

from student.networks import Discriminator, Generator

__all__ = ["Discriminator", "Generator"]
