"""`wit train` and `wit eval`: options → frozen config → one library call."""

from __future__ import annotations

import dataclasses

import click

from wit.pipeline.clikit import StageCommand, domain_errors, given_options, heavy_imports, output_option


def _grad_clip(ctx, param, value: str | None) -> float | str | None:
    """``--grad-clip 0.5``, or ``none`` (no clipping: a YAML file's ``grad_clip: null``)."""
    if value is None:
        return None
    if value.strip().lower() in ("none", "off"):
        return NO_CLIP
    try:
        return float(value)
    except ValueError:
        raise click.BadParameter(f"{value!r} is neither a number nor 'none'") from None


def _weights(ctx, param, value: str | None) -> tuple[float, ...] | None:
    """``--weights 0.7,0.3``: one per source of an A::B dataset."""
    if value is None:
        return None
    try:
        return tuple(float(w) for w in value.split(",") if w.strip())
    except ValueError:
        raise click.BadParameter(f"{value!r}: give numbers separated by commas, e.g. 0.7,0.3") from None


NO_CLIP = "none"  # --grad-clip none: stands for None, which click cannot tell from "not given"


@click.command(cls=StageCommand, stage="train")
@click.argument("dataset", metavar="DATASET")
@output_option
@click.option(
    "--grad-clip",
    metavar="NORM|none",
    callback=_grad_clip,
    help="Max global gradient norm; none: no clipping.  [default: 1.0]",
)
@click.option(
    "--weights",
    metavar="W1,W2,...",
    callback=_weights,
    help="Sampling weights of the sources of an A::B dataset (implies --resampled).",
)
@click.option("--config", "config_url", metavar="YAML", help="Options as a YAML file (the flags given win).")
@domain_errors
def train(dataset, out, grad_clip, weights, config_url, options):
    """Train a CLIP model on a dataset's shards; torchrun for several processes or machines.

    DATASET is a `wit shard` folder, a brace pattern or a list of tar URLs (A::B mixes datasets).
    Checkpoints go to OUT/checkpoints (open_clip loads them with pretrained=); metrics to
    OUT/metrics.parquet; OUT/_run.json links the model to its dataset's lineage.

    --pretrained starts from weights (a fresh optimizer and step 0); once this run has a checkpoint,
    --resume auto continues it instead. --lock-image / --lock-text freeze a tower (LiT).
    --eval-every N --eval-suite S evaluates zero-shot every N steps into OUT/metrics.parquet.
    --decode gpu decodes JPEGs on the GPU (nvJPEG), with the crop boxes the CPU workers would draw.

    \b
    Example:
        wit train out/dataset -o out/train --model wit-tiny --batch-size 64 --steps 300
        wit train out/dataset -o out/ft --model wit-tiny --pretrained out/train/checkpoints/step-00000300.pt \\
            --lr 1e-4 --steps 100 --resume auto --eval-every 50 --eval-suite synthetic-colour
        wit train out/dataset -o out/lit --model ViT-B-32 --pretrained laion2b_s34b_b79k --lock-image
        wit train out/web::out/books -o out/mix --weights 0.7,0.3 --shuffle-buffer 2000 \\
            --grad-clip none --log-every 50
        torchrun --nproc_per_node 8 -m wit.pipeline.cli train s3://bucket/dataset \\
            -o s3://bucket/runs/b32 --model ViT-B-32 --batch-size 256 --precision bf16 --resume auto
    """
    with heavy_imports():
        from wit.train.config import TrainConfig
        from wit.train.loop import train as run_training

    given = given_options(options)  # with --config, a flag's default must not override the file
    if weights is not None:
        given["weights"] = weights
    config = TrainConfig.from_yaml(config_url, **given) if config_url else TrainConfig.from_options(given)
    if grad_clip is not None:  # after the file's: "none" is None, which the overrides would skip
        config = dataclasses.replace(config, grad_clip=None if grad_clip == NO_CLIP else grad_clip)
    callback = None
    if config.eval_every and config.eval_suite:
        callback = _training_eval(config)
    elif "eval_every" in given and not config.eval_suite:
        raise click.UsageError("--eval-every needs --eval-suite (a built-in suite such as synthetic-colour, or a YAML)")
    result = run_training(config, dataset, out, eval_callback=callback)
    if result is not None and getattr(result, "checkpoint", None):
        click.echo(f"train: {result.step} steps, final loss {result.loss:.4f} → {result.checkpoint}")


def _training_eval(config):
    """The zero-shot evaluation the trainer runs every ``eval_every`` steps: the evaluation package
    handed to the loop as its callback (train/ never imports evaluate/). The suite is loaded here,
    so an unknown one fails before training starts."""
    with heavy_imports():
        from wit.evaluate.run import TrainingEval
        from wit.evaluate.tasks import DATA_ROOT, suite_of
        from wit.train.models import resolve_model

    suite = suite_of(config.eval_suite, "train")
    mirrored = [t.name for t in suite.tasks if DATA_ROOT in t.dataset]
    if mirrored:
        raise click.UsageError(
            f"--eval-suite {suite.name}: its tasks read --data-root ({', '.join(mirrored[:3])}...), which training "
            "evaluation does not take; give a suite of built-in tasks or a YAML whose datasets are URLs"
        )
    return TrainingEval(suite, resolve_model(config.model).name)


def train_stage(config, inputs, out: str, progress: bool = True):
    """The train stage of `wit run`: ``inputs[0]`` is the dataset; with ``eval_every`` and
    ``eval_suite`` set, the trainer evaluates zero-shot as `wit train --eval-every` does.
    ``progress`` changes nothing: the loop logs every ``log_every`` steps either way."""
    with heavy_imports():
        from wit.train.loop import train as run_training

    callback = _training_eval(config) if config.eval_every and config.eval_suite else None
    return run_training(config, inputs[0].url, out, eval_callback=callback)


class _DefaultToRun(click.Group):
    """A group whose default subcommand is ``run``: ``wit eval CKPT -o OUT`` = ``wit eval run CKPT -o OUT``."""

    def parse_args(self, ctx, args):
        if args and args[0] not in self.commands and args[0] not in ("-h", "--help"):
            args = ["run", *args]
        return super().parse_args(ctx, args)


@click.group(name="eval", cls=_DefaultToRun)
def eval_():
    """Zero-shot benchmark of a checkpoint on a task suite, with intervals and a report.

    `wit eval CHECKPOINT -o OUT` runs a suite (the `run` subcommand is implied);
    `wit eval prepare SUITE -o URL` mirrors a suite's datasets (CLIP_benchmark's layout) once;
    `wit eval compare OUT1 OUT2 ...` prints results side by side;
    `wit eval export NAME -o URL` writes a built-in dataset in CLIP_benchmark's layout.

    \b
    Example:
        wit eval out/train/checkpoints/step-00000500.pt -o out/eval --suite default
        wit eval prepare clip-paper -o s3://bucket/clip-bench
        wit eval out/b32.pt -o out/eval-paper --suite clip-paper --data-root s3://bucket/clip-bench
        wit eval compare out/eval-a out/eval-b
        wit eval export digits -o out/wds_digits
    """


@eval_.command(name="run", cls=StageCommand, stage="eval")
@click.argument("checkpoint", metavar="[CHECKPOINT]", required=False)
@output_option
@domain_errors
def eval_run(checkpoint, out, options):
    """Evaluate CHECKPOINT (a wit checkpoint, or an open_clip file with --model), or published
    weights (--model NAME --pretrained TAG | hf-hub:ORG/REPO | FILE), on a suite.

    Writes a results manifest (one row per task and metric, with its 95% interval and n),
    results.json in CLIP_benchmark's shape, report.md and a self-contained report.html.

    \b
    Example:
        wit eval out/train/checkpoints/step-00000500.pt -o out/eval --suite default
        wit eval ViT-B-32.pt --model ViT-B-32 -o out/eval-b32 --suite digits --device cuda
        wit eval --model ViT-B-32 --pretrained laion2b_s34b_b79k -o out/eval-laion \\
            --suite clip-paper --data-root s3://bucket/clip-bench --device cuda
    """
    with heavy_imports():
        import pyarrow as pa

        from wit.evaluate.run import EvalStageConfig, evaluate

        # pyarrow imports pandas on its first array (to ask whether the input is a pandas object):
        # 0.3 s that belongs with the imports, not in the middle of the first task.
        pa.array([])

    stage = EvalStageConfig.from_options(options, out)
    result = evaluate(checkpoint or "", out, stage.load_suite(), stage.config)
    _print_results(result)


HEADLINE = ("acc1", "text_retrieval_recall@1", "image_retrieval_recall@1", "fewshot_k16_acc1")


def _print_results(result) -> None:
    """One line per task and headline metric (every metric is in the results manifest)."""
    rows = [r for r in result.rows if r["metric"] in HEADLINE] or result.rows
    width = max(len(r["task"]) for r in rows)
    click.echo(f"{'task':<{width}}  {'metric':<26} {'value':>7}  95% interval        n")
    for r in rows:
        lo, hi = r.get("ci_low"), r.get("ci_high")
        ci = f"[{lo:.3f}, {hi:.3f}]" if lo is not None and hi is not None else ""
        click.echo(f"{r['task']:<{width}}  {r['metric']:<26} {r['value']:>7.3f}  {ci:<18} {r.get('n') or ''}")
    if not result.reused:
        click.echo(
            f"{result.seconds:.2f} s after start-up: {result.images_encoded} images encoded "
            f"({result.images_encoded / max(result.seconds, 1e-9):.0f}/s), {result.images_cached} from the cache"
        )
    click.echo(f"report: {result.report_html}")


@eval_.command(name="prepare")
@click.argument("suite", metavar="SUITE")
@output_option
@click.option(
    "--from",
    "source",
    default="hf://datasets/clip-benchmark",
    show_default=True,
    metavar="URL",
    help="Where the datasets are now: a root holding wds_<name>/ folders in CLIP_benchmark's layout.",
)
@domain_errors
def eval_prepare(suite, out, source):
    """Mirror the datasets SUITE reads from --data-root to OUT (local, s3://, any fsspec URL), with
    MIRROR.json listing every file's sha256; a dataset the source lacks is listed and skipped.

    \b
    Example:
        wit eval prepare clip-paper -o s3://bucket/clip-bench
        wit eval prepare my-suite.yaml -o /data/mirror --from /data/clip_benchmark_wds
        wit eval CKPT -o out/eval --suite clip-paper --data-root s3://bucket/clip-bench
    """
    from wit.evaluate.mirror import MIRROR_FILE, prepare
    from wit.evaluate.tasks import load_suite

    mirror = prepare(load_suite(suite), out, source)
    total = sum(f["bytes"] for f in mirror.files.values())
    click.echo(f"prepare: {len(mirror.files)} files ({total / 1e6:.1f} MB) → {out}; manifest {out}/{MIRROR_FILE}")
    for name, why in mirror.missing.items():
        click.echo(f"prepare: {name}: {why}")


@eval_.command(name="compare")
@click.argument("results", nargs=-1, required=True, metavar="RESULTS...")
@click.option("--all-metrics", is_flag=True, help="Every metric, not only each task's main one.")
@domain_errors
def eval_compare(results, all_metrics):
    """Print two or more evaluation outputs side by side: per task its main metric (or every
    metric) with 95% intervals, then the suites' summary lines.

    \b
    Example:
        wit eval compare out/eval-step500 out/eval-step1000
        wit eval compare out/eval-a out/eval-b --all-metrics
    """
    from wit.evaluate.report import compare_table

    click.echo(compare_table(list(results), all_metrics=all_metrics))


@eval_.command(name="export")
@click.argument("name", metavar="NAME")
@output_option
@click.option("--samples-per-shard", type=click.IntRange(min=1), default=1000, show_default=True)
@click.option("--split", "splits", multiple=True, default=("test", "train"), show_default=True)
@domain_errors
def eval_export(name, out, samples_per_shard, splits):
    """Write a built-in dataset (digits, synthetic-shape, ...) in CLIP_benchmark's wds layout.

    \b
    Example:
        wit eval export digits -o out/wds_digits
        clip_benchmark eval --dataset wds/digits --dataset_root out/wds_digits ...
    """
    from wit.evaluate.datasets import export

    written = export(name, out, samples_per_shard=samples_per_shard, splits=tuple(splits))
    for split, n in written.items():
        click.echo(f"{split}: {n} samples → {out}/{split}")


COMMANDS = [train, eval_]
