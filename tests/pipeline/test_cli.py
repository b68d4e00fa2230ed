"""The command line: every command's help, the not-implemented list, and manifest commands."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from wit.manifests import storage
from wit.pipeline.cli import cli

from toy_stages import run_chain

DESIGN_COMMANDS = {
    "extract",
    "curate",
    "download",
    "filter",
    "shard",
    "train",
    "eval",
    "manifest",
    "run",
    "demo",
}


def _walk(group, path=()):
    for name, cmd in group.commands.items():
        yield path + (name,), cmd
        if hasattr(cmd, "commands"):
            yield from _walk(cmd, path + (name,))


def test_top_level_help_lists_every_design_command():
    result = CliRunner().invoke(cli, ["--help"])
    assert result.exit_code == 0
    assert DESIGN_COMMANDS <= set(cli.commands)
    for name in DESIGN_COMMANDS:
        assert name in result.output


@pytest.mark.parametrize("path", [p for p, _ in _walk(cli)], ids=lambda p: " ".join(p))
def test_every_command_has_help_with_an_example(path):
    result = CliRunner().invoke(cli, [*path, "--help"])
    assert result.exit_code == 0, result.output
    assert "Example:" in result.output
    assert "wit" in result.output.split("Example:")[1]


def test_manifest_subcommands():
    assert set(cli.commands["manifest"].commands) == {"show", "verify", "lineage", "diff"}


def test_console_script_help(run_wit):
    proc = run_wit("--help", check=True)
    assert "manifest" in proc.stdout
    assert run_wit("--version", check=True).stdout.startswith("wit, version")


def test_manifest_commands_on_a_chain(tmp_path, run_wit):
    refs = run_chain(str(tmp_path))
    proc = run_wit("manifest", "lineage", refs["pack"].url, check=True)
    for stage in ("toy-pack", "toy-tag", "toy-source"):
        assert stage in proc.stdout
    tree = json.loads(run_wit("manifest", "lineage", "--json", refs["pack"].url, check=True).stdout)
    assert tree["inputs"][0]["inputs"][0]["stage"] == "toy-source"
    show = run_wit("manifest", "show", refs["tag"].url, check=True).stdout
    assert "kind      curated" in show and "has_x" in show and "uid: string" in show
    # tallies print head and tail: 10 first words, largest first
    assert "first_word  (10 keys, 100 in all)" in show
    ok = run_wit("manifest", "verify", refs["pack"].url)
    assert ok.returncode == 0 and ok.stdout.startswith("ok:")
    storage.remove(storage.join(refs["pack"].url, "part-00001.parquet"))
    bad = run_wit("manifest", "verify", refs["pack"].url)
    assert bad.returncode == 1
    assert "missing     part-00001.parquet" in bad.stdout
    assert "Traceback" not in bad.stderr


def test_manifest_diff(tmp_path, run_wit):
    from toy_stages import SourceConfig

    a = run_chain(str(tmp_path / "a"), source=SourceConfig(parts=2))
    b = run_chain(str(tmp_path / "b"), source=SourceConfig(parts=3))
    out = run_wit("manifest", "diff", a["tag"].url, b["tag"].url, check=True).stdout
    assert "rows: 50 → 75" in out
    assert "uids only in B: 25" in out
    src = run_wit("manifest", "diff", a["source"].url, b["source"].url, check=True).stdout
    assert "config.parts: 2 → 3" in src


def test_verify_on_s3_through_the_cli(s3_bucket, s3_env, run_wit):
    refs = run_chain(f"{s3_bucket}/c")
    url = storage.join(refs["pack"].url, "shards/000000.tar")
    data = bytearray(storage.read_bytes(url))
    data[600] ^= 0xFF
    storage.write_bytes(url, bytes(data))
    proc = run_wit("manifest", "verify", refs["pack"].url, env=s3_env)
    assert proc.returncode == 1
    assert "changed     shards/000000.tar" in proc.stdout


@pytest.mark.parametrize("case", ["empty", "missing", "wrong_schema", "truncated", "bad_run_json"])
def test_bad_input_is_one_line_error_not_a_traceback(case, tmp_path, run_wit):
    import pyarrow as pa
    import pyarrow.parquet as pq

    target = tmp_path / "m"
    if case != "missing":
        target.mkdir()
    if case in ("wrong_schema", "truncated", "bad_run_json"):
        run_chain(str(tmp_path / "chain"))
        target = tmp_path / "chain" / "tag"
    if case == "wrong_schema":
        pq.write_table(pa.table({"x": [1]}), target / "part-00009.parquet")
    elif case == "truncated":
        data = (target / "part-00000.parquet").read_bytes()
        (target / "part-00000.parquet").write_bytes(data[:100])
    elif case == "bad_run_json":
        (target / "_run.json").write_text("{not json")
    for sub in (["show"], ["lineage"], ["verify"]):
        proc = run_wit("manifest", *sub, str(target))
        if case in ("wrong_schema", "truncated") and sub == ["lineage"]:
            continue  # lineage reads run records only; the parts are verify's and show's business
        assert proc.returncode == 1, (sub, proc.stdout, proc.stderr)
        assert "Traceback" not in proc.stderr
        err = proc.stderr.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("Error: "), proc.stderr


def test_heavy_imports_pause_the_collector_then_freeze_what_they_made():
    import gc

    from wit.pipeline.clikit import heavy_imports

    frozen = gc.get_freeze_count()
    try:
        with heavy_imports():
            assert not gc.isenabled()
            made = [[i] for i in range(1000)]  # tracked objects, as an import makes
        assert gc.isenabled() and gc.get_freeze_count() >= frozen + len(made)
        with pytest.raises(RuntimeError), heavy_imports():
            raise RuntimeError("an import failed")
        assert gc.isenabled()  # the collector is back on after a failed import too
    finally:
        gc.unfreeze()
        gc.enable()
