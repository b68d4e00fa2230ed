"""The data stream: exactly once per epoch, corrupt samples recorded, clear errors, exact resume."""

from __future__ import annotations

import copy
import json
import shutil

import open_clip
import pytest
import torch

import wit.train.models  # noqa: F401  (registers wit-tiny)
from wit.train import data
from wit.train.data import (
    BatchStream,
    Decoder,
    StreamError,
    StreamState,
    make_loader,
    plan_stream,
    raw_samples,
)


def _stream(url, *, workers=2, batch=8, state=None, rank=0, world=1, shuffle=True, seed=0):
    info = plan_stream(
        url,
        seed=seed,
        rank=rank,
        world_size=world,
        workers=workers,
        batch_size=batch,
        shuffle=shuffle,
        buffer=16,
    )
    _, train_tf, _ = open_clip.create_model_and_transforms("wit-tiny")
    return BatchStream(info.plan, Decoder(train_tf, 64, seed), open_clip.get_tokenizer("wit-tiny"), batch, state)


def test_every_sample_once_per_epoch_across_ranks_and_workers(many_shards):
    orders = []
    for epoch in (0, 1):
        seen = []
        for rank in range(2):
            plan = plan_stream(many_shards.url, seed=3, rank=rank, world_size=2, workers=2, batch_size=4).plan
            for worker in range(2):
                seen += [s["__key__"] for s in raw_samples(plan, epoch, worker)]
        assert sorted(seen) == sorted(many_shards.uids)  # each exactly once
        orders.append(seen)
    assert orders[0] != orders[1]  # shards and buffer reshuffled per epoch
    # and the order is a pure function of (seed, epoch, plan, worker)
    plan = plan_stream(many_shards.url, seed=3, rank=1, world_size=2, workers=2, batch_size=4).plan
    again = [s["__key__"] for s in raw_samples(plan, 1, 0)]
    assert again == [s["__key__"] for s in raw_samples(plan, 1, 0)]


def test_corrupt_sample_is_skipped_and_recorded(tiny_dataset):
    stream = _stream(tiny_dataset.url, workers=0, batch=16, shuffle=False)
    skipped, uids = [], []
    for batch in make_loader(stream, 0):
        if batch["epoch"] > 0:
            break
        skipped += batch["skipped"]
        uids += batch["uids"]
    assert [s[0] for s in skipped] == tiny_dataset.corrupt
    assert "does not decode" in skipped[0][2] and skipped[0][1].endswith("000000.tar")
    assert tiny_dataset.corrupt[0] not in uids


def test_unreadable_tar_tail_is_recorded_not_raised(many_shards, tmp_path):
    for i, shard in enumerate(many_shards.shards):
        shutil.copy(shard, tmp_path / f"{i:06d}.tar")
    broken = tmp_path / "000003.tar"
    broken.write_bytes(broken.read_bytes()[:3000])  # cut mid-member
    stream = _stream(f"{tmp_path}/{{000000..000007}}.tar", workers=0, batch=4, shuffle=False)
    skipped = []
    for _, batch in zip(range(15), make_loader(stream, 0), strict=False):
        skipped += batch["skipped"]
    assert any(s[0] == "" and "unreadable tar" in s[2] and s[1].endswith("000003.tar") for s in skipped)


def test_too_few_shards_is_a_clear_error(tiny_dataset):
    with pytest.raises(StreamError, match=r"4 shard\(s\) but 2 rank\(s\) x 4 worker\(s\) need at least 8"):
        plan_stream(tiny_dataset.url, seed=0, rank=0, world_size=2, workers=4, batch_size=8)
    with pytest.raises(StreamError, match="fewer than one batch"):
        plan_stream(tiny_dataset.url, seed=0, rank=0, world_size=1, workers=2, batch_size=100)


def test_resume_position_gives_the_same_samples_and_pixels(tiny_dataset):
    full = list(zip(range(16), make_loader(_stream(tiny_dataset.url, workers=2, batch=16), 2), strict=False))
    state = StreamState.start(2)
    for _, b in full[:5]:  # an odd count: the next batch is worker 1's turn
        state.advance(b)
    resumed = _stream(
        tiny_dataset.url, workers=2, batch=16, state=StreamState.from_dict(copy.deepcopy(state.to_dict()))
    )
    rest = list(zip(range(11), make_loader(resumed, 2), strict=False))
    for (_, a), (_, b) in zip(full[5:], rest, strict=False):
        assert a["uids"] == b["uids"] and a["worker"] == b["worker"]
        assert torch.equal(a["images"], b["images"])  # augmentation seeded per sample, not by position
    # the stream crossed into epoch 1 (192 samples, 16 per batch): positions follow
    assert {b["epoch"] for _, b in full} == {0, 1}


def test_sources_brace_list_sizes_and_weighted_mix(tiny_dataset, many_shards):
    folder = data.resolve_source(tiny_dataset.url)
    assert folder.is_wit_dataset and folder.digest and folder.samples == 192 and len(folder.shards) == 4
    brace = data.resolve_source(f"{tiny_dataset.url}/shards/{{000000..000003}}.tar")
    assert [s.url for s in brace.shards] == [s.url for s in folder.shards] and brace.samples == 192
    listed = data.resolve_sources(tiny_dataset.shards[:2])
    assert len(listed) == 1 and len(listed[0].shards) == 2
    assert json.loads((tmp := (tiny_dataset.url + "/shards/sizes.json")) and open(tmp).read())["000000.tar"] == 48
    mix = plan_stream(
        f"{tiny_dataset.url}::{many_shards.url}",
        seed=0,
        rank=0,
        world_size=1,
        workers=1,
        batch_size=8,
        weights=[1.0, 3.0],
    )
    assert mix.plan.resampled and mix.digest and mix.digest not in (folder.digest,)
    keys = [s["__key__"] for _, s in zip(range(300), raw_samples(mix.plan, 0, 0), strict=False)]
    a = sum(k in set(tiny_dataset.uids) for k in keys)
    b = sum(k in set(many_shards.uids) for k in keys)
    assert a + b == 300 and 0.6 < b / 300 < 0.9  # weight 3 of 4 on the second source's samples
    assert keys == [s["__key__"] for _, s in zip(range(300), raw_samples(mix.plan, 0, 0), strict=False)]
