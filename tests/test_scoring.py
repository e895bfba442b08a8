"""The reward pool: the same scores as in-process scoring, each completion under its time limit,
a failing or crashing reward a counted zero, a batch of slow completions bounded by
ceil(N / workers) limits."""

import gc
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from gpg_vl.boxes import NormalizedBoxes
from gpg_vl.scoring import RewardPool, pool_for, score_completions, start_reward_workers
from gpg_vl.task import ScoreContext, Task, TaskConfig, build_task

ROOT = Path(__file__).resolve().parent.parent
UNRULY = str(ROOT / "tests" / "plugins" / "unruly_task.py")
CTX = ScoreContext(boxes=NormalizedBoxes())


@pytest.fixture(autouse=True)
def one_thread(monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")


def unruly(timeout_s=0.5, workers=2) -> Task:
    return build_task(TaskConfig(name=UNRULY, reward_timeout_s=timeout_s, reward_workers=workers))


def test_the_pool_scores_as_the_task_does_in_process():
    task = build_task(TaskConfig(name="lisa", reward_workers=2))  # continuous rewards: GIoU + 1, IoU
    rows = task.rows("train")[:4]
    texts = [f"<think>a</think> <answer>({x},{y}),({x + 300},{y + 200})</answer>" for x, y in
             [(0, 0), (100, 250), (420, 80), (600, 600)]] + ["<answer>(1,2)</answer>", "no box"]
    rows = rows + rows[:2]
    here = [task.safe_score(t, r, CTX) for t, r in zip(texts, rows)]
    assert score_completions(task, texts, rows, CTX) == here  # bit for bit
    assert len({c["accuracy"] for c, _ in here}) >= 4  # the completions are scored differently


def test_a_reward_that_raises_crashes_or_gives_nan_is_a_counted_zero():
    task = unruly()
    rows = task.rows("train")
    got = score_completions(task, ["ab", "raise", "crash", "nan", "abc"], rows[:5], CTX)
    # "ab" on row 0 scores 2 + 0; "abc" on row 4 scores 3 + 4; the others 0, not ok
    assert got == [({"accuracy": 2.0}, True), ({"accuracy": 0.0}, False), ({"accuracy": 0.0}, False),
                   ({"accuracy": 0.0}, False), ({"accuracy": 7.0}, True)]


def test_a_batch_of_slow_completions_is_bounded_by_its_share_of_limits():
    limit, workers, n = 0.5, 2, 12
    task = unruly(limit, workers)
    rows = task.rows("train")
    start_reward_workers(task)
    score_completions(task, ["warm"], rows[:1], CTX)  # the zygote has started: time the scoring only
    # Each completion is stopped at the limit, two at a time: 12 x 0.5 / 2 = 3 s (each would take 60 s;
    # one worker with the limit would take 6 s). The slack is for killing and forking 12 workers; a
    # second try is for a stall of the shared machine, the best of the two is judged.
    bound, tries = limit * n / workers, []
    for _ in range(2):
        start = time.monotonic()
        got = score_completions(task, ["slow", "spin"] * (n // 2), [rows[0]] * n, CTX)
        tries.append(time.monotonic() - start)
        assert got == [({"accuracy": 0.0}, False)] * n
        if tries[-1] < bound + 1.0:
            break
    assert bound - 0.05 <= min(tries) < bound + 1.0, tries
    # The replaced workers score the next batch at once.
    start = time.monotonic()
    assert score_completions(task, ["a", "slow", "bc"], rows[:3], CTX) == \
        [({"accuracy": 1.0}, True), ({"accuracy": 0.0}, False), ({"accuracy": 4.0}, True)]
    assert time.monotonic() - start < limit + 0.5


def test_a_symbolic_bomb_is_stopped_in_the_worker_and_the_right_answers_still_count():
    task = build_task(TaskConfig(name="math", reward_timeout_s=1.0, reward_workers=2))
    row = {**task.rows("train")[0], "answer": "\\frac{3}{4}"}
    texts = ["\\boxed{9^{9^{9^{9}}}}", "\\boxed{0.75}", "\\boxed{10^{10^{10}}}", "\\boxed{\\frac{6}{8}}",
             "\\boxed{9^{9^{9^{9}}}}", "\\boxed{1/3}"]
    start_reward_workers(task)
    score_completions(task, ["\\boxed{3/4}"], [row], CTX)  # math-verify is imported once, not on any limit
    start = time.monotonic()
    got = score_completions(task, texts, [row] * len(texts), CTX)
    took = time.monotonic() - start
    assert got == [({"accuracy": 0.0}, False), ({"accuracy": 1.0}, True), ({"accuracy": 0.0}, False),
                   ({"accuracy": 1.0}, True), ({"accuracy": 0.0}, False), ({"accuracy": 0.0}, True)]
    assert took < math.ceil(len(texts) / 2) * 1.0 + 1.5, took  # 3 bombs of 1 s over two workers, and slack


def test_scoring_in_the_calling_process_gives_the_same_scores():
    rows = unruly().rows("train")[:3]
    texts = ["a", "raise", "nan"]
    assert score_completions(unruly(workers=0), texts, rows, CTX) == score_completions(unruly(), texts, rows, CTX)


class Unpicklable(Task):
    def __init__(self, config):
        super().__init__(config)
        self.lock = __import__("threading").Lock()

    def rows(self, split):
        return [{}]

    def prompt(self, row):
        return ""

    def score(self, completion, row, ctx):
        return {"accuracy": 1.0}


def test_a_task_that_cannot_be_copied_to_the_workers_is_refused_at_the_start():
    with pytest.raises(RuntimeError, match="cannot be copied into its reward worker processes .*task.reward_workers=0"):
        start_reward_workers(Unpicklable(TaskConfig(name="unpicklable")))


def test_a_task_the_workers_cannot_import_stops_with_the_reason(monkeypatch):
    import types

    ghost = types.ModuleType("ghost_tasks")  # importable here only: not a file on the path
    ghost.Ghost = type("Ghost", (Unpicklable,), {"__module__": "ghost_tasks", "__init__": Task.__init__})
    monkeypatch.setitem(sys.modules, "ghost_tasks", ghost)
    task = ghost.Ghost(TaskConfig(name="ghost"))
    with pytest.raises(RuntimeError, match="did not start: ModuleNotFoundError: No module named 'ghost_tasks'"):
        score_completions(task, ["a"], [{}], CTX)


def test_a_killed_zygote_is_restarted_and_the_pool_ends_with_its_task():
    task = unruly()
    rows = task.rows("train")
    pool: RewardPool = pool_for(task)
    assert score_completions(task, ["a"], rows[:1], CTX) == [({"accuracy": 1.0}, True)]
    pool.proc.kill()  # from outside: the next batch finds the pipe closed and starts a new zygote
    assert score_completions(task, ["ab"], rows[:1], CTX) == [({"accuracy": 2.0}, True)]
    proc = pool.proc
    del task, pool
    gc.collect()
    assert proc.poll() is not None  # the zygote has exited, and with it its workers


def test_the_benchmark_script_runs_and_prints_its_figures():
    done = subprocess.run([sys.executable, "scripts/bench_scoring.py", "--repeats", "1", "--adversarial", "1",
                           "--ordinary", "8"], cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr[-2000:]
    lines = done.stdout.splitlines()
    # In process an overrun symbolic check is a wrong answer; in the pool a killed reward, counted.
    assert lines[0].startswith("adversarial: 1 symbolic bombs: in process ") and "failed: 0 / 1 of 1" in lines[0]
    assert lines[1].startswith("ordinary: 8 lisa completions") and "failed: 0 / 0 of 8" in lines[1]
