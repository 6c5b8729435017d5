"""The bottom layer: helpers every other layer shares (errors the user can fix, atomic writes)."""

from __future__ import annotations


def require_namespace(module_name: str, expected: str) -> None:
    """Refuse to import a layer under a bare name (``import teacher`` from a checkout's root).

    Every module has one name, ``p2pz.…``: imported twice under two names, torch.library would
    register the student's ops twice and ``isinstance`` checks would fail between the copies.
    """
    if module_name != expected:
        raise ImportError(
            f"'{module_name}' is part of p2pz: import it as '{expected}' (pip install -e . first)"
        )
