"""In-process llama.cpp backend (llama-cpp-python): one Llama context per model, kept for the trace."""

from __future__ import annotations

import ctypes
import functools
import os
from pathlib import Path
from typing import Sequence

import numpy as np

from glimp_cli.backends.base import ContextFull, StepStop, TextSink, Written, write_tokens
from glimp_cli.config import ModelSpec
from glimp_cli.errors import MissingExtraError, ModelError
from glimp_cli.sampling import Sampling


_log_callback = None


def _silence_llama_log(llama_cpp) -> None:
    """Drop llama.cpp's own log lines: glimp reports load failures itself, in one line."""
    global _log_callback
    if _log_callback is None:
        _log_callback = llama_cpp.llama_log_callback(lambda level, text, user_data: None)
        llama_cpp.llama_log_set(_log_callback, None)


def render_chat(template: str, messages: list[dict], bos_token: str, eos_token: str) -> str:
    """What a GGUF's chat template makes of `messages`, through llama-cpp-python's sandboxed formatter.

    Its Jinja environment is the one llama-cpp-python's own chat completions use (Transformers'
    extensions and `tojson`, `strftime_now`, `raise_exception` raising ValueError).
    """
    return _chat_formatter(template, bos_token, eos_token)(messages=messages).prompt


@functools.lru_cache(maxsize=16)
def _chat_formatter(template: str, bos_token: str, eos_token: str):
    # Compiling a template takes ~17 ms, rendering one well under 1 ms: a conversation's start renders three.
    from llama_cpp.llama_chat_format import Jinja2ChatFormatter

    return Jinja2ChatFormatter(template, eos_token=eos_token, bos_token=bos_token, add_generation_prompt=True)


def memory_kind(llama_cpp, model) -> str | None:
    """"recurrent" or "hybrid" for a model whose state cannot be rewound to an earlier token, else None.

    Rewinding such a model (Mamba, RWKV; Jamba, LFM2, Granite-4-H, Qwen3-Next) fails to remove the
    later positions from its recurrent state, so the next evaluation is wrong or fails.
    """
    if llama_cpp.llama_model_is_recurrent(model):
        return "recurrent"
    is_hybrid = getattr(llama_cpp, "llama_model_is_hybrid", None)  # older bindings lack it
    if is_hybrid is not None and is_hybrid(model):
        return "hybrid"
    return None


class LlamaCppBackend:
    """A GGUF model in this process; `extend` evaluates only new tokens, `rewind` drops KV entries."""

    context = "tokens"

    def __init__(self, spec: ModelSpec, gguf: Path):
        try:
            import llama_cpp
        except ImportError:
            raise MissingExtraError("llama-cpp-python is not installed: pip install llama-cpp-python") from None
        self._lib = llama_cpp
        _silence_llama_log(llama_cpp)
        self.name = spec.name
        self.spec = spec
        self.path = gguf
        threads = spec.threads or os.cpu_count() or 1  # the two models never run at once: use every core
        try:
            self.llm = llama_cpp.Llama(
                model_path=str(gguf),
                n_ctx=spec.n_ctx,
                n_batch=spec.n_batch,
                n_gpu_layers=spec.n_gpu_layers,
                n_threads=threads,
                n_threads_batch=threads,
                # Only the last position's logits are read; logits_all would cost n_ctx x n_vocab floats.
                logits_all=False,
                # Gemma 3's sliding-window cache rewinds exactly only with the full-size SWA cache.
                swa_full=True,
                verbose=False,
            )
        except (ValueError, RuntimeError, OSError) as exc:
            raise ModelError(f"model {spec.name!r}: llama.cpp could not load {gguf}: {exc}") from None
        memory = memory_kind(llama_cpp, self.llm._model.model)
        if memory is not None:
            arch = self.llm.metadata.get("general.architecture", "?")
            self.llm.close()
            raise ModelError(f"model {spec.name!r}: {gguf.name} is a {memory} model (architecture {arch}); "
                             f"glimp rewinds the cache at every routed step, which llama.cpp cannot do for {memory} "
                             "models yet: use a transformer model")
        self.n_ctx = self.llm.n_ctx()
        self.n_vocab = self.llm.n_vocab()
        self._vocab = llama_cpp.llama_model_get_vocab(self.llm._model.model)
        self._piece_buf = ctypes.create_string_buffer(64)
        self.chat_template = self.llm.metadata.get("tokenizer.chat_template")
        self.bos_token = self._special_text(self.llm.token_bos())
        self.eos_token = self._special_text(self.llm.token_eos())
        self.evaluated = 0
        self._bytes: dict[int, bytes] = {}
        self._eog: dict[int, bool] = {}
        self._logits_valid = False

    def _special_text(self, token: int) -> str:
        if token < 0:
            return ""
        return self._piece(token).decode("utf-8", errors="replace")

    def _piece(self, token: int) -> bytes:
        """A token's bytes, special tokens rendered, through a buffer that grows to what llama.cpp asks.

        `Llama.detokenize` (llama-cpp-python 0.3.36) reads into 32 bytes and returns nothing for
        longer pieces (upstream issue #2362): SmolLM2 has 47 of them, runs of spaces, ---- and ####.
        """
        n = self._lib.llama_token_to_piece(self._vocab, token, self._piece_buf, len(self._piece_buf), 0, True)
        if n < 0:  # the piece needs -n bytes
            self._piece_buf = ctypes.create_string_buffer(-n)
            n = self._lib.llama_token_to_piece(self._vocab, token, self._piece_buf, -n, 0, True)
        return self._piece_buf.raw[:n]

    @property
    def tokens(self) -> Sequence[int]:
        return self.llm.input_ids[: self.llm.n_tokens]

    @property
    def n_tokens(self) -> int:
        return self.llm.n_tokens

    def tokenize(self, text: str, special: bool = False, bos: bool = False) -> list[int]:
        return self.llm.tokenize(text.encode("utf-8"), add_bos=bos, special=special)

    def token_bytes(self, token: int) -> bytes:
        piece = self._bytes.get(token)
        if piece is None:
            # Special tokens rendered, so that markers such as </think> (special in some models) appear in text.
            piece = self._bytes[token] = self._piece(token)
        return piece

    def is_eog(self, token: int) -> bool:
        eog = self._eog.get(token)
        if eog is None:
            eog = self._eog[token] = bool(self._lib.llama_vocab_is_eog(self._vocab, token))
        return eog

    def extend(self, tokens: Sequence[int]) -> None:
        if not len(tokens):
            return
        if self.llm.n_tokens + len(tokens) > self.n_ctx:
            raise ContextFull(f"{self.name}: {self.llm.n_tokens} + {len(tokens)} tokens > n_ctx {self.n_ctx}")
        self.llm.eval(list(tokens))
        self.evaluated += len(tokens)
        self._logits_valid = True

    def rewind(self, n_tokens: int) -> None:
        if n_tokens < self.llm.n_tokens:
            # Llama.eval removes the KV entries past n_tokens before its next decode.
            self.llm.n_tokens = n_tokens
            self._logits_valid = False

    def next_logits(self) -> np.ndarray:
        if not self._logits_valid:
            # After a rewind the context's logits belong to a dropped position: recompute the last one.
            n = self.llm.n_tokens
            last = int(self.llm.input_ids[n - 1])
            self.rewind(n - 1)
            self.extend((last,))
        ptr = self._lib.llama_get_logits_ith(self.llm._ctx.ctx, -1)
        return np.ctypeslib.as_array(ptr, shape=(self.n_vocab,))

    def write(self, first_token: int | None, stop: StepStop, sampling: Sampling,
              rng: np.random.Generator, on_text: TextSink | None = None,
              first_logits: np.ndarray | None = None) -> Written:
        return write_tokens(self, first_token, stop, sampling, rng, on_text, first_logits)

    def close(self) -> None:
        self.llm.close()
