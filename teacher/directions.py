"""Edit directions: where the text embedding moves to turn the source concept into the target.

pix2pix-zero (paper §3.1, official ``make_edit_direction.py``) embeds a large bank of sentences
about each concept with Stable Diffusion's own CLIP text encoder and averages the per-token
``last_hidden_state`` over the sentences, giving one [77, D] embedding per concept (not pooled:
padding positions included, no attention mask, as the official code). The edit direction is
``mean(target) - mean(source)``; at edit time it is added to the caption's embedding.

Files: ``EditDirection.save`` writes safetensors (the direction plus both concept means) with
metadata (model, text-encoder fingerprint, sentence counts, method). ``EditDirection.load`` also
reads the official repository's ``.pt`` files: a pair of per-concept mean embeddings
(``assets/embeddings_sd_1.4/cat.pt`` + ``dog.pt``, [1, 77, 768], fp16 or fp32, saved on CUDA)
or one file holding a direction.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from p2pz.utils.atomic import atomic_path
from p2pz.utils.errors import UserError

if TYPE_CHECKING:
    from transformers import CLIPTextModel, CLIPTokenizer

log = logging.getLogger(__name__)

FORMAT = "p2pz-edit-direction"
FORMAT_VERSION = "1"
METHOD = "mean over sentences of the text encoder's last_hidden_state, per token (77 x D); target - source"


@dataclass
class EditDirection:
    """A [77, D] float32 edit direction ``target_mean - source_mean`` and where it came from."""

    tensor: torch.Tensor  # [77, D], float32, CPU
    source: str
    target: str
    metadata: dict[str, str] = field(default_factory=dict)
    source_embedding: torch.Tensor | None = None  # [77, D] mean embedding of the source sentences
    target_embedding: torch.Tensor | None = None  # [77, D] mean embedding of the target sentences

    def __post_init__(self) -> None:
        t = self.tensor
        if t.dim() == 3 and t.shape[0] == 1:  # the official [1, 77, D] layout
            t = t[0]
        if t.dim() != 2:
            raise UserError(f"an edit direction must have shape [77, D], got {list(self.tensor.shape)}")
        self.tensor = t.detach().to("cpu", torch.float32).contiguous()

    @property
    def norm(self) -> float:
        """Frobenius norm (the official cat->dog direction on SD 1.4 has about 140)."""
        return float(self.tensor.norm())

    @property
    def name(self) -> str:
        """The edit's name (``cat-to-dog``), as in ``teacher.edits``."""
        from p2pz.teacher.edits import Edit

        return Edit(self.source, self.target).name

    def save(self, path: str | os.PathLike) -> Path:
        """Write a ``.safetensors`` file atomically (the suffix is added if missing)."""
        from safetensors.torch import save_file

        path = Path(path)
        if path.suffix != ".safetensors":
            path = path.with_name(path.name + ".safetensors")
        tensors = {"direction": self.tensor}
        if self.source_embedding is not None:
            tensors["source_embedding"] = self.source_embedding.detach().to("cpu", torch.float32).contiguous()
        if self.target_embedding is not None:
            tensors["target_embedding"] = self.target_embedding.detach().to("cpu", torch.float32).contiguous()
        meta = {str(k): str(v) for k, v in self.metadata.items()}
        meta.update(format=FORMAT, format_version=FORMAT_VERSION, source=self.source, target=self.target)
        with atomic_path(path) as tmp:
            save_file(tensors, str(tmp), metadata=meta)
        return path

    @classmethod
    def load(cls, path: str | os.PathLike | Sequence[str | os.PathLike]) -> EditDirection:
        """Load our ``.safetensors``, one official direction ``.pt``, or a pair of official concept ``.pt``.

        A pair ``(source.pt, target.pt)`` holds one mean embedding per concept; the direction is
        ``target.mean(0) - source.mean(0)`` as in the official ``construct_direction``.
        """
        if isinstance(path, (list, tuple)):
            if len(path) == 1:
                return cls.load(path[0])
            if len(path) != 2:
                raise UserError(f"give one direction file or two concept .pt files, got {len(path)} paths")
            return cls.from_official_pair(path[0], path[1])
        path = Path(path)
        _check_direction_file(path)
        if path.suffix == ".safetensors":
            return _load_safetensors(path)
        tensor = _load_official_tensor(path)
        if tensor.dim() == 3:
            tensor = tensor.mean(0)
        source, target = _split_task_name(path.stem)
        return cls(tensor, source, target, {"file": str(path), "method": "official direction file"})

    @classmethod
    def from_official_pair(cls, source_pt: str | os.PathLike, target_pt: str | os.PathLike) -> EditDirection:
        src = _load_official_tensor(Path(source_pt))
        tgt = _load_official_tensor(Path(target_pt))
        if src.shape[-2:] != tgt.shape[-2:]:
            raise UserError(
                f"concept embeddings do not match: {source_pt} has shape {list(src.shape)}, "
                f"{target_pt} has {list(tgt.shape)}; both must come from the same text encoder"
            )
        src_mean, tgt_mean = _as_mean(src), _as_mean(tgt)
        meta = {
            "method": "official concept embeddings",
            "source_file": str(source_pt),
            "target_file": str(target_pt),
        }
        return cls(tgt_mean - src_mean, Path(source_pt).stem, Path(target_pt).stem, meta, src_mean, tgt_mean)

    def check_compatible(
        self, text_encoder: CLIPTextModel | None = None, fingerprint: str | None = None
    ) -> None:
        """Raise if the direction cannot apply to this text encoder; warn if it was made with another one."""
        if text_encoder is not None:
            hidden = text_encoder.config.hidden_size
            if self.tensor.shape[-1] != hidden:
                raise UserError(
                    f"edit direction {self.name} has width {self.tensor.shape[-1]} but the text encoder's "
                    f"hidden size is {hidden}; make the direction with the same model "
                    "(p2pz direction --model ...)"
                )
        theirs = self.metadata.get("text_encoder_fingerprint")
        if fingerprint and theirs and fingerprint != theirs:
            log.warning(
                "edit direction %s was computed with another text encoder (%s); results may be off",
                self.name,
                self.metadata.get("model", "unknown model"),
            )


def _split_task_name(stem: str) -> tuple[str, str]:
    # Official task names are "cat2dog"; ours "cat-dog". Unknown patterns keep the stem as target.
    for sep in ("-", "2"):
        if stem.count(sep) == 1:
            a, b = stem.split(sep)
            if a and b:
                return a, b
    return "", stem


def _check_direction_file(path: Path, what: str = "direction file") -> None:
    """A one-line UserError for a direction path that is missing, a folder or empty."""
    make = "make one with `p2pz direction` (or give an official pix2pix-zero .pt)"
    if not path.exists():
        raise UserError(f"{what} '{path}' does not exist; {make}")
    if not path.is_file():
        raise UserError(f"{what} '{path}' is a folder; give the .safetensors (or .pt) file in it")
    if path.stat().st_size == 0:
        raise UserError(f"{what} '{path}' is empty (an interrupted copy?); copy it again or {make}")


def _load_official_tensor(path: Path) -> torch.Tensor:
    _check_direction_file(path, "embedding file")
    try:
        # The official files were saved from CUDA tensors: map them to the CPU; weights_only
        # refuses arbitrary pickled code.
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        raise UserError(
            f"cannot read '{path}' as a torch tensor file ({type(err).__name__}); expected an official "
            "pix2pix-zero .pt embedding or a .safetensors direction from `p2pz direction`"
        ) from err
    if isinstance(obj, dict) and len(obj) == 1:
        obj = next(iter(obj.values()))
    if not isinstance(obj, torch.Tensor) or obj.dim() not in (2, 3):
        shape = list(obj.shape) if isinstance(obj, torch.Tensor) else type(obj).__name__
        raise UserError(f"'{path}' does not hold a [1, 77, D] or [77, D] tensor (found {shape})")
    return obj.float()


def _as_mean(t: torch.Tensor) -> torch.Tensor:
    return t.mean(0) if t.dim() == 3 else t


def _load_safetensors(path: Path) -> EditDirection:
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            meta = dict(f.metadata() or {})
            tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 - safe_open has no iteration
    except Exception as err:
        reason = str(err).splitlines()[0] if str(err) else ""
        raise UserError(
            f"cannot read direction file '{path}' ({type(err).__name__}: {reason}): it is truncated or not "
            "a safetensors file; copy it again or make it again with `p2pz direction`"
        ) from err
    if "direction" not in tensors:
        raise UserError(f"'{path}' holds no 'direction' tensor; make it with `p2pz direction`")
    source, target = meta.pop("source", ""), meta.pop("target", "")
    return EditDirection(
        tensors["direction"],
        source,
        target,
        meta,
        tensors.get("source_embedding"),
        tensors.get("target_embedding"),
    )


def load_direction(path: str | os.PathLike | Sequence[str | os.PathLike]) -> EditDirection:
    """Shorthand for ``EditDirection.load``."""
    return EditDirection.load(path)


# ----------------------------------------------------------------------------------------------
# Computing directions


@torch.no_grad()
def embed_sentences(
    tokenizer: Any, text_encoder: Any, sentences: Sequence[str], batch_size: int = 16, progress: bool = True
) -> torch.Tensor:
    """Per-token mean of ``last_hidden_state`` over ``sentences``: a [77, D] float32 CPU tensor.

    As the official code: pad to ``model_max_length`` (77) with the tokenizer's pad token,
    truncate, no attention mask, no pooling. The sum is kept in float32 even for fp16 encoders.
    """
    from tqdm.auto import tqdm

    sentences = list(sentences)
    if not sentences:
        raise UserError("no sentences to embed; give a non-empty sentence bank")
    device = next(text_encoder.parameters()).device
    total = None
    batches = range(0, len(sentences), batch_size)
    for start in tqdm(
        batches, desc="embedding sentences", disable=not progress or len(batches) < 8, leave=False
    ):
        ids = tokenizer(
            sentences[start : start + batch_size],
            padding="max_length",
            max_length=tokenizer.model_max_length,
            truncation=True,
            return_tensors="pt",
        ).input_ids.to(device)
        hidden = text_encoder(ids, attention_mask=None)[0].float().sum(0)
        total = hidden if total is None else total + hidden
    return (total / len(sentences)).cpu()


def text_encoder_fingerprint(tokenizer: CLIPTokenizer, text_encoder: CLIPTextModel) -> str:
    """sha256 over the tokenizer vocabulary and the text encoder's weights (rounded to fp16, on CPU).

    Rounding to fp16 first makes it the same whether the model was loaded in fp32 or fp16 and on
    whichever device, so a direction made in fp16 on a GPU matches the same model in fp32 on a CPU.
    """
    h = hashlib.sha256()
    h.update(json.dumps(tokenizer.get_vocab(), sort_keys=True, ensure_ascii=False).encode())
    for name, tensor in sorted(text_encoder.state_dict().items()):
        t = tensor.detach().to("cpu")
        t = (t.to(torch.float16) if t.is_floating_point() else t).contiguous()
        h.update(f"{name}:{list(t.shape)}:{t.dtype}".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def compute_direction(
    tokenizer: Any,
    text_encoder: Any,
    source_sentences: Sequence[str],
    target_sentences: Sequence[str],
    *,
    source: str = "",
    target: str = "",
    batch_size: int = 16,
    progress: bool = True,
    model: str = "",
    metadata: dict[str, Any] | None = None,
) -> EditDirection:
    """Edit direction = mean embedding of ``target_sentences`` - mean of ``source_sentences``."""
    src = embed_sentences(tokenizer, text_encoder, source_sentences, batch_size, progress)
    tgt = embed_sentences(tokenizer, text_encoder, target_sentences, batch_size, progress)
    meta = {
        "model": model,
        "text_encoder_fingerprint": text_encoder_fingerprint(tokenizer, text_encoder),
        "text_encoder_dtype": str(next(text_encoder.parameters()).dtype).removeprefix("torch."),
        "num_source_sentences": len(source_sentences),
        "num_target_sentences": len(target_sentences),
        "method": METHOD,
    }
    meta.update(metadata or {})
    return EditDirection(tgt - src, source, target, {k: str(v) for k, v in meta.items()}, src, tgt)
