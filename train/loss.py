"""The contrastive losses, from open_clip: CLIP's (InfoNCE both ways) and SigLIP's (pairwise sigmoid).

Under DDP, ``ClipLoss`` runs with ``local_loss=True, gather_with_grad=True``: each rank scores its
own images and texts against everything gathered from all ranks, and gradients flow back through
the gather, so the sum of the ranks' gradients (DDP averages them) equals one process's gradient on
the whole global batch; that is what the distributed-equivalence test checks.
"""

from __future__ import annotations

import math

import torch
from open_clip.loss import ClipLoss, SigLipLoss

# CLIP paper: temperature initialised to 0.07 and clipped so logits are never scaled beyond 100.
INIT_LOGIT_SCALE = math.log(1 / 0.07)
MAX_LOGIT_SCALE = math.log(100)
# SigLIP paper's initialisation: t' = log 10, b = -10
SIGLIP_INIT_LOGIT_SCALE = math.log(10)
SIGLIP_INIT_LOGIT_BIAS = -10.0


def make_loss(kind: str, rank: int = 0, world_size: int = 1) -> torch.nn.Module:
    if kind == "clip":
        return ClipLoss(
            local_loss=world_size > 1,
            gather_with_grad=world_size > 1,
            cache_labels=True,
            rank=rank,
            world_size=world_size,
        )
    if kind == "siglip":
        return SigLipLoss(rank=rank, world_size=world_size)
    raise ValueError(f"unknown loss {kind!r}; expected clip or siglip")


def model_kwargs(kind: str) -> dict:
    """Extra open_clip ``create_model`` arguments a loss needs (SigLIP learns a logit bias)."""
    if kind == "siglip":
        return {"init_logit_scale": SIGLIP_INIT_LOGIT_SCALE, "init_logit_bias": SIGLIP_INIT_LOGIT_BIAS}
    return {"init_logit_scale": INIT_LOGIT_SCALE}


def contrastive_loss(loss_fn: torch.nn.Module, out: dict) -> torch.Tensor:
    """The loss of one forward pass's output dict (``image_features``, ``text_features``, ``logit_scale``)."""
    args = [out["image_features"], out["text_features"], out["logit_scale"]]
    if out.get("logit_bias") is not None:
        args.append(out["logit_bias"])
    return loss_fn(*args)


@torch.no_grad()
def clamp_logit_scale(model: torch.nn.Module) -> None:
    """Keep exp(logit_scale) <= 100 (CLIP paper): beyond that training becomes unstable."""
    model.logit_scale.clamp_(0, MAX_LOGIT_SCALE)
