"""uint8 crops normalised on the device, the side-stream copy, --decode gpu's boxes and images (its
mechanics on CPU: torchvision.io.decode_jpeg decodes on the CPU too), default workers, GPU settings."""

from __future__ import annotations

import io
import random

import open_clip
import pytest
import torch
import torchvision.transforms as T
import webdataset as wds
from PIL import Image
from torchvision.io import ImageReadMode, decode_jpeg

import wit.train.models  # noqa: F401  (registers wit-tiny)
from wit.evaluate import world
from wit.train import device as dev
from wit.train.data import (
    BatchStream,
    CorruptSample,
    Decoder,
    EncodedImage,
    crop_box,
    default_workers,
    full_box,
    make_loader,
    plan_stream,
    sample_seed,
    to_uint8,
)

CPU = torch.device("cpu")


def _jpeg(size: int, seed: int, **save) -> bytes:
    rng = random.Random(seed)
    img = world.render(world.sample_concept(rng), rng, size=size)
    buf = io.BytesIO()
    img.convert(save.pop("mode", "RGB")).save(buf, format=save.pop("format", "JPEG"), **save)
    return buf.getvalue()


def _sample(i: int, data: bytes, key: str = "jpg") -> dict:
    return {"__key__": f"k{i:03d}", "__url__": "shard.tar", key: data, "txt": b"a caption"}


def _pil_path(transform, size: int) -> Decoder:
    """The Decoder as it was: open_clip's PIL transform, sample by sample."""
    d = Decoder(transform, size, 0)
    d.pixels = None
    return d


def test_normalize_on_the_device_is_bit_identical_to_to_tensor_and_normalize():
    tf = open_clip.image_transform(224, is_train=True)
    norm = tf.transforms[-1]
    crop = Image.open(io.BytesIO(_jpeg(224, 1))).convert("RGB")
    expected = norm(T.ToTensor()(crop))
    mean, std = (torch.tensor(v, dtype=torch.float32) for v in (norm.mean, norm.std))
    got = dev.normalize(to_uint8(crop)[None], mean, std)[0]
    assert got.dtype == torch.float32 and torch.equal(got, expected)


@pytest.mark.parametrize("size, train", [(224, True), (64, True), (64, False)])
def test_uint8_crops_have_the_pil_transforms_boxes_and_its_pixels_within_2_grey_levels(size, train, monkeypatch):
    tf = open_clip.image_transform(size, is_train=train)
    fast, slow = Decoder(tf, size, 0), _pil_path(tf, size)
    assert fast.pixels is not None and fast.pixels.size == (size, size)
    drawn = []
    get_params = T.RandomResizedCrop.get_params

    def recorded(img, scale, ratio):  # the box open_clip's transform draws, in PIL's own call
        drawn.append(get_params(img, scale, ratio))
        return drawn[-1]

    monkeypatch.setattr(T.RandomResizedCrop, "get_params", staticmethod(recorded))
    mean, std = (torch.tensor(v) for v in (fast.pixels.mean, fast.pixels.std))
    for i, px in enumerate((256, 301, 520)):
        sample = _sample(i, _jpeg(px, i))
        _, old, _ = slow(sample, 0)
        _, new, _ = fast(sample, 0)
        assert new.dtype == torch.uint8 and new.shape == (3, size, size)
        grey = ((dev.normalize(new[None], mean, std)[0] - old) * std[:, None, None] * 255).abs()
        assert grey.max() <= 2.01 and grey.mean() < 0.05, (px, grey.max(), grey.mean())
        if train:  # the same box, by the same call under the same seed
            img, _ = fast.open(sample["jpg"])
            assert crop_box(fast, img.size, sample_seed(0, 0, f"k{i:03d}")) == drawn[-1] == drawn[-2] == drawn[-3]
    assert len(drawn) == (9 if train else 0)  # PIL's transform, the uint8 path, crop_box: per image


def test_other_transforms_run_sample_by_sample():
    jitter = open_clip.image_transform(
        64, is_train=True, aug_cfg={"color_jitter_prob": 0.5, "color_jitter": (0.4,) * 4}
    )
    squash = open_clip.image_transform(64, is_train=False, resize_mode="squash")
    for tf in (jitter, squash):
        d = Decoder(tf, 64, 0)
        assert d.pixels is None
        _, img, _ = d(_sample(0, _jpeg(128, 0)), 0)
        assert img.dtype == torch.float32 and img.shape == (3, 64, 64)
        with pytest.raises(ValueError, match="standard transform"):
            Decoder(tf, 64, 0, decode="gpu")
        with pytest.raises(ValueError, match="draws no box"):
            crop_box(d, (128, 128), 0)


def test_seed_cpu_draws_what_torch_manual_seed_draws():
    """The workers seed only the CPU generator (seed_cpu: torch.manual_seed formats a stack trace
    per call while CUDA is uninitialised); the boxes and every draw after it must not change."""
    from wit.train.data import seed_cpu

    for seed in (0, 1, 2**31 - 1, 2**63 + 5):
        torch.manual_seed(seed)
        expected = (T.RandomResizedCrop.get_params(torch.empty(1, 300, 200), [0.9, 1.0], [0.75, 4 / 3]), torch.rand(3))
        torch.manual_seed(seed + 1)  # another state first: seed_cpu must set it, not inherit it
        seed_cpu(seed)
        got = (T.RandomResizedCrop.get_params(torch.empty(1, 300, 200), [0.9, 1.0], [0.75, 4 / 3]), torch.rand(3))
        assert got[0] == expected[0] and torch.equal(got[1], expected[1])


@pytest.mark.parametrize("px, size, scale", [(256, 224, 1), (256, 64, 2), (520, 64, 4), (1100, 64, 8), (301, 64, 4)])
def test_gpu_path_boxes_equal_the_cpu_paths_and_map_exactly_onto_the_full_image(px, size, scale, monkeypatch):
    # the acceptance test of --decode gpu: the worker reads the JPEG's header only, yet draws the box
    # the CPU path draws for the same seed (on the size the draft decodes to), and the device maps
    # it onto the full image it decodes
    tf = open_clip.image_transform(size, is_train=True)
    cpu, gpu = Decoder(tf, size, 0), Decoder(tf, size, 0, decode="gpu")
    drawn = []
    get_params = T.RandomResizedCrop.get_params
    monkeypatch.setattr(
        T.RandomResizedCrop, "get_params", staticmethod(lambda *a: drawn.append(get_params(*a)) or drawn[-1])
    )
    for i in range(20):
        sample = _sample(i, _jpeg(px, i))
        for draw in (0, 1, "0:3:7"):
            cpu(sample, draw)
            cpu_box = drawn[-1]
            _, enc, _ = gpu(sample, draw)
            assert isinstance(enc, EncodedImage) and enc.scale == scale and enc.data is sample["jpg"]
            assert enc.box == cpu_box  # the same box, drawn on the same (drafted) size
            # on the full image: the same part of the picture, exactly: reduced pixel j is full
            # pixels [j * scale, (j + 1) * scale), the last one cut at the edge (ceil(px / scale) wide)
            top, left, h, w = full_box(enc.box, scale, px, px)
            assert 0 <= top < top + h <= px and 0 <= left < left + w <= px
            back = (
                top // scale,
                left // scale,
                -(-(top + h) // scale) - top // scale,
                -(-(left + w) // scale) - left // scale,
            )
            assert back == enc.box
            assert (top + h == px) == (enc.box[0] + enc.box[2] == -(-px // scale))  # the edge stays the edge


def test_decode_and_crop_on_a_device_matches_the_cpu_path():
    # run on device="cpu": libjpeg-turbo there, nvJPEG on CUDA; at draft scale 1 the decodes are the
    # same pixels, so the crops are equal; at 1/2 and 1/4 the device crops the full image
    for px, size, scale in ((256, 224, 1), (256, 64, 2), (520, 64, 4)):
        for train in (True, False):
            tf = open_clip.image_transform(size, is_train=train)
            cpu, gpu = Decoder(tf, size, 0), Decoder(tf, size, 0, decode="gpu")
            for i in range(6):
                sample = _sample(i, _jpeg(px, 100 + i))
                _, expected, _ = cpu(sample, 0)
                _, enc, _ = gpu(sample, 0)
                full = decode_jpeg(torch.frombuffer(bytearray(enc.data), dtype=torch.uint8), mode=ImageReadMode.RGB)
                box = None if enc.box is None else full_box(enc.box, enc.scale, full.shape[-1], full.shape[-2])
                got = gpu.pixels.apply(full, box)
                diff = (got.float() - expected.float()).abs()
                if scale == 1:
                    assert torch.equal(got, expected)
                else:
                    assert diff.mean() < 4, (px, size, train, diff.mean())  # sharp synthetic edges


def _special_shard(path) -> dict[str, bytes]:
    """A shard whose images each take another path under --decode gpu: baseline RGB JPEGs (the
    device), greyscale / CMYK / progressive JPEGs and a PNG (the worker), a truncated JPEG (header
    fine: the device and then PIL refuse it: recorded) and bytes that are no image (recorded by the worker)."""
    good = [_jpeg(256, i) for i in range(12)]
    special = {
        "k002": _jpeg(256, 50, mode="L"),
        "k004": _jpeg(256, 51, progressive=True),
        "k005": _jpeg(256, 52, mode="CMYK"),
        "k007": _jpeg(256, 53, format="PNG"),
        "k008": good[8][: len(good[8]) * 6 // 10],
        "k010": b"\xff\xd8\xff\xe0 this is not a JPEG",
    }
    images = {f"k{i:03d}": special.get(f"k{i:03d}", g) for i, g in enumerate(good)}
    with wds.TarWriter(str(path)) as sink:
        for key, data in images.items():
            sink.write({"__key__": key, "png" if key == "k007" else "jpg": data, "txt": f"caption {key}"})
    return images


def test_decode_gpu_stream_through_device_batches_on_cpu(tmp_path):
    _special_shard(tmp_path / "000000.tar")
    tf = open_clip.image_transform(64, is_train=True)
    tok = open_clip.get_tokenizer("wit-tiny")
    info = plan_stream(
        str(tmp_path / "000000.tar"), seed=0, rank=0, world_size=1, workers=1, batch_size=5, shuffle=False
    )
    runs = {}
    for mode in ("cpu", "gpu"):
        decoder = Decoder(tf, 64, 0, decode=mode)
        loader = make_loader(BatchStream(info.plan, decoder, tok, 5), 0)
        runs[mode] = [b for _, b in zip(range(3), dev.DeviceBatches(iter(loader), decoder, CPU), strict=False)]
    # the CPU path skips both bad files; the GPU path records the same two, with the same reasons
    # (k010 in the worker, k008 in the trainer; each with the batch after it: the third, in epoch 1)
    skips = {m: sorted(tuple(s) for b in runs[m] for s in b["skipped"]) for m in runs}
    assert skips["cpu"] == skips["gpu"] and len(skips["cpu"]) == 2
    cpu, gpu = runs["cpu"][:2], runs["gpu"][:2]
    reasons = {s[0]: s[2] for s in skips["cpu"]}
    assert set(reasons) == {"k008", "k010"} and all("image does not decode" in r for r in reasons.values())
    assert cpu[0]["uids"] == ["k000", "k001", "k002", "k003", "k004"]
    # the truncated JPEG's place is taken by the batch's first good sample (image, text and uid)
    assert gpu[1]["uids"] == ["k005", "k006", "k007", "k005", "k009"]
    assert torch.equal(gpu[1]["images"][3], gpu[1]["images"][0]) and torch.equal(gpu[1]["texts"][3], gpu[1]["texts"][0])
    by_uid = {u: img for b in cpu for u, img in zip(b["uids"], b["images"], strict=True)}
    std = torch.tensor(Decoder(tf, 64, 0).pixels.std)[:, None, None]
    for b in cpu + gpu:
        assert b["images"].dtype == torch.float32 and b["images"].shape == (5, 3, 64, 64) and b["encoded"] is None
    for u, img in zip(gpu[0]["uids"] + gpu[1]["uids"], torch.cat([gpu[0]["images"], gpu[1]["images"]]), strict=True):
        grey = ((img - by_uid[u]) * std * 255).abs()
        if u in ("k002", "k004", "k005", "k007"):  # decoded by the worker, as on the CPU path
            assert torch.equal(img, by_uid[u]), u
        else:  # decoded at full size and cropped with the scaled box
            assert grey.mean() < 4, (u, grey.mean())


def test_a_batch_whose_images_all_fail_is_an_error():
    tf = open_clip.image_transform(64, is_train=True)
    gpu = Decoder(tf, 64, 0, decode="gpu")
    full = _jpeg(256, 0)
    cut = full[: len(full) // 2]  # its header reads: it goes to the device, which refuses it, as PIL does
    from wit.train.data import batch_images

    images = [gpu(_sample(i, cut), 0)[1] for i in range(2)]
    batch = {**batch_images(images, gpu.pixels), "uids": ["a", "b"], "skipped": [], "texts": torch.zeros(2, 32)}
    with pytest.raises(CorruptSample, match="no image of a batch of 2 decodes"):
        dev.DeviceBatches(iter([batch]), gpu, CPU).prepare(batch)


class _FakeStream:
    def __init__(self, log):
        self.log = log

    def wait_stream(self, other):
        self.log.append(("wait", other))


class _FakeTensor:
    def __init__(self, name, log):
        self.name, self.log = name, log

    def record_stream(self, stream):
        self.log.append(("record", self.name, stream))


def test_device_batches_copy_the_next_batch_on_a_side_stream(monkeypatch):
    # the CUDA mechanics without CUDA: batch n + 1 is issued on the side stream before batch n is
    # handed out; the step's stream waits for the side stream; handed-out tensors are recorded on it
    log: list = []
    side, main = _FakeStream(log), _FakeStream(log)
    monkeypatch.setattr(torch.cuda, "Stream", lambda device: side)
    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: main)

    class Using:
        def __init__(self, stream):
            self.stream = stream

        def __enter__(self):
            log.append(("enter", self.stream))

        def __exit__(self, *exc):
            log.append(("exit", self.stream))

    monkeypatch.setattr(torch.cuda, "stream", Using)

    class Fake(dev.DeviceBatches):
        def prepare(self, batch):
            log.append(("prepare", batch["n"]))
            return {
                **batch,
                "images": _FakeTensor(f"images{batch['n']}", log),
                "texts": _FakeTensor(f"texts{batch['n']}", log),
            }

    batches = Fake(iter([{"n": 0}, {"n": 1}, {"n": 2}]), None, torch.device("cuda"))
    first = next(batches)
    assert first["n"] == 0
    assert log == [
        ("enter", side), ("prepare", 0), ("exit", side),  # the first batch: nothing to overlap with
        ("wait", side), ("record", "images0", main), ("record", "texts0", main),
        ("enter", side), ("prepare", 1), ("exit", side),  # batch 1 issued before batch 0's step
    ]  # fmt: skip
    log.clear()
    assert [b["n"] for b in batches] == [1, 2]
    assert ("prepare", 2) in log and log.index(("prepare", 2)) < log.index(("record", "images2", main))
    with pytest.raises(StopIteration):
        next(batches)


@pytest.mark.parametrize(
    "cores, local, shards, expected",
    [
        (2, 1, None, 1),
        (16, 1, None, 8),
        (96, 8, None, 8),
        (64, 8, None, 7),
        (8, 8, None, 1),
        (32, 2, 3, 3),
        (32, 1, 0, 1),
    ],
)
def test_default_workers(cores, local, shards, expected):
    assert default_workers(local, cores=cores, shards=shards) == expected


def test_decode_gpu_without_cuda_is_a_clear_error(tiny_dataset, tmp_path):
    from wit.train.config import TrainConfig
    from wit.train.loop import train

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    with pytest.raises(ValueError, match="--decode gpu decodes JPEGs with CUDA"):
        train(TrainConfig(steps=1, decode="gpu", device="cpu"), tiny_dataset.url, str(tmp_path / "x"))
    with pytest.raises(ValueError, match="decode must be one of"):
        TrainConfig(decode="tpu")


def _set_tf32(matmul: bool, cudnn: bool) -> None:
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = matmul, cudnn


def test_cuda_settings_tf32_fused_adamw_and_ddp(request, tmp_path):
    import torch.distributed as dist

    from wit.train import optim
    from wit.train.config import TrainConfig
    from wit.train.distributed import DistEnv
    from wit.train.loop import _device_settings, _wrap_ddp

    was = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    request.addfinalizer(lambda: _set_tf32(*was))
    torch.backends.cuda.matmul.allow_tf32 = False
    cuda = DistEnv(device=torch.device("cuda", 0), world_size=2, backend="nccl")
    got = _device_settings(TrainConfig(), cuda)
    assert got["tf32"] and got["fused_adamw"] and torch.backends.cuda.matmul.allow_tf32
    assert got["ddp"] == {"gradient_as_bucket_view": True, "broadcast_buffers": False, "allreduce": "fp32"}
    torch.backends.cuda.matmul.allow_tf32 = False
    assert (
        not _device_settings(TrainConfig(precision="bf16"), cuda)["tf32"] and not torch.backends.cuda.matmul.allow_tf32
    )
    cpu = _device_settings(TrainConfig(ddp_bf16_allreduce=True), DistEnv(world_size=2, backend="gloo"))
    assert not cpu["tf32"] and cpu["fused_adamw"] and cpu["ddp"]["allreduce"] == "bf16"  # fused on CPU too
    assert not _device_settings(TrainConfig(), DistEnv(device=torch.device("mps")))["fused_adamw"]

    # a fused optimizer's state resumed by an unfused one (a GPU run's checkpoint on CPU) runs unfused
    model = torch.nn.Linear(4, 3)
    saved = optim.make_optimizer(model, 1e-3, 0.1, (0.9, 0.98), 1e-6, fused=True)
    assert saved.param_groups[0]["fused"] is True
    resumed = optim.make_optimizer(model, 1e-3, 0.1, (0.9, 0.98), 1e-6)
    resumed.load_state_dict(saved.state_dict())
    optim.set_fused(resumed, False)
    assert all(g["fused"] is None for g in resumed.param_groups)

    # DDP's options and the bf16 all-reduce hook, on a one-process gloo group
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'pg'}", rank=0, world_size=1)
    try:
        ddp = _wrap_ddp(model, DistEnv(world_size=2, backend="gloo"), bf16_allreduce=True)
        assert ddp.gradient_as_bucket_view and not getattr(ddp, "forward_sync_buffers", ddp.broadcast_buffers)
        ddp(torch.randn(8, 4)).square().sum().backward()
        grad = model.weight.grad
        assert torch.equal(grad, grad.bfloat16().float())  # all-reduced in bf16
    finally:
        dist.destroy_process_group()


def test_the_new_flags_reach_the_config(monkeypatch, tmp_path):
    from click.testing import CliRunner

    import wit.train.loop
    from wit.pipeline.cli import cli

    got = {}
    monkeypatch.setattr(wit.train.loop, "train", lambda config, *a, **k: got.update(config=config))
    args = ["train", "ds", "-o", str(tmp_path / "o")]
    assert CliRunner().invoke(cli, args).exit_code == 0
    assert (got["config"].workers, got["config"].decode, got["config"].ddp_bf16_allreduce) == (None, "cpu", False)
    result = CliRunner().invoke(cli, [*args, "--decode", "gpu", "--ddp-bf16-allreduce", "--workers", "3", "--compile"])
    assert result.exit_code == 0, result.output
    c = got["config"]
    assert (c.workers, c.decode, c.ddp_bf16_allreduce, c.compile) == (3, "gpu", True, True)
    result = CliRunner().invoke(cli, [*args, "--decode", "tpu"])
    assert result.exit_code == 2 and "'tpu' is not one of 'cpu', 'gpu'" in result.output


@pytest.mark.slow
def test_compile_trains_like_eager(tiny_dataset, tmp_path):
    import math
    import shutil

    from wit.manifests.runrecord import read_run_record
    from wit.train.config import TrainConfig
    from wit.train.loop import train

    if not any(shutil.which(c) for c in ("c++", "g++", "clang++")):
        pytest.skip("torch.compile's CPU backend (inductor) needs a C++ compiler, and there is none")
    opts = dict(batch_size=8, steps=2, lr=1e-3, workers=0, shuffle=False, log_every=1)
    compiled = train(TrainConfig(compile=True, **opts), tiny_dataset.url, str(tmp_path / "compiled"))
    eager = train(TrainConfig(**opts), tiny_dataset.url, str(tmp_path / "eager"))
    assert math.isfinite(compiled.loss) and compiled.loss == pytest.approx(eager.loss, abs=1e-3)
    settings = read_run_record(str(tmp_path / "compiled")).extra["device_settings"]
    assert settings["compile"] and settings["workers"] == 0 and settings["images"].startswith("uint8")


@pytest.mark.parametrize("cores, local, workers, threads", [(2, 1, 0, 2), (2, 1, 1, 2), (2, 1, 2, 1), (16, 2, 3, 6)])
def test_cpu_threads_leave_a_core_per_extra_worker(monkeypatch, request, cores, local, workers, threads):
    from wit.train import distributed, loop
    from wit.train.distributed import DistEnv

    request.addfinalizer(lambda n=torch.get_num_threads(): torch.set_num_threads(n))
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(distributed, "cpu_cores", lambda: cores)
    monkeypatch.setattr(distributed, "local_world_size", lambda env: local)
    loop._cpu_threads(DistEnv(), workers)
    assert torch.get_num_threads() == threads
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # the user's choice stands
    loop._cpu_threads(DistEnv(), 0)
    assert torch.get_num_threads() == threads
