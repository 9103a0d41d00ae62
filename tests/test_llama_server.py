"""glimp on llama.cpp's own engines: `llama-server` with parallel slots, and a model split over `rpc-server` workers.

The binaries come from tools/engines.py (built from the llama.cpp that llama-cpp-python vendors, then
cached; .ci/run builds them before the suite). Every process runs on 127.0.0.1 with one thread.
"""

from __future__ import annotations

import importlib.util
import json
import math
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import yaml

from conftest import GSM8K_QUESTIONS
from glimp_cli.backends.openai_http import RUNNING_FORM, connect
from glimp_cli.cli import app
from glimp_cli.config import ModelSpec
from glimp_cli.entropy import parse_estimator, topk_entropy, topk_entropy_from_logprobs
from glimp_cli.policies import always_large, always_small
from glimp_cli.router import RouteSettings, Router
from glimp_cli.sides import ModelSlot
from test_http_backend import (K, PLAIN, QUESTIONS, batch_killed_after_first_result,  # noqa: F401
                               clean_env, ggufs, results, runner, smollm2_boundaries, smollm2_chat_steps,
                               write_config, write_questions)

REPO = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("glimp_engines", REPO / "tools" / "engines.py")
engines = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(engines)

pytestmark = pytest.mark.real


@pytest.fixture(scope="session")
def bins():
    """llama-server and rpc-server, built once (a no-op when cached); skipped only where no build is possible."""
    try:
        return engines.ensure(log=lambda line: print(line, file=sys.stderr))
    except engines.BuildImpossible as exc:
        pytest.skip(f"llama.cpp engines cannot be built here: {exc}")


@pytest.fixture(scope="module")
def llama_servers(bins, ggufs, tmp_path_factory):
    """SmolLM2 (small) and Gemma 3 270M (large), each behind its own llama-server with two slots."""
    logs = tmp_path_factory.mktemp("llama-server")
    started = []
    try:
        for role, (name, alias) in {"small": ("smollm2-135m", "smollm2"), "large": ("gemma3-270m", "gemma")}.items():
            server = engines.llama_server(bins, ggufs[name], alias, logs / f"{role}.log", parallel=2)
            started.append(server.start())
        yield dict(zip(("small", "large"), started))
    finally:
        for server in started:
            server.stop()


def url(server) -> str:
    return f"http://127.0.0.1:{server.port}/v1"


@pytest.fixture(scope="module")
def server_config(llama_servers, smollm2_chat_steps, tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("config") / "models.yaml"
    return write_config(path, url(llama_servers["small"]), url(llama_servers["large"]), smollm2_chat_steps)


def ask_json(config: Path, *args: str, question: str) -> dict:
    result = runner.invoke(app, ["ask", question, "--config", str(config), "--json", *args])
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


def test_the_engines_build_is_cached(bins):
    # A second call finds the cached binaries and builds nothing.
    t0 = time.perf_counter()
    again = engines.ensure(log=lambda line: pytest.fail(f"rebuilt: {line}"))
    assert again == bins and time.perf_counter() - t0 < 1.0
    assert bins["llama-server"].parent == engines.engine_dir() / "bin"
    for name, path in bins.items():
        assert subprocess.run([str(path), "--help"], capture_output=True, timeout=30).returncode == 0, name


def test_h_init_from_llama_server_matches_the_in_process_top_k(llama_servers, smollm2_chat_steps, capsys):
    """The same contexts probed in process (top-20 from the full logits) and by llama-server (its top-20
    log-probabilities, the delimiter held back so that the server sees the running-form tokens)."""
    rows, remote = [], None
    for logits, remote in smollm2_boundaries(url(llama_servers["small"]), smollm2_chat_steps):
        rows.append((topk_entropy(logits, K), topk_entropy_from_logprobs(remote.next_logits())))
    assert remote.probe_form == RUNNING_FORM  # llama-server's /tokenize was used to hold the delimiter back
    a = np.array(rows)
    gap = np.abs(a[:, 0] - a[:, 1])
    with capsys.disabled():
        print(f"\n{len(a)} boundaries: |llama-server top-{K} - in-process top-{K}| median {np.median(gap):.4f} "
              f"max {gap.max():.4f}")
    assert len(a) >= 4
    assert np.median(gap) <= 0.05, rows


TIE = 0.3  # nats between the in-process top token and the server's: a near tie that batch shapes break


def parting_gap(backend, theirs: str, delimiter: str) -> float:
    """Replay the in-process model greedily along the server's step `theirs`; where its top token leaves
    that text, the log-probability gap to the token the server took (inf if no top-5 token explains it)."""
    from glimp_cli.entropy import log_softmax

    written = ""

    def took(token: int, rest: str) -> bool:
        piece = backend.token_bytes(token).decode("utf-8", errors="replace")
        if rest:
            return bool(piece) and rest.startswith(piece)
        return backend.is_eog(token) or piece.startswith(delimiter[0])  # the server's step ended here

    for _ in range(2 * len(theirs) + 8):
        logprobs, _ = log_softmax(np.array(backend.next_logits(), dtype=np.float64))
        order = [int(t) for t in np.argsort(-logprobs)[:5]]
        rest = theirs[len(written):]
        if took(order[0], rest) and rest:
            backend.extend((order[0],))
            written += backend.token_bytes(order[0]).decode("utf-8", errors="replace")
            continue
        return next((float(logprobs[order[0]] - logprobs[t]) for t in order[1:] if took(t, rest)), math.inf)
    return math.inf


def test_llama_server_writes_the_in_process_steps_under_greedy(llama_servers, smollm2_chat_steps, capsys):
    """Each model, at every step boundary of its own in-process greedy trace, writes its next step once in
    process and once on llama-server from the same tokens: the two steps must be the same text.

    The same tokens: the server tokenizes the text so far, so the in-process side is given that text's
    tokens too (a written "\n\n" may be two tokens where a re-tokenized one is one, docs/serving.md).
    """
    import httpx

    from glimp_cli.backends import load_backend
    from glimp_cli.backends.base import StepStop
    from glimp_cli.config import load_registry
    from glimp_cli.prompts import render_prompt
    from glimp_cli.sampling import Sampling

    registry = load_registry()
    settings = RouteSettings(estimator=parse_estimator(f"topk:{K}"), max_tokens=160, max_step_tokens=48)
    served = {"small": ("smollm2-135m", "smollm2"), "large": ("gemma3-270m", "gemma")}
    rng = np.random.default_rng(0)
    compared, differ, exact, contexts = 0, [], [], 0
    for role, (name, alias) in served.items():
        spec = replace(registry.model(name), threads=1)
        local = load_backend(spec)
        server = llama_servers[role]
        template = smollm2_chat_steps if role == "small" else None
        remote = connect(ModelSpec(name=f"{alias}-remote", backend="openai", base_url=url(server), model=alias,
                                   prompt=replace(PLAIN, template=template or "{question}")))
        stop = StepStop("\n\n", max_new_tokens=48)
        try:
            for question in GSM8K_QUESTIONS[:2]:
                slots = {r: ModelSlot(r, local if r == role else None, spec.prompt, spec.stop) for r in ("small", "large")}
                policy = always_small() if role == "small" else always_large()
                steps = [st.text for st in Router(slots["small"], slots["large"], policy, settings).run(question)]
                prompt = render_prompt(spec.prompt, question, local.chat_template, local.bos_token, local.eos_token)
                for k in range(min(len(steps), 4)):
                    text = prompt + "".join(t + "\n\n" for t in steps[:k])
                    tokens = local.tokenize(text, special=True, bos=not (local.bos_token and
                                                                         text.startswith(local.bos_token)))
                    on_server = httpx.post(f"http://127.0.0.1:{server.port}/tokenize", timeout=60,
                                           json={"content": text, "add_special": True}).json()["tokens"]
                    assert [int(t) for t in tokens] == on_server, (role, k)  # the very same context
                    contexts += 1
                    local.rewind(0)
                    local.extend(tokens)
                    mine = local.write(None, stop, Sampling(), rng).text
                    remote.text = text
                    compared += 1
                    # As glimp runs: the server reuses its prefix cache and evaluates only the new tokens.
                    cached = remote.write(None, stop, Sampling(), rng).text
                    if mine != cached:
                        local.rewind(0)
                        local.extend(tokens)
                        differ.append((role, k, parting_gap(local, cached, stop.delimiter), mine, cached))
                    # The whole context in one batch, as the in-process side evaluated it: the same step.
                    plain_body = remote._body
                    remote._body = lambda *a, **kw: {**plain_body(*a, **kw), "cache_prompt": False}
                    try:
                        one_batch = remote.write(None, stop, Sampling(), rng).text
                    finally:
                        remote._body = plain_body
                    if mine != one_batch:
                        exact.append((role, k, mine, one_batch))
        finally:
            local.close()
            remote.close()
    with capsys.disabled():
        print(f"\n{compared} steps written from the same {contexts} contexts in process and on llama-server: "
              f"{compared - len(exact)} identical with the context in one batch, {compared - len(differ)} with "
              f"the server's prefix cache; parted at gaps {[round(d[2], 3) for d in differ]}")
    assert compared >= 8
    assert not exact, exact
    # With the prefix cache the server evaluates the context in other batch shapes than the in-process
    # side (measured in process alone: token by token vs one batch moves a top log-probability by 0.05),
    # which can break a near tie and then compound; a wrong context would not be a near runner-up.
    assert all(gap <= TIE for _, _, gap, _, _ in differ), differ
    assert len(differ) <= compared // 2, differ


def test_glimp_models_shows_a_llama_server_reachable(server_config, clean_env):
    result = runner.invoke(app, ["models", "--config", str(server_config)])
    assert result.exit_code == 0, result.output
    rows = {line.split("│")[1].strip(): line for line in result.stdout.splitlines() if line.count("│") >= 4}
    assert "yes:" in rows["smollm2-remote"] and "serves smollm2" in rows["smollm2-remote"]
    assert "yes:" in rows["gemma-remote"] and "serves gemma" in rows["gemma-remote"]


def test_concurrent_questions_share_llama_servers_parallel_slots(server_config, llama_servers, clean_env, tmp_path):
    questions = write_questions(tmp_path / "q.jsonl", 4)
    out = tmp_path / "r.jsonl"
    result = runner.invoke(app, ["batch", str(questions), "-o", str(out), "--config", str(server_config),
                                 "--pair", "remote", "--mode", "glimp", "--concurrency", "2", "--tau", "2.0"])
    assert result.exit_code == 0, result.output
    records = results(out)
    assert sorted(r["id"] for r in records) == sorted(q["id"] for q in QUESTIONS[:4])
    assert all(r["steps"] and r["settings"]["estimator"] == f"topk:{K}" for r in records)
    # Both slots of each server took work: llama-server ran the two questions side by side.
    import httpx

    for role, server in llama_servers.items():
        slots = httpx.get(f"http://127.0.0.1:{server.port}/slots", timeout=10).json()
        assert len(slots) == 2 and all(s.get("id_task", -1) >= 0 for s in slots), (role, slots)


def test_a_large_model_split_over_two_rpc_workers_survives_a_killed_worker_with_resume(
        bins, ggufs, llama_servers, smollm2_chat_steps, clean_env, tmp_path):
    workers = [engines.rpc_server(bins, tmp_path / f"rpc{i}.log").start() for i in range(2)]
    endpoints = tuple(f"127.0.0.1:{w.port}" for w in workers)
    large = engines.llama_server(bins, ggufs["gemma3-270m"], "gemma", tmp_path / "large.log", rpc=endpoints)
    try:
        large.start()
        for worker in workers:  # llama-server connected to both (that the killed one held layers shows below)
            assert "Accepted client connection" in worker.log.read_text(errors="replace"), worker.name
        config = write_config(tmp_path / "models.yaml", url(llama_servers["small"]), url(large), smollm2_chat_steps)
        questions = write_questions(tmp_path / "q.jsonl", 5)
        out = tmp_path / "r.jsonl"
        args = ["batch", str(questions), "-o", str(out), "--config", str(config), "--pair", "mixed",
                "--mode", "glimp", "--tau", "2.0"]
        returncode, stdout, stderr = batch_killed_after_first_result(args, out, workers[1].kill)
        assert returncode == 1, (stdout, stderr)
        errors = [line for line in stderr.splitlines() if line.startswith("glimp: error:")]
        assert len(errors) == 1, stderr
        assert "'gemma-remote'" in errors[0] and url(large) in errors[0], errors
        assert "Traceback" not in stderr
        finished = results(out)  # every line whole
        assert 1 <= len(finished) < 5 and len({r["id"] for r in finished}) == len(finished)

        # The worker comes back on its port; llama-server (which cannot lose a worker) is restarted on its own.
        large.stop()
        workers[1].start()
        large.start()
        result = runner.invoke(app, [*args, "--resume"])
        assert result.exit_code == 0, result.output
        records = results(out)
        assert sorted(r["id"] for r in records) == sorted(q["id"] for q in QUESTIONS[:5])
        assert records[: len(finished)] == finished  # the finished lines were kept as they were
    finally:
        large.stop()
        for worker in workers:
            worker.stop()
