"""`glimp batch`: questions through one or more modes, one record per finished (question, mode).

The records go to an append-only, resumable results file (results_file.py); here are the run settings
that key it, the record of one trace, and the run over the modes (random after glimp, at its share).
"""

from __future__ import annotations

import dataclasses
import threading
from dataclasses import dataclass, field
from typing import Callable, Iterable

from glimp_cli import __version__
from glimp_cli.config import CONVERSATION_KEYS, PairSpec, Registry
from glimp_cli.errors import ContextLimitError, UsageError
from glimp_cli.grading import extract_answer, grade
from glimp_cli.policies import LARGE, MODES, SMALL
from glimp_cli.questions import Question
from glimp_cli.results_file import ResultsFile
from glimp_cli.router import Router
from glimp_cli.trace import Trace

BASELINE = "baseline"
ROUTED = "routed"
PROBED = "probed (not a baseline)"


def pair_settings(pair: PairSpec) -> dict:
    """The run settings every record of one results file shares (the resume key).

    `probe_skip` and `tau_after_large` are there only when set, `probe_at` only when not "first", and
    `forced_answer_tokens` only when answers are forced, so results written before they existed keep their key (and mean what they did).
    """
    settings = {
        "pair": pair.name,
        "models": {SMALL: pair.small, LARGE: pair.large},
        "tau": pair.tau,
        "seed": pair.seed,
        "estimator": pair.estimator,
        "temperature": pair.temperature,
        "top_p": pair.top_p,
        "max_tokens": pair.max_tokens,
        "max_step_tokens": pair.max_step_tokens,
        "delimiter": pair.delimiter,
        "step_entropy_threshold": pair.step_entropy_threshold,
        "step_perplexity_threshold": pair.step_perplexity_threshold,
    }
    for key in ("probe_skip", "tau_after_large"):
        if getattr(pair, key) is not None:
            settings[key] = getattr(pair, key)
    if pair.forced_answer_tokens:
        settings["forced_answer_tokens"] = pair.forced_answer_tokens
    if pair.probe_at != "first":
        settings["probe_at"] = pair.probe_at
    return settings


def model_details(registry: Registry, name: str) -> dict:
    """What a model brings to its results: its weights (GGUF path and size, or the server), prompt format,
    stop strings and context size.

    The GGUF is located (assembled or downloaded on first use, as loading would do next); its size
    stands for its content, since hashing a many-gigabyte file on every resume would cost minutes.
    """
    from glimp_cli.sources import resolve

    spec = registry.model(name)
    if spec.source is None:  # behind a server
        weights = {"base_url": spec.base_url, "model": spec.model}
    else:
        origin = registry.origin.get(f"models.{name}")
        path = resolve(spec, origin.parent if origin else None)
        weights = {"path": str(path), "size": path.stat().st_size}
    # A conversation's places in a plain template never shape a batch's single-question prompts.
    prompt = {k: v for k, v in dataclasses.asdict(spec.prompt).items() if k not in CONVERSATION_KEYS}
    return {"file": weights, "prompt": prompt, "stop": list(spec.stop),
            "n_ctx": spec.n_ctx}


def batch_settings(registry: Registry, pair: PairSpec, roles: Iterable[str], probe_baseline: bool = False,
                   questions: dict | None = None) -> dict:
    """The resume key of a batch: the pair's settings, the details of each model in `roles`, whether
    large mode probes, and (recorded, not compared) where the questions came from."""
    settings = pair_settings(pair)
    for role in sorted(set(roles)):
        settings[f"{role}_model"] = model_details(registry, getattr(pair, role))
    settings["probe_baseline"] = probe_baseline
    if questions is not None:
        settings["questions"] = questions
    return settings


def timing_kind(mode: str, probed: bool) -> str:
    """Whether a mode's timings can stand as a baseline: only when it does no routing work."""
    if mode == "small" or (mode == "large" and not probed):
        return BASELINE
    if mode == "large":
        return PROBED  # the small model's probes and catch-up prefill are in its wall time
    return ROUTED


def result_record(question: Question, trace: Trace, mode: str, settings: dict) -> dict:
    """One results-file line for a finished trace.

    `settings` is stored as given, stamped with `mode`, the glimp `version`, and `baseline`
    (derived from the policy the trace actually ran, so it cannot disagree with `timing`).
    """
    data = trace.to_dict()
    summary = data["summary"]
    extracted = extract_answer(data["answer_text"])
    timing = timing_kind(mode, trace.router.policy.needs_probe)
    return {
        "id": question.id,
        "line": question.line,
        "mode": mode,
        "policy": data["policy"],
        "question": question.question,
        "reference": question.reference,
        "answer_text": data["answer_text"],
        "extracted": extracted,
        "correct": grade(extracted, question.reference),
        "stop_reason": data["stop_reason"],
        "forced_answer": data["forced_answer"],
        "model_steps": summary["steps"],
        **{key: value for key, value in summary.items() if key != "steps"},
        "timing": timing,
        "settings": {**settings, "mode": mode, "version": __version__, "baseline": timing == BASELINE},
        "steps": data["steps"],
    }


@dataclass
class BatchOutcome:
    """What a `run_batch` call did."""

    written: int = 0
    already_done: int = 0  # (question, mode) pairs skipped because the file held them
    failed: list[tuple[str, str, str]] = field(default_factory=list)  # (id, mode, why): not written
    interrupted: bool = False  # Ctrl-C or `stop`: the question in flight was not written
    random_share: float | None = None  # the large share the random mode ran at


def order_modes(modes: Iterable[str]) -> list[str]:
    """Modes without repeats, in the given order except that glimp comes before random."""
    ordered = list(dict.fromkeys(modes))
    unknown = [m for m in ordered if m not in MODES]
    if unknown:
        raise UsageError(f"mode {unknown[0]!r} is not one of {', '.join(MODES)}")
    if "glimp" in ordered and "random" in ordered and ordered.index("random") < ordered.index("glimp"):
        ordered.remove("glimp")
        ordered.insert(ordered.index("random"), "glimp")
    return ordered


def matched_share(out: ResultsFile, questions: list[Question]) -> float | None:
    """The pooled large share of the routed steps the glimp mode reached on `questions` in `out`."""
    counts = [out.step_counts[(q.id, "glimp")] for q in questions if (q.id, "glimp") in out.step_counts]
    total = sum(all_steps for _, all_steps in counts)
    return sum(large for large, _ in counts) / total if total else None


NEEDS_SHARE = ("random mode needs a large share: give one, or run glimp mode on the same "
               "questions into the same results file")


def _random_share(out: ResultsFile, questions: list[Question]) -> float:
    share = matched_share(out, questions)
    if share is None:
        raise UsageError(NEEDS_SHARE)
    return share


def pending_modes(questions: list[Question], modes: Iterable[str], done: set[tuple[str, str]]) -> list[str]:
    """The modes, in run order, that still have a question not in `done`."""
    return [m for m in order_modes(modes) if any((q.id, m) not in done for q in questions)]


def check_random_share(modes: Iterable[str], fixed_share: float | None, questions: list[Question],
                       out: ResultsFile | None = None) -> None:
    """Refuse random mode up front when it would have no share to run at.

    That is: no share given, no glimp mode in this batch, and no glimp records of these questions
    in `out` (None: before the file is opened, so none). Call it before loading models.
    """
    modes = list(modes)
    if "random" in modes and fixed_share is None and "glimp" not in modes:
        if out is None:
            raise UsageError(NEEDS_SHARE)
        _random_share(out, questions)


def run_batch(router_for_mode: Callable[[str, dict], Router], questions: list[Question], modes: list[str],
              out: ResultsFile, done: set[tuple[str, str]], settings_for_mode: Callable[[str], dict],
              on_result: Callable[[dict], None] | None = None,
              stop: threading.Event | None = None, concurrency: int = 1,
              worker_router: Callable[[str, dict, int], Router] | None = None) -> BatchOutcome:
    """Run every question not in `done` through each mode, appending one record per question.

    `router_for_mode(mode, settings)` is called once per mode that has work, with that mode's
    settings as they will be recorded; it should wrap models loaded once for the whole batch.

    Random mode: when `settings_for_mode("random")["large_share"]` is None, it runs at the pooled
    share of steps (large steps / all steps) that glimp mode reached on these same questions in
    this file, counting resumed records; glimp is therefore always run first.

    Ctrl-C (KeyboardInterrupt) or a set `stop` ends the batch: the question in flight is not
    written, every finished one stays, and the outcome is returned with `interrupted=True`
    (the exception is not re-raised). A question whose prompt does not fit a model's context is
    listed in `failed` and not written, so a resume tries it again.

    `concurrency` > 1 keeps that many questions of a mode in flight, one thread each (for models
    behind servers: the threads wait on HTTP). Worker 0 uses `router_for_mode`'s router, worker i
    `worker_router(mode, settings, i)`, which must share no backend with the others. Each question's
    steps stay in order in its own thread; records are appended whole, in the order questions finish.
    """
    modes = order_modes(modes)
    outcome = BatchOutcome()
    fixed_share = settings_for_mode("random").get("large_share") if "random" in modes else None
    if "random" in modes and fixed_share is None and "glimp" not in modes:
        _random_share(out, questions)  # refuse before any model work, not after the other modes
    for mode in modes:
        todo = [q for q in questions if (q.id, mode) not in done]
        outcome.already_done += len(questions) - len(todo)
        if not todo:
            continue
        settings = dict(settings_for_mode(mode))
        if mode == "random":
            if settings.get("large_share") is None:
                settings["large_share"] = _random_share(out, questions)
            outcome.random_share = settings["large_share"]
        router = router_for_mode(mode, settings)
        out.start()  # the models are loaded: only now may --overwrite empty the old results
        workers = min(concurrency, len(todo))
        if workers > 1:
            routers = [router] + [worker_router(mode, settings, i) for i in range(1, workers)]
            if _run_concurrently(routers, todo, mode, settings, out, done, outcome, on_result, stop):
                return outcome
            continue
        for question in todo:
            if stop is not None and stop.is_set():
                outcome.interrupted = True
                return outcome
            try:
                trace = router.run(question.question).run()
                record = result_record(question, trace, mode, settings)
                out.append(record)
                done.add((question.id, mode))
                outcome.written += 1
                if on_result is not None:
                    on_result(record)
            except KeyboardInterrupt:
                outcome.interrupted = True
                return outcome
            except ContextLimitError as exc:
                outcome.failed.append((question.id, mode, str(exc)))
    return outcome


def _run_concurrently(routers: list[Router], todo: list[Question], mode: str, settings: dict, out: ResultsFile,
                      done: set[tuple[str, str]], outcome: BatchOutcome,
                      on_result: Callable[[dict], None] | None, stop: threading.Event | None) -> bool:
    """One mode's questions over one thread per router; True if interrupted.

    The results file, `done`, `outcome` and `on_result` are touched under one lock. A failure in a
    worker stops the others from taking new questions; what they finish is still written, then the
    first failure is raised here. Ctrl-C returns at once: nothing finishing later is written.
    """
    lock = threading.Lock()
    pending = iter(todo)
    halt = threading.Event()
    errors: list[BaseException] = []
    cancelled = False

    def worker(router: Router) -> None:
        while not halt.is_set() and not (stop is not None and stop.is_set()):
            with lock:
                question = next(pending, None)
            if question is None:
                return
            try:
                record = result_record(question, router.run(question.question).run(), mode, settings)
            except ContextLimitError as exc:
                with lock:
                    outcome.failed.append((question.id, mode, str(exc)))
                continue
            except BaseException as exc:  # a server gone, a bug: stop taking questions, report it once
                with lock:
                    errors.append(exc)
                halt.set()
                return
            with lock:
                if cancelled:
                    return
                out.append(record)
                done.add((question.id, mode))
                outcome.written += 1
                if on_result is not None:
                    on_result(record)

    threads = [threading.Thread(target=worker, args=(r,), name=f"glimp-batch-{i}", daemon=True)
               for i, r in enumerate(routers)]
    for thread in threads:
        thread.start()
    try:
        for thread in threads:
            while thread.is_alive():
                thread.join(0.2)  # short joins, so Ctrl-C reaches this (main) thread
    except KeyboardInterrupt:
        with lock:
            cancelled = True  # a question finishing after this is dropped, like the one in flight
        halt.set()
        outcome.interrupted = True
        return True
    if errors:
        raise errors[0]
    if stop is not None and stop.is_set():
        outcome.interrupted = True
        return True
    return False
