"""What the ops share in Python: defining their operators, choosing an implementation, and building
the compiled kernels just in time.

Every op has its own file set beside this one: ``<op>.py`` (Python API, pure-PyTorch reference, and the
operator's schema, fake kernel and autograd formula, defined through :func:`define_op`), ``<op>.h``
(what its CPU and CUDA kernels share), ``<op>.cpp`` (CPU kernel) and ``<op>.cu`` (CUDA kernel);
``common.h`` holds what the ops' kernels share.

The CPU sources of all ops make one extension and the CUDA sources another, so a machine without a GPU
only ever compiles the CPU one. Each is built into a directory named by a hash of its sources (and of
everything else that changes the binary), under ``$TORCH_EXTENSIONS_DIR`` or
``~/.cache/torch_extensions``; concurrent processes serialise on a file lock, and a build that fails is
tried once per process, warns once with the compiler's own error line, and leaves ``ref`` in charge.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib
import os
import platform
import re
import sys
import threading
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path

import torch

IMPLS = ("ref", "cpu", "cuda")
ENV_VAR = "P2PZ_OPS_IMPL"
NAMESPACE = "p2pz"  # torch.ops.p2pz.*: the C++/CUDA sources register their kernels under this name
OPS = ("upfirdn2d", "bias_act")  # each is the file set <op>.py, <op>.h, <op>.cpp, <op>.cu
SOURCE_DIR = Path(__file__).resolve().parent
_SUFFIXES = {"cpu": ".cpp", "cuda": ".cu"}  # the extensions, by device kind
# The headers are hashed too, since ninja does not track them for nvcc.
HEADERS = ["common.h"] + [f"{op}.h" for op in OPS]
# -march=native: the build runs on the machine that uses it (the digest includes the CPU's identity);
# without it the baseline x86-64 target turns lrelu's select into a branch and nothing vectorises.
CPU_CFLAGS = ["-O3", "-fno-math-errno", "-march=native"]
CUDA_CFLAGS = ["-O3", "--use_fast_math"]

_forced: list[str] = []  # stack of force_impl() contexts
_state: dict[str, str] = {}  # kind -> "loaded" | "failed"
_lock = threading.Lock()
_libraries: list[torch.library.Library] = []  # the operators stay registered while these live


# ---------------------------------------------------------------------------------------------------
# Operators


def define_op(schema: str, fake: Callable, backward: Callable, setup_context: Callable) -> None:
    """Define the operator ``p2pz::<schema>`` with its fake kernel (shapes for torch.compile and
    torch.export) and its autograd formula; the compiled extensions add the CPU and CUDA kernels.

    Each op's module calls this on import, hence once per process.
    """
    lib = torch.library.Library(NAMESPACE, "FRAGMENT")  # a fragment per op: no op owns the namespace
    lib.define(schema)
    name = f"{NAMESPACE}::{schema.split('(', 1)[0]}"
    torch.library.register_fake(name, fake, lib=lib)
    torch.library.register_autograd(name, backward, setup_context=setup_context, lib=lib)
    _libraries.append(lib)


# ---------------------------------------------------------------------------------------------------
# Choosing an implementation


def _check(impl: str | None, where: str) -> str | None:
    if impl is not None and impl not in IMPLS:
        raise ValueError(f"{where}: unknown ops implementation {impl!r}; expected one of {IMPLS}")
    return impl


@contextlib.contextmanager
def force_impl(impl: str) -> Iterator[None]:
    """Run every op in this block with `impl` ('ref', 'cpu' or 'cuda'), whatever the call sites ask.

    ``force_impl('ref')`` gives a pure-ATen graph, which is what ONNX export needs.
    """
    _forced.append(_check(impl, "force_impl"))
    try:
        yield
    finally:
        _forced.pop()


def choose_impl(impl: str | None, x: torch.Tensor) -> str:
    """The implementation that runs for tensor `x`: 'ref' or the compiled kernels' device kind.

    Precedence: force_impl() > the `impl` argument > $P2PZ_OPS_IMPL > automatic (the compiled kernels
    for x's device when they build, else 'ref'). The environment variable only sets the process' default:
    an explicit `impl` always wins, and a default of 'cpu' or 'cuda' applies to tensors on that device
    only (a process holds tensors on both; elsewhere the choice is automatic). An explicit 'cpu'/'cuda'
    that does not match x's device is an error; an explicit one whose build failed falls back to 'ref'
    (the build already warned).
    """
    kind = x.device.type
    requested = (_forced[-1] if _forced else None) or _check(impl, "impl")
    if requested is None:
        default = _check(os.environ.get(ENV_VAR) or None, f"${ENV_VAR}")
        requested = default if default in ("ref", kind) else None
    if requested == "ref":
        return "ref"
    if torch.onnx.is_in_onnx_export() or torch.jit.is_scripting() or torch.jit.is_tracing():
        return "ref"
    if requested is not None and requested != kind:
        raise ValueError(
            f"ops implementation {requested!r} cannot run on {kind} tensors; "
            f"use impl='ref' or move the tensors to {requested}"
        )
    if kind not in _SUFFIXES:
        return "ref"
    return kind if load_extension(kind) else "ref"


# ---------------------------------------------------------------------------------------------------
# Just-in-time build


def sources(kind: str) -> list[str]:
    """File names of extension `kind` ('cpu' or 'cuda'): one source per op, in SOURCE_DIR."""
    return [op + _SUFFIXES[kind] for op in OPS]


def build_root() -> Path:
    root = os.environ.get("TORCH_EXTENSIONS_DIR")
    return Path(root) if root else Path.home() / ".cache" / "torch_extensions"


def _cpu_identity() -> str:
    """What -march=native compiles for: a cache shared by different machines keeps one build per CPU."""
    try:
        info = Path("/proc/cpuinfo").read_text()
    except OSError:
        return platform.processor() or platform.machine()
    keys = ("model name", "flags", "Features", "CPU part")
    return "|".join(sorted({ln for ln in info.splitlines() if ln.split(":")[0].strip() in keys}))


def source_digest(kind: str) -> str:
    """Hash of everything that changes the binary: sources, headers, flags, torch and Python versions."""
    h = hashlib.sha256()
    for name in sorted(sources(kind) + HEADERS):
        h.update(name.encode())
        h.update((SOURCE_DIR / name).read_bytes())
    flags = CPU_CFLAGS + (CUDA_CFLAGS if kind == "cuda" else [])
    versions = (torch.__version__, torch.version.cuda, sys.version_info[:2], platform.machine())
    h.update(repr((flags, versions, _cpu_identity())).encode())
    return h.hexdigest()[:16]


def build_dir(kind: str) -> Path:
    return build_root() / f"p2pz_ops_{kind}_{source_digest(kind)}"


def _compiler_error_line(message: str) -> str:
    """The compiler's own first error line out of cpp_extension's long build log."""
    lines = [ln.strip() for ln in message.splitlines() if ln.strip()]
    for pattern in (r"\berror\b", r"fatal", r"FAILED"):
        for ln in lines:
            if re.search(pattern, ln, re.IGNORECASE) and not ln.startswith("Error building extension"):
                return ln[:400]
    return (lines[-1] if lines else message)[:400]


def compile_extension(kind: str, directory: Path, verbose: bool = False) -> None:
    """Compile and load extension `kind` ('cpu' or 'cuda') from the sources beside this file into
    `directory`. Loading the shared library registers its kernels for the ``p2pz`` ops.
    """
    from filelock import FileLock
    from torch.utils import cpp_extension

    for op in OPS:  # each op's module defines its schema on import; the kernels register against them
        importlib.import_module(f"{__package__}.{op}")
    directory.mkdir(parents=True, exist_ok=True)
    with FileLock(str(directory) + ".lock"):
        # We hold the only lock that matters; a baton left by a build killed mid-way (Ctrl-C) would
        # otherwise make cpp_extension wait for ever.
        with contextlib.suppress(FileNotFoundError):
            (directory / "lock").unlink()
        cpp_extension.load(
            name=f"p2pz_ops_{kind}",
            sources=[str(SOURCE_DIR / s) for s in sources(kind)],
            extra_include_paths=[str(SOURCE_DIR)],
            extra_cflags=CPU_CFLAGS,
            extra_cuda_cflags=CUDA_CFLAGS if kind == "cuda" else None,
            build_directory=str(directory),
            with_cuda=kind == "cuda",
            is_python_module=False,
            verbose=verbose,
        )


def load_extension(kind: str) -> bool:
    """Build (once, cached on disk) and load extension `kind`; False if it cannot be had in this process."""
    state = _state.get(kind)
    if state is not None:
        return state == "loaded"
    with _lock:
        if kind in _state:
            return _state[kind] == "loaded"
        try:
            if kind == "cuda" and not torch.cuda.is_available():
                raise RuntimeError("no CUDA device is available")
            compile_extension(kind, build_dir(kind))
            _state[kind] = "loaded"
        except Exception as e:  # noqa: BLE001 -- any build failure means: fall back, once
            _state[kind] = "failed"
            if kind == "cuda" and not torch.cuda.is_available():
                return False
            warnings.warn(
                f"p2pz ops: building the {kind.upper()} kernels failed ({_compiler_error_line(str(e))}); "
                f"using the slow reference implementation instead. Set {ENV_VAR}=ref to silence this, "
                f"or delete {build_dir(kind)} and retry.",
                RuntimeWarning,
                stacklevel=3,
            )
    return _state[kind] == "loaded"
