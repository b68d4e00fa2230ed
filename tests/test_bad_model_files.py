"""Bad model files are one clear line, never a traceback (issue #19): a YAML file, random bytes, a
truncated checkpoint, an empty file, a cut pickle and a torch file of no weights, given to ``wit
eval``, ``wit train --pretrained`` and ``wit filter --clip-score``. All three read them through
``wit.train.checkpoint.load_weights`` (``weights_only=True``), and never suggest
``weights_only=False`` for a file from elsewhere."""

from __future__ import annotations

import pickle
import random
import sys
from pathlib import Path

import open_clip
import pytest
import torch
import wit_train_testdata as testdata  # registered by tests/conftest.py
from click.testing import CliRunner

from wit.pipeline.cli import cli
from wit.train.checkpoint import save_checkpoint
from wit.train.models import resolve_model

sys.path.insert(0, str(Path(__file__).parent / "ingest"))
import _downloaded  # noqa: E402

# each bad file, and the words its error line must hold
CASES = {
    "yaml": "it is text, not a torch.save file: YAML?",
    "random": "neither a torch.save zip archive nor a pickle",
    "truncated": "truncated:",
    "empty": "an empty file",
    "cut-pickle": "truncated:",  # the unpickler's IndexError, once a traceback
    "no-weights": "holds no model weights (a dict of epoch, args)",
}


@pytest.fixture(scope="module")
def bad_files(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("bad")
    spec = resolve_model("wit-tiny")
    model = open_clip.create_model(spec.name)
    good = root / "good.pt"  # a real wit checkpoint of wit-tiny, to cut in half
    save_checkpoint(
        str(good),
        {
            "state_dict": model.state_dict(),
            "wit": {"format": 1, "model": spec.name, "model_config": spec.config, "step": 0},
        },
    )
    data = good.read_bytes()
    files = {case: root / f"bad-{case}.pt" for case in CASES}
    files["yaml"].write_text("model: wit-tiny\nsteps: 3\n")
    files["random"].write_bytes(random.Random(0).randbytes(4096))
    files["truncated"].write_bytes(data[: len(data) // 2])
    files["empty"].write_bytes(b"")
    files["cut-pickle"].write_bytes(pickle.dumps({"state_dict": {"w": list(range(500))}}, protocol=2)[:300])
    torch.save({"epoch": 3, "args": "x"}, files["no-weights"])
    return files


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> dict[str, str]:
    """A finished dataset (for train) and a downloaded manifest (for filter), both tiny."""
    root = tmp_path_factory.mktemp("inputs")
    ds = testdata.build_dataset(root / "dataset", n_shards=1, per_shard=8, corrupt=0)
    downloaded = _downloaded.make_downloaded(root / "pairs", n_clean=4, parts=1, shards=1)
    return {"dataset": ds.url, "downloaded": downloaded.downloaded.url}


def _command(command: str, bad: Path, inputs: dict[str, str], out: Path) -> list[str]:
    if command == "eval":
        return ["eval", str(bad), "-o", str(out), "--suite", "synthetic-colour", "--no-cache", "--resamples", "0"]
    if command == "train":
        return ["train", inputs["dataset"], "-o", str(out), "--pretrained", str(bad), "--steps", "1", "--workers", "0"]
    return ["filter", inputs["downloaded"], "-o", str(out), "--clip-score", str(bad), "--keep-top", "0.5"]


@pytest.mark.parametrize("command", ["eval", "train", "filter"])
@pytest.mark.parametrize("case", list(CASES))
def test_a_bad_model_file_is_one_clear_line(command, case, bad_files, inputs, tmp_path):
    bad = bad_files[case]
    result = CliRunner().invoke(cli, _command(command, bad, inputs, tmp_path / "out"))
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert result.exit_code in (1, 2) and isinstance(result.exception, SystemExit), result.output
    assert len(lines) == 1 and lines[0].startswith("Error: "), result.output
    assert bad.name in lines[0] and CASES[case] in lines[0], lines[0]
    assert "Traceback" not in result.output and "weights_only" not in result.output
    assert not (tmp_path / "out" / "_run.json").exists()  # refused before any work
