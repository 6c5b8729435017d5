"""One command to check the real-size GPU path, in two parts of at most 5 minutes each on one GPU.

    python benchmarks/gpu_check.py --part 1                       # kernels, teacher: gpu-check-part1.json
    python benchmarks/gpu_check.py --part 2                       # the student's training path
    python benchmarks/gpu_check.py --device cpu --small --part 1  # toy sizes on the CPU (the tests)

**This script has never run on a GPU** (no GPU was lent while it was written): the 5-minute sizing
of each part on an H100 is an estimate, and its ``--device cpu --small`` mode is what the test suite
runs. Whoever first runs it on a GPU: remove this sentence and put the JSON files in the issue.

Part 1, the kernels and the teacher:

* ``versions``: torch, CUDA, cuDNN, the driver, nvcc, torch's arch list, TORCH_CUDA_ARCH_LIST, the GPU's
  capability and the CPU (informational).
* ``ops``: the compiled ``bias_act`` and ``upfirdn2d`` (``impl`` = the device) against the float64
  reference: forward, first- and second-order gradients, fp32 / fp16 / bf16; up 2, down 2 and the
  filter-only case (up 1, down 1, a 4x4 filter).
* ``opcheck``: ``torch.library.opcheck`` of every operator on the device.
* ``stream``: the CUDA kernels on a non-default stream equal the default stream's result (cuda only).
* ``ops_tests``: ``pytest tests/test_ops_cuda.py`` (its GPU tests; all skipped on the CPU).
* ``teacher``: the random real-size SD-1.4 teacher edits one 512 px image in fp32, fp16 and bf16
  (the CPU: fp32, bf16): finite, and each close to fp32's edit; times and peak memory.
* ``teacher_batch``: the teacher at ``p2pz generate``'s default batch in its dtype there (fp16 on cuda):
  pairs/s and peak memory.
* ``generate``: a small ``p2pz generate`` on the device: pairs/s from its manifest.

Part 2, the student (each step needs the one before it):

* ``train``: ``p2pz train fit --config configs/sd14-512.yaml`` (``comod``, 512 px, bf16-mixed) for 20
  iterations on synthetic pair shards, the CSV logger named on the command line (its metrics.csv is
  read back): the logged losses must be finite.
* ``resume``: the same run from its ``last.ckpt`` on the device, 4 iterations further.
* ``compile``: ``torch.compile`` of the 512 px ``comod`` generator against eager.
* ``export``: ``p2pz export`` of ``last.ckpt`` (safetensors, ``.pt2``, ONNX).
* ``bench``: ``p2pz bench`` of the package on the device (eager and ``.pt2``), the teacher with 3 steps.

Every check runs in its own subprocess (its output in ``WORK/logs/NAME.log``), all under one deadline
(``--deadline``, default 290 s a part; 1200 s on the CPU): a check still running then is killed and
the ones after it are recorded as not run. The JSON file (``--out``) is rewritten after every check:
``{"device", "part", "small", "checks": {name: {"pass": bool | None, "seconds": s, ...}},
"all_passed", "finished", "seconds"}`` (``pass`` None: not applicable on this device); the last line
printed is the same object. The work folder (``--work``) is kept for inspection. Without a CUDA
device (and without ``--device cpu``) it says so, prints ``{"cuda_available": false}`` and exits 0.
Exit status 1 when a check fails.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
import traceback
from pathlib import Path
from typing import Any

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))  # the check modules beside this file, also when imported from elsewhere

PARTS = {
    "1": ("versions", "ops", "opcheck", "stream", "ops_tests", "teacher", "teacher_batch", "generate"),
    "2": ("train", "resume", "compile", "export", "bench"),
}
CHECKS = PARTS["1"] + PARTS["2"]
NEEDS = {"resume": "train", "export": "train", "bench": "export"}  # a check -> the one it builds on
DEADLINE_PER_PART = 290.0  # seconds: 5 minutes a call, less the start of the interpreter
CPU_DEADLINE_PER_PART = 1200.0  # the toy sizes on a small shared CPU: the 5 minutes are a GPU's
MIN_SECONDS = 5.0  # a check is not started with less than this left


class Sizes:
    """What the checks run at: the real sizes on a GPU, toy ones for ``--small``."""

    def __init__(self, small: bool) -> None:
        from p2pz.data.pairs.settings import Settings

        self.small = small
        self.bias_act_shape = (2, 8, 8, 8) if small else (4, 512, 64, 64)
        self.upfirdn_shape = (2, 4, 8, 8) if small else (4, 256, 128, 128)
        self.architecture = "tiny" if small else "sd14"
        self.teacher_steps = 2 if small else 3
        self.teacher_batch = 2 if small else Settings.batch_size  # p2pz generate's default
        self.generate_images = 2 if small else 4
        self.train_steps = 2 if small else 20
        self.resume_steps = 2 if small else 4
        self.train_overrides = (
            ["--model.resolution", "64", "--model.preset", "lite", "--data.batch_size", "2"] if small else []
        )
        self.bench_batches = "1" if small else "1,4"
        self.bench_backends = "eager,pt2,onnx" if small else "eager,pt2"


class Context:
    """What a check gets: the device, the sizes, the work folder and the seconds left to the deadline."""

    def __init__(self, device: torch.device, small: bool, work: Path, deadline: float) -> None:
        self.device, self.sizes, self.work, self.deadline = device, Sizes(small), work, deadline

    def seconds_left(self) -> float:
        return max(1.0, self.deadline - time.time())


def check_function(name: str) -> Any:
    """The function of check ``name``, from the module that holds it."""
    import gpu_check_kernels
    import gpu_check_models

    module = gpu_check_kernels if hasattr(gpu_check_kernels, f"check_{name}") else gpu_check_models
    return getattr(module, f"check_{name}")


# ------------------------------------------------------------------------------------------------
# One check, in its own process


def run_child(name: str, ctx: Context, result: Path) -> int:
    """Run check ``name`` in this process and write its report to ``result`` (an exception fails it)."""
    try:
        report = check_function(name)(ctx)
    except Exception as err:  # noqa: BLE001 -- a crash is a failed check, reported like the others
        report = {"pass": False, "error": f"{type(err).__name__}: {err}", "traceback": traceback.format_exc()}
    result.write_text(json.dumps(report, default=str))
    return 0


def _tail(log: Path, chars: int = 2000) -> str:
    return log.read_text(errors="replace")[-chars:] if log.is_file() else ""


def run_isolated(name: str, args: argparse.Namespace, work: Path, deadline: float) -> dict[str, Any]:
    """Check ``name`` in a subprocess (its own session: killed with its children at the deadline)."""
    logs = work / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    log, result = logs / f"{name}.log", logs / f"{name}.json"
    result.unlink(missing_ok=True)
    command = [sys.executable, str(Path(__file__).resolve()), "--child", name, "--result", str(result)]
    command += ["--device", args.device, "--work", str(work), "--deadline-at", str(deadline)]
    command += ["--small"] if args.small else []
    with log.open("w") as out:
        proc = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            proc.wait(timeout=max(1.0, deadline - time.time()))
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            return {"pass": False, "error": "killed at the deadline", "output_tail": _tail(log)}
    if not result.is_file():
        return {
            "pass": False,
            "error": f"its process exited with status {proc.returncode}",
            "output_tail": _tail(log),
        }
    return json.loads(result.read_text())


# ------------------------------------------------------------------------------------------------
# The run: every check of the part, the JSON file after each


def write_json(report: dict[str, Any], out: Path) -> None:
    from p2pz.utils.atomic import atomic_path

    with atomic_path(out, suffix=".json") as tmp:
        tmp.write_text(json.dumps(report, indent=2, default=str) + "\n")


def _skip_reason(name: str, results: dict[str, Any], deadline: float) -> str | None:
    needed = NEEDS.get(name)
    if needed in results and not results[needed]["pass"]:
        return f"not run: {needed} did not pass"
    if deadline - time.time() < MIN_SECONDS:
        return "not run: the deadline was reached"
    return None


def run_checks(args: argparse.Namespace, names: list[str], work: Path, out: Path) -> dict[str, Any]:
    start = time.time()
    deadline = start + args.deadline
    device = torch.device(args.device)
    results: dict[str, Any] = {}
    report = {
        "device": args.device if device.type == "cuda" else f"cpu ({os.cpu_count()} cores)",
        "part": args.part or "1,2",
        "small": args.small,
        "deadline_s": args.deadline,
        "work": str(work),
        "checks": results,
        "all_passed": None,
        "finished": False,
        "seconds": 0.0,
    }
    write_json(report, out)
    for name in names:
        began = time.time()
        why = _skip_reason(name, results, deadline)
        results[name] = {"pass": False, "error": why} if why else run_isolated(name, args, work, deadline)
        results[name]["seconds"] = round(time.time() - began, 2)
        state = {True: "pass", False: "FAIL", None: "not applicable"}[results[name]["pass"]]
        print(f"{name}: {state} ({results[name]['seconds']:.1f} s)", flush=True)
        report["seconds"] = round(time.time() - start, 2)
        report["all_passed"] = all(r["pass"] is not False for r in results.values())
        report["finished"] = name == names[-1]
        write_json(report, out)
    return report


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0]
        + " Part 1: versions, ops (+ filter-only), opcheck, a non-default stream, tests/test_ops_cuda.py,"
        " the teacher in fp32/fp16/bf16 and at the production batch, a small p2pz generate. Part 2: train,"
        " resume from last.ckpt, torch.compile of the generator, export, bench. See docs/gpu-check.md."
    )
    parser.add_argument("--device", default=None, help="cuda (default when present) or cpu")
    parser.add_argument("--small", action="store_true", help="toy sizes (the CPU test of this script)")
    parser.add_argument(
        "--part",
        choices=sorted(PARTS),
        default=None,
        help="1: kernels and teacher; 2: the student's train, resume, compile, export, bench "
        "(default: both, one after the other)",
    )
    parser.add_argument(
        "--out", default=None, help="JSON file, rewritten after every check (default: gpu-check-partN.json)"
    )
    parser.add_argument(
        "--work",
        default=None,
        help="folder for the models, shards, run, package and logs (default: gpu-check-work)",
    )
    parser.add_argument(
        "--deadline",
        type=float,
        default=None,
        help=f"seconds for all the checks together (default: {DEADLINE_PER_PART:.0f} per part on cuda, "
        f"{CPU_DEADLINE_PER_PART:.0f} on the CPU)",
    )
    parser.add_argument(
        "--skip", default="", help=f"comma-separated checks to leave out, of {','.join(CHECKS)}"
    )
    for hidden in ("--child", "--result", "--deadline-at"):  # a check's own process
        parser.add_argument(hidden, default=None, help=argparse.SUPPRESS)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    skip = [s for s in args.skip.split(",") if s]
    if set(skip) - set(CHECKS):
        parser.error(f"unknown checks {sorted(set(skip) - set(CHECKS))}; choose from {', '.join(CHECKS)}")
    if args.device is None and not torch.cuda.is_available():
        print("no CUDA device found: nothing checked (run with --device cpu --small to test this script)")
        print(json.dumps({"cuda_available": False}))
        return 0
    args.device = args.device or "cuda"
    work = Path(args.work or "gpu-check-work").resolve()
    work.mkdir(parents=True, exist_ok=True)
    if args.child:
        ctx = Context(torch.device(args.device), args.small, work, float(args.deadline_at))
        return run_child(args.child, ctx, Path(args.result))
    parts = [args.part] if args.part else sorted(PARTS)
    names = [n for part in parts for n in PARTS[part] if n not in skip]
    per_part = DEADLINE_PER_PART if torch.device(args.device).type == "cuda" else CPU_DEADLINE_PER_PART
    args.deadline = args.deadline or per_part * len(parts)
    out = Path(args.out or (f"gpu-check-part{args.part}.json" if args.part else "gpu-check.json"))
    report = run_checks(args, names, work, out)
    print(json.dumps(report, default=str))
    return 0 if report["all_passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
