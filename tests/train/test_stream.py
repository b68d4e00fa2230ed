"""The data stream: exactly once per epoch, corrupt samples recorded, clear errors, exact resume."""

from __future__ import annotations

import copy
import dataclasses
import json
import shutil

import open_clip
import pytest
import torch

import wit.train.models  # noqa: F401  (registers wit-tiny)
from wit.train import data
from wit.train import data as data_module
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
            raise self.error
        return data

    error: Exception = OSError("connection reset by peer")

    def __getattr__(self, name):
        return getattr(self.fh, name)


@pytest.mark.parametrize("error", ["oserror", "botocore"])
@pytest.mark.parametrize("fails", [2, 10])
def test_a_shard_read_that_fails_is_retried_then_recorded(many_shards, monkeypatch, fails, error):
    from contextlib import contextmanager

    from botocore.exceptions import ConnectionClosedError

    from wit.manifests import storage

    monkeypatch.setenv("WIT_READ_BACKOFF_S", "0")
    monkeypatch.setenv("WIT_READ_TRIES", "4")
    real = storage.open_url
    _Flaky.opens = 0
    # what s3fs re-raises when its own retries are spent is not always an OSError
    _Flaky.error = (
        OSError("connection reset by peer") if error == "oserror" else ConnectionClosedError(endpoint_url="x")
    )

    @contextmanager
    def flaky(url, mode="rb", **kw):
        with real(url, mode, **kw) as fh:
            yield _Flaky(fh, 25000, fails) if url.endswith("000002.tar") else fh

    clean = [(s["__key__"], s["jpg"]) for s in data._shard_samples(many_shards.shards[2], 0, [])]
    monkeypatch.setattr(storage, "open_url", flaky)
    skipped: list = []
    got = [(s["__key__"], s["jpg"]) for s in data._shard_samples(many_shards.shards[2], 0, skipped)]
    if fails < 4:  # WIT_READ_TRIES=4: retried from the last whole sample, nothing lost
        assert got == clean and not skipped and _Flaky.opens == fails + 1
    else:  # the rest of the shard is recorded, the samples before the error kept
        assert 0 < len(got) < len(clean) and got == clean[: len(got)]
        assert len(skipped) == 1 and skipped[0].shard.endswith("000002.tar") and skipped[0].uid == ""
        assert "after 4 tries" in skipped[0].reason
        assert ("connection reset" if error == "oserror" else "ConnectionClosedError") in skipped[0].reason


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


def test_a_bad_header_mid_shard_is_recorded_not_a_silent_end(many_shards, tmp_path):
    # tarfile's stream mode ends quietly at a header past the first that does not parse
    from wit.manifests.tars import stream_members

    data = bytearray(open(many_shards.shards[0], "rb").read())
    items = list(stream_members(open(many_shards.shards[0], "rb")))
    sample4 = next(i for i in items if i.name.startswith(many_shards.uids[4]))
    for name, blob in {
        "garbage": bytes(data[: sample4.offset]) + b"not a tar header" * 32 + bytes(data[sample4.offset + 512 :]),
        "cut": bytes(data[: sample4.offset + 100]),
    }.items():
        (tmp_path / f"{name}.tar").write_bytes(blob)
        skipped: list = []
        keys = [s["__key__"] for s in data_module._shard_samples(str(tmp_path / f"{name}.tar"), 0, skipped)]
        assert keys == many_shards.uids[:3], name  # the 4th sample's end is not known to be whole
        assert len(skipped) == 1 and "unreadable tar" in skipped[0].reason, name
        assert f"byte {sample4.offset}" in skipped[0].reason


def test_carry_over_after_two_resumes_on_other_layouts_sees_each_shard_once_per_epoch():
    from wit.train.data import Position, Shard, Source, StreamPlan, carry_over

    source = Source("x", tuple(Shard(f"s{i:02d}", 10) for i in range(24)))
    a = StreamPlan((source,), seed=1, world_size=1, workers=2)
    sched = {(e, w): a.schedule(e, w) for e in (0, 1) for w in (0, 1)}
    # layout A: worker 0 finished epoch 0 and read 2 items of epoch 1; worker 1 read 5 of epoch 0
    # and is inside a chunk that began at item 5 and whose reading stopped 700 bytes into item 7
    positions = [Position(1, 2), Position(0, 5, None, 3, (7, 700))]
    consumed = {0: set(sched[0, 0]) | set(sched[0, 1][:7]), 1: set(sched[1, 0][:2])}
    carry1 = carry_over(a, positions)
    assert carry1[0] == ((sched[0, 1][7][0], 700), *sched[0, 1][8:])
    assert carry1[1] == (*sched[1, 0][2:], *sched[1, 1])
    # layout B (2 ranks x 1 worker) reads one carried item each in epoch 0, then is resumed again
    b = StreamPlan((source,), seed=1, world_size=2, workers=1, carry=carry1, generation=1)
    read_b = [dataclasses.replace(b, rank=r).schedule(0, 0)[:1] for r in range(2)]
    consumed[0] |= {item for items in read_b for item in items}
    carry2 = carry_over(b, [Position(0, 1), Position(0, 1)])
    # epoch 1 was carried by A's resume and not reached in B: it is still the carried items, not
    # every shard again (which would read sched[1, 0][:2] twice)
    assert sorted(carry2[1]) == sorted(carry1[1])
    for epoch in (0, 1):
        left = [i for i, _ in carry2[epoch]]
        done = [i for i, _ in consumed[epoch]]
        assert len(set(left)) == len(left) and not set(left) & set(done), epoch
        # everything is read once, but the chunk remainder of A's worker 1 (item 7 up to byte 700)
        assert set(left) | set(done) == set(range(24)), epoch
