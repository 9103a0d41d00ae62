"""Live progress of `glimp batch`: a bar per mode on a terminal, one plain line per result elsewhere."""

from __future__ import annotations

from dataclasses import dataclass

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TaskID, TextColumn, TimeRemainingColumn

from glimp_cli.policies import LARGE, SMALL


@dataclass
class ModeTally:
    """What one mode has done in this run: questions, graded and correct ones, steps by model."""

    done: int = 0
    graded: int = 0
    correct: int = 0
    large_steps: int = 0
    steps: int = 0

    def add(self, record: dict) -> None:
        self.done += 1
        if record.get("correct") is not None:
            self.graded += 1
            self.correct += bool(record["correct"])
        steps = record.get("model_steps") or {}
        self.large_steps += steps.get(LARGE, 0)
        self.steps += steps.get(SMALL, 0) + steps.get(LARGE, 0)

    def describe(self) -> str:
        accuracy = (f"accuracy {self.correct}/{self.graded} ({self.correct / self.graded:.0%})"
                    if self.graded else "accuracy -")
        share = f"large share {self.large_steps / self.steps:.0%}" if self.steps else "large share -"
        return f"{accuracy} · {share}"


class BatchProgress:
    """Follows a batch through `mode_started` (from router_for_mode) and `result` (run_batch's on_result).

    `pending` maps each mode with work to how many questions it has to run. On a terminal this
    is a rich Progress (count, ETA, running accuracy and large share per mode); otherwise each
    result is one plain line, so logs and pipes stay readable.
    """

    def __init__(self, console: Console, pending: dict[str, int]):
        self.console = console
        self.pending = pending
        self.tallies = {mode: ModeTally() for mode in pending}
        self._live = console.is_terminal
        self._progress: Progress | None = None
        self._tasks: dict[str, TaskID] = {}

    def __enter__(self) -> "BatchProgress":
        if self._live:
            self._progress = Progress(
                TextColumn("{task.description:<8}"), BarColumn(), MofNCompleteColumn(),
                TimeRemainingColumn(), TextColumn("{task.fields[stats]}"),
                console=self.console, transient=False,
            )
            for mode, total in self.pending.items():
                self._tasks[mode] = self._progress.add_task(mode, total=total, start=False, stats="")
            self._progress.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self._progress is not None:
            self._progress.stop()

    def mode_started(self, mode: str, settings: dict) -> None:
        label = mode
        if mode == "random" and settings.get("large_share") is not None:
            label = f"random at large share {settings['large_share']:.0%}"
        if self._progress is not None:
            self._progress.update(self._tasks[mode], description=label)
            self._progress.start_task(self._tasks[mode])
        else:
            self.console.print(f"{label}: {self.pending[mode]} questions", markup=False, highlight=False)

    def result(self, record: dict) -> None:
        mode = record["mode"]
        tally = self.tallies[mode]
        tally.add(record)
        if self._progress is not None:
            self._progress.update(self._tasks[mode], completed=tally.done, stats=tally.describe())
            return
        verdict = {True: "correct", False: "wrong", None: "ungraded"}[record.get("correct")]
        self.console.print(
            f"{mode} {tally.done}/{self.pending[mode]}  {record['id']}: {verdict} "
            f"(answer {record.get('extracted') or '-'}, {record['wall_seconds']:.1f} s)  ·  {tally.describe()}",
            markup=False, highlight=False,
        )
