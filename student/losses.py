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
ImageNet weights (torchvision's alexnet/vgg16/squeezenet file) come from a path the user gives,
loaded by the project's one LPIPS loader (``p2pz.data.eval.paper_metrics.load_lpips``, shared with
the background-LPIPS metric). The package would otherwise download them from the internet; a random
backbone is only built when asked for explicitly (tests), because it is not a perceptual metric.
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F
from torch import nn

from p2pz.data.eval.paper_metrics import load_lpips, lpips_backbone_file
from p2pz.utils.errors import UserError

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
    the discriminator's weights (a second-order gradient). As in StyleGAN2-ADA, the gradient is taken
    unscaled and squared and summed in fp32: under autocast it already is fp32 (the gradient of the
    fp32 images), and half-precision images ('16-true', 'bf16-true') are upcast first, since the
    squares of gradients above 256 overflow fp16 and a 512 px sum loses bf16's 8 bits.
    """
    (grad,) = torch.autograd.grad(outputs=real_logits.sum(), inputs=real_images, create_graph=True)
    return grad.float().square().sum(dim=[1, 2, 3]).mean()


# --------------------------------------------------------------------------------------------------
# LPIPS


class PerceptualLoss(nn.Module):
    """LPIPS distance per batch (mean), inputs in [-1, 1]; frozen and always in eval mode.

    ``backbone_weights``: path to torchvision's ImageNet weights for ``net`` (e.g.
    ``alexnet-owt-7be5be79.pth``). ``random_backbone=True`` builds it with random weights instead
    (a smoke-test stand-in, not a perceptual metric).
    """

    def __init__(
        self,
        net: str = "alex",
        backbone_weights: str | os.PathLike | None = None,
        random_backbone: bool = False,
    ) -> None:
        super().__init__()
        if backbone_weights is None and not random_backbone:
            raise UserError(
                f"LPIPS needs ImageNet weights for its {net} backbone and nothing is downloaded: pass "
                f"--model.lpips_backbone PATH (torchvision's {lpips_backbone_file(net)}), or set "
                "--model.lpips_weight 0 to train without LPIPS"
            )
        self.lpips = load_lpips(net, backbone_weights, flag="--model.lpips_backbone PATH")
        self.random_backbone = backbone_weights is None
        self.requires_grad_(False)
        self.eval()

    def train(self, mode: bool = True) -> PerceptualLoss:
        return super().train(False)  # dropout in the linear heads stays off

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return self.lpips(a, b).mean()
