"""Dataset readers: wds round trip through export (local and S3), image folder, CSV, bad input."""

from __future__ import annotations

import io

import numpy as np
import open_clip
import pytest
from PIL import Image

from wit.evaluate.datasets import (
    BUILTIN_DATASETS,
    EVAL_SEED_BASE,
    TRAINING_SEED_LIMIT,
    builtin_seed,
    export,
    open_builtin,
    open_dataset,
)
from wit.evaluate.errors import EvalError
from wit.evaluate.features import Encoder
from wit.evaluate.tasks import BUILTIN_TASKS, builtin_suites, load_suite, parse_suite
from wit.manifests import storage
from wit.train import models as _models  # noqa: F401  (registers wit-tiny with open_clip)


def _png(colour, size=24) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (size, size), colour).save(buf, format="PNG")
    return buf.getvalue()


def test_builtins_use_held_out_seeds_and_are_deterministic():
    for spec in BUILTIN_DATASETS.values():
        for split in ("test", "train"):
            assert builtin_seed(spec, split) >= EVAL_SEED_BASE > TRAINING_SEED_LIMIT
    ds = open_builtin("synthetic-colour")
    a, b = ds.split("test"), ds.split("test")
    assert a.digest == b.digest and a.count == 400 and ds.split("train").digest != a.digest
    labels = [s.label for s in a.samples()]
    assert np.bincount(labels).tolist() == [50] * 8
    digits = open_builtin("digits")
    assert digits.split("test").count + digits.split("train").count == 1797
    assert {"default", "digits", "synthetic-retrieval"} <= set(builtin_suites())
    assert len(load_suite("default").tasks) == len(BUILTIN_TASKS)


@pytest.mark.parametrize("where", ["local", "s3"])
def test_wds_round_trip_through_export(where, tmp_path, request):
    root = str(tmp_path / "wds") if where == "local" else request.getfixturevalue("s3_bucket") + "/wds"
    written = export("synthetic-retrieval", root, samples_per_shard=50, splits=("test",))
    assert written == {"test": 144}
    names = storage.listdir(root, recursive=True)
    assert {"test/0.tar", "test/2.tar", "test/nshards.txt", "dataset_type.txt"} <= set(names)
    assert storage.read_text(storage.join(root, "test/nshards.txt")).strip() == "3"
    back = open_dataset(root)
    assert back.format == "wds" and back.kind == "retrieval"
    got = list(back.split("test").samples())
    want = list(open_builtin("synthetic-retrieval").split("test").samples())
    assert [s.key for s in got] == [s.key for s in want]
    assert got[5].captions == want[5].captions and len(got[5].captions) == 5
    # lossless: the exported PNG holds exactly the pixels of the built-in
    assert np.array_equal(np.asarray(Image.open(io.BytesIO(got[5].image))), np.asarray(want[5].image))
    # exporting again writes the same bytes, so the digest (the cache key) is stable
    d1 = back.split("test").digest
    export("synthetic-retrieval", root, samples_per_shard=50, splits=("test",))
    assert open_dataset(root).split("test").digest == d1


def test_wds_classification_layout(tmp_path):
    root = str(tmp_path / "colour")
    export("synthetic-colour", root, samples_per_shard=300)
    ds = open_dataset(root)
    assert ds.classnames == ["red", "orange", "yellow", "green", "blue", "purple", "pink", "black"]
    assert ds.templates and all("{c}" in t for t in ds.templates)
    assert sorted(ds.splits) == ["test", "train"]
    assert sum(1 for _ in ds.split("train").samples()) == 320


def test_image_folder_and_csv(tmp_path):
    root = tmp_path / "folder"
    for split in ("train", "test"):
        for cls, colour in (("cat", "red"), ("dog", "blue")):
            (root / split / cls).mkdir(parents=True)
            for i in range(3):
                (root / split / cls / f"{i}.png").write_bytes(_png(colour))
    ds = open_dataset(str(root))
    assert ds.format == "folder" and ds.classnames == ["cat", "dog"]
    test = list(ds.split("test").samples())
    assert [s.label for s in test] == [0, 0, 0, 1, 1, 1]
    (root / "classnames.txt").write_text("a cat\na dog\n")
    assert open_dataset(str(root)).classnames == ["a cat", "a dog"]

    csv = tmp_path / "table.csv"
    csv.write_text(
        "image,label,split\n"
        + "".join(
            f"folder/{s}/{c}/{i}.png,{c},{s}\n" for s in ("train", "test") for c in ("cat", "dog") for i in range(3)
        )
    )
    tab = open_dataset(str(csv))
    assert tab.format == "table" and tab.classnames == ["cat", "dog"] and sorted(tab.splits) == ["test", "train"]
    rows = list(tab.split("test").samples())
    assert [s.label for s in rows] == [0, 0, 0, 1, 1, 1] and rows[0].image == _png("red")


def test_corrupt_and_missing_images_are_counted_not_raised(tmp_path):
    root = tmp_path / "folder"
    (root / "red").mkdir(parents=True)
    (root / "red" / "ok.png").write_bytes(_png("red"))
    (root / "red" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\nthis is not a png")
    (root / "red" / "truncated.png").write_bytes(_png("red")[:40])
    csv = tmp_path / "t.csv"
    csv.write_text("path,label\nfolder/red/ok.png,0\nfolder/red/gone.png,0\n")
    model, _, preprocess = open_clip.create_model_and_transforms("wit-tiny")
    enc = Encoder(model.eval(), preprocess, open_clip.get_tokenizer("wit-tiny"), batch_size=2)
    feats = enc.encode_images(open_dataset(str(root)).split("test").samples())
    assert len(feats.keys) == 1 and feats.skipped == {"undecodable": 2} and feats.features.shape == (1, 128)
    feats = enc.encode_images(open_dataset(str(csv)).split("test").samples())
    assert len(feats.keys) == 1 and feats.skipped == {"missing_image": 1}
    assert np.allclose(np.linalg.norm(feats.features, axis=1), 1.0, atol=1e-5)


def test_batched_preprocess_equals_the_models_own(tmp_path):
    model, _, preprocess = open_clip.create_model_and_transforms("wit-tiny")
    enc = Encoder(model.eval(), preprocess, None)
    sample = next(open_builtin("synthetic-shape").split("test").samples())
    arr, reason = enc._prepare(sample)
    assert reason is None
    import torch

    assert torch.equal(enc._to_tensor([arr])[0], preprocess(sample.image))


def test_bad_input_messages(tmp_path):
    with pytest.raises(EvalError, match="not found"):
        open_dataset(str(tmp_path / "nope"))
    with pytest.raises(EvalError, match="no split 'val'"):
        open_builtin("digits").split("val")
    (tmp_path / "empty").mkdir()
    with pytest.raises(EvalError, match="no images in class folders"):
        open_dataset(str(tmp_path / "empty"))
    with pytest.raises(EvalError, match="unknown kind"):
        parse_suite("tasks: [{name: x, kind: segmentation, dataset: digits}]")
    with pytest.raises(EvalError, match="no built-in task"):
        parse_suite("tasks: [nope]")
    with pytest.raises(EvalError, match="not a zeroshot_classification metric"):
        parse_suite("tasks: [{name: x, kind: zeroshot_classification, dataset: digits, metrics: [lp_acc1]}]")
    with pytest.raises(EvalError, match="has no \\{c\\} placeholder"):
        parse_suite("tasks: [{name: x, kind: zeroshot_classification, dataset: digits, templates: [hello]}]")
    with pytest.raises(EvalError, match="unknown suite"):
        load_suite("nonsense")
