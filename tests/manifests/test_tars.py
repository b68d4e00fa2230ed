"""The plain-tar header reader shared by shard and eval, against tarfile on the same archives."""

from __future__ import annotations

import io
import tarfile

import pytest

from wit.manifests.tars import BadTar, plain_members, random_access


def _tar(members: list[tuple[str, bytes]], fmt=tarfile.USTAR_FORMAT) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=fmt) as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


FILES = [("a/000.jpg", b"\xff\xd8" * 300), ("a/000.txt", b"red star"), ("empty.cls", b""), ("b.json", b"{}" * 700)]


@pytest.mark.parametrize("where", ["local", "remote"])
def test_members_and_bytes_match_tarfile(tmp_path, where, s3_bucket):
    data = _tar(FILES)
    if where == "local":
        url = str(tmp_path / "s.tar")
        (tmp_path / "s.tar").write_bytes(data)
    else:
        from wit.manifests import storage

        url = f"{s3_bucket}/s.tar"
        storage.write_bytes(url, data)
    with random_access(url) as read:
        members = plain_members(read)
        assert members is not None
        got = [(m.name, bytes(read(m.offset, m.size))) for m in members if m.is_file]
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        want = [(m.name, tar.extractfile(m).read()) for m in tar if m.isfile()]
    assert got == want == FILES


def test_extended_headers_are_left_to_tarfile(tmp_path):
    long_name = "x" * 120 + ".jpg"  # past ustar's 100 + 155: a pax header
    (tmp_path / "p.tar").write_bytes(_tar([(long_name, b"1")], fmt=tarfile.PAX_FORMAT))
    with random_access(str(tmp_path / "p.tar")) as read:
        assert plain_members(read) is None


@pytest.mark.parametrize(
    "damage, message",
    [
        (lambda d: d[:700], "ends inside the member"),
        (lambda d: d[:300], "ends inside a header"),
        (lambda d: d[:148] + b"9999999\0" + d[156:], "checksum"),
        (lambda d: b"not a tar at all, just text " * 40, "checksum"),
    ],
)
def test_damage_is_a_clear_error(tmp_path, damage, message):
    (tmp_path / "d.tar").write_bytes(damage(_tar(FILES)))
    with random_access(str(tmp_path / "d.tar")) as read, pytest.raises(BadTar, match=message):
        plain_members(read)


def test_empty_file_has_no_members(tmp_path):
    (tmp_path / "e.tar").write_bytes(b"")
    with random_access(str(tmp_path / "e.tar")) as read:
        assert plain_members(read) == []


def test_without_checksums_only_the_first_header_is_summed(tmp_path):
    data = bytearray(_tar(FILES))
    second = 512 + 1024  # the second header: after the first member's 600 bytes, padded
    data[second + 148 : second + 156] = b"9999999\0"
    (tmp_path / "c.tar").write_bytes(bytes(data))
    with random_access(str(tmp_path / "c.tar")) as read:
        with pytest.raises(BadTar, match="checksum at byte 1536"):
            plain_members(read)
        assert [m.name for m in plain_members(read, checksums=False)] == [n for n, _ in FILES]


@pytest.mark.parametrize("fmt", [tarfile.USTAR_FORMAT, tarfile.PAX_FORMAT], ids=["plain", "pax"])
def test_tar_members_from_headers_or_tarfile_match_tarfile(tmp_path, fmt):
    """The headers' members, parsed here for a plain archive and by tarfile for one with extended
    headers (a long name): the same names, kinds, data offsets and sizes as tarfile gives."""
    from wit.manifests.tars import tar_members

    files = [*FILES, ("y" * 120 + ".jpg", b"\xff\xd8" * 10)] if fmt == tarfile.PAX_FORMAT else FILES
    (tmp_path / "s.tar").write_bytes(_tar(files, fmt=fmt))
    with tarfile.open(tmp_path / "s.tar") as tar:
        want = [(m.name, m.isfile(), m.offset_data, m.size) for m in tar]
    assert [tuple(m) for m in tar_members(str(tmp_path / "s.tar"))] == want


def test_read_files_streams_plain_and_compressed_archives(tmp_path):
    """Every file member once, in order, with its bytes read only when asked; its data offset in a
    plain archive, None in a compressed one (no byte of the file); a plain-only read refuses gzip."""
    import gzip

    from wit.manifests.tars import TarError, read_files

    data = _tar(FILES)
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        offsets = [m.offset_data for m in tar if m.isfile()]
    got = [(f.name, f.offset, f.read() if f.name.endswith(".txt") else None) for f in read_files(io.BytesIO(data))]
    assert got == [(n, o, d if n.endswith(".txt") else None) for (n, d), o in zip(FILES, offsets, strict=True)]
    packed = gzip.compress(data)
    assert [(f.name, f.offset, f.read()) for f in read_files(io.BytesIO(packed))] == [(n, None, d) for n, d in FILES]
    with pytest.raises(TarError):
        read_files(io.BytesIO(packed), compressed=False)
    with pytest.raises(TarError):  # a member cut short
        [f.read() for f in read_files(io.BytesIO(data[:700]))]
