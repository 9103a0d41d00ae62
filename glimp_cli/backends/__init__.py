"""Backends: the engines behind the `Backend` protocol, picked per model by its `backend:` key."""

from __future__ import annotations

import importlib
from pathlib import Path

from glimp_cli.backends.base import Backend, ContextFull, StepStop, Written
from glimp_cli.config import ModelSpec
from glimp_cli.errors import ConfigError

# name -> "module:factory"; imported only when a model uses it, so `glimp --help` loads no engine.
# A factory takes (spec, config_dir) and returns a Backend.
BACKENDS: dict[str, str] = {
    "llama_cpp": "glimp_cli.backends:_llama_cpp",
    # An OpenAI-compatible completions server (llama.cpp server, vLLM, SGLang): text-level, see TextBackend.
    "openai": "glimp_cli.backends.openai_http:connect",
}

# Backends whose models live behind a server: safe to drive from several threads, one object each.
REMOTE_BACKENDS = frozenset({"openai"})


def load_backend(spec: ModelSpec, config_dir: Path | None = None) -> Backend:
    """Create the backend that `spec.backend` names."""
    target = BACKENDS.get(spec.backend)
    if target is None:
        raise ConfigError(f"model {spec.name!r}: unknown backend {spec.backend!r} (known: {', '.join(BACKENDS)})")
    module, _, attr = target.partition(":")
    return getattr(importlib.import_module(module), attr)(spec, config_dir)


def _llama_cpp(spec: ModelSpec, config_dir: Path | None) -> Backend:
    from glimp_cli.backends.llama_cpp import LlamaCppBackend
    from glimp_cli.sources import resolve

    return LlamaCppBackend(spec, resolve(spec, config_dir))


__all__ = ["BACKENDS", "REMOTE_BACKENDS", "Backend", "ContextFull", "StepStop", "Written", "load_backend"]
