"""Train the shapes world's toy text-to-image model from scratch on a CPU, within a time budget.

The result is a diffusers Stable Diffusion folder (tokenizer, CLIPTextModel, AutoencoderKL
64 → 16×16×4, UNet2DConditionModel, DDIM scheduler with SD's values) that
``StableDiffusionPipeline.from_pretrained(out)`` loads as it is, plus a captioner folder.

Stages (with ``--resume``, each continues from its checkpoint in ``.NAME.train_state`` beside
the output folder, e.g. after a crash):
  1. tokenizer for the world's words;
  2. VAE: L1 + L2 reconstruction with object pixels weighted 5×, a tiny KL term;
  3. the VAE's decoder alone, encoder frozen (``--decoder-steps``): the same reconstruction loss
     on posterior samples, so the decoder draws sharper edges while the latent space the UNet
     learns stays the one the encoder made (Stability's ft-MSE decoders for SD-1.x do the same);
     ``--finetune-decoder`` runs this stage alone on a trained model folder;
  4. latents of a fixed set of renders, and the latent scaling factor (1 / their std);
  5. UNet + text encoder jointly: epsilon prediction, Min-SNR-5 weighting, 10% caption dropout
     (for classifier-free guidance), EMA 0.999, cosine learning rate; bf16 autocast where the CPU
     computes bf16 natively (``--precision auto``: oneDNN's check, AVX-512 CPUs), float32 elsewhere:
     on an AVX2 CPU autocast emulates bf16 and a UNet step takes about 13x longer than in float32
     (docs/shapes-world.md, "Retraining the toy model on another CPU").

Budget: each stage plans its number of steps from the measured speed so that it ends on time
with its cosine schedule complete; if the machine slows down, the plan shrinks (the schedule is a
function of progress, so it still ends at its final value). Pass ``--vae-steps`` and
``--unet-steps`` to fix the plan (``OUT/train_log.json`` records the steps of every run):
with fixed steps and seed, a run is reproducible.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from p2pz.data.models.tiny import SD14_SCHEDULER
from p2pz.utils.cpu import bf16_is_native

if TYPE_CHECKING:
    import torch
    from diffusers import DDIMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

log = logging.getLogger("train_toy")
DECODER_STEPS = 4000  # stage 3's default (the shipped model's: its train_log.json)
DECODER_LR = 5e-4  # stage 3's peak learning rate (a quarter of the VAE's: it starts trained)


# ---------------------------------------------------------------------------------------------
# Models


def make_vae():
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 3,
        up_block_types=("UpDecoderBlock2D",) * 3,
        block_out_channels=(16, 32, 64),  # three blocks: two downsamplings, 64 -> 16
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=4,  # 16 groups on 16 channels turned red into brown
        sample_size=64,
    )


def make_text_encoder(tokenizer):
    from transformers import CLIPTextConfig, CLIPTextModel

    config = CLIPTextConfig(
        vocab_size=len(tokenizer),
        hidden_size=128,
        intermediate_size=512,
        num_hidden_layers=3,
        num_attention_heads=4,
        max_position_embeddings=tokenizer.model_max_length,
        projection_dim=128,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    return CLIPTextModel(config)


def make_unet():
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(
        sample_size=16,
        in_channels=4,
        out_channels=4,
        block_out_channels=(64, 128, 128),
        layers_per_block=1,
        # cross-attention at 16×16 and 8×8, a plain block at 4×4, plus the mid-block
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=128,
        attention_head_dim=2,  # in diffusers this is the number of heads; few heads are cheap on a CPU
    )


def use_classic_attention(*models) -> None:
    """The classic attention processor: SDPA is slow at these sizes on a CPU."""
    from diffusers.models.attention_processor import AttnProcessor

    for m in models:
        m.set_attn_processor(AttnProcessor())


# ---------------------------------------------------------------------------------------------
# Helpers


class Budget:
    """Plans a stage's steps so that it ends by ``deadline`` (wall clock).

    The speed is measured over the recent steps (the first few, slower ones are skipped) and the
    plan follows it; the learning-rate schedule is a function of ``step / planned``, so it ends at
    its final value when the time runs out. ``fixed_steps`` turns planning off.
    """

    def __init__(self, deadline: float, fixed_steps: int | None, max_steps: int, warmup_steps: int = 10):
        self.deadline, self.fixed, self.max_steps, self.warmup_steps = (
            deadline,
            fixed_steps,
            max_steps,
            warmup_steps,
        )
        self.planned = fixed_steps or max_steps
        self.marks: list[tuple[int, float]] = []
        self.t0, self.s0 = time.time(), 0

    def start_timing(self, step: int) -> None:
        self.t0, self.s0 = time.time(), step
        self.marks = []

    def update(self, step: int) -> int:
        if step - self.s0 < self.warmup_steps:
            return self.planned
        self.marks = (self.marks + [(step, time.time())])[-200:]
        if self.fixed or len(self.marks) < 5:
            return self.planned
        (s_a, t_a), (s_b, t_b) = self.marks[0], self.marks[-1]
        per_step = (t_b - t_a) / (s_b - s_a)
        left = max(self.deadline - time.time(), 0.0)
        # never past the deadline; at least one more step while time is left
        self.planned = min(self.max_steps, step + int(left / per_step))
        if left > 0:
            self.planned = max(self.planned, step + 1)
        return self.planned

    def seconds_per_step(self) -> float:
        if len(self.marks) < 2:
            return float("nan")
        (s_a, t_a), (s_b, t_b) = self.marks[0], self.marks[-1]
        return (t_b - t_a) / (s_b - s_a)

    def over(self, step: int) -> bool:
        return step >= self.planned


PRECISIONS = ("auto", "bf16", "fp32")


def resolve_precision(precision: str) -> str:
    """``--precision``: ``auto`` -> ``bf16`` where the CPU has it natively, else ``fp32``."""
    if precision == "auto":
        return "bf16" if bf16_is_native() else "fp32"
    return precision


def cosine_lr(step: int, planned: int, peak: float, final: float, warmup: int) -> float:
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, planned - warmup))
    return final + 0.5 * (peak - final) * (1 + math.cos(math.pi * progress))


def render_batch(seeds, **scene_kwargs):
    """Images in [-1, 1] (B, 3, 64, 64), object masks (B, 1, 64, 64) and captions for scene seeds."""
    import torch

    from p2pz.data.shapes import world

    images, masks, captions = [], [], []
    for seed in seeds:
        scene = world.sample_scene(int(seed), **scene_kwargs)
        image, coverages = world.render_with_masks(scene)
        images.append(image)
        masks.append(np.clip(np.sum(coverages, axis=0), 0, 1))
        captions.append(scene.caption)
    x = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).float() / 127.5 - 1
    m = torch.from_numpy(np.stack(masks)).float()[:, None]
    return x, m, captions


def save_state(path: Path, state: dict) -> None:
    import torch

    tmp = path.with_suffix(".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)


# ---------------------------------------------------------------------------------------------
# Stages


def train_vae(args, state_dir: Path, deadline: float):
    import torch
    from diffusers import AutoencoderKL

    done = state_dir / "vae"
    if done.is_dir():
        log.info("VAE: found a trained one in %s", done)
        vae = AutoencoderKL.from_pretrained(done)
        return vae, json.loads((state_dir / "vae_log.json").read_text())

    torch.manual_seed(args.seed)
    vae = make_vae()
    use_classic_attention(vae)
    log.info("VAE: %.2fM parameters", sum(p.numel() for p in vae.parameters()) / 1e6)
    opt = torch.optim.AdamW(vae.parameters(), lr=2e-3, weight_decay=0.0)
    budget = Budget(deadline, args.vae_steps, max_steps=4000)
    step, batch, t_start = 0, 16, time.time()
    ckpt = state_dir / "vae_ckpt.pt"
    if args.resume and ckpt.exists():
        saved = torch.load(ckpt, weights_only=True)  # tensors and plain values only: runs no code
        vae.load_state_dict(saved["model"])
        opt.load_state_dict(saved["opt"])
        step, budget.planned = saved["step"], saved["planned"]
        log.info("VAE: resumed at step %d", step)
    budget.start_timing(step)
    last_save = time.time()
    vae.train()
    while not budget.over(step):
        lr = cosine_lr(step, budget.planned, 2e-3, 1e-4, warmup=20)
        for g in opt.param_groups:
            g["lr"] = lr
        rng = np.random.default_rng([args.seed, 1, step])
        x, m, _ = render_batch(rng.integers(0, 2**31, size=batch) + 10_000_000)
        posterior = vae.encode(x).latent_dist
        recon = vae.decode(posterior.sample()).sample
        loss = reconstruction_loss(recon, x, m) + 1e-6 * posterior.kl().mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        opt.step()
        step += 1
        budget.update(step)
        if step % 50 == 0:
            psnr = -10 * math.log10(float(((recon.detach() - x) / 2).pow(2).mean()) + 1e-12)
            log.info(
                "VAE step %d/%d loss %.4f psnr %.1f dB lr %.2e (%.2f s/step)",
                step,
                budget.planned,
                loss.item(),
                psnr,
                lr,
                budget.seconds_per_step(),
            )
        if time.time() - last_save > 120:
            save_state(
                ckpt,
                {"model": vae.state_dict(), "opt": opt.state_dict(), "step": step, "planned": budget.planned},
            )
            last_save = time.time()
    vae.eval()
    vae_log = {"steps": step, "batch": batch, "seconds": round(time.time() - t_start, 1)}
    vae.save_pretrained(done)
    (state_dir / "vae_log.json").write_text(json.dumps(vae_log))
    ckpt.unlink(missing_ok=True)
    return vae, vae_log


def finetune_decoder(args, vae, state_dir: Path):
    """Stage 3: ``args.decoder_steps`` steps on the decoder (and ``post_quant_conv``), encoder frozen.

    The latents a decoder sees are the encoder's, so fine-tuning it leaves the UNet's data as they
    were. Every draw (scenes, posterior noise) comes from the seed and the step. Returns the VAE (in
    eval mode, every weight trainable again) and the stage's log entry (None when it has no steps).
    """
    import torch
    from diffusers import AutoencoderKL

    if not args.decoder_steps:
        return vae, None
    done, ckpt = state_dir / "vae_decoder", state_dir / "decoder_ckpt.pt"
    if done.is_dir():
        log.info("decoder: found a fine-tuned one in %s", done)
        return AutoencoderKL.from_pretrained(done), json.loads((state_dir / "decoder_log.json").read_text())
    vae.requires_grad_(False)
    params = [*vae.decoder.parameters(), *vae.post_quant_conv.parameters()]
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.AdamW(params, lr=DECODER_LR, weight_decay=0.0)
    step, batch, t_start = 0, 16, time.time()
    if args.resume and ckpt.exists():
        saved = torch.load(ckpt, weights_only=True)  # tensors and plain values only: runs no code
        vae.load_state_dict(saved["model"])
        opt.load_state_dict(saved["opt"])
        step = saved["step"]
        log.info("decoder: resumed at step %d", step)
    last_save = time.time()
    vae.train()
    while step < args.decoder_steps:
        for g in opt.param_groups:
            g["lr"] = cosine_lr(step, args.decoder_steps, DECODER_LR, DECODER_LR / 25, warmup=20)
        rng = np.random.default_rng([args.seed, 2, step])
        x, m, _ = render_batch(rng.integers(0, 2**31, size=batch) + 20_000_000)
        with torch.no_grad():
            posterior = vae.encode(x).latent_dist
            z = posterior.sample(generator=torch.Generator().manual_seed(args.seed * 104_729 + step))
        recon = vae.decode(z).sample
        loss = reconstruction_loss(recon, x, m)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        step += 1
        if step % 100 == 0:
            psnr = -10 * math.log10(float(((recon.detach() - x) / 2).pow(2).mean()) + 1e-12)
            log.info("decoder step %d/%d loss %.4f psnr %.1f dB", step, args.decoder_steps, loss.item(), psnr)
        if time.time() - last_save > 120:
            save_state(ckpt, {"model": vae.state_dict(), "opt": opt.state_dict(), "step": step})
            last_save = time.time()
    vae.requires_grad_(True).eval()
    decoder_log = {"steps": step, "batch": batch, "seconds": round(time.time() - t_start, 1)}
    vae.save_pretrained(done)
    (state_dir / "decoder_log.json").write_text(json.dumps(decoder_log))
    ckpt.unlink(missing_ok=True)
    return vae, decoder_log


def reconstruction_loss(recon: torch.Tensor, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """L1 + L2, object pixels weighted 5×: they are what the oracle reads."""
    weight = 1 + 4 * mask
    return (weight * ((recon - x).abs() + (recon - x) ** 2)).mean()


def encode_dataset(args, vae, state_dir: Path):
    """Latent posterior (mean, std) and captions of ``args.scenes`` fixed renders."""
    import torch
    from tqdm import tqdm

    path = state_dir / "latents.pt"
    if path.exists():
        return torch.load(path, weights_only=True)  # tensors and captions only: runs no code
    means, stds, captions = [], [], []
    chunk = 256
    with torch.no_grad():
        for start in tqdm(range(0, args.scenes, chunk), desc="encoding renders", mininterval=10):
            seeds = range(start, min(start + chunk, args.scenes))
            x, _, caps = render_batch([args.seed * 1_000_003 + s for s in seeds])
            dist = vae.encode(x).latent_dist
            means.append(dist.mean)
            stds.append(dist.std)
            captions += caps
    mean = torch.cat(means)
    data = {
        "mean": mean,
        "std": torch.cat(stds),
        "captions": captions,
        "scaling_factor": float(1.0 / mean.std()),
    }
    save_state(path, data)
    return data


def train_unet(
    args: argparse.Namespace,
    data: dict[str, Any],
    tokenizer: CLIPTokenizer,
    state_dir: Path,
    deadline: float,
) -> tuple[UNet2DConditionModel, CLIPTextModel, DDIMScheduler, dict[str, Any]]:
    """Stage 4: the UNet and the text encoder jointly on ``data`` (``encode_dataset``) until ``deadline``.

    Returns the EMA weights (in eval mode), the scheduler and the stage's log entry.
    """
    import torch
    from diffusers import DDIMScheduler

    nets = _UNetTraining.create(args, tokenizer)
    scheduler = DDIMScheduler(**SD14_SCHEDULER)
    batches = _NoisyBatches(args, data, tokenizer, scheduler)

    budget = Budget(deadline, args.unet_steps, max_steps=20000)
    step, t_start = 0, time.time()
    ckpt = state_dir / "unet_ckpt.pt"
    if args.resume and ckpt.exists():
        saved = torch.load(ckpt, weights_only=True)  # tensors and plain values only: runs no code
        nets.load_state_dict(saved)
        step, budget.planned = saved["step"], saved["planned"]
        log.info("UNet: resumed at step %d of %d", step, budget.planned)
    budget.start_timing(step)
    last_save = time.time()
    nets.unet.train()
    nets.text_encoder.train()
    while not budget.over(step):
        lr = cosine_lr(step, budget.planned, args.lr, args.lr * 0.1, warmup=100)
        for g in nets.opt.param_groups:
            g["lr"] = lr
        loss = nets.step(*batches.sample(step), weight=batches.min_snr_weight)
        nets.update_ema(decay=min(args.ema, (1 + step) / (10 + step)))  # short memory while young
        step += 1
        budget.update(step)
        if step % 20 == 0:
            log.info(
                "UNet step %d/%d loss %.4f lr %.2e (%.2f s/step, %.1f min left)",
                step,
                budget.planned,
                loss,
                lr,
                budget.seconds_per_step(),
                (deadline - time.time()) / 60,
            )
        if time.time() - last_save > args.checkpoint_minutes * 60:
            save_state(ckpt, {**nets.state_dict(), "step": step, "planned": budget.planned})
            last_save = time.time()
            log.info("checkpoint saved at step %d", step)
    precision = "bf16" if nets.bf16 else "fp32"
    unet_log = {
        "steps": step,
        "batch": args.batch,
        "precision": precision,
        "seconds": round(time.time() - t_start, 1),
    }
    return nets.ema_unet.eval(), nets.ema_text.eval(), scheduler, unet_log


@dataclass
class _UNetTraining:
    """The UNet stage's live networks, their EMA copies and the optimiser: what a checkpoint holds."""

    unet: UNet2DConditionModel
    text_encoder: CLIPTextModel
    ema_unet: UNet2DConditionModel
    ema_text: CLIPTextModel
    opt: torch.optim.Optimizer
    params: list[torch.nn.Parameter]
    bf16: bool = False  # autocast the forward pass to bf16 (``resolve_precision``)

    @classmethod
    def create(cls, args: argparse.Namespace, tokenizer: CLIPTokenizer) -> _UNetTraining:
        """Fresh networks from ``args.seed`` (+1: other draws than the VAE's), AdamW and EMA copies."""
        import copy

        import torch

        torch.manual_seed(args.seed + 1)
        unet, text_encoder = make_unet(), make_text_encoder(tokenizer)
        use_classic_attention(unet)
        log.info(
            "UNet: %.2fM parameters, text encoder %.2fM",
            sum(p.numel() for p in unet.parameters()) / 1e6,
            sum(p.numel() for p in text_encoder.parameters()) / 1e6,
        )
        params = list(unet.parameters()) + list(text_encoder.parameters())
        opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.01)
        ema_unet = copy.deepcopy(unet).requires_grad_(False)
        ema_text = copy.deepcopy(text_encoder).requires_grad_(False)
        bf16 = resolve_precision(args.precision) == "bf16"
        log.info("UNet stage in %s", "bf16 autocast" if bf16 else "float32")
        return cls(unet, text_encoder, ema_unet, ema_text, opt, params, bf16)

    def _checkpointed(self) -> dict[str, Any]:
        """Checkpoint key -> part: the one list that saving and resuming share."""
        return {
            "unet": self.unet,
            "text": self.text_encoder,
            "ema_unet": self.ema_unet,
            "ema_text": self.ema_text,
            "opt": self.opt,
        }

    def state_dict(self) -> dict[str, Any]:
        """The state of every checkpointed part, under its checkpoint key."""
        return {key: part.state_dict() for key, part in self._checkpointed().items()}

    def load_state_dict(self, saved: dict[str, Any]) -> None:
        """Restore every checkpointed part from a checkpoint."""
        for key, part in self._checkpointed().items():
            part.load_state_dict(saved[key])

    def step(
        self,
        noisy: torch.Tensor,
        noise: torch.Tensor,
        t: torch.Tensor,
        input_ids: torch.Tensor,
        *,
        weight: torch.Tensor,
    ) -> float:
        """One optimiser step on the epsilon-prediction loss, ``weight``ed per timestep; the loss."""
        import torch
        import torch.nn.functional as F

        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=self.bf16):
            context = self.text_encoder(input_ids)[0]
            pred = self.unet(noisy, t, encoder_hidden_states=context).sample
        per_sample = F.mse_loss(pred.float(), noise, reduction="none").mean(dim=(1, 2, 3))
        loss = (per_sample * weight[t]).mean()
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.params, 1.0)
        self.opt.step()
        return loss.item()

    def update_ema(self, decay: float) -> None:
        """Move the EMA copies ``1 - decay`` of the way towards the live networks."""
        import torch

        with torch.no_grad():
            for ema, live in ((self.ema_unet, self.unet), (self.ema_text, self.text_encoder)):
                for pe, pl in zip(ema.parameters(), live.parameters()):
                    pe.lerp_(pl, 1 - decay)


class _NoisyBatches:
    """The UNet's training batches: noised latents of random renders, drawn from a per-step seed."""

    def __init__(
        self,
        args: argparse.Namespace,
        data: dict[str, Any],
        tokenizer: CLIPTokenizer,
        scheduler: DDIMScheduler,
    ) -> None:
        """Token ids of the captions and the per-timestep loss weights, computed once."""
        import torch

        self.args, self.data, self.scheduler = args, data, scheduler
        snr = scheduler.alphas_cumprod / (1 - scheduler.alphas_cumprod)
        self.min_snr_weight = torch.clamp(snr, max=5.0) / snr  # Min-SNR-5 for epsilon prediction
        # Token ids of every caption, and of the empty caption (for classifier-free guidance).
        self.ids = tokenizer(
            data["captions"],
            padding="max_length",
            max_length=tokenizer.model_max_length,
            truncation=True,
            return_tensors="pt",
        ).input_ids
        self.empty = tokenizer(
            [""], padding="max_length", max_length=tokenizer.model_max_length, return_tensors="pt"
        ).input_ids

    def sample(self, step: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """(noised latents, their noise, timesteps, token ids with 10% captions dropped) of ``step``.

        The draws depend on the step alone, so a resumed run continues with the same batches.
        """
        import torch

        args, data = self.args, self.data
        gen = torch.Generator().manual_seed(args.seed * 7_919 + step)
        idx = torch.randint(0, len(data["captions"]), (args.batch,), generator=gen)
        latents = (
            data["mean"][idx] + data["std"][idx] * torch.randn(data["mean"][idx].shape, generator=gen)
        ) * data["scaling_factor"]
        noise = torch.randn(latents.shape, generator=gen)
        t = torch.randint(0, self.scheduler.config.num_train_timesteps, (args.batch,), generator=gen)
        drop = torch.rand(args.batch, generator=gen) < 0.1
        input_ids = torch.where(drop[:, None], self.empty, self.ids[idx])
        return self.scheduler.add_noise(latents, noise, t), noise, t, input_ids


def write_model(out: Path, vae, text_encoder, unet, scheduler, scaling_factor: float) -> None:
    """The Stable Diffusion folder, plus the world's captioner and the vocabulary it was trained on."""
    from p2pz.data.models.tiny import save_sd_folder
    from p2pz.data.shapes.captioner import write_captioner_folder
    from p2pz.data.shapes.edits import write_vocabulary
    from p2pz.data.shapes.world import scene_words

    vae.register_to_config(scaling_factor=scaling_factor)
    from diffusers.models.attention_processor import AttnProcessor

    for m in (vae, unet):  # save plain modules (processors are a runtime choice)
        m.set_attn_processor(AttnProcessor())
    words = scene_words()
    save_sd_folder(out, vae=vae, text_encoder=text_encoder, unet=unet, scheduler=scheduler, words=words)
    write_captioner_folder(out / "captioner")
    write_vocabulary(out)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m p2pz.data.models.train_toy",
        description="Train the shapes world's toy text-to-image model (a diffusers Stable Diffusion "
        "folder) from scratch on a CPU within a time budget. The repository ships one in data/toy_model; "
        "you only need this to retrain it.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--out", required=True, type=Path, help="output model folder (written when done)")
    parser.add_argument("--minutes", type=float, default=55.0, help="total wall-time budget for all stages")
    parser.add_argument("--vae-minutes", type=float, default=5.0, help="share of the budget for the VAE")
    parser.add_argument("--seed", type=int, default=0, help="seed of scenes, initialisation and noise")
    parser.add_argument(
        "--vae-steps",
        type=int,
        default=None,
        help="fix the VAE's steps; unset: as many as fit its time budget",
    )
    parser.add_argument(
        "--unet-steps",
        type=int,
        default=None,
        help="fix the UNet's steps; unset: as many as fit the time budget",
    )
    parser.add_argument(
        "--decoder-steps",
        type=int,
        default=DECODER_STEPS,
        help="steps fine-tuning the VAE's decoder alone (encoder frozen: the UNet's latents stay the "
        "same); 0: none",
    )
    parser.add_argument(
        "--finetune-decoder",
        action="store_true",
        help="run only the decoder stage on the trained model in --out and replace its VAE there "
        "(the shipped model before this stage: --out data/toy_model)",
    )
    parser.add_argument("--scenes", type=int, default=24_000, help="renders encoded for UNet training")
    parser.add_argument("--batch", type=int, default=64, help="UNet batch size")
    parser.add_argument("--lr", type=float, default=8e-4, help="UNet + text encoder peak learning rate")
    parser.add_argument("--ema", type=float, default=0.999, help="EMA decay of the saved weights")
    parser.add_argument(
        "--precision",
        choices=PRECISIONS,
        default="auto",
        help="the UNet stage's forward pass: bf16 autocast or float32; auto: bf16 where the CPU has it "
        "natively (AVX-512), float32 elsewhere (emulated bf16 is ~13x slower than float32 on AVX2)",
    )
    parser.add_argument("--threads", type=int, default=2, help="CPU threads (torch.set_num_threads)")
    parser.add_argument("--checkpoint-minutes", type=float, default=3.0, help="minutes between checkpoints")
    parser.add_argument(
        "--resume",
        action="store_true",
        help="continue from the checkpoints in .OUTNAME.train_state (beside OUT) after a crash",
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    if args.finetune_decoder and not (args.out / "vae").is_dir():
        parser.error(f"--finetune-decoder needs a trained model folder in --out; {args.out} has no vae/")
    if args.finetune_decoder:
        try:  # before anything is written
            trained_vae = load_toy_vae(args.out / "vae")
        except ValueError as err:
            parser.error(str(err))

    import torch

    torch.set_num_threads(args.threads)
    start = time.time()
    out: Path = args.out
    state_dir = out.parent / f".{out.name}.train_state"
    if state_dir.exists() and not args.resume:
        shutil.rmtree(state_dir)
    state_dir.mkdir(parents=True, exist_ok=True)
    handler = logging.FileHandler(state_dir / "train.log")
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(message)s", handlers=[logging.StreamHandler(), handler]
    )
    if args.finetune_decoder:
        log.info("fine-tuning the decoder of %s for %d steps", out, args.decoder_steps)
        finetune_model_decoder(args, trained_vae, state_dir)
    else:
        log.info("training the toy model into %s with %.0f minutes (seed %d)", out, args.minutes, args.seed)
        train_model(args, state_dir, start)
    shutil.rmtree(state_dir, ignore_errors=True)
    log.info("done in %.1f min: %s", (time.time() - start) / 60, out)
    return 0


def train_model(args: argparse.Namespace, state_dir: Path, start: float) -> None:
    """Every stage, then the model folder in ``args.out`` (written whole or not at all)."""
    from p2pz.data.shapes.tokenizer import build_tokenizer
    from p2pz.utils.atomic import atomic_path

    tokenizer = build_tokenizer()
    vae, vae_log = train_vae(args, state_dir, deadline=start + args.vae_minutes * 60)
    vae, decoder_log = finetune_decoder(args, vae, state_dir)
    data = encode_dataset(args, vae, state_dir)
    log.info("latent scaling factor %.3f", data["scaling_factor"])
    unet, text_encoder, scheduler, unet_log = train_unet(
        args, data, tokenizer, state_dir, deadline=start + args.minutes * 60 - 30
    )
    record = {
        "seed": args.seed,
        "vae": vae_log,
        "decoder": decoder_log,
        "unet": unet_log,
        "scenes": args.scenes,
        "lr": args.lr,
        "ema": args.ema,
        "minutes": round((time.time() - start) / 60, 1),
    }
    with atomic_path(args.out) as tmp:
        write_model(tmp, vae, text_encoder, unet, scheduler, data["scaling_factor"])
        write_train_log(tmp, record, args.out)
        shutil.copy(state_dir / "train.log", tmp / "train.log")


def load_toy_vae(folder: Path):
    """The toy model's VAE saved in ``folder``, as a fresh module (its saved config is then the one
    training writes); ``ValueError`` in one line when the folder holds something else."""
    from safetensors.torch import load_file

    weights = folder / "diffusion_pytorch_model.safetensors"
    try:
        scaling_factor = json.loads((folder / "config.json").read_text())["scaling_factor"]
        vae = make_vae()
        vae.load_state_dict(load_file(weights))
    except (OSError, KeyError, ValueError, RuntimeError) as err:
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ValueError(f"{folder} does not hold the toy model's VAE ({reason})") from None
    vae.register_to_config(scaling_factor=scaling_factor)
    use_classic_attention(vae)
    return vae


def finetune_model_decoder(args: argparse.Namespace, vae, state_dir: Path) -> None:
    """``--finetune-decoder``: stage 3 alone on ``vae``, the model's in ``args.out``, with its seed;
    the folder is replaced whole (new VAE weights, the stage in ``train_log.json``) or not at all."""
    from p2pz.utils.atomic import atomic_path

    out: Path = args.out
    record = json.loads((out / "train_log.json").read_text()) if (out / "train_log.json").exists() else {}
    args.seed = record.get("seed", args.seed)
    vae, record["decoder"] = finetune_decoder(args, vae, state_dir)
    with atomic_path(out) as tmp:
        shutil.copytree(out, tmp)
        shutil.rmtree(tmp / "vae")
        vae.save_pretrained(tmp / "vae", safe_serialization=True)
        write_train_log(tmp, record, out)
        with open(tmp / "train.log", "a") as model_log:  # the stage's lines after the training's
            model_log.write((state_dir / "train.log").read_text())


def write_train_log(folder: Path, record: dict[str, Any], out: Path) -> None:
    """``folder/train_log.json``: the stages' steps and times, and the command that reproduces the
    model (into ``out``, where the folder lands)."""
    steps = {stage: (record.get(stage) or {}).get("steps", 0) for stage in ("vae", "decoder", "unet")}
    record["reproduce"] = (
        f"python -m p2pz.data.models.train_toy --out {out} --seed {record.get('seed', 0)} "
        f"--vae-steps {steps['vae']} --decoder-steps {steps['decoder']} --unet-steps {steps['unet']}"
        # runs before --precision was recorded trained in bf16
        f" --precision {(record.get('unet') or {}).get('precision', 'bf16')}"
    )
    (folder / "train_log.json").write_text(json.dumps(record, indent=1) + "\n")


if __name__ == "__main__":
    raise SystemExit(main())
