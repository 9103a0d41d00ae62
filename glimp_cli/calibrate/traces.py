"""H_init values from recorded traces: the results files `glimp batch` writes, each step with its h_init."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

from glimp_cli.errors import InputError, UsageError
from glimp_cli.policies import LARGE, SMALL
from glimp_cli.report import numbered_results

# Which mode's steps give the H_init values when a traces file holds several: small mode probes
# every step of a trace that no routing changed, so it comes first.
TRACE_MODES = ("small", "glimp", "adaptive", "random", "step_entropy", "step_perplexity", "large")
# The pair settings the recorded H_init values depend on, so --write stores them with tau: where a
# step ends (delimiter; max_step_tokens, which cuts a step and probes mid-sentence), how H_init is
# estimated (estimator), and what the traces say at each step boundary (temperature and top_p: the
# probe is read at temperature 1 from raw logits, but the context it is read after was sampled with
# them). Not max_tokens: it only cuts traces short, so each recorded value is one that a longer trace
# holds too. Not seed: it picks one draw, not the distribution.
# probe_skip and probe_at too: what the probe reads past changes which token's entropy is H_init.
MEASURED_KEYS = ("delimiter", "estimator", "temperature", "top_p", "max_step_tokens", "probe_skip", "probe_at")
# Measured keys a results line leaves out when they have this value, not because they are unknown.
UNSET_MEANS = {"probe_skip": None, "probe_at": "first"}


@dataclass(frozen=True)
class Distribution:
    """The H_init values (nats, sorted) of every probed step of some traces."""

    values: tuple[float, ...]
    n_traces: int
    mode: str
    source: str
    recorded_with: frozenset = frozenset()  # (pair, estimator) pairs named in the traces' settings
    # What the traces were recorded with, each distinct one once: the MEASURED_KEYS, the models and
    # the questions file (see `recorded_settings`).
    recorded: tuple[dict, ...] = ()

    @property
    def n(self) -> int:
        return len(self.values)


def read_traces(path: str | Path) -> list[tuple[int, dict]]:
    """(line number, record) for every line of a results file; a line that is not a whole result is an error."""
    numbered, warnings = numbered_results(path)
    if warnings:
        problem = warnings[0].removesuffix("; skipped")
        raise InputError(f"{problem}: calibrate reads only whole results files "
                         "(glimp batch --resume repairs a torn last line)")
    return numbered


def trace_values(path: str | Path, line: int, record: dict) -> list[float]:
    """The H_init values of one record's probed steps; a step without a valid h_init names its line."""
    steps = record.get("steps")
    if not isinstance(steps, list):
        raise InputError(f"{path}: line {line}: no 'steps' list (not a glimp batch trace)")
    values = []
    for number, step in enumerate(steps, 1):
        if not isinstance(step, dict) or "h_init" not in step:
            raise InputError(f"{path}: line {line}: step {number} has no h_init (not a glimp batch trace)")
        h = step["h_init"]
        if h is None:  # a step nobody probed: the answer, or a baseline that does no routing work
            continue
        if isinstance(h, bool) or not isinstance(h, (int, float)) or not math.isfinite(h) or h < 0:
            raise InputError(f"{path}: line {line}: step {number} has h_init {h!r}, not an entropy in nats")
        values.append(float(h))
    return values


def distribution_from_traces(path: str | Path, mode: str | None = None,
                             ids: set[str] | None = None) -> Distribution:
    """The H_init distribution of a results file's traces of one mode (`ids`: only those questions).

    Without `mode`, the first of TRACE_MODES whose traces carry H_init values is used.
    """
    numbered = [(line, r) for line, r in read_traces(path) if ids is None or r["id"] in ids]
    if not numbered:
        raise InputError(f"{path}: holds no traces" + (" of these questions" if ids is not None else ""))
    per_mode: dict[str, list[tuple[dict, list[float]]]] = {}
    for line, record in numbered:
        per_mode.setdefault(record["mode"], []).append((record, trace_values(path, line, record)))
    probed = [m for m, traces in per_mode.items() if any(values for _, values in traces)]
    span = f"lines {numbered[0][0]}-{numbered[-1][0]}" if len(numbered) > 1 else f"line {numbered[0][0]}"
    if mode is None:
        if not probed:
            raise InputError(f"{path}: no step on {span} carries an h_init (large mode records none unless "
                             "run with --probe-baseline): record traces with glimp batch --mode small")
        mode = next((m for m in TRACE_MODES if m in probed), sorted(probed)[0])
    elif mode not in per_mode:
        raise UsageError(f"{path} holds no {mode} traces (it has {', '.join(sorted(per_mode))})")
    elif mode not in probed:
        raise InputError(f"{path}: no step of the {mode} traces on {span} carries an h_init")
    traces = per_mode[mode]
    values = sorted(v for _, vs in traces for v in vs)
    recorded = frozenset((r["settings"].get("pair"), r["settings"].get("estimator")) for r, _ in traces)
    distinct = {json.dumps(recorded_settings(r["settings"]), sort_keys=True): recorded_settings(r["settings"])
                for r, _ in traces}
    return Distribution(tuple(values), len(traces), mode, str(path), recorded, tuple(distinct.values()))


def recorded_settings(settings: dict) -> dict:
    """From a results line's settings: the MEASURED_KEYS, both model names and the questions file."""
    models = settings.get("models") if isinstance(settings.get("models"), dict) else {}
    questions = settings.get("questions") if isinstance(settings.get("questions"), dict) else {}
    return {**{key: settings.get(key, UNSET_MEANS.get(key)) for key in MEASURED_KEYS}, SMALL: models.get(SMALL),
            LARGE: models.get(LARGE), "questions": questions.get("path")}


def trace_questions(path: str | Path) -> list[str]:
    """The distinct question texts of a results file's traces (for the held-out check)."""
    return list(dict.fromkeys(r.get("question") for _, r in read_traces(path) if isinstance(r.get("question"), str)))
