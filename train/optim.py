"""AdamW with open_clip_train's weight-decay rule, and the learning-rate schedule."""

from __future__ import annotations

import math

import torch

DECAY_RULE = (
    "open_clip_train's rule: no weight decay on parameters with ndim < 2 or whose name contains "
    "'bn', 'ln', 'bias' or 'logit_scale'; every other parameter decays (token and positional embeddings too)"
)


def no_decay(name: str, param: torch.nn.Parameter) -> bool:
    """open_clip_train's ``exclude`` rule (``open_clip_train/main.py``), exactly: gains, biases, norms
    and the temperature get no decay; matrices decay, the token and positional embeddings included."""
    return param.ndim < 2 or "bn" in name or "ln" in name or "bias" in name or "logit_scale" in name


def decay_summary(model: torch.nn.Module) -> dict:
    """The rule and the trainable parameters it decays and does not, by name (for the run record)."""
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    return {
        "rule": DECAY_RULE,
        "decayed": [n for n, p in named if not no_decay(n, p)],
        "not_decayed": [n for n, p in named if no_decay(n, p)],
    }


def make_optimizer(
    model: torch.nn.Module,
    lr: float,
    weight_decay: float,
    betas: tuple[float, float],
    eps: float,
    fused: bool = False,
) -> torch.optim.AdamW:
    """AdamW over the trainable parameters, in open_clip_train's two groups. ``fused``: torch's fused
    kernel (on CUDA one launch for all parameters instead of a few per tensor; on CPU one pass per
    tensor instead of a dozen elementwise ops); the trainer asks for it on CUDA and on CPU."""
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    groups = [
        {"params": [p for n, p in named if no_decay(n, p)], "weight_decay": 0.0},
        {"params": [p for n, p in named if not no_decay(n, p)], "weight_decay": weight_decay},
    ]
    return torch.optim.AdamW(groups, lr=lr, betas=betas, eps=eps, fused=True if fused else None)


def set_fused(optimizer: torch.optim.Optimizer, fused: bool) -> None:
    """After ``load_state_dict``: the groups take the saved run's ``fused`` and ``foreach`` flags;
    give them back this run's (a checkpoint of a GPU run resumed on CPU, or the other way)."""
    for group in optimizer.param_groups:
        group["fused"] = True if fused else None
        group["foreach"] = None


def lr_at(step: int, base_lr: float, warmup: int, total: int) -> float:
    """Linear warm-up over ``warmup`` steps, then cosine decay to 0 at ``total``."""
    if step < warmup:
        return base_lr * (step + 1) / warmup
    span = max(1, total - warmup)
    progress = min(1.0, (step - warmup) / span)
    return 0.5 * (1 + math.cos(math.pi * progress)) * base_lr


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr
