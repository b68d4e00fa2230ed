"""The weight-decay rule is open_clip_train's, as the optimiser's parameter groups apply it."""

from __future__ import annotations

import open_clip
import pytest
import torch

import wit.train.models  # noqa: F401  (registers wit-tiny with open_clip)
from wit.train import optim


# open_clip_train/main.py, written out here independently of wit's no_decay
def open_clip_exclude(n, p):
    return p.ndim < 2 or "bn" in n or "ln" in n or "bias" in n or "logit_scale" in n


def _decayed_by_groups(model: torch.nn.Module, wd: float = 0.2) -> tuple[set[str], set[str]]:
    """(decayed, not decayed) parameter names, read from make_optimizer's param groups."""
    opt = optim.make_optimizer(model, lr=1e-3, weight_decay=wd, betas=(0.9, 0.98), eps=1e-6)
    name_of = {id(p): n for n, p in model.named_parameters()}
    decayed, not_decayed = set(), set()
    for group in opt.param_groups:
        names = {name_of[id(p)] for p in group["params"]}
        (decayed if group["weight_decay"] == wd else not_decayed).update(names)
        assert group["weight_decay"] in (0.0, wd)
    return decayed, not_decayed


@pytest.fixture(scope="module", params=["wit-tiny", "RN50"])
def model(request):
    return open_clip.create_model(request.param)


def test_param_groups_follow_open_clip_rule(model):
    decayed, not_decayed = _decayed_by_groups(model)
    named = dict(model.named_parameters())
    assert decayed | not_decayed == set(named) and not decayed & not_decayed
    assert decayed == {n for n, p in named.items() if not open_clip_exclude(n, p)}
    assert not_decayed == {n for n, p in named.items() if open_clip_exclude(n, p)}

    # embeddings are matrices and decay, as in open_clip_train (wit used to exclude them)
    assert {"positional_embedding", "token_embedding.weight", "text_projection"} <= decayed
    if "visual.attnpool.positional_embedding" in named:  # the ResNet's attention pool
        assert "visual.attnpool.positional_embedding" in decayed
    # gains, biases, norms, the temperature and the class token do not
    assert "logit_scale" in not_decayed
    assert {n for n in named if n.endswith(".bias")} <= not_decayed
    assert {n for n in named if "ln_" in n} <= not_decayed
    assert {n for n in named if ".bn" in n} <= not_decayed
    if "visual.class_embedding" in named:  # the ViT
        assert "visual.class_embedding" in not_decayed
        assert {"visual.positional_embedding", "visual.conv1.weight", "visual.proj"} <= decayed
    assert any(n.endswith(".bias") for n in named) and any("ln_" in n for n in named)


def test_decay_summary_partitions_the_parameters(model):
    summary = optim.decay_summary(model)
    assert "open_clip_train" in summary["rule"] and "\n" not in summary["rule"]
    names = [n for n, _ in model.named_parameters()]
    assert sorted(summary["decayed"] + summary["not_decayed"]) == sorted(names)
    assert not set(summary["decayed"]) & set(summary["not_decayed"])
    assert (set(summary["decayed"]), set(summary["not_decayed"])) == _decayed_by_groups(model)


def test_frozen_parameters_are_in_neither_list():
    m = open_clip.create_model("wit-tiny")
    m.logit_scale.requires_grad_(False)
    m.token_embedding.weight.requires_grad_(False)
    summary = optim.decay_summary(m)
    listed = set(summary["decayed"]) | set(summary["not_decayed"])
    assert "logit_scale" not in listed and "token_embedding.weight" not in listed
    assert len(listed) == sum(1 for p in m.parameters() if p.requires_grad)
