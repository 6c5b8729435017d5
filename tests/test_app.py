"""``p2pz app`` through its HTTP API: the edit equals ``p2pz apply``'s, bad uploads get a message and the
app keeps serving, concurrent requests share batches, the teacher's queue runs, reports and cancels."""

from __future__ import annotations

import base64
import io
import json
import struct
import time
import warnings
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

pytest.importorskip("fastapi")
with warnings.catch_warnings():  # starlette's note that it prefers httpx2 to httpx: not ours to fix
    warnings.simplefilter("ignore")
    from fastapi.testclient import TestClient  # noqa: E402

from p2pz.cli.main import build_parser, main  # noqa: E402


def export_small_package(root, edit=None):
    """A narrow 64 px student (random weights) exported without the extra formats; ``edit`` recorded."""
    from test_export import narrow_checkpoint

    from p2pz.student.export import export_package

    out = export_package(narrow_checkpoint(root / "last.ckpt"), root / "model", formats=())
    if edit is not None:
        config = json.loads((out / "config.json").read_text())
        source, target = edit.split(":")
        config["data"] = {"edit": {"name": f"{source}-to-{target}", "source": source, "target": target}}
        (out / "config.json").write_text(json.dumps(config))
    return out


def app_client(*argv):
    from p2pz.cli.app import build_state
    from p2pz.cli.app_server import create_app

    state = build_state(build_parser().parse_args(["app", *argv]))
    return TestClient(create_app(state)), state


@pytest.fixture(scope="module")
def package(tmp_path_factory):
    return export_small_package(tmp_path_factory.mktemp("app"), edit="circle:square")


@pytest.fixture(scope="module")
def client(package):
    limits = ["--max-megapixels", "1", "--max-upload-mb", "2"]
    client, state = app_client(str(package), *limits, "--workers", "1")  # the in-process runner
    yield client
    state.runner.close()


def png_bytes(image, **kwargs):
    buffer = io.BytesIO()
    image.save(buffer, format=kwargs.pop("format", "PNG"), **kwargs)
    return buffer.getvalue()


def scene(size=(96, 72)):
    rng = np.random.default_rng(0)
    return Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8))


def png_header_only(width, height):
    """A PNG whose header claims ``width`` x ``height`` over a few bytes: a bomb, as Image.open sees it."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    chunks = b""
    for kind, data in ((b"IHDR", ihdr), (b"IDAT", zlib.compress(b"\0" * 64)), (b"IEND", b"")):
        chunks += struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    return b"\x89PNG\r\n\x1a\n" + chunks


def decoded(response):
    return Image.open(io.BytesIO(base64.b64decode(response.json()["image"])))


def test_the_edit_equals_p2pz_apply(client, package, tmp_path):
    photo = tmp_path / "photo.png"
    scene().save(photo)
    assert main(["apply", str(package), str(photo), "--out", str(tmp_path / "out"), "--no-progress"]) == 0
    response = client.post("/api/edit", content=photo.read_bytes())
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["edit"] == "circle:square" and body["input_size"] == [96, 72] and body["latency_ms"] > 0
    expected = np.asarray(Image.open(tmp_path / "out" / "photo.png"))
    assert np.array_equal(np.asarray(decoded(response)), expected)


def animated_gif():
    frames = [Image.new("RGB", (32, 32), colour) for colour in ((255, 0, 0), (0, 0, 255))]
    buffer = io.BytesIO()
    frames[0].save(buffer, format="GIF", save_all=True, append_images=frames[1:], duration=100)
    return buffer.getvalue()


REFUSED = {
    "empty": (lambda: b"", 400, "empty"),
    "not an image": (lambda: b"just some text, not pixels", 415, "not an image"),
    "truncated": (lambda: png_bytes(scene())[:200], 400, "truncated"),
    "over the byte cap": (lambda: png_bytes(scene((1100, 1000)), compress_level=0), 413, "too large"),
    "over the megapixel cap": (lambda: png_bytes(Image.new("RGB", (1200, 1000))), 413, "MP"),
    "decompression bomb": (lambda: png_header_only(20_000, 20_000), 413, "decompression"),
    "animated": (animated_gif, 415, "animated"),
}


@pytest.mark.parametrize("case", REFUSED)
def test_a_bad_upload_gets_a_message_and_the_app_keeps_serving(client, case):
    make, status, says = REFUSED[case]
    response = client.post("/api/edit", content=make())
    assert response.status_code == status, response.text
    assert says in response.json()["error"]
    good = client.post("/api/edit", content=png_bytes(scene()))
    assert good.status_code == 200 and decoded(good).size == (64, 64)


CONVERTED = {
    "CMYK": (lambda: png_bytes(scene().convert("CMYK"), format="JPEG"), "CMYK"),
    "16-bit": (lambda: png_bytes(Image.fromarray(np.full((40, 40), 40_000, np.uint16))), "16-bit"),
    "alpha": (lambda: png_bytes(scene().convert("RGBA")), "transparent"),
}


@pytest.mark.parametrize("case", CONVERTED)
def test_cmyk_16_bit_and_alpha_are_converted_with_a_note(client, case):
    make, says = CONVERTED[case]
    response = client.post("/api/edit", content=make())
    assert response.status_code == 200, response.text
    assert any(says in note for note in response.json()["notes"])
    assert decoded(response).mode == "RGB"


def test_the_page_and_the_listing(client):
    assert "p2pz" in client.get("/").text
    listing = client.get("/api/models").json()
    assert [m["edit"] for m in listing["models"]] == ["circle:square"] and listing["teacher"] is None
    assert client.post("/api/edit?model=9", content=png_bytes(scene())).status_code == 404


def concurrent_edits_equal_apply(client, package):
    """12 edits posted at once: each answer is its own image's edit, as ``p2pz apply`` makes it alone
    (within 1 grey level: batched vs alone, float rounding). Returns each answer's batch size."""
    from concurrent.futures import ThreadPoolExecutor

    from p2pz.student.export import apply_to_images, load_exported

    images = [scene((64 + 8 * i, 64)) for i in range(12)]
    with ThreadPoolExecutor(12) as pool:
        responses = list(pool.map(lambda im: client.post("/api/edit", content=png_bytes(im)), images))
    model = load_exported(package)
    for image, response in zip(images, responses):
        [alone] = apply_to_images(model, 64, [image])
        got = np.asarray(decoded(response)).astype(int)
        assert np.abs(got - np.asarray(alone).astype(int)).max() <= 1
    return [r.json()["batch"] for r in responses]


def test_concurrent_requests_share_a_batch_and_get_their_own_result(client, package):
    assert max(concurrent_edits_equal_apply(client, package)) > 1


def test_worker_processes_edit_as_p2pz_apply_and_a_stopped_worker_is_one_message(package):
    """--workers 2: the students run in two processes; concurrent edits come back each its own and equal
    to ``p2pz apply``'s, batched; when a worker dies the next edit gets a message, not a hang."""
    from p2pz.cli.app_workers import ProcessRunner

    client, state = app_client(str(package), "--workers", "2", "--max-batch", "4")
    try:
        assert isinstance(state.runner, ProcessRunner) and len(state.runner._processes) == 2
        batches = concurrent_edits_equal_apply(client, package)
        assert max(batches) > 1 and max(batches) <= 2  # --max-batch 4 shared out between the 2 workers
        state.runner._processes[0].kill()
        state.runner._processes[0].join(timeout=10)
        deadline = time.monotonic() + 30
        while (response := client.post("/api/edit", content=png_bytes(scene()))).status_code == 200:
            assert time.monotonic() < deadline, "the app never noticed its worker stopped"
            time.sleep(0.2)
        assert response.status_code == 500 and "worker stopped" in response.json()["error"]
        assert client.get("/api/models").status_code == 200  # the rest of the app keeps serving
    finally:
        state.runner.close()


def children_of(pid):
    tasks = Path(f"/proc/{pid}/task").iterdir()
    return [int(child) for task in tasks for child in (task / "children").read_text().split()]


@pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="reads /proc (Linux)")
def test_worker_processes_end_when_the_app_is_killed(package):
    """A SIGKILL runs no cleanup in the app: its workers must notice on their own, not live on."""
    import os
    import signal

    from test_app_browser import free_port, start_app

    port = free_port()
    app = start_app(package, port, "--workers", "2")
    workers = [c for c in children_of(app.pid) if "spawn_main" in Path(f"/proc/{c}/cmdline").read_text()]
    assert len(workers) == 2
    os.kill(app.pid, signal.SIGKILL)
    app.wait(timeout=30)
    deadline = time.monotonic() + 20
    while any(Path(f"/proc/{w}").exists() and "Z" not in Path(f"/proc/{w}/stat").read_text().split()[2]
              for w in workers):  # fmt: skip
        assert time.monotonic() < deadline, f"workers {workers} outlived the app"
        time.sleep(0.2)


def test_the_teacher_runs_beside_and_cancels(package):
    from p2pz.data.models import TOY_MODEL

    client, state = app_client(
        str(package), "--teacher", str(TOY_MODEL), "--teacher-steps", "4", "--workers", "1"
    )
    try:
        image = png_bytes(scene((64, 64)))
        first = client.post("/api/teacher", content=image).json()["id"]
        second = client.post("/api/teacher", content=image).json()["id"]
        assert client.delete(f"/api/teacher/{second}").status_code == 200
        assert client.post("/api/edit", content=image).status_code == 200  # not behind the teacher
        deadline = time.monotonic() + 120
        while (status := client.get(f"/api/teacher/{first}").json())["state"] in ("queued", "running"):
            assert time.monotonic() < deadline
            time.sleep(0.2)
        assert status["state"] == "done" and status["progress"] == 1.0
        assert Image.open(io.BytesIO(base64.b64decode(status["image"]))).size == (64, 64)
        assert client.get(f"/api/teacher/{second}").json()["state"] == "cancelled"
    finally:
        state.runner.close()


def test_no_package_is_one_line(tmp_path, capsys):
    assert main(["app", "--models-dir", str(tmp_path)]) == 2
    assert "no student to serve" in capsys.readouterr().err
