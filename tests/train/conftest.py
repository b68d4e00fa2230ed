"""Fixtures for the trainer's tests: tiny synthetic WebDataset datasets (see _data.py)."""

from __future__ import annotations

import pytest
import wit_train_testdata as testdata  # registered by tests/conftest.py


@pytest.fixture(scope="session")
def tiny_dataset(tmp_path_factory):
    """4 shards x 48 samples of shapes and digits, one corrupt image, as a finished wit dataset."""
    return testdata.build_dataset(tmp_path_factory.mktemp("ds") / "dataset", n_shards=4, per_shard=48)


@pytest.fixture(scope="session")
def many_shards(tmp_path_factory):
    """8 shards x 10 samples: enough shards for 2 ranks x 2 workers."""
    return testdata.build_dataset(tmp_path_factory.mktemp("ds8") / "dataset", n_shards=8, per_shard=10, seed=1)
