"""`wit run` (a pipeline file, skipping finished stages) and `wit demo` (the whole thing, locally)."""

from __future__ import annotations

import json

import click

from wit.pipeline import registry
from wit.pipeline.clikit import cluster_options, domain_errors, output_option
from wit.pipeline.driver import EXECUTOR, RAY_ADDRESS


class StageName(click.ParamType):
    """A registered stage's name, checked against the registry when parsed (a plugin's stage too)."""

    name = "stage"

    def get_metavar(self, param, ctx=None):
        return f"[{'|'.join(registry.names())}]"

    def convert(self, value, param, ctx):
        if value not in registry.names():
            self.fail(f"{value!r} is not a stage; stages: {', '.join(registry.names())}", param, ctx)
        return value


def _cluster_overrides(executor: str | None, ray_address: str | None) -> tuple[str, ...]:
    """--executor and --ray-address as the pipeline's top-level overrides (they win over its keys)."""
    given = ((EXECUTOR, executor), (RAY_ADDRESS, ray_address))
    # quoted, so that YAML typing keeps the value a string (host:6379 is no sexagesimal number)
    return tuple(f"{spec.name}={json.dumps(value)}" for spec, value in given if value is not None)


@click.command()
@click.argument("pipeline_yaml", metavar="PIPELINE.yaml")
@click.option("--from", "from_stage", type=StageName(), help="Start at this stage.")
@click.option("--until", "until_stage", type=StageName(), help="Stop after this stage.")
@click.option("--set", "overrides", multiple=True, metavar="STAGE.KEY=VALUE", help="Override an option (repeatable).")
@click.option("--dry-run", is_flag=True, help="Print what would run and why, and run nothing.")
@cluster_options
@domain_errors
def run(pipeline_yaml, from_stage, until_stage, overrides, dry_run, executor, ray_address):
    """Run every stage of a pipeline file in order, skipping finished ones.

    A stage is skipped when its output's _run.json has the same resolved config and the same input
    digests; when an upstream stage changes, everything after it runs again. A failing stage stops
    the run; running again resumes there.

    \b
    Example:
        wit run pipeline.yaml --dry-run
        wit run pipeline.yaml --set curate.per-query-cap=5000 --until shard
        RAY_ADDRESS=HEAD:6379 wit run pipeline.yaml --executor ray
    """
    from wit.pipeline.runner import PipelineConfig, run_pipeline

    overrides = (*overrides, *_cluster_overrides(executor, ray_address))
    config = PipelineConfig.from_yaml(pipeline_yaml, overrides=overrides)
    run_pipeline(config, from_stage=from_stage, until_stage=until_stage, dry_run=dry_run, echo=click.echo)


@click.command()
@output_option
@click.option("--root", metavar="URL", help="Where the stages write (default: OUT), e.g. s3://bucket/demo.")
@click.option("--pages", type=click.IntRange(min=10), default=None, help="Pages of the synthetic web.")
@click.option("--steps", type=click.IntRange(min=1), default=None, help="Training steps (shorter demo).")
@click.option(
    "--seed",
    type=click.IntRange(min=0, max=999_999),
    default=0,
    show_default=True,
    help="Seed of the synthetic web and of training (the evaluation's held-out seeds never change).",
)
@click.option("--set", "overrides", multiple=True, metavar="STAGE.KEY=VALUE", help="Override a demo option.")
@cluster_options
@domain_errors
def demo(out, root, pages, steps, seed, overrides, executor, ray_address):
    """The whole pipeline on a generated web served on 127.0.0.1, then a score table and a report.

    Generates the synthetic web under OUT/web, serves it, runs extract → ... → eval with the demo
    config that ships with wit, prints the zero-shot scores with their intervals and the path of
    the HTML report. Runs again skip what is finished.

    \b
    Example:
        wit demo -o demo-out
        wit demo -o demo-seed1 --seed 1
        AWS_ENDPOINT_URL=http://127.0.0.1:9000 wit demo -o demo-out --root s3://bucket/demo
    """
    from wit.pipeline.demo import DEMO_PAGES, run_demo

    overrides = (*overrides, *_cluster_overrides(executor, ray_address))
    run_demo(out, root=root, pages=pages or DEMO_PAGES, steps=steps, seed=seed, overrides=overrides, echo=click.echo)


COMMANDS = [run, demo]
