"""Student workers in processes of their own: how ``p2pz app`` uses a CPU of several cores.

Python threads share one interpreter lock, and a student's forward pass is a few hundred small calls
that each give it up and take it back, so threads running the student beside the HTTP server slow
each other down instead of using more cores. A worker process has its own interpreter, its
copy of the students (loaded from the same packages, strictly, as ``p2pz apply`` loads them) and its
share of the cores. The queue and the batching rule are :class:`~p2pz.cli.app_models.StudentRunner`'s:
a free worker takes every waiting request of one model, at most ``max_batch``. Measured:
``docs/results/app.md``.

Requests travel as the model-sized image (the app crops and resizes before sending), results as the
edited 8-bit image. A worker that dies fails the requests in flight with one message, and the app
keeps answering (every later edit gets the same message) instead of hanging.
"""

from __future__ import annotations

import itertools
import multiprocessing
import os
import queue
import threading
import time
from concurrent.futures import Future
from pathlib import Path
from typing import Any

from p2pz.cli.app_models import Student, edit_batch, load_students, take_batch
from p2pz.utils.errors import UserError

START_TIMEOUT_S = 600  # loading torch and the students, then one warm-up call each, on a busy machine
POLL_S = 0.5


class ProcessRunner:
    """``StudentRunner``'s interface (``submit``, ``close``) over ``workers`` processes."""

    def __init__(
        self,
        folders: list[Path],
        device: str,
        dtype: Any,
        max_batch: int = 16,
        workers: int = 2,
        threads: int = 1,
    ):
        context = multiprocessing.get_context("spawn")  # never fork a process that runs torch threads
        self._inbox = context.Queue()
        self._outbox = context.Queue()
        taking = context.Lock()  # one worker at a time builds its batch
        self._futures: dict[int, Future] = {}
        self._lock = threading.Lock()
        self._ids = itertools.count()
        self._broken: str | None = None
        self._closing = False
        # the waiting requests shared out: one worker taking all 16 while the other idles doubles the wait
        per_worker = -(-max_batch // workers)
        args = (list(folders), device, dtype, per_worker, threads, self._inbox, self._outbox, taking)
        self._processes = [
            context.Process(target=_worker, args=args, name=f"p2pz-app-student-{i}", daemon=True)
            for i in range(workers)
        ]
        for process in self._processes:
            process.start()
        self._wait_until_ready()
        self._reader = threading.Thread(target=self._read_results, name="p2pz-app-results", daemon=True)
        self._reader.start()

    def submit(self, student: Student, image: Any) -> Future:
        """A future of (edited PIL image, model milliseconds for its batch, batch size)."""
        future: Future = Future()
        with self._lock:
            if self._broken is not None:
                future.set_exception(RuntimeError(self._broken))
                return future
            request_id = next(self._ids)
            self._futures[request_id] = future
        self._inbox.put((request_id, student.id, image))
        return future

    def close(self) -> None:
        if self._closing:
            return
        self._closing = True
        for _ in self._processes:
            self._inbox.put(None)
        for process in self._processes:
            process.join(timeout=10)
            if process.is_alive():
                process.terminate()
        self._fail_all("the app is closing")

    def _wait_until_ready(self) -> None:
        """Every worker's "ready", else stop them all and say why in one line."""
        ready, deadline = 0, time.monotonic() + START_TIMEOUT_S
        while ready < len(self._processes):
            try:
                kind, message = self._outbox.get(timeout=POLL_S)
            except queue.Empty:
                dead = [p for p in self._processes if not p.is_alive()]
                if not dead and time.monotonic() < deadline:
                    continue
                kind = "failed"
                message = f"exit code {dead[0].exitcode}" if dead else f"no answer in {START_TIMEOUT_S} s"
            if kind != "ready":
                for process in self._processes:
                    process.terminate()
                raise UserError(f"a student worker did not start ({message}); try --workers 1")
            ready += 1

    def _read_results(self) -> None:
        checked = time.monotonic()
        while not self._closing:
            try:
                message = self._outbox.get(timeout=POLL_S)
            except queue.Empty:
                message = None
            if time.monotonic() - checked >= POLL_S:  # busy or not, look for a worker that died
                checked = time.monotonic()
                dead = [p for p in self._processes if not p.is_alive()]
                if dead and not self._closing:
                    self._break(f"a student worker stopped (exit code {dead[0].exitcode}); restart the app")
            if message is not None:
                self._resolve(*message)

    def _resolve(self, kind: str, request_id: int, *result: Any) -> None:
        with self._lock:
            future = self._futures.pop(request_id, None)
        if future is None:
            return
        if kind == "done":
            future.set_result(tuple(result))
        else:
            future.set_exception(RuntimeError(result[0]))

    def _break(self, why: str) -> None:
        with self._lock:
            self._broken = why
        self._fail_all(why)

    def _fail_all(self, why: str) -> None:
        with self._lock:
            pending, self._futures = self._futures, {}
        for future in pending.values():
            if not future.done():
                future.set_exception(RuntimeError(why))


def _worker(
    folders: list[Path],
    device: str,
    dtype: Any,
    max_batch: int,
    threads: int,
    inbox: Any,
    outbox: Any,
    taking: Any,
) -> None:
    """One worker process: load the students, warm each up, then serve batches until a ``None``."""
    import torch
    from PIL import Image

    _end_with_the_app()
    torch.set_num_threads(threads)
    try:
        students = load_students(folders, device, dtype)
        for student in students.values():  # the first call builds the kernels: before any user waits
            edit_batch(student, [Image.new("RGB", (student.resolution,) * 2)], device, dtype)
    except Exception as err:  # reported to the app, which stops with it
        outbox.put(("failed", f"{type(err).__name__}: {err}"))
        return
    outbox.put(("ready", None))
    held: list[Any] = []
    closing = False
    while not closing:
        with taking:
            batch, held, closing = take_batch(inbox, held, max_batch, _model_of)
        if batch:
            _serve(students[batch[0][1]], batch, device, dtype, outbox)


def _end_with_the_app() -> None:
    """End this worker as soon as the app's process ends, however it ends: a SIGKILL, or uvicorn
    re-raising SIGTERM after its shutdown, runs no cleanup, and a worker waiting on the queue would
    otherwise live on (the queue's other end stays open in the worker itself)."""
    parent = multiprocessing.parent_process()
    if parent is not None:
        threading.Thread(target=lambda: (parent.join(), os._exit(0)), daemon=True).start()


def _model_of(request: tuple[int, str, Any]) -> str:
    return request[1]


def _serve(student: Student, batch: list[Any], device: str, dtype: Any, outbox: Any) -> None:
    try:
        edited, model_ms = edit_batch(student, [image for _, _, image in batch], device, dtype)
    except Exception as err:  # a failed call fails its requests, never the worker
        for request_id, _, _ in batch:
            outbox.put(("error", request_id, f"{type(err).__name__}: {err}"))
        return
    for (request_id, _, _), image in zip(batch, edited):
        outbox.put(("done", request_id, image, model_ms, len(batch)))
