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


def _count_reads(monkeypatch) -> list[int]:
    """Bytes read through the storage layer (every shard read opens a file with storage.open_url)."""
    from contextlib import contextmanager

    from wit.manifests import storage

    total = [0]
    real = storage.open_url

    class Counted:
        def __init__(self, fh):
            self.fh = fh

        def read(self, n=-1):
            data = self.fh.read(n)
            total[0] += len(data)
            return data

        def __getattr__(self, name):
            return getattr(self.fh, name)

    @contextmanager
    def counted(url, mode="rb", **kw):
        with real(url, mode, **kw) as fh:
            yield Counted(fh)

    monkeypatch.setattr(storage, "open_url", counted)
    return total


def test_resume_at_90_percent_of_an_epoch_reads_one_chunk_not_the_epoch(tmp_path, monkeypatch):
    # 10 shards of 40 samples, one worker, chunks of 16: resume seeks to the chunk's start
    from wit_train_testdata import build_dataset

    ds = build_dataset(tmp_path / "ds", n_shards=10, per_shard=40, corrupt=0, seed=4)
    shard_bytes = max(p.stat().st_size for p in (tmp_path / "ds" / "shards").glob("*.tar"))
    reads = _count_reads(monkeypatch)
    full = list(zip(range(30), make_loader(_stream(ds.url, workers=0, batch=12), 0), strict=False))
    state = StreamState.start(1)
    for _, b in full[:29]:  # 29 x 12 = 348 of 400 samples: 87% of the epoch
        state.advance(b)
    assert full[28][1]["epoch"] == 0
    before = reads[0]
    assert before > 8 * shard_bytes  # reaching there read most of the epoch
    reads[0] = 0
    resumed = _stream(ds.url, workers=0, batch=12, state=StreamState.from_dict(copy.deepcopy(state.to_dict())))
    batch = next(iter(make_loader(resumed, 0)))
    assert batch["uids"] == full[29][1]["uids"] and torch.equal(batch["images"], full[29][1]["images"])
    assert reads[0] <= 1.1 * shard_bytes, (reads[0], shard_bytes)  # one chunk of 16 (+ the next batch)


def test_resampled_draws_of_one_uid_get_different_crops(many_shards):
    info = plan_stream(many_shards.url, seed=0, rank=0, world_size=1, workers=1, batch_size=8, buffer=4, resampled=True)
    _, train_tf, _ = open_clip.create_model_and_transforms("wit-tiny")
    stream = BatchStream(info.plan, Decoder(train_tf, 64, 0), open_clip.get_tokenizer("wit-tiny"), 8)
    seen: dict[str, list[torch.Tensor]] = {}
    batches = list(zip(range(30), make_loader(stream, 0), strict=False))
    for _, b in batches:
        for uid, img in zip(b["uids"], b["images"], strict=True):
            seen.setdefault(uid, []).append(img)
    twice = [imgs for imgs in seen.values() if len(imgs) >= 2]
    assert len(twice) > 10  # 240 draws of 80 samples
    assert all(not torch.equal(imgs[0], imgs[1]) for imgs in twice)  # a crop per draw
    # and it is still a pure function of the position: a resumed stream seeks to its draw
    state = StreamState.start(1)
    for _, b in batches[:17]:
        state.advance(b)
    resumed = BatchStream(info.plan, Decoder(train_tf, 64, 0), open_clip.get_tokenizer("wit-tiny"), 8, state)
    again = next(iter(make_loader(resumed, 0)))
    assert again["uids"] == batches[17][1]["uids"] and torch.equal(again["images"], batches[17][1]["images"])


class _Flaky:
    """A file whose reads past byte ``at`` raise an OSError, the first ``fails`` times it is opened."""

    opens = 0

    def __init__(self, fh, at: int, fails: int):
        type(self).opens += 1
        self.fh, self.at, self.broken = fh, at, type(self).opens <= fails

    def read(self, n=-1):
        start = self.fh.tell()
        data = self.fh.read(n)
        if self.broken and start + len(data) > self.at:
            raise OSError("connection reset by peer")
        return data

    def __getattr__(self, name):
        return getattr(self.fh, name)


@pytest.mark.parametrize("fails", [2, 10])
def test_a_shard_read_that_fails_is_retried_then_recorded(many_shards, monkeypatch, fails):
    from contextlib import contextmanager

    from wit.manifests import storage

    monkeypatch.setenv("WIT_READ_BACKOFF_S", "0")
    real = storage.open_url
    _Flaky.opens = 0

    @contextmanager
    def flaky(url, mode="rb", **kw):
        with real(url, mode, **kw) as fh:
            yield _Flaky(fh, 25000, fails) if url.endswith("000002.tar") else fh

    clean = [(s["__key__"], s["jpg"]) for s in data._shard_samples(many_shards.shards[2], 0, [])]
    monkeypatch.setattr(storage, "open_url", flaky)
    skipped: list = []
    got = [(s["__key__"], s["jpg"]) for s in data._shard_samples(many_shards.shards[2], 0, skipped)]
    if fails < 4:  # WIT_READ_TRIES defaults to 4: retried from the last whole sample, nothing lost
        assert got == clean and not skipped and _Flaky.opens == fails + 1
    else:  # the rest of the shard is recorded, the samples before the error kept
        assert 0 < len(got) < len(clean) and got == clean[: len(got)]
        assert len(skipped) == 1 and skipped[0].shard.endswith("000002.tar") and skipped[0].uid == ""
        assert "after 4 tries" in skipped[0].reason and "connection reset" in skipped[0].reason


def test_a_sample_with_a_repeated_member_is_recorded_and_left_out(tmp_path):
    import io as _io
    import tarfile

    buf = _io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for name in ("a.jpg", "a.txt", "b.jpg", "b.jpg", "b.txt", "c.txt"):
            info = tarfile.TarInfo(name)
            info.size = 3
            tar.addfile(info, _io.BytesIO(b"xyz"))
    (tmp_path / "s.tar").write_bytes(buf.getvalue())
    skipped: list = []
    samples = list(data._shard_samples(str(tmp_path / "s.tar"), 0, skipped))
    assert [s["__key__"] for s in samples if not s.get("_bad")] == ["a", "c"]
    assert [(s.uid, s.reason) for s in skipped] == [("b", "duplicate member 'jpg' in the sample")]
