"""Load Stable Diffusion 1.x components from a local folder or a Hugging Face id, with clear errors.

Every stage of the teacher loads its weights through ``load_sd_components`` so that a wrong path,
a half-written folder or weights missing from the offline cache all end in one ``UserError`` line
that says what to do, instead of a stack trace from deep inside ``from_pretrained``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from p2pz.utils.errors import UserError

DEFAULT_MODEL = "CompVis/stable-diffusion-v1-4"  # the model of all published pix2pix-zero results
ALL_COMPONENTS = ("tokenizer", "text_encoder", "unet", "vae", "scheduler")


@dataclass
class SDComponents:
    """The parts of a Stable Diffusion 1.x pipeline the teacher uses (absent ones are None)."""

    source: str  # the path or id they were loaded from
    tokenizer: Any = None  # transformers CLIPTokenizer
    text_encoder: Any = None  # transformers CLIPTextModel, eval mode, no grad
    unet: Any = None  # diffusers UNet2DConditionModel, eval mode, no grad
    vae: Any = None  # diffusers AutoencoderKL, eval mode, no grad
    scheduler_config: dict = field(default_factory=dict)  # the folder's scheduler config (DDIM-ready)


def parse_dtype(dtype: Any):
    """``torch.float16`` / ``"fp16"`` / ``"float16"`` / ``"bf16"`` / ``None`` (float32) -> torch dtype."""
    import torch

    if dtype is None:
        return torch.float32
    if isinstance(dtype, torch.dtype):
        return dtype
    names = {
        "fp32": torch.float32, "float32": torch.float32, "float": torch.float32,
        "fp16": torch.float16, "float16": torch.float16, "half": torch.float16,
        "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
    }  # fmt: skip
    try:
        return names[str(dtype).lower().removeprefix("torch.")]
    except KeyError:
        raise UserError(f"unknown dtype {dtype!r}; use one of fp32, fp16, bf16") from None


def _looks_like_path(path_or_id: str) -> bool:
    """A Hugging Face id is ``owner/name``; anything else (./x, /x, ~/x, a/b/c, x) is a path."""
    if path_or_id.startswith((".", "/", "~")) or "\\" in path_or_id:
        return True
    return path_or_id.count("/") != 1


def missing_weights_hint(path_or_id: str) -> str:
    return (
        f"the weights of '{path_or_id}' are not in the local Hugging Face cache"
        + (" and HF_HUB_OFFLINE=1 is set" if os.environ.get("HF_HUB_OFFLINE", "0") not in ("", "0") else "")
        + f"; download them with `huggingface-cli download {path_or_id}` (or unset HF_HUB_OFFLINE), "
        "or make a tiny test model with `p2pz make-tiny DIR` and pass DIR instead"
    )


def resolve_model(path_or_id: str | os.PathLike, subfolders: tuple[str, ...] = ()) -> str:
    """Check a local model folder (or pass a Hub id through); raise UserError for a bad path.

    Returns the string to hand to ``from_pretrained``. Hub ids are checked when loading.
    """
    text = str(path_or_id)
    local = Path(text).expanduser()
    if local.exists():
        if not local.is_dir():
            raise UserError(
                f"model path '{text}' is a file; pass a diffusers model folder or a Hugging Face id"
            )
        missing = [s for s in subfolders if not (local / s).is_dir()]
        if missing:
            raise UserError(
                f"model folder '{text}' has no {', '.join(missing)} subfolder; pass a diffusers-format "
                "Stable Diffusion folder (made by save_pretrained, or `p2pz make-tiny DIR`)"
            )
        return str(local)
    if _looks_like_path(text):
        raise UserError(
            f"model folder '{text}' does not exist; pass a Stable Diffusion folder or a Hugging Face id "
            "such as CompVis/stable-diffusion-v1-4 (make a tiny test model with `p2pz make-tiny DIR`)"
        )
    return text


def from_pretrained_or_explain(cls: Any, path_or_id: str, **kwargs: Any) -> Any:
    """``cls.from_pretrained(path_or_id, **kwargs)`` with missing-weight errors turned into UserError."""
    from safetensors import SafetensorError

    try:
        return cls.from_pretrained(path_or_id, **kwargs)
    except UserError:
        raise
    # hub errors subclass OSError; a truncated weights file is a SafetensorError
    except (OSError, ValueError, EnvironmentError, SafetensorError) as err:  # noqa: UP024
        where = f"{path_or_id}/{kwargs['subfolder']}" if kwargs.get("subfolder") else path_or_id
        if Path(path_or_id).expanduser().exists():
            raise UserError(
                f"cannot load {cls.__name__} from '{where}' "
                f"({type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}); "
                "the folder looks incomplete or corrupt, write it again"
            ) from err
        raise UserError(missing_weights_hint(path_or_id)) from err


def load_sd_components(
    path_or_id: str | os.PathLike = DEFAULT_MODEL,
    device: Any = "cpu",
    dtype: Any = None,
    components: tuple[str, ...] = ALL_COMPONENTS,
) -> SDComponents:
    """Load the tokenizer, text encoder, UNet, VAE and scheduler config of an SD 1.x model.

    ``path_or_id``: a diffusers folder (e.g. from ``p2pz make-tiny``) or a Hub id such as
    ``CompVis/stable-diffusion-v1-4`` (honours HF_HUB_OFFLINE). ``components`` picks a subset
    (directions need only ``("tokenizer", "text_encoder")``). Models are moved to ``device`` and
    ``dtype``, put in eval mode and frozen (``requires_grad_(False)``: gradients still flow to
    the latents, which is all cross-attention guidance needs).
    """
    import torch

    unknown = set(components) - set(ALL_COMPONENTS)
    if unknown:
        raise ValueError(f"unknown components {sorted(unknown)}; choose from {ALL_COMPONENTS}")
    source = resolve_model(path_or_id, subfolders=tuple(components))
    dtype = parse_dtype(dtype)
    device = torch.device(device)
    out = SDComponents(source=source)

    if "tokenizer" in components:
        from transformers import CLIPTokenizer

        out.tokenizer = from_pretrained_or_explain(CLIPTokenizer, source, subfolder="tokenizer")
    if "scheduler" in components:
        from diffusers import DDIMScheduler

        scheduler = from_pretrained_or_explain(DDIMScheduler, source, subfolder="scheduler")
        out.scheduler_config = dict(scheduler.config)

    def load_model(cls, subfolder):
        if cls.__module__.startswith("diffusers"):
            # low_cpu_mem_usage=False: the default needs `accelerate` and warns without it.
            kwargs = dict(torch_dtype=dtype, low_cpu_mem_usage=False)
        else:
            kwargs = dict(dtype=dtype)
        model = from_pretrained_or_explain(cls, source, subfolder=subfolder, **kwargs)
        return model.to(device).eval().requires_grad_(False)

    if "text_encoder" in components:
        from transformers import CLIPTextModel

        out.text_encoder = load_model(CLIPTextModel, "text_encoder")
    if "unet" in components:
        from diffusers import UNet2DConditionModel

        out.unet = load_model(UNet2DConditionModel, "unet")
    if "vae" in components:
        from diffusers import AutoencoderKL

        out.vae = load_model(AutoencoderKL, "vae")
    return out
