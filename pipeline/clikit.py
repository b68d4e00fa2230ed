"""What every `wit` command shares: error mapping, options made from option specs, common options,
and the end-of-stage summary.

A stage's options are written once, as plain-data specs on its config class
(:class:`wit.manifests.options.Option`); :func:`click_option` turns one into a click option (type,
range, choices, default, help) and :class:`StageCommand` gives a command the options of a registered
stage's config class.
"""

from __future__ import annotations

import contextlib
import functools
import gc
import os
from typing import Any

import click
from click.core import ParameterSource

from wit.manifests.manifest import ManifestError
from wit.manifests.options import Option
from wit.manifests.runrecord import read_run_record
from wit.manifests.stage import StageError
from wit.manifests.storage import StorageError
from wit.pipeline import registry
from wit.pipeline.driver import EXECUTOR, RAY_ADDRESS, WORKERS
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


# ------------------------------------------------------------------------------------------------
# options made from option specs


class SpecOption(click.Option):
    """A click option made from an option spec, which it keeps (``spec``)."""

    def __init__(self, param_decls: Any, spec: Option, **kwargs: Any):
        super().__init__(param_decls, **kwargs)
        self.spec = spec


def spec_option(spec: Option, unset_default: bool = False, help: str | None = None) -> SpecOption:
    """The click option of ``spec``: its type and range, choices, default (shown) and help.

    ``unset_default``: the option defaults to None, so that a command can tell a value given on the
    command line from the default (`wit run --executor`: unset means the pipeline file's).
    """
    decls, spec, kwargs = _option_args(spec, unset_default, help)
    return SpecOption(decls, spec, **kwargs)


def click_option(spec: Option, unset_default: bool = False, help: str | None = None):
    """:func:`spec_option` as a decorator, like ``click.option``."""
    decls, spec, kwargs = _option_args(spec, unset_default, help)
    return click.option(*decls, cls=SpecOption, spec=spec, **kwargs)


def _option_args(spec: Option, unset_default: bool, help: str | None) -> tuple[list[str], Option, dict[str, Any]]:
    kwargs: dict[str, Any] = {"help": spec.help if help is None else help, "metavar": spec.metavar}
    default = spec.default
    if spec.kind == "bool":
        kwargs["is_flag"] = True
    elif spec.is_list and spec.kind != "strs":
        kwargs.update(multiple=True, type=str)
        default = tuple(default or ())
    elif spec.kind == "strs":
        kwargs["type"] = str
        default = ",".join(default) if default is not None else None  # the command line's form: en,de
    else:
        kwargs["type"] = _click_type(spec)
    if unset_default:
        default = None
    kwargs["default"] = default
    # a default worth showing: not unset, not an empty list, not a flag's off
    kwargs["show_default"] = not (default is None or default is False or default in ((), ""))
    return [f"--{spec.name}", spec.key], spec, kwargs


def _click_type(spec: Option) -> Any:
    if spec.choices:
        return click.Choice(spec.choices)
    if spec.kind in ("int", "float"):
        if spec.low is None and spec.high is None:
            return int if spec.kind == "int" else float
        bounds = {"min": spec.low, "max": spec.high, "min_open": spec.low_open}
        return click.IntRange(**bounds) if spec.kind == "int" else click.FloatRange(**bounds)
    return str


class StageCommand(click.Command):
    """The command of a registered stage: the options of its config class come from the class's
    option specs, placed after the arguments and --out, and reach the callback as one ``options``
    dict (option key → value) for ``from_options``.

    They are made when the command is parsed or its help is shown, not when the CLI is imported:
    that imports the stage's module (for eval, torch), which `wit --help` and `wit manifest` should
    not pay for.
    """

    def __init__(self, *args: Any, stage: str, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.stage = stage
        self._config_params: list[SpecOption] | None = None

    def config_params(self) -> list[SpecOption]:
        if self._config_params is None:
            with heavy_imports():
                specs = registry.get(self.stage).options()
            self._config_params = [spec_option(o) for o in specs]
        return self._config_params

    def get_params(self, ctx: click.Context) -> list[click.Parameter]:
        params = super().get_params(ctx)
        at = next(
            (k for k, p in enumerate(params) if not (isinstance(p, click.Argument) or p.name == "out")), len(params)
        )
        return params[:at] + self.config_params() + params[at:]

    def invoke(self, ctx: click.Context) -> Any:
        ctx.params["options"] = {p.name: ctx.params.pop(p.name) for p in self.config_params()}
        return super().invoke(ctx)


def given_options(options: dict[str, Any]) -> dict[str, Any]:
    """The options of a :class:`StageCommand` that were given, not defaulted: for a command whose
    other source of values (`wit train --config YAML`) must win over the defaults."""
    ctx = click.get_current_context()
    return {k: v for k, v in options.items() if ctx.get_parameter_source(k) is not ParameterSource.DEFAULT}


# ------------------------------------------------------------------------------------------------
# common options


def output_option(fn):
    return click.option("-o", "--out", "out", required=True, metavar="URL", help="Output folder (path or URL).")(fn)


def executor_options(fn):
    """--workers, --part, --executor, --ray-address: how the executor runs a stage's partitions.

    They reach the callback as one ``scheduling`` dict, the keyword arguments of
    :func:`wit.pipeline.driver.run`.
    """

    @functools.wraps(fn)
    def wrapper(*args, workers, part, executor, ray_address, **kwargs):
        scheduling = {"workers": workers, "part": part, "executor": executor, "ray_address": ray_address}
        return fn(*args, scheduling=scheduling, **kwargs)

    wrapper = cluster_options(wrapper, unset_default=False)
    wrapper = click.option(
        "--part",
        metavar="i/N",
        default=None,
        callback=_parse_part,
        help="Run only slice i of N (0 <= i < N), e.g. $SLURM_ARRAY_TASK_ID/$N in a job array.",
    )(wrapper)
    return click_option(WORKERS)(wrapper)


def cluster_options(fn, unset_default: bool = True):
    """--executor and --ray-address. ``unset_default`` (`wit run`, `wit demo`): unset, they leave the
    pipeline file's ``executor:`` and ``ray-address:`` keys in force."""
    if unset_default:
        fn = click_option(
            RAY_ADDRESS,
            unset_default=True,
            help="The Ray cluster of --executor ray (default: the pipeline's ray-address, else the "
            "RAY_ADDRESS environment variable; with neither, a local Ray instance).",
        )(fn)
        return click_option(
            EXECUTOR,
            unset_default=True,
            help=f"{EXECUTOR.help} Default: the pipeline's executor key, else {EXECUTOR.default}.",
        )(fn)
    return click_option(EXECUTOR)(click_option(RAY_ADDRESS)(fn))


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
