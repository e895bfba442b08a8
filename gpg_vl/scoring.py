"""A batch's rewards scored by a small pool of worker processes, each completion under a time limit.

One slow grader must not stall a step: a symbolic check can run for minutes on one
adversarial answer, inside C code that nothing but killing its process stops. So the
completions of a batch go one at a time to `task.reward_workers` processes; a worker that
overruns `task.reward_timeout_s` on a completion is killed, the completion scores 0 on
every component and is counted as a failure (as a reward that raises is), and a fresh worker
takes its place at once. N completions take at most about ceil(N / workers) limits.

How the processes are made, and why:
- The trainer's process has torch loaded (its thread pools, perhaps CUDA), which a fork must
  not copy. So a *zygote* is started as a fresh interpreter, sent the task once (pickled, with
  whatever its rows() built: a class list, say; a plugin file's module is imported again under
  the name pickle refers to), and it forks the workers. A fork of that small single-threaded
  process is safe and takes milliseconds, so a killed worker is replaced without delay.
- The zygote runs the dispatch loop (deadlines, kills, replacements) and never a reward: it
  cannot hang. The trainer sends it a batch and waits for one answer.
- In a worker, symbolic checks run in the worker itself (gpg_vl.rewards.check_symbolic_here),
  under the pool's limit. math-verify is imported and run once by the zygote the first time a
  worker needs it, and that completion is scored again by a fresh fork: no completion's limit
  is spent on importing sympy or building its parsers. (Where math-verify is missing, every
  such completion scores 0, counted.)
- One BLAS/OpenMP thread per process; a worker's address space may grow by WORKER_MEMORY.

The task is copied when its pool starts: a task must not change what its score reads after
that (the trainer and the evaluation load every split first). `task.reward_workers: 0` scores
in the calling process instead, where only symbolic checks are time-limited.
"""

from __future__ import annotations

import atexit
import collections
import ctypes
import math
import os
import pickle
import signal
import subprocess
import sys
import time
import weakref
from multiprocessing import Pipe
from multiprocessing.connection import Connection, wait
from typing import NoReturn, Sequence

from gpg_vl import rewards
from gpg_vl.task import Row, ScoreContext, Task, get_task_class

Score = tuple[dict[str, float], bool]
"""One completion's components and whether its reward ran to the end (as Task.safe_score gives)."""
WORKER_MEMORY = 2 << 30  # bytes of address space a worker may add to the zygote's
START_S = 120.0  # for the zygote's imports on a busy machine; no completion's limit
MAX_POOLS = 2  # live pools per process (one per task): an evaluation of a suite builds many tasks


def score_completions(task: Task, texts: Sequence[str], rows: Sequence[Row], ctx: ScoreContext) -> list[Score]:
    """`task.safe_score(texts[i], rows[i], ctx)` for every i, in the task's reward workers."""
    if task.config.reward_workers == 0:
        return [task.safe_score(text, row, ctx) for text, row in zip(texts, rows)]
    return pool_for(task).score(list(texts), list(rows), ctx)


def start_reward_workers(task: Task) -> None:
    """Start the task's pool now (its imports overlap the caller's work; a task that cannot be
    copied to the workers stops here, not at the first step)."""
    if task.config.reward_workers > 0:
        pool_for(task)


_POOLS: collections.OrderedDict[int, RewardPool] = collections.OrderedDict()


def pool_for(task: Task) -> RewardPool:
    key = id(task)
    if key not in _POOLS:
        while len(_POOLS) >= MAX_POOLS:
            _POOLS.popitem(last=False)[1].close()
        _POOLS[key] = RewardPool(task)
        weakref.finalize(task, _drop, key)  # the pool ends with its task
    _POOLS.move_to_end(key)
    return _POOLS[key]


def _drop(key: int) -> None:
    pool = _POOLS.pop(key, None)
    if pool is not None:
        pool.close()


@atexit.register
def close_all() -> None:
    while _POOLS:
        _POOLS.popitem()[1].close()


class RewardPool:
    """The trainer's side of one task's zygote and workers."""

    def __init__(self, task: Task):
        c = task.config
        if c.reward_workers < 1 or not c.reward_timeout_s > 0:
            raise ValueError("a reward pool needs task.reward_workers >= 1 and task.reward_timeout_s > 0")
        self.workers, self.timeout_s, self.name = c.reward_workers, c.reward_timeout_s, c.name
        try:
            blob = pickle.dumps(task)
        except Exception as err:  # pickle raises TypeError, AttributeError, PicklingError, ...
            raise RuntimeError(f"task {c.name!r} cannot be copied into its reward worker processes "
                               f"({type(err).__name__}: {err}): make it picklable, or set "
                               f"task.reward_workers=0 to score in this process") from err
        self.setup = (list(sys.path), c.name, blob, self.workers, self.timeout_s)
        self.proc: subprocess.Popen | None = None
        self.conn: Connection | None = None
        self.ready = False
        self._start()

    def _start(self) -> None:
        here, there = Pipe()
        self.proc = subprocess.Popen(
            [sys.executable, "-c", f"from gpg_vl.scoring import _zygote; _zygote({there.fileno()})"],
            pass_fds=[there.fileno()], stdin=subprocess.DEVNULL, stdout=sys.__stderr__, env=rewards.subprocess_env())
        there.close()
        self.conn, self.ready = here, False
        try:
            here.send(self.setup)
        except OSError:  # it exited at once; _wait_ready says so
            pass

    def _wait_ready(self) -> None:
        if self.ready:
            return
        try:
            reply = self.conn.recv() if self.conn.poll(START_S) else ("error", f"no answer in {START_S:.0f} s")
        except (EOFError, OSError):
            reply = ("error", "it exited (its messages are above)")
        if reply != "ready":
            self.close()
            raise RuntimeError(f"the reward workers of task {self.name!r} did not start: {reply[1]}")
        self.ready = True

    def score(self, texts: list[str], rows: list[Row], ctx: ScoreContext) -> list[Score]:
        if not texts:
            return []
        # Only a broken zygote (killed from outside, say) waits this long: the limits hold inside.
        patience = START_S + math.ceil(len(texts) / self.workers) * (self.timeout_s + 1.0)
        for attempt in (1, 2):
            if self.proc is None:
                self._start()
            self._wait_ready()
            try:
                self.conn.send((texts, rows, ctx))
                if self.conn.poll(patience):
                    return self.conn.recv()
                error: Exception = TimeoutError(f"no answer in {patience:.0f} s")
            except (EOFError, OSError) as err:
                error = err
            self.close()
        raise RuntimeError(f"the reward workers of task {self.name!r} failed twice ({error!r}); "
                           f"task.reward_workers=0 scores in the trainer's process instead")

    def close(self) -> None:
        if self.conn is not None:
            self.conn.close()  # the zygote reads the end of its input, stops its workers and exits
            self.conn = None
        if self.proc is not None:
            try:
                self.proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
            self.proc = None


# ---------------------------------------------------------------- in the zygote


def _zygote(fd: int) -> None:
    """The zygote's main: set up from the trainer's first message, then one batch at a time."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the trainer's to handle; it ends us by closing the pipe
    trainer = Connection(fd)
    try:
        path, name, blob, workers, timeout_s = trainer.recv()
        sys.path[:0] = [p for p in path if p not in sys.path]
        task = _unpickle_task(name, blob)
    except Exception as err:
        trainer.send(("error", f"{type(err).__name__}: {err}"))
        return
    pool = _Workers(task, workers, timeout_s, trainer)
    try:
        trainer.send("ready")
        while True:
            texts, rows, ctx = trainer.recv()
            trainer.send(pool.score(texts, rows, ctx))
    except (EOFError, BrokenPipeError):
        return  # the trainer has gone: nothing is left to score
    finally:
        pool.stop()


def _unpickle_task(name: str, blob: bytes) -> Task:
    try:
        get_task_class(name)  # imports the task files: their modules then exist under the names pickle refers to
    except (LookupError, OSError, ImportError, ValueError):
        pass  # a task built without the registry: pickle imports its module by name
    return pickle.loads(blob)


class _Workers:
    """The zygote's workers: forked, fed one completion at a time, killed on overrun."""

    def __init__(self, task: Task, n: int, timeout_s: float, trainer: Connection):
        self.task, self.timeout_s, self.trainer = task, timeout_s, trainer
        self.zero: Score = ({k: 0.0 for k in task.reward_components}, False)
        self.procs: list[tuple[int, Connection]] = []
        for _ in range(n):
            self.procs.append(self._fork())

    def _fork(self) -> tuple[int, Connection]:
        here, there = Pipe()
        pid = os.fork()
        if pid == 0:
            # The worker keeps only its own end: the zygote's death, or its closing, ends it.
            for c in [here, self.trainer, *(c for _, c in self.procs)]:
                c.close()
            _serve(self.task, there)
        there.close()
        return pid, here

    def _replace(self, w: int) -> None:
        pid, conn = self.procs[w]
        conn.close()
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        os.waitpid(pid, 0)
        self.procs[w] = self._fork()

    def score(self, texts: list[str], rows: list[Row], ctx: ScoreContext) -> list[Score]:
        results: list[Score | None] = [None] * len(texts)
        todo = collections.deque(range(len(texts)))
        busy: dict[int, tuple[int, float]] = {}  # worker -> (completion, deadline)
        while todo or busy:
            for w in range(len(self.procs)):
                if w not in busy and todo:
                    i = todo.popleft()
                    try:
                        self.procs[w][1].send((texts[i], rows[i], ctx))
                        busy[w] = (i, time.monotonic() + self.timeout_s)
                    except OSError:  # the worker died between completions
                        todo.appendleft(i)
                        self._replace(w)
            if not busy:  # every send found a dead worker, now replaced: send again
                continue
            wait([self.procs[w][1] for w in busy], max(0.0, min(d for _, d in busy.values()) - time.monotonic()))
            for w, (i, deadline) in list(busy.items()):
                conn = self.procs[w][1]
                if conn.poll(0):  # an answer (read before any deadline is judged), or the worker's end
                    del busy[w]
                    try:
                        kind, value = conn.recv()
                    except (EOFError, OSError):  # it died (a crash in C code, say): a failed reward
                        kind, value = "died", None
                    if kind == "score":
                        results[i] = value
                        continue
                    if kind == "warm" and rewards.warm_symbolic():
                        todo.appendleft(i)  # scored again by a fork that has math-verify ready
                    else:
                        results[i] = self.zero
                    self._replace(w)
                elif time.monotonic() >= deadline:
                    del busy[w]
                    results[i] = self.zero
                    self._replace(w)
        return results

    def stop(self) -> None:
        for pid, conn in self.procs:
            conn.close()
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
        self.procs = []


def _serve(task: Task, conn: Connection) -> NoReturn:
    """A worker's life: score what comes, until the zygote closes the pipe. Never returns (it
    is a fork of the zygote and must not run on into the zygote's code)."""
    try:
        rewards.limit_memory(WORKER_MEMORY)
        try:  # Linux: die with the zygote, even in the middle of a runaway computation
            ctypes.CDLL(None).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
        except (OSError, AttributeError):
            pass

        def request() -> NoReturn:
            conn.send(("warm", None))
            os._exit(0)

        rewards.check_symbolic_here(request)
        while True:
            try:
                text, row, ctx = conn.recv()
            except EOFError:
                break
            conn.send(("score", task.safe_score(text, row, ctx)))
    finally:
        os._exit(0)

