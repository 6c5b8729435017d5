"""``Pix2PixZero``: the whole pix2pix-zero edit of real or synthetic images, batch-correct.

Stages (each in its own module): captioning (``captioning``), edit directions (``directions``),
regularised DDIM inversion (``inversion``), reference + cross-attention-guided edit passes
(``editing``, ``attention``). Numbers come from a preset (``presets.PRESETS``; listed with their
sources in docs/teacher.md).

Real images::

    t = Pix2PixZero.from_pretrained("CompVis/stable-diffusion-v1-4")
    d = t.direction("cat", "dog")
    [out] = t.edit([Image.open("cat.png")], [d], seeds=0)
    out.edited.save("dog.png")

Every sample of a batch carries its own caption, direction and seed (its own generator: VAE
posterior sample, then the inversion's roll shifts), and gives what a single run gives.
``edit_shared`` makes several edits of the same images from one caption, inversion and reference
pass per image. ``unet_evals`` counts the UNet evaluations of every stage (``evals``).
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import math
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from PIL import Image

from p2pz.teacher.attention import CrossAttentionMaps
from p2pz.teacher.editing import edit_with_guidance, guided_steps, make_scheduler
from p2pz.teacher.evals import UNetEvals, evals_between, per_pair
from p2pz.teacher.images import numpy_to_pil, pil_to_tensor, prepare_image, tensor_to_numpy
from p2pz.teacher.inversion import invert
from p2pz.teacher.presets import Preset, get_preset
from p2pz.utils.errors import UserError

if TYPE_CHECKING:
    from p2pz.teacher.directions import EditDirection

log = logging.getLogger(__name__)

SHARED_VAE_NOISE_SEED = 0  # the VAE posterior's noise of every image under vae_posterior="shared"


@dataclass
class EditResult:
    edited: Image.Image
    # the reference pass (what the unedited caption gives from x_T); None when the preset takes its
    # reference maps from the inversion and runs no reference pass
    reconstruction: Image.Image | None
    source: Image.Image  # the input as resized / the generated image (synthetic mode)
    caption: str
    seed: int
    inverted_latent: torch.Tensor | None  # x_T [4, h, w] on the CPU, with return_latents=True
    timings: dict[str, float] = field(default_factory=dict)  # seconds of the batch, per stage
    finite: bool = True  # False when the edit or the reconstruction has NaN/inf (e.g. fp16 blow-up)
    edited_latent: torch.Tensor | None = None  # final edit latent [4, h, w], with return_latents=True
    # UNet evaluations per pair of the call that made it (``p2pz.teacher.evals.per_pair``)
    unet_evals: dict[str, Any] = field(default_factory=dict)


@dataclass
class _Batch:
    """One teacher call's samples: x_T, embeddings, directions of every edit ``[E * B, 77, D]``."""

    x_T: torch.Tensor
    uncond: torch.Tensor
    cond: torch.Tensor
    dirs: torch.Tensor
    sources: list[Image.Image] | None
    captions: list[str]
    seeds: list[int]
    latents: torch.Tensor | None = None  # the inputs' clean latents (real images), for guidance terms
    maps_from_inversion: bool = False  # the inversion recorded the guided steps' reference maps


class Pix2PixZero:
    """The pix2pix-zero teacher on a Stable Diffusion 1.x model (see the module docstring)."""

    def __init__(
        self,
        components: Any,
        preset: str | Preset = "official",
        captioner: str | os.PathLike | bool | None = None,
        model: str = "",
    ) -> None:
        self.preset = get_preset(preset)
        self.model = model or str(components.source)
        self.tokenizer = components.tokenizer
        self.text_encoder = components.text_encoder
        self.unet = components.unet
        self.vae = components.vae
        self.scheduler_config = dict(components.scheduler_config)
        if self.scheduler_config.get("prediction_type", "epsilon") != "epsilon":
            raise UserError(
                f"model '{self.model}' predicts {self.scheduler_config['prediction_type']}; pix2pix-zero "
                "here supports epsilon-prediction models (Stable Diffusion 1.x)"
            )
        self.device = self.unet.device
        self.dtype = self.unet.dtype
        self.vae_scale_factor = 2 ** (len(self.vae.config.block_out_channels) - 1)
        self.resolution = int(self.unet.config.sample_size) * self.vae_scale_factor
        # Cross-attention capture on attn2 only; attn1 keeps its (SDPA) processor.
        self.maps = CrossAttentionMaps()
        self.guided_layers = self.maps.install(self.unet)
        self._captioner_spec = self._resolve_captioner(captioner)
        self._captioner = None
        self._directions: dict[tuple, Any] = {}
        self.progress = False  # tqdm bars over the timesteps (the CLI turns them on)
        # UNet evaluations per stage, counted by hooks on the module (``p2pz.teacher.evals``)
        self.unet_evals = UNetEvals(self.unet)
        # one reference branch when both CFG branches are the same (real images): same results
        self.single_branch_reference = True

    # ------------------------------------------------------------------------------------------
    # Construction and provenance

    @classmethod
    def from_pretrained(
        cls,
        path_or_id: str | os.PathLike,
        preset: str | Preset = "official",
        device: Any = "cpu",
        dtype: Any = torch.float32,
        captioner: str | os.PathLike | bool | None = None,
    ) -> Pix2PixZero:
        """Load an SD 1.x folder or Hub id (``p2pz.teacher.models``: clear errors for bad paths / offline).

        ``captioner``: None -> ``path_or_id/captioner`` if present, else the preset's BLIP id;
        a path or id; or False (then every edit needs its captions).
        """
        from p2pz.teacher.models import load_sd_components

        preset = get_preset(preset)  # fail on a bad preset before loading anything
        components = load_sd_components(path_or_id, device=device, dtype=dtype)
        return cls(components, preset, captioner=captioner, model=str(path_or_id))

    def _resolve_captioner(self, captioner: str | os.PathLike | bool | None) -> str | None:
        if captioner is False:
            return None
        if captioner is None or captioner is True:
            bundled = Path(self.model).expanduser() / "captioner"
            return str(bundled) if bundled.is_dir() else self.preset.captioner
        return str(captioner)

    @functools.cached_property
    def fingerprint(self) -> str:
        """sha256 of the tokenizer vocabulary, the scheduler config and the weights of the text
        encoder, UNet and VAE (as float32 on the CPU: the same model in fp16 on a GPU matches)."""
        h = hashlib.sha256()
        h.update(json.dumps(self.tokenizer.get_vocab(), sort_keys=True, ensure_ascii=False).encode())
        config = {k: v for k, v in self.scheduler_config.items() if not k.startswith("_")}
        h.update(json.dumps(config, sort_keys=True, default=str).encode())
        for part, module in (("text_encoder", self.text_encoder), ("unet", self.unet), ("vae", self.vae)):
            for name, tensor in sorted(module.state_dict().items()):
                t = tensor.detach().to("cpu", torch.float32).contiguous()
                h.update(f"{part}.{name}:{list(t.shape)}".encode())
                h.update(t.numpy().tobytes())
        return h.hexdigest()

    @functools.cached_property
    def text_encoder_fingerprint(self) -> str:
        from p2pz.teacher.directions import text_encoder_fingerprint

        return text_encoder_fingerprint(self.tokenizer, self.text_encoder)

    @property
    def settings(self) -> dict[str, Any]:
        """Every setting in use, JSON-serialisable (the preset's values plus what the model fixes)."""
        return {
            "model": self.model,
            "preset": self.preset.to_dict(),
            "resolution": self.resolution,
            "latent_size": self.resolution // self.vae_scale_factor,
            "device": str(self.device),
            "dtype": str(self.dtype).removeprefix("torch."),
            "captioner": self._captioner_spec,
            "scheduler": "DDIMScheduler (eta 0)",
            "scheduler_config": {k: v for k, v in self.scheduler_config.items() if not k.startswith("_")},
            "guided_layers": len(self.guided_layers),
            "image_rule": "RGB (alpha on white); shorter side to resolution (Lanczos), centre square crop",
        }

    # ------------------------------------------------------------------------------------------
    # Captions and directions

    def caption(self, images: Sequence[Image.Image]) -> list[str]:
        """Captions of ``images`` with the configured BLIP captioner (loaded on first use)."""
        if self._captioner_spec is None:
            raise UserError("no captioner is configured (captioner=False); pass captions for every image")
        if self._captioner is None:
            from p2pz.teacher.captioning import load_captioner

            self._captioner = load_captioner(
                self._captioner_spec, self.preset.captioner_style, self.device, self.dtype
            )
        return list(self._captioner([prepare_image(im, self.resolution) for im in images]))

    def direction(
        self,
        source: str,
        target: str,
        num_sentences: int | None = None,
        seed: int = 0,
        sentences: str = "template",
    ) -> EditDirection:
        """Edit direction source -> target from sentence banks (``p2pz.teacher.sentences``), cached."""
        from p2pz.teacher.directions import compute_direction
        from p2pz.teacher.sentences import DEFAULT_NUM_SENTENCES, make_sentences

        n = num_sentences or DEFAULT_NUM_SENTENCES
        key = (source, target, n, seed, sentences)
        if key not in self._directions:
            src = make_sentences(source, sentences, n, seed, device=self.device)
            tgt = make_sentences(target, sentences, n, seed, device=self.device)
            self._directions[key] = compute_direction(
                self.tokenizer,
                self.text_encoder,
                src,
                tgt,
                source=source,
                target=target,
                model=self.model,
                metadata={"sentences": sentences, "seed": seed},
            )
        return self._directions[key]

    @torch.no_grad()
    def encode_text(self, texts: Sequence[str]) -> torch.Tensor:
        """CLIP ``last_hidden_state`` ``[B, 77, D]`` in the UNet's dtype (max-length padding, no mask)."""
        ids = self.tokenizer(
            list(texts),
            padding="max_length",
            max_length=self.tokenizer.model_max_length,
            truncation=True,
            return_tensors="pt",
        ).input_ids.to(self.text_encoder.device)
        return self.text_encoder(ids, attention_mask=None)[0].to(self.device, self.dtype)

    # ------------------------------------------------------------------------------------------
    # Editing

    def edit(
        self,
        images: Sequence[Image.Image],
        directions: Sequence[Any],
        captions: Sequence[str] | None = None,
        seeds: Sequence[int] | int = 0,
        num_steps: int | None = None,
        xa_guidance: float | None = None,
        guidance_scale: float | None = None,
        return_latents: bool = False,
    ) -> list[EditResult]:
        """Edit real images: caption (unless given), invert, reference + guided edit passes.

        One direction (or caption, or seed) may be given for the whole batch. Images are
        converted by ``p2pz.teacher.images`` (RGB, shorter side to the model's resolution, centre crop).
        """
        return self.edit_shared(
            images, [directions], captions, seeds, num_steps, xa_guidance, guidance_scale, return_latents
        )[0]

    def edit_shared(
        self,
        images: Sequence[Image.Image],
        edits: Sequence[Any],
        captions: Sequence[str] | None = None,
        seeds: Sequence[int] | int = 0,
        num_steps: int | None = None,
        xa_guidance: float | None = None,
        guidance_scale: float | None = None,
        return_latents: bool = False,
    ) -> list[list[EditResult]]:
        """Several edits of the same real images: each image is captioned, inverted and run through
        the reference pass once, and every edit's guided pass compares against those maps (all edits
        in one batch: ``len(images) * len(edits)`` samples). ``edits[e]``: edit ``e``'s direction, or
        its directions per image. Returns ``results[e][i]``, what ``edit`` gives for edit e of image i.
        """
        timings: dict[str, float] = {}
        start = time.perf_counter()
        before = self.unet_evals.snapshot()
        n = len(images)
        if n == 0:
            return [[] for _ in edits]
        sources = [prepare_image(im, self.resolution) for im in images]
        seeds = self._per_sample([seeds] if isinstance(seeds, int) else seeds, n, "seeds")
        dirs = self._edit_tensors(edits, n)
        if captions is None:
            tic = time.perf_counter()
            captions = self.caption(sources)
            timings["caption"] = time.perf_counter() - tic
        captions = self._per_sample(captions, n, "captions")
        num_steps, xa, cfg = self._resolve(num_steps, xa_guidance, guidance_scale, synthetic=False)
        generators = [torch.Generator().manual_seed(int(s)) for s in seeds]

        tic = time.perf_counter()
        latents = self.encode_images(sources, generators)
        cond = self.encode_text(captions)
        uncond = self._negative_embeddings(cond)
        timings["encode"] = time.perf_counter() - tic

        tic = time.perf_counter()
        record = self._maps_to_record(num_steps, xa)
        self.maps.clear()
        x_T = invert(
            self.unet, self.scheduler_config, latents, cond, self.preset, generators, num_steps,
            uncond=self.encode_text([""] * n) if self.preset.inversion_guidance_scale > 1 else None,
            progress=self.progress, maps=self.maps, record=record,
        )  # fmt: skip
        timings["inversion"] = time.perf_counter() - tic
        batch = _Batch(
            x_T, uncond, cond, dirs, sources, captions, seeds, latents, maps_from_inversion=bool(record)
        )
        return self._edit_and_decode(
            batch, num_steps, cfg, xa, timings, start, before, return_latents,
        )  # fmt: skip

    def _maps_to_record(self, num_steps: int, xa: float) -> dict[int, int]:
        """UNet timestep -> edit step, for the inversion to record the guided steps' reference maps
        (``reference_maps="inversion"``; empty otherwise, and for unguided edits, whose reference
        pass gives the reconstruction)."""
        preset = self.preset
        guided = guided_steps(num_steps, preset.guided_share, preset.guided_stride, xa)
        if preset.reference_maps != "inversion" or not guided:
            return {}
        timesteps = make_scheduler(self.scheduler_config, num_steps, "cpu").timesteps
        return {int(timesteps[i]): i for i in guided}

    def edit_synthetic(
        self,
        prompts: Sequence[str],
        directions: Sequence[Any],
        seeds: Sequence[int] | int = 0,
        num_steps: int | None = None,
        xa_guidance: float | None = None,
        guidance_scale: float | None = None,
        return_latents: bool = False,
    ) -> list[EditResult]:
        """Generate images from seeded noise and prompts (negative prompt ""), and edit them.

        ``source`` and ``reconstruction`` of the results are the generated (unedited) images.
        """
        return self.edit_synthetic_shared(
            prompts, [directions], seeds, num_steps, xa_guidance, guidance_scale, return_latents
        )[0]

    def edit_synthetic_shared(
        self,
        prompts: Sequence[str],
        edits: Sequence[Any],
        seeds: Sequence[int] | int = 0,
        num_steps: int | None = None,
        xa_guidance: float | None = None,
        guidance_scale: float | None = None,
        return_latents: bool = False,
    ) -> list[list[EditResult]]:
        """Several edits of the same generated images (one reference pass), as ``edit_shared``."""
        timings: dict[str, float] = {}
        start = time.perf_counter()
        before = self.unet_evals.snapshot()
        n = len(prompts)
        if n == 0:
            return [[] for _ in edits]
        seeds = self._per_sample([seeds] if isinstance(seeds, int) else seeds, n, "seeds")
        dirs = self._edit_tensors(edits, n)
        num_steps, xa, cfg = self._resolve(num_steps, xa_guidance, guidance_scale, synthetic=True)
        size = self.resolution // self.vae_scale_factor
        channels = self.unet.config.in_channels
        x_T = torch.cat(
            [
                torch.randn((1, channels, size, size), generator=torch.Generator().manual_seed(int(s)))
                for s in seeds
            ]
        ).to(self.device)  # float32: the passes keep their latents in float32
        cond = self.encode_text(list(prompts))
        uncond = self.encode_text([""] * n)  # edit_synthetic.py: negative_prompt=""
        return self._edit_and_decode(
            _Batch(x_T, uncond, cond, dirs, None, list(prompts), seeds),
            num_steps, cfg, xa, timings, start, before, return_latents,
        )  # fmt: skip

    def _negative_embeddings(self, cond: torch.Tensor) -> torch.Tensor:
        """The negative prompt's embeddings of real-image edits whose captions embed as ``cond``:
        the caption itself, or the empty prompt's with the preset's share of the caption."""
        if self.preset.negative_prompt_real == "caption":
            return cond
        empty = self.encode_text([""] * cond.shape[0])
        weight = self.preset.negative_caption_weight
        return empty if weight == 0 else weight * cond + (1 - weight) * empty

    def _edit_and_decode(
        self, batch: _Batch, num_steps, cfg, xa, timings, start, before, return_latents
    ) -> list[list[EditResult]]:
        tic = time.perf_counter()
        out = edit_with_guidance(
            self.unet, self.maps, self.scheduler_config, batch.x_T, batch.uncond, batch.cond, batch.dirs,
            num_steps, cfg, xa, progress=self.progress, guided_branch=self.preset.guided_branch,
            single_branch_reference=self.single_branch_reference, terms=self.preset.guidance_terms,
            clean_latents=batch.latents, decode=self.decode_with_grad, guided_share=self.preset.guided_share,
            fused_prediction=self.preset.fused_prediction, maps_from_inversion=batch.maps_from_inversion,
            guided_stride=self.preset.guided_stride,
        )  # fmt: skip
        timings["edit"] = time.perf_counter() - tic
        tic = time.perf_counter()
        n = len(batch.seeds)
        edited = [im for chunk in out.edited.split(n) for im in numpy_to_pil(self.decode_latents(chunk))]
        recon = (
            numpy_to_pil(self.decode_latents(out.reconstruction)) if out.reconstruction is not None else None
        )
        timings["decode"] = time.perf_counter() - tic
        timings["total"] = time.perf_counter() - start
        timings["batch_size"] = float(n)
        evals = per_pair(evals_between(before, self.unet_evals.snapshot()), len(edited))
        recon_finite = [bool(torch.isfinite(r).all()) for r in out.reconstruction] if recon else [True] * n
        results: list[list[EditResult]] = []
        for e in range(len(edited) // n):
            results.append([])
            for i in range(n):
                j = e * n + i
                finite = bool(torch.isfinite(out.edited[j]).all()) and recon_finite[i]
                if not finite:
                    log.warning("edit %d (seed %s) is not finite (NaN/inf latents)", i, batch.seeds[i])
                results[e].append(
                    EditResult(
                        edited=edited[j],
                        reconstruction=recon[i] if recon else None,
                        source=batch.sources[i] if batch.sources is not None else recon[i],
                        caption=batch.captions[i],
                        seed=int(batch.seeds[i]),
                        inverted_latent=batch.x_T[i].detach().float().cpu() if return_latents else None,
                        timings=dict(timings),
                        finite=finite,
                        edited_latent=out.edited[j].detach().float().cpu() if return_latents else None,
                        unet_evals=evals,
                    )
                )
        return results

    # ------------------------------------------------------------------------------------------
    # VAE

    @torch.no_grad()
    def encode_images(
        self, images: Sequence[Image.Image], generators: Sequence[torch.Generator]
    ) -> torch.Tensor:
        """Scaled float32 VAE latents, each sampled from its posterior with its own generator (seeded,
        unlike the official code; drawn on the CPU as diffusers' ``randn_tensor`` does), or with the
        one draw ``SHARED_VAE_NOISE_SEED`` gives (``preset.vae_posterior == "shared"``; the
        generators are then untouched)."""
        x = pil_to_tensor(list(images)).to(self.vae.device, self.vae.dtype)
        dist = self.vae.encode(x).latent_dist

        def draw(generator: torch.Generator) -> torch.Tensor:
            return torch.randn(dist.mean[:1].shape, generator=generator, dtype=dist.mean.dtype)

        if self.preset.vae_posterior == "shared":  # one draw, the same for every image
            noise = draw(torch.Generator().manual_seed(SHARED_VAE_NOISE_SEED)).expand_as(dist.mean)
        else:
            noise = torch.cat([draw(g) for g in generators])
        noise = noise.to(dist.mean.device)
        # float32 from here on: the inversion keeps its latents in float32 (see ``invert``)
        return (dist.mean.float() + dist.std.float() * noise.float()) * self.vae.config.scaling_factor

    def decode_with_grad(self, latents: torch.Tensor) -> torch.Tensor:
        """Latents -> images ``[B, 3, H, W]`` in [-1, 1], with gradients (for guidance terms in pixels)."""
        return self.vae.decode(latents.to(self.vae.dtype) / self.vae.config.scaling_factor).sample

    @torch.no_grad()
    def decode_latents(self, latents: torch.Tensor):
        """Latents -> ``[B, H, W, 3]`` float32 numpy images in [0, 1]."""
        return tensor_to_numpy(self.decode_with_grad(latents))

    # ------------------------------------------------------------------------------------------
    # Argument checks

    def _resolve(self, num_steps, xa_guidance, guidance_scale, synthetic: bool) -> tuple[int, float, float]:
        num_steps = int(num_steps or self.preset.num_steps)
        if not 2 <= num_steps <= int(self.scheduler_config.get("num_train_timesteps", 1000)) // 2:
            raise UserError(f"num_steps must be between 2 and 500, got {num_steps}")
        xa = float(self.preset.xa_guidance(synthetic) if xa_guidance is None else xa_guidance)
        cfg = float(self.preset.guidance_scale if guidance_scale is None else guidance_scale)
        if not (math.isfinite(xa) and xa >= 0):  # a NaN passes `xa < 0` and edits into noise
            raise UserError(f"xa_guidance must be a finite number >= 0, got {xa}")
        if not math.isfinite(cfg):
            raise UserError(f"guidance_scale must be a finite number, got {cfg}")
        return num_steps, xa, cfg

    @staticmethod
    def _per_sample(values: Sequence[Any], n: int, what: str) -> list[Any]:
        values = list(values)
        if len(values) == 1 and n > 1:
            return values * n
        if len(values) != n:
            raise UserError(f"got {n} images but {len(values)} {what}; give one per image (or one for all)")
        return values

    def _edit_tensors(self, edits: Sequence[Any], n: int) -> torch.Tensor:
        """Every edit's per-sample directions, edit-major: ``[len(edits) * n, 77, D]``."""
        if not len(edits):
            raise UserError("give at least one edit direction")
        per_edit = []
        for directions in edits:
            directions = directions if isinstance(directions, (list, tuple)) else [directions]
            per_edit.append(self._direction_tensors(self._per_sample(directions, n, "directions")))
        return torch.cat(per_edit)

    def _direction_tensors(self, directions: Sequence[EditDirection]) -> torch.Tensor:
        tensors = []
        for d in directions:
            theirs = d.metadata.get("text_encoder_fingerprint")
            d.check_compatible(self.text_encoder, self.text_encoder_fingerprint if theirs else None)
            tensors.append(d.tensor)
        return torch.stack(tensors).to(self.device, self.dtype)
