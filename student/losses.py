"""The student's losses: conditional GAN (CoModGAN's), lazy R1, and the reconstruction terms.

- Adversarial: the non-saturating logistic loss of StyleGAN2/CoModGAN on a *conditional*
  discriminator that sees the (input, output) pair, so it judges whether the output is a plausible
  edit *of this input*.
- R1: ``gamma/2 * E ||grad_y D(x, y)||^2`` on real pairs, taken with respect to the real edit ``y``
  (the input ``x`` is the condition). It is a second-order term: the gradient is built with
  ``create_graph=True`` so that the discriminator's parameters get gradients through it.
- Reconstruction against the teacher's edit: L1 and LPIPS. The student distils a deterministic
  teacher, so unlike in unpaired translation it has an exact target for every input.

LPIPS runs offline: the ``lpips`` wheel ships the calibrated linear heads, and the backbone's
ImageNet weights (torchvision's alexnet/vgg16/squeezenet file) come from a path the user gives. The
package would otherwise download them from the internet; a random backbone is only built when asked
for explicitly (tests), because it is not a perceptual metric.
"""

from __future__ import annotations

import os
import warnings

import torch
import torch.nn.functional as F
from torch import nn

from p2pz.utils.errors import UserError

# torchvision file names of the backbones, as cached by torch.hub (for error messages)
BACKBONE_FILES = {
    "alex": "alexnet-owt-7be5be79.pth",
    "vgg": "vgg16-397923af.pth",
    "squeeze": "squeezenet1_1-b8a52dc0.pth",
}


# --------------------------------------------------------------------------------------------------
# Adversarial losses (logits are the raw discriminator outputs, [N, 1])


def generator_gan_loss(fake_logits: torch.Tensor) -> torch.Tensor:
    """Non-saturating logistic loss: ``softplus(-D(x, G(x)))``."""
    return F.softplus(-fake_logits).mean()


def discriminator_gan_loss(real_logits: torch.Tensor, fake_logits: torch.Tensor) -> torch.Tensor:
    """Logistic loss: ``softplus(D(x, G(x))) + softplus(-D(x, y))``."""
    return F.softplus(fake_logits).mean() + F.softplus(-real_logits).mean()


def r1_penalty(real_logits: torch.Tensor, real_images: torch.Tensor) -> torch.Tensor:
    """Mean over the batch of ``||d D / d y||^2``; ``real_images`` must have ``requires_grad``.

    The graph of the gradient is kept (``create_graph``), so backpropagating the penalty reaches
    the discriminator's weights (a second-order gradient).
    """
    (grad,) = torch.autograd.grad(outputs=real_logits.sum(), inputs=real_images, create_graph=True)
    return grad.square().sum(dim=[1, 2, 3]).mean()


# --------------------------------------------------------------------------------------------------
# LPIPS


def _load_backbone(net: nn.Module, weights_path: str, net_name: str) -> None:
    """Copy torchvision ``features.*`` weights into lpips' sliced backbone (``sliceK.<index>``)."""
    try:
        state = torch.load(weights_path, map_location="cpu", weights_only=True)
    except Exception as exc:  # unreadable, not a torch file, ...
        raise UserError(f"cannot read the LPIPS backbone weights {weights_path}: {exc}") from exc
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    features = {k[len("features.") :]: v for k, v in state.items() if k.startswith("features.")}
    if not features:
        raise UserError(
            f"{weights_path} is not a torchvision {net_name} state dict (no 'features.*' keys); "
            f"give torchvision's {BACKBONE_FILES[net_name]}"
        )
    for block in net.children():  # slice1, slice2, ...
        for index, layer in block.named_children():
            wanted = {k.split(".", 1)[1]: v for k, v in features.items() if k.split(".", 1)[0] == index}
            own = layer.state_dict()
            if not own:
                continue  # ReLU / pooling
            if set(wanted) != set(own) or any(wanted[k].shape != own[k].shape for k in own):
                raise UserError(
                    f"{weights_path} does not match LPIPS' {net_name} backbone at layer features.{index}; "
                    f"give torchvision's {BACKBONE_FILES[net_name]}"
                )
            layer.load_state_dict(wanted)


class PerceptualLoss(nn.Module):
    """LPIPS distance per batch (mean), inputs in [-1, 1]; frozen and always in eval mode.

    ``backbone_weights``: path to torchvision's ImageNet weights for ``net`` (e.g.
    ``alexnet-owt-7be5be79.pth``). ``random_backbone=True`` builds it with random weights instead
    (a smoke-test stand-in, not a perceptual metric).
    """

    def __init__(self, net: str = "alex", backbone_weights: str | None = None, random_backbone: bool = False):
        super().__init__()
        import lpips

        if net not in BACKBONE_FILES:
            raise UserError(f"unknown LPIPS network {net!r}; choose one of {sorted(BACKBONE_FILES)}")
        if backbone_weights is None and not random_backbone:
            raise UserError(
                f"LPIPS needs ImageNet weights for its {net} backbone and nothing is downloaded: pass "
                f"--model.lpips_backbone PATH (torchvision's {BACKBONE_FILES[net]}), or set "
                "--model.lpips_weight 0 to train without LPIPS"
            )
        if backbone_weights is not None and not os.path.isfile(backbone_weights):
            raise UserError(f"LPIPS backbone weights not found: {backbone_weights}")
        with warnings.catch_warnings():  # torchvision's "pretrained is deprecated"
            warnings.simplefilter("ignore")
            # pnet_rand=True: build the backbone without downloading; the linear heads (pretrained=True)
            # come from the wheel's lpips/weights/v0.1/<net>.pth
            self.lpips = lpips.LPIPS(net=net, pretrained=True, pnet_rand=True, verbose=False)
        if backbone_weights is not None:
            _load_backbone(self.lpips.net, backbone_weights, net)
        self.random_backbone = backbone_weights is None
        self.requires_grad_(False)
        self.eval()

    def train(self, mode: bool = True) -> PerceptualLoss:
        return super().train(False)  # dropout in the linear heads stays off

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return self.lpips(a, b).mean()
