"""``p2pz app`` under load: 16 concurrent clients x 50 requests on the loopback, against one client alone
and against ``p2pz bench``'s batch-1 eager throughput for the same package on the same cores.

The server is the real command (``p2pz app PACKAGE``, a subprocess on 127.0.0.1); each client is a thread
with its own keep-alive connection posting a 96x72 PNG (cropped and resized by the app, as a photo is).
Without a PACKAGE it builds the demo's student architecture (``configs/cpu.yaml``: the lite generator at
64 px; random weights, which time the same as trained ones) in a temp dir. Bounded: every request has a
timeout and the whole load phase a deadline. Goals (issue 36): zero errors, p99 <= 5 x the single client's
p50, RSS after / RSS after warm-up <= 1.2, throughput >= 0.5 x the bench's.

    python benchmarks/app_load.py [PACKAGE] [--clients 16] [--requests 50]   # last line: one JSON object
"""

from __future__ import annotations

import argparse
import http.client
import io
import json
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

REQUEST_TIMEOUT_S = 60
LOAD_DEADLINE_S = 600


def demo_architecture_package(root: Path) -> Path:
    """The demo's student (configs/cpu.yaml's generator at 64 px), random weights, exported."""
    import torch
    import yaml

    from p2pz.student.export import export_package
    from p2pz.student.training import StudentModule

    model = yaml.safe_load((Path(__file__).parents[1] / "configs" / "cpu.yaml").read_text())["model"]
    torch.manual_seed(0)
    module = StudentModule(
        resolution=model["resolution"],
        preset=model["preset"],
        lpips_weight=0.0,
        generator=model["generator"],
        discriminator=model["discriminator"],
    )
    checkpoint = {"state_dict": module.state_dict(), "generator_config": dict(module.g_ema.config)}
    torch.save(checkpoint, root / "last.ckpt")
    out = export_package(root / "last.ckpt", root / "model", formats=())
    config = json.loads((out / "config.json").read_text())
    config["data"] = {"edit": {"name": "circle-to-square", "source": "circle", "target": "square"}}
    (out / "config.json").write_text(json.dumps(config))
    return out


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_app(package: Path, port: int, workers: int | None = None) -> subprocess.Popen:
    command = [sys.executable, "-m", "p2pz", "app", str(package), "--port", str(port), "--device", "cpu"]
    command += ["--workers", str(workers)] if workers else []
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and process.poll() is None:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                return process
        except OSError:
            time.sleep(0.5)
    process.kill()
    raise SystemExit("p2pz app did not start")


def rss_bytes(pid: int) -> int:
    """Resident memory of the process and of its children (the app's student workers)."""
    total = 0
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            total += int(line.split()[1]) * 1024
    for task in Path(f"/proc/{pid}/task").iterdir():
        for child in (task / "children").read_text().split():
            try:
                total += rss_bytes(int(child))
            except FileNotFoundError:  # a child that just ended
                pass
    return total


def client(
    port: int, body: bytes, count: int, latencies: list[float], errors: list[str], stop: float
) -> None:
    """``count`` edits on one keep-alive connection; each latency (ms) or error appended."""
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=REQUEST_TIMEOUT_S)
    for _ in range(count):
        if time.monotonic() > stop:
            errors.append("deadline")
            continue
        started = time.perf_counter()
        try:
            connection.request("POST", "/api/edit", body=body, headers={"Content-Type": "image/png"})
            response = connection.getresponse()
            payload = response.read()
            if response.status != 200 or b'"image"' not in payload:
                errors.append(f"HTTP {response.status}")
                continue
        except (OSError, http.client.HTTPException) as err:
            errors.append(type(err).__name__)
            connection.close()
            connection = http.client.HTTPConnection("127.0.0.1", port, timeout=REQUEST_TIMEOUT_S)
            continue
        latencies.append((time.perf_counter() - started) * 1000)
    connection.close()


def run_clients(port: int, body: bytes, clients: int, requests: int) -> tuple[list[float], list[str], float]:
    latencies: list[float] = []
    errors: list[str] = []
    stop = time.monotonic() + LOAD_DEADLINE_S
    threads = [
        threading.Thread(target=client, args=(port, body, requests, latencies, errors, stop))
        for _ in range(clients)
    ]
    started = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return latencies, errors, time.perf_counter() - started


def percentile(values: list[float], q: float) -> float:
    return float(np.percentile(values, q)) if values else float("nan")


def bench_images_per_s(package: Path, out: Path) -> float:
    """``p2pz bench``'s eager batch-1 throughput for the package on the same cores."""
    command = [sys.executable, "-m", "p2pz", "bench", str(package), "--backends", "eager", "--batches", "1"]
    command += ["--teacher", "none", "--iters", "50", "--out", str(out), "--device", "cpu", "--no-progress"]
    subprocess.run(command, check=True, stdout=subprocess.DEVNULL)
    report = json.loads(out.read_text())
    return float(report["student"]["eager"]["1"]["images_per_s"])


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("package", nargs="?", help="exported student (default: the demo's architecture)")
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--requests", type=int, default=50, help="requests per client")
    parser.add_argument(
        "--workers", type=int, default=None, help="p2pz app --workers (default: the app's own choice)"
    )
    args = parser.parse_args()
    from PIL import Image

    with tempfile.TemporaryDirectory(prefix="p2pz-app-load-") as tmp:
        tmp = Path(tmp)
        package = Path(args.package) if args.package else demo_architecture_package(tmp)
        buffer = io.BytesIO()
        pixels = np.random.default_rng(0).integers(0, 255, (72, 96, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(buffer, format="PNG")
        body = buffer.getvalue()

        port = free_port()
        server = start_app(package, port, args.workers)
        try:
            run_clients(port, body, args.clients, 5)  # warm-up: connections, allocator, batch sizes
            rss_warm = rss_bytes(server.pid)
            single, single_errors, _ = run_clients(port, body, 1, args.requests)
            latencies, errors, seconds = run_clients(port, body, args.clients, args.requests)
            rss_after = rss_bytes(server.pid)
        finally:
            server.terminate()
            server.wait(timeout=30)
        bench_ips = bench_images_per_s(package, tmp / "bench.json")

    throughput = len(latencies) / seconds
    result = {
        "app_p50_ms": round(percentile(latencies, 50), 2),
        "app_p99_ms": round(percentile(latencies, 99), 2),
        "app_requests_per_s": round(throughput, 2),
        "app_errors": len(errors) + len(single_errors),
        "app_rss_growth": round(rss_after / rss_warm, 3),
        "single_client_p50_ms": round(percentile(single, 50), 2),
        "bench_eager_batch1_images_per_s": round(bench_ips, 2),
        "app_over_bench_throughput": round(throughput / bench_ips, 3),
        "app_p99_over_single_p50": round(percentile(latencies, 99) / percentile(single, 50), 2),
        "workers": args.workers or "auto",
        "clients": args.clients,
        "requests_per_client": args.requests,
        "cpu_cores": len(os.sched_getaffinity(0)),
    }
    print(
        f"throughput {throughput:.1f} req/s = {result['app_over_bench_throughput']:.2f} x p2pz bench's "
        f"eager batch-1 {bench_ips:.1f} images/s; "
        f"p99 {result['app_p99_over_single_p50']:.1f} x one client's p50"
    )
    print(json.dumps(result))


if __name__ == "__main__":
    main()
