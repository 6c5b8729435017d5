"""What the ops share in Python: defining their operators, choosing an implementation, and building
the compiled kernels just in time.

Every op has its own file set beside this one: ``<op>.py`` (Python API, pure-PyTorch reference, and the
operator's schema, fake kernel and autograd formula, defined through :func:`define_op`), ``<op>.h``
(what its CPU and CUDA kernels share), ``<op>.cpp`` (CPU kernel) and ``<op>.cu`` (CUDA kernel);
``common.h`` holds what the ops' kernels share.

The CPU sources of all ops make one extension and the CUDA sources another, so a machine without a GPU
only ever compiles the CPU one. Each is built into a directory named by a hash of its sources (and of
everything else that changes the binary), under ``$TORCH_EXTENSIONS_DIR`` or
``~/.cache/torch_extensions``. A build happens in a temporary directory renamed into place when complete,
with concurrent processes serialised on a file lock beside it; a directory that is there is loaded as it
is, without a lock, so a prebuilt read-only one works. A build that fails is tried once per process. An
explicit request for the kernels (``impl=``, ``$P2PZ_OPS_IMPL`` or :func:`force_impl`) that cannot be
had is an error; only the automatic choice falls back to ``ref``, with one warning giving the
compiler's own error line. :func:`active_impl` says which implementation the ops run on a device.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import importlib
import os
import platform
import re
import secrets
import shutil
import subprocess
import sys
import threading
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path

import torch

from p2pz.utils.errors import UserError

IMPLS = ("ref", "cpu", "cuda")
ENV_VAR = "P2PZ_OPS_IMPL"
NAMESPACE = "p2pz"  # torch.ops.p2pz.*: the C++/CUDA sources register their kernels under this name
OPS = ("upfirdn2d", "bias_act")  # each is the file set <op>.py, <op>.h, <op>.cpp, <op>.cu
SOURCE_DIR = Path(__file__).resolve().parent
_SUFFIXES = {"cpu": ".cpp", "cuda": ".cu"}  # the extensions, by device kind
# The headers are hashed too, since ninja does not track them for nvcc.
HEADERS = ["common.h"] + [f"{op}.h" for op in OPS]
# -march=native: the build runs on the machine that uses it (the CPU digest includes the CPU's identity);
# without it the baseline x86-64 target turns lrelu's select into a branch and nothing vectorises.
# The CUDA extension has no C++ source and nvcc never sees these: its digest has the GPU target instead.
CPU_CFLAGS = ["-O3", "-fno-math-errno", "-march=native"]
CUDA_CFLAGS = ["-O3", "--use_fast_math"]
# In the digest: since layout 2 a build directory only ever appears complete (renamed into place).
LAYOUT = 2

_forced: list[str] = []  # stack of force_impl() contexts
_state: dict[str, str] = {}  # kind -> "loaded" | "failed"
_errors: dict[str, str] = {}  # kind -> why it failed, one line
_warned: set[str] = set()  # kinds whose fall-back to 'ref' has been announced
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
    that does not match x's device is an error, and so is an explicit one whose kernels cannot be built
    (:class:`OpsUnavailableError`); only the automatic choice falls back to 'ref' (warning once).
    """
    kind = x.device.type
    if _forced:
        requested, requested_by = _forced[-1], f"force_impl({_forced[-1]!r})"
    elif impl is not None:
        requested, requested_by = _check(impl, "impl"), f"impl={impl!r}"
    else:
        default = _check(os.environ.get(ENV_VAR) or None, f"${ENV_VAR}")
        requested, requested_by = (default if default in ("ref", kind) else None), f"{ENV_VAR}={default}"
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
    if requested is not None:
        require_extension(kind, requested_by)
        return kind
    return kind if load_extension(kind) else "ref"


def active_impl(device: torch.device | str) -> str:
    """The implementation the ops run for tensors on `device` when the call site leaves the choice to
    them (``impl=None``, as the networks do): 'ref', 'cpu' or 'cuda'. Builds the kernels if needed, and
    raises like the ops do when an explicit request cannot be had."""
    return choose_impl(None, torch.empty(0, device=device))


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


def _cuda_identity() -> str:
    """What nvcc compiles for and with: $TORCH_CUDA_ARCH_LIST or, where it is unset, the visible GPUs'
    architectures (cpp_extension's default target), and the nvcc version."""
    arch_list = os.environ.get("TORCH_CUDA_ARCH_LIST", "")
    gpus: list[tuple[int, int]] = []
    if not arch_list and torch.cuda.is_available():
        gpus = sorted({torch.cuda.get_device_capability(i) for i in range(torch.cuda.device_count())})
    return repr((arch_list, gpus, _nvcc_version()))


@functools.cache
def _nvcc_version() -> str:
    """``nvcc --version`` of the toolkit cpp_extension builds with (``CUDA_HOME``); 'none' without one."""
    from torch.utils.cpp_extension import CUDA_HOME

    nvcc = Path(CUDA_HOME, "bin", "nvcc") if CUDA_HOME else shutil.which("nvcc")
    if not nvcc:
        return "none"
    try:
        result = subprocess.run([str(nvcc), "--version"], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.SubprocessError):
        return "none"
    return result.stdout.strip() or "none"


def source_digest(kind: str) -> str:
    """Hash of everything that changes the binary: sources, headers, flags, torch and Python versions,
    and the target: the CPU's identity for 'cpu', the GPU architectures and nvcc for 'cuda'."""
    h = hashlib.sha256()
    for name in sorted(sources(kind) + HEADERS):
        h.update(name.encode())
        h.update((SOURCE_DIR / name).read_bytes())
    flags = CPU_CFLAGS if kind == "cpu" else CUDA_CFLAGS
    versions = (torch.__version__, torch.version.cuda, sys.version_info[:2], platform.machine(), LAYOUT)
    target = _cpu_identity() if kind == "cpu" else _cuda_identity()
    h.update(repr((flags, versions, target)).encode())
    return h.hexdigest()[:16]


def build_dir(kind: str) -> Path:
    return build_root() / f"p2pz_ops_{kind}_{source_digest(kind)}"


def library_path(kind: str, directory: Path) -> Path:
    """The shared library cpp_extension links in `directory`."""
    return directory / f"p2pz_ops_{kind}.so"


def _compiler_error_line(message: str) -> str:
    """The compiler's own first error line out of cpp_extension's long build log."""
    lines = [ln.strip() for ln in message.splitlines() if ln.strip()]
    for pattern in (r"\berror\b", r"fatal", r"FAILED"):
        for ln in lines:
            if re.search(pattern, ln, re.IGNORECASE) and not ln.startswith("Error building extension"):
                return ln[:400]
    return (lines[-1] if lines else message)[:400]


def _import_ops() -> None:
    """Each op's module defines its schema on import; the kernels register against them."""
    for op in OPS:
        importlib.import_module(f"{__package__}.{op}")


def compile_extension(kind: str, directory: Path, verbose: bool = False) -> None:
    """Compile and load extension `kind` ('cpu' or 'cuda') from the sources beside this file; the build
    becomes `directory` when it is complete. Loading the shared library registers its kernels for the
    ``p2pz`` ops.

    Concurrent processes take turns on a file lock beside `directory`: the first builds, the others then
    find it. Each build has a fresh temporary directory (cpp_extension's own lock inside it is never
    shared), renamed into place at the end; one that a killed build left behind is removed.
    """
    from filelock import FileLock
    from torch.utils import cpp_extension

    _import_ops()
    directory.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(directory) + ".lock"):
        if directory.is_dir():  # another process built it meanwhile
            torch.ops.load_library(str(library_path(kind, directory)))
            return
        for stale in directory.parent.glob(directory.name + ".tmp-*"):  # only a killed build leaves one
            shutil.rmtree(stale, ignore_errors=True)
        scratch = directory.parent / f"{directory.name}.tmp-{os.getpid()}-{secrets.token_hex(4)}"
        scratch.mkdir()  # with the umask's mode (mkdtemp's 0700 would hide a shared cache's builds)
        try:
            cpp_extension.load(
                name=f"p2pz_ops_{kind}",
                sources=[str(SOURCE_DIR / s) for s in sources(kind)],
                extra_include_paths=[str(SOURCE_DIR)],
                extra_cflags=CPU_CFLAGS if kind == "cpu" else None,
                extra_cuda_cflags=CUDA_CFLAGS if kind == "cuda" else None,
                build_directory=str(scratch),
                with_cuda=kind == "cuda",
                is_python_module=False,
                verbose=verbose,
            )
            os.replace(scratch, directory)
        finally:
            shutil.rmtree(scratch, ignore_errors=True)


def _load(kind: str) -> bool:
    """Load extension `kind`, building it first unless it is on disk; False (and the cause kept for
    :func:`build_error`) if it cannot be had in this process. Tried once per process."""
    state = _state.get(kind)
    if state is not None:
        return state == "loaded"
    with _lock:
        if kind in _state:
            return _state[kind] == "loaded"
        try:
            if kind == "cuda" and not torch.cuda.is_available():
                raise RuntimeError("no CUDA device is available")
            directory = build_dir(kind)
            if directory.is_dir():  # complete (it appears by rename): load it as it is, no lock, no writes
                _import_ops()
                torch.ops.load_library(str(library_path(kind, directory)))
            else:
                compile_extension(kind, directory)
            _state[kind] = "loaded"
        except Exception as e:  # noqa: BLE001 -- any failure means: these kernels are not to be had
            _state[kind] = "failed"
            _errors[kind] = _compiler_error_line(str(e)) if str(e) else type(e).__name__
    return _state[kind] == "loaded"


def build_error(kind: str) -> str | None:
    """Why extension `kind` could not be had in this process (one line), or None."""
    return _errors.get(kind) if _state.get(kind) == "failed" else None


class OpsUnavailableError(UserError):
    """The compiled kernels were asked for explicitly and cannot be built or loaded here."""


def require_extension(kind: str, requested_by: str) -> None:
    """Load extension `kind` or raise :class:`OpsUnavailableError` naming the cause and the request."""
    if not _load(kind):
        raise OpsUnavailableError(
            f"p2pz ops: {requested_by} asks for the {kind.upper()} kernels, which cannot be built here "
            f"({build_error(kind)}); use {ENV_VAR}=ref (the reference ops) or leave the choice automatic"
        )


def load_extension(kind: str) -> bool:
    """Build (once, cached on disk) and load extension `kind`; False if it cannot be had in this process,
    with one warning per process that the reference ops run instead (none for CUDA without a GPU)."""
    if _load(kind):
        return True
    if kind not in _warned and not (kind == "cuda" and not torch.cuda.is_available()):
        _warned.add(kind)
        warnings.warn(
            f"p2pz ops: building the {kind.upper()} kernels failed ({build_error(kind)}); "
            f"using the slow reference implementation instead. Set {ENV_VAR}=ref to silence this, "
            f"or {ENV_VAR}={kind} to make it an error.",
            RuntimeWarning,
            stacklevel=3,
        )
    return False
