"""Training at scale without silent waits: checkpoints upload on a background thread, the run record
takes their digests from sidecars, metrics are written every log interval, TensorBoard reaches remote
outputs, and collectives time out."""

from __future__ import annotations

import datetime
import hashlib
import json
import threading

import pyarrow.parquet as pq
import pytest

from wit.manifests import storage
from wit.manifests.runrecord import read_run_record
from wit.manifests.verify import verify
from wit.train import distributed
from wit.train.checkpoint import CheckpointWriter, checkpoint_digest, sidecar_url
from wit.train.config import TrainConfig
from wit.train.loop import _list_checkpoints, _prune, train

# ---- CheckpointWriter ------------------------------------------------------------------------------


def _gated_writes(monkeypatch):
    """storage.write_bytes that records every URL and holds .pt writes until the gate opens."""
    real, gate, calls = storage.write_bytes, threading.Event(), []

    def write_bytes(url, data):
        calls.append(url)
        if url.endswith(".pt"):
            assert gate.wait(30), "the gate never opened"
        real(url, data)

    monkeypatch.setattr(storage, "write_bytes", write_bytes)
    return gate, calls


def test_checkpoint_writer_uploads_in_the_background(tmp_path, monkeypatch):
    gate, calls = _gated_writes(monkeypatch)
    writer = CheckpointWriter()
    url, data = str(tmp_path / "step-1.pt"), b"weights" * 1000
    pruned = threading.Event()
    writer.submit(url, data, hashlib.sha256(data).hexdigest(), then=pruned.set)
    # submit returned while the upload is still held: the training thread does not wait for it
    assert writer.busy and not storage.exists(url) and not pruned.is_set()

    # a second submit waits for the first (one upload in flight at most)
    url2 = str(tmp_path / "step-2.pt")
    second = threading.Thread(target=writer.submit, args=(url2, b"x", hashlib.sha256(b"x").hexdigest()))
    second.start()
    second.join(0.3)
    assert second.is_alive() and calls == [url]

    gate.set()
    second.join(30)
    writer.wait()
    assert pruned.is_set()
    # each checkpoint, then its sidecar: a sidecar implies a complete checkpoint
    assert calls == [url, sidecar_url(url), url2, sidecar_url(url2)]
    assert storage.read_bytes(url) == data
    assert json.loads(storage.read_bytes(sidecar_url(url))) == {
        "sha256": hashlib.sha256(data).hexdigest(),
        "bytes": len(data),
    }


def test_checkpoint_writer_with_a_slow_store(tmp_path, monkeypatch):
    """With a store that sleeps, submit returns at once and wait() takes the upload's time."""
    import time

    real = storage.write_bytes

    def slow(url, data):
        time.sleep(0.5)
        real(url, data)

    monkeypatch.setattr(storage, "write_bytes", slow)
    writer = CheckpointWriter()
    url = str(tmp_path / "step-1.pt")
    t0 = time.perf_counter()
    writer.submit(url, b"abc", hashlib.sha256(b"abc").hexdigest())
    submitted = time.perf_counter() - t0
    writer.wait()
    waited = time.perf_counter() - t0
    assert submitted < 0.4 <= waited and storage.exists(sidecar_url(url))


def test_upload_errors_surface_at_the_next_wait_or_submit(tmp_path, monkeypatch):
    real = storage.write_bytes

    def failing(url, data):
        if "bad" in url:
            raise storage.StorageError(f"storage error on {url}: disk on fire")
        real(url, data)

    monkeypatch.setattr(storage, "write_bytes", failing)
    writer = CheckpointWriter()
    bad = str(tmp_path / "bad" / "step-1.pt")
    storage.write_bytes(str(tmp_path / "ok" / "x"), b"")  # the gate works for other URLs
    # a stale sidecar of an earlier file of the same name goes first, even when the write then fails
    real(sidecar_url(bad), b'{"sha256": "stale", "bytes": 1}')

    writer.submit(bad, b"abc", "0" * 64)
    with pytest.raises(storage.StorageError, match="disk on fire") as err:
        writer.wait()
    assert any("in the background" in n for n in err.value.__notes__)
    assert not storage.exists(sidecar_url(bad)) and not storage.exists(bad)
    writer.wait()  # raised once, then cleared

    writer.submit(bad, b"abc", "0" * 64)
    good = str(tmp_path / "ok" / "step-2.pt")
    with pytest.raises(storage.StorageError, match="disk on fire"):
        writer.submit(good, b"abc", "0" * 64)  # the earlier failure, before anything new starts
    assert not storage.exists(good)


def test_prune_takes_sidecars_along_and_listing_skips_them(tmp_path):
    folder = tmp_path / "checkpoints"
    folder.mkdir()
    for n in (1, 2, 3):
        (folder / f"step-{n:08d}.pt").write_bytes(b"w")
        if n != 3:
            (folder / f"step-{n:08d}.pt.json").write_text("{}")
    (folder / "step-00000009.pt.json").write_text("{}")  # its checkpoint is gone
    _prune(str(tmp_path), keep=2)
    assert sorted(p.name for p in folder.iterdir()) == ["step-00000002.pt", "step-00000002.pt.json", "step-00000003.pt"]
    assert [storage.basename(u) for u in _list_checkpoints(str(tmp_path))] == ["step-00000002.pt", "step-00000003.pt"]


# ---- the trainer --------------------------------------------------------------------------------------


def test_record_takes_checkpoint_digests_from_sidecars(tiny_dataset, tmp_path, monkeypatch):
    reads: list[str] = []
    for fn in ("sha256_url", "read_bytes", "open_url"):
        real = getattr(storage, fn)

        def spy(url, *a, _real=real, **k):
            reads.append(str(url))
            return _real(url, *a, **k)

        monkeypatch.setattr(storage, fn, spy)
    out = tmp_path / "run"
    cfg = TrainConfig(batch_size=16, steps=6, lr=1e-3, workers=0, log_every=2, save_every=2, keep=2)
    train(cfg, tiny_dataset.url, str(out))
    assert not [u for u in reads if u.endswith(".pt")], "a checkpoint was read back to hash it"
    monkeypatch.undo()

    names = sorted(p.name for p in (out / "checkpoints").iterdir())
    assert names == ["step-00000004.pt", "step-00000004.pt.json", "step-00000006.pt", "step-00000006.pt.json"]
    rec = read_run_record(str(out))
    index = pq.read_table(out / "checkpoint_index").to_pylist()
    assert [r["name"] for r in index] == ["checkpoints/step-00000004.pt", "checkpoints/step-00000006.pt"]
    for row in index:
        data = (out / row["name"]).read_bytes()
        assert row["sha256"] == hashlib.sha256(data).hexdigest() == rec.files[row["name"]].sha256
        assert row["bytes"] == len(data)
        assert f"{row['name']}.json" in rec.files
    assert verify(str(out)).ok, verify(str(out)).problems

    # a checkpoint without a sidecar (an older wit's) is hashed by reading it, once, and gets one
    last = str(out / "checkpoints" / "step-00000006.pt")
    storage.remove(sidecar_url(last))
    d = checkpoint_digest(last)
    assert d.sha256 == index[-1]["sha256"] and storage.exists(sidecar_url(last))


def test_metrics_are_written_every_log_interval(tiny_dataset, tmp_path):
    out = tmp_path / "run"
    seen = {}

    def look(model, step):  # runs on the training thread right after the log step
        seen[step] = pq.read_table(out / "metrics.parquet").column("step").to_pylist()
        return {}

    cfg = TrainConfig(batch_size=16, steps=4, lr=1e-3, workers=0, log_every=2, eval_every=2)
    train(cfg, tiny_dataset.url, str(out), eval_callback=look)
    assert seen == {2: [2], 4: [2, 4]}  # no checkpoint before the end, the rows are there anyway


def test_tensorboard_reaches_a_remote_output(tiny_dataset, s3_bucket, tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = f"{s3_bucket}/run"
    cfg = TrainConfig(batch_size=16, steps=2, lr=1e-3, workers=0, log_every=1)
    train(cfg, tiny_dataset.url, out)
    events = storage.listdir(storage.join(out, "_tensorboard"))
    assert len(events) == 1 and events[0].startswith("events.out.tfevents."), events
    local = tmp_path / "tb" / events[0]
    local.parent.mkdir()
    local.write_bytes(storage.read_bytes(storage.join(out, "_tensorboard", events[0])))
    acc = EventAccumulator(str(local.parent))
    acc.Reload()
    assert [e.step for e in acc.Scalars("train/loss")] == [1, 2]  # every row, copied up at close
    assert verify(out).ok  # "_tensorboard" is not an output verify checks


# ---- process groups ------------------------------------------------------------------------------------


def test_collective_timeout_from_the_environment(monkeypatch):
    monkeypatch.delenv("WIT_DIST_TIMEOUT_S", raising=False)
    assert distributed.timeout() == datetime.timedelta(minutes=30)
    monkeypatch.setenv("WIT_DIST_TIMEOUT_S", "90")
    assert distributed.timeout() == datetime.timedelta(seconds=90)
    for bad in ("0", "-5", "soon"):
        monkeypatch.setenv("WIT_DIST_TIMEOUT_S", bad)
        with pytest.raises(ValueError, match="WIT_DIST_TIMEOUT_S"):
            distributed.timeout()
