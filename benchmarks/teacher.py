"""Time and peak memory of one pix2pix-zero edit: ours (``teacher.Pix2PixZero``) vs diffusers'.

    python benchmarks/teacher.py [--steps 10] [--size 128] [--repeats 2] [--device cpu] [--threads 1]
    python benchmarks/teacher.py --architecture sd14 --resolution 256 [--step-counts 4 8] [--model DIR]

Both sides run the same real-image edit (inversion + reference pass + guided edit pass, batch 1)
on the same weights and inputs: diffusers' ``StableDiffusionPix2PixZeroPipeline`` (``invert`` then
``__call__``) and our ``diffusers`` preset, which computes the same thing (the script prints the
largest pixel difference between the two edits as a check).

The model: the tiny random Stable Diffusion of ``p2pz make-tiny`` (tokenizer, text encoder,
scheduler), with a wider UNet (64/128/128 channels, 8 heads) and a VAE that downsamples by 4, so
that at 128 px the latent is 32 x 32 and self-attention works on 1024 tokens, as SD's does on 4096
at 512 px: attention weighs in the cost as it does at full size.

Measurements. Every measurement runs in a fresh Python subprocess (``--worker``), alternating
between the two implementations, so that neither inherits the other's heap or caches:

* **peak memory**: on CPU, the growth of the process's peak resident set size over the first edit:
  the high-water mark is reset just before it (models loaded, inputs prepared; Linux
  ``/proc/self/clear_refs``) and ``VmHWM`` read just after it, minus the RSS at the reset: the
  extra memory the edit needed at its peak. torch's CPU
  allocator keeps no statistics and ``tracemalloc`` does not see its buffers, so RSS is what the
  operating system actually had to provide. On CUDA, ``torch.cuda.max_memory_allocated`` growth.
* **time**: a second edit in the same worker (after the first, which warms up), the minimum over
  ``--repeats`` workers per side. On CPU with one thread the ratio uses the process's CPU time
  (``time.process_time``): on a shared machine wall time mostly measures the other processes'
  load, while the CPU time of a single-threaded edit is what the edit costs. Wall times are
  printed too (``*_wall_seconds_per_edit``). On CUDA (or with several threads) the ratio uses
  wall time.

Intra-op threads default to 1: on a small shared CPU, thread oversubscription makes timings noise.
The last line is one JSON object with ``time_ratio_vs_diffusers`` and ``peak_mem_ratio_vs_diffusers``
(ours / diffusers; lower is better; targets <= 0.7 and <= 0.5).

**Real size** (``--architecture sd14``): the SD-1.4-size random model of
``p2pz make-tiny --architecture sd14`` (UNet 860 M parameters; built once into a temporary folder,
or ``--model DIR`` for an existing one), seen at ``--resolution`` px (default 256: latents 32 x 32).
Both implementations run at each of ``--step-counts`` (default 4 and 8), one worker per
implementation and step count doing one edit (at this size an edit takes minutes, and the first
edit's one-off costs are a small part of it), whose CPU time (on the CPU at any ``--threads``) and
peak memory growth are both taken.
Memory growth per step = (peak at the most steps - peak at the fewest) / (step difference): what
an edit's memory grows by per extra step (our teacher keeps only the attention maps of the current
step; diffusers' keeps every step's maps). The JSON's ``sd14_time_ratio_vs_diffusers`` and
``sd14_peak_mem_ratio_vs_diffusers`` are at the most steps (targets <= 0.7 and <= 0.5 at 8 steps),
``sd14_mem_growth_per_step_bytes`` holds both implementations' growth (target: ours does not grow).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

CAPTION = "a cat sitting on a couch"


def build_model(out: Path, seed: int = 0, size: int = 128) -> Path:
    """The tiny model of ``make_tiny`` with a wider UNet and a 4x VAE (see the module docstring),
    native at ``size`` px (a multiple of 16): both sides then edit at ``--size`` (the UNet's
    sample_size sets it)."""
    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel

    from p2pz.data.models.tiny import TEXT_HIDDEN, VAE_SCALING_FACTOR, make_tiny

    make_tiny(out, seed=seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed + 10)
        unet = UNet2DConditionModel(
            sample_size=size // 4,  # the VAE downsamples by 4
            in_channels=4,
            out_channels=4,
            down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
            block_out_channels=(64, 128, 128),
            layers_per_block=1,
            attention_head_dim=8,  # = number of heads (diffusers' legacy name), as SD 1.x
            cross_attention_dim=TEXT_HIDDEN,
            norm_num_groups=16,
        )
        torch.manual_seed(seed + 11)
        vae = AutoencoderKL(
            in_channels=3,
            out_channels=3,
            down_block_types=("DownEncoderBlock2D",) * 3,
            up_block_types=("UpDecoderBlock2D",) * 3,
            block_out_channels=(16, 32, 32),
            layers_per_block=1,
            latent_channels=4,
            norm_num_groups=8,
            sample_size=size,
            scaling_factor=VAE_SCALING_FACTOR,
        )
    unet.save_pretrained(out / "unet")
    vae.save_pretrained(out / "vae")
    return out


def test_image(size: int):
    import numpy as np
    from PIL import Image

    yy, xx = np.mgrid[0:size, 0:size] / size
    blob = np.exp(-((xx - 0.4) ** 2 + (yy - 0.6) ** 2) / 0.03)
    img = np.stack([0.3 + 0.5 * xx, 0.2 + 0.6 * yy, 0.2 + 0.7 * blob], -1)
    return Image.fromarray((np.clip(img, 0, 1) * 255).astype(np.uint8))


def _proc_status_bytes(field: str) -> int | None:
    """``VmRSS`` / ``VmHWM`` of this process from ``/proc/self/status`` (Linux), or None."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(f"{field}:"):
                return int(line.split()[1]) * 1024  # kB
    except OSError:
        return None
    return None


def reset_peak(device: str) -> int:
    """Start a peak-memory window; returns the baseline that :func:`peak_bytes` growth counts from.

    On Linux the RSS high-water mark is reset (``/proc/self/clear_refs``), so that loading the
    model (which for an fp16 folder briefly holds both precisions) cannot hide the edit's own peak:
    with ``ru_maxrss``, which never goes down, an edit below the load's peak read as +0.
    """
    import torch

    if device.startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        return torch.cuda.memory_allocated()
    try:
        Path("/proc/self/clear_refs").write_text("5")  # 5: reset the peak RSS to the current RSS
    except OSError:
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return _proc_status_bytes("VmRSS") or 0


def peak_bytes(device: str) -> int:
    import torch

    if device.startswith("cuda"):
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated()
    hwm = _proc_status_bytes("VmHWM")
    return hwm if hwm is not None else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def worker(impl: str, model: str, steps: int, size: int, device: str, out_npy: str, edits: int = 2) -> dict:
    """One measurement in this (fresh) process: the first edit's peak memory, the second's time
    (with ``edits=1``, both from the one edit)."""
    import numpy as np
    import torch

    from p2pz.teacher.directions import compute_direction
    from p2pz.teacher.pipeline import Pix2PixZero

    image = test_image(size)
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    if impl == "ours":
        teacher = Pix2PixZero.from_pretrained(model, preset="diffusers", device=device, captioner=False)
        direction = compute_direction(
            teacher.tokenizer,
            teacher.text_encoder,
            ["a cat", "a photo of a cat"],
            ["a dog", "a photo of a dog"],
        )

        def edit():
            [res] = teacher.edit([image], [direction], captions=[CAPTION], seeds=[0], num_steps=steps)
            return np.asarray(res.edited)
    else:
        from diffusers import DDIMInverseScheduler, DDIMScheduler
        from diffusers.pipelines.deprecated.stable_diffusion_variants.pipeline_stable_diffusion_pix2pix_zero import (  # noqa: E501
            StableDiffusionPix2PixZeroPipeline,
        )

        pipe = StableDiffusionPix2PixZeroPipeline.from_pretrained(
            model,
            safety_checker=None,
            feature_extractor=None,
            caption_generator=None,
            caption_processor=None,
            inverse_scheduler=None,
            requires_safety_checker=False,
            torch_dtype=torch.float32,  # as ours: the sd14 model is stored in fp16
        ).to(device)
        pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
        pipe.inverse_scheduler = DDIMInverseScheduler.from_config(pipe.scheduler.config)
        pipe.set_progress_bar_config(disable=True)
        direction = compute_direction(
            pipe.tokenizer, pipe.text_encoder, ["a cat", "a photo of a cat"], ["a dog", "a photo of a dog"]
        )

        def edit():
            generator = torch.Generator().manual_seed(0)
            inv = pipe.invert(CAPTION, image=image, num_inference_steps=steps, generator=generator).latents
            return pipe(
                CAPTION,
                source_embeds=direction.source_embedding[None].to(device),
                target_embeds=direction.target_embedding[None].to(device),
                num_inference_steps=steps,
                latents=inv,
                negative_prompt=CAPTION,
                generator=generator,
                output_type="pil",
            ).images[0]

    before = reset_peak(device)
    tic, cpu_tic = time.perf_counter(), time.process_time()
    first = np.asarray(edit())
    sync()
    seconds, cpu_seconds = time.perf_counter() - tic, time.process_time() - cpu_tic
    peak = peak_bytes(device) - before
    if edits > 1:
        tic, cpu_tic = time.perf_counter(), time.process_time()
        edit()
        sync()
        seconds, cpu_seconds = time.perf_counter() - tic, time.process_time() - cpu_tic
    np.save(out_npy, first)
    return {"impl": impl, "seconds": seconds, "cpu_seconds": cpu_seconds, "peak_bytes": peak}


def run_worker(impl: str, model: Path, npy: Path, args: argparse.Namespace, steps: int, edits: int) -> dict:
    """``worker`` in a fresh Python process; its result dict."""
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", OMP_NUM_THREADS=str(args.threads))
    cmd = [sys.executable, __file__, "--worker", impl, str(model), str(npy), "--edits", str(edits)]
    cmd += ["--steps", str(steps), "--size", str(args.size), "--device", args.device]
    cmd += ["--threads", str(args.threads)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        sys.exit(f"{impl} worker failed:\n{proc.stderr[-3000:]}")
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    print(
        f"{impl:9s} {steps:3d} steps: {result['seconds']:.2f} s/edit wall, "
        f"{result['cpu_seconds']:.2f} s CPU, "
        f"peak +{result['peak_bytes'] / 2**20:.1f} MiB",
        flush=True,
    )
    return result


def max_pixel_diff(a: Path, b: Path) -> int:
    import numpy as np

    return int(np.abs(np.load(a).astype(np.int16) - np.load(b).astype(np.int16)).max())


def main_tiny(args: argparse.Namespace) -> None:
    """The default model: ``--repeats`` workers per side, time from each worker's second edit."""
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="p2pz-bench-") as tmp:
        model = build_model(Path(tmp) / "model", size=args.size)
        runs: dict[str, list[dict]] = {"diffusers": [], "ours": []}
        for r in range(args.repeats):
            for impl in ("diffusers", "ours"):
                runs[impl].append(run_worker(impl, model, Path(tmp) / f"{impl}-{r}.npy", args, args.steps, 2))
        diff = max_pixel_diff(Path(tmp) / "ours-0.npy", Path(tmp) / "diffusers-0.npy")

    use_cpu_time = args.device == "cpu" and args.threads == 1
    wall = {k: min(v["seconds"] for v in runs[k]) for k in runs}
    best = {k: min(v["cpu_seconds" if use_cpu_time else "seconds"] for v in runs[k]) for k in runs}
    mem = {k: min(v["peak_bytes"] for v in runs[k]) for k in runs}
    summary = {
        "benchmark": "teacher",
        "device": args.device,
        "threads": args.threads,
        "image_size": args.size,
        "latent_size": args.size // 4,
        "steps": args.steps,
        "time_measure": "process CPU time" if use_cpu_time else "wall time",
        "ours_seconds_per_edit": round(best["ours"], 3),
        "diffusers_seconds_per_edit": round(best["diffusers"], 3),
        "ours_wall_seconds_per_edit": round(wall["ours"], 3),
        "diffusers_wall_seconds_per_edit": round(wall["diffusers"], 3),
        "ours_peak_mib": round(mem["ours"] / 2**20, 1),
        "diffusers_peak_mib": round(mem["diffusers"] / 2**20, 1),
        "max_pixel_diff_vs_diffusers": diff,
        "wall_seconds": round(time.perf_counter() - start, 1),
        "time_ratio_vs_diffusers": round(best["ours"] / best["diffusers"], 3),
        "peak_mem_ratio_vs_diffusers": round(mem["ours"] / max(mem["diffusers"], 1), 3),
    }
    print(json.dumps(summary))


def sd14_model(tmp: Path, args: argparse.Namespace) -> Path:
    """The SD-1.4-size random model (``--model`` or built here) seen at ``--resolution`` px."""
    from p2pz.data.models.tiny import link_at_resolution, make_tiny

    full = Path(args.model) if args.model else None
    if full is None:
        tic = time.perf_counter()
        full = make_tiny(tmp / "sd14", seed=0, architecture="sd14")
        print(f"built the sd14 random model in {time.perf_counter() - tic:.0f} s", flush=True)
    return link_at_resolution(full, tmp / f"sd14-{args.size}", args.size)


def main_sd14(args: argparse.Namespace) -> None:
    """Real size: one worker per implementation and step count, ratios at the most steps."""
    start = time.perf_counter()
    counts = sorted(set(args.step_counts))
    runs: dict[int, dict[str, dict]] = {}
    with tempfile.TemporaryDirectory(prefix="p2pz-bench-sd14-") as tmp:
        model = sd14_model(Path(tmp), args)
        for steps in counts:
            runs[steps] = {
                impl: run_worker(impl, model, Path(tmp) / f"{impl}-{steps}.npy", args, steps, 1)
                for impl in ("diffusers", "ours")
            }
        diffs = {
            n: max_pixel_diff(Path(tmp) / f"ours-{n}.npy", Path(tmp) / f"diffusers-{n}.npy") for n in counts
        }

    # On the CPU, CPU time at any thread count: an sd14 edit takes minutes, so more than one thread is
    # worth it on a busy machine, and the process's CPU time is what the edit costs, whatever else runs.
    use_cpu_time = args.device == "cpu"
    key = "cpu_seconds" if use_cpu_time else "seconds"
    most, fewest = counts[-1], counts[0]
    per_count = {
        str(n): {
            "ours_seconds": round(runs[n]["ours"][key], 1),
            "diffusers_seconds": round(runs[n]["diffusers"][key], 1),
            "ours_peak_mib": round(runs[n]["ours"]["peak_bytes"] / 2**20, 1),
            "diffusers_peak_mib": round(runs[n]["diffusers"]["peak_bytes"] / 2**20, 1),
            "time_ratio": round(runs[n]["ours"][key] / runs[n]["diffusers"][key], 3),
            "peak_mem_ratio": round(
                runs[n]["ours"]["peak_bytes"] / max(runs[n]["diffusers"]["peak_bytes"], 1), 3
            ),
            "max_pixel_diff_vs_diffusers": diffs[n],
        }
        for n in counts
    }
    growth = {
        impl: int((runs[most][impl]["peak_bytes"] - runs[fewest][impl]["peak_bytes"]) / max(most - fewest, 1))
        for impl in ("ours", "diffusers")
    }
    for n, row in per_count.items():
        print(f"{n} steps: time ratio {row['time_ratio']}, peak memory ratio {row['peak_mem_ratio']}")
    print(
        f"memory growth per step: ours {growth['ours'] / 2**20:.1f} MiB, "
        f"diffusers {growth['diffusers'] / 2**20:.1f} MiB"
    )
    summary = {
        "benchmark": "teacher",
        "architecture": "sd14",
        "device": args.device,
        "threads": args.threads,
        "image_size": args.size,
        "latent_size": args.size // 8,
        "step_counts": counts,
        "time_measure": "process CPU time" if use_cpu_time else "wall time",
        "per_step_count": per_count,
        "wall_seconds": round(time.perf_counter() - start, 1),
        "sd14_time_ratio_vs_diffusers": per_count[str(most)]["time_ratio"],
        "sd14_peak_mem_ratio_vs_diffusers": per_count[str(most)]["peak_mem_ratio"],
        "sd14_mem_growth_per_step_bytes": growth,
    }
    print(json.dumps(summary))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--architecture",
        choices=("tiny", "sd14"),
        default="tiny",
        help="tiny: the wide tiny model (default); sd14: SD-1.4-size random weights",
    )
    parser.add_argument("--steps", type=int, default=10, help="DDIM steps per edit, tiny (default: 10)")
    parser.add_argument(
        "--step-counts",
        type=int,
        nargs="+",
        default=[4, 8],
        help="sd14: the step counts to measure at (default: 4 8)",
    )
    parser.add_argument(
        "--size",
        "--resolution",
        dest="size",
        type=int,
        default=None,
        help="image size in px (default: 128 tiny, 256 sd14)",
    )
    parser.add_argument(
        "--model", default=None, help="sd14: an existing make-tiny --architecture sd14 folder"
    )
    parser.add_argument(
        "--repeats", type=int, default=1, help="workers per implementation, tiny (default: 1)"
    )
    parser.add_argument("--device", default="cpu", help="cpu or cuda (default: cpu)")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads (default: 1)")
    parser.add_argument("--edits", type=int, default=2, help=argparse.SUPPRESS)
    parser.add_argument("--worker", nargs=3, metavar=("IMPL", "MODEL", "NPY"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.size is None:
        args.size = 256 if args.architecture == "sd14" else 128
    if args.architecture == "tiny" and (args.size <= 0 or args.size % 16):  # 4x VAE, 2 UNet downsamples
        sys.exit(f"--size must be a positive multiple of 16 for the tiny model, got {args.size}")
    if min(args.step_counts) < 2 or len(set(args.step_counts)) < 2:
        parser.error("--step-counts needs two different counts of at least 2 (the teacher's minimum)")

    import torch

    torch.set_num_threads(args.threads)
    if args.worker:
        impl, model, npy = args.worker
        print(json.dumps(worker(impl, model, args.steps, args.size, args.device, npy, args.edits)))
        return
    (main_sd14 if args.architecture == "sd14" else main_tiny)(args)


if __name__ == "__main__":
    main()
