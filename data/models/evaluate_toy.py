"""Check a trained toy model with the oracle: does it draw what captions say, and how do plain
word-swap edits behave (the baseline pix2pix-zero has to beat)?

1. Generation: DDIM 50 steps at a few classifier-free guidance scales, ``--per-caption`` images
   for each caption of the training distribution; the oracle reads shape, colour and background.
2. Word swap: renders of the world are DDIM-inverted with their caption (no guidance), then
   regenerated with one word swapped (circle → square, red → blue). Success means the oracle reads
   the target word and everything else kept; shift is how far the object's bounding-box centre
   moved from the input render (and from a reconstruction at the same guidance scale).

    python -m p2pz.data.models.evaluate_toy --model data/toy_model

The last printed line is one JSON object with every figure.
"""

from __future__ import annotations

import argparse
import itertools
import json
import time

import numpy as np

from p2pz.data.shapes import oracle, world


def load_pipeline(model: str):
    import torch
    from diffusers import DDIMScheduler, StableDiffusionPipeline
    from diffusers.models.attention_processor import AttnProcessor

    pipe = StableDiffusionPipeline.from_pretrained(model, local_files_only=True, dtype=torch.float32)
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    pipe.unet.set_attn_processor(AttnProcessor())
    pipe.vae.set_attn_processor(AttnProcessor())
    pipe.set_progress_bar_config(disable=True)
    return pipe


def toy_scenes_by_caption() -> list[world.Scene]:
    """One scene (for its caption) per shape × colour × background of the training distribution."""
    return [
        world.Scene((world.ShapeObject(s, c, (32.0, 32.0), 30.0),), world.Background("plain", (b,)))
        for s, c, b in itertools.product(world.TOY_SHAPES, world.TOY_COLOURS, world.TOY_BACKGROUNDS)
    ]


def generation_accuracy(pipe, per_caption: int, guidance: float, steps: int, seed: int) -> dict:
    import torch

    scenes = [s for s in toy_scenes_by_caption() for _ in range(per_caption)]
    gen = torch.Generator().manual_seed(seed)
    images = []
    for i in range(0, len(scenes), 48):
        chunk = [s.caption for s in scenes[i : i + 48]]
        images += pipe(
            chunk, num_inference_steps=steps, guidance_scale=guidance, generator=gen, output_type="np"
        ).images.tolist()
    readings = [oracle.read(np.asarray(im, dtype=np.float32)) for im in images]
    shape = [
        len(r.objects) == 1 and r.objects[0].shape == s.objects[0].shape for r, s in zip(readings, scenes)
    ]
    colour = [
        len(r.objects) == 1 and r.objects[0].colour == s.objects[0].colour for r, s in zip(readings, scenes)
    ]
    background = [r.background.matches(s.background) for r, s in zip(readings, scenes)]
    ious = [r.objects[0].template_iou for r in readings if r.objects]
    return {
        "images": len(scenes),
        "shape": float(np.mean(shape)),
        "colour": float(np.mean(colour)),
        "background": float(np.mean(background)),
        "all": float(np.mean([a and b and c for a, b, c in zip(shape, colour, background)])),
        "template_iou": float(np.mean(ious)) if ious else 0.0,
    }


def encode_prompts(pipe, captions: list[str]):
    import torch

    tok = pipe.tokenizer(
        captions,
        padding="max_length",
        max_length=pipe.tokenizer.model_max_length,
        truncation=True,
        return_tensors="pt",
    )
    with torch.no_grad():
        return pipe.text_encoder(tok.input_ids)[0]


def ddim_invert(pipe, images: np.ndarray, captions: list[str], steps: int):
    """Image → the DDIM noise that regenerates it under ``captions`` (no guidance)."""
    import torch
    from diffusers import DDIMInverseScheduler

    inverse = DDIMInverseScheduler.from_config(pipe.scheduler.config)
    inverse.set_timesteps(steps)
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1
    context = encode_prompts(pipe, captions)
    with torch.no_grad():
        latents = pipe.vae.encode(x).latent_dist.mean * pipe.vae.config.scaling_factor
        for t in inverse.timesteps:
            eps = pipe.unet(latents, t, encoder_hidden_states=context).sample
            latents = inverse.step(eps, t, latents).prev_sample
    return latents


def regenerate(pipe, latents, captions: list[str], guidance: float, steps: int) -> list[np.ndarray]:
    out = pipe(
        captions,
        latents=latents.clone(),
        num_inference_steps=steps,
        guidance_scale=guidance,
        output_type="np",
    ).images
    return [np.asarray(im, dtype=np.float32) for im in out]


def _centre_shift(a: oracle.Reading, b: oracle.Reading) -> float:
    if not a.objects or not b.objects:
        return float("nan")
    (ax, ay), (bx, by) = a.objects[0].centre, b.objects[0].centre
    return float(np.hypot(ax - bx, ay - by))


def word_swap(pipe, edit: str, scenes_count: int, guidances: list[float], steps: int, seed: int) -> dict:
    """Invert renders with their caption, regenerate with one word swapped; score with the oracle."""
    source, target = edit.split("-")
    attribute = "shape" if source in world.SHAPES else "colour"
    kwargs = {"shapes": (source,)} if attribute == "shape" else {"colours": (source,)}
    scenes = [world.sample_scene(np.random.default_rng([seed, i]), **kwargs) for i in range(scenes_count)]
    edited_scenes = [s.replace_object(0, **{attribute: target}) for s in scenes]
    images = np.stack([np.asarray(world.render(s)) for s in scenes])
    inputs = [oracle.read(im) for im in images]
    latents = ddim_invert(pipe, images, [s.caption for s in scenes], steps)
    results = {}
    for g in guidances:
        recon_images = regenerate(pipe, latents, [s.caption for s in scenes], g, steps)
        recon = [oracle.read(im) for im in recon_images]
        edits = regenerate(pipe, latents, [s.caption for s in edited_scenes], g, steps)
        edit_reads = [oracle.read(im) for im in edits]
        ok = [oracle.score(im, s).all_right for im, s in zip(edits, edited_scenes)]
        results[f"cfg{g:g}"] = {
            "success": float(np.mean(ok)),
            "reconstruction_ok": float(
                np.mean([oracle.score(im, s).all_right for im, s in zip(recon_images, scenes)])
            ),
            "centre_shift_px": float(np.nanmedian([_centre_shift(a, b) for a, b in zip(inputs, edit_reads)])),
            "centre_shift_vs_recon_px": float(
                np.nanmedian([_centre_shift(a, b) for a, b in zip(recon, edit_reads)])
            ),
            "recon_shift_px": float(np.nanmedian([_centre_shift(a, b) for a, b in zip(inputs, recon)])),
            "mask_iou": float(
                np.nanmean(
                    [
                        (a.objects[0].mask & b.objects[0].mask).sum()
                        / max((a.objects[0].mask | b.objects[0].mask).sum(), 1)
                        if a.objects and b.objects
                        else np.nan
                        for a, b in zip(inputs, edit_reads)
                    ]
                )
            ),
        }
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m p2pz.data.models.evaluate_toy",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--model", default="data/toy_model", help="toy model folder")
    parser.add_argument("--per-caption", type=int, default=4, help="generated images per caption")
    parser.add_argument(
        "--guidance", type=float, nargs="+", default=[3.0, 5.0], help="CFG scales for generation"
    )
    parser.add_argument(
        "--edit-guidance", type=float, nargs="+", default=[1.0, 3.0], help="CFG scales for edits"
    )
    parser.add_argument("--edits", nargs="+", default=["circle:square", "red:blue"], help="word swaps")
    parser.add_argument("--scenes", type=int, default=48, help="scenes per edit")
    parser.add_argument("--steps", type=int, default=50, help="DDIM steps")
    parser.add_argument("--seed", type=int, default=1234)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)

    import torch

    torch.set_num_threads(args.threads)
    pipe = load_pipeline(args.model)
    report: dict = {"generation": {}, "word_swap": {}}
    for g in args.guidance:
        t = time.time()
        report["generation"][f"cfg{g:g}"] = r = generation_accuracy(
            pipe, args.per_caption, g, args.steps, args.seed
        )
        print(f"generation cfg {g:g}: {r} ({time.time() - t:.0f} s)", flush=True)
    for edit in args.edits:
        t = time.time()
        report["word_swap"][edit] = r = word_swap(
            pipe, edit, args.scenes, args.edit_guidance, args.steps, args.seed
        )
        print(f"word swap {edit}: {r} ({time.time() - t:.0f} s)", flush=True)
    print(json.dumps(report))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
