"""The tiny timm models and images the durability-card tests attack (16×16, 3 classes)."""

from __future__ import annotations

import torch

from lightning_immunize.attacks.tasks import ceiling_weights, random_weights
from lightning_immunize.models import TimmBackbone


def tiny_backbone(seed: int = 0) -> TimmBackbone:
    """timm's ``test_resnet`` on one channel, 3 classes, only ``layer4`` trainable."""
    return TimmBackbone("test_resnet", in_chans=1, num_classes=3, seed=seed, trainable=["layer4"])


def tiny_images(
    n: int, seed: int, scale: float = 1.0, shift: float = 0.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` images (n, 1, 16, 16) whose mean is their label (0, 1, 2) plus ``shift``, with
    noise of standard deviation ``scale``; the labels (n,)."""
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, 3, (n,), generator=g)
    x = torch.randn(n, 1, 16, 16, generator=g) * scale + y.view(-1, 1, 1, 1).float() + shift
    return x, y


def tiny_models(ceiling: bool = False) -> dict[str, torch.nn.Module]:
    """θ_0, an "immunized" copy with its trainable weights halved, scratch (and the ceiling)."""
    reference = tiny_backbone(0)
    immunized = tiny_backbone(0)
    with torch.no_grad():
        for p in immunized.parameters():
            if p.requires_grad:
                p.mul_(0.5)
    models = {"immunized": immunized, "reference": reference, "scratch": random_weights(reference)}
    if ceiling:
        models["ceiling"] = ceiling_weights(reference, models["scratch"], immunized)
    return models
