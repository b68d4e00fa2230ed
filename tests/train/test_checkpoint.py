"""The checkpoint contract: atomic on any URL, weights_only, loadable by open_clip itself."""

from __future__ import annotations

import json

import open_clip
import pytest
import torch
from open_clip.model import CLIP

from wit.train.checkpoint import CheckpointError, load_checkpoint, load_model, save_checkpoint
from wit.train.models import resolve_model


def _payload(name: str = "wit-tiny") -> dict:
    spec = resolve_model(name)
    torch.manual_seed(0)
    model = open_clip.create_model(spec.name)
    return {
        "state_dict": model.state_dict(),
        "wit": {"format": 1, "model": spec.name, "model_config": spec.config, "step": 7},
        "rng": torch.get_rng_state(),
    }


@pytest.fixture(params=["local", "s3"])
def root(request, tmp_path):
    return str(tmp_path) if request.param == "local" else request.getfixturevalue("s3_bucket")


def test_round_trip_and_open_clip_loads_it(root, tmp_path):
    payload = _payload()
    url = f"{root}/ckpt/step-7.pt"
    save_checkpoint(url, payload)
    loaded = load_model(url)
    assert loaded.name == "wit-tiny" and loaded.info["step"] == 7
    for k, v in payload["state_dict"].items():
        assert torch.equal(loaded.model.state_dict()[k], v), k
    if root == str(tmp_path):
        model, _, _ = open_clip.create_model_and_transforms("wit-tiny", pretrained=url)
        assert torch.equal(model.state_dict()["logit_scale"], payload["state_dict"]["logit_scale"])


@pytest.mark.parametrize("name", ["wit-tiny", "wit-tiny-rn"])
def test_loaded_model_computes_what_the_saved_one_did(name, tmp_path):
    """load_model skips the random initial fill (every weight comes from the file): the loaded
    model, buffers built at construction included, gives the saved model's embeddings exactly."""
    payload = _payload(name)
    url = str(tmp_path / "ckpt.pt")
    save_checkpoint(url, payload)
    original = open_clip.create_model(name)
    original.load_state_dict(payload["state_dict"])
    original.eval()
    loaded = load_model(url).model
    size = original.visual.image_size
    images = torch.randn(3, 3, *(size if isinstance(size, tuple) else (size, size)))
    text = open_clip.get_tokenizer(name)(["a red circle", "a blue square", "seven"])
    with torch.no_grad():
        assert torch.equal(loaded.encode_image(images), original.encode_image(images))
        assert torch.equal(loaded.encode_text(text), original.encode_text(text))
    originals = dict(original.named_buffers())
    for key, buf in loaded.named_buffers():
        assert torch.equal(buf, originals[key]), key
    assert torch.nn.init.normal_ is not None and torch.nn.init.normal_.__module__ == "torch.nn.init"  # restored


def test_a_checkpoint_of_a_model_whose_shipped_config_changed_since_still_loads(tmp_path):
    """A wit checkpoint brings its own architecture: one saved when wit-tiny-rn read 32 tokens
    loads with that config (under a derived name), its tokenizer 32 tokens long, while the name
    keeps meaning the shipped config."""
    import copy

    config = copy.deepcopy(resolve_model("wit-tiny-rn").config)
    config["text_cfg"]["context_length"] = config["text_cfg"]["context_length"] * 2
    torch.manual_seed(0)
    old = CLIP(**config)
    url = str(tmp_path / "old.pt")
    save_checkpoint(
        url, {"state_dict": old.state_dict(), "wit": {"format": 1, "model": "wit-tiny-rn", "model_config": config}}
    )
    loaded = load_model(url)
    assert loaded.name == "wit-tiny-rn"
    assert loaded.tokenizer(["seven"]).shape[1] == config["text_cfg"]["context_length"]
    assert open_clip.get_model_config("wit-tiny-rn") == resolve_model("wit-tiny-rn").config
    with torch.no_grad():
        text = loaded.tokenizer(["a red seven"])
        assert torch.equal(loaded.model.encode_text(text), old.eval().encode_text(text))
    assert load_model(url).name == "wit-tiny-rn"  # again: the derived name is registered once, to the same config


def test_json_config_model(tmp_path):
    cfg = dict(resolve_model("wit-tiny").config, embed_dim=64)
    path = tmp_path / "my-clip.json"
    path.write_text(json.dumps(cfg))
    spec = resolve_model(str(path))
    assert spec.name == "my-clip" and open_clip.create_model(spec.name).text_projection.shape[1] == 64


def test_unknown_model_and_bad_json(tmp_path):
    with pytest.raises(ValueError, match="unknown model"):
        resolve_model("no-such-model")
    (tmp_path / "bad.json").write_text('{"embed_dim": 3}')
    with pytest.raises(ValueError, match="needs embed_dim, vision_cfg and text_cfg"):
        resolve_model(str(tmp_path / "bad.json"))


def test_truncated_and_foreign_checkpoints_are_clear_errors(tmp_path):
    url = str(tmp_path / "c.pt")
    save_checkpoint(url, _payload())
    data = (tmp_path / "c.pt").read_bytes()
    (tmp_path / "c.pt").write_bytes(data[: len(data) // 3])
    with pytest.raises(CheckpointError, match="not a loadable checkpoint"):
        load_checkpoint(url)
    torch.save({"state_dict": _payload()["state_dict"]}, tmp_path / "foreign.pt")
    with pytest.raises(CheckpointError, match="--model NAME"):
        load_model(str(tmp_path / "foreign.pt"))
    assert load_model(str(tmp_path / "foreign.pt"), model="wit-tiny").name == "wit-tiny"
    with pytest.raises(CheckpointError, match="does not fit|not"):
        load_model(str(tmp_path / "foreign.pt"), model="RN50")


def test_pickled_code_is_refused(tmp_path):
    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    torch.save({"state_dict": {}, "x": Evil()}, tmp_path / "evil.pt")
    with pytest.raises(CheckpointError):
        load_checkpoint(str(tmp_path / "evil.pt"))
