"""glimp: fast collaborative reasoning between a small and a large language model.

From Python (docs/python.md): `load_pair` loads a pair and gives a `Pair` to route questions through.
They are imported on first use, so `import glimp_cli` (and `glimp --help`) stays light.
"""

__version__ = "0.1.0"

_LAZY = {"load_pair": "glimp_cli.api", "Pair": "glimp_cli.api", "Step": "glimp_cli.trace",
         "Trace": "glimp_cli.trace", "Question": "glimp_cli.questions", "GlimpError": "glimp_cli.errors"}

__all__ = ["__version__", *_LAZY]


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'glimp_cli' has no attribute {name!r}")
