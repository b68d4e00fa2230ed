"""CLIP-score filtering: scores are cosines, a trained model prefers matched captions, thresholds
drop the right rows whatever the partitioning, and a bad checkpoint fails when the config is built.

The model is a micro CLIP (2-layer towers, 32-pixel images) trained for a few seconds on the
synthetic world with ``wit.train``; the downloaded input pairs world images with their own
caption (matched) or another concept's (``world.mismatched_caption``).
"""

from __future__ import annotations

import io
import json
import random
import sys
from pathlib import Path

import open_clip
import pytest
import torch
from PIL import Image

from wit.evaluate import world
from wit.ingest.clipscore import histogram, load_scorer, score_threshold
from wit.ingest.filter import FILTER_PHASES, SCAN, FilterConfig
from wit.manifests.manifest import read_table
from wit.manifests.runrecord import read_run_record
from wit.manifests.stage import StageError, config_dict
from wit.pipeline.executor import PartSpec, run_stage
from wit.pipeline.executor import run_phases as executor_run_phases
from wit.train.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from wit.train.models import resolve_model

sys.path.insert(0, str(Path(__file__).parent))
import _downloaded  # noqa: E402

MICRO = {
    "embed_dim": 64,
    "vision_cfg": {"image_size": 32, "layers": 2, "width": 64, "head_width": 32, "patch_size": 8},
    "text_cfg": {"context_length": 32, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2},
}
N_PAIRS = 40  # half matched, half mismatched


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> str:
    """A checkpoint of the micro model after 40 steps on 512 world pairs (~20 s on 2 idle cores)."""
    import importlib.util

    from wit.train.config import TrainConfig
    from wit.train.loop import train

    root = tmp_path_factory.mktemp("clip")
    spec = importlib.util.spec_from_file_location(
        "wit_train_testdata", Path(__file__).parents[1] / "train" / "_data.py"
    )
    data = sys.modules.get("wit_train_testdata")
    if data is None:
        data = importlib.util.module_from_spec(spec)
        sys.modules["wit_train_testdata"] = data
        spec.loader.exec_module(data)
    ds = data.build_dataset(root / "dataset", n_shards=2, per_shard=256, corrupt=0)
    (root / "wit-clipscore-micro.json").write_text(json.dumps(MICRO))
    cfg = TrainConfig(
        model=str(root / "wit-clipscore-micro.json"),
        batch_size=32,
        steps=40,
        lr=2e-3,
        warmup=5,
        workers=0,
        augment=False,
    )
    # One thread: on 2 shared cores OpenMP's spinning threads make a busy machine 4x slower
    # (the trainer leaves the thread count alone when OMP_NUM_THREADS is set).
    threads = torch.get_num_threads()
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("OMP_NUM_THREADS", "1")
        torch.set_num_threads(1)
        try:
            return train(cfg, ds.url, str(root / "train")).checkpoint
        finally:
            torch.set_num_threads(threads)


def _png(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, "PNG")
    return buf.getvalue()


def _pair_samples(n_clean: int, seed: int):
    """World images with matched (even) or mismatched (odd) captions, plus rows failing earlier."""
    rng = random.Random(seed + 11)
    samples = []
    for i in range(N_PAIRS):
        c = world.sample_concept(rng)
        size = rng.choice((64, 96, 128))
        text = world.caption(c, rng) if i % 2 == 0 else world.mismatched_caption(c, rng)
        data = _png(world.render(c, rng, size=size))
        samples.append(
            _downloaded.Sample(f"{_downloaded.BASE}/pair/{i}.png", text, data, "png", (size, size), (size, size), ["x"])
        )
    s0 = samples[0]
    samples += [
        # the same image under a caption of its own: a duplicate whatever its score
        _downloaded.Sample(
            f"{_downloaded.BASE}/copy.png", "copy", s0.data, "png", s0.original, s0.stored, ["x"], twin=0
        ),
        _downloaded.Sample(
            f"{_downloaded.BASE}/tiny.png", "tiny", s0.data, "png", (8, 8), s0.stored, ["x"], expect="too_small"
        ),
        _downloaded.Sample(
            f"{_downloaded.BASE}/bad.png", "bad", b"junk" * 50, "png", (64, 64), (64, 64), ["x"], expect="undecodable"
        ),
        _downloaded.Sample(
            f"{_downloaded.BASE}/gone.png",
            "gone",
            None,
            status="failed",
            error="http_404",
            expect="download_failed:http_404",
        ),  # fmt: skip
    ]
    return samples, [_png(world.render(world.sample_concept(rng), rng, size=64))]


@pytest.fixture(scope="module")
def pairs(tmp_path_factory):
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(_downloaded, "build_samples", _pair_samples)
        return _downloaded.make_downloaded(tmp_path_factory.mktemp("pairs"), parts=3)


def _matched(d) -> dict[str, bool]:
    return {s.uid: int(s.url.rsplit("/", 1)[1].split(".")[0]) % 2 == 0 for s in d.samples if "/pair/" in s.url}


@pytest.fixture(scope="module")
def scored(trained, pairs, tmp_path_factory):
    """Scores only (no threshold): every row as the other filters decide it, with its score."""
    out = str(tmp_path_factory.mktemp("scored") / "f")
    config = FilterConfig.build(clip_checkpoint=trained, clip_device="cpu")
    ref = run_phases(config, pairs, out)
    return config, ref, {r["uid"]: r for r in read_table(out).to_pylist()}


def run_phases(config, d, out, **kw):
    return _downloaded.run_phases(FILTER_PHASES, config, d.downloaded, out, **kw)


def test_scores_are_cosine_similarities_of_the_checkpoint(trained, pairs, scored):
    config, ref, rows = scored
    assert config.clip_checkpoint_sha256 == load_scorer(trained, None, "cpu", 64).digest
    assert set(config_dict(config)) >= {"clip_checkpoint", "clip_checkpoint_sha256", "clip_model"}
    # every row that passed the scan's checks has a score; earlier failures have none
    for s in pairs.samples:
        r = rows[s.uid]
        assert r["reason"] == pairs.expected[s.uid]
        assert (r["clip_score"] is not None) == (r["reason"] in (None, "duplicate")), s.url
    # direct open_clip computation for a few rows, from the checkpoint's own weights and transform
    ckpt = load_checkpoint(trained)
    model, _, preprocess = open_clip.create_model_and_transforms(ckpt["wit"]["model"])
    model.load_state_dict(ckpt["state_dict"])
    model.eval()
    tokenizer = open_clip.get_tokenizer(ckpt["wit"]["model"])
    some = [s for s in pairs.samples if "/pair/" in s.url][:4]
    with torch.no_grad():
        img = model.encode_image(torch.stack([preprocess(Image.open(io.BytesIO(s.data))) for s in some]))
        txt = model.encode_text(tokenizer([s.text for s in some]))
        want = torch.nn.functional.cosine_similarity(img, txt).tolist()
    for s, w in zip(some, want, strict=True):
        assert rows[s.uid]["clip_score"] == pytest.approx(w, abs=1e-5)
    rec = read_run_record(ref.url)
    n_scored = sum(r["clip_score"] is not None for r in rows.values())
    assert sum(rec.tallies["clip_score"].values()) == n_scored
    assert sum(rec.tallies["clip_score_kept"].values()) == rec.counts["kept"]


def test_matched_captions_score_higher_than_mismatched(pairs, scored):
    _, _, rows = scored
    matched = _matched(pairs)
    good = [rows[u]["clip_score"] for u, m in matched.items() if m]
    bad = [rows[u]["clip_score"] for u, m in matched.items() if not m]
    mean_good, mean_bad = sum(good) / len(good), sum(bad) / len(bad)
    assert mean_good > mean_bad + 0.1, (mean_good, mean_bad)
    # and as a ranking: most (matched, mismatched) pairs of rows are ordered right (AUC)
    auc = sum((g > b) + 0.5 * (g == b) for g in good for b in bad) / (len(good) * len(bad))
    assert auc > 0.7, auc


def test_min_score_and_keep_top_drop_the_right_rows(trained, pairs, scored, tmp_path):
    _, base_ref, rows = scored
    kept = {u: r["clip_score"] for u, r in rows.items() if r["keep"]}
    ranked = sorted(kept.values(), reverse=True)

    cut = ranked[len(ranked) // 2]
    by_min = FilterConfig.build(clip_checkpoint=trained, clip_device="cpu", min_clip_score=cut)
    out = read_table(run_phases(by_min, pairs, str(tmp_path / "min")).url).to_pylist()
    _check_drops(out, rows, {u for u, s in kept.items() if s < cut})

    top = FilterConfig.build(clip_checkpoint=trained, clip_device="cpu", keep_top_fraction=0.25)
    ref = run_phases(top, pairs, str(tmp_path / "top"))
    threshold = ranked[-(-len(ranked) // 4) - 1]
    low = {u for u, s in kept.items() if s < threshold}
    _check_drops(read_table(ref.url).to_pylist(), rows, low)
    assert len(kept) - len(low) == -(-len(kept) // 4)  # no ties among float scores here
    matched = _matched(pairs)
    mismatched_share = [
        sum(not matched[u] for u in group) / len(group) for group in (low, [u for u in kept if u not in low])
    ]
    assert mismatched_share[0] > mismatched_share[1], mismatched_share  # the dropped are the worse pairs
    group = read_run_record(str(tmp_path / "top" / "_group"))
    assert group.extra["clip_threshold"] == [pytest.approx(threshold)]
    assert read_run_record(ref.url).counts["low_clip_score"] == len(low)

    # the same rows whatever the partitioning: two workers, and a job array of two slices
    assert run_phases(top, pairs, str(tmp_path / "w2"), workers=2).digest == ref.digest
    sliced, inputs = str(tmp_path / "sliced"), [pairs.downloaded]
    # as the CLI runs a job array: the slice that completes the scan runs the later phases
    assert not executor_run_phases(FILTER_PHASES, top, inputs, sliced, part=PartSpec(0, 2), progress=False).done
    assert (
        executor_run_phases(FILTER_PHASES, top, inputs, sliced, part=PartSpec(1, 2), progress=False).ref.digest
        == ref.digest
    )
    # scores alone change no decision
    plain = run_phases(FilterConfig(), pairs, str(tmp_path / "plain"))
    no_score = {r["uid"]: r["reason"] for r in read_table(plain.url).to_pylist()}
    assert no_score == {u: r["reason"] for u, r in rows.items()} and base_ref.digest != plain.digest


def _check_drops(out: list[dict], before: dict[str, dict], low: set[str]) -> None:
    assert low, "the threshold must drop something for the test to mean anything"
    for r in out:
        old = before[r["uid"]]
        assert r["clip_score"] == old["clip_score"]
        if r["uid"] in low:
            assert (r["keep"], r["reason"]) == (False, "low_clip_score")
        else:  # earlier reasons stay
            assert (r["keep"], r["reason"]) == (old["keep"], old["reason"])


def test_a_bad_checkpoint_fails_when_the_config_is_built(trained, tmp_path):
    with pytest.raises(CheckpointError, match="missing.pt"):
        FilterConfig.build(clip_checkpoint=str(tmp_path / "missing.pt"), min_clip_score=0.2)
    # a wit checkpoint read as another architecture
    with pytest.raises(ValueError, match="not wit-tiny"):
        FilterConfig.build(clip_checkpoint=trained, clip_model="wit-tiny")
    # an open_clip weights file: needs its architecture, and the weights must fit it
    foreign = str(tmp_path / "open_clip.pt")
    torch.save(load_checkpoint(trained)["state_dict"], foreign)
    with pytest.raises(ValueError, match="--model"):
        FilterConfig.build(clip_checkpoint=foreign)
    resolve_model("wit-tiny")
    with pytest.raises(CheckpointError, match="do not fit the wit-tiny"):
        FilterConfig.build(clip_checkpoint=foreign, clip_model="wit-tiny")
    ok = FilterConfig.build(clip_checkpoint=foreign, clip_model="wit-clipscore-micro", keep_top_fraction=0.5)
    assert ok.clip_model == "wit-clipscore-micro" and ok.clip_checkpoint_sha256


@pytest.mark.parametrize(
    "kw, match",
    [
        ({"min_clip_score": 0.2}, "--clip-score"),
        ({"keep_top_fraction": 0.5}, "--clip-score"),
        ({"clip_model": "wit-tiny"}, "--clip-score"),
        ({"clip_checkpoint": "ckpt.pt"}, "FilterConfig.build"),
        ({"clip_checkpoint": "ckpt.pt", "clip_checkpoint_sha256": "0" * 64, "min_clip_score": 1.5}, r"\[-1, 1\]"),
        ({"clip_checkpoint": "ckpt.pt", "clip_checkpoint_sha256": "0" * 64, "keep_top_fraction": 0.0}, r"\(0, 1\]"),
        ({"clip_checkpoint": "ckpt.pt", "clip_checkpoint_sha256": "0" * 64, "clip_device": "tpu"}, "clip_device"),
    ],
)
def test_bad_clip_options_are_clear_errors(kw, match):
    with pytest.raises(ValueError, match=match):
        FilterConfig(**kw)


def test_a_checkpoint_changed_after_the_build_stops_the_scan(trained, pairs, tmp_path):
    ckpt = tmp_path / "ckpt.pt"
    ckpt.write_bytes(Path(trained).read_bytes())
    config = FilterConfig.build(clip_checkpoint=str(ckpt))
    payload = load_checkpoint(trained)
    payload["wit"]["step"] = 61
    save_checkpoint(str(ckpt), payload)
    load_scorer.cache_clear()  # as a fresh worker process would
    with pytest.raises(StageError, match="changed since"):
        run_stage(SCAN, config, [pairs.downloaded], str(tmp_path / "scan"), progress=False)
    other = FilterConfig.build(clip_checkpoint=str(ckpt))
    assert other.clip_checkpoint_sha256 != config.clip_checkpoint_sha256  # a new checkpoint: a new config


def test_threshold_is_a_function_of_the_scores_only():
    rng = random.Random(0)
    scores = [round(rng.uniform(-0.2, 0.6), 3) for _ in range(101)]
    t = score_threshold(scores, keep_top_fraction=0.3)
    assert sum(s >= t for s in scores) == 31  # ceil(0.3 x 101)
    for _ in range(3):
        rng.shuffle(scores)
        assert score_threshold(scores, keep_top_fraction=0.3) == t
    assert score_threshold(scores) is None and score_threshold(scores, min_score=0.1) == 0.1
    # with a floor, the quantile is over the rows above it; a higher floor wins
    above = [s for s in scores if s >= 0.1]
    t2 = score_threshold(scores, min_score=0.1, keep_top_fraction=0.5)
    assert sum(s >= t2 for s in above) == -(-len(above) // 2)
    t3 = score_threshold(scores, min_score=0.5, keep_top_fraction=1.0)  # the lowest score kept
    assert t3 >= 0.5 and [s >= t3 for s in scores] == [s >= 0.5 for s in scores]
    assert score_threshold([0.2, 0.2, 0.2], keep_top_fraction=0.1) == 0.2  # ties are all kept
    assert score_threshold([], keep_top_fraction=0.5) is None


def test_histogram_buckets_by_lower_edge():
    assert histogram([0.01, 0.049, 0.05, -0.01, 0.31, None]) == {"-0.05": 1, "0.00": 2, "0.05": 1, "0.30": 1}


def test_on_ray_the_scan_scores_on_actors_and_gives_the_local_rows(trained, pairs, scored, ray_cluster, tmp_path):
    from wit.manifests.stage import stage_resources
    from wit.pipeline.executor import run_phases as run_stage_phases

    config, local_ref, _ = scored
    assert stage_resources(FILTER_PHASES[0][0], config).model  # the scan keeps its model on actors
    out = str(tmp_path / "ray")
    outcome = run_stage_phases(FILTER_PHASES, config, [pairs.downloaded], out, progress=False, executor="ray")
    assert outcome.done and outcome.ref.digest == local_ref.digest
    scan = read_run_record(out + "/_scan")
    assert scan.extra["clip_device"] == ["cpu"] * scan.partitions  # no GPU in this cluster: CPU actors
