"""``p2pz app``: a web page to drop a photo in and see the student's edit, the teacher's beside it.

The server is FastAPI + uvicorn with one hand-written page (``app_page.html``), installed by the
``[app]`` extra; the pieces: ``app_uploads`` (what an upload may be), ``app_models`` (the students,
loaded once, run in micro-batches), ``app_teacher`` (the teacher's own queue), ``app_server`` (routes).
"""

from __future__ import annotations

import argparse

from p2pz.cli.options import add_device, add_dtype
from p2pz.utils.errors import UserError
from p2pz.utils.values import int_at_least, positive_float, positive_int

DEFAULT_PORT = 7860
MAX_AUTO_WORKERS = 4


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "app",
        help="a web page that edits photos with exported students (and the teacher beside them)",
        description=(
            "Serve a page where a photo (upload, drop, paste or webcam) is edited by an exported student "
            "in one pass, shown beside the input with its latency, read as 'p2pz apply' reads it "
            "(centre square, resized). With --teacher the pix2pix-zero edit of the same image runs "
            "beside it, one at a time. Binds to 127.0.0.1 unless --host says otherwise; writes no "
            "file. Needs the app extra: pip install 'p2pz-distill[app]'. Example:\n"
            "  p2pz app demo_out/model --teacher data/toy_model"
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("packages", nargs="*", metavar="PACKAGE", help="exported student folders (p2pz export)")
    p.add_argument("--models-dir", metavar="DIR", help="also serve every package folder inside DIR")
    p.add_argument(
        "--teacher", metavar="MODEL", help="teacher model to run beside the student (default: none)"
    )
    p.add_argument(
        "--teacher-steps",
        type=int_at_least(2),
        default=None,
        help="the teacher's DDIM steps (default: the ones recorded in the package, else its preset's)",
    )
    p.add_argument(
        "--host",
        default="127.0.0.1",
        help="address to listen on (default: 127.0.0.1, this machine only; 0.0.0.0 opens it to the network)",
    )
    p.add_argument("--port", type=positive_int, default=DEFAULT_PORT, help=f"port (default: {DEFAULT_PORT})")
    p.add_argument(
        "--max-megapixels",
        type=positive_float,
        default=40.0,
        help="largest upload in megapixels (default: 40; Pillow's decompression-bomb guard stays on)",
    )
    p.add_argument(
        "--max-upload-mb", type=positive_float, default=25.0, help="largest upload in MB (default: 25)"
    )
    p.add_argument(
        "--max-batch",
        type=positive_int,
        default=16,
        help="most concurrent requests the student calls take together, shared out between the workers "
        "(default: 16)",
    )
    p.add_argument(
        "--workers",
        type=positive_int,
        default=None,
        help="student workers: with more than one, each is a process of its own that runs student calls "
        "on its share of the CPU cores, beside the others (default: on a CPU one per core, at most "
        f"{MAX_AUTO_WORKERS}; on a GPU one, in the app's process)",
    )
    add_device(p)
    add_dtype(p, what="the students and the teacher")
    p.set_defaults(func=cmd_app)


def build_state(args: argparse.Namespace) -> object:
    """The students loaded, the runner started and the teacher (with --teacher) loaded: the app's state."""
    from p2pz.cli.app_models import StudentRunner, find_packages, load_students
    from p2pz.cli.app_server import AppState
    from p2pz.utils.devices import resolve_device, torch_dtype

    device, dtype = resolve_device(args.device), torch_dtype(args.dtype)
    folders = find_packages(args.packages, args.models_dir)
    students = load_students(folders, device, dtype)
    workers, threads = share_cores(device, args.workers)
    if workers > 1:
        from p2pz.cli.app_workers import ProcessRunner

        runner = ProcessRunner(folders, device, dtype, args.max_batch, workers, threads)
    else:
        runner = StudentRunner(device, dtype, args.max_batch)
        warm_up(runner, students.values())
    teacher = None
    if args.teacher:
        from p2pz.cli.app_teacher import TeacherQueue, recorded_preset

        preset = recorded_preset(next(iter(students.values())).config)
        teacher = TeacherQueue(args.teacher, device, dtype, preset, args.teacher_steps)
    return AppState(
        students,
        runner,
        teacher,
        max_upload_mb=args.max_upload_mb,
        max_megapixels=args.max_megapixels,
    )


def share_cores(device: str, workers: int | None) -> tuple[int, int]:
    """(student workers, torch threads in each): on a CPU, one worker per core (at most
    ``MAX_AUTO_WORKERS``) with the cores shared out; on a GPU one worker, which runs in the app's process.

    A small student barely gains from a second core in one call, while worker processes of one core each
    serve more images per second than one worker on all of them (measured: ``docs/results/app.md``).
    """
    import torch

    if not str(device).startswith("cpu"):
        return workers or 1, torch.get_num_threads()
    cores = torch.get_num_threads()
    workers = workers or max(1, min(cores, MAX_AUTO_WORKERS))
    return workers, max(1, cores // workers)


def warm_up(runner: object, students: object) -> None:
    """One call per student before the page opens: the first call builds the ops' kernels (a minute on
    a fresh machine), which no user should wait for."""
    from PIL import Image

    for student in students:
        runner.submit(student, Image.new("RGB", (student.resolution,) * 2, (128, 128, 128))).result()


def cmd_app(args: argparse.Namespace) -> int:
    try:
        import uvicorn

        from p2pz.cli.app_server import create_app
    except ImportError as err:
        raise UserError(
            f"p2pz app needs the app extra ({err.name} is missing): pip install 'p2pz-distill[app]'"
        ) from None
    state = build_state(args)
    listing = ", ".join(f"{s.edit} ({s.folder})" for s in state.students.values())
    print(f"serving {listing}" + (f"; teacher {args.teacher}" if args.teacher else ""))
    print(f"open http://{args.host}:{args.port}/ (Ctrl+C stops it)", flush=True)
    try:
        uvicorn.run(create_app(state), host=args.host, port=args.port, log_level="warning")
    finally:
        state.runner.close()
    return 0
