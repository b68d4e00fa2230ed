"""The training loop: ``train(config, dataset_url, out_url) -> TrainResult``. Read it top to bottom.

    OUT/checkpoints/step-00000100.pt   every save_every steps and at the end, the last `keep` kept
    OUT/checkpoints/step-00000100.pt.json   its sha256 and size, written once the .pt is committed
    OUT/checkpoint_index/part-00000.parquet   name, step, sha256 of each kept checkpoint (the digest)
    OUT/metrics.parquet                step, loss, lr, logit_scale, samples/s, data wait, MFU; eval/... columns
    OUT/skipped.parquet                uid, shard, reason of every sample the stream skipped
    OUT/_run.json                      written last: inputs (the dataset), files, counts, shards/epoch

The model and loss come from open_clip, the stream from ``data.py``; this file only wires them:
resume, the step (with the feature-cache gradient accumulation), logging, checkpoints, the record.
"""

from __future__ import annotations

import contextlib
import dataclasses
import inspect
import math
import os
import random
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field

import open_clip
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from torch.nn.parallel import DistributedDataParallel as DDP

from wit.manifests import storage
from wit.manifests.manifest import FileInfo, ManifestError, ManifestRef, digest_of, write_part
from wit.manifests.runrecord import build_run_record, finished_ref, now, write_run_record
from wit.manifests.schemas import with_kind

from . import distributed, optim, pretrained
from . import loss as losses
from . import metrics as mx
from .checkpoint import (
    FORMAT,
    SIDECAR,
    CheckpointError,
    CheckpointWriter,
    checkpoint_digest,
    load_checkpoint,
    serialize_checkpoint,
)
from .config import TrainConfig
from .data import (
    BatchStream,
    Decoder,
    Position,
    StreamState,
    carry_over,
    default_workers,
    make_loader,
    plan_stream,
    resolve_sources,
)
from .device import DeviceBatches
from .models import ModelSpec, image_transform, lock_towers, register, resolve_model, set_preprocess

CHECKPOINTS = "checkpoints"
# Settings that fix the order of samples: a run resumes exactly only when they are unchanged.
# (The worker count and the world size may change: the rest of the epoch is split again.)
STREAM_KEYS = (
    "batch_size",
    "seed",
    "shuffle",
    "shuffle_buffer",
    "resampled",
    "weights",
    "grad_accum",
    "augment",
)
# Settings that decide which parameters train (and so what the optimizer state holds)
LOCK_KEYS = (
    "lock_image",
    "lock_image_unlocked_groups",
    "lock_image_freeze_bn_stats",
    "lock_text",
    "lock_text_unlocked_layers",
)
CHECKPOINT_INDEX = with_kind(
    pa.schema([("name", pa.string()), ("step", pa.int64()), ("sha256", pa.string()), ("bytes", pa.int64())]),
    "checkpoints",
)

# eval_callback(model, step) -> {metric: value}: called on rank 0 with the bare model in eval mode
EvalCallback = Callable[[torch.nn.Module, int], "dict[str, float] | None"]


@dataclass(slots=True)
class TrainResult:
    out: str
    checkpoint: str  # URL of the final checkpoint
    step: int
    loss: float | None  # mean over ranks at the last step
    samples_seen: int  # all ranks
    skipped: int  # corrupt samples and unreadable tar tails
    resumed_from: str | None
    elapsed_s: float
    evals: list[dict] = field(default_factory=list)


def train(
    config: TrainConfig, dataset_url: str, out_url: str, eval_callback: EvalCallback | None = None
) -> TrainResult:
    """Train on ``dataset_url`` (a dataset folder, brace pattern, ``A::B``, or a list of shard URLs)
    into ``out_url``. Run it under ``torchrun`` for DDP; every rank calls it the same way."""
    env = distributed.init(config.device)
    try:
        return _train(config, dataset_url, storage.normalize(out_url), eval_callback, env)
    finally:
        distributed.shutdown(env)


def _train(cfg: TrainConfig, dataset_url, out: str, eval_callback, env: distributed.DistEnv) -> TrainResult:
    started, t_start = now(), time.perf_counter()

    if cfg.decode == "gpu" and env.device.type != "cuda":
        raise ValueError(f"--decode gpu decodes JPEGs with CUDA (nvJPEG), and this run is on {env.device.type}")
    settings = _device_settings(cfg, env)  # TF32, fused AdamW, DDP's options: into the log and the record
    spec = _model_spec(cfg)
    # ---- resume or start: rank 0 chooses the checkpoint to resume (every rank loads that one, or
    # every rank stops, below). A checkpoint of this run wins over --pretrained: a preempted
    # fine-tune run again with the same command continues instead of starting over ----
    chosen: dict = {}
    resumed_from = distributed.on_main(env, lambda: _choose_resume(cfg.resume, out, chosen))
    # ---- model: the same seed on every rank gives the same initial weights (DDP checks them) ----
    torch.manual_seed(cfg.seed)
    random.seed(cfg.seed)
    start: dict | None = None  # the pretrained weights the run started from (a resume: its checkpoint's)
    if cfg.pretrained and resumed_from is None:
        built: dict = {}

        def load_pretrained() -> pretrained.Pretrained:  # rank 0 resolves it (a download, if any, once)
            got, built["model"] = pretrained.load(cfg.pretrained, spec, resolve_model(cfg.model).name, env.device)
            mx.log(f"starting from pretrained {got.kind} {got.source} ({got.file}, sha256 {got.sha256[:12]}...)")
            return got

        source = distributed.on_main(env, load_pretrained)
        model = built["model"] if "model" in built else pretrained.build(spec, source, env.device)
        start = source.to_dict()
    else:
        if cfg.pretrained and env.is_main:
            mx.log(f"not loading pretrained {cfg.pretrained}: resuming {resumed_from}, a checkpoint of this run")
        model = pretrained.build(spec, None, env.device)
    # LiT: the locked towers' parameters stop needing gradients before the optimizer is made of the rest
    locked = lock_towers(
        model,
        cfg.lock_image,
        cfg.lock_image_unlocked_groups,
        cfg.lock_image_freeze_bn_stats,
        cfg.lock_text,
        cfg.lock_text_unlocked_layers,
    )
    if locked and env.is_main:
        mx.log(
            f"locked {locked['frozen_parameters']:,} parameters ({len(locked['frozen'])} tensors); "
            f"{locked['trainable_parameters']:,} train"
        )
    # then a seed per rank (open_clip's random_seed(seed, rank)): dropout and patch dropout differ by rank
    _seed_rank(cfg.seed, env.rank)
    if cfg.grad_checkpointing:
        model.set_grad_checkpointing(True)
    tokenizer = open_clip.get_tokenizer(spec.name)

    # ---- data: rank 0 resolves the shards (listing, shard index) once, every rank gets them; then
    # every rank checks in O(shards) that each worker can fill a batch, before any worker starts ----
    sources = distributed.on_main(env, lambda: resolve_sources(dataset_url))
    # --workers, or this rank's share of the node's cores (data.default_workers), never more than
    # the shards each rank reads
    workers = cfg.workers
    if workers is None:
        shards = None if cfg.resampled or cfg.weights else sum(len(s.shards) for s in sources) // env.world_size
        workers = default_workers(distributed.local_world_size(env), shards=shards)
    settings["workers"] = workers
    _cpu_threads(env, workers)
    info = plan_stream(
        None,
        sources=sources,
        seed=cfg.seed,
        rank=env.rank,
        world_size=env.world_size,
        workers=workers,
        batch_size=cfg.batch_size,
        shuffle=cfg.shuffle,
        buffer=cfg.shuffle_buffer,
        resampled=cfg.resampled,
        weights=cfg.weights,
    )
    per_step = cfg.batch_size * cfg.grad_accum * env.world_size  # samples per optimiser step, all ranks
    total_steps = _total_steps(cfg, info.steps_per_epoch)

    fused = settings["fused_adamw"]
    optimizer = optim.make_optimizer(model, cfg.lr, cfg.weight_decay, (cfg.beta1, cfg.beta2), cfg.eps, fused=fused)
    # fp16 needs loss scaling (its range is small); bf16 has fp32's range and does not
    scaler = torch.amp.GradScaler("cuda", enabled=cfg.precision == "amp" and env.device.type == "cuda")

    # ---- resume: every rank loads the checkpoint rank 0 chose (or every rank stops) ----
    step, samples_seen, plan, state, tallies = 0, 0, info.plan, StreamState.start(info.plan.workers), _Tallies()
    log = mx.MetricsLog(out, tensorboard=env.is_main)
    if resumed_from is not None:
        ckpt, error = chosen.get("ckpt"), None
        try:
            ckpt = ckpt if ckpt is not None else load_checkpoint(resumed_from)
            _check_resumable(ckpt, cfg, info.digest, resumed_from)
        except (CheckpointError, ValueError) as exc:
            error = str(exc)
        distributed.agree(env, error, CheckpointError)
        model.load_state_dict(ckpt["state_dict"])
        optimizer.load_state_dict(ckpt["optimizer"])
        optim.set_fused(optimizer, fused)  # the saved groups carry the saving run's kernel choice
        if isinstance(ckpt["wit"].get("preprocess"), dict):  # a pretrained tag's mean and std, ...
            set_preprocess(model, ckpt["wit"]["preprocess"])
        start = ckpt["wit"].get("pretrained")
        if ckpt.get("scaler"):
            scaler.load_state_dict(ckpt["scaler"])
        step = int(ckpt["wit"]["step"])
        plan, state, tallies, total_steps, samples_seen, note = _resume_stream(
            ckpt, cfg, info, env, per_step, total_steps
        )

        def resume_log() -> None:
            nonlocal log
            log = mx.MetricsLog.resume(out, step)
            mx.log(f"resumed from {resumed_from} at step {step}{note}")

        distributed.on_main(env, resume_log)
        del ckpt, chosen

    def save() -> str:
        stream = {
            "world_size": env.world_size,
            "workers": plan.workers,
            "carry": plan.carry,
            "generation": plan.generation,
            "total_steps": total_steps,
            "samples_seen": samples_seen,
        }
        return _save(
            out,
            step,
            raw,
            optimizer,
            scaler,
            cfg,
            spec,
            info.digest,
            state,
            tallies,
            env,
            dataset_url,
            writer,
            stream,
            start,
        )

    # the model's own preprocessing (a pretrained tag's, a resumed run's), augmented for training or not
    transform = image_transform(model, is_train=cfg.augment)
    pp = model.visual.preprocess_cfg

    # ---- wrap: DDP averages gradients across ranks during backward; compile last ----
    raw = model
    if env.distributed:
        model = _wrap_ddp(model, env, cfg.ddp_bf16_allreduce)
    if cfg.compile:
        model = torch.compile(model)
    loss_fn = losses.make_loss(cfg.loss, env.rank, env.world_size)
    autocast = _autocast(cfg.precision, env.device)

    size = pp["size"][0] if isinstance(pp["size"], (tuple, list)) else pp["size"]  # an int for ResNets
    decoder = Decoder(transform, size, cfg.seed, decode=cfg.decode)
    stream = BatchStream(plan, decoder, tokenizer, cfg.batch_size, state)
    loader = make_loader(stream, workers, pin_memory=env.device.type == "cuda")
    # on the device, normalised there; on CUDA the next batch's copy runs beside this step (device.py)
    batches = DeviceBatches(iter(loader), decoder, env.device)
    settings["images"] = "uint8, normalised on the device" if decoder.pixels else "float, normalised by the workers"
    flops = mx.flops_per_sample(raw, spec.config)
    peak = mx.peak_flops(env.device, cfg.precision)
    timer = mx.Timer()
    last_loss: float | None = None
    evals: list[dict] = []
    ckpt_url = ""
    writer = CheckpointWriter()  # rank 0 uploads checkpoints on a background thread
    model.train()
    if env.is_main:
        mx.log(
            f"training {spec.name} on {info.samples or '?'} samples/epoch, {total_steps} steps of "
            f"{per_step} samples, {env.world_size} rank(s) x {workers} worker(s), {cfg.precision}"
        )
        mx.log("settings: " + ", ".join(f"{k} {v}" for k, v in settings.items()))

    while step < total_steps:
        # -- data. Waiting here means the workers cannot keep up: that time is the data-wait share.
        t0 = time.perf_counter()
        micro = [next(batches) for _ in range(cfg.grad_accum)]
        timer.waited(time.perf_counter() - t0)
        for b in micro:
            state.advance(b)  # the position after this batch: what a checkpoint saves
            tallies.add(b)
        images = [b["images"] for b in micro]  # on the device, normalised (DeviceBatches)
        texts = [b["texts"] for b in micro]

        # -- one optimiser step on the whole contrastive batch
        optim.set_lr(
            optimizer,
            optim.lr_at(_schedule_step(step, samples_seen, per_step, total_steps), cfg.lr, cfg.warmup, total_steps),
        )
        loss = _step(model, raw, loss_fn, optimizer, scaler, images, texts, cfg, autocast, env)
        step += 1
        samples_seen += per_step
        timer.samples += per_step

        evaluating = bool(eval_callback and cfg.eval_every and step % cfg.eval_every == 0)
        # -- log. .item() waits for the device to finish: only on logging steps, never every step.
        # An evaluation step is logged too: its zero-shot values join that step's row.
        if step % cfg.log_every == 0 or step == total_steps or evaluating:
            last_loss = float(distributed.mean(env, loss).item())
            span, wait, samples = timer.lap()
            rate = samples / span if span > 0 else 0.0
            m = mx.StepMetrics(
                step=step,
                epoch=state.epoch,
                loss=last_loss,
                lr=optimizer.param_groups[0]["lr"],
                logit_scale=float(raw.logit_scale.exp().item()),
                samples_per_s=rate,
                samples_per_s_per_device=rate / env.world_size,
                data_wait_frac=wait / span if span > 0 else 0.0,
                mfu=(rate / env.world_size * flops / peak) if peak else None,
                samples_seen=samples_seen,
                elapsed_s=time.perf_counter() - t_start,
            )
            if env.is_main:
                log.add(m)
                mx.log(m.line())
                # every log interval, not only at checkpoints: a resume keeps the rows up to its
                # checkpoint's step, and every row up to a save step was written at a log step before it
                log.write(strict=False)

        # -- checkpoint (every rank takes part: positions and RNG states are gathered to rank 0)
        if cfg.save_every and step % cfg.save_every == 0 and step < total_steps:
            ckpt_url = save()

        # -- optional zero-shot evaluation, handed in by the caller (train/ never imports evaluate/)
        if evaluating:

            def evaluate(step: int = step) -> dict:
                raw.eval()
                with torch.no_grad(), autocast():
                    result = eval_callback(raw, step) or {}
                raw.train()
                mx.log(f"eval at step {step}: {result}")
                # the numbers go into this step's row of metrics.parquet (eval/NAME) and TensorBoard
                if log.add_eval(step, result):
                    log.write(strict=False)
                return result

            # on rank 0; the others wait for its result (or its error) rather than run ahead
            evals.append({"step": step, **distributed.on_main(env, evaluate)})

    # ---- the end: final checkpoint, metrics, skipped samples, and the run record last ----
    del batches, loader  # stops the workers
    final = _checkpoint_url(out, step)
    if ckpt_url != final and not (resumed_from == final):
        ckpt_url = save()
    all_tallies = distributed.gather_objects(env, tallies.to_dict())

    def finish() -> None:
        log.write()
        log.close()
        writer.wait()  # the checkpoints are committed (or their upload's error raised) before the record
        _write_record(
            out,
            cfg,
            spec,
            dataset_url,
            info,
            _Tallies.merge(all_tallies),
            step,
            samples_seen,
            last_loss,
            evals,
            resumed_from,
            started,
            env,
            optim.decay_summary(raw),
            start,
            locked,
            settings,
        )

    # rank 0's work; an error there (an upload, the record) is raised on every rank, never a wait
    distributed.on_main(env, finish)
    skipped = len(_Tallies.merge(all_tallies).skipped)
    return TrainResult(
        out=out,
        checkpoint=final,
        step=step,
        loss=last_loss,
        samples_seen=samples_seen,
        skipped=skipped,
        resumed_from=resumed_from,
        elapsed_s=time.perf_counter() - t_start,
        evals=evals,
    )


# -------------------------------------------------------------------------------------------------
# the step


def _step(model, raw, loss_fn, optimizer, scaler, images, texts, cfg: TrainConfig, autocast, env) -> torch.Tensor:
    optimizer.zero_grad(set_to_none=True)
    loss = _backward(model, loss_fn, images, texts, autocast, env, scaler)
    if cfg.grad_clip is not None:
        scaler.unscale_(optimizer)  # clip the true gradients, not the scaled ones
        torch.nn.utils.clip_grad_norm_(raw.parameters(), cfg.grad_clip)
    scaler.step(optimizer)
    scaler.update()
    # The temperature is learnable; unbounded, it grows until the softmax saturates (CLIP paper: clip at 100)
    losses.clamp_logit_scale(raw)
    return loss


def _backward(model, loss_fn, images, texts, autocast, env, scaler) -> torch.Tensor:
    """Accumulate into ``.grad`` the (scaled) gradient of the loss of the whole contrastive batch,
    ``images`` and ``texts`` being its micro-batches; returns that loss, detached.

    The forward passes run under ``autocast``; the loss runs in fp32 outside it (``_fp32_loss``)."""
    if len(images) == 1:
        with autocast():
            out = model(images[0], texts[0])
        loss = _fp32_loss(loss_fn, out)
        scaler.scale(loss).backward()
        return loss.detach()
    # Gradient accumulation that keeps the contrastive batch whole (open_clip's feature cache):
    # 1) features of every micro-batch without grad; 2) recompute each micro-batch with grad and
    # score it against the cached features of all the others. Each backward gives that
    # micro-batch's share of the full-batch loss's gradient; their sum is the full gradient.
    # logit_scale and logit_bias are not per micro-batch: every micro-batch's loss is the full-batch
    # loss in them, so only one (the last) carries their gradient, else it is counted grad_accum times.
    with torch.no_grad(), autocast():
        cache = [model(i, t) for i, t in zip(images, texts, strict=True)]
    last = len(images) - 1
    for j, (i, t) in enumerate(zip(images, texts, strict=True)):
        # DDP: all-reduce the gradients once, after the last micro-batch
        sync = contextlib.nullcontext() if j == last or not env.distributed else model.no_sync()
        with sync:
            with autocast():
                out = model(i, t)
            feats = {
                k: torch.cat([out[k] if n == j else c[k] for n, c in enumerate(cache)])
                for k in ("image_features", "text_features")
            }
            for k in ("logit_scale", "logit_bias"):
                if out.get(k) is not None:
                    feats[k] = out[k] if j == last else out[k].detach()
            loss = _fp32_loss(loss_fn, feats)
            scaler.scale(loss).backward()
    return loss.detach()


def _fp32_loss(loss_fn, out: dict) -> torch.Tensor:
    """The contrastive loss of a forward pass's outputs, cast to fp32 and computed with autocast off:
    the logits' softmax / sigmoid over the whole batch is where bf16's and fp16's precision hurts."""
    keys = ("image_features", "text_features", "logit_scale", "logit_bias")
    args = {k: out[k].float() for k in keys if out.get(k) is not None}
    with torch.autocast(device_type=args["image_features"].device.type, enabled=False):
        return losses.contrastive_loss(loss_fn, args)


def _cpu_threads(env, workers: int) -> None:
    """On CPU, the rank's model threads: its share of the cores, less one for each data worker
    after the first. One worker shares the cores with the model: wit's workers are light (uint8
    crops, JPEG draft decoding; about a fifth of a core at wit-tiny's step rate), and on 2 cores
    with 1 worker 2 model threads train 1.2-1.5x faster than 1 (`bench/bench_train.py`). More
    threads than that make OpenMP's threads wait on each other (10x slower steps on a busy
    machine). ``OMP_NUM_THREADS`` overrides this."""
    if env.device.type != "cpu" or "OMP_NUM_THREADS" in os.environ:
        return
    per_rank = max(1, distributed.cpu_cores() // distributed.local_world_size(env))
    torch.set_num_threads(max(1, per_rank - max(0, workers - 1)))


def _wrap_ddp(model: torch.nn.Module, env: distributed.DistEnv, bf16_allreduce: bool) -> DDP:
    """DDP with gradients as views into its all-reduce buckets (no copy into and out of them each
    step) and no broadcast of rank 0's buffers before every forward (a collective per step, for
    nothing: the only buffers training changes are BatchNorm statistics, which a train-mode forward
    does not read, and checkpoints hold rank 0's). ``bf16_allreduce``: gradients are all-reduced in
    bf16 (DDP's ``bf16_compress_hook``): half the bytes between nodes, the sum in bf16's 8 bits."""
    # newer torch (2.14) calls it forward_sync_buffers, and deprecates broadcast_buffers
    newer = "forward_sync_buffers" in inspect.signature(DDP.__init__).parameters
    ddp = DDP(
        model,
        device_ids=[env.device.index] if env.device.type == "cuda" else None,
        gradient_as_bucket_view=True,
        **({"forward_sync_buffers": False} if newer else {"broadcast_buffers": False}),
    )
    if bf16_allreduce:
        from torch.distributed.algorithms.ddp_comm_hooks import default_hooks

        ddp.register_comm_hook(None, default_hooks.bf16_compress_hook)
    return ddp


def _device_settings(cfg: TrainConfig, env: distributed.DistEnv) -> dict:
    """Set what makes a step fast on CUDA, and say what was set (for the log and the run record).

    - fp32 on CUDA: matrix products and convolutions in TF32 (tensor cores, 10-bit mantissa inputs,
      fp32 accumulation), as open_clip_train does; bf16 / amp runs compute in 16 bits anyway.
    - AdamW's fused kernel on CUDA (one launch for every parameter) and on CPU (one pass over each
      tensor instead of a dozen elementwise ops: 2.4x faster than the default single-tensor loop,
      which open_clip_train runs on CPU); the default elsewhere.
    - DDP: gradients as bucket views, no buffer broadcast, optionally bf16 all-reduce."""
    cuda = env.device.type == "cuda"
    tf32 = cuda and cfg.precision == "fp32"
    if tf32:
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    settings: dict = {
        "device": str(env.device),
        "tf32": tf32,
        "fused_adamw": env.device.type in ("cuda", "cpu"),
        "decode": cfg.decode,
        "compile": cfg.compile,
    }
    if env.distributed:
        settings["ddp"] = {
            "gradient_as_bucket_view": True,
            "broadcast_buffers": False,
            "allreduce": "bf16" if cfg.ddp_bf16_allreduce else "fp32",
        }
    return settings


def _autocast(precision: str, device: torch.device):
    if precision == "fp32":
        return contextlib.nullcontext
    # amp on CPU has no GradScaler and no fast fp16: it runs as bf16 autocast
    dtype = torch.float16 if precision == "amp" and device.type == "cuda" else torch.bfloat16
    return lambda: torch.autocast(device_type=device.type, dtype=dtype)


def _model_spec(cfg: TrainConfig) -> ModelSpec:
    spec = resolve_model(cfg.model)
    if cfg.loss == "siglip" and "init_logit_bias" not in spec.config:
        # SigLIP learns a logit bias; the config that creates it goes into the checkpoint under its own name
        config = {
            **spec.config,
            "init_logit_bias": losses.SIGLIP_INIT_LOGIT_BIAS,
            "init_logit_scale": losses.SIGLIP_INIT_LOGIT_SCALE,
        }
        spec = ModelSpec(
            name=f"{spec.name}-sigmoid", config=config
        )  # not "-siglip": open_clip would fetch the SigLIP tokenizer
        register(spec.name, config)
    return spec


def _total_steps(cfg: TrainConfig, steps_per_epoch: int | None) -> int:
    if cfg.steps is not None:
        return cfg.steps
    if steps_per_epoch is None:
        raise ValueError("the shard sizes are unknown (no shard index or sizes.json): give steps, not epochs")
    return max(1, math.floor((cfg.epochs or 1.0) * steps_per_epoch / cfg.grad_accum))


# -------------------------------------------------------------------------------------------------
# what each rank tracks beyond the stream position: skipped samples and shards read per epoch


@dataclass(slots=True)
class _Tallies:
    skipped: list[list[str]] = field(default_factory=list)  # [uid, shard, reason]
    shards: dict[str, list[str]] = field(default_factory=dict)  # epoch -> shards opened

    def add(self, batch: dict) -> None:
        self.skipped.extend([str(x) for x in s] for s in batch["skipped"])
        opened = self.shards.setdefault(str(batch["epoch"]), [])
        if batch["opened"]:  # a batch opens a shard now and then: the set is built only then
            have = set(opened)
            opened.extend(u for u in dict.fromkeys(batch["opened"]) if u not in have)

    def to_dict(self) -> dict:
        return {
            "skipped": [list(s) for s in self.skipped],
            "shards": {k: list(v) for k, v in self.shards.items()},
        }

    @classmethod
    def from_dict(cls, d: dict) -> _Tallies:
        return cls(skipped=[list(s) for s in d["skipped"]], shards={k: list(v) for k, v in d["shards"].items()})

    @classmethod
    def merge(cls, parts: list[dict]) -> _Tallies:
        out = cls()
        seen = set()
        for p in parts:
            for s in p["skipped"]:
                if tuple(s) not in seen:  # an unreadable tar tail is found again after a resume
                    seen.add(tuple(s))
                    out.skipped.append(list(s))
            for epoch, urls in p["shards"].items():
                have = out.shards.setdefault(epoch, [])
                known = set(have)
                have.extend(u for u in dict.fromkeys(urls) if u not in known)
        return out


# -------------------------------------------------------------------------------------------------
# checkpoints


def _checkpoint_url(out: str, step: int) -> str:
    return storage.join(out, CHECKPOINTS, f"step-{step:08d}.pt")


def _rng_state(device: torch.device) -> dict:
    version, internal, gauss = random.getstate()
    state = {"torch": torch.get_rng_state(), "python": [version, list(internal), gauss]}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def _set_rng(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def _save(
    out, step, raw, optimizer, scaler, cfg, spec, digest, state, tallies, env, dataset_url, writer, stream, start
) -> str:
    """Gather every rank's position, RNG and tallies. Rank 0 serialises the checkpoint here (a
    snapshot of this step) and hands its upload, then the pruning of old ones, to ``writer``'s
    background thread. No barrier: the other ranks train on meanwhile; a resume only sees committed
    files (and their sidecars), and the run record waits for the upload."""
    ranks = distributed.gather_objects(
        env, {"stream": state.to_dict(), "rng": _rng_state(env.device), "tallies": tallies.to_dict()}
    )
    url = _checkpoint_url(out, step)

    def commit() -> None:
        payload = {
            "state_dict": raw.state_dict(),
            "wit": {
                "format": FORMAT,
                "model": spec.name,
                "model_config": spec.config,
                "step": step,
                "config": cfg.to_dict(),
                "dataset": _dataset_str(dataset_url),
                "dataset_digest": digest,
                "world_size": env.world_size,
                "samples_seen": stream["samples_seen"],
                # the preprocessing the model was trained with (a pretrained tag's mean and std):
                # load_model and a resume give it back to the model
                "preprocess": dict(raw.visual.preprocess_cfg),
                "pretrained": start,  # where the run's starting weights came from, or None
            },
            # the layout the positions below belong to, the carried-over items of the epochs that
            # are not over for every worker, the step budget and the samples seen so far
            "stream": {
                **stream,
                "carry": {
                    str(e): [list(x) for x in items]
                    for e, items in stream["carry"].items()
                    if e >= min(p["epoch"] for r in ranks for p in r["stream"]["positions"])
                },
            },
            "optimizer": optimizer.state_dict(),
            "scaler": scaler.state_dict(),
            "ranks": ranks,  # per rank: stream position, RNG states, skipped samples, shards read
        }
        data, sha256 = serialize_checkpoint(payload)
        del payload
        # waits for the previous upload first (and raises its error): one upload in flight at most
        writer.submit(url, data, sha256, then=lambda: _prune(out, cfg.keep))

    # on rank 0; its error (serialising, or the previous upload's, raised by submit) reaches every rank
    distributed.on_main(env, commit)
    return url


def _is_checkpoint(name: str) -> bool:
    return name.startswith("step-") and name.endswith(".pt")


def _list_checkpoints(out: str) -> list[str]:
    """The checkpoint files (``step-N.pt``, not their sidecars), oldest first."""
    folder = storage.join(out, CHECKPOINTS)
    names = [n for n in storage.listdir(folder) if _is_checkpoint(n)]
    return [storage.join(folder, n) for n in sorted(names)]


def _prune(out: str, keep: int) -> None:
    """Remove all but the newest ``keep`` checkpoints, each one's sidecar first (a sidecar implies
    its checkpoint), and any sidecar whose checkpoint is gone."""
    folder = storage.join(out, CHECKPOINTS)
    names = set(storage.listdir(folder))
    checkpoints = sorted(n for n in names if _is_checkpoint(n))
    for name in checkpoints[:-keep]:
        if name + SIDECAR in names:
            storage.remove(storage.join(folder, name + SIDECAR))
        storage.remove(storage.join(folder, name))
    for name in sorted(names):
        if name.endswith(SIDECAR) and _is_checkpoint(name[: -len(SIDECAR)]) and name[: -len(SIDECAR)] not in names:
            storage.remove(storage.join(folder, name))


def _choose_resume(resume: str | None, out: str, chosen: dict) -> str | None:
    """Rank 0's choice of the checkpoint every rank resumes from. ``auto``: the newest checkpoint in
    OUT/checkpoints that loads (a newer unreadable one is passed over with a message); a URL: that
    checkpoint, which must load; None: a fresh start. The loaded checkpoint is left in ``chosen``."""
    if resume is None:
        return None
    if resume != "auto":
        chosen["ckpt"] = load_checkpoint(resume)
        return resume
    for url in reversed(_list_checkpoints(out)):
        try:
            chosen["ckpt"] = load_checkpoint(url)
            return url
        except CheckpointError as exc:
            mx.log(f"skipping unreadable checkpoint: {exc}")
    return None


def _check_resumable(ckpt: dict, cfg: TrainConfig, digest: str | None, url: str) -> None:
    wit = ckpt.get("wit") or {}
    if "ranks" not in ckpt or "optimizer" not in ckpt:
        raise CheckpointError(f"{url}: holds weights only, no training state to resume from")
    if "stream" not in ckpt:
        raise CheckpointError(f"{url}: written by an older wit, whose stream position cannot be resumed")
    was = wit.get("config", {})
    now_ = cfg.to_dict()
    changed = [k for k in STREAM_KEYS if was.get(k) != now_.get(k)]
    if changed:
        detail = ", ".join(f"{k} {was.get(k)!r} -> {now_.get(k)!r}" for k in changed)
        raise ValueError(f"cannot resume {url} exactly: {detail}")
    if wit.get("dataset_digest") != digest:
        raise ValueError(f"{url} was trained on dataset {wit.get('dataset_digest')}, this one is {digest}")
    # the optimizer holds the trainable parameters only: the same towers must be locked
    defaults = {f.name: f.default for f in dataclasses.fields(TrainConfig)}  # a checkpoint from before them
    changed = [k for k in LOCK_KEYS if was.get(k, defaults[k]) != now_.get(k)]
    if changed:
        detail = ", ".join(f"{k} {was.get(k)!r} -> {now_.get(k)!r}" for k in changed)
        raise ValueError(f"cannot resume {url}: it locked other parameters ({detail}); give the same --lock-* options")


def _resume_stream(ckpt: dict, cfg: TrainConfig, info, env, per_step: int, total_steps: int):
    """This rank's stream plan, position, tallies and RNG from a checkpoint, and the step budget.

    The same layout (world size, workers per rank): exactly where each worker stood; the step
    budget is the config's (``total_steps``, as a fresh run computes it: a changed ``epochs``
    counts). Another layout: the items the old workers had not read in the epochs in progress are
    split over the new ones (``data.carry_over``); the tallies of every old rank go to rank 0; the
    RNGs are seeded afresh by (seed, rank, step). With ``epochs`` (not ``steps``) the samples left
    to train stay what they were, so the step count is rescaled to the new samples per step."""
    stream = ckpt["stream"]
    step = int(ckpt["wit"]["step"])
    carry = {int(e): tuple((int(i), int(o)) for i, o in items) for e, items in stream["carry"].items()}
    generation = int(stream["generation"])
    samples_seen = int(stream["samples_seen"])
    if stream["world_size"] == env.world_size and stream["workers"] == info.plan.workers:
        mine = ckpt["ranks"][env.rank]
        _set_rng(mine["rng"])
        plan = dataclasses.replace(info.plan, carry=carry, generation=generation)
        state, tallies = StreamState.from_dict(mine["stream"]), _Tallies.from_dict(mine["tallies"])
        if cfg.steps is None and ckpt["wit"]["config"].get("epochs") == cfg.epochs:
            total_steps = int(stream["total_steps"])  # the same, unless an elastic resume rescaled it
        return plan, state, tallies, total_steps, samples_seen, ""
    old = dataclasses.replace(
        info.plan,
        rank=0,
        world_size=int(stream["world_size"]),
        workers=int(stream["workers"]),
        carry=carry,
        generation=generation,
    )
    positions = [Position.from_dict(p) for r in ckpt["ranks"] for p in r["stream"]["positions"]]
    new_carry = {} if old.resampled else carry_over(old, positions)
    plan = dataclasses.replace(info.plan, carry=new_carry, generation=generation + 1)
    state = StreamState.start(plan.workers, min(new_carry) if new_carry else 0)
    tallies = _Tallies.merge([r["tallies"] for r in ckpt["ranks"]]) if env.is_main else _Tallies()
    _seed_rank(cfg.seed, env.rank, step)
    if cfg.steps is None:
        was = ckpt["wit"]["config"]
        old_total = int(stream["total_steps"])
        if was.get("steps") is None and was.get("epochs") != cfg.epochs:  # more (or fewer) epochs asked
            old_total = step + round((old_total - step) * (cfg.epochs or 1.0) / (was.get("epochs") or 1.0))
        old_per_step = cfg.batch_size * cfg.grad_accum * int(stream["world_size"])
        total_steps = step + math.ceil(max(0, old_total - step) * old_per_step / per_step)
    items = sum(len(v) for v in new_carry.values())
    note = (
        f" with another layout ({stream['world_size']} rank(s) x {stream['workers']} worker(s) -> "
        f"{env.world_size} x {plan.workers}): {items} unread shard(s) or shard tail(s) split again"
    )
    return plan, state, tallies, total_steps, samples_seen, note


def _schedule_step(step: int, samples_seen: int, per_step: int, total_steps: int) -> float:
    """Where the learning-rate schedule stands: ``step``, unless a resume on another world size
    changed the samples per step; then the share of the samples trained (``samples_seen`` of those
    plus the steps left), so the schedule goes on from where it was instead of jumping."""
    if samples_seen == step * per_step:
        return step
    return total_steps * samples_seen / (samples_seen + (total_steps - step) * per_step)


def _seed_rank(seed: int, rank: int, step: int = 0) -> None:
    """Seed this rank's own randomness (dropout, patch dropout): ``seed + rank`` as open_clip does,
    and mixed with the step when a resume cannot restore the saved generator states."""
    value = seed + rank if step == 0 else hash((seed, rank, step)) & 0x7FFF_FFFF
    torch.manual_seed(value)
    random.seed(value)


def _dataset_str(dataset_url) -> str:
    return dataset_url if isinstance(dataset_url, str) else ",".join(map(str, dataset_url))


# -------------------------------------------------------------------------------------------------
# the run record


def _output_files(out: str, tallies: _Tallies) -> tuple[dict[str, FileInfo], int]:
    """Write ``skipped.parquet`` (when a sample was skipped) and the checkpoint index; return every
    file the record lists (kept checkpoints and sidecars, the index, metrics, skipped) and the
    number of kept checkpoints."""
    if tallies.skipped:
        table = pa.table({k: [s[i] for s in tallies.skipped] for i, k in enumerate(("uid", "shard", "reason"))})
        buf = pa.BufferOutputStream()
        pq.write_table(table, buf)
        storage.write_bytes(storage.join(out, "skipped.parquet"), buf.getvalue().to_pybytes())
    files: dict[str, FileInfo] = {}
    index_rows = []
    for url in _list_checkpoints(out):
        # the digest from the sidecar written with the checkpoint: kept checkpoints are not read back
        d = checkpoint_digest(url)
        name = f"{CHECKPOINTS}/{storage.basename(url)}"
        files[name] = FileInfo(name=name, sha256=d.sha256, bytes=d.bytes)
        files[name + SIDECAR] = FileInfo(name=name + SIDECAR, sha256=d.sidecar_sha256, bytes=d.sidecar_bytes)
        index_rows.append({"name": name, "step": int(name[-11:-3]), "sha256": d.sha256, "bytes": d.bytes})
    # the digest covers this index, and the index every kept checkpoint's sha256 (as a dataset's shard index)
    part = write_part(
        out,
        0,
        pa.Table.from_pylist(index_rows, schema=CHECKPOINT_INDEX),
        CHECKPOINT_INDEX,
        "checkpoint_index",
    )
    files[part.name] = part
    for name in ("metrics.parquet", "skipped.parquet"):
        url = storage.join(out, name)
        if storage.exists(url):
            files[name] = FileInfo(name=name, sha256=storage.sha256_url(url), bytes=storage.size(url))
    return files, len(index_rows)


def _record_inputs(info) -> list[ManifestRef]:
    """The run's inputs: each wit dataset as its finished output (lineage goes on through it), other
    shard sets as shard URLs."""
    inputs = []
    for src in info.sources:
        if src.is_wit_dataset:
            try:
                inputs.append(finished_ref(src.url))
            except ManifestError:
                inputs.append(ManifestRef(url=src.url, digest=src.digest))
        else:
            inputs.append(ManifestRef(url=src.url, kind="shards"))
    return inputs


def _write_record(
    out,
    cfg,
    spec,
    dataset_url,
    info,
    tallies: _Tallies,
    step,
    samples_seen,
    last_loss,
    evals,
    resumed_from,
    started,
    env,
    decay: dict,
    start: dict | None,
    locked: dict | None,
    settings: dict,
) -> None:
    files, n_checkpoints = _output_files(out, tallies)
    inputs = _record_inputs(info)
    reasons = Counter(_skip_kind(s[2]) for s in tallies.skipped)
    record = build_run_record(
        stage="train",
        config={
            **cfg.to_dict(),
            "model_resolved": spec.name,
            "world_size": env.world_size,
            "workers_resolved": settings["workers"],
        },
        inputs=inputs,
        output=ManifestRef(url=out, kind="checkpoint", digest=digest_of({n: f.sha256 for n, f in files.items()})),
        files=files,
        rows=samples_seen,
        counts=dict(reasons),
        partitions=n_checkpoints,
        started=started,
        extra={
            "checkpoint": f"{CHECKPOINTS}/step-{step:08d}.pt",
            "steps": step,
            "final_loss": last_loss,
            "dataset": _dataset_str(dataset_url),
            "dataset_digest": info.digest,
            "shards_per_epoch": {e: len(u) for e, u in sorted(tallies.shards.items(), key=lambda kv: int(kv[0]))},
            "skipped": tallies.skipped[:1000],
            "resumed_from": resumed_from,
            # the weights the run started from: source, kind, file, sha256 (see train/pretrained.py)
            "pretrained": start,
            # LiT: the towers locked and the parameters that did not train
            "locked": locked,
            "evals": evals,
            # how this run used its device: TF32, fused AdamW, DDP's options, data workers, decode
            "device_settings": settings,
            # what open_clip_train would do differently by default: train/README.md
            "optimizer": {
                "weight_decay": cfg.weight_decay,
                "decay_rule": decay["rule"],
                "decayed": decay["decayed"],
                "not_decayed": decay["not_decayed"],
                "grad_clip": cfg.grad_clip,
                "precision": cfg.precision,
                "open_clip_train_defaults": "the same decay rule; grad clip none; precision amp; warm-up 10000",
            },
        },
    )
    write_run_record(out, record)


def _skip_kind(reason: str) -> str:
    for prefix, kind in (
        ("unreadable tar", "unreadable_tar"),
        ("unreadable shard", "unreadable_shard"),
        ("duplicate member", "duplicate_member"),
    ):
        if reason.startswith(prefix):
            return kind
    return "corrupt_sample"
