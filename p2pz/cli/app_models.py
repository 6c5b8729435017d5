"""The students ``p2pz app`` serves: found once, loaded once, run in micro-batches.

:func:`load_package` is the one place a package is read (through :mod:`p2pz.student.package`, as
``p2pz apply`` reads it);
:class:`StudentRunner` owns the model calls (one thread of the app's process; with several workers,
``app_workers.ProcessRunner`` in processes of their own): requests queue up while a batch runs and
the next batch takes every waiting request of one model (at most ``max_batch``), so concurrent users
share the forward passes instead of taking turns, and a single user waits for no window.
"""

from __future__ import annotations

import os
import queue
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from p2pz.utils.errors import UserError

CARD = "README.md"


def load_package(path: str | os.PathLike, device: str, dtype: Any) -> tuple[Any, dict[str, Any]]:
    """An exported student package -> (model, config): the eager student, strictly loaded from
    safetensors, so that reading it runs no code from it."""
    from p2pz.student.package import load_package as load

    package = load(path, device=device, dtype=dtype)
    return package.student, package.config


def find_packages(paths: list[str], models_dir: str | None) -> list[Path]:
    """The packages given (folders or Hub repo ids, resolved to their local folder), then every package
    folder (one holding config.json) inside ``models_dir``."""
    from p2pz.student.package import resolve_package

    found = [resolve_package(p) for p in paths]
    if models_dir is not None:
        root = Path(models_dir)
        if not root.is_dir():
            raise UserError(f"--models-dir {models_dir} is not a folder; give the folder that holds packages")
        found += sorted(p.parent for p in root.glob("*/config.json"))
        if (root / "config.json").is_file():
            found.append(root)
    if not found:
        raise UserError("no student to serve; give a package folder (p2pz export) or --models-dir DIR")
    unique: dict[Path, None] = {}
    for path in found:
        unique.setdefault(path.resolve(), None)
    return list(unique)


def edit_name(config: dict[str, Any], folder: Path) -> str:
    """The package's edit as people write it (``circle:square``), else the folder's name."""
    edit = (config.get("data") or {}).get("edit") or config.get("edit")
    if isinstance(edit, dict) and edit.get("source") and edit.get("target"):
        return f"{edit['source']}:{edit['target']}"
    if isinstance(edit, str) and edit:
        return edit
    return folder.name


@dataclass
class Student:
    """One served package: its model, config and what the page lists about it."""

    id: str
    folder: Path
    model: Any
    config: dict[str, Any]
    edit: str
    metrics: dict[str, Any] = field(default_factory=dict)
    card: str | None = None

    @property
    def resolution(self) -> int:
        return int(self.config["resolution"])

    def listing(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "edit": self.edit,
            "resolution": self.resolution,
            "metrics": self.metrics,
            "has_card": self.card is not None,
            "folder": self.folder.name,
        }


def load_students(folders: list[Path], device: str, dtype: Any) -> dict[str, Student]:
    """Every package loaded once, keyed by a short id (``0``, ``1`` ...) in the order given (a package of
    many edits: one entry per edit)."""
    from p2pz.student.export import bind_edit
    from p2pz.student.package import edit_conditioning_of, package_edits

    students = {}
    for folder in folders:
        model, config = load_package(folder, device, dtype)
        card_path = folder / CARD
        card = card_path.read_text(errors="replace")[:20_000] if card_path.is_file() else None
        metrics = config.get("metrics") if isinstance(config.get("metrics"), dict) else {}
        # a student of many edits is listed once per edit, each with its edit bound
        edits = package_edits(config)
        choices = (
            [(f"{e['source']}:{e['target']}", bind_edit(model, edit_conditioning_of(config, name).to(device)))
             for name, e in edits.items()]
            if edits
            else [(edit_name(config, folder), model)]
        )  # fmt: skip
        for edit, bound in choices:
            key = str(len(students))
            students[key] = Student(key, folder, bound, config, edit, _flat(metrics), card)
    return students


def _flat(metrics: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested metrics as ``a.b: value`` pairs of numbers and short strings (what a table shows)."""
    flat: dict[str, Any] = {}
    for key, value in metrics.items():
        if isinstance(value, dict):
            flat.update(_flat(value, f"{prefix}{key}."))
        elif isinstance(value, (int, float, str, bool)) and len(str(value)) <= 80:
            flat[f"{prefix}{key}"] = value
    return flat


def take_batch(
    source: Any, held: list[Any], max_batch: int, model_of: Callable[[Any], Any]
) -> tuple[list[Any], list[Any], bool]:
    """The next batch: the first waiting request (``held`` first, else blocking on ``source``, a queue) and
    every request of the same model that is waiting too, at most ``max_batch``; a ``None`` in the queue
    means close. Returns (batch, the requests of other models held for later, closing)."""
    first = held.pop(0) if held else source.get()
    if first is None:
        return [], held, True
    batch, later, closing = [first], [], False
    for request in held:
        same = model_of(request) == model_of(first) and len(batch) < max_batch
        (batch if same else later).append(request)
    while len(batch) < max_batch:
        try:
            request = source.get_nowait()
        except queue.Empty:
            break
        if request is None:
            closing = True
            break
        (batch if model_of(request) == model_of(first) else later).append(request)
    return batch, later, closing


def _student_of(request: _Request) -> str:
    return request.student.id


@dataclass
class _Request:
    student: Student
    image: Any
    future: Future


class StudentRunner:
    """One thread runs every student call; waiting requests of one model go through together."""

    def __init__(self, device: str, dtype: Any, max_batch: int = 16):
        self.device, self.dtype, self.max_batch = device, dtype, max_batch
        self._queue: queue.Queue[_Request | None] = queue.Queue()
        self._held: list[_Request] = []  # taken from the queue for another model: first in the next batch
        self._closing = False
        self._thread = threading.Thread(target=self._loop, name="p2pz-app-student", daemon=True)
        self._thread.start()

    def submit(self, student: Student, image: Any) -> Future:
        """A future of (edited PIL image, model milliseconds for its batch, batch size)."""
        future: Future = Future()
        self._queue.put(_Request(student, image, future))
        return future

    def close(self) -> None:
        self._queue.put(None)
        self._thread.join(timeout=10)

    def _loop(self) -> None:
        while not self._closing:
            batch = self._next_batch()
            if batch:
                self._run(batch)

    def _next_batch(self) -> list[_Request]:
        batch, self._held, self._closing = take_batch(self._queue, self._held, self.max_batch, _student_of)
        return batch

    def _run(self, batch: list[_Request]) -> None:
        try:
            edited, model_ms = edit_batch(batch[0].student, [r.image for r in batch], self.device, self.dtype)
        except Exception as err:  # a failed call fails its requests, never the thread
            for request in batch:
                request.future.set_exception(err)
            return
        for request, image in zip(batch, edited):
            request.future.set_result((image, model_ms, len(batch)))


def edit_batch(student: Student, images: list[Any], device: str, dtype: Any) -> tuple[list[Any], float]:
    """One student call on a batch of images, as ``p2pz apply`` makes it: (edited images, milliseconds)."""
    from p2pz.student.export import apply_to_images

    started = time.perf_counter()
    edited = apply_to_images(
        student.model, student.resolution, images, batch_size=len(images), device=device, dtype=dtype
    )
    return edited, (time.perf_counter() - started) * 1000
