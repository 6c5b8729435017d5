"""The teacher's cost per pair against its quality, one saving at a time (#38), on the shapes world.

    python benchmarks/cheap_teacher.py [--preset box_edges] [--edits circle:square red:blue]
        [--scenes 10] [--shares 0.3 0.5 0.7] [--xa-guidance 2] [--steps 50]

1. **Maps**: how far the inversion's cross-attention maps (``reference_maps="inversion"``) are from
   the reference pass's at the same edit step, on the first edit's scenes: per step, the relative
   distance ``|M_inv - M_ref| / |M_ref|`` (all layers, the caption's branch), beside the distance
   between the reference pass's own maps at adjacent steps (what one step changes them by).
2. **Tries**: each edit's scenes edited by the preset as it is and by each saving alone and together
   (``fused_prediction``; ``reference_maps="inversion"``; ``guided_share`` at each of ``--shares``;
   ``fast``: ``teacher.presets.fast_variant``), all at one guidance step (``--xa-guidance``, the
   preset's calibrated step on the toy model: 2, docs/results/toy-ablation.md). Each try: its
   forward-equivalents per pair (UNet forwards + 2 x backwards, counted by hooks) and its ratio to
   the full preset's, then success · IoU · median centre shift over the scenes.

The last line is one JSON object: ``maps`` (median relative distances) and ``tries`` (per edit and
try: the cost and the scores). Results: docs/results/cheap-teacher.md.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
from pathlib import Path

import numpy as np

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

TOY_MODEL = Path(__file__).resolve().parents[1] / "data" / "toy_model"


def map_distances(teacher, scenes, num_steps: int) -> dict[str, list[float]]:
    """Per edit step: |M_inv - M_ref| / |M_ref| and |M_ref(i+1) - M_ref(i)| / |M_ref(i)| over the
    scenes (the caption's branch of each map, every layer summed)."""
    import torch

    from p2pz.data.shapes import world
    from p2pz.teacher.editing import _Passes, _reference_step, make_scheduler
    from p2pz.teacher.images import prepare_image
    from p2pz.teacher.inversion import invert

    images = [prepare_image(world.render(s), teacher.resolution) for s in scenes]
    generators = [torch.Generator().manual_seed(i) for i in range(len(scenes))]
    latents = teacher.encode_images(images, generators)
    cond = teacher.encode_text([s.caption for s in scenes])
    sched = make_scheduler(teacher.scheduler_config, num_steps, "cpu")
    maps = teacher.maps
    maps.clear()
    x = invert(
        teacher.unet, teacher.scheduler_config, latents, cond, teacher.preset, generators, num_steps,
        maps=maps, record={int(t): i for i, t in enumerate(sched.timesteps)},
    )  # fmt: skip
    from_inversion = dict(maps.reference)
    maps.clear()
    passes = _Passes.build(cond, cond, torch.zeros_like(cond), 1, False, True)  # the caption alone
    from_pass = {}
    for i, t in enumerate(sched.timesteps):
        with maps.recording(i):
            x = _reference_step(teacher.unet, sched, x, t, passes, 1.0)
        from_pass.update(maps.reference)
        maps.clear()
    inv = [
        _distance(from_inversion, i, from_pass, i)
        for i in range(num_steps)
        if (i, _first(from_pass)) in from_inversion
    ]
    adjacent = [_distance(from_pass, i + 1, from_pass, i) for i in range(num_steps - 1)]
    return {"inversion_vs_reference_pass": inv, "reference_pass_adjacent_steps": adjacent}


def _first(maps: dict) -> str:
    return next(iter(maps))[1]


def _distance(a: dict, step_a: int, b: dict, step_b: int) -> float:
    """|a(step_a) - b(step_b)| / |b(step_b)| over every layer's map."""
    layers = [layer for step, layer in b if step == step_b]
    diff = sum(float((a[(step_a, k)].float() - b[(step_b, k)].float()).pow(2).sum()) for k in layers)
    norm = sum(float(b[(step_b, k)].float().pow(2).sum()) for k in layers)
    return (diff / norm) ** 0.5


def tries(preset, shares: list[float], strides: list[int]) -> dict:
    """The preset, each saving alone, and all of them (``fast_variant``; with each stride, every
    stride-th step guided over the whole trajectory instead of the first half)."""
    from p2pz.teacher.presets import fast_variant

    named = {"full": preset, "fused_prediction": dataclasses.replace(preset, fused_prediction=True)}
    named["reference_maps=inversion"] = dataclasses.replace(preset, reference_maps="inversion")
    for share in shares:
        named[f"guided_share={share:g}"] = dataclasses.replace(preset, guided_share=share)
    for stride in strides:
        named[f"guided_stride={stride}"] = dataclasses.replace(preset, guided_stride=stride)
    named["fast"] = fast_variant(preset)
    for stride in strides:
        named[f"fast, stride {stride}"] = fast_variant(preset, guided_share=1.0, guided_stride=stride)
    return named


def run_try(teacher, edit, scenes, direction, args) -> dict:
    """One try on one edit's scenes: forward-equivalents per pair and the scores."""
    from p2pz.data.eval.ablation import edit_world_scenes
    from p2pz.teacher.evals import evals_between, per_pair

    before = teacher.unet_evals.snapshot()
    result = edit_world_scenes(
        teacher, edit, scenes, "direction_xa", num_steps=args.steps, xa_guidance=args.xa_guidance,
        guidance_scale=args.guidance_scale, direction=direction, batch_size=args.batch_size,
    )  # fmt: skip
    evals = per_pair(evals_between(before, teacher.unet_evals.snapshot()), len(scenes))
    summary = result.summary()
    return {
        "forward_equivalents_per_pair": evals["forward"] + 2 * evals["backward"],
        "success": summary["success"],
        "iou": summary["iou"],
        "centre_shift_px": summary["centre_shift_px"],
        "seconds": summary["seconds"],
    }


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    import torch

    from p2pz.data.shapes.edits import parse_world_edit, world_direction
    from p2pz.teacher import Pix2PixZero
    from p2pz.teacher.presets import get_preset

    if args.threads:
        torch.set_num_threads(args.threads)
    edits = [parse_world_edit(e, args.model) for e in args.edits]
    base = get_preset(args.preset)
    teacher = Pix2PixZero.from_pretrained(args.model, preset=base, captioner=False)
    maps = {}
    if not args.skip_maps:
        maps = map_distances(teacher, edits[0].scenes(args.map_scenes, seed=args.seed), args.steps)
        _print_maps(maps)
    out: dict[str, dict] = {}
    for edit in edits:
        scenes = edit.scenes(args.scenes, seed=args.seed)
        direction = world_direction(teacher, edit)
        out[edit.name] = {}
        for name, preset in tries(base, args.shares, args.strides).items():
            if args.tries and name not in args.tries and name != "full":
                continue
            teacher.preset = preset
            r = run_try(teacher, edit, scenes, direction, args)
            full = out[edit.name].get("full", r)["forward_equivalents_per_pair"]
            r["cost_ratio"] = round(r["forward_equivalents_per_pair"] / full, 4)
            out[edit.name][name] = r
            print(
                f"{edit.name} {name}: {r['forward_equivalents_per_pair']:g} forward-equivalents per pair "
                f"({r['cost_ratio']:.2f} x full) · success {r['success']:.2f} · IoU {r['iou']:.3f} · "
                f"shift {_px(r['centre_shift_px'])} px · {r['seconds']:.0f} s",
                flush=True,
            )
        teacher.preset = base
    medians = {k: round(float(np.median(v)), 4) for k, v in maps.items()}
    print(json.dumps({"preset": base.name, "steps": args.steps, "maps": medians, "tries": out}))
    return 0


def _px(shift: float | None) -> str:
    return "none found" if shift is None else f"{shift:.2g}"


def _print_maps(maps: dict[str, list[float]]) -> None:
    inv, adjacent = maps["inversion_vs_reference_pass"], maps["reference_pass_adjacent_steps"]
    thirds = np.array_split(np.arange(len(inv)), 3)
    parts = ", ".join(f"{np.median([inv[i] for i in part]):.3f}" for part in thirds)
    print(
        f"maps: inversion vs reference pass, relative distance median {np.median(inv):.3f} "
        f"(by thirds of the trajectory, first to last: {parts}); the reference pass's adjacent steps "
        f"differ by {np.median(adjacent):.3f}",
        flush=True,
    )


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python benchmarks/cheap_teacher.py",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--model", default=str(TOY_MODEL), help="toy model folder (default: the shipped one)")
    parser.add_argument("--preset", default="box_edges", help="the full preset (default: box_edges)")
    parser.add_argument("--edits", nargs="+", default=["circle:square", "red:blue"])
    parser.add_argument("--scenes", type=int, default=10, help="scenes per edit and try (default 10)")
    parser.add_argument("--map-scenes", type=int, default=4, help="scenes of the maps' distance (default 4)")
    parser.add_argument("--shares", type=float, nargs="+", default=[0.3, 0.5, 0.7], help="guided shares")
    parser.add_argument("--strides", type=int, nargs="+", default=[2], help="guided strides (default 2)")
    parser.add_argument("--tries", nargs="+", help="run only these tries (and full, the ratios' base)")
    parser.add_argument("--skip-maps", action="store_true", help="leave out the maps' distance")
    parser.add_argument("--xa-guidance", type=float, default=2.0, help="guidance step (default 2)")
    parser.add_argument("--guidance-scale", type=float, default=3.0, help="CFG (default 3, the toy's)")
    parser.add_argument("--steps", type=int, default=50, help="DDIM steps (default 50)")
    parser.add_argument("--batch-size", type=int, default=5)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (default: torch's)")
    return parser


if __name__ == "__main__":
    raise SystemExit(main())
