"""HTTP backend: a model behind an OpenAI-compatible completions server (llama.cpp server, vLLM, SGLang).

What it asks the server and what the answers mean live here; the requests themselves (retries,
timeouts, one-line errors) go through `http_transport.Endpoint`, and the two formats servers report
log-probabilities in are read by `logprobs.py`.

The server takes text, not tokens, so this backend is text-level (`context = "text"`): the router
keeps `text` equal to prompt + steps + delimiters, `next_logits` probes the next token after it,
and `write` continues it. What that costs compared with the in-process backend:

- H_init is estimated from the server's top-K log-probabilities (renormalised, `estimator: topk:K`),
  never computed over the full vocabulary. In the legacy logprobs format (llama-cpp-python's server,
  vLLM) the top-K is keyed by token text, so tokens with equal text collapse into one entry;
  llama-server's list format keeps them apart.
- A text that ENDS in the delimiter is tokenized by the server in its merged end-of-text form
  (SmolLM2: "\\n\\n" -> one token 1116), not the form the model writes in running text (198, 198),
  and H_init after the two forms differs by ~0.6 nats on SmolLM2 (measured in the README). When the
  server can tokenize for us (llama-cpp-python's /extras/tokenize, llama-server's or vLLM's
  /tokenize), the probe holds the delimiter's last tokens back: it sends the context without them
  and forces them as the first generated tokens with `logit_bias`, then reads the top-K at the
  position after them, which is exactly the running-form context. The server reports
  log-probabilities from the raw logits, so the bias does not touch them. Otherwise the probe falls
  back to the text-end form, and `probe_form` says so (the trace records it).
- The server's prefix cache, not a KV rewind, avoids re-prefilling the context; how many tokens the
  server really evaluated is not visible to glimp, so remote models report no evaluated counts.
"""

from __future__ import annotations

import contextlib
import math
import os
from dataclasses import dataclass
from time import perf_counter
from typing import Iterator

import numpy as np

from glimp_cli.backends.base import ContextFull, StepStop, StepScanner, TextSink, Written
from glimp_cli.backends.http_transport import EmptyStream, Endpoint
from glimp_cli.backends.logprobs import Position, parse_logprobs, position_entropy, topk_score
from glimp_cli.config import ModelSpec
from glimp_cli.errors import BackendError, ConfigError, ContextLimitError
from glimp_cli.sampling import Sampling

REACHABILITY_TIMEOUT = 2.0  # `glimp models`: one quick GET per remote model
FORCE_BIAS = 100.0  # logit_bias that makes a held-back delimiter token the only choice
# Sampling settings that llama.cpp's server (and vLLM) would otherwise apply by default
# (llama.cpp: top_k 40, min_p 0.05, repeat_penalty 1.1): glimp samples with temperature and top-p only.
NEUTRAL_SAMPLING = {"top_k": 0, "min_p": 0.0, "repeat_penalty": 1.0}
# llama.cpp's server ends a running stream with [DONE] and no finish reason when another request
# arrives (its default --interrupt_requests true): a step cut short without a word. Said once, here.
INTERRUPTED = ("the server ended the stream without a finish reason (llama.cpp server: another request "
               "interrupted it; start the server with --interrupt_requests false)")
# Probe forms, recorded in the trace.
RUNNING_FORM = "server top-k, delimiter in running form"
TEXT_END_FORM = "server top-k, delimiter in text-end form"


@dataclass(frozen=True)
class Candidate:
    """One entry of a probe's top-K: the token's text and its log-probability."""

    text: str
    logprob: float


def api_key(spec: ModelSpec) -> str | None:
    """The key from the environment variable that `api_key_env` names (never from the file itself)."""
    if not spec.api_key_env:
        return None
    key = os.environ.get(spec.api_key_env)
    if not key:
        raise ConfigError(f"model {spec.name!r}: api_key_env names ${spec.api_key_env}, which is not set")
    return key


def endpoint_for(spec: ModelSpec, key: str | None = None) -> Endpoint:
    if not spec.base_url:
        raise ConfigError(f"model {spec.name!r}: backend openai needs base_url (e.g. http://127.0.0.1:8080/v1)")
    label = f"model {spec.name!r}" + (f" (served as {spec.model!r})" if spec.model else "")
    return Endpoint(label, spec.base_url, key, spec.timeout, spec.max_retries)


def served_models(endpoint: Endpoint, timeout: float | None = None, retries: int | None = None) -> list[str]:
    """The model ids `GET {base_url}/models` lists."""
    data = endpoint.get_json("/models", timeout, retries)
    entries = data.get("data")
    if not isinstance(entries, list):
        raise endpoint.fail(endpoint.url("/models"), "the model list has no `data` array")
    return [str(e.get("id")) for e in entries if isinstance(e, dict)]


def reachability(spec: ModelSpec, timeout: float = REACHABILITY_TIMEOUT) -> tuple[bool, str]:
    """`glimp models`: one quick GET of the model list, no retries; (reachable, what was found)."""
    endpoint = None
    try:
        endpoint = endpoint_for(spec, api_key(spec))
        endpoint.timeout = timeout
        models = served_models(endpoint, timeout, retries=0)
    except (BackendError, ConfigError) as exc:
        return False, str(exc)
    finally:
        if endpoint is not None:
            endpoint.close()
    if spec.model and spec.model not in models:
        return False, f"{spec.base_url} does not serve {spec.model!r} (it serves {', '.join(models) or 'nothing'})"
    return True, f"{spec.base_url} serves {spec.model or ', '.join(models)}"


class OpenAIBackend:
    """A model behind an OpenAI-compatible `/completions` endpoint; text in, text and top-K log-probabilities out."""

    context = "text"

    def __init__(self, spec: ModelSpec, endpoint: Endpoint | None = None):
        if spec.prompt.style != "plain":
            raise ConfigError(
                f"model {spec.name!r}: backend openai needs a prompt with style: plain (glimp cannot read the "
                "served model's chat template): write the template out, special tokens included"
            )
        self.spec = spec
        self.name = spec.name
        self.n_ctx = spec.n_ctx
        self.chat_template = None
        self.bos_token = ""
        self.eos_token = ""
        self.evaluated = 0  # tokens generated through this backend (what the server prefilled is not visible)
        self.endpoint = endpoint or endpoint_for(spec, api_key(spec))
        self.path = self.endpoint.base_url  # what `--verbose` prints as the model's location
        self.model = spec.model or self._only_served_model()
        self.text = ""  # the context the next probe or write continues (set by the router)
        self.prompt = ""  # the question's prompt, where `text` starts (set by the router)
        self.delimiter = "\n\n"
        self.top_k = 20
        self.probe_form: str | None = None
        self._candidates: list[Candidate] = []
        self._held_back: tuple[tuple[int, str], ...] | None = None  # delimiter tokens after the first
        self._split_known = False

    def _only_served_model(self) -> str:
        models = served_models(self.endpoint)
        if len(models) != 1:
            raise ConfigError(f"model {self.name!r}: {self.endpoint.base_url} serves {len(models)} models "
                              f"({', '.join(models) or 'none'}): set `model:` to one of them")
        return models[0]

    def check_served(self) -> None:
        """Refuse a model name the server does not list (llama.cpp's server would silently use its own)."""
        models = served_models(self.endpoint)
        if self.model not in models:
            raise self.endpoint.fail(self.endpoint.url("/models"),
                                     f"the server does not serve {self.model!r} (it serves {', '.join(models) or 'nothing'})")

    # -- probe ---------------------------------------------------------------------------------

    def next_logits(self) -> np.ndarray:
        """Top-K log-probabilities of the next token after `text`, best first (K = `top_k`)."""
        with self._prompt_fits():
            return self._next_logits()

    @contextlib.contextmanager
    def _prompt_fits(self):
        """A server refusing the bare prompt as too long is the question's problem, as in process."""
        try:
            yield
        except ContextFull as exc:
            if self.prompt and self.text == self.prompt:
                raise ContextLimitError(f"the prompt does not fit model {self.name!r} at {self.endpoint.base_url}: "
                                        f"{exc}") from None
            raise

    def _next_logits(self) -> np.ndarray:
        held = self._delimiter_tail()
        top = None
        if held and self.text.endswith(self.delimiter):
            tail = "".join(text for _, text in held)
            top = self._probe(self.text[: len(self.text) - len(tail)], held)
            if top is None:  # the server did not force the tokens: the text-end form from now on
                self._held_back = None
                self.probe_form = TEXT_END_FORM
        if top is None:
            top = self._probe(self.text, ())
        if any(math.isnan(lp) for _, lp in top):
            raise self.endpoint.fail(self.endpoint.url("/completions"),
                                     "the probe returned NaN log-probabilities (the served model's output is broken)")
        ranked = sorted(top, key=lambda entry: -entry[1])[: self.top_k]
        self._candidates = [Candidate(text, float(lp)) for text, lp in ranked]
        if not self._candidates:
            raise self.endpoint.fail(self.endpoint.url("/completions"), "the probe returned no log-probabilities")
        return np.array([c.logprob for c in self._candidates], dtype=np.float64)

    def _probe(self, prompt: str, forced: tuple[tuple[int, str], ...]) -> list[tuple[str, float]] | None:
        """The top log-probabilities after `prompt` + the `forced` tokens; None if the server did not force them."""
        body = self._body(prompt, max_tokens=len(forced) + 1, temperature=0.0)
        body["logprobs"] = self.top_k
        if forced:
            body["logit_bias"] = {str(token): FORCE_BIAS for token, _ in forced}
        positions: list[Position] = []
        finish = None
        for event in self._stream(body):
            finish = _choice(event).get("finish_reason") or finish
            positions += parse_logprobs(_choice(event).get("logprobs"))
        if finish is None:
            raise self.endpoint.fail(self.endpoint.url("/completions"), INTERRUPTED)
        if len(positions) < len(forced) + 1:
            if not positions:
                raise self.endpoint.fail(
                    self.endpoint.url("/completions"),
                    "the server returned no log-probabilities (llama.cpp server: start it with --logits_all true; "
                    f"vLLM: --max-logprobs >= {self.top_k})")
            return None
        if any(p.text != want for p, (_, want) in zip(positions, forced)):
            return None  # the server ignored logit_bias: fall back to the text-end form
        # A masked token (null, -inf) is dropped; NaN is kept so that the entropy refuses it.
        return [(text, lp) for text, lp in positions[len(forced)].top if lp != -math.inf]

    def _delimiter_tail(self) -> tuple[tuple[int, str], ...] | None:
        """The running-form delimiter's tokens after its first one, from the server's tokenizer (asked once)."""
        if not self._split_known:
            self._split_known = True
            pieces = self._tokenize_delimiter()
            self._held_back = tuple(pieces[1:]) if pieces and len(pieces) > 1 else None
            # One token either way needs nothing held back; no tokenizer leaves the text-end form.
            self.probe_form = RUNNING_FORM if pieces else TEXT_END_FORM
        return self._held_back

    def _tokenize_delimiter(self) -> list[tuple[int, str]] | None:
        """(id, text) of the tokens the delimiter is in running text, or None if the server cannot say.

        Tries llama-cpp-python's /extras/tokenize, then llama-server's and vLLM/SGLang's /tokenize (they
        differ in their fields), next to the /v1 root.
        """
        base = self.endpoint.base_url
        if not base.endswith("/v1"):
            return None
        root = Endpoint(self.endpoint.label, base[:-3], self.endpoint.api_key, self.endpoint.timeout, 0,
                        client=self.endpoint.client)
        sentinel = "A"
        for tokenize, detokenize in (
            (lambda text: root.post_json("/extras/tokenize", {"input": text, "model": self.model})["tokens"],
             lambda ids: root.post_json("/extras/detokenize", {"tokens": ids, "model": self.model})["text"]),
            (lambda text: root.post_json("/tokenize", {"content": text, "add_special": False,
                                                       "parse_special": False})["tokens"],
             lambda ids: root.post_json("/detokenize", {"tokens": ids})["content"]),
            (lambda text: root.post_json("/tokenize", {"model": self.model, "prompt": text,
                                                       "add_special_tokens": False})["tokens"],
             lambda ids: root.post_json("/detokenize", {"model": self.model, "tokens": ids})["prompt"]),
        ):
            try:
                ids = [int(t) for t in tokenize(self.delimiter + sentinel)]
                pieces, text = [], ""
                for token in ids:
                    piece = detokenize([token])
                    if not text and not piece:
                        continue  # a BOS token the endpoint added
                    text += piece
                    pieces.append((token, piece))
                    if text == self.delimiter:
                        return pieces
                    if not self.delimiter.startswith(text):
                        break
            except (BackendError, KeyError, TypeError, ValueError):
                continue
        return None

    # -- write ---------------------------------------------------------------------------------

    def write(self, first_token: int | None, stop: StepStop, sampling: Sampling,
              rng: np.random.Generator, on_text: TextSink | None = None,
              first_logits: np.ndarray | None = None) -> Written:
        """Continue `text` by one step; `first_token` is a position among the last probe's candidates.

        The step's end is found by the same scanner as in process (the server gets no stop strings),
        and the stream is closed there, which stops the server. With `first_logits` the write is scored
        from the server's top-K of every token (an estimate, like H_init).
        """
        with self._prompt_fits():
            return self._write(first_token, stop, sampling, rng, on_text, first_logits)

    def _write(self, first_token: int | None, stop: StepStop, sampling: Sampling, rng: np.random.Generator,
               on_text: TextSink | None, first_logits: np.ndarray | None) -> Written:
        start = perf_counter()
        scanner = StepScanner(stop, on_text)
        scored = first_logits is not None
        entropies: list[float] = []
        logprobs: list[float] = []
        prefix = ""
        n = 0
        if first_token is not None and self._candidates[first_token].text:
            prefix = self._candidates[first_token].text
            n = 1
            if scored:
                entropy, logprob = topk_score(first_logits, first_token)
                entropies.append(entropy)
                logprobs.append(logprob)
            ended = scanner.feed(prefix.encode("utf-8"))
            if ended:
                return self._written(scanner, n, ended, start, entropies, logprobs)
        if stop.max_new_tokens - n <= 0:
            scanner.close()
            return self._written(scanner, n, "length", start, entropies, logprobs)
        seed = int(rng.integers(0, 2**31 - 1))
        while True:
            # Each request asks for the step's own limit (a server refuses prompt + max_tokens past its
            # context); a step that became the answer goes on in another request, up to the answer's limit.
            budget = stop.limit(scanner.answering) - n
            body = self._body(self.text + scanner.buffer, max_tokens=budget, temperature=sampling.temperature,
                              top_p=sampling.top_p, seed=seed)
            if scored:
                body["logprobs"] = self.top_k
            reason, finish, generated = self._stream_step(body, scanner, scored, entropies, logprobs)
            n += generated
            self.evaluated += generated
            if reason is not None:
                break
            if finish is None:
                raise self.endpoint.fail(self.endpoint.url("/completions"), INTERRUPTED)
            if finish == "length" and generated < budget:
                reason = "context_full"  # the server shortened max_tokens to what fits its context
            elif finish == "length" and scanner.answering and n < stop.limit(True) and generated:
                continue
            else:
                reason = "length" if finish == "length" else "eos"  # no stop strings were sent: "stop" is EOS
            scanner.close()
            break
        return self._written(scanner, n, reason, start, entropies, logprobs)

    def _stream_step(self, body: dict, scanner: StepScanner, scored: bool, entropies: list[float],
                     logprobs: list[float]) -> tuple[str | None, str | None, int]:
        """One streamed completion fed to the scanner: (why the step ended or None, finish_reason, tokens)."""
        reason, finish, generated = None, None, 0
        stream = self._stream(body)
        try:
            for event in stream:
                choice = _choice(event)
                finish = choice.get("finish_reason") or finish
                piece = choice.get("text") or ""
                positions = parse_logprobs(choice.get("logprobs")) if scored else []
                if positions:
                    for position in positions:
                        entropies.append(position_entropy(position.top, self.top_k))
                        logprobs.append(position.logprob)
                        generated += 1
                elif choice.get("finish_reason") is None or piece:
                    generated += 1  # one event per token (a multi-byte character may take a few)
                if piece:
                    ended = scanner.feed(piece.encode("utf-8"))
                    if ended:
                        reason = ended
                        break
        finally:
            stream.close()  # closing the connection stops the server's generation
        return reason, finish, generated

    @staticmethod
    def _written(scanner: StepScanner, n: int, reason: str, start: float,
                 entropies: list[float], logprobs: list[float]) -> Written:
        # Token ids are not visible over HTTP: the tuple's length is the step's token count.
        return Written(scanner.text, (-1,) * n, reason, perf_counter() - start, tuple(entropies), tuple(logprobs))

    # -- requests ------------------------------------------------------------------------------

    def _body(self, prompt: str, max_tokens: int, temperature: float, top_p: float = 1.0,
              seed: int | None = None) -> dict:
        body = {"model": self.model, "prompt": prompt, "max_tokens": max_tokens,
                "temperature": temperature, "top_p": top_p, **NEUTRAL_SAMPLING}
        if seed is not None:
            body["seed"] = seed
        return body

    def _stream(self, body: dict) -> Iterator[dict]:
        """A completion stream; a too-long prompt becomes ContextFull however the server reports it."""
        events = self.endpoint.post_stream("/completions", body)
        try:
            first = next(events)
        except StopIteration:
            return iter(())
        except EmptyStream:
            # llama.cpp's server closes a stream without a word when the prompt does not fit; ask
            # once without streaming (one token) to get its error, which the endpoint turns into ContextFull.
            self.endpoint.post_json("/completions", {**body, "max_tokens": 1, "logprobs": None, "stream": False})
            raise self.endpoint.fail(self.endpoint.url("/completions"), "the stream closed before its first event")

        def chain() -> Iterator[dict]:
            # No EmptyStream can come from here: post_stream raises it only when it yielded nothing.
            try:
                yield first
                yield from events
            finally:
                events.close()

        return chain()

    def close(self) -> None:
        self._candidates = []
        self.endpoint.close()


def _choice(event: dict) -> dict:
    choices = event.get("choices")
    if isinstance(choices, list) and choices and isinstance(choices[0], dict):
        return choices[0]
    return {}


def connect(spec: ModelSpec, config_dir=None) -> OpenAIBackend:
    """The `openai` entry of the backend registry: a backend whose server lists the model (one GET)."""
    backend = OpenAIBackend(spec)
    if spec.model:
        backend.check_served()
    return backend
