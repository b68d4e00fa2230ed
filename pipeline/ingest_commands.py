"""`wit extract`, `wit curate`, `wit download`, `wit filter`, `wit shard`: options → frozen config → one
stage run through the library driver.

Each command's stage options are its config class's option specs (:class:`StageCommand`), built
into the config by the class's ``from_options``, exactly as `wit run` builds a pipeline section.
"""

from __future__ import annotations

from dataclasses import replace

import click

from wit.pipeline import driver, registry
from wit.pipeline.clikit import StageCommand, domain_errors, executor_options, finish, output_option


def _run(stage: str, options: dict, inputs: list, out: str, scheduling: dict) -> None:
    """Build the stage's config from its options (``out`` is where it writes) and run it."""
    config = registry.get(stage).build_config(options, out)
    finish(stage, driver.run(stage, config, inputs, out, **scheduling))


@click.command(cls=StageCommand, stage="extract")
@click.argument("sources", nargs=-1, required=True, metavar="SOURCE...")
@output_option
@executor_options
@domain_errors
def extract(sources, out, options, scheduling):
    """Extract (image URL, text) candidates from WARC, WAT or HTML files or folders.

    One partition per source file. Every <img> becomes a candidate row, its URL made absolute
    against the page and <base href>; skipped images and pages are counted by reason in _run.json.

    \b
    Example:
        wit extract crawl/ -o out/candidates --workers 2 --languages en,de,fr,es
        wit extract 's3://bucket/segment/*.warc.gz' -o s3://bucket/candidates --part 0/8
        wit extract saved/ -o out/candidates --page-urls saved/urls.csv
    """
    _run("extract", options, list(sources), out, scheduling)


@click.command(cls=StageCommand, stage="curate")
@click.argument("candidates", metavar="CANDIDATES")
@output_option
@executor_options
@domain_errors
def curate(candidates, out, options, scheduling):
    """Clean, filter and balance candidates to at most N pairs per query (WIT / MetaCLIP).

    Every candidate row stays in the output with keep and reason. _run.json holds the query list's
    digest, the cap, the seed and the pairs per query before and after balancing.

    \b
    Example:
        wit curate out/candidates -o out/curated --queries queries.txt --per-query-cap 20000
    """
    _run("curate", options, [candidates], out, scheduling)


@click.command(cls=StageCommand, stage="download")
@click.argument("curated", metavar="CURATED")
@output_option
@click.option(
    "--retry-failed",
    is_flag=True,
    help="CURATED is a finished download: re-fetch its transient failures into OUT (a new folder).",
)
@executor_options
@domain_errors
def download(curated, out, retry_failed, options, scheduling):
    """Download the kept pairs into WebDataset shards (img2dataset underneath) and a ledger.

    Every kept pair gets a ledger row: status, error class (http_404, timeout, robots_noai,
    decode, too_large, private_host, ...), http status, sha256, sizes, shard and key (= uid).
    X-Robots-Tag noai/noimageai opt-outs are honoured; hosts are interleaved across shards.

    \b
    Example:
        wit download out/curated -o s3://bucket/downloaded --workers 4 --threads 64
        wit download s3://bucket/downloaded -o s3://bucket/downloaded-retry --retry-failed
    """
    if not retry_failed:
        _run("download", options, [curated], out, scheduling)
        return
    # the retry pass is the download stage with other phases, reading a finished download
    spec = registry.get("download")
    retry = replace(spec, name="download --retry-failed", input=spec.name, phases="wit.ingest.download:RETRY_PHASES")
    config = spec.build_config(options, out)
    finish(retry.name, driver.run(retry, config, [curated], out, **scheduling))


@click.command(name="filter", cls=StageCommand, stage="filter")
@click.argument("downloaded", metavar="DOWNLOADED")
@output_option
@executor_options
@domain_errors
def filter_(downloaded, out, options, scheduling):
    """Image-level filters: size, decode, duplicates, eval decontamination, CLIP score.

    Every ledger row gets a filtered row with keep, reason and the scores used; the representative
    of each duplicate group is its smallest uid. --decontaminate exports the suite's built-in test
    sets into OUT/_reference (or --reference-root; `wit run` uses ROOT/_reference) and counts the
    overlap per task, as the CLIP paper's section 5 did.

    \b
    Example:
        wit filter out/downloaded -o out/filtered --decontaminate default
        wit filter out/downloaded -o out/filtered --clip-score out/train/checkpoints/step-00000500.pt --keep-top 0.3
        wit filter out/downloaded -o out/filtered --reference-images cifar10=s3://evals/wds_cifar10/test
    """
    _run("filter", options, [downloaded], out, scheduling)


@click.command(cls=StageCommand, stage="shard")
@click.argument("filtered", metavar="FILTERED")
@output_option
@executor_options
@domain_errors
def shard(filtered, out, options, scheduling):
    """Write the final dataset: shards/NNNNNN.tar, the samples manifest and a dataset card.

    \b
    Example:
        wit shard out/filtered -o s3://bucket/dataset --samples-per-shard 10000
    """
    _run("shard", options, [filtered], out, scheduling)


COMMANDS = [extract, curate, download, filter_, shard]
