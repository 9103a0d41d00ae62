"""The in-process llama.cpp backend on real GGUF files: token pieces longer than 32 bytes, and models
whose state cannot be rewound (a tiny real Mamba GGUF, written here with the `gguf` package)."""

from __future__ import annotations

import ctypes
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from glimp_cli.backends.base import StepStop
from glimp_cli.backends.llama_cpp import LlamaCppBackend, memory_kind
from glimp_cli.config import ModelSpec, PromptFormat, load_registry
from glimp_cli.errors import ModelError
from glimp_cli.sampling import Sampling

pytestmark = pytest.mark.real


@pytest.fixture(scope="module")
def smollm2():
    from glimp_cli.backends import load_backend

    backend = load_backend(replace(load_registry().model("smollm2-135m"), threads=1, n_ctx=512))
    yield backend
    backend.close()


def detokenize_unbounded(backend: LlamaCppBackend, tokens: list[int]) -> bytes:
    """llama.cpp's own llama_detokenize into a buffer of ample size: an independent path to the bytes."""
    lib = backend._lib
    size = 64 * len(tokens) + 64
    buf = ctypes.create_string_buffer(size)
    n = lib.llama_detokenize(backend._vocab, (lib.llama_token * len(tokens))(*tokens), len(tokens), buf, size,
                             False, True)
    assert 0 <= n <= size
    return buf.raw[:n]


def test_every_token_has_its_bytes_and_long_ones_are_not_lost(smollm2):
    pieces = [smollm2.token_bytes(t) for t in range(smollm2.n_vocab)]
    long = [t for t, piece in enumerate(pieces) if len(piece) > 32]
    # SmolLM2 has 47 pieces over 32 bytes (runs of spaces, ----, ####); Llama.detokenize gave b"" for each.
    assert len(long) == 47
    assert all(pieces), [t for t, piece in enumerate(pieces) if not piece][:10]
    for t in long:
        assert pieces[t] == detokenize_unbounded(smollm2, [t])
        assert smollm2.tokenize(pieces[t].decode("utf-8")) == [t]  # the piece is the token's whole text
    assert max(len(p) for p in pieces) > 64  # longer than the backend's first buffer: it grew


def test_a_text_with_long_tokens_is_its_pieces_joined(smollm2):
    text = "Step 1:\n" + " " * 40 + "x = 2\n" + "-" * 40 + "\n#### 18\n" + "=" * 64 + "\n"
    tokens = smollm2.tokenize(text)
    assert any(len(smollm2.token_bytes(t)) > 32 for t in tokens)
    assert b"".join(smollm2.token_bytes(t) for t in tokens) == text.encode()


def test_a_stop_string_inside_a_long_token_ends_the_step(smollm2):
    dashes = next(t for t in range(smollm2.n_vocab) if smollm2.token_bytes(t) == b"-" * 40)
    smollm2.rewind(0)
    smollm2.extend(smollm2.tokenize("Notes", bos=True))
    written = smollm2.write(dashes, StepStop("\n\n", stop_strings=("----",), max_new_tokens=8), Sampling(),
                            np.random.default_rng(0))
    assert written.reason == "stop_string" and written.tokens == (dashes,)


def test_special_token_text_comes_through_the_same_path(smollm2):
    bos, eos = smollm2.llm.token_bos(), smollm2.llm.token_eos()
    assert smollm2.bos_token == smollm2.token_bytes(bos).decode() and smollm2.bos_token
    assert smollm2.eos_token == smollm2.token_bytes(eos).decode() and smollm2.eos_token
    assert smollm2.tokenize(smollm2.bos_token, special=True) == [bos]
    assert smollm2.tokenize(smollm2.eos_token, special=True) == [eos]


# -- models whose state cannot be rewound -----------------------------------------------------------

def write_tiny_mamba(path: Path) -> Path:
    """A valid, randomly initialised one-layer Mamba GGUF (30 kB) with a byte-level BPE vocabulary."""
    gguf = pytest.importorskip("gguf")
    n_embd, d_inner, d_state, d_conv, dt_rank = 16, 32, 4, 4, 2  # llama.cpp needs d_inner = 2 n_embd
    # GPT-2's printable alphabet for the 256 bytes, one token each, plus one merge and an end token.
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    shifted = iter(range(256, 512))
    chars = {b: chr(b) if b in printable else chr(next(shifted)) for b in range(256)}
    tokens = [chars[b] for b in range(256)] + ["he", "<eos>"]
    writer = gguf.GGUFWriter(str(path), "mamba")
    writer.add_context_length(128)
    writer.add_embedding_length(n_embd)
    writer.add_block_count(1)
    writer.add_ssm_conv_kernel(d_conv)
    writer.add_ssm_inner_size(d_inner)
    writer.add_ssm_state_size(d_state)
    writer.add_ssm_time_step_rank(dt_rank)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_types([1] * (len(tokens) - 1) + [3])
    writer.add_token_merges(["h e"])
    writer.add_bos_token_id(len(tokens) - 1)
    writer.add_eos_token_id(len(tokens) - 1)
    rng = np.random.default_rng(0)
    weights = lambda *shape: (0.02 * rng.standard_normal(shape)).astype(np.float32)  # noqa: E731
    ones = lambda *shape: np.ones(shape, np.float32)  # noqa: E731
    writer.add_tensor("token_embd.weight", weights(len(tokens), n_embd))
    writer.add_tensor("output_norm.weight", ones(n_embd))
    for name, value in {
        "attn_norm.weight": ones(n_embd), "ssm_in.weight": weights(2 * d_inner, n_embd),
        "ssm_conv1d.weight": weights(d_inner, d_conv), "ssm_conv1d.bias": weights(d_inner),
        "ssm_x.weight": weights(dt_rank + 2 * d_state, d_inner), "ssm_dt.weight": weights(d_inner, dt_rank),
        "ssm_dt.bias": weights(d_inner), "ssm_a": -ones(d_inner, d_state), "ssm_d": ones(d_inner),
        "ssm_out.weight": weights(n_embd, d_inner),
    }.items():
        writer.add_tensor(f"blk.0.{name}", value)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def test_a_recurrent_model_is_refused_at_load_in_one_line(tmp_path):
    gguf_path = write_tiny_mamba(tmp_path / "tiny-mamba.gguf")
    # The file is a real model: llama.cpp loads it and reports it recurrent.
    import llama_cpp

    llm = llama_cpp.Llama(model_path=str(gguf_path), n_ctx=64, verbose=False)
    try:
        assert llama_cpp.llama_model_is_recurrent(llm._model.model)
        llm.eval(llm.tokenize(b"hello"))
    finally:
        llm.close()
    spec = ModelSpec(name="tiny-mamba",
                     prompt=PromptFormat(style="plain", template="{question}"), n_ctx=64, threads=1)
    with pytest.raises(ModelError) as info:
        LlamaCppBackend(spec, gguf_path)
    message = str(info.value)
    assert "\n" not in message
    assert "'tiny-mamba'" in message and "recurrent" in message and "mamba" in message and "tiny-mamba.gguf" in message


def test_transformers_pass_the_check_and_the_decision_covers_hybrids(smollm2):
    assert memory_kind(smollm2._lib, smollm2.llm._model.model) is None  # the real SmolLM2
    # The decision on the flags llama.cpp reports (no hybrid GGUF is available to load here).
    flags = lambda recurrent, hybrid: SimpleNamespace(llama_model_is_recurrent=lambda m: recurrent,  # noqa: E731
                                                      llama_model_is_hybrid=lambda m: hybrid)
    assert memory_kind(flags(True, False), None) == "recurrent"
    assert memory_kind(flags(False, True), None) == "hybrid"
    assert memory_kind(flags(False, False), None) is None
    assert memory_kind(SimpleNamespace(llama_model_is_recurrent=lambda m: False), None) is None  # old binding
