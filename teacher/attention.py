"""Cross-attention maps: record them in the reference pass, compare against them in the edit pass.

pix2pix-zero's content preservation (paper §3.2, "cross-attention guidance") needs the
softmax(QK^T * scale) maps of every cross-attention layer (``attn2``: image queries, text keys) of the
UNet. Stable Diffusion's default processor (``AttnProcessor2_0``, fused SDPA) never materialises
them, so ``CrossAttentionMaps.install`` puts an explicit-softmax processor on the ``attn2`` layers
only. Self-attention (``attn1``), where the maps would be [heads, HW, HW] (about 1 GB per layer at
512 px), stays on SDPA and is never stored.

Maps of the reference pass are kept per (denoising step, layer) on the compute device in the
compute dtype, in the layout of ``Attention.head_to_batch_dim``: ``[batch * heads, HW, tokens]``
with batch-major rows, so rows ``[b * heads, (b + 1) * heads)`` belong to batch row ``b``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from diffusers import UNet2DConditionModel


MapWeights = Callable[[int], "torch.Tensor | None"]  # map pixels -> [samples, map pixels] weights


class CrossAttentionMaps:
    """Shared state of the ``attn2`` processors: which step it is, and what to do with the maps.

    ``recording(step)``: store every layer's map under ``(step, layer)``.
    ``guiding(step, num_samples)``: add every layer's ``sum((M - M_ref)^2) / rows_per_sample`` to
    ``self.loss`` (with autograd), comparing against the maps recorded at the same step.
    The official/diffusers loss is the sum over (HW, tokens), then the mean over all
    ``batch * heads`` rows; dividing by the rows of *one* sample instead (``rows / num_samples``,
    e.g. 2 CFG branches x heads) makes the loss a sum of per-sample losses, so each sample's
    gradient does not depend on the batch size. ``rows_per_sample`` counts the rows *recorded* per
    sample: comparing only the conditional half (``reference_rows="last_half"``) still divides by
    2 x heads, the official scale of that half's term. With ``map_weights`` (guidance terms,
    ``teacher/guidance_terms.py``) each map cell's squared difference is weighted per sample.
    """

    def __init__(self) -> None:
        self.reference: dict[tuple[int, str], torch.Tensor] = {}
        self.mode: str | None = None
        self.step: int | None = None
        self.num_samples: int = 1
        self.reference_rows: str = "all"
        self.loss: torch.Tensor | None = None
        self.map_weights: MapWeights | None = None

    # -- installing ------------------------------------------------------------------------------

    def install(self, unet: UNet2DConditionModel) -> list[str]:
        """Put a map-capturing processor on every ``attn2`` layer of ``unet``; leave the others alone.

        Returns the names of the hooked layers (16 in SD 1.x).
        """
        processors = dict(unet.attn_processors)
        hooked = []
        for name in processors:
            if name.endswith("attn2.processor"):
                layer = name.removesuffix(".processor")
                processors[name] = CrossAttentionCaptureProcessor(self, layer)
                hooked.append(layer)
        if not hooked:
            raise ValueError("this UNet has no cross-attention (attn2) layers to guide")
        unet.set_attn_processor(processors)
        return hooked

    # -- modes -----------------------------------------------------------------------------------

    @contextlib.contextmanager
    def recording(self, step: int) -> Iterator[None]:
        with self._mode("record", step):
            yield

    @contextlib.contextmanager
    def guiding(
        self, step: int, num_samples: int, reference_rows: str = "all", map_weights: MapWeights | None = None
    ) -> Iterator[None]:
        """``reference_rows``: compare against all recorded rows, or only their ``"last_half"``
        (the conditional CFG branch, when the guided pass runs that branch alone). ``map_weights``:
        ``map_pixels -> [num_samples, map_pixels]`` weights of each guided sample's map cells (or
        None: all count the same)."""
        self.loss = None
        self.num_samples = num_samples
        self.reference_rows = reference_rows
        self.map_weights = map_weights
        try:
            with self._mode("guide", step):
                yield
        finally:
            self.map_weights = None

    @contextlib.contextmanager
    def _mode(self, mode: str, step: int) -> Iterator[None]:
        self.mode, self.step = mode, step
        try:
            yield
        finally:
            self.mode, self.step = None, None

    def clear(self) -> None:
        self.reference.clear()
        self.loss = None

    # -- called by the processors ----------------------------------------------------------------

    def observe(self, layer: str, probs: torch.Tensor, heads: int = 1) -> None:
        """Record or compare ``probs`` ``[batch * heads, HW, tokens]`` of ``layer``."""
        if self.mode == "record":
            self.reference[(self.step, layer)] = probs.detach()
        elif self.mode == "guide":
            ref = self.reference.pop((self.step, layer))  # each map is used once: free it
            # The official normaliser: the rows of one sample's whole recorded pass (2 CFG branches x
            # heads), also when only the conditional half is compared ("last_half", the paper preset),
            # so that half's gradient has the scale it has inside the official loss at the same λ.
            rows_per_sample = ref.shape[0] / self.num_samples
            if self.reference_rows == "last_half":
                ref = ref[ref.shape[0] // 2 :]
            squared = (probs - ref).float().pow(2)  # fp32 sum: no fp16 overflow
            weights = self.map_weights(probs.shape[1]) if self.map_weights is not None else None
            if weights is not None:
                squared = squared.sum(-1) * self._row_weights(weights, probs.shape[0] // heads, heads)
            term = squared.sum() / rows_per_sample
            self.loss = term if self.loss is None else self.loss + term

    def _row_weights(self, weights: torch.Tensor, batch: int, heads: int) -> torch.Tensor:
        """``[batch * heads, HW]``: each row's sample's weights ``[num_samples, HW]``; batch row ``b``
        is sample ``b % num_samples`` (the CFG branches are stacked batch-major)."""
        return weights.repeat(batch // self.num_samples, 1).repeat_interleave(heads, 0)


class CrossAttentionCaptureProcessor:
    """``attn2`` processor with an explicit softmax(QK^T * scale), reporting the map to ``maps``.

    Computes the same as diffusers' ``AttnProcessor`` (``Attention.get_attention_scores``, which
    upcasts the softmax where the layer asks for it), so outputs match the stock processor.
    """

    def __init__(self, maps: CrossAttentionMaps, layer: str) -> None:
        self.maps = maps
        self.layer = layer

    def __call__(
        self,
        attn: Any,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        temb: torch.Tensor | None = None,
        **kwargs: Any,
    ) -> torch.Tensor:
        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)
        input_ndim = hidden_states.ndim
        if input_ndim == 4:
            b, c, h, w = hidden_states.shape
            hidden_states = hidden_states.view(b, c, h * w).transpose(1, 2)
        batch_size, sequence_length, _ = (
            hidden_states.shape if encoder_hidden_states is None else encoder_hidden_states.shape
        )
        attention_mask = attn.prepare_attention_mask(attention_mask, sequence_length, batch_size)
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)

        query = attn.to_q(hidden_states)
        if encoder_hidden_states is None:
            encoder_hidden_states = hidden_states
        elif attn.norm_cross:
            encoder_hidden_states = attn.norm_encoder_hidden_states(encoder_hidden_states)
        key = attn.to_k(encoder_hidden_states)
        value = attn.to_v(encoder_hidden_states)

        query = attn.head_to_batch_dim(query)
        key = attn.head_to_batch_dim(key)
        value = attn.head_to_batch_dim(value)
        probs = attn.get_attention_scores(query, key, attention_mask)  # [B*heads, HW, tokens]
        if self.maps.mode is not None:
            self.maps.observe(self.layer, probs, attn.heads)

        hidden_states = attn.batch_to_head_dim(torch.bmm(probs, value))
        hidden_states = attn.to_out[1](attn.to_out[0](hidden_states))  # linear, dropout
        if input_ndim == 4:
            hidden_states = hidden_states.transpose(-1, -2).reshape(b, c, h, w)
        if attn.residual_connection:
            hidden_states = hidden_states + residual
        return hidden_states / attn.rescale_output_factor
