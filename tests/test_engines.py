"""tools/engines.py without building anything: where the binaries are looked for, and when a build is impossible."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("glimp_engines_fast", REPO / "tools" / "engines.py")
engines = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(engines)


def fake_bins(folder: Path, names=("llama-server", "rpc-server"), executable: bool = True) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for name in names:
        path = folder / name
        path.write_text("#!/bin/sh\n")
        path.chmod(0o755 if executable else 0o644)
    return folder


def test_the_cache_is_keyed_by_version_and_flags(monkeypatch, tmp_path):
    monkeypatch.setenv("GLIMP_CACHE_DIR", str(tmp_path))
    a, b = engines.engine_dir("0.3.36"), engines.engine_dir("0.3.37")
    assert a != b and a.parent == b.parent == tmp_path / "engines"
    monkeypatch.setattr(engines, "CMAKE_FLAGS", engines.CMAKE_FLAGS + ("-DGGML_CUDA=ON",))
    assert engines.engine_dir("0.3.36") != a


def test_find_needs_both_binaries_executable(monkeypatch, tmp_path):
    monkeypatch.setenv("GLIMP_CACHE_DIR", str(tmp_path))
    monkeypatch.delenv(engines.ENV_DIR, raising=False)
    assert engines.find() is None
    bin_dir = engines.engine_dir() / "bin"
    fake_bins(bin_dir, names=("llama-server",))
    assert engines.find() is None  # half a build is no build
    fake_bins(bin_dir, names=("rpc-server",), executable=False)
    assert engines.find() is None
    fake_bins(bin_dir)
    assert engines.find() == {"llama-server": bin_dir / "llama-server", "rpc-server": bin_dir / "rpc-server"}


def test_a_given_directory_wins_and_is_never_built_into(monkeypatch, tmp_path):
    monkeypatch.setenv("GLIMP_CACHE_DIR", str(tmp_path / "cache"))
    given = fake_bins(tmp_path / "mine")
    monkeypatch.setenv(engines.ENV_DIR, str(given))
    assert engines.find()["llama-server"] == given / "llama-server"
    assert engines.ensure(log=lambda line: pytest.fail(line))["rpc-server"] == given / "rpc-server"


def test_no_compiler_is_an_impossible_build_and_the_command_still_lets_the_tests_run(monkeypatch, tmp_path, capsys):
    monkeypatch.setenv("GLIMP_CACHE_DIR", str(tmp_path))
    monkeypatch.delenv(engines.ENV_DIR, raising=False)
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    with pytest.raises(engines.BuildImpossible, match="cmake is not on PATH"):
        engines.build()
    assert engines.main([]) == 0
    err = capsys.readouterr().err
    assert "cmake is not on PATH" in err and "will be skipped" in err and "\n" == err[-1] and err.count("\n") == 1
    assert not (tmp_path / "engines").exists() or not any((tmp_path / "engines").iterdir())  # nothing half-made
    assert engines.main(["--check"]) == 1  # nothing built: --check says so
