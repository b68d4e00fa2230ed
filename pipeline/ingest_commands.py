"""`wit extract`, `wit curate`, `wit filter`, `wit shard`: options → frozen config → one stage run."""

from __future__ import annotations

import click

from wit.manifests.runrecord import finished_ref
from wit.pipeline.clikit import domain_errors, executor_options, finish, output_option
from wit.pipeline.executor import run_phases, run_stage


@click.command()
@click.argument("sources", nargs=-1, required=True, metavar="SOURCE...")
@output_option
@click.option(
    "--max-page-bytes",
    type=click.IntRange(min=1),
    default=5 * 1024 * 1024,
    show_default=True,
    help="Skip larger pages (reason page_too_large).",
)
@click.option("--no-lang", is_flag=True, help="Skip language identification (faster; lang stays null).")
@click.option(
    "--languages",
    default="",
    metavar="CODES",
    help="Comma-separated ISO 639-1 codes the identifier may answer (default: all it knows).",
)
@executor_options
@domain_errors
def extract(sources, out, max_page_bytes, no_lang, languages, workers, part):
    """Extract (image URL, text) candidates from WARC, WAT or HTML files or folders.

    One partition per source file. Every <img> becomes a candidate row, its URL made absolute
    against the page and <base href>; skipped images and pages are counted by reason in _run.json.

    \b
    Example:
        wit extract crawl/ -o out/candidates --workers 2 --languages en,de,fr,es
        wit extract 's3://bucket/segment/*.warc.gz' -o s3://bucket/candidates --part 0/8
    """
    from wit.ingest.extract import EXTRACT, ExtractConfig, source_refs

    config = ExtractConfig(
        max_page_bytes=max_page_bytes,
        detect_lang=not no_lang,
        languages=tuple(c.strip() for c in languages.split(",") if c.strip()),
    )
    finish("extract", run_stage(EXTRACT, config, source_refs(list(sources)), out, workers, part))


@click.command()
@click.argument("candidates", metavar="CANDIDATES")
@output_option
@click.option("--queries", metavar="URL", help="Query list, one per line (default: the list wit ships).")
@click.option("--per-query-cap", type=click.IntRange(min=1), default=20000, show_default=True)
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the balancing draw.")
@click.option("--lang", "langs", default="en", show_default=True, help="Allowed languages, comma-separated; '' = any.")
@click.option("--min-chars", type=click.IntRange(min=0), default=5, show_default=True)
@click.option("--max-chars", type=click.IntRange(min=1), default=1000, show_default=True)
@click.option("--min-words", type=click.IntRange(min=0), default=2, show_default=True)
@click.option("--blocklist", metavar="URL", help="Words or phrases that drop a text, one per line.")
@click.option("--allow-private-hosts", is_flag=True, help="Keep 127.0.0.1 and other private hosts (tests, demo).")
@click.option("--keep-unmatched", is_flag=True, help="Keep texts that match no query.")
@executor_options
@domain_errors
def curate(candidates, out, queries, per_query_cap, seed, langs, min_chars, max_chars, min_words, blocklist,
           allow_private_hosts, keep_unmatched, workers, part):  # fmt: skip
    """Clean, filter and balance candidates to at most N pairs per query (WIT / MetaCLIP).

    Every candidate row stays in the output with keep and reason. _run.json holds the query list's
    digest, the cap, the seed and the pairs per query before and after balancing.

    \b
    Example:
        wit curate out/candidates -o out/curated --queries queries.txt --per-query-cap 20000
    """
    from wit.ingest.curate import CURATE_PHASES, CurateConfig

    config = CurateConfig.build(
        queries=queries,
        blocklist=blocklist,
        langs=langs,
        per_query_cap=per_query_cap,
        seed=seed,
        min_chars=min_chars,
        max_chars=max_chars,
        min_words=min_words,
        allow_private_hosts=allow_private_hosts,
        keep_unmatched=keep_unmatched,
    )
    inputs = [finished_ref(candidates, expect_kind="candidates")]
    finish("curate", run_phases(CURATE_PHASES, config, inputs, out, workers, part))


@click.command()
@click.argument("curated", metavar="CURATED")
@output_option
@click.option("--image-size", type=click.IntRange(min=8), default=256, show_default=True)
@click.option(
    "--resize-mode",
    type=click.Choice(["no", "border", "keep_ratio", "keep_ratio_largest", "center_crop"]),
    default="border",
    show_default=True,
)
@click.option("--encode-format", type=click.Choice(["jpg", "png", "webp"]), default="jpg", show_default=True)
@click.option("--encode-quality", type=click.IntRange(1, 100), default=95, show_default=True)
@click.option("--samples-per-shard", type=click.IntRange(min=1), default=10000, show_default=True)
@click.option("--threads", type=click.IntRange(min=1), default=64, show_default=True, help="Fetch threads per worker.")
@click.option("--timeout", type=click.FloatRange(min=0.1), default=10.0, show_default=True, help="Seconds per image.")
@click.option("--retries", type=click.IntRange(min=0), default=0, show_default=True)
@click.option(
    "--distributor",
    type=click.Choice(["wit", "multiprocessing", "pyspark", "ray"]),
    default="wit",
    show_default=True,
    help="wit: partitions run by --workers/--part; others: passed to img2dataset.",
)
@click.option(
    "--processes",
    type=click.IntRange(min=1),
    default=1,
    show_default=True,
    help="img2dataset processes per partition (with --distributor multiprocessing|pyspark|ray).",
)
@click.option("--user-agent", default=None, help="The User-Agent sent; add a contact for crawls at scale.")
@click.option("--allow-private-hosts", is_flag=True, help="Fetch from 127.0.0.1 and private hosts (tests, demo).")
@click.option(
    "--retry-failed",
    is_flag=True,
    help="CURATED is a finished download: re-fetch its transient failures into OUT (a new folder).",
)
@executor_options
@domain_errors
def download(curated, out, image_size, resize_mode, encode_format, encode_quality, samples_per_shard, threads,
             timeout, retries, distributor, processes, user_agent, allow_private_hosts, retry_failed, workers,
             part):  # fmt: skip
    """Download the kept pairs into WebDataset shards (img2dataset underneath) and a ledger.

    Every kept pair gets a ledger row: status, error class (http_404, timeout, robots_noai,
    decode, too_large, private_host, ...), http status, sha256, sizes, shard and key (= uid).
    X-Robots-Tag noai/noimageai opt-outs are honoured; hosts are interleaved across shards.

    \b
    Example:
        wit download out/curated -o s3://bucket/downloaded --workers 4 --threads 64
        wit download s3://bucket/downloaded -o s3://bucket/downloaded-retry --retry-failed
    """
    from wit.ingest.download import DEFAULT_USER_AGENT, DOWNLOAD, RETRY, DownloadConfig

    config = DownloadConfig(
        image_size=image_size,
        resize_mode=resize_mode,
        encode_format=encode_format,
        encode_quality=encode_quality,
        samples_per_shard=samples_per_shard,
        threads=threads,
        timeout=timeout,
        retries=retries,
        distributor=distributor,
        processes=processes,
        user_agent=user_agent or DEFAULT_USER_AGENT,
        allow_private_hosts=allow_private_hosts,
    )
    if retry_failed:
        inputs = [finished_ref(curated, expect_kind="downloaded")]
        finish("download --retry-failed", run_stage(RETRY, config, inputs, out, workers, part))
    else:
        inputs = [finished_ref(curated, expect_kind="curated")]
        finish("download", run_stage(DOWNLOAD, config, inputs, out, workers, part))


@click.command(name="filter")
@click.argument("downloaded", metavar="DOWNLOADED")
@output_option
@click.option(
    "--min-side",
    type=click.IntRange(min=1),
    default=32,
    show_default=True,
    help="On the original size (img2dataset upsamples small images).",
)
@click.option("--max-aspect-ratio", type=click.FloatRange(min=1.0), default=3.0, show_default=True)
@click.option(
    "--max-pixels",
    type=click.IntRange(min=1),
    default=50_000_000,
    show_default=True,
    help="Checked on the header, before decoding (decompression bombs).",
)
@click.option(
    "--near-duplicate-distance",
    type=click.IntRange(min=0, max=64),
    default=4,
    show_default=True,
    help="Hamming distance of 64-bit perceptual hashes; 0 = identical hashes only.",
)
@click.option(
    "--reference-images",
    multiple=True,
    metavar="[TASK=]URL",
    help="Evaluation images to decontaminate against (CLIP_benchmark wds folder or image folder).",
)
@click.option(
    "--decontaminate",
    "suite",
    metavar="SUITE",
    help="Drop near duplicates of a `wit eval` suite's test images (reason eval_overlap:<task>).",
)
@click.option("--clip-score", metavar="CKPT", help="Score image-text pairs with this checkpoint (wit or open_clip).")
@click.option("--clip-model", metavar="NAME", help="Architecture of an open_clip --clip-score file.")
@click.option("--min-score", type=click.FloatRange(-1, 1), default=None, help="Drop pairs below this cosine.")
@click.option(
    "--keep-top",
    type=click.FloatRange(0, 1, min_open=True),
    default=None,
    metavar="FRACTION",
    help="Keep this fraction of the best-scoring pairs (DataComp's CLIP-score filter).",
)
@click.option("--rebalance", is_flag=True, help="Re-apply the per-query cap after download (MetaCLIP).")
@click.option("--per-query-cap", type=click.IntRange(min=1), default=None, help="With --rebalance.")
@click.option("--curated", metavar="URL", help="The curated manifest (default: found through the run records).")
@executor_options
@domain_errors
def filter_(downloaded, out, min_side, max_aspect_ratio, max_pixels, near_duplicate_distance,
            reference_images, suite, clip_score, clip_model, min_score, keep_top, rebalance, per_query_cap,
            curated, workers, part):  # fmt: skip
    """Image-level filters: size, decode, duplicates, eval decontamination, CLIP score.

    Every ledger row gets a filtered row with keep, reason and the scores used; the representative
    of each duplicate group is its smallest uid. --decontaminate exports the suite's built-in test
    sets into OUT/_reference and counts the overlap per task, as the CLIP paper's section 5 did.

    \b
    Example:
        wit filter out/downloaded -o out/filtered --decontaminate default
        wit filter out/downloaded -o out/filtered --clip-score out/train/checkpoints/step-00000500.pt --keep-top 0.3
        wit filter out/downloaded -o out/filtered --reference-images cifar10=s3://evals/wds_cifar10/test
    """
    from wit.ingest.filter import FILTER_PHASES, FilterConfig
    from wit.manifests import storage

    if suite:
        from wit.evaluate.datasets import reference_sets

        reference_images = tuple(reference_images) + reference_sets(suite, storage.join(out, "_reference"))
    config = FilterConfig.build(
        clip_checkpoint=clip_score,
        clip_model=clip_model,
        min_clip_score=min_score,
        keep_top_fraction=keep_top,
        min_side=min_side,
        max_aspect_ratio=max_aspect_ratio,
        max_pixels=max_pixels,
        near_duplicate_distance=near_duplicate_distance,
        reference_images=tuple(reference_images),
        rebalance=rebalance,
        per_query_cap=per_query_cap,
        curated=curated,
    )
    inputs = [finished_ref(downloaded, expect_kind="downloaded")]
    finish("filter", run_phases(FILTER_PHASES, config, inputs, out, workers, part))


@click.command()
@click.argument("filtered", metavar="FILTERED")
@output_option
@click.option("--samples-per-shard", type=click.IntRange(min=1), default=10000, show_default=True)
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the shuffled sample order.")
@click.option("--curated", metavar="URL", help="The curated manifest (default: found through the run records).")
@click.option("--no-card", is_flag=True, help="Skip CARD.md and its plots.")
@executor_options
@domain_errors
def shard(filtered, out, samples_per_shard, seed, curated, no_card, workers, part):
    """Write the final dataset: shards/NNNNNN.tar, the samples manifest and a dataset card.

    \b
    Example:
        wit shard out/filtered -o s3://bucket/dataset --samples-per-shard 10000
    """
    from wit.ingest.shard import SHARD_PHASES, ShardConfig

    config = ShardConfig(samples_per_shard=samples_per_shard, seed=seed, curated=curated, card=not no_card)
    inputs = [finished_ref(filtered, expect_kind="filtered")]
    finish("shard", run_phases(SHARD_PHASES, config, inputs, out, workers, part))


COMMANDS = [extract, curate, download, filter_, shard]
