"""The tiny random Stable Diffusion of `p2pz make-tiny`: deterministic, complete, loadable offline."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import torch

from p2pz.data.models.tiny import make_tiny


def _hashes(folder: Path) -> dict[str, str]:
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def test_same_seed_same_bytes(tiny_model_dir, tmp_path):
    again = make_tiny(tmp_path / "again", seed=0)
    other = make_tiny(tmp_path / "other", seed=1)
    ref = _hashes(tiny_model_dir)
    assert _hashes(again) == ref
    changed = {k for k, v in _hashes(other).items() if ref.get(k) != v}
    assert "unet/diffusion_pytorch_model.safetensors" in changed
    assert "text_encoder/model.safetensors" in changed


def test_folder_layout(tiny_model_dir):
    index = json.loads((tiny_model_dir / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusionPipeline"
    assert index["safety_checker"] == [None, None] and index["requires_safety_checker"] is False
    for sub in ("unet", "vae", "text_encoder", "tokenizer", "scheduler", "captioner"):
        assert (tiny_model_dir / sub).is_dir(), sub
    for name in ("tokenizer.json", "vocab.json", "merges.txt"):
        assert (tiny_model_dir / "tokenizer" / name).is_file()
    sched = json.loads((tiny_model_dir / "scheduler" / "scheduler_config.json").read_text())
    assert sched["_class_name"] == "DDIMScheduler"
    assert (sched["beta_start"], sched["beta_end"], sched["beta_schedule"]) == (
        0.00085,
        0.012,
        "scaled_linear",
    )
    assert (sched["steps_offset"], sched["set_alpha_to_one"], sched["clip_sample"]) == (1, False, False)


def test_components_load_and_fit_together(tiny_model_dir):
    from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel

    unet = UNet2DConditionModel.from_pretrained(tiny_model_dir, subfolder="unet", local_files_only=True)
    vae = AutoencoderKL.from_pretrained(tiny_model_dir, subfolder="vae", local_files_only=True)
    text_encoder = CLIPTextModel.from_pretrained(
        tiny_model_dir, subfolder="text_encoder", local_files_only=True
    )
    DDIMScheduler.from_pretrained(tiny_model_dir, subfolder="scheduler", local_files_only=True)
    assert 2 ** (len(vae.config.block_out_channels) - 1) == 8  # SD's VAE factor
    assert vae.config.latent_channels == 4 and vae.config.scaling_factor == pytest.approx(0.18215)
    assert unet.config.cross_attention_dim == text_encoder.config.hidden_size
    assert unet.config.sample_size * 8 == 64
    # Cross-attention at two or more resolutions (down blocks with attention, plus the mid block).
    attn2 = [k for k in unet.attn_processors if ".attn2." in k]
    resolutions = {k.split(".attentions")[0] for k in attn2 if k.startswith("down_blocks")}
    assert len(resolutions) >= 2, attn2


@pytest.mark.parametrize("loader", ["CLIPTokenizer", "CLIPTokenizerFast"])
def test_tokenizer_bytes_level_and_77(tiny_model_dir, loader):
    import transformers

    tok = getattr(transformers, loader).from_pretrained(tiny_model_dir / "tokenizer")
    assert tok.model_max_length == 77
    ids = tok(
        ["a cat", "a dog", "a photo of a zebra2horse!"],
        padding="max_length",
        max_length=tok.model_max_length,
        truncation=True,
        return_tensors="pt",
    ).input_ids
    assert ids.shape == (3, 77)
    assert not torch.equal(ids[0], ids[1])
    # Byte-level: every character has a token, so nothing collapses to unk (= end-of-text in CLIP).
    row = ids[2].tolist()
    assert row[0] == tok.bos_token_id
    assert row.index(tok.eos_token_id) > len("a photo of a zebra2horse!".split())
    # The slow-format files describe the same vocabulary.
    vocab = json.loads((tiny_model_dir / "tokenizer" / "vocab.json").read_text())
    assert len(vocab) == len(tok) and vocab["<|endoftext|>"] == tok.eos_token_id


def test_tokenizer_from_slow_files(tiny_model_dir):
    from transformers import CLIPTokenizer

    folder = tiny_model_dir / "tokenizer"
    from_files = CLIPTokenizer(vocab=str(folder / "vocab.json"), merges=str(folder / "merges.txt"))
    saved = CLIPTokenizer.from_pretrained(folder)
    text = "a zebra standing in the snow"
    assert from_files(text).input_ids == saved(text).input_ids


@pytest.mark.parametrize("size", [64, 72])
def test_pipeline_runs_offline(tiny_model_dir, size):
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(tiny_model_dir, local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    out = pipe(
        "a cat",
        num_inference_steps=2,
        height=size,
        width=size,
        output_type="np",
        generator=torch.Generator().manual_seed(0),
    )
    assert out.images.shape == (1, size, size, 3)
    assert torch.isfinite(torch.from_numpy(out.images)).all()


def test_tiny_captioner_generates(tiny_model_dir):
    from PIL import Image
    from transformers import BlipForConditionalGeneration, BlipProcessor

    folder = tiny_model_dir / "captioner"
    model = BlipForConditionalGeneration.from_pretrained(folder, local_files_only=True)
    proc = BlipProcessor.from_pretrained(folder, local_files_only=True)
    inputs = proc(images=[Image.new("RGB", (50, 40), "red")], text=["a picture of"], return_tensors="pt")
    out = model.generate(**inputs, max_new_tokens=5)
    text = proc.batch_decode(out, skip_special_tokens=True)[0]
    assert text.startswith("a picture of")
