"""What every `wit` command shares: error mapping, common options, and the end-of-stage summary."""

from __future__ import annotations

import contextlib
import functools
import gc
import os

import click

from wit.manifests.manifest import ManifestError
from wit.manifests.runrecord import read_run_record
from wit.manifests.stage import StageError
from wit.manifests.storage import StorageError
from wit.pipeline.executor import PartSpec, StageOutcome

# OSError covers what escapes from the local filesystem (permission, disk full) as a one-liner too
DOMAIN_ERRORS = (ManifestError, StorageError, StageError, ValueError, OSError)


def domain_errors(fn):
    """Turn library errors into a clear one-line message (exit 1) instead of a traceback.

    ``WIT_DEBUG=1`` lets the traceback through.
    """

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except DOMAIN_ERRORS as exc:
            if os.environ.get("WIT_DEBUG"):
                raise
            raise click.ClickException(str(exc).splitlines()[0] if str(exc) else type(exc).__name__) from exc

    return wrapper


@contextlib.contextmanager
def heavy_imports():
    """Import torch, open_clip and the like with the cyclic garbage collector paused, then freeze.

    They make ~400k objects that live as long as the process. The collector's full passes over
    them while they are being made cost about a second on 2 cores, and every later full pass
    would walk them again; ``gc.freeze`` moves what exists now out of its sight for good.
    """
    gc.disable()
    try:
        yield
    finally:
        gc.freeze()
        gc.enable()


def output_option(fn):
    return click.option("-o", "--out", "out", required=True, metavar="URL", help="Output folder (path or URL).")(fn)


def executor_options(fn):
    fn = click.option(
        "--part",
        metavar="i/N",
        default=None,
        callback=_parse_part,
        help="Run only slice i of N (0 <= i < N), e.g. $SLURM_ARRAY_TASK_ID/$N in a job array.",
    )(fn)
    fn = click.option("--workers", type=click.IntRange(min=1), default=1, show_default=True, help="Local processes.")(
        fn
    )
    return fn


def _parse_part(ctx, param, value: str | None) -> PartSpec:
    try:
        return PartSpec.parse(value)
    except ValueError as exc:
        raise click.BadParameter(str(exc)) from exc


def finish(name: str, outcome: StageOutcome) -> None:
    """Say what a stage did: where its output is and its counts, or which slices remain."""
    if not outcome.done:
        click.echo(
            f"{name}: this slice is done ({outcome.ran} partitions run, {outcome.skipped} already done); "
            f"{outcome.remaining} of {outcome.total} partitions wait for other slices"
        )
        return
    rec = read_run_record(outcome.ref.url)
    verb = "already finished" if outcome.ran == 0 else f"ran {outcome.ran} of {outcome.total} partitions"
    click.echo(f"{name}: {verb}; {rec.rows} rows → {outcome.ref.url}")
    click.echo(f"  digest {outcome.ref.digest}")
    for reason, n in sorted(rec.counts.items(), key=lambda kv: (-kv[1], kv[0])):
        click.echo(f"  {reason:<28} {n:>10}")
