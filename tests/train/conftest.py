"""Fixtures for the trainer's tests: tiny synthetic WebDataset datasets (see _data.py)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

_spec = importlib.util.spec_from_file_location("wit_train_testdata", Path(__file__).with_name("_data.py"))
testdata = importlib.util.module_from_spec(_spec)
sys.modules["wit_train_testdata"] = testdata  # importable by that name from any test
_spec.loader.exec_module(testdata)


@pytest.fixture(scope="session")
def tiny_dataset(tmp_path_factory):
    """4 shards x 48 samples of shapes and digits, one corrupt image, as a finished wit dataset."""
    return testdata.build_dataset(tmp_path_factory.mktemp("ds") / "dataset", n_shards=4, per_shard=48)


@pytest.fixture(scope="session")
def many_shards(tmp_path_factory):
    """8 shards x 10 samples: enough shards for 2 ranks x 2 workers."""
    return testdata.build_dataset(tmp_path_factory.mktemp("ds8") / "dataset", n_shards=8, per_shard=10, seed=1)
