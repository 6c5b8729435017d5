"""Throughput of teacher mass production and of the training reader, measured in one run.

    python benchmarks/generate.py [--pairs 8] [--steps 10] [--device cpu]

1. ``p2pz generate`` on the tiny random-weight teacher (built on the fly): pairs/hour at batch 1 and
   at batch 4, same inputs and settings, after a warm-up (the edit directions are computed before the
   clock starts, as a real job reuses them for every pair).
2. The teacher's work per pair, counted by hooks on the UNet (``p2pz.teacher.evals``, what the
   manifest reports): ``unet_evals_per_pair`` (forward evaluations of a real-image edit, one sample
   through the UNet each) with ``unet_backward_evals_per_pair`` beside it, per stage, and the same
   with the reference pass's two identical CFG branches both run (the count before the single-branch
   reference pass); ``unet_time_fraction``: the share of the batch-4 run's wall time spent inside the
   UNet (forward and backward), the gap to what the method's evaluations alone would cost.
3. Three edits of the same inputs at batch 4: one ``p2pz generate`` run with the three edits, which
   shares each input's inversion and reference pass, against three separate runs of one edit each:
   evaluations per pair and pairs/hour of both.
4. The reader: samples/s of ``pair_loader`` (one process, augmentation on) over pairs stored at the
   real teacher's 512 px, decoded to the student's 256 px.
5. What one student training step consumes: the time of one generator + discriminator iteration of
   the lite student (``p2pz.student.networks``, the losses of ``p2pz.student.losses``) at that batch size and
   resolution. The ratio reader samples/s / (batch / step time) says how many
   times faster the reader is than training needs (>1: the reader keeps up with one worker).

6. The fast variants (``teacher.presets.fast_variant``, #38): each of ``--cost-presets`` and its
   ``_fast`` variant at ``--cost-steps`` (50, the paper's), batch 4: ``unet_forward_per_pair``,
   ``unet_backward_per_pair``, ``forward_equivalents_per_pair`` (a backward counted as two forwards)
   and ``pairs_per_hour`` of each under ``teacher_cost``, the fast one's ``cost_ratio_cheap_vs_full``
   beside them, and the largest ratio as ``cost_ratio_cheap_vs_full`` (goal <= 0.5).

The last line is one JSON object with ``pairs_per_hour_b1``, ``pairs_per_hour_b4``,
``unet_evals_per_pair``, ``unet_time_fraction``, ``unet_evals_per_pair_3_edits_shared`` /
``_separate``, ``pairs_per_hour_3_edits_shared`` / ``_separate`` and ``reader_to_training_ratio``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import numpy as np
import torch
from PIL import Image

NUM_SENTENCES = 16  # the direction is computed once before timing; a small bank keeps the run short


def make_inputs(folder: Path, count: int, size: int) -> None:
    rng = np.random.default_rng(0)
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(count):
        base = rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)
        Image.fromarray(base).resize((size, size), Image.BICUBIC).save(folder / f"cat{i:04d}.png")


THREE_EDITS = ["cat:dog", "cat:lion", "cat:cat wearing a hat"]


def bench_generate(
    model_dir: Path,
    inputs: Path,
    out: Path,
    batch_size: int,
    steps: int,
    device: str,
    teacher,
    edits: list[str] | None = None,
) -> dict:
    from p2pz.data.pairs.generate import Settings, run

    settings = Settings(
        model=str(model_dir),
        preset=teacher.preset.name,
        edit=edits or ["cat:dog"],
        inputs=str(inputs),
        out=str(out),
        samples_per_shard=1000,
        num_sentences=NUM_SENTENCES,
        batch_size=batch_size,
        steps=steps,
        device=device,
        progress=False,
        task_index=0,
        num_tasks=1,
    )
    unet_seconds = teacher.unet_evals.seconds
    done = run(settings, teacher=teacher)
    evals = done["unet_evals_per_pair"]
    return {
        "batch_size": batch_size,
        "pairs": done["samples_written"],
        "seconds": done["seconds"],
        "pairs_per_hour": done["samples_written"] / done["seconds"] * 3600,
        "forward": evals["forward"],
        "backward": evals["backward"],
        "by_stage": evals["by_stage"],
        "unet_seconds": teacher.unet_evals.seconds - unet_seconds,
    }


def bench_three_edits(model_dir: Path, inputs: Path, work: Path, steps: int, device: str, teacher) -> dict:
    """Three edits of the same inputs at batch 4: three separate runs, then one shared run."""
    separate = [
        bench_generate(model_dir, inputs, work / f"separate-{i}", 4, steps, device, teacher, [edit])
        for i, edit in enumerate(THREE_EDITS)
    ]
    shared = bench_generate(model_dir, inputs, work / "shared", 4, steps, device, teacher, THREE_EDITS)
    pairs = sum(r["pairs"] for r in separate)
    seconds = sum(r["seconds"] for r in separate)
    return {
        "shared": shared,
        "separate": {
            "pairs": pairs,
            "seconds": seconds,
            "pairs_per_hour": pairs / seconds * 3600,
            "forward": sum(r["forward"] * r["pairs"] for r in separate) / pairs,
            "backward": sum(r["backward"] * r["pairs"] for r in separate) / pairs,
            "unet_seconds": sum(r["unet_seconds"] for r in separate),
        },
    }


def bench_cost(model_dir: Path, inputs: Path, work: Path, steps: int, device: str, names: list[str]) -> dict:
    """Each preset and its fast variant (``teacher.presets.fast_variant``) at the same steps, batch 4:
    UNet forwards, backwards and forward-equivalents (a backward counts as two forwards) per pair,
    and pairs/hour."""
    from p2pz.data.pairs.generate import Settings, ensure_direction, load_teacher, resolve_edits
    from p2pz.teacher.presets import fast_variant, get_preset

    cost: dict[str, dict] = {}
    for name in names:
        for preset in (get_preset(name), fast_variant(get_preset(name))):
            settings = Settings(
                model=str(model_dir), preset=preset.name, device=device, num_sentences=NUM_SENTENCES
            )
            teacher = load_teacher(settings)
            for edit in resolve_edits(dataclasses.replace(settings, edit=["cat:dog"])):
                ensure_direction(teacher, edit, settings)
            bench_generate(model_dir, inputs, work / f"cost-warm-{preset.name}", 4, steps, device, teacher)
            r = bench_generate(model_dir, inputs, work / f"cost-{preset.name}", 4, steps, device, teacher)
            cost[preset.name] = {
                "unet_forward_per_pair": r["forward"],
                "unet_backward_per_pair": r["backward"],
                "forward_equivalents_per_pair": r["forward"] + 2 * r["backward"],
                "pairs_per_hour": round(r["pairs_per_hour"], 1),
                "by_stage": r["by_stage"],
            }
        full, fast = cost[name], cost[fast_variant(get_preset(name)).name]
        fast["cost_ratio_cheap_vs_full"] = round(
            fast["forward_equivalents_per_pair"] / full["forward_equivalents_per_pair"], 4
        )
        fast["pairs_per_hour_cheap_vs_full"] = round(fast["pairs_per_hour"] / full["pairs_per_hour"], 3)
    return cost


def _stages(by_stage: dict) -> str:
    return ", ".join(f"{s} {v['forward']:g}" + (f"+{v['backward']:g} bwd" if v["backward"] else "")
                     for s, v in by_stage.items())  # fmt: skip


def write_reader_data(folder: Path, count: int, size: int) -> None:
    from p2pz.data.pairs.sample import build_sample
    from p2pz.data.pairs.shards import atomic_shard

    rng = np.random.default_rng(1)
    per_shard = 16
    for index in range((count + per_shard - 1) // per_shard):
        with atomic_shard(folder, index) as shard:
            for j in range(min(per_shard, count - index * per_shard)):
                # photo-like content (smooth + noise) so PNG sizes resemble real pairs
                base = rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)
                img = np.asarray(Image.fromarray(base).resize((size, size), Image.BICUBIC)).astype(np.int16)
                img = np.clip(img + rng.integers(-6, 7, img.shape), 0, 255).astype(np.uint8)
                key = f"k{index:04d}_{j:03d}"
                shard.write(build_sample(key, Image.fromarray(img), Image.fromarray(255 - img), {"i": j}))


def bench_reader(folder: Path, batch_size: int, resolution: int, batches: int) -> float:
    from p2pz.data.pairs.reader import list_shards, pair_loader

    loader = pair_loader(
        list_shards(folder),
        batch_size=batch_size,
        resolution=resolution,
        augment=True,
        resampled=True,
        epoch_length=batches + 2,
        num_workers=0,
    )
    iterator = iter(loader)
    for _ in range(2):  # warm-up: first shard open, buffers
        next(iterator)
    start = time.perf_counter()
    count = sum(len(batch["__key__"]) for batch in iterator)
    return count / (time.perf_counter() - start)


def training_step_seconds(batch_size: int, resolution: int, device: str, repeats: int) -> tuple[float, str]:
    """Seconds of one training iteration of the lite student: a generator step (L1 + GAN) and a
    discriminator step, as ``p2pz.student.training.StudentModule.training_step`` does them (without the
    lazy R1 term, which runs one iteration in 16, and without LPIPS, which is off by default)."""
    from p2pz.student.losses import discriminator_gan_loss, generator_gan_loss
    from p2pz.student.networks import Discriminator, Generator

    x = torch.randn(batch_size, 3, resolution, resolution, device=device)
    target = torch.randn(batch_size, 3, resolution, resolution, device=device)
    generator = Generator(resolution=resolution, preset="lite").to(device).train()
    discriminator = Discriminator(resolution=resolution, preset="lite").to(device).train()
    opt_g = torch.optim.Adam(generator.parameters(), 2e-3, betas=(0.0, 0.99))
    opt_d = torch.optim.Adam(discriminator.parameters(), 2e-3, betas=(0.0, 0.99))

    def step():
        fake = generator(x)
        g_loss = 10.0 * (fake - target).abs().mean() + generator_gan_loss(discriminator(x, fake))
        opt_g.zero_grad(set_to_none=True)
        g_loss.backward()
        opt_g.step()
        d_loss = discriminator_gan_loss(discriminator(x, target), discriminator(x, fake.detach()))
        opt_d.zero_grad(set_to_none=True)
        d_loss.backward()
        opt_d.step()

    step()  # warm-up
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(repeats):
        step()
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    what = f"lite student G+D iteration, {sum(p.numel() for p in generator.parameters()) / 1e6:.2f}M-param G"
    return (time.perf_counter() - start) / repeats, what


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--pairs", type=int, default=8, help="pairs per generate measurement (default 8)")
    parser.add_argument("--steps", type=int, default=10, help="teacher DDIM steps (default 10)")
    parser.add_argument("--size", type=int, default=64, help="teacher input size in px (default 64)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--batch", type=int, default=8, help="student batch size (default 8)")
    parser.add_argument("--resolution", type=int, default=256, help="student resolution (default 256)")
    parser.add_argument(
        "--cost-presets", nargs="+", default=["official", "joint"],
        help="presets whose cost is compared with their fast variant's (default: official joint)",
    )  # fmt: skip
    parser.add_argument(
        "--cost-steps", type=int, default=50, help="DDIM steps of that comparison (default 50, the paper's)"
    )
    args = parser.parse_args()

    from p2pz.data.models.tiny import make_tiny
    from p2pz.data.pairs.generate import Settings, ensure_direction, load_teacher, resolve_edits

    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        model_dir = make_tiny(work / "tiny-sd", seed=0)
        inputs = work / "inputs"
        make_inputs(inputs, args.pairs, args.size)
        settings = Settings(
            model=str(model_dir), edit=THREE_EDITS, device=args.device, num_sentences=NUM_SENTENCES
        )
        teacher = load_teacher(settings)
        teacher.unet_evals.timing = True  # seconds inside the UNet, for unet_time_fraction
        for edit in resolve_edits(settings):
            ensure_direction(teacher, edit, settings)  # cached by the teacher
        warm = work / "warm"
        make_inputs(warm, 2, args.size)
        bench_generate(model_dir, warm, work / "warm-up", 2, args.steps, args.device, teacher)

        results = {
            b: bench_generate(model_dir, inputs, work / f"pairs-b{b}", b, args.steps, args.device, teacher)
            for b in (1, 4)
        }
        for r in results.values():
            print(
                f"generate batch {r['batch_size']}: {r['pairs']} pairs in {r['seconds']:.2f} s "
                f"-> {r['pairs_per_hour']:,.0f} pairs/hour (tiny teacher, {args.steps} steps, "
                f"{args.size} px, {args.device})"
            )
        b4 = results[4]
        time_fraction = b4["unet_seconds"] / b4["seconds"]
        teacher.single_branch_reference = False  # the reference pass as before: both CFG branches
        two = bench_generate(model_dir, warm, work / "two-branch", 2, args.steps, args.device, teacher)
        teacher.single_branch_reference = True
        print(
            f"unet_evals_per_pair: {b4['forward']:g} forward + {b4['backward']:g} backward per real-image "
            f"pair ({_stages(b4['by_stage'])}); with both reference branches: {two['forward']:g} forward "
            f"+ {two['backward']:g} backward; {time_fraction:.0%} of the batch-4 run's wall time in the UNet"
        )

        three = bench_three_edits(model_dir, inputs, work, args.steps, args.device, teacher)
        shared, separate = three["shared"], three["separate"]
        for name, r in (("separate runs", separate), ("one shared run", shared)):
            print(
                f"3 edits, {name}: {r['pairs']} pairs in {r['seconds']:.2f} s -> {r['pairs_per_hour']:,.0f} "
                f"pairs/hour, {r['forward']:g} forward + {r['backward']:g} backward UNet evaluations per "
                f"pair, {r['unet_seconds'] / r['pairs'] * 1000:.0f} ms of UNet and "
                f"{(r['seconds'] - r['unet_seconds']) / r['pairs'] * 1000:.0f} ms of the rest per pair"
            )

        cost = bench_cost(model_dir, inputs, work, args.cost_steps, args.device, args.cost_presets)
        for name, c in cost.items():
            print(
                f"{name} at {args.cost_steps} steps: {c['unet_forward_per_pair']:g} forward + "
                f"{c['unet_backward_per_pair']:g} backward = {c['forward_equivalents_per_pair']:g} "
                f"forward-equivalents per pair ({_stages(c['by_stage'])}), "
                f"{c['pairs_per_hour']:,.0f} pairs/hour"
                + (
                    f"; cost ratio to the full preset {c['cost_ratio_cheap_vs_full']:g}"
                    if "cost_ratio_cheap_vs_full" in c
                    else ""
                )
            )

        reader_dir = work / "reader"
        write_reader_data(reader_dir, 64, 512)
        reader_rate = bench_reader(reader_dir, args.batch, args.resolution, batches=24)
        print(
            f"reader: {reader_rate:.1f} samples/s (512 px PNG pairs -> {args.resolution} px, augment, "
            f"1 process)"
        )

        step_s, what = training_step_seconds(args.batch, args.resolution, args.device, repeats=3)
        consumed = args.batch / step_s
        print(
            f"training step: {step_s * 1000:.0f} ms for batch {args.batch} at {args.resolution} px "
            f"= {consumed:.1f} samples/s consumed; timed: {what}"
        )
        ratio = reader_rate / consumed
        print(f"reader / training = {ratio:.2f} (with N DataLoader workers the reader scales about N times)")

    print(
        json.dumps(
            {
                "pairs_per_hour_b1": round(results[1]["pairs_per_hour"], 1),
                "pairs_per_hour_b4": round(results[4]["pairs_per_hour"], 1),
                "batch4_speedup": round(results[4]["pairs_per_hour"] / results[1]["pairs_per_hour"], 3),
                "steps": args.steps,
                "unet_evals_per_pair": b4["forward"],
                "unet_backward_evals_per_pair": b4["backward"],
                "unet_evals_per_pair_by_stage": b4["by_stage"],
                "unet_evals_per_pair_two_branch_reference": two["forward"],
                "unet_time_fraction": round(time_fraction, 3),
                "unet_evals_per_pair_3_edits_shared": round(shared["forward"], 3),
                "unet_evals_per_pair_3_edits_separate": round(separate["forward"], 3),
                "unet_backward_evals_per_pair_3_edits_shared": round(shared["backward"], 3),
                "unet_backward_evals_per_pair_3_edits_separate": round(separate["backward"], 3),
                "unet_evals_3_edits_shared_to_separate": round(shared["forward"] / separate["forward"], 3),
                "pairs_per_hour_3_edits_shared": round(shared["pairs_per_hour"], 1),
                "pairs_per_hour_3_edits_separate": round(separate["pairs_per_hour"], 1),
                "pairs_per_hour_3_edits_shared_to_separate": round(
                    shared["pairs_per_hour"] / separate["pairs_per_hour"], 3
                ),
                "reader_samples_per_s": round(reader_rate, 2),
                "training_samples_per_s": round(consumed, 2),
                "reader_to_training_ratio": round(ratio, 3),
                "training_step_timed": what,
                "teacher_cost": {
                    name: {k: v for k, v in c.items() if k != "by_stage"} for name, c in cost.items()
                },
                "cost_ratio_cheap_vs_full": max(
                    c["cost_ratio_cheap_vs_full"] for c in cost.values() if "cost_ratio_cheap_vs_full" in c
                ),
                "cost_steps": args.cost_steps,
                "device": args.device,
            }
        )
    )


if __name__ == "__main__":
    main()
