"""The teacher beside the student in ``p2pz app``: pix2pix-zero edits, slow, one at a time, own thread.

Jobs wait in their own queue (concurrency 1), so a student request never waits behind one. Progress and
cancellation come from a forward pre-hook on the teacher's UNet: each UNet call counts towards the
job's total (learnt from the previous job; a first guess before any), and a cancelled job stops at its
next UNet call.
"""

from __future__ import annotations

import itertools
import queue
import threading
import time
from dataclasses import dataclass, field
from typing import Any

from p2pz.utils.errors import UserError

MAX_KEPT_JOBS = 64  # finished jobs kept for their page to fetch; older ones are forgotten


class Cancelled(Exception):
    """Raised inside the UNet's hook to stop a cancelled job."""


@dataclass
class TeacherJob:
    id: str
    student: Any  # app_models.Student: the edit and the teacher settings recorded with it
    image: Any
    state: str = "queued"  # queued, running, done, cancelled, error
    calls: int = 0
    expected_calls: int = 1
    result: Any = None
    message: str = ""
    seconds: float = 0.0
    cancel: threading.Event = field(default_factory=threading.Event)

    def status(self, position: int) -> dict[str, Any]:
        progress = 1.0 if self.state == "done" else min(0.99, self.calls / max(1, self.expected_calls))
        return {
            "id": self.id,
            "state": self.state,
            "progress": round(progress, 3),
            "queue_position": position,
            "message": self.message,
            "seconds": round(self.seconds, 2),
        }


def recorded_preset(config: dict[str, Any]) -> str | None:
    """The teacher preset a package's training pairs were made with, if it records one."""
    preset = ((config.get("data") or {}).get("teacher") or {}).get("preset")
    return preset if isinstance(preset, str) else None


def teacher_settings(config: dict[str, Any]) -> dict[str, Any]:
    """The edit call's settings recorded in a package (steps, guidance), the preset's where none are."""
    teacher = (config.get("data") or {}).get("teacher") or {}
    overrides = teacher.get("overrides") or {}
    return {k: overrides[k] for k in ("num_steps", "xa_guidance", "guidance_scale") if k in overrides}


class TeacherQueue:
    """pix2pix-zero edits on one thread, in order; :meth:`submit`, :meth:`status`, :meth:`cancel`."""

    def __init__(self, model: str, device: str, dtype: Any, preset: str | None, num_steps: int | None = None):
        from p2pz.teacher.pipeline import Pix2PixZero

        preset = preset or ("box_edges" if _is_world_model(model) else "official")
        self.teacher = Pix2PixZero.from_pretrained(model, preset=preset, device=device, dtype=dtype)
        self.model, self.num_steps = model, num_steps
        self._directions: dict[str, Any] = {}
        self._jobs: dict[str, TeacherJob] = {}
        self._waiting: queue.Queue[TeacherJob] = queue.Queue()
        self._running: TeacherJob | None = None
        self._calls_per_step: float | None = None  # learnt from each finished job
        self._ids = itertools.count(1)
        self._lock = threading.Lock()
        self.teacher.unet.register_forward_pre_hook(self._on_unet_call)
        threading.Thread(target=self._loop, name="p2pz-app-teacher", daemon=True).start()

    def submit(self, student: Any, image: Any) -> TeacherJob:
        job = TeacherJob(str(next(self._ids)), student, image)
        with self._lock:
            self._jobs[job.id] = job
            for old in list(self._jobs)[:-MAX_KEPT_JOBS]:
                self._jobs.pop(old)
        self._waiting.put(job)
        return job

    def status(self, job_id: str) -> dict[str, Any] | None:
        with self._lock:
            job = self._jobs.get(job_id)
            if job is None:
                return None
            ahead = [j for j in self._jobs.values() if j.state == "queued" and int(j.id) < int(job.id)]
            return job.status(len(ahead) if job.state == "queued" else 0)

    def result(self, job_id: str) -> Any:
        job = self._jobs.get(job_id)
        return None if job is None else job.result

    def cancel(self, job_id: str) -> bool:
        job = self._jobs.get(job_id)
        if job is None:
            return False
        job.cancel.set()
        return True

    def _on_unet_call(self, module: Any, args: Any) -> None:
        job = self._running
        if job is None:
            return
        if job.cancel.is_set():
            raise Cancelled
        job.calls += 1

    def _loop(self) -> None:
        while True:
            job = self._waiting.get()
            if job.cancel.is_set():
                job.state, job.message = "cancelled", "cancelled before it started"
                continue
            self._run(job)

    def _run(self, job: TeacherJob) -> None:
        settings = {**teacher_settings(job.student.config)}
        if self.num_steps is not None:
            settings["num_steps"] = self.num_steps
        steps = settings.get("num_steps") or self.teacher.preset.num_steps
        job.expected_calls = int((self._calls_per_step or 3.0) * steps)
        job.state, self._running = "running", job
        started = time.perf_counter()
        try:
            direction = self._direction(job.student)
            [result] = self.teacher.edit([job.image], [direction], seeds=0, **settings)
            job.result, job.state = result.edited, "done"
            self._calls_per_step = job.calls / steps
        except Cancelled:
            job.state, job.message = "cancelled", "cancelled"
        except (UserError, RuntimeError, ValueError) as err:
            job.state, job.message = "error", f"the teacher could not edit this image: {err}"
        finally:
            self._running = None
            job.seconds = time.perf_counter() - started
            job.image = None

    def _direction(self, student: Any) -> Any:
        """The package's edit direction, computed once per package (the world's captions for a shapes
        world edit, the sentence banks otherwise)."""
        if student.id not in self._directions:
            from p2pz.cli.directions import direction_for

            self._directions[student.id] = direction_for(self.teacher, student.edit)
        return self._directions[student.id]


def _is_world_model(model: str) -> bool:
    from p2pz.data.shapes.edits import model_vocabulary

    return model_vocabulary(model) is not None
