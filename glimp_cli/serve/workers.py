"""Workers that each own one loaded pair (a llama.cpp context is not thread-safe), behind a bounded queue."""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import math
import sys
import threading
import traceback
import uuid
from collections import deque
from statistics import median
from time import monotonic, perf_counter
from typing import Callable

from glimp_cli import __version__
from glimp_cli.engine import Engine, pair_policy
from glimp_cli.errors import ContextLimitError, ConversationError, GlimpError
from glimp_cli.grading import extract_answer
from glimp_cli.prompts import Conversation, Turn
from glimp_cli.sides import ModelSlot, TokenSide
from glimp_cli.serve.protocol import ApiError, CompletionRequest, finish_reason
from glimp_cli.serve.stream import Aborted, TraceStream

SHUTDOWN = "shutdown"
DISCONNECTED = "disconnected"
OUTCOMES = ("done", "error", DISCONNECTED, SHUTDOWN)


class Job:
    """One request on its way through a worker; events come back on `events`, in the event loop."""

    def __init__(self, request: CompletionRequest, loop: asyncio.AbstractEventLoop):
        self.request = request
        self.loop = loop
        self.events: asyncio.Queue = asyncio.Queue()
        self.cancel_reason: str | None = None
        self.final: tuple | None = None  # the first "done" or "error" event, read by the access log and /metrics
        prefix = "chatcmpl" if request.kind == "chat" else "cmpl"
        self.ident = f"{prefix}-{uuid.uuid4().hex}"
        # The conversation this request continues (its turns before the question), for `WorkerPool`'s affinity.
        self.continues = earlier_turns(request.question) if request.kind == "chat" else None

    def cancel(self, reason: str) -> None:
        """Stop the job at its next token (or skip it if it is still waiting)."""
        if self.cancel_reason is None:
            self.cancel_reason = reason

    def put(self, event: tuple) -> None:
        """Hand an event to the request's handler; called from the worker thread."""
        if self.final is None and event[0] in ("done", "error"):
            self.final = event
        try:
            self.loop.call_soon_threadsafe(self.events.put_nowait, event)
        except RuntimeError:
            pass  # the event loop is closed: the server stopped and nobody waits any more


class WorkerPool:
    """The workers of one pair and the requests admitted to wait for them.

    At most `workers + queue_size` requests are admitted at once; past that `submit` answers 503
    with a Retry-After of the median recent request time. A conversation's next turn waits for the
    worker that served its last turn while that worker is idle (its models hold the turn in their KV
    cache); when that worker is busy, any worker takes it.
    """

    def __init__(self, name: str, engines: list[Engine], queue_size: int):
        self.name = name
        self.engines = engines
        self.queue_size = queue_size
        self.capacity = len(engines) + queue_size
        self.stopping = False  # set from the signal handler: only a flag, no lock
        self._lock = threading.Lock()
        self._changed = threading.Condition(self._lock)  # a job arrived, a worker became free, or stop
        self._admitted = 0
        self._waiting: deque[Job] = deque()
        self._closing = False
        self._recent: deque[float] = deque(maxlen=32)
        self.busy = 0
        self.outcomes: dict[str, int] = {}  # how admitted jobs ended: done, error, disconnected, shutdown
        self._unfinished: set[Job] = set()  # admitted jobs whose worker has not finished them
        self._running: list[Job | None] = [None] * len(engines)  # each worker's job
        self._served: list[tuple | None] = [None] * len(engines)  # the conversation each worker's cache holds
        # Set as each worker returns (after a Ctrl-C, Thread.join may take a live thread for stopped).
        self._exited = [threading.Event() for _ in engines]
        # Daemon threads: a worker that never returns (see `stop`) must not keep the process alive.
        self._threads = [threading.Thread(target=self._work, args=(i, engine), name=f"glimp-serve-{name}-{i}",
                                          daemon=True) for i, engine in enumerate(engines)]
        for thread in self._threads:
            thread.start()

    def submit(self, job: Job) -> None:
        """Admit a job, or raise a 503 ApiError when the workers and the queue are full."""
        with self._lock:
            if self.stopping:
                raise shutting_down()
            if self._admitted >= self.capacity:
                raise ApiError(503, f"pair {self.name!r} is at capacity: {len(self.engines)} worker(s) busy and "
                                    f"{self.queue_size} request(s) waiting; retry later",
                               kind="server_error", code="server_overloaded",
                               headers={"Retry-After": str(self.retry_after())})
            self._admitted += 1
            self._unfinished.add(job)
            self._waiting.append(job)
            self._changed.notify_all()

    def fit(self, request: CompletionRequest) -> CompletionRequest:
        """`fit_context` on this pool's models, run before the request takes a place in the queue.

        It only renders and tokenizes, which is safe beside a worker that generates (llama-server
        tokenizes in its HTTP threads too); every engine holds the same models, so the first serves.
        """
        return fit_context(self.engines[0], request)

    def load(self) -> dict:
        """Workers busy, requests waiting, and how the admitted requests ended so far."""
        with self._lock:
            return {"workers": len(self.engines), "busy": self.busy, "waiting": self._admitted - self.busy,
                    "queue": self.queue_size, **{k: self.outcomes.get(k, 0) for k in OUTCOMES}}

    def retry_after(self) -> int:
        """Seconds a client should wait: the median time of recent requests, at least 1."""
        return max(1, math.ceil(median(self._recent))) if self._recent else 1

    def begin_shutdown(self) -> None:
        """Make every running and waiting job stop at its next token (safe in a signal handler)."""
        self.stopping = True

    def fail_unfinished(self) -> None:
        """Answer every job no worker has finished with a 503 (their workers did not stop in time)."""
        with self._lock:
            jobs = list(self._unfinished)
        for job in jobs:
            job.put(("error", shutting_down()))

    def stop(self, deadline: float) -> list[str]:
        """Stop the workers, waiting for them until `deadline` (time.monotonic()), and release their models.

        Returns the workers still busy then, each with its request: they are abandoned, models and all.
        """
        self.stopping = True
        with self._lock:
            self._closing = True
            self._changed.notify_all()
        try:
            for exited in self._exited:
                exited.wait(max(0.0, deadline - monotonic()))
        except KeyboardInterrupt:
            pass  # another Ctrl-C: stop waiting
        abandoned = []
        for thread, exited, engine, job in zip(self._threads, self._exited, self.engines, self._running):
            if exited.is_set():
                engine.close()
            else:
                # Its models may be in use right now: releasing them under a running call could crash.
                abandoned.append(f"{thread.name} ({job.ident if job else 'between requests'})")
        return abandoned

    def _work(self, index: int, engine: Engine) -> None:
        try:
            self._serve_jobs(index, engine)
        finally:
            self._exited[index].set()

    def _serve_jobs(self, index: int, engine: Engine) -> None:
        while True:
            job = self._next_job(index)
            if job is None:
                return
            start = perf_counter()
            outcome = "error"
            try:
                outcome = run_job(engine, job, lambda: job.cancel_reason or (SHUTDOWN if self.stopping else None))
            finally:
                with self._lock:
                    self.busy -= 1
                    self._admitted -= 1
                    self._unfinished.discard(job)
                    self._running[index] = None
                    self._served[index] = served_turns(job)
                    self.outcomes[outcome] = self.outcomes.get(outcome, 0) + 1
                    self._changed.notify_all()
                self._recent.append(perf_counter() - start)

    def _next_job(self, index: int) -> Job | None:
        """The first waiting job worker `index` may take, once there is one; None when the pool stops.

        A job that continues the conversation another idle worker served is left to that worker.
        Jobs still waiting at a stop are taken all the same (each is answered that the server stops).
        """
        with self._lock:
            while True:
                for job in self._waiting:
                    home = self._home(job)
                    if self._closing or home is None or home == index or self._busy_with_unanswered(home):
                        self._waiting.remove(job)
                        self._running[index] = job
                        self.busy += 1
                        return job
                if self._closing:
                    return None
                self._changed.wait()

    def _home(self, job: Job) -> int | None:
        """The worker whose cache holds the conversation `job` continues, or None.

        A worker that has answered its job but not yet returned counts by that job: the client may
        send the next turn before the worker is free.
        """
        if job.continues is None:
            return None
        for i, (running, held) in enumerate(zip(self._running, self._served)):
            if running is not None and running.final is not None:
                held = served_turns(running)
            if held == job.continues:
                return i
        return None

    def _busy_with_unanswered(self, worker: int) -> bool:
        """Whether `worker` cannot take a job soon: it runs one not yet answered, or it has exited."""
        running = self._running[worker]
        return (running is not None and running.final is None) or self._exited[worker].is_set()


def shutting_down() -> ApiError:
    return ApiError(503, "the server is shutting down", kind="server_error", code="server_shutting_down",
                    headers={"Retry-After": "1"})


def earlier_turns(question: str) -> tuple | None:
    """A chat question's system text and turns before the question asked, or None for a first turn."""
    if not isinstance(question, Conversation) or len(question.turns) < 2:
        return None
    return question.system, question.turns[:-1]


def served_turns(job: Job) -> tuple | None:
    """What a conversation's next turn repeats of a finished chat job: its turns and the answer, or None."""
    if job.request.kind != "chat" or job.final is None or job.final[0] != "done":
        return None
    question = job.request.question
    system, turns = (question.system, question.turns) if isinstance(question, Conversation) else ("", (Turn("user", question),))
    return system, turns + (Turn("assistant", job.final[1]["content"]),)


def run_job(engine: Engine, job: Job, cancelled: Callable[[], str | None]) -> str:
    """Run one request's trace on this worker's pair; every outcome becomes one final event.

    Returns how it ended: one of OUTCOMES.
    """
    request = job.request
    reason = cancelled()
    if reason:
        if reason == SHUTDOWN:
            job.put(("error", shutting_down()))
        return reason  # a client that left while waiting needs no answer
    try:
        policy = pair_policy(request.pair)
        job.put(("started",))
        stream = TraceStream(request.pair.delimiter, request.stop, policy.rewrite is not None,
                             job.put if request.stream else None, cancelled)
        trace = engine.router(policy, request.pair).run(request.question, stream)
        try:
            for step in trace:
                stream.step_finished(step)
        except Aborted as exc:
            if exc.reason == DISCONNECTED:
                return DISCONNECTED
            if exc.reason == SHUTDOWN:
                job.put(("error", ApiError(503, "the server is shutting down: generation was stopped",
                                           kind="server_error", code="server_shutting_down")))
                return SHUTDOWN
            # A request stop string: the record (steps, summary, usage) shows what the content shows.
            trace.steps[:] = stream.shown_steps(trace.steps, functools.partial(written_tokens, engine, trace))
        content = stream.finish()
        if stream.held is not None:
            trace.steps.remove(stream.held)  # a blank last step: the content ends before it
        job.put(("done", trace_result(request, trace, policy, content, stream.stopped)))
        return "done"
    except ApiError as exc:
        job.put(("error", exc))
        return "error"
    except ContextLimitError as exc:
        job.put(("error", ApiError(400, str(exc), param=_question_param(request), code="context_length_exceeded")))
        return "error"
    except GlimpError as exc:
        job.put(("error", ApiError(500, str(exc), kind="server_error")))
        return "error"
    except Exception:  # a bug: the client gets an error body, the log gets the traceback
        traceback.print_exc(file=sys.stderr)
        job.put(("error", ApiError(500, "internal error in glimp serve (the server's log has the details)",
                                   kind="server_error")))
        return "error"


def fit_context(engine: Engine, request: CompletionRequest) -> CompletionRequest:
    """The request with max_tokens capped at what the context of each model its mode uses leaves after
    its prompt, and the prompt tokens per model; a 400 when a prompt does not fit."""
    pair = request.pair
    roles = pair_policy(pair).models
    room = pair.max_tokens
    lengths = {}
    for role in ("small", "large"):
        backend = engine.backends.get(role)
        if role not in roles or backend is None:
            continue
        if backend.context == "text":
            # A server-side model's tokenizer is not at hand: its server refuses a prompt that does not fit.
            room = min(room, backend.n_ctx)
            continue
        name = getattr(pair, role)
        side = TokenSide(ModelSlot(role, backend, engine.registry.model(name).prompt), pair.delimiter)
        try:
            n = len(side.prompt_tokens(request.question))  # as the router tokenizes it
        except ConversationError as exc:
            raise ApiError(400, f"this conversation cannot be rendered: {exc}", param="messages") from None
        if n >= backend.n_ctx:
            what = "conversation" if isinstance(request.question, Conversation) else "question"
            raise ApiError(400, f"the prompt is {n} tokens but model {name!r} has a context of {backend.n_ctx} "
                                f"tokens: shorten the {what}", param=_question_param(request),
                           code="context_length_exceeded")
        lengths[role] = n
        room = min(room, backend.n_ctx - n)
    return dataclasses.replace(request, pair=dataclasses.replace(pair, max_tokens=room), prompt_tokens=lengths)


def written_tokens(engine: Engine, trace, role: str, pieces: int) -> int:
    """Tokens `role` generated for the step a stop string stopped: its context past the settled trace.

    A server-side model's tokens are not visible: there, the text pieces it streamed (at most its tokens).
    """
    backend = engine.backends[role]
    if backend.context == "text":
        return pieces
    return len(backend.tokens) - trace.context_tokens[role]


def trace_result(request: CompletionRequest, trace, policy, content: str, stopped: bool) -> dict:
    """The finished request: content, finish_reason, usage and the `glimp` record (as `glimp ask --json`)."""
    pair, prompts = request.pair, request.prompt_tokens
    record = trace.to_dict()
    record.pop("question")
    if stopped:
        record["stop_reason"] = "request_stop"
    record.update(pair=pair.name, small=pair.small, large=pair.large, tau=pair.tau, mode=pair.mode,
                  estimator=pair.estimator, max_tokens=pair.max_tokens,
                  extracted_answer=extract_answer(trace.answer_text) if trace.steps else None,
                  timing=policy.timing, version=__version__, prompt_tokens=prompts,
                  large_share=record["summary"]["large_share_steps"])
    completion = sum(step.tokens for step in trace.steps)
    # Billed: the prompt of each model that read it (the trace started it), not of a model that never ran.
    prompt = sum(n for role, n in prompts.items() if role in trace.context_tokens)
    usage = {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}
    return {"content": content, "finish_reason": "stop" if stopped else finish_reason(trace.stop_reason),
            "usage": usage, "glimp": record}


def _question_param(request: CompletionRequest) -> str:
    return "messages" if request.kind == "chat" else "prompt"
