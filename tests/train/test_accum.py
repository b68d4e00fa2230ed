"""Gradient accumulation is exact: 4 micro-batches of 4 give the gradients of one batch of 16,
the temperature's (and SigLIP's logit bias's) included; the loss is computed in fp32."""

from __future__ import annotations

import contextlib

import open_clip
import pytest
import torch

import wit.train.models  # noqa: F401  (registers wit-tiny with open_clip)
from wit.train import loss as losses
from wit.train.distributed import DistEnv
from wit.train.loop import _backward, _fp32_loss

BATCH, MICRO = 16, 4


def _model_and_batch(kind: str):
    torch.manual_seed(0)
    model = open_clip.create_model("wit-tiny", output_dict=True, **losses.model_kwargs(kind))
    model.train()  # wit-tiny has no dropout (no Dropout module, patch dropout off): train mode is deterministic
    images = torch.randn(BATCH, 3, 64, 64)
    texts = open_clip.get_tokenizer("wit-tiny")([f"a photo of thing number {i}" for i in range(BATCH)])
    return model, images, texts


def _grads(model, loss_fn, images: list, texts: list, autocast=contextlib.nullcontext) -> tuple[torch.Tensor, dict]:
    model.zero_grad(set_to_none=True)
    scaler = torch.amp.GradScaler("cuda", enabled=False)  # what the loop uses off CUDA / without amp
    loss = _backward(model, loss_fn, images, texts, autocast, DistEnv(), scaler)
    return loss, {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def _assert_close(accum: dict, whole: dict, name: str, **tol) -> None:
    torch.testing.assert_close(accum[name], whole[name], **tol, msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("kind", ["clip", "siglip"])
def test_accumulated_gradients_equal_whole_batch_gradients(kind):
    model, images, texts = _model_and_batch(kind)
    loss_fn = losses.make_loss(kind)
    loss_whole, whole = _grads(model, loss_fn, [images], [texts])
    loss_accum, accum = _grads(model, loss_fn, list(images.split(MICRO)), list(texts.split(MICRO)))

    torch.testing.assert_close(loss_accum, loss_whole, rtol=1e-5, atol=1e-6)
    # the temperature (and SigLIP's bias) are in every micro-batch's loss: counted once, not 4 times
    scalars = ["logit_scale"] + (["logit_bias"] if kind == "siglip" else [])
    assert (model.logit_bias is not None) == (kind == "siglip")
    for name in scalars:
        assert whole[name].abs() > 1e-6, name  # a gradient that is there to compare
        _assert_close(accum, whole, name, rtol=1e-4, atol=0)
    # and every other parameter, e.g. the first and the last layer of both towers
    assert set(accum) == set(whole) == {n for n, _ in model.named_parameters()}
    for name in ("visual.conv1.weight", "visual.proj", "token_embedding.weight", "text_projection"):
        _assert_close(accum, whole, name, rtol=1e-4, atol=1e-7)
    for name in whole:
        _assert_close(accum, whole, name, rtol=1e-3, atol=1e-6)


def test_loss_runs_in_fp32_outside_autocast():
    model, images, texts = _model_and_batch("siglip")
    inner = losses.make_loss("siglip")
    seen = []

    def loss_fn(*args):
        seen.append(([a.dtype for a in args], torch.is_autocast_enabled("cpu")))
        return inner(*args)

    def bf16():
        return torch.autocast(device_type="cpu", dtype=torch.bfloat16)

    loss, grads = _grads(model, loss_fn, list(images.split(8)), list(texts.split(8)), autocast=bf16)
    assert loss.dtype == torch.float32 and torch.isfinite(loss)
    assert seen == [([torch.float32] * 4, False)] * 2  # features, scale, bias: fp32; autocast off
    assert grads["logit_scale"].dtype == torch.float32

    # even when the caller is inside autocast
    with bf16():
        with torch.no_grad():
            out = model(images[:4], texts[:4])
        assert out["image_features"].dtype == torch.bfloat16
        assert _fp32_loss(loss_fn, out).dtype == torch.float32
    assert len(seen) == 3 and seen[-1] == ([torch.float32] * 4, False)
