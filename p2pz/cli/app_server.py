"""The HTTP side of ``p2pz app``: one page and a small JSON API (FastAPI, served by uvicorn).

::

    GET    /                      the page (app_page.html)
    GET    /api/models            the students (edit, resolution, metrics), the limits, whether a teacher runs
    GET    /api/models/{id}/card  a package's README.md card, as plain text
    POST   /api/edit?model=ID     body: the image file's bytes -> {"image": base64 PNG, "latency_ms", ...}
    POST   /api/teacher?model=ID  body: the image -> {"id": job}; the teacher's edit, queued
    GET    /api/teacher/{job}     {"state", "progress", "queue_position", "image" once done}
    DELETE /api/teacher/{job}     cancel it

A refused upload is HTTP 400/413/415 with ``{"error": "..."}``, the line the page shows (a student
call that fails: HTTP 500, the same way). Uploads and results stay in memory: the app writes no file.
"""

from __future__ import annotations

import asyncio
import base64
import io
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from importlib import resources
from typing import Any

from fastapi import FastAPI, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import HTMLResponse, JSONResponse, PlainTextResponse

from p2pz.cli.app_models import Student, StudentRunner
from p2pz.cli.app_uploads import DEFAULT_MAX_MEGAPIXELS, DEFAULT_MAX_UPLOAD_MB, UploadRefused, read_upload
from p2pz.teacher.images import prepare_image


@dataclass
class AppState:
    students: dict[str, Student]
    runner: StudentRunner  # or app_workers.ProcessRunner: the same interface
    teacher: Any = None  # app_teacher.TeacherQueue, with --teacher
    max_upload_mb: float = DEFAULT_MAX_UPLOAD_MB
    max_megapixels: float = DEFAULT_MAX_MEGAPIXELS


def refused(message: str, status: int = 400) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status)


def png_base64(image: Any) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode("ascii")


async def read_body(request: Request, max_bytes: int) -> bytes:
    """The request's body, refused as soon as it passes ``max_bytes`` (never read whole into memory)."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > max_bytes:
        raise UploadRefused(
            f"file too large ({int(declared) / 1e6:.1f} MB; the cap is {max_bytes / 1e6:g} MB)", 413
        )
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > max_bytes:
            raise UploadRefused(f"file too large (over the cap of {max_bytes / 1e6:g} MB)", 413)
        chunks.append(chunk)
    return b"".join(chunks)


def create_app(state: AppState) -> FastAPI:
    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        yield
        state.runner.close()  # at the server's shutdown: uvicorn may end the process right after it

    app = FastAPI(title="p2pz app", docs_url=None, redoc_url=None, openapi_url=None, lifespan=lifespan)
    app.state.p2pz = state
    page = resources.files("p2pz.cli").joinpath("app_page.html").read_text()

    def student_or_error(model: str | None) -> Student | JSONResponse:
        student = state.students.get(model if model is not None else next(iter(state.students)))
        return student if student is not None else refused(f"no student {model!r}; see /api/models", 404)

    async def student_and_upload(request: Request, model: str | None) -> Any:
        """(student, upload) for an edit request, or the JSON response that refuses it."""
        student = student_or_error(model)
        if isinstance(student, JSONResponse):
            return student
        try:
            data = await read_body(request, int(state.max_upload_mb * 1e6))
            upload = await run_in_threadpool(read_upload, data, max_megapixels=state.max_megapixels)
        except UploadRefused as why:
            return refused(str(why), why.status)
        return student, upload

    @app.get("/", response_class=HTMLResponse)
    async def index() -> str:
        return page

    @app.get("/api/models")
    async def models() -> dict[str, Any]:
        return {
            "models": [s.listing() for s in state.students.values()],
            "teacher": state.teacher.model if state.teacher is not None else None,
            "max_upload_mb": state.max_upload_mb,
            "max_megapixels": state.max_megapixels,
        }

    @app.get("/api/models/{model}/card", response_class=PlainTextResponse)
    async def card(model: str) -> Any:
        student = state.students.get(model)
        if student is None or student.card is None:
            return PlainTextResponse("no model card", status_code=404)
        return student.card

    @app.post("/api/edit")
    async def edit(request: Request, model: str | None = None) -> Any:
        started = time.perf_counter()
        asked = await student_and_upload(request, model)
        if isinstance(asked, JSONResponse):
            return asked
        student, upload = asked
        model_input = await run_in_threadpool(prepare_image, upload.image, student.resolution)
        try:
            edited, model_ms, batch = await asyncio.wrap_future(state.runner.submit(student, model_input))
        except Exception as err:  # the student's call failed (or its worker stopped): say so, keep serving
            return refused(f"the student could not edit this image: {err}", 500)
        encoded = await run_in_threadpool(png_base64, edited)
        return {
            "image": encoded,
            "notes": upload.notes,
            "input_size": list(upload.image.size),
            "resolution": student.resolution,
            "edit": student.edit,
            "model_ms": round(model_ms, 2),
            "batch": batch,
            "latency_ms": round((time.perf_counter() - started) * 1000, 2),
        }

    add_teacher_routes(app, state, student_and_upload)
    return app


def add_teacher_routes(app: FastAPI, state: AppState, student_and_upload: Any) -> None:
    @app.post("/api/teacher")
    async def teacher_submit(request: Request, model: str | None = None) -> Any:
        if state.teacher is None:
            return refused("no teacher in this app; start it with --teacher MODEL", 404)
        asked = await student_and_upload(request, model)
        if isinstance(asked, JSONResponse):
            return asked
        student, upload = asked
        job = state.teacher.submit(student, upload.image)
        return {"id": job.id}

    @app.get("/api/teacher/{job}")
    async def teacher_status(job: str) -> Any:
        status = state.teacher.status(job) if state.teacher is not None else None
        if status is None:
            return refused(f"no teacher job {job!r}", 404)
        if status["state"] == "done":
            status["image"] = await run_in_threadpool(png_base64, state.teacher.result(job))
        return status

    @app.delete("/api/teacher/{job}")
    async def teacher_cancel(job: str) -> Any:
        if state.teacher is None or not state.teacher.cancel(job):
            return refused(f"no teacher job {job!r}", 404)
        return {"id": job, "cancelling": True}
