"""Captioning: the text that describes the input image, used for inversion and as the edit prompt.

pix2pix-zero captions a real image with BLIP, inverts it under that caption, and (official code)
also uses the caption as the negative prompt of the edit. Two prompt styles:

- ``official``: the official repository used LAVIS BLIP base-COCO with the prompt
  "a picture of ", beam search (3 beams, max_length 30, min_length 10, lengths counting the
  prompt), and stripped the prompt from the caption. We emulate it with transformers' BLIP.
- ``diffusers``: ``StableDiffusionPix2PixZeroPipeline.generate_caption``: prompt
  "a photography of", greedy, ``max_new_tokens=128``, prompt kept in the caption.

A captioner folder can also name its own class: a ``captioner.json`` with
``{"class": "p2pz.module:ClassName", ...}`` makes ``load_captioner`` import that class (one of
p2pz's own: a model folder may come from anyone, so it never names other code) and
call ``ClassName.from_pretrained(folder)``; the result must be callable on a list of PIL images.
"""

from __future__ import annotations

import importlib
import inspect
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

from p2pz.utils.errors import UserError

if TYPE_CHECKING:
    from PIL import Image
    from transformers import BlipForConditionalGeneration, BlipProcessor

DEFAULT_CAPTIONER = "Salesforce/blip-image-captioning-base"
PLUGIN_NAMESPACE = "p2pz."
PLUGIN_CONFIG = "captioner.json"


@runtime_checkable
class Captioner(Protocol):
    """Anything that turns a list of PIL images into one caption per image."""

    def __call__(self, images: list[Image.Image]) -> list[str]: ...


@dataclass(frozen=True)
class CaptionStyle:
    prompt: str  # conditional text prefix given to BLIP's decoder
    keep_prompt: bool  # whether the caption keeps the prefix
    generate: dict = field(default_factory=dict)  # arguments of BLIP's generate()


CAPTION_STYLES = {
    # LAVIS blip_caption base_coco defaults, as called by the official src/inversion.py.
    "official": CaptionStyle("a picture of", False, dict(num_beams=3, max_length=30, min_length=10)),
    # diffusers StableDiffusionPix2PixZeroPipeline.generate_caption.
    "diffusers": CaptionStyle("a photography of", True, dict(max_new_tokens=128)),
}


class BlipCaptioner:
    """BLIP (BlipForConditionalGeneration + BlipProcessor) with one of the caption styles."""

    def __init__(
        self, model: BlipForConditionalGeneration, processor: BlipProcessor, style: str = "official"
    ) -> None:
        if style not in CAPTION_STYLES:
            raise UserError(f"unknown caption style '{style}'; choose from {', '.join(CAPTION_STYLES)}")
        self.model = model
        self.processor = processor
        self.style = CAPTION_STYLES[style]

    @classmethod
    def from_pretrained(
        cls, path_or_id: str | os.PathLike, style: str = "official", device: Any = "cpu", dtype: Any = None
    ) -> BlipCaptioner:
        from transformers import BlipForConditionalGeneration, BlipProcessor

        from p2pz.teacher.models import from_pretrained_or_explain, parse_dtype

        source = str(path_or_id)
        processor = from_pretrained_or_explain(BlipProcessor, source)
        model = from_pretrained_or_explain(BlipForConditionalGeneration, source, dtype=parse_dtype(dtype))
        return cls(model.to(device).eval(), processor, style)

    def __call__(self, images: list[Image.Image]) -> list[str]:
        import torch

        if not images:
            return []
        images = [im.convert("RGB") for im in images]
        param = next(self.model.parameters())
        inputs = self.processor(images=images, text=[self.style.prompt] * len(images), return_tensors="pt")
        inputs = {k: v.to(param.device) for k, v in inputs.items()}
        inputs["pixel_values"] = inputs["pixel_values"].to(param.dtype)
        with torch.no_grad():
            ids = self.model.generate(**inputs, **self.style.generate)
        captions = self.processor.batch_decode(ids, skip_special_tokens=True)
        return [self._finish(c) for c in captions]

    def _finish(self, caption: str) -> str:
        caption = " ".join(caption.split())
        if not self.style.keep_prompt and caption.lower().startswith(self.style.prompt.lower()):
            caption = caption[len(self.style.prompt) :].strip()
        return caption


def _load_plugin(folder: Path, style: str, device: Any, dtype: Any) -> Captioner:
    config_path = folder / PLUGIN_CONFIG
    try:
        config = json.loads(config_path.read_text(encoding="utf-8"))
        module_name, _, class_name = str(config["class"]).partition(":")
        if not module_name or not class_name:
            raise ValueError("'class' must look like 'package.module:ClassName'")
        # A model folder may come from anyone: it may name one of our classes, never other code.
        if not module_name.startswith(PLUGIN_NAMESPACE):
            raise ValueError(f"'class' must name a class of the p2pz package, not {module_name}")
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise UserError(f"bad captioner config '{config_path}': {err}") from err
    try:
        cls = getattr(importlib.import_module(module_name), class_name)
    except (ImportError, AttributeError) as err:
        raise UserError(
            f"captioner class '{config['class']}' named in '{config_path}' cannot be imported ({err}); "
            "install the package that provides it"
        ) from err
    # Pass the options the plugin's from_pretrained accepts (by name), nothing else.
    offered = {"style": style, "preset": style, "device": device, "dtype": dtype}
    params = inspect.signature(cls.from_pretrained).parameters
    takes_all = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
    kwargs = {k: v for k, v in offered.items() if takes_all or k in params}
    captioner = cls.from_pretrained(folder, **kwargs)
    if not callable(captioner):
        raise UserError(f"captioner class '{config['class']}' does not make a callable captioner")
    return captioner


def load_captioner(
    path_or_id: str | os.PathLike = DEFAULT_CAPTIONER,
    preset: str = "official",
    device: Any = "cpu",
    dtype: Any = None,
) -> Captioner:
    """Load a captioner: a BLIP folder or Hub id, or a folder with a ``captioner.json`` plugin.

    ``preset`` picks the caption style (``official`` or ``diffusers``, see the module doc). A model
    folder that holds a ``captioner/`` subfolder may be passed directly.
    """
    from p2pz.teacher.models import resolve_model

    if preset not in CAPTION_STYLES:
        raise UserError(f"unknown caption preset '{preset}'; choose from {', '.join(CAPTION_STYLES)}")
    source = resolve_model(path_or_id)
    folder = Path(source)
    if folder.is_dir():
        if not (folder / PLUGIN_CONFIG).is_file() and not (folder / "config.json").is_file():
            if (folder / "captioner").is_dir():
                folder = folder / "captioner"
            else:
                raise UserError(
                    f"'{source}' is not a captioner folder (no config.json or {PLUGIN_CONFIG}); pass a BLIP "
                    f"folder, the Hugging Face id {DEFAULT_CAPTIONER}, or a folder made by `p2pz make-tiny`"
                )
        if (folder / PLUGIN_CONFIG).is_file():
            return _load_plugin(folder, preset, device, dtype)
        source = str(folder)
    return BlipCaptioner.from_pretrained(source, preset, device, dtype)
