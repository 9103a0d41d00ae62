"""glimp from Python: load a pair, route questions through it, run a batch, close it.

    from glimp_cli import load_pair

    with load_pair("tiny", max_tokens=128) as pair:
        for step in pair.route("What is 12 * 7?"):
            print(step.model, step.h_init, step.text)

`load_pair` loads the models the pair's mode needs; importing this module loads none. Every error is
a `glimp_cli.errors.GlimpError` (a bad setting a `ConfigError`, a model that will not load a
`ModelError`, ...). docs/python.md walks through it.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable, Iterator, Mapping, Union

from glimp_cli.config import PairSpec, Registry, apply_overrides, load_registry
from glimp_cli.errors import InputError, UsageError
from glimp_cli.typed_yaml import field_value

if TYPE_CHECKING:
    from glimp_cli.questions import Question
    from glimp_cli.trace import StepListener, Trace

# The settings `load_pair` takes as keywords: every setting of a pair in models.yaml.
SETTINGS = tuple(f.name for f in dataclasses.fields(PairSpec) if f.name not in ("name", "calibration"))
ARGUMENT = "argument"  # the source a keyword setting is reported under


def with_settings(registry: Registry, pair: PairSpec,
                  overrides: dict[str, tuple[Any, str]]) -> tuple[PairSpec, dict[str, str]]:
    """`pair` with `overrides` ({key: (value, source)}) over it, checked, and where each setting came from.

    Both of its models must be entries of the registry that load: an unknown or broken one fails here,
    before any model is loaded.
    """
    pair, sources = apply_overrides(pair, overrides, registry.pair_keys.get(pair.name, frozenset()))
    for role in ("small", "large"):
        registry.model(getattr(pair, role))
    return pair, sources


def load_pair(name: str | None = None, *, config: str | Path | None = None, probe_baseline: bool = False,
              **settings: Any) -> "Pair":
    """Load the pair called `name` (None: the registry's default pair), with `settings` over its own.

    The registry is the packaged models.yaml with `config` (else $GLIMP_CONFIG, else your user file)
    layered over it, as for the command line. `settings` are the keys a pair has in models.yaml
    (`tau`, `mode`, `max_tokens`, `small`, `large`, ...), with the values models.yaml would take:
    a `delimiter` is the text itself, not an escape. Other GLIMP_* variables are not read.
    `probe_baseline` makes large mode probe the small model too, as `--probe-baseline` does.
    """
    unknown = sorted(set(settings) - set(SETTINGS))
    if unknown:
        raise UsageError(f"load_pair: no setting named {unknown[0]!r} (known: {', '.join(SETTINGS)})")
    registry = load_registry(config)
    given = {key: (field_value(PairSpec, key, value, "load_pair"), ARGUMENT)
             for key, value in settings.items() if value is not None}
    pair, _ = with_settings(registry, registry.pair(name), given)
    return Pair(registry, pair, probe_baseline)


QuestionLike = Union[str, "Question", Mapping[str, Any]]


class Pair:
    """A small/large pair with its models loaded. Route questions through it, then close it (or use `with`).

    Its models serve one trace at a time: finish iterating one `route()` before starting the next.
    """

    def __init__(self, registry: Registry, spec: PairSpec, probe_baseline: bool = False):
        from glimp_cli.engine import Engine, pair_policy

        self.registry = registry
        self.spec = spec  # the resolved settings: spec.tau, spec.mode, spec.small, ...
        self.probe_baseline = probe_baseline
        self.policy = pair_policy(spec, probe_baseline)
        self.engine = Engine.load(registry, spec, set(self.policy.models))
        self._router = self.engine.router(self.policy)

    @property
    def name(self) -> str:
        return self.spec.name

    def route(self, question: str, listener: "StepListener | None" = None) -> "Trace":
        """Route one question: a `Trace` that yields one frozen `Step` per reasoning step as it is written.

        Nothing runs until it is iterated (`trace.run()` drains it). Afterwards it holds `steps`,
        `answer_text`, `stop_reason`, `summary()` and `to_dict()` (what `glimp ask --json` prints,
        without the pair's settings). `listener` gets the text as it streams (see `StepListener`).
        """
        self._check_open()
        return self._router.run(question, listener)

    def batch(self, questions: Iterable[QuestionLike]) -> Iterator[dict]:
        """Route each question to its end, yielding one record per question as it finishes.

        A question is a string, a `glimp_cli.questions.Question`, or a row as in a question file
        (`question` or `problem`, optional `answer` and `id`). A record is the line `glimp batch`
        writes for it (`answer_text`, `extracted`, `correct` against the reference answer, the
        `steps`, the timings, the `settings`), so `glimp report` reads a file of them. The pair runs
        in its own mode; random mode runs at the pair's `large_share` (glimp batch can match glimp's).
        """
        from glimp_cli.batch import batch_settings, result_record

        self._check_open()
        mode = self.spec.mode
        share = self.spec.large_share if mode in ("random", "adaptive") else None
        settings = {**batch_settings(self.registry, self.spec, self.policy.models, self.probe_baseline),
                    "large_share": share}
        for number, item in enumerate(questions, 1):
            question = _question(item, number)
            yield result_record(question, self._router.run(question.question).run(), mode, settings)

    def close(self) -> None:
        """Release the models; the pair cannot route after this."""
        self.engine.close()
        self._router = None

    def __enter__(self) -> "Pair":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<Pair {self.spec.name!r}: {self.spec.small} + {self.spec.large}, mode {self.spec.mode}>"

    def _check_open(self) -> None:
        if self._router is None:
            raise UsageError(f"pair {self.spec.name!r} is closed")


def _question(item: QuestionLike, number: int) -> "Question":
    from glimp_cli.questions import Question, Skipped, question_from_row

    if isinstance(item, Question):
        return item
    if isinstance(item, str):
        return Question(str(number), item, None, number)
    if isinstance(item, Mapping):
        parsed = question_from_row(dict(item), number)
        if isinstance(parsed, Skipped):
            raise InputError(f"question {number}: {parsed.reason}")
        return parsed
    raise UsageError(f"question {number}: a {type(item).__name__}, not a string, Question or mapping")


__all__ = ["Pair", "SETTINGS", "load_pair", "with_settings"]
