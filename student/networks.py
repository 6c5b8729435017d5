"""The student networks: a CoModGAN-style generator for paired translation and its conditional discriminator.

One file, read top to bottom (NVlabs' ``networks.py`` layout):

1. building blocks with the equalised learning rate (weights scaled at runtime, as in StyleGAN2);
2. ``modulated_conv2d``: StyleGAN2's modulated / demodulated convolution, fused (grouped) or not;
3. the generator's parts: ``Encoder`` (input image -> per-resolution skip features + a global code),
   ``MappingNetwork`` (z -> w), ``SynthesisNetwork`` (decoder with *co-modulation*: every layer's
   style is an affine of ``[w ; global code]``, encoder skips added after each up-conv, skip-RGB output);
4. ``Generator`` and ``Discriminator`` (a StyleGAN2 residual D on the ``(input, output)`` pair, with a
   minibatch standard deviation layer).

CoModGAN (Zhao et al., ICLR 2021, zsyzzsoft/co-mod-gan) in pix2pix mode: the encoder sees the input image
only, the discriminator sees the concatenated pair. The ``comod`` preset's sizes follow CoModGAN's
512 px configuration; ``benchmarks/student_size.py`` prints their parameter counts.

Channels at resolution ``res`` are ``min(channel_base // res, channel_max)``, the same in the encoder,
the decoder and the discriminator (``comod``: channel_base 32768, channel_max 512).
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from p2pz.student.ops import bias_act, conv2d_resample, upfirdn2d
from p2pz.utils.errors import UserError

# ---------------------------------------------------------------------------------------------------
# Presets

GENERATOR_PRESETS: dict[str, dict[str, Any]] = {
    # Faithful to CoModGAN (about 80 M parameters at 512 px): StyleGAN2 widths, an 8-layer mapping
    # network, a 1024-d global code with dropout 0.5.
    "comod": dict(
        channel_base=32768,
        channel_max=512,
        z_dim=512,
        w_dim=512,
        mapping_layers=8,
        global_dim=1024,
        dropout=0.5,
    ),
    # A small student for real-time CPU edits at 256 px (widths chosen by measurement: see
    # benchmarks/student_size.py). The global code, mapping network and styles shrink with the widths:
    # at CoModGAN's sizes the 4x4 dense layers and the 1536-d modulation affines dominate.
    "lite": dict(
        channel_base=2048,
        channel_max=128,
        z_dim=64,
        w_dim=64,
        mapping_layers=2,
        global_dim=256,
        dropout=0.5,
    ),
}

DISCRIMINATOR_PRESETS: dict[str, dict[str, Any]] = {
    "comod": dict(channel_base=32768, channel_max=512),
    "lite": dict(channel_base=4096, channel_max=256),
}

# Defaults shared by both presets (any of them can be overridden by keyword).
GENERATOR_DEFAULTS: dict[str, Any] = dict(
    mapping_lr_multiplier=0.01,  # StyleGAN2: the mapping network learns 100x slower
    w_avg_beta=0.995,  # EMA of w, the centre that truncation pulls towards
    truncation_psi=0.5,  # applied in eval mode when a z is given (CoModGAN's G_main default)
    use_noise=False,  # per-pixel noise inputs; off so that a distilled edit is deterministic
    conv_clamp=None,  # clamp pre-activations (StyleGAN2 uses 256 with fp16)
    resample_filter=(1, 3, 3, 1),
    # Add the input image to the output (the network predicts the edit as a change of the input).
    # Off in CoModGAN; for structure-keeping edits it makes copying the untouched pixels free,
    # so a small student spends its capacity on the edit (configs/cpu.yaml turns it on).
    input_residual=False,
    # One student for many edits: the length of the edit's conditioning vector (0: a per-edit student,
    # no conditioning) and of the edit code it is mapped to, which joins the co-modulation vector.
    edit_dim=0,
    edit_code_dim=64,
)

DISCRIMINATOR_DEFAULTS: dict[str, Any] = dict(
    mbstd_group_size=4,
    mbstd_num_channels=1,
    conv_clamp=None,
    resample_filter=(1, 3, 3, 1),
)


def _resolve(
    kind: str, presets: dict[str, dict[str, Any]], defaults: dict[str, Any], preset: str, overrides: dict
) -> dict[str, Any]:
    """preset values < overrides; unknown keys are an error (a typo in a config must not pass silently)."""
    if preset not in presets:
        raise UserError(f"unknown {kind} preset {preset!r}; choose one of {sorted(presets)}")
    known = {**defaults, **presets[preset]}
    unknown = sorted(set(overrides) - set(known))
    if unknown:
        raise UserError(f"unknown {kind} option(s) {unknown}; known options: {sorted(known)}")
    cfg = {**known, **overrides}
    if cfg.get("resample_filter") is not None:
        cfg["resample_filter"] = [float(v) for v in cfg["resample_filter"]]
    return cfg


def _check_resolution(resolution: int) -> int:
    if not (isinstance(resolution, int) and 64 <= resolution <= 1024 and resolution & (resolution - 1) == 0):
        raise UserError(f"resolution must be a power of two from 64 to 1024, got {resolution!r}")
    return resolution


def channels_at(res: int, channel_base: int, channel_max: int) -> int:
    """Feature channels at resolution `res`: StyleGAN2's ``min(channel_base // res, channel_max)``."""
    return max(1, min(channel_base // res, channel_max))


# ---------------------------------------------------------------------------------------------------
# Building blocks (equalised learning rate: weights are N(0, 1) and scaled by 1/sqrt(fan_in) at runtime)


def normalize_2nd_moment(x: torch.Tensor, dim: int = 1, eps: float = 1e-8) -> torch.Tensor:
    return x * (x.square().mean(dim=dim, keepdim=True) + eps).rsqrt()


class FullyConnectedLayer(nn.Module):
    def __init__(
        self,
        in_features: int,
        out_features: int,
        activation: str = "linear",
        lr_multiplier: float = 1.0,
        bias_init: float = 0.0,
    ) -> None:
        super().__init__()
        self.activation = activation
        # Store w / lr_mult and multiply back at runtime: Adam then moves the weight lr_mult times slower.
        self.weight = nn.Parameter(torch.randn([out_features, in_features]) / lr_multiplier)
        self.bias = nn.Parameter(torch.full([out_features], float(bias_init)) / lr_multiplier)
        self.weight_gain = lr_multiplier / math.sqrt(in_features)
        self.bias_gain = lr_multiplier

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight.to(x.dtype) * self.weight_gain
        b = self.bias.to(x.dtype) * self.bias_gain
        if self.activation == "linear":
            return torch.addmm(b.unsqueeze(0), x, w.t())
        return bias_act.bias_act(x.matmul(w.t()), b, act=self.activation)

    def extra_repr(self) -> str:
        return f"in={self.weight.shape[1]}, out={self.weight.shape[0]}, activation={self.activation}"


class Conv2dLayer(nn.Module):
    """Convolution + bias + activation, with an optional FIR-blurred 2x down/upsampling."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int,
        bias: bool = True,
        activation: str = "linear",
        up: int = 1,
        down: int = 1,
        resample_filter: list[float] | None = None,
        conv_clamp: float | None = None,
    ) -> None:
        super().__init__()
        self.activation = activation
        self.up, self.down = up, down
        self.padding = kernel_size // 2
        self.conv_clamp = conv_clamp
        self.register_buffer("resample_filter", upfirdn2d.setup_filter(resample_filter or [1, 3, 3, 1]))
        self.weight = nn.Parameter(torch.randn([out_channels, in_channels, kernel_size, kernel_size]))
        self.bias = nn.Parameter(torch.zeros([out_channels])) if bias else None
        self.weight_gain = 1 / math.sqrt(in_channels * kernel_size**2)

    def forward(self, x: torch.Tensor, gain: float = 1.0) -> torch.Tensor:
        w = self.weight.to(x.dtype) * self.weight_gain
        x = conv2d_resample.conv2d_resample(
            x, w, f=self.resample_filter, up=self.up, down=self.down, padding=self.padding,
            flip_weight=self.up == 1,  # NVlabs: the cheaper transposed-conv orientation
        )  # fmt: skip
        act_gain = bias_act.ACTIVATIONS[self.activation].def_gain * gain
        clamp = self.conv_clamp * gain if self.conv_clamp is not None else None
        return bias_act.bias_act(x, self.bias, act=self.activation, gain=act_gain, clamp=clamp)

    def extra_repr(self) -> str:
        o, i, k, _ = self.weight.shape
        return f"in={i}, out={o}, kernel={k}, activation={self.activation}, up={self.up}, down={self.down}"


# ---------------------------------------------------------------------------------------------------
# Modulated convolution (StyleGAN2)


def modulated_conv2d(
    x: torch.Tensor,
    weight: torch.Tensor,
    styles: torch.Tensor,
    noise: torch.Tensor | None = None,
    up: int = 1,
    down: int = 1,
    padding: int = 0,
    resample_filter: torch.Tensor | None = None,
    demodulate: bool = True,
    flip_weight: bool = True,
    fused_modconv: bool = True,
) -> torch.Tensor:
    """Convolve x [N, I, H, W] with weight [O, I, k, k] scaled per sample by styles [N, I].

    Modulation: w'[n, o, i] = w[o, i] * s[n, i]. Demodulation: divide each output channel by
    sqrt(sum_{i,k} w'^2), which gives unit output variance for unit input variance.

    fused: build the per-sample weights and run one grouped convolution (groups = N); fastest at small
    batch and at inference. Not fused: scale the activations instead of the weights (x * s before the
    shared convolution, x * d after), the same maths with batch-independent weights; better for training.
    """
    n = x.shape[0]
    out_channels, in_channels, kh, kw = weight.shape
    w = weight.unsqueeze(0) * styles.reshape(n, 1, -1, 1, 1)  # [N, O, I, k, k]
    dcoefs = (w.square().sum(dim=[2, 3, 4]) + 1e-8).rsqrt() if demodulate else None  # [N, O]

    if not fused_modconv:
        x = x * styles.to(x.dtype).reshape(n, -1, 1, 1)
        x = conv2d_resample.conv2d_resample(
            x,
            weight.to(x.dtype),
            f=resample_filter,
            up=up,
            down=down,
            padding=padding,
            flip_weight=flip_weight,
        )
        if dcoefs is not None:
            x = x * dcoefs.to(x.dtype).reshape(n, -1, 1, 1)
        if noise is not None:
            x = x + noise.to(x.dtype)
        return x

    if dcoefs is not None:
        w = w * dcoefs.reshape(n, -1, 1, 1, 1)
    x = x.reshape(1, -1, *x.shape[2:])  # the batch becomes groups of channels
    w = w.reshape(-1, in_channels, kh, kw).to(x.dtype)
    x = conv2d_resample.conv2d_resample(
        x, w, f=resample_filter, up=up, down=down, padding=padding, groups=n, flip_weight=flip_weight
    )
    x = x.reshape(n, -1, *x.shape[2:])
    if noise is not None:
        x = x + noise.to(x.dtype)
    return x


class ModulatedConvLayer(nn.Module):
    """A synthesis layer: co-modulated 3x3 conv (optionally 2x up) + noise + bias + lrelu."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        mod_dim: int,
        resolution: int,
        up: int = 1,
        use_noise: bool = False,
        resample_filter: list[float] | None = None,
        conv_clamp: float | None = None,
        kernel_size: int = 3,
    ) -> None:
        super().__init__()
        self.up = up
        self.resolution = resolution
        self.padding = kernel_size // 2
        self.conv_clamp = conv_clamp
        self.use_noise = use_noise
        # Co-modulation: the style is an affine map of [w ; global code]; bias 1 starts as identity.
        self.affine = FullyConnectedLayer(mod_dim, in_channels, bias_init=1)
        self.register_buffer("resample_filter", upfirdn2d.setup_filter(resample_filter or [1, 3, 3, 1]))
        self.weight = nn.Parameter(torch.randn([out_channels, in_channels, kernel_size, kernel_size]))
        self.bias = nn.Parameter(torch.zeros([out_channels]))
        if use_noise:
            self.register_buffer("noise_const", torch.randn([resolution, resolution]))
            self.noise_strength = nn.Parameter(torch.zeros([]))

    def forward(
        self, x: torch.Tensor, mod: torch.Tensor, noise_mode: str, fused_modconv: bool
    ) -> torch.Tensor:
        styles = self.affine(mod)
        noise = None
        if self.use_noise and noise_mode == "random":
            noise = torch.randn([x.shape[0], 1, self.resolution, self.resolution], device=x.device) * (
                self.noise_strength
            )
        elif self.use_noise and noise_mode == "const":
            noise = self.noise_const * self.noise_strength
        x = modulated_conv2d(
            x, self.weight, styles, noise=noise, up=self.up, padding=self.padding,
            resample_filter=self.resample_filter, flip_weight=self.up == 1, fused_modconv=fused_modconv,
        )  # fmt: skip
        return bias_act.bias_act(x, self.bias, act="lrelu", clamp=self.conv_clamp)


class ToRGBLayer(nn.Module):
    """Co-modulated 1x1 conv to RGB, without demodulation (StyleGAN2's tRGB)."""

    def __init__(self, in_channels: int, out_channels: int, mod_dim: int, conv_clamp: float | None = None):
        super().__init__()
        self.conv_clamp = conv_clamp
        self.affine = FullyConnectedLayer(mod_dim, in_channels, bias_init=1)
        self.weight = nn.Parameter(torch.randn([out_channels, in_channels, 1, 1]))
        self.bias = nn.Parameter(torch.zeros([out_channels]))
        self.weight_gain = 1 / math.sqrt(in_channels)

    def forward(self, x: torch.Tensor, mod: torch.Tensor, fused_modconv: bool) -> torch.Tensor:
        styles = self.affine(mod) * self.weight_gain
        x = modulated_conv2d(x, self.weight, styles, demodulate=False, fused_modconv=fused_modconv)
        return bias_act.bias_act(x, self.bias, clamp=self.conv_clamp)


# ---------------------------------------------------------------------------------------------------
# Generator part 1: the encoder of the input image


class EncoderBlock(nn.Module):
    """conv 3x3 (its output is the skip feature) -> blurred stride-2 conv 3x3 (next resolution)."""

    def __init__(self, in_channels: int, out_channels: int, resample_filter, conv_clamp) -> None:
        super().__init__()
        kw = dict(activation="lrelu", resample_filter=resample_filter, conv_clamp=conv_clamp)
        self.conv0 = Conv2dLayer(in_channels, in_channels, 3, **kw)
        self.conv1 = Conv2dLayer(in_channels, out_channels, 3, down=2, **kw)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        feature = self.conv0(x)
        return self.conv1(feature), feature


class Encoder(nn.Module):
    """Input image -> (global code [N, global_dim], skip features {res: [N, C(res), res, res]}).

    FromRGB 1x1, then per resolution R..8 an EncoderBlock, then at 4x4 a conv (its output is the 4x4 skip)
    and flatten + dense to the global code, with dropout (train mode only; TF CoModGAN keeps it on always).
    """

    def __init__(
        self,
        resolution: int,
        img_channels: int,
        channel_base: int,
        channel_max: int,
        global_dim: int,
        dropout: float,
        resample_filter,
        conv_clamp,
    ) -> None:
        super().__init__()
        self.resolution = resolution
        ch = lambda res: channels_at(res, channel_base, channel_max)
        self.from_rgb = Conv2dLayer(
            img_channels, ch(resolution), 1, activation="lrelu", conv_clamp=conv_clamp
        )
        self.block_resolutions = [2**i for i in range(int(math.log2(resolution)), 2, -1)]  # R, R/2, ..., 8
        self.blocks = nn.ModuleDict(
            {
                str(res): EncoderBlock(ch(res), ch(res // 2), resample_filter, conv_clamp)
                for res in self.block_resolutions
            }
        )
        self.conv4 = Conv2dLayer(ch(4), ch(4), 3, activation="lrelu", conv_clamp=conv_clamp)
        self.fc = FullyConnectedLayer(ch(4) * 16, global_dim, activation="lrelu")
        self.dropout = nn.Dropout(dropout)

    def forward(self, img: torch.Tensor) -> tuple[torch.Tensor, dict[int, torch.Tensor]]:
        features: dict[int, torch.Tensor] = {}
        x = self.from_rgb(img)
        for res in self.block_resolutions:
            x, features[res] = self.blocks[str(res)](x)
        x = self.conv4(x)
        features[4] = x
        global_code = self.dropout(self.fc(x.flatten(1)))
        return global_code, features


# ---------------------------------------------------------------------------------------------------
# Generator part 2: the mapping network z -> w


class MappingNetwork(nn.Module):
    """Normalise z, then `num_layers` dense + lrelu layers at a reduced learning rate; tracks w_avg."""

    def __init__(self, z_dim: int, w_dim: int, num_layers: int, lr_multiplier: float, w_avg_beta: float):
        super().__init__()
        self.w_avg_beta = w_avg_beta
        dims = [z_dim] + [w_dim] * num_layers
        self.layers = nn.Sequential(
            *[
                FullyConnectedLayer(i, o, activation="lrelu", lr_multiplier=lr_multiplier)
                for i, o in zip(dims[:-1], dims[1:])
            ]
        )
        self.register_buffer("w_avg", torch.zeros([w_dim]))

    def forward(self, z: torch.Tensor, truncation_psi: float = 1.0) -> torch.Tensor:
        w = self.layers(normalize_2nd_moment(z))
        if self.training:  # a static flag: no data-dependent control flow
            with torch.no_grad():
                # w is bf16/fp16 under autocast while the buffer stays fp32: average in fp32
                batch_mean = w.detach().mean(dim=0).to(self.w_avg.dtype)
                self.w_avg.copy_(batch_mean.lerp(self.w_avg, self.w_avg_beta))
        if truncation_psi != 1:
            w = self.w_avg.to(w.dtype).lerp(w, truncation_psi)
        return w


class EditMapping(nn.Module):
    """The edit's conditioning vector -> an edit code [N, code_dim] (one student for many edits).

    The vectors are standardised first by statistics of the training edits (``set_statistics``,
    stored as buffers): the pooled text embeddings of two edits share most of their length, and what
    tells them apart is small next to it. Then two dense + lrelu layers.
    """

    def __init__(self, edit_dim: int, code_dim: int) -> None:
        super().__init__()
        self.layers = nn.Sequential(
            FullyConnectedLayer(edit_dim, code_dim, activation="lrelu"),
            FullyConnectedLayer(code_dim, code_dim, activation="lrelu"),
        )
        self.register_buffer("center", torch.zeros([edit_dim]))
        self.register_buffer("scale", torch.ones([]))

    @torch.no_grad()
    def set_statistics(self, vectors: torch.Tensor) -> None:
        """Centre on the training edits' mean vector; scale by the RMS of their values' deviations."""
        vectors = vectors.to(self.center)
        center = vectors.mean(dim=0)
        rms = (vectors - center).square().mean().sqrt()  # per value: the standardised values are ~1
        self.center.copy_(center)
        self.scale.copy_(rms if len(vectors) > 1 and rms > 1e-8 else torch.ones_like(rms))

    def forward(self, edit: torch.Tensor) -> torch.Tensor:
        e = (edit.to(self.center.dtype) - self.center) / self.scale
        return self.layers(e.to(self.layers[0].weight.dtype))


# ---------------------------------------------------------------------------------------------------
# Generator part 3: the co-modulated decoder


class SynthesisInput(nn.Module):
    """4x4 block: dense(global code) -> [C4, 4, 4], + encoder skip, co-modulated conv, ToRGB."""

    def __init__(self, channels: int, global_dim: int, mod_dim: int, img_channels: int, layer_kw: dict):
        super().__init__()
        self.channels = channels
        self.fc = FullyConnectedLayer(global_dim, channels * 16, activation="lrelu")
        self.conv = ModulatedConvLayer(channels, channels, mod_dim, resolution=4, **layer_kw)
        self.torgb = ToRGBLayer(channels, img_channels, mod_dim, conv_clamp=layer_kw["conv_clamp"])

    def forward(self, global_code, skip, mod, noise_mode, fused_modconv):
        x = self.fc(global_code).reshape(-1, self.channels, 4, 4) + skip
        x = self.conv(x, mod, noise_mode, fused_modconv)
        return x, self.torgb(x, mod, fused_modconv)


class SynthesisBlock(nn.Module):
    """One resolution: up-conv, + encoder skip, conv, and skip-RGB: img = upsample(img) + ToRGB(x)."""

    def __init__(self, in_channels, out_channels, resolution, mod_dim, img_channels, layer_kw: dict):
        super().__init__()
        self.conv0 = ModulatedConvLayer(in_channels, out_channels, mod_dim, resolution, up=2, **layer_kw)
        self.conv1 = ModulatedConvLayer(out_channels, out_channels, mod_dim, resolution, **layer_kw)
        self.torgb = ToRGBLayer(out_channels, img_channels, mod_dim, conv_clamp=layer_kw["conv_clamp"])
        self.register_buffer("resample_filter", upfirdn2d.setup_filter(layer_kw["resample_filter"]))

    def forward(self, x, img, skip, mod, noise_mode, fused_modconv):
        x = self.conv0(x, mod, noise_mode, fused_modconv) + skip  # CoModGAN's additive U-Net skip
        x = self.conv1(x, mod, noise_mode, fused_modconv)
        img = upfirdn2d.upsample2d(img, self.resample_filter) + self.torgb(x, mod, fused_modconv)
        return x, img


class SynthesisNetwork(nn.Module):
    """(global code, encoder skips, co-modulation vector [w ; global code]) -> image."""

    def __init__(
        self,
        resolution: int,
        img_channels: int,
        channel_base: int,
        channel_max: int,
        global_dim: int,
        mod_dim: int,
        use_noise: bool,
        resample_filter,
        conv_clamp,
    ) -> None:
        super().__init__()
        ch = lambda res: channels_at(res, channel_base, channel_max)
        layer_kw = dict(use_noise=use_noise, resample_filter=resample_filter, conv_clamp=conv_clamp)
        self.input = SynthesisInput(ch(4), global_dim, mod_dim, img_channels, layer_kw)
        self.block_resolutions = [2**i for i in range(3, int(math.log2(resolution)) + 1)]  # 8 ... R
        self.blocks = nn.ModuleDict(
            {
                str(res): SynthesisBlock(ch(res // 2), ch(res), res, mod_dim, img_channels, layer_kw)
                for res in self.block_resolutions
            }
        )

    def forward(self, global_code, features, mod, noise_mode, fused_modconv):
        x, img = self.input(global_code, features[4], mod, noise_mode, fused_modconv)
        for res in self.block_resolutions:
            x, img = self.blocks[str(res)](x, img, features[res], mod, noise_mode, fused_modconv)
        return img


# ---------------------------------------------------------------------------------------------------
# The generator


class Generator(nn.Module):
    """CoModGAN generator for paired translation: ``y = G(x)``, x and y [N, C, H, W] in [-1, 1].

    ``G(x, z=None, truncation_psi=None, noise_mode=None, fused_modconv=None)``:

    * z: [N, z_dim] latent. Omitted: training mode samples z ~ N(0, I) (CoModGAN's stochastic
      generator); eval mode uses the average w, which makes inference deterministic. With ``z_dim=0``
      there is no mapping network and the styles come from the global code alone.
    * truncation_psi: pulls w towards its average; default 1 in training, ``config['truncation_psi']``
      in eval mode when a z is given.
    * noise_mode: 'random' | 'const' | 'none' (only with ``use_noise=True``); default 'random' in
      training, 'const' in eval mode.
    * fused_modconv: default True in eval mode (one grouped conv per layer), False in training.
    * edit: ``[N, edit_dim]`` (or ``[edit_dim]``, for every image) conditioning vector of the edit to make,
      required when ``edit_dim > 0`` (one student for many edits: ``p2pz.student.conditioning``). Its
      edit code joins the global code: in the 4x4 input and in every layer's co-modulation.

    The output is the raw skip-RGB sum in training (losses see it unclamped, as in CoModGAN) and is
    clamped to [-1, 1] in eval mode; with ``input_residual=True`` it is the input plus that sum.
    ``Generator(**G.config)`` rebuilds the same architecture.
    """

    def __init__(self, resolution: int = 256, img_channels: int = 3, preset: str = "lite", **overrides: Any):
        super().__init__()
        cfg = _resolve("generator", GENERATOR_PRESETS, GENERATOR_DEFAULTS, preset, overrides)
        self.config: dict[str, Any] = dict(
            resolution=_check_resolution(resolution), img_channels=int(img_channels), preset=preset, **cfg
        )
        self.resolution = resolution
        self.img_channels = img_channels
        self.z_dim = int(cfg["z_dim"])
        self.w_dim = int(cfg["w_dim"]) if self.z_dim > 0 else 0
        self.truncation_psi = float(cfg["truncation_psi"])
        self.use_noise = bool(cfg["use_noise"])
        self.input_residual = bool(cfg["input_residual"])
        self.edit_dim = int(cfg["edit_dim"])
        edit_code_dim = int(cfg["edit_code_dim"]) if self.edit_dim > 0 else 0
        common = dict(resample_filter=cfg["resample_filter"], conv_clamp=cfg["conv_clamp"])

        self.encoder = Encoder(
            resolution, img_channels, cfg["channel_base"], cfg["channel_max"], cfg["global_dim"],
            cfg["dropout"], **common,
        )  # fmt: skip
        self.mapping = (
            MappingNetwork(
                self.z_dim, self.w_dim, cfg["mapping_layers"], cfg["mapping_lr_multiplier"], cfg["w_avg_beta"]
            )
            if self.z_dim > 0
            else None
        )
        self.edit_mapping = EditMapping(self.edit_dim, edit_code_dim) if self.edit_dim > 0 else None
        code_dim = cfg["global_dim"] + edit_code_dim  # the image's global code [; the edit code]
        self.synthesis = SynthesisNetwork(
            resolution, img_channels, cfg["channel_base"], cfg["channel_max"], code_dim,
            mod_dim=self.w_dim + code_dim, use_noise=self.use_noise, **common,
        )  # fmt: skip

    def style_vector(self, n: int, z: torch.Tensor | None, truncation_psi: float | None, like: torch.Tensor):
        """w [N, w_dim] (or None when z_dim == 0) for this call; see the class docstring."""
        if self.mapping is None:
            return None
        if z is None and not self.training:
            return self.mapping.w_avg.to(like.dtype).unsqueeze(0).expand(n, -1)
        if z is None:
            z = torch.randn([n, self.z_dim], device=like.device, dtype=like.dtype)
        psi = (
            truncation_psi if truncation_psi is not None else (1.0 if self.training else self.truncation_psi)
        )
        return self.mapping(z, truncation_psi=psi)

    def forward(
        self,
        x: torch.Tensor,
        z: torch.Tensor | None = None,
        truncation_psi: float | None = None,
        noise_mode: str | None = None,
        fused_modconv: bool | None = None,
        edit: torch.Tensor | None = None,
    ) -> torch.Tensor:
        if noise_mode is None:
            noise_mode = "random" if self.training else "const"
        if noise_mode not in ("random", "const", "none"):
            raise ValueError(f"noise_mode must be 'random', 'const' or 'none', got {noise_mode!r}")
        if fused_modconv is None:
            fused_modconv = not self.training
        # A float16 / bfloat16 generator takes float32 images: the network runs in its own precision and
        # the input is added back (input_residual) in the input's, so an unchanged pixel stays exact.
        residual, x = x, x.to(self.encoder_dtype())
        global_code, features = self.encoder(x)
        global_code = self.with_edit_code(global_code, edit)
        w = self.style_vector(x.shape[0], z, truncation_psi, like=global_code)
        mod = global_code if w is None else torch.cat([w, global_code], dim=1)  # co-modulation
        img = self.synthesis(global_code, features, mod, noise_mode, fused_modconv)
        if self.input_residual:
            img = img.to(residual.dtype) + residual
        if not self.training:
            img = img.clamp(-1, 1)
        return img

    def with_edit_code(self, global_code: torch.Tensor, edit: torch.Tensor | None) -> torch.Tensor:
        """``[global code ; edit code]`` for a conditional generator, the global code alone otherwise."""
        if self.edit_mapping is None:
            if edit is not None:
                raise ValueError("this generator makes one edit (edit_dim 0): call it without edit=")
            return global_code
        if edit is None:
            raise ValueError(f"this generator makes many edits: give edit= (a [N, {self.edit_dim}] vector)")
        if edit.shape[-1] != self.edit_dim:
            raise ValueError(f"edit vectors have {self.edit_dim} values, got shape {list(edit.shape)}")
        code = self.edit_mapping(edit.reshape(-1, self.edit_dim)).to(global_code.dtype)
        return torch.cat([global_code, code.expand(global_code.shape[0], -1)], dim=1)

    def encoder_dtype(self) -> torch.dtype:
        """The precision of the weights (float32 under autocast too: autocast casts per op)."""
        return next(self.encoder.parameters()).dtype


# ---------------------------------------------------------------------------------------------------
# The discriminator


class MinibatchStdLayer(nn.Module):
    """Append the standard deviation across groups of samples as extra feature maps (StyleGAN)."""

    def __init__(self, group_size: int, num_channels: int = 1) -> None:
        super().__init__()
        self.group_size = group_size
        self.num_channels = num_channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, c, h, w = x.shape
        # The largest group size <= group_size that divides the batch (NVlabs requires divisibility).
        g = max(d for d in range(1, min(self.group_size, n) + 1) if n % d == 0)
        f = self.num_channels
        # In fp32 whatever the autocast: in fp16 the 1e-8 rounds to 0, exactly-zero variances occur
        # and sqrt's gradient there is inf, which makes every discriminator gradient NaN.
        y = x.float().reshape(g, -1, f, c // f, h, w)  # [G, M, F, c, H, W]: sample n is in group n % M
        y = y - y.mean(dim=0)
        y = (y.square().mean(dim=0) + 1e-8).sqrt()  # [M, F, c, H, W]
        y = y.mean(dim=[2, 3, 4])  # [M, F]
        y = y.reshape(-1, f, 1, 1).repeat(g, 1, h, w)  # [N, F, H, W]
        return torch.cat([x, y.to(x.dtype)], dim=1)


class DiscriminatorBlock(nn.Module):
    """Residual block: (conv 3x3 -> blurred stride-2 conv 3x3) + 1x1 downsampled skip, both x sqrt(1/2)."""

    def __init__(self, in_channels: int, out_channels: int, resample_filter, conv_clamp) -> None:
        super().__init__()
        kw = dict(resample_filter=resample_filter, conv_clamp=conv_clamp)
        self.conv0 = Conv2dLayer(in_channels, in_channels, 3, activation="lrelu", **kw)
        self.conv1 = Conv2dLayer(in_channels, out_channels, 3, activation="lrelu", down=2, **kw)
        self.skip = Conv2dLayer(in_channels, out_channels, 1, bias=False, down=2, **kw)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.skip(x, gain=math.sqrt(0.5))
        return y + self.conv1(self.conv0(x), gain=math.sqrt(0.5))


class Discriminator(nn.Module):
    """Conditional StyleGAN2 residual discriminator: ``logits = D(x_input, y)`` on cat(input, output)."""

    def __init__(self, resolution: int = 256, img_channels: int = 3, preset: str = "lite", **overrides: Any):
        super().__init__()
        cfg = _resolve("discriminator", DISCRIMINATOR_PRESETS, DISCRIMINATOR_DEFAULTS, preset, overrides)
        self.config: dict[str, Any] = dict(
            resolution=_check_resolution(resolution), img_channels=int(img_channels), preset=preset, **cfg
        )
        ch = lambda res: channels_at(res, cfg["channel_base"], cfg["channel_max"])
        kw = dict(resample_filter=cfg["resample_filter"], conv_clamp=cfg["conv_clamp"])
        self.from_rgb = Conv2dLayer(
            2 * img_channels, ch(resolution), 1, activation="lrelu", conv_clamp=kw["conv_clamp"]
        )
        self.block_resolutions = [2**i for i in range(int(math.log2(resolution)), 2, -1)]  # R ... 8
        self.blocks = nn.ModuleDict(
            {str(res): DiscriminatorBlock(ch(res), ch(res // 2), **kw) for res in self.block_resolutions}
        )
        c4, f = ch(4), cfg["mbstd_num_channels"]
        self.mbstd = MinibatchStdLayer(cfg["mbstd_group_size"], f) if f > 0 else None
        self.conv4 = Conv2dLayer(c4 + f, c4, 3, activation="lrelu", conv_clamp=kw["conv_clamp"])
        self.fc = FullyConnectedLayer(c4 * 16, c4, activation="lrelu")
        self.out = FullyConnectedLayer(c4, 1)

    def forward(self, x_input: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        x = self.from_rgb(torch.cat([x_input, y], dim=1))
        for res in self.block_resolutions:
            x = self.blocks[str(res)](x)
        if self.mbstd is not None:
            x = self.mbstd(x)
        x = self.conv4(x)
        return self.out(self.fc(x.flatten(1)))


__all__ = [
    "DISCRIMINATOR_PRESETS",
    "Discriminator",
    "EditMapping",
    "GENERATOR_PRESETS",
    "Generator",
    "channels_at",
    "modulated_conv2d",
]
