"""A tiny random-weight Stable Diffusion (+ BLIP captioner) that tests and the default run use.

``make_tiny(out)`` writes a complete diffusers-format Stable Diffusion 1.x folder with the same
layout, component classes and scheduler config as ``CompVis/stable-diffusion-v1-4``, only with a
few channels, random weights drawn from a seed, and a byte-level CLIP tokenizer (so every word
tokenizes, and different words embed differently). Beside it, ``out/captioner`` holds a tiny
random BLIP captioner (BlipForConditionalGeneration + BlipProcessor). Everything is built
offline, in a couple of seconds on a CPU, and the same seed writes the same bytes.

Layout written::

    OUT/model_index.json          StableDiffusionPipeline, no safety checker
    OUT/unet/ vae/ text_encoder/  config.json + *.safetensors
    OUT/tokenizer/                tokenizer.json, vocab.json, merges.txt, tokenizer_config.json
    OUT/scheduler/                DDIMScheduler with the SD-1.4 values
    OUT/captioner/                tiny BLIP (model + processor)
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from p2pz.teacher.clip_tokenizer import (
    BOS,
    EOS,
    MODEL_MAX_LENGTH,
    build_tokenizer,
    build_vocab,
    save_tokenizer,
)
from p2pz.utils.atomic import atomic_path

# Shapes: SD-like but tiny. The VAE halves the resolution three times (factor 8, as SD);
# the UNet has cross-attention (attn2) at two down/up resolutions plus the mid block.
TEXT_HIDDEN = 32  # = UNet cross_attention_dim (SD 1.x: 768)
DEFAULT_IMAGE_SIZE = 64  # px; any multiple of 8 works
VAE_SCALING_FACTOR = 0.18215  # SD 1.x latent scale

# The scheduler config of CompVis/stable-diffusion-v1-4 (scheduler/scheduler_config.json),
# loaded as DDIM the way the official pix2pix-zero scripts do.
SD14_SCHEDULER = dict(
    num_train_timesteps=1000,
    beta_start=0.00085,
    beta_end=0.012,
    beta_schedule="scaled_linear",
    clip_sample=False,
    set_alpha_to_one=False,
    steps_offset=1,
    prediction_type="epsilon",
)

# Words the tiny captioner can say: enough for caption-like gibberish around the test concepts.
CAPTION_WORDS = (
    "a an the of picture photography photo image with and in on at near by is are two three some "
    "cat cats dog dogs horse zebra car tree house man woman person child bird fish flower "
    "sitting standing lying running looking playing sleeping eating holding "
    "grass table couch bed floor street road field water beach snow room window chair wall sky "
    "white black brown red green blue yellow small large big little old young cute "
    "circle square triangle star shape background"
).split()


def _build_sd_components(seed: int):
    import torch
    from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    vocab, _ = build_vocab()  # byte-level: no merges
    # Seed before each component so that each one's weights do not depend on the others.
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        sample_size=DEFAULT_IMAGE_SIZE // 8,
        in_channels=4,
        out_channels=4,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        block_out_channels=(16, 32, 32),
        layers_per_block=1,
        attention_head_dim=2,  # diffusers' legacy name: this is the number of heads (SD 1.x: 8)
        cross_attention_dim=TEXT_HIDDEN,
        norm_num_groups=8,
    )
    torch.manual_seed(seed + 1)
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(8, 16, 16, 16),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=8,
        sample_size=DEFAULT_IMAGE_SIZE,
        scaling_factor=VAE_SCALING_FACTOR,
    )
    torch.manual_seed(seed + 2)
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=len(vocab),
            hidden_size=TEXT_HIDDEN,
            intermediate_size=64,
            projection_dim=TEXT_HIDDEN,
            num_hidden_layers=2,
            num_attention_heads=2,
            max_position_embeddings=MODEL_MAX_LENGTH,
            hidden_act="quick_gelu",
            layer_norm_eps=1e-5,
            bos_token_id=vocab[BOS],
            eos_token_id=vocab[EOS],
            pad_token_id=vocab[EOS],  # SD 1.x pads with the end-of-text token
        )
    )
    scheduler = DDIMScheduler(**SD14_SCHEDULER)
    return unet, vae, text_encoder, scheduler


def _write_captioner(folder: Path, seed: int) -> None:
    import torch
    from transformers import (
        BertTokenizer,
        BlipConfig,
        BlipForConditionalGeneration,
        BlipImageProcessor,
        BlipProcessor,
        BlipTextConfig,
        BlipVisionConfig,
    )

    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "[DEC]"]
    vocab = {tok: i for i, tok in enumerate(specials + list(dict.fromkeys(CAPTION_WORDS)))}
    tokenizer = BertTokenizer(vocab=vocab, do_lower_case=True, bos_token="[DEC]", model_max_length=512)
    image_size = 32
    processor = BlipProcessor(
        image_processor=BlipImageProcessor(size={"height": image_size, "width": image_size}),
        tokenizer=tokenizer,
    )
    text = BlipTextConfig(
        vocab_size=len(vocab),
        hidden_size=32,
        encoder_hidden_size=32,
        intermediate_size=64,
        projection_dim=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        max_position_embeddings=512,  # as BLIP base
        pad_token_id=vocab["[PAD]"],
        bos_token_id=vocab["[DEC]"],
        eos_token_id=vocab["[SEP]"],
        sep_token_id=vocab["[SEP]"],
        initializer_range=0.1,  # larger than BLIP's 0.02 so that captions depend on the image
    )
    vision = BlipVisionConfig(
        image_size=image_size,
        patch_size=8,
        hidden_size=32,
        projection_dim=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        initializer_range=0.1,
    )
    torch.manual_seed(seed + 3)
    model = BlipForConditionalGeneration(
        BlipConfig(
            text_config=text.to_dict(),
            vision_config=vision.to_dict(),
            projection_dim=32,
            initializer_range=0.1,
        )
    )
    with torch.no_grad():
        # A small bonus for end-of-caption gives captions of varied, mostly short lengths
        # (a random decoder would otherwise talk until max_new_tokens).
        model.text_decoder.cls.predictions.bias[vocab["[SEP]"]] = 0.7
    model.save_pretrained(folder)
    processor.save_pretrained(folder)


def make_tiny(out_dir: str | os.PathLike, seed: int = 0) -> Path:
    """Write the tiny Stable Diffusion folder (and ``captioner/``) to ``out_dir``; return its path.

    Replaces ``out_dir`` atomically if it exists. The same seed writes byte-identical files.
    """
    import torch
    from transformers.utils import logging as hf_logging

    out = Path(out_dir)
    bars_were_on = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()  # a few kB per file: no "Writing model shards" bars
    try:
        with atomic_path(out) as tmp, torch.random.fork_rng(devices=[]):
            _write_all(tmp, seed)
            _make_readable(tmp)
    finally:
        if bars_were_on:
            hf_logging.enable_progress_bar()
    return out


def _make_readable(folder: Path) -> None:
    """Weights are saved through private temporary files (mode 0600); give them the usual mode."""
    umask = os.umask(0)
    os.umask(umask)
    for p in folder.rglob("*"):
        p.chmod((0o777 if p.is_dir() else 0o666) & ~umask)


def save_sd_folder(
    folder: Path, *, vae: Any, text_encoder: Any, unet: Any, scheduler: Any, words: Sequence[str] = ()
) -> None:
    """Write a diffusers Stable Diffusion 1.x folder (no safety checker) with our offline CLIP
    tokenizer for ``words``; shared by the tiny random model and the shapes world's toy model."""
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=build_tokenizer(words),
        unet=unet,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.save_pretrained(folder, safe_serialization=True)
    # save_pretrained writes only tokenizer.json (transformers v5): add the slow-format files too.
    save_tokenizer(folder / "tokenizer", words)


def _write_all(tmp: Path, seed: int) -> None:
    """Build every component from ``seed`` and save the folders into the empty path ``tmp``."""
    tmp.mkdir(parents=True)
    unet, vae, text_encoder, scheduler = _build_sd_components(seed)
    save_sd_folder(tmp, vae=vae, text_encoder=text_encoder, unet=unet, scheduler=scheduler)
    _write_captioner(tmp / "captioner", seed)
    (tmp / "README.md").write_text(
        f"Tiny random-weight Stable Diffusion made by `p2pz make-tiny` (seed {seed}).\n"
        "For tests and demos only: it draws noise, not pictures.\n",
        "utf-8",
    )
