"""A tiny random-weight Stable Diffusion (+ BLIP captioner) that tests and the default run use.

``make_tiny(out)`` writes a complete diffusers-format Stable Diffusion 1.x folder with the same
layout, component classes and scheduler config as ``CompVis/stable-diffusion-v1-4``, only with a
few channels, random weights drawn from a seed, and a byte-level CLIP tokenizer (so every word
tokenizes, and different words embed differently). Beside it, ``out/captioner`` holds a tiny
random BLIP captioner (BlipForConditionalGeneration + BlipProcessor). Everything is built
offline, in a couple of seconds on a CPU, and the same seed writes the same bytes.

``make_tiny(out, architecture="sd14")`` writes the same layout at real size, for dry runs of the
real path without downloads: Stable Diffusion 1.4's UNet (859.5 M parameters), VAE and CLIP
ViT-L/14 text encoder, its PNDM scheduler config, and a BLIP-base-size captioner, random weights
(PyTorch's default initialisation, seeded) stored in fp16: about 2.6 GB, built in about a minute.

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


ARCHITECTURES = ("tiny", "sd14")


def unet_config(architecture: str = "tiny") -> dict[str, Any]:
    """``UNet2DConditionModel`` keyword arguments of ``architecture``."""
    if architecture == "sd14":  # CompVis/stable-diffusion-v1-4 unet/config.json
        return dict(
            sample_size=64,
            in_channels=4,
            out_channels=4,
            down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
            up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
            block_out_channels=(320, 640, 1280, 1280),
            layers_per_block=2,
            attention_head_dim=8,
            cross_attention_dim=768,
            norm_num_groups=32,
            norm_eps=1e-5,
            act_fn="silu",
            center_input_sample=False,
            downsample_padding=1,
            flip_sin_to_cos=True,
            freq_shift=0,
            mid_block_scale_factor=1,
        )
    return dict(
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


def vae_config(architecture: str = "tiny") -> dict[str, Any]:
    """``AutoencoderKL`` keyword arguments of ``architecture`` (both downsample by 8, as SD)."""
    real = architecture == "sd14"  # CompVis/stable-diffusion-v1-4 vae/config.json
    return dict(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(128, 256, 512, 512) if real else (8, 16, 16, 16),
        layers_per_block=2 if real else 1,
        latent_channels=4,
        norm_num_groups=32 if real else 8,
        sample_size=512 if real else DEFAULT_IMAGE_SIZE,
        scaling_factor=VAE_SCALING_FACTOR,
        act_fn="silu",
    )


def text_encoder_config(architecture: str = "tiny") -> dict[str, Any]:
    """``CLIPTextConfig`` keyword arguments: CLIP ViT-L/14's text tower for ``sd14``.

    Our byte-level tokenizer has 514 ids; ``sd14`` keeps CLIP's 49,408-entry embedding table
    (the real parameter count), of which the tokenizer uses the first ids only.
    """
    vocab, _ = build_vocab()  # byte-level: no merges
    real = architecture == "sd14"
    return dict(
        vocab_size=49408 if real else len(vocab),
        hidden_size=768 if real else TEXT_HIDDEN,
        intermediate_size=3072 if real else 64,
        projection_dim=768 if real else TEXT_HIDDEN,
        num_hidden_layers=12 if real else 2,
        num_attention_heads=12 if real else 2,
        max_position_embeddings=MODEL_MAX_LENGTH,
        hidden_act="quick_gelu",
        layer_norm_eps=1e-5,
        bos_token_id=vocab[BOS],
        eos_token_id=vocab[EOS],
        pad_token_id=vocab[EOS],  # SD 1.x pads with the end-of-text token
    )


def _check_architecture(architecture: str) -> None:
    if architecture not in ARCHITECTURES:
        raise ValueError(f"unknown architecture {architecture!r}; use one of {', '.join(ARCHITECTURES)}")


def _build_sd_components(seed: int, architecture: str = "tiny"):
    import torch
    from diffusers import AutoencoderKL, DDIMScheduler, PNDMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    # Seed before each component so that each one's weights do not depend on the others.
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(**unet_config(architecture))
    torch.manual_seed(seed + 1)
    vae = AutoencoderKL(**vae_config(architecture))
    torch.manual_seed(seed + 2)
    text_encoder = CLIPTextModel(CLIPTextConfig(**text_encoder_config(architecture)))
    if architecture == "sd14":  # the real folder ships PNDM; the teacher loads DDIM from its config
        scheduler = PNDMScheduler.from_config(dict(SD14_SCHEDULER, skip_prk_steps=True))
    else:
        scheduler = DDIMScheduler(**SD14_SCHEDULER)
    return unet, vae, text_encoder, scheduler


def _caption_vocab() -> dict[str, int]:
    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "[DEC]"]
    return {tok: i for i, tok in enumerate(specials + list(dict.fromkeys(CAPTION_WORDS)))}


def blip_configs(architecture: str = "tiny") -> tuple[dict[str, Any], dict[str, Any], int]:
    """(text config, vision config, image size) of the captioner: BLIP base's for ``sd14``.

    ``sd14`` keeps BLIP base's 30,524-entry vocabulary (its parameter count); our small word-list
    tokenizer uses the first ids only.
    """
    vocab = _caption_vocab()
    special_ids = dict(
        pad_token_id=vocab["[PAD]"],
        bos_token_id=vocab["[DEC]"],
        eos_token_id=vocab["[SEP]"],
        sep_token_id=vocab["[SEP]"],
    )
    if architecture == "sd14":  # Salesforce/blip-image-captioning-base = BlipConfig() defaults
        text = dict(
            vocab_size=30524,
            hidden_size=768,
            encoder_hidden_size=768,
            intermediate_size=3072,
            num_hidden_layers=12,
            num_attention_heads=12,
            max_position_embeddings=512,
            **special_ids,
        )
        vision = dict(
            image_size=384,
            patch_size=16,
            hidden_size=768,
            intermediate_size=3072,
            num_hidden_layers=12,
            num_attention_heads=12,
        )
        return text, vision, 384
    text = dict(
        vocab_size=len(vocab),
        hidden_size=32,
        encoder_hidden_size=32,
        intermediate_size=64,
        projection_dim=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        max_position_embeddings=512,  # as BLIP base
        initializer_range=0.1,  # larger than BLIP's 0.02 so that captions depend on the image
        **special_ids,
    )
    vision = dict(
        image_size=32,
        patch_size=8,
        hidden_size=32,
        projection_dim=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        initializer_range=0.1,
    )
    return text, vision, 32


def _build_captioner(seed: int, architecture: str = "tiny"):
    import torch
    from transformers import BlipConfig, BlipForConditionalGeneration, BlipTextConfig, BlipVisionConfig

    text, vision, _ = blip_configs(architecture)
    extra = {} if architecture == "sd14" else dict(projection_dim=32, initializer_range=0.1)
    torch.manual_seed(seed + 3)
    model = BlipForConditionalGeneration(
        BlipConfig(
            text_config=BlipTextConfig(**text).to_dict(),
            vision_config=BlipVisionConfig(**vision).to_dict(),
            **extra,
        )
    )
    vocab = _caption_vocab()
    with torch.no_grad():
        bias = model.text_decoder.cls.predictions.bias
        # A small bonus for end-of-caption gives captions of varied, mostly short lengths
        # (a random decoder would otherwise talk until max_new_tokens).
        bias[vocab["[SEP]"]] = 0.7
        # BLIP base's ids past our word list decode to nothing: never say them (fp16-safe value).
        bias[len(vocab) :] = -1e4
    return model


def _write_captioner(folder: Path, seed: int, architecture: str = "tiny") -> None:
    from transformers import BertTokenizer, BlipImageProcessor, BlipProcessor

    vocab = _caption_vocab()
    tokenizer = BertTokenizer(vocab=vocab, do_lower_case=True, bos_token="[DEC]", model_max_length=512)
    _, _, image_size = blip_configs(architecture)
    processor = BlipProcessor(
        image_processor=BlipImageProcessor(size={"height": image_size, "width": image_size}),
        tokenizer=tokenizer,
    )
    model = _build_captioner(seed, architecture)
    if architecture == "sd14":
        model.half()  # fp16 on disk, as the real checkpoints are shipped
    model.save_pretrained(folder)
    processor.save_pretrained(folder)


def make_tiny(out_dir: str | os.PathLike, seed: int = 0, architecture: str = "tiny") -> Path:
    """Write a random Stable Diffusion folder (and ``captioner/``) to ``out_dir``; return its path.

    ``architecture``: ``tiny`` (a few channels, fp32, seconds) or ``sd14`` (Stable Diffusion 1.4's
    UNet, VAE and CLIP ViT-L/14 text encoder, a BLIP-base-size captioner; fp16 on disk, about
    2.6 GB). Replaces ``out_dir`` atomically if it exists. The same seed writes byte-identical files.
    """
    import torch
    from transformers.utils import logging as hf_logging

    _check_architecture(architecture)
    out = Path(out_dir)
    bars_were_on = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()  # a few kB per file: no "Writing model shards" bars
    try:
        with atomic_path(out) as tmp, torch.random.fork_rng(devices=[]):
            _write_all(tmp, seed, architecture)
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


def _write_all(tmp: Path, seed: int, architecture: str = "tiny") -> None:
    """Build every component from ``seed`` and save the folders into the empty path ``tmp``."""
    tmp.mkdir(parents=True)
    unet, vae, text_encoder, scheduler = _build_sd_components(seed, architecture)
    if architecture == "sd14":  # fp16 on disk, as the released SD-1.4 fp16 weights
        for module in (unet, vae, text_encoder):
            module.half()
    save_sd_folder(tmp, vae=vae, text_encoder=text_encoder, unet=unet, scheduler=scheduler)
    del unet, vae, text_encoder  # the real-size UNet alone is 1.7 GB in fp16
    _write_captioner(tmp / "captioner", seed, architecture)
    kind = "Tiny" if architecture == "tiny" else "Stable Diffusion 1.4-size (+ BLIP-base-size captioner)"
    (tmp / "README.md").write_text(
        f"{kind} random-weight Stable Diffusion made by `p2pz make-tiny --architecture {architecture}` "
        f"(seed {seed}).\nFor tests and demos only: it draws noise, not pictures.\n",
        "utf-8",
    )


def link_at_resolution(model_dir: str | os.PathLike, out_dir: str | os.PathLike, resolution: int) -> Path:
    """A view of the model folder ``model_dir`` whose native resolution is ``resolution`` px.

    The teacher (like diffusers) works at ``unet.sample_size x 8`` px; this writes ``out_dir`` with
    every file symlinked to ``model_dir`` except ``unet/config.json``, whose ``sample_size`` is
    changed: the same weights at another size (e.g. SD-1.4 at 256 px for CPU runs), without copying.
    """
    import json

    if resolution <= 0 or resolution % 8:
        raise ValueError(f"resolution must be a positive multiple of 8, got {resolution}")
    src, out = Path(model_dir).resolve(), Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    for path in sorted(src.rglob("*")):
        target = out / path.relative_to(src)
        if path.is_dir():
            target.mkdir(parents=True, exist_ok=True)
        elif path.relative_to(src) == Path("unet/config.json"):
            config = json.loads(path.read_text())
            config["sample_size"] = resolution // 8
            target.write_text(json.dumps(config, indent=2) + "\n")
        else:
            target.symlink_to(path)
    return out
