"""Write outputs so that a crash never leaves a half-written file at the final path."""

from __future__ import annotations

import contextlib
import os
import shutil
import stat
import tempfile
from collections.abc import Iterator
from pathlib import Path


def current_umask() -> int:
    """The process's umask, read without changing it where the system allows.

    Linux (4.7 and later) reports it in ``/proc/self/status``. Elsewhere ``os.umask`` is the only way
    to read it, and it reads by setting: set a private ``0o077`` and put the old value back at once,
    so a thread that creates a file in between gets one that is too private, never one too open.
    Read per call, not once at import, so a process that changes its umask is followed.
    """
    try:
        with open("/proc/self/status", encoding="ascii", errors="replace") as status:
            for line in status:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    old = os.umask(0o077)
    os.umask(old)
    return old


def _apply_umask(path: Path) -> None:
    """Give what a block created at ``path`` the modes ``open()`` and ``mkdir()`` would have given it.

    Files get ``0o666``, directories and executables ``0o777``, less the umask. Some writers create
    files ``0o600`` whatever the umask (safetensors' ``save_file``, anything through ``mkstemp``),
    which would leave a package that a teammate cannot read inside a folder they can. Symbolic links
    are left alone (and not followed).
    """
    umask = current_umask()

    def fix(item: str | Path) -> None:
        mode = os.lstat(item).st_mode
        if stat.S_ISLNK(mode):
            return
        full = stat.S_ISDIR(mode) or mode & 0o111
        wanted = (0o777 if full else 0o666) & ~umask
        if stat.S_IMODE(mode) != wanted:
            os.chmod(item, wanted)

    if not os.path.lexists(path):
        return
    fix(path)
    if path.is_dir() and not path.is_symlink():
        for root, dirs, files in os.walk(path):  # does not descend into links to folders
            for name in dirs + files:
                fix(os.path.join(root, name))


@contextlib.contextmanager
def atomic_path(final: str | os.PathLike, suffix: str = "") -> Iterator[Path]:
    """Yield a temporary path beside ``final``; move it into place only if the block succeeds.

    Works for files and directories: whatever the block creates at the yielded path replaces
    ``final`` with one ``os.replace`` (directories: the old one is removed first). What lands there
    has the user's umask applied (files ``0o666 & ~umask``, directories ``0o777 & ~umask``), whatever
    mode the writer inside the block used.
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{final.name}.", suffix=suffix + ".tmp", dir=final.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    tmp.unlink()
    try:
        yield tmp
        _apply_umask(tmp)
        if tmp.is_dir() and final.is_dir():
            shutil.rmtree(final)
        os.replace(tmp, final)
    finally:
        if tmp.is_dir():
            shutil.rmtree(tmp, ignore_errors=True)
        elif tmp.exists():
            tmp.unlink()
