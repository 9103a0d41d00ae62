"""`glimp profile`: this machine's decode, catch-up prefill and probe costs, and the latency bound they set.

Per trace token, large alone costs one large decode. glimp costs, for a token the small model writes,
a small decode plus the large model's catch-up prefill of it; for a token the large model writes, a
large decode plus the small model's catch-up prefill; and one probe per step. So on a machine where
prefill is not much faster than decode (a 2-core CPU), routing saves large-model tokens but little
wall time; where prefill is 10-100x decode (a GPU), it saves both.
"""

from __future__ import annotations

import os
import statistics
from dataclasses import asdict, dataclass
from time import perf_counter
from typing import Mapping, Sequence

import numpy as np

from glimp_cli.entropy import exact_entropy
from glimp_cli.errors import UsageError
from glimp_cli.policies import LARGE, SMALL, Role
from glimp_cli.sides import ModelSlot, TokenSide

SHARES = tuple(i / 10 for i in range(11))
DEFAULT_STEP_TOKENS = 40  # a GSM8K reasoning line is ~20-40 tokens: the catch-up batch and tokens per probe
ROUNDS = 3  # per model: DECODE_TOKENS decoded, then one catch-up batch
DECODE_TOKENS = 16
PROBE_REPEATS = 16
# Below this share of large-alone's time saved at best (an all-small trace), routing "saves little".
LITTLE_SAVING = 0.25
GPU_LIKE = 10  # prefill / decode of the large model from which its catch-up is nearly free (GPUs: 10-100x)
SAMPLE_QUESTION = ("Janet's ducks lay 16 eggs per day. She eats three for breakfast every morning and bakes "
                   "muffins for her friends every day with four. She sells the remainder at the farmers' market "
                   "daily for $2 per fresh duck egg. How much in dollars does she make every day?")
SAMPLE_STEP = ("She has 16 - 3 - 4 = 9 eggs left after breakfast and baking, and she sells each of them "
               "for $2, so she makes 9 * 2 = 18 dollars at the market every day. ")


@dataclass(frozen=True)
class ModelRates:
    """One model's measured speeds, in tokens per second."""

    decode: float  # greedy generation, one token per evaluation
    prefill: float  # one catch-up batch of `batch` tokens after a prompt, as the router evaluates it
    batch: int


@dataclass(frozen=True)
class Rates:
    """Both models' speeds and the probe's cost (the small model's next logits + exact entropy)."""

    small: ModelRates
    large: ModelRates
    probe_seconds: float

    def of(self, role: Role) -> ModelRates:
        return self.small if role == SMALL else self.large

    @property
    def probe_vs_decode(self) -> float:
        """The probe's cost in small-model decode tokens."""
        return self.probe_seconds * self.small.decode


def work_seconds(rates: Rates, decoded: Mapping[str, float], prefilled: Mapping[str, float],
                 probes: float = 0.0) -> float:
    """Seconds that work takes at these rates: tokens each model decodes and prefills, plus probes."""
    return (sum(n / rates.of(role).decode for role, n in decoded.items())
            + sum(n / rates.of(role).prefill for role, n in prefilled.items())
            + probes * rates.probe_seconds)


def routed_work(tokens: float, large_share: float) -> tuple[dict, dict]:
    """(decoded, prefilled) tokens per model for a trace of `tokens` with `large_share` of them large-written.

    Each model decodes what it writes and catches up on (prefills) what the other one wrote.
    """
    large = tokens * large_share
    small = tokens - large
    return {SMALL: small, LARGE: large}, {SMALL: large, LARGE: small}


def relative_latency(rates: Rates, large_share: float, step_tokens: float = DEFAULT_STEP_TOKENS) -> float:
    """glimp's time / large alone's for the same trace tokens (one probe per step; prompts left out)."""
    decoded, prefilled = routed_work(1.0, large_share)
    glimp = work_seconds(rates, decoded, prefilled, probes=1.0 / step_tokens)
    return glimp / work_seconds(rates, {LARGE: 1.0}, {})


def break_even(rates: Rates, step_tokens: float = DEFAULT_STEP_TOKENS) -> float | None:
    """The large share below which glimp is faster than large alone; None if no share is."""
    at_zero = relative_latency(rates, 0.0, step_tokens)
    at_one = relative_latency(rates, 1.0, step_tokens)
    if at_zero >= 1.0:
        return None
    # The relative latency is linear in the share, and above 1 at share 1 (probes and catch-up).
    return (1.0 - at_zero) / (at_one - at_zero)


@dataclass(frozen=True)
class Profile:
    """What `glimp profile` measured and the bound it implies."""

    pair: str
    models: dict  # role -> model name
    threads: dict  # role -> threads the model runs on
    rates: Rates
    step_tokens: int

    def bound(self, shares: Sequence[float] = SHARES) -> list[tuple[float, float]]:
        """(large share, glimp / large alone) at each share."""
        return [(share, relative_latency(self.rates, share, self.step_tokens)) for share in shares]

    @property
    def break_even(self) -> float | None:
        return break_even(self.rates, self.step_tokens)

    @property
    def case(self) -> str:
        """tokens-only | little-time | tokens-and-time: what routing can save on this machine."""
        best = relative_latency(self.rates, 0.0, self.step_tokens)
        if best >= 1.0:
            return "tokens-only"
        return "little-time" if 1.0 - best < LITTLE_SAVING else "tokens-and-time"

    def verdict(self) -> str:
        """The machine's case in a sentence."""
        large = self.rates.large
        best = relative_latency(self.rates, 0.0, self.step_tokens)
        ratio = f"the large model's catch-up prefill is only {large.prefill / large.decode:.1f}x its decode"
        if self.case == "tokens-only":
            return (f"On this machine routing saves large-model tokens but no wall time: {ratio}, so even a trace "
                    f"the small model writes alone costs {best:.2f}x large alone.")
        if self.case == "little-time":
            return (f"On this machine routing saves large-model tokens but little wall time: {ratio}, so glimp is "
                    f"at best {best:.2f}x large alone (all steps small) and faster only below a large share of "
                    f"{self.break_even:.2f}.")
        like = " (GPU-like)" if large.prefill >= GPU_LIKE * large.decode else ""
        return (f"On this machine routing saves both large-model tokens and wall time{like}: the large model's "
                f"catch-up prefill is {large.prefill / large.decode:.1f}x its decode, so glimp can reach {best:.2f}x "
                f"large alone and is faster below a large share of {self.break_even:.2f}.")

    def to_dict(self) -> dict:
        """Plain data (the `--json` output)."""
        return {
            "pair": self.pair,
            "models": self.models,
            "threads": self.threads,
            "rates": {role: asdict(self.rates.of(role)) for role in (SMALL, LARGE)},
            "prefill_vs_decode": {role: self.rates.of(role).prefill / self.rates.of(role).decode
                                  for role in (SMALL, LARGE)},
            "probe_seconds": self.rates.probe_seconds,
            "probe_vs_small_decode_token": self.rates.probe_vs_decode,
            "step_tokens": self.step_tokens,
            "bound": [{"large_share": share, "glimp_vs_large": ratio} for share, ratio in self.bound()],
            "break_even_share": self.break_even,
            "case": self.case,
            "verdict": self.verdict(),
        }


def trace_work(record: Mapping) -> tuple[dict, dict, int]:
    """(decoded, prefilled, probes) of one batch record: what each model evaluated, and how.

    A model decoded the tokens it generated (the small model's discarded drafts included) and
    prefilled the rest of what it evaluated: its prompt and its catch-up on the other's steps.
    """
    tokens, evaluated = record["tokens"], record.get("evaluated_tokens") or {}
    decoded = {SMALL: tokens[SMALL] + record.get("discarded_tokens", 0), LARGE: tokens[LARGE]}
    prefilled = {role: max(0, evaluated[role] - decoded[role]) for role in (SMALL, LARGE) if role in evaluated}
    probes = sum(step.get("h_init") is not None for step in record.get("steps", ()))
    return decoded, prefilled, probes


def bound_seconds(record: Mapping, rates: Rates) -> float:
    """The time the work of one recorded trace takes at these rates: its latency with no loop overhead."""
    return work_seconds(rates, *trace_work(record))


def median_rates(measured: Sequence[Rates]) -> Rates:
    """Each rate's median over several profiles (e.g. one per session of a long benchmark)."""
    def model(role: Role) -> ModelRates:
        of = [r.of(role) for r in measured]
        return ModelRates(statistics.median(m.decode for m in of), statistics.median(m.prefill for m in of),
                          of[0].batch)

    return Rates(model(SMALL), model(LARGE), statistics.median(r.probe_seconds for r in measured))


def rates_from_dict(data: Mapping) -> Rates:
    """Rates back from `Profile.to_dict()` output."""
    rates = data["rates"]
    return Rates(ModelRates(**rates[SMALL]), ModelRates(**rates[LARGE]), data["probe_seconds"])


# --- measuring ----------------------------------------------------------------------------------


def step_tokens_of(backend, n: int) -> list[int]:
    """`n` tokens of reasoning text, as a catch-up batch would hold."""
    tokens: list[int] = []
    while len(tokens) < n:
        tokens += backend.tokenize(SAMPLE_STEP * 4)
    return tokens[:n]


def measure_models(backends: Mapping[str, object], prompts: Mapping[str, Sequence[int]], batch: int) -> dict:
    """Decode and catch-up prefill rates (ModelRates) per role, each model after its prompt.

    The models take turns, round by round, so a burst of load on a shared machine hits both; each
    rate is the fastest round's (decode: the median token of the round).
    """
    decode: dict = {role: [] for role in backends}
    prefill: dict = {role: [] for role in backends}
    steps = {}
    for role, backend in backends.items():
        backend.rewind(0)
        backend.extend(prompts[role])
        steps[role] = step_tokens_of(backend, batch)
    for _ in range(ROUNDS):
        for role, backend in backends.items():
            times = []
            for _ in range(DECODE_TOKENS):
                token = int(np.argmax(backend.next_logits()))
                t0 = perf_counter()
                backend.extend((token,))
                times.append(perf_counter() - t0)
            decode[role].append(statistics.median(times))
            at = len(backend.tokens)
            t0 = perf_counter()
            backend.extend(steps[role])
            prefill[role].append(perf_counter() - t0)
            backend.rewind(at)
    return {role: ModelRates(1.0 / min(decode[role]), batch / min(prefill[role]), batch) for role in backends}


def measure_probe(backend) -> float:
    """Seconds of one probe as the router makes it: next logits after a one-token eval, then exact entropy."""
    times = []
    at = len(backend.tokens)
    token = int(np.argmax(backend.next_logits()))
    for _ in range(PROBE_REPEATS):
        backend.extend((token,))
        t0 = perf_counter()
        exact_entropy(backend.next_logits())
        times.append(perf_counter() - t0)
        backend.rewind(at)
    return statistics.median(times)


def profile_engine(engine, step_tokens: int = DEFAULT_STEP_TOKENS) -> Profile:
    """Measure both loaded models of an Engine; their contexts are left empty afterwards."""
    if step_tokens < 1:
        raise UsageError(f"--step-tokens {step_tokens} must be at least 1")
    threads, models, prompts = {}, {}, {}
    for role in (SMALL, LARGE):
        backend = engine.backends[role]
        if backend.context == "text":
            raise UsageError(f"the {role} model {backend.name!r} is behind a server: glimp profile measures "
                             "in-process models only (their prefill and probe are not visible over HTTP)")
        spec = engine.registry.model(getattr(engine.pair, role))
        models[role] = spec.name
        threads[role] = spec.threads or os.cpu_count() or 1
        # A realistic context to measure after: the model's own prompt for a GSM8K question.
        prompts[role] = TokenSide(ModelSlot(role, backend, spec.prompt), engine.pair.delimiter).prompt_tokens(SAMPLE_QUESTION)
    rates = measure_models({role: engine.backends[role] for role in (SMALL, LARGE)}, prompts, step_tokens)
    probe = measure_probe(engine.backends[SMALL])
    for backend in engine.backends.values():
        backend.rewind(0)
    return Profile(engine.pair.name, models, threads, Rates(rates[SMALL], rates[LARGE], probe), step_tokens)


# --- showing it ---------------------------------------------------------------------------------


def render_profile(profile: Profile):
    """The rates, the bound per large share and the verdict, for the terminal."""
    from rich.console import Group
    from rich.table import Table
    from rich.text import Text

    r = profile.rates
    rates = Table(title=f"glimp profile · pair {profile.pair} ({profile.models[SMALL]} / {profile.models[LARGE]})",
                  title_justify="left", show_edge=False)
    for name in ("model", "threads", "decode tok/s", f"prefill tok/s ({profile.step_tokens}-token batch)",
                 "prefill / decode"):
        rates.add_column(name, justify="left" if name == "model" else "right")
    for role in (SMALL, LARGE):
        m = r.of(role)
        rates.add_row(f"{role}: {profile.models[role]}", str(profile.threads[role]), f"{m.decode:.1f}",
                      f"{m.prefill:.1f}", f"{m.prefill / m.decode:.1f}x")
    probe = Text(f"probe (small model: next logits + exact entropy): {1000 * r.probe_seconds:.2f} ms "
                 f"= {r.probe_vs_decode:.3f} of a small-model decode token")
    bound = Table(title="the latency glimp can reach, relative to large alone", title_justify="left",
                  show_edge=False)
    how = Text(f"per trace token: a large-written one costs a large decode + the small model's catch-up prefill, "
               f"a small-written one a small decode + the large model's catch-up prefill; one probe per "
               f"{profile.step_tokens}-token step; prompts and glimp's own loop overhead are left out")
    bound.add_column("large share", justify="right")
    bound.add_column("glimp / large alone", justify="right")
    for share, ratio in profile.bound():
        bound.add_row(f"{share:.1f}", Text(f"{ratio:.2f}x", style="green" if ratio < 1 else ""))
    even = profile.break_even
    line = ("break-even: no large share makes glimp faster than large alone" if even is None
            else f"break-even: glimp is faster than large alone below a large share of {even:.2f}")
    return Group(rates, Text(""), probe, Text(""), bound, how, Text(""), Text(line),
                 Text(profile.verdict(), style="bold"))
