"""`glimp batch`: questions through one or more modes into an append-only JSON Lines results file.

Each finished (question, mode) is one line, written with flush + fsync before the next question
starts, so a crash or Ctrl-C loses at most the question in flight and never leaves half a record
that later lines build on. Resuming reads the file back, drops a torn last line, checks that the
run settings and the question texts are the same, and skips every (id, mode) already present.
One process writes a results file at a time: it holds an exclusive lock on it for the whole run.
"""

from __future__ import annotations

import dataclasses
import fcntl  # POSIX only (Linux, macOS): the results-file lock below is an flock
import json
import os
import tempfile
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO, Callable, Iterable

from glimp_cli import __version__
from glimp_cli.config import CONVERSATION_KEYS, PairSpec, Registry
from glimp_cli.errors import ContextLimitError, InputError, UsageError
from glimp_cli.grading import extract_answer, grade
from glimp_cli.policies import LARGE, MODES, SMALL
from glimp_cli.questions import Question
from glimp_cli.router import Router, Trace

# Settings that legitimately differ between the modes of one file, or that are stamped per record:
# they are left out when a resumed file's records are compared with this run's settings.
PER_MODE_KEYS = frozenset({"mode", "large_share", "baseline", "version"})
# Recorded with every result but not compared: a resume may widen --limit or follow a moved or
# appended questions file; what must not change, each done id's question text, is checked itself.
RECORDED_ONLY_KEYS = frozenset({"questions"})
# large_share is compared for this mode only: it is the adaptive policy's target. Random's share may
# be glimp's matched share, which moves as more glimp records are written; other modes ignore it.
SHARE_MODES = frozenset({"adaptive"})
# A threshold shapes only the modes that route by it: a large-alone record stays valid whatever tau is.
THRESHOLD_MODES = {"tau": frozenset({"glimp", "adaptive"}), "tau_after_large": frozenset({"glimp"}),
                   "step_entropy_threshold": frozenset({"step_entropy"}),
                   "step_perplexity_threshold": frozenset({"step_perplexity"})}

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


def check_writable(path: str | Path) -> None:
    """Raise InputError unless results can be written to `path`; call it before loading models."""
    path = Path(path)
    if not path.parent.is_dir():
        raise InputError(f"cannot write {path}: directory {path.parent} does not exist")
    if path.is_dir():
        raise InputError(f"cannot write {path}: it is a directory")
    try:
        # Really open something: permission bits say nothing about read-only mounts or root.
        if path.exists():
            with path.open("ab"):
                pass
        else:
            with tempfile.TemporaryFile(dir=path.parent):
                pass
    except OSError as exc:
        raise InputError(f"cannot write {path}: {exc.strerror or exc}") from None


class ResultsFile:
    """An append-only JSONL results file; every record is on disk before `append` returns."""

    def __init__(self, path: Path, file: BinaryIO, repaired: str | None = None, empty_on_start: bool = False):
        self.path = path
        self.repaired = repaired  # what resume cut away from a torn last line, if anything
        self.done: set[tuple[str, str]] = set()
        # (id, mode) -> (large steps, steps) among the steps a policy routed (those probed for an H_init):
        # what the random mode's matched share is made of. The steps no policy chooses (the answer after a
        # handover, a forced answer) stay out, as random mode gets the same ones on top of its own choices.
        self.step_counts: dict[tuple[str, str], tuple[int, int]] = {}
        self._file = file
        self._empty_on_start = empty_on_start  # --overwrite: emptied by `start`, not before

    @classmethod
    def open(cls, path: str | Path, resume: bool, settings_key: dict | Callable[[str], dict],
             overwrite: bool = False, questions: Iterable[Question] | None = None,
             source: str | Path | None = None) -> tuple["ResultsFile", set[tuple[str, str]]]:
        """Lock the file and open it for appending; returns it and the (id, mode) pairs it already holds.

        A file another process holds open this way is refused. Without `resume` a non-empty file is
        refused unless `overwrite`, and then kept as it is until `start` (so a run that cannot start
        loses nothing). With `resume` every record's settings must equal `settings_key` (one dict,
        or a function of the record's mode) except PER_MODE_KEYS and RECORDED_ONLY_KEYS, each record
        whose id is one of `questions` (read from `source`) must hold that question's text, and
        only then is a torn last line truncated away.
        """
        path = Path(path)
        check_writable(path)
        try:
            file = path.open("ab")
        except OSError as exc:
            raise InputError(f"cannot open results file {path}: {exc.strerror or exc}") from None
        try:
            _lock(file, path)
            if not resume:
                if not overwrite and path.stat().st_size > 0:
                    raise InputError(f"{path} already holds results: resume it or overwrite it")
                return cls(path, file, empty_on_start=overwrite), set()
            records, keep, torn = _read_records(path)
            key = settings_key if callable(settings_key) else (lambda mode: settings_key)
            wants: dict[str, dict] = {}
            for number, record in records:
                mode = record["mode"]
                if mode not in wants:
                    wants[mode] = _run_key(key(mode), mode)
                _check_settings(path, number, _run_key(record["settings"], mode), wants[mode])
            if questions is not None:
                _check_questions(path, records, questions, source)
            repaired = None
            if torn is not None:  # only now: a refused resume leaves the file as it was
                _truncate(path, keep)
                repaired = f"{path}: dropped the incomplete last line {torn} (an interrupted write)"
            results = cls(path, file, repaired)
        except OSError as exc:
            file.close()
            raise InputError(f"cannot open results file {path}: {exc.strerror or exc}") from None
        except BaseException:
            file.close()
            raise
        for _, record in records:
            results._index(record)
        return results, set(results.done)

    def start(self) -> None:
        """The run can start (its models are loaded): empty the file now if it is being overwritten."""
        if self._empty_on_start:
            self._file.truncate(0)
            os.fsync(self._file.fileno())
            self._empty_on_start = False

    def append(self, record: dict) -> None:
        """Write one record as one line and make it durable."""
        self.start()
        self._file.write((json.dumps(record, ensure_ascii=False) + "\n").encode("utf-8"))
        self._file.flush()
        os.fsync(self._file.fileno())
        self._index(record)

    def close(self) -> None:
        self._file.close()

    def __enter__(self) -> "ResultsFile":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _index(self, record: dict) -> None:
        key = (record["id"], record["mode"])
        self.done.add(key)
        steps = record.get("steps")
        if isinstance(steps, list):
            routed = [s for s in steps if isinstance(s, dict) and s.get("h_init") is not None]
            self.step_counts[key] = (sum(s.get("model") == LARGE for s in routed), len(routed))


def _read_records(path: Path) -> tuple[list[tuple[int, dict]], int, int | None]:
    """(line number, record) pairs, the byte length of the good part, and the torn line if any."""
    if not path.exists():
        return [], 0, None
    data = path.read_bytes()
    *lines, tail = data.split(b"\n")  # `tail` is empty when the file ends with a newline
    keep = len(data) - len(tail)
    torn = len(lines) + 1 if tail else None
    records = []
    for number, raw in enumerate(lines, 1):
        try:
            record = json.loads(raw)
        except ValueError:  # also UnicodeDecodeError
            if number == len(lines) and not tail:
                # Written up to its newline but damaged: the only line a crash can have touched.
                keep -= len(raw) + 1
                torn = number
                continue
            raise InputError(f"{path}: line {number} is not valid JSON (only a torn last line is repaired)") from None
        if not (isinstance(record, dict) and isinstance(record.get("id"), str)
                and isinstance(record.get("mode"), str) and isinstance(record.get("settings"), dict)):
            raise InputError(f"{path}: line {number} is not a glimp result (needs id, mode and settings)")
        records.append((number, record))
    return records, keep, torn


def _lock(file: BinaryIO, path: Path) -> None:
    """Hold an exclusive lock on the open results file until it is closed, or refuse if another run has it.

    flock, on the results file itself: the lock ends with the process however it ends (no stale
    lock file after a kill), and no second file sits beside the results. It is POSIX-only.
    """
    try:
        fcntl.flock(file.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        raise InputError(f"{path} is being written by another glimp run: wait for it to finish, "
                         "or write to another file") from None


def _truncate(path: Path, size: int) -> None:
    with path.open("r+b") as file:
        file.truncate(size)
        os.fsync(file.fileno())


def _run_key(settings: dict, mode: str) -> dict:
    """The settings compared for one mode's records (through JSON, so tuples equal the lists a file gives)."""
    skip = (PER_MODE_KEYS - ({"large_share"} if mode in SHARE_MODES else set())) | RECORDED_ONLY_KEYS
    skip |= {key for key, modes in THRESHOLD_MODES.items() if mode not in modes}
    return {k: v for k, v in json.loads(json.dumps(settings)).items() if k not in skip}


def _flatten(settings: dict, prefix: str = "") -> dict:
    """Nested settings as dotted names (`small_model.prompt.system`), so a refusal names the one that differs."""
    flat = {}
    for key, value in settings.items():
        if isinstance(value, dict) and value:
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[prefix + key] = value
    return flat


def _check_settings(path: Path, number: int, have: dict, want: dict) -> None:
    # A model's details count only where both sides used that model: a small-alone record does not
    # depend on the large model's, and a run that loads only the small one does not locate the large.
    one_sided = {k for k in set(have) ^ set(want) if k.endswith("_model")}
    have = _flatten({k: v for k, v in have.items() if k not in one_sided})
    want = _flatten({k: v for k, v in want.items() if k not in one_sided})
    for key in sorted(set(have) | set(want)):
        if have.get(key) != want.get(key):
            raise InputError(
                f"{path}: line {number} was written with {key}={have.get(key)!r} but this run has "
                f"{key}={want.get(key)!r}; resume only with the same settings, or use another file"
            )


def _check_questions(path: Path, records: list[tuple[int, dict]], questions: Iterable[Question],
                     source: str | Path | None) -> None:
    """Refuse a record whose id is one of `questions` but whose question text is another one's."""
    by_id = {q.id: q for q in questions}
    for number, record in records:
        question = by_id.get(record["id"])
        if question is not None and record.get("question") != question.question:
            where = f"{source}:{question.line}" if source else f"question line {question.line}"
            raise InputError(
                f"{path}: line {number} has id {record['id']!r} for the question {_brief(record.get('question'))}, "
                f"but {where} has id {record['id']!r} for {_brief(question.question)}: it was written for another "
                "question file (or the lines moved); use another output file"
            )


def _brief(text: object, width: int = 40) -> str:
    if not isinstance(text, str):
        return repr(text)
    text = " ".join(text.split())
    return repr(text if len(text) <= width else text[: width - 1] + "…")


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
