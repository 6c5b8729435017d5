"""The paper's metrics for edits of real images (pix2pix-zero §5; the reference dossier, §3.3).

- **CLIP-Acc** (higher is better): the share of edited images that CLIP, zero-shot, classifies as
  the target rather than the source, with the prompts "a photo of a {word}" (the paper does not
  say which prompts it used). Default model ``openai/clip-vit-base-patch32``.
- **BG LPIPS** (lower is better): LPIPS between input and edit with the edited object masked out
  of both, as PnPInversion's evaluation (``evaluation/matrics_calculator.py``, ``calculate_lpips``)
  does: the images in [0, 1] are multiplied by the background mask, so the object is black (-1 in
  the [-1, 1] LPIPS sees) in both, then mapped to [-1, 1]. The mask comes with the pair (the paper's
  segmentation model is not known). Backbone: AlexNet by default (the lpips package's default and
  the student's); PnPInversion's evaluation uses torchmetrics' LPIPS with SqueezeNet, so its numbers
  are comparable only with ``net="squeeze"``. The backbone needs ImageNet weights: a torchvision
  state dict given by path, or the file torchvision keeps in its cache; random weights only when
  asked for (tests).
- **Structure Dist** (lower is better): the self-similarity distance of Tumanyan et al. (Splicing
  ViT Features), as img2img-turbo's ``DinoStructureLoss`` (identical in PnPInversion): torchvision's
  ``Resize(224)`` (the shorter side to 224, the longer one in proportion, bilinear, antialiased),
  ImageNet normalisation, the keys of the last transformer block for every token (CLS included,
  heads concatenated), the cosine self-similarity matrix of those keys, and the MSE between the
  input's matrix and the edit's (an edit of another size is first resized to its input's). Default
  model ``facebook/dino-vitb8`` through transformers' ``ViTModel``; the keys are captured with a
  forward hook on the last layer's key projection.

Models load by Hugging Face id or local folder; offline with no cached copy, the error says how to
get them.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from p2pz.teacher.edits import Edit
from p2pz.utils.errors import UserError

if TYPE_CHECKING:
    import lpips

DEFAULT_CLIP = "openai/clip-vit-base-patch32"
DEFAULT_DINO = "facebook/dino-vitb8"
CLIP_PROMPT = "a photo of a {word}"
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
STRUCTURE_SIZE = 224  # DinoStructureLoss: the shorter side resized to 224 before DINO


def load_pretrained(cls: Any, path_or_id: str | os.PathLike, what: str, **kwargs: Any) -> Any:
    """``cls.from_pretrained`` with a one-line UserError when the weights are not to be had."""
    text = str(path_or_id)
    local = Path(text).expanduser()
    if text.startswith((".", "/", "~")) and not local.exists():
        raise UserError(f"{what} folder '{text}' does not exist; pass a folder or a Hugging Face id")
    try:
        return cls.from_pretrained(str(local) if local.exists() else text, **kwargs)
    except (OSError, ValueError) as err:
        if local.exists():
            first_line = str(err).splitlines()[0] if str(err) else ""
            raise UserError(
                f"cannot load the {what} from '{text}' ({type(err).__name__}: {first_line}); "
                "the folder looks incomplete, write it again"
            ) from err
        offline = os.environ.get("HF_HUB_OFFLINE", "0") not in ("", "0")
        raise UserError(
            f"the {what} '{text}' is not in the local Hugging Face cache"
            + (" and HF_HUB_OFFLINE=1 is set" if offline else "")
            + f"; download it with `huggingface-cli download {text}` on a machine with internet "
            "(or unset HF_HUB_OFFLINE), or pass a local folder"
        ) from err


def _rgb(image: Image.Image | np.ndarray) -> Image.Image:
    if isinstance(image, np.ndarray):
        arr = image if image.dtype == np.uint8 else np.clip(np.rint(image * 255.0), 0, 255).astype(np.uint8)
        image = Image.fromarray(arr[..., :3])
    return image.convert("RGB")


# ---------------------------------------------------------------------------------------------
# CLIP-Acc


class ClipAccuracy:
    """Zero-shot CLIP: is each edited image closer to "a photo of a {target}" than to the source's?"""

    def __init__(
        self, model: str | os.PathLike = DEFAULT_CLIP, device: Any = "cpu", prompt: str = CLIP_PROMPT
    ):
        from transformers import AutoProcessor, CLIPModel

        self.model = load_pretrained(CLIPModel, model, "CLIP model").to(device).eval()
        self.processor = load_pretrained(AutoProcessor, model, "CLIP processor")
        self.device = device
        self.prompt = prompt

    @torch.no_grad()
    def probabilities(self, images: Sequence[Image.Image | np.ndarray], words: Sequence[str]) -> torch.Tensor:
        """Zero-shot class probabilities ``[images, words]``."""
        inputs = self.processor(
            text=[self.prompt.format(word=w) for w in words],
            images=[_rgb(im) for im in images],
            return_tensors="pt",
            padding=True,
        ).to(self.device)
        return self.model(**inputs).logits_per_image.float().softmax(-1).cpu()

    def __call__(self, edited: Sequence[Image.Image | np.ndarray], source: str, target: str) -> dict:
        """``{"clip_acc": share classified as target, "target_prob": per image}``."""
        if not edited:
            return {"clip_acc": None, "target_prob": []}
        probs = self.probabilities(edited, [source, target])
        return {
            "clip_acc": float((probs[:, 1] > probs[:, 0]).float().mean()),
            "target_prob": probs[:, 1].tolist(),
        }


# ---------------------------------------------------------------------------------------------
# LPIPS: the one loader (BackgroundLPIPS here, the student's PerceptualLoss in p2pz.student.losses)

# torchvision's ImageNet weights of each LPIPS backbone, as torch.hub caches them
LPIPS_BACKBONE_FILES = {
    "alex": "alexnet-owt-7be5be79.pth",
    "vgg": "vgg16-397923af.pth",
    "squeeze": "squeezenet1_1-b8a52dc0.pth",
}


def lpips_backbone_file(net: str) -> str:
    """torchvision's file name of ``net``'s ImageNet weights; a UserError for an unknown network."""
    if net not in LPIPS_BACKBONE_FILES:
        raise UserError(f"unknown LPIPS network {net!r}; choose one of {', '.join(LPIPS_BACKBONE_FILES)}")
    return LPIPS_BACKBONE_FILES[net]


def load_lpips(net: str, backbone: str | os.PathLike | None, *, flag: str) -> lpips.LPIPS:
    """An ``lpips.LPIPS`` (heads from the lpips wheel) with ``backbone``'s ImageNet weights, offline.

    ``backbone``: a torchvision state dict of ``net`` (``features.*`` keys, optionally under
    ``state_dict``), or None for random backbone weights (tests only: the distances then mean nothing).
    Nothing is downloaded. Every problem is a one-line UserError naming ``flag``, the option that gives
    the file. The network is returned in train mode, with gradients on: the caller freezes it.
    """
    import warnings

    try:
        import lpips
    except ImportError:  # an extra: the demo does not need it
        raise UserError(f"{flag}: LPIPS needs the lpips package: pip install 'p2pz-distill[paper]'") from None

    file_name = lpips_backbone_file(net)
    path = None if backbone is None else Path(backbone)
    if path is not None and not path.is_file():
        raise UserError(
            f"LPIPS needs the ImageNet weights of its {net} backbone: '{path}' does not exist; "
            f"download {file_name} from torchvision and pass it with {flag}"
        )
    with warnings.catch_warnings():  # lpips calls torchvision with its deprecated 'pretrained'
        warnings.simplefilter("ignore")
        # pnet_rand=True: build the backbone without downloading; the linear heads (pretrained=True)
        # come from the wheel's lpips/weights/v0.1/<net>.pth
        model = lpips.LPIPS(pretrained=True, net=net, pnet_rand=True, verbose=False)
    if path is not None:
        _load_lpips_backbone(model.net, path, net, flag)
    return model


def _load_lpips_backbone(net: torch.nn.Module, path: Path, net_name: str, flag: str) -> None:
    """Copy torchvision ``features.<i>.*`` weights into lpips' sliced backbone (``sliceK.<i>``)."""
    file_name = LPIPS_BACKBONE_FILES[net_name]
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # unreadable, not a torch file, pickled code, ...
        first_line = (str(err).splitlines() or [""])[0]
        raise UserError(
            f"cannot read the LPIPS backbone weights '{path}' ({type(err).__name__}: {first_line}); "
            f"pass torchvision's {file_name} with {flag}"
        ) from err
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    features = (
        {k[len("features.") :]: v for k, v in state.items() if k.startswith("features.")}
        if isinstance(state, dict)
        else {}
    )
    if not features:
        raise UserError(
            f"'{path}' is not a torchvision {net_name} state dict (no 'features.*' keys); "
            f"pass torchvision's {file_name} with {flag}"
        )
    for block in net.children():  # slice1, slice2, ...: their children keep torchvision's indices
        for index, layer in block.named_children():
            own = layer.state_dict()
            if not own:
                continue  # ReLU / pooling
            wanted = {k.split(".", 1)[1]: v for k, v in features.items() if k.split(".", 1)[0] == index}
            if set(wanted) != set(own) or any(wanted[k].shape != own[k].shape for k in own):
                raise UserError(
                    f"'{path}' does not match LPIPS' {net_name} backbone at layer features.{index}; "
                    f"pass torchvision's {file_name} with {flag}"
                )
            layer.load_state_dict(wanted)


# ---------------------------------------------------------------------------------------------
# Background LPIPS


class BackgroundLPIPS:
    """LPIPS between input and edit outside the edited object (mask: True on the object).

    ``backbone``: a torchvision state-dict file of the network (``alex``: ``alexnet-owt-7be5be79.pth``),
    None to use torchvision's cached copy, or ``"random"`` for random weights (tests only: the
    distances then mean nothing). LPIPS's own linear layers ship with the lpips package.
    """

    def __init__(
        self, net: str = "alex", backbone: str | os.PathLike | None = None, device: Any = "cpu"
    ) -> None:
        flag = "--lpips-backbone FILE"
        file_name = lpips_backbone_file(net)
        if str(backbone) == "random":
            backbone = None
        elif backbone is None:
            cached = Path(torch.hub.get_dir()) / "checkpoints" / file_name
            if not cached.is_file():
                raise UserError(
                    f"LPIPS needs the ImageNet weights of its {net} backbone: no {file_name} in "
                    f"{cached.parent}; download {file_name} from torchvision and pass it with {flag}"
                )
            backbone = cached
        self.lpips = load_lpips(net, backbone, flag=flag)
        self.lpips = self.lpips.to(device).eval()
        self.device = device
        self.backbone = "random" if backbone is None else str(backbone)

    @staticmethod
    def _unit(image: Image.Image | np.ndarray, size: tuple[int, int]) -> torch.Tensor:
        """``[3, H, W]`` in [0, 1], resized to ``size`` (width, height) when it differs."""
        image = _rgb(image)
        if image.size != size:
            image = image.resize(size, Image.Resampling.BICUBIC)
        return torch.from_numpy(np.asarray(image).copy()).permute(2, 0, 1).float() / 255.0

    @staticmethod
    def masked(image: torch.Tensor, object_mask: np.ndarray | None) -> torch.Tensor:
        """PnPInversion's masking: ``[0, 1]`` image times the background mask, then to [-1, 1] for
        LPIPS (the object is black, -1, in both images). ``object_mask``: True on the object."""
        if object_mask is not None:
            image = image * torch.from_numpy(~np.asarray(object_mask, dtype=bool)).float()[None]
        return image * 2 - 1

    @torch.no_grad()
    def __call__(
        self,
        inputs: Sequence[Image.Image | np.ndarray],
        edited: Sequence[Image.Image | np.ndarray],
        object_masks: Sequence[np.ndarray | None],
    ) -> list[float]:
        """One distance per pair; a mask of None compares the whole images."""
        out = []
        for a, b, mask in zip(inputs, edited, object_masks):
            a_img = _rgb(a)
            x, y = self._unit(a_img, a_img.size), self._unit(b, a_img.size)
            if mask is not None:
                mask = np.asarray(mask, dtype=bool)
                if mask.shape != (a_img.size[1], a_img.size[0]):
                    mask = np.asarray(Image.fromarray(mask).resize(a_img.size, Image.Resampling.NEAREST))
            x, y = self.masked(x, mask), self.masked(y, mask)
            d = self.lpips(x[None].to(self.device), y[None].to(self.device))
            out.append(float(d.flatten()[0]))
        return out


# ---------------------------------------------------------------------------------------------
# Structure Dist


def last_key_projection(model: torch.nn.Module) -> torch.nn.Module:
    """The key projection of the last transformer block (``k_proj`` in transformers 5, ``key`` before)."""
    keys = [
        m for n, m in model.named_modules() if n.endswith((".attention.k_proj", ".attention.attention.key"))
    ]
    if not keys:
        raise UserError(
            f"{type(model).__name__} has no attention key projection to read; use a ViT (DINO) model"
        )
    return keys[-1]


class StructureDistance:
    """DINO-ViT self-similarity distance (Splicing ViT Features; img2img-turbo's DinoStructureLoss)."""

    def __init__(
        self, model: str | os.PathLike = DEFAULT_DINO, device: Any = "cpu", size: int = STRUCTURE_SIZE
    ):
        from transformers import ViTModel

        self.model = (
            load_pretrained(ViTModel, model, "DINO ViT model", add_pooling_layer=False).to(device).eval()
        )
        self.key = last_key_projection(self.model)
        self.device = device
        self.size = size

    def resized(self, image: Image.Image | np.ndarray) -> Image.Image:
        """torchvision's ``Resize(size)`` on a PIL image: the shorter side to ``size``, the longer
        one to ``int(size * long / short)``, bilinear (PIL's, antialiased when it shrinks)."""
        image = _rgb(image)
        w, h = image.size
        if w <= h:
            new = (self.size, int(self.size * h / w))
        else:
            new = (int(self.size * w / h), self.size)
        return image if new == (w, h) else image.resize(new, Image.Resampling.BILINEAR)

    def preprocess(self, images: Sequence[Image.Image | np.ndarray]) -> torch.Tensor:
        """``[B, 3, H, W]``: resized (:meth:`resized`) and ImageNet-normalised; one size per call."""
        mean = torch.tensor(IMAGENET_MEAN)[:, None, None]
        std = torch.tensor(IMAGENET_STD)[:, None, None]
        batch = []
        for image in images:
            x = torch.from_numpy(np.asarray(self.resized(image)).copy()).permute(2, 0, 1).float() / 255.0
            batch.append((x - mean) / std)
        if len({tuple(x.shape) for x in batch}) > 1:
            raise ValueError("preprocess takes images of one aspect ratio per call")
        return torch.stack(batch).to(self.device)

    @torch.no_grad()
    def self_similarity(self, images: Sequence[Image.Image | np.ndarray]) -> torch.Tensor:
        """Cosine self-similarity ``[B, T, T]`` of the last block's keys (T tokens, CLS included)."""
        captured: list[torch.Tensor] = []
        handle = self.key.register_forward_hook(lambda _m, _i, out: captured.append(out))
        try:
            self.model(pixel_values=self.preprocess(images), interpolate_pos_encoding=True)
        finally:
            handle.remove()
        keys = F.normalize(captured[-1].float(), dim=-1)  # [B, T, heads * head_dim]
        return keys @ keys.transpose(1, 2)

    def __call__(
        self, inputs: Sequence[Image.Image | np.ndarray], edited: Sequence[Image.Image | np.ndarray]
    ) -> list[float]:
        """One distance per pair: MSE between the input's and the edit's self-similarity matrices.

        An edit of another size than its input is resized to the input's first (bicubic), so both
        matrices have the same tokens; pairs are batched by input size.
        """
        if len(inputs) != len(edited):
            raise ValueError(f"{len(inputs)} inputs but {len(edited)} edits")
        inputs = [_rgb(im) for im in inputs]
        edited = [
            e if e.size == i.size else e.resize(i.size, Image.Resampling.BICUBIC)
            for i, e in zip(inputs, (_rgb(im) for im in edited))
        ]
        groups: dict[tuple[int, int], list[int]] = {}
        for index, image in enumerate(inputs):
            groups.setdefault(image.size, []).append(index)
        out = [0.0] * len(inputs)
        for indices in groups.values():
            a = self.self_similarity([inputs[i] for i in indices])
            b = self.self_similarity([edited[i] for i in indices])
            for i, d in zip(indices, (a - b).pow(2).mean((1, 2)).tolist()):
                out[i] = d
        return out


# ---------------------------------------------------------------------------------------------
# All three


def score_paper_metrics(
    inputs: Sequence[Image.Image | np.ndarray],
    edited: Sequence[Image.Image | np.ndarray],
    source: str,
    target: str,
    object_masks: Sequence[np.ndarray | None] | None = None,
    clip: ClipAccuracy | None = None,
    lpips: BackgroundLPIPS | None = None,
    structure: StructureDistance | None = None,
) -> dict:
    """CLIP-Acc, BG LPIPS and Structure Dist of one edit's pairs (a metric whose model is None is skipped).

    BG LPIPS needs ``object_masks``; pairs without a mask are left out of its mean (``bg_lpips_n``).
    """
    report: dict[str, Any] = {"edit": Edit(source, target).name, "n": len(inputs)}
    if clip is not None:
        report["clip_acc"] = clip(edited, source, target)["clip_acc"]
    if lpips is not None and object_masks is not None:
        pairs = [(a, b, m) for a, b, m in zip(inputs, edited, object_masks) if m is not None]
        values = lpips(*zip(*pairs)) if pairs else []
        report["bg_lpips"] = float(np.mean(values)) if values else None
        report["bg_lpips_n"] = len(values)
    if structure is not None:
        values = structure(inputs, edited)
        report["structure_dist"] = float(np.mean(values)) if values else None
        report["structure_dist_per_pair"] = values
    return report
