"""Scoring time of one batch: in the trainer's process (task.reward_workers=0) against the pool.

    OMP_NUM_THREADS=1 .venv/bin/python scripts/bench_scoring.py [--repeats 3] [--adversarial 8] [--ordinary 512]

Two batches, each scored both ways in turn (A B A B ...), medians printed:
- adversarial: math completions whose symbolic check would run for minutes, 1 s limit;
- ordinary: lisa completions (box parsing, GIoU), where the pool can only cost time.
"""

from __future__ import annotations

import argparse
import statistics
import time

from gpg_vl.boxes import NormalizedBoxes
from gpg_vl.scoring import score_completions, start_reward_workers
from gpg_vl.task import ScoreContext, TaskConfig, build_task

CTX = ScoreContext(boxes=NormalizedBoxes())
BOMBS = ["\\boxed{9^{9^{9^{9}}}}", "\\boxed{10^{10^{10}}}"]


def batches(adversarial: int, ordinary: int):
    """(name, task by reward_workers, texts, rows) of each batch."""
    math_row = {"prompt": "p", "answer": "\\frac{3}{4}"}
    tasks = {w: build_task(TaskConfig(name="math", reward_workers=w)) for w in (0, 2)}
    yield (f"adversarial: {adversarial} symbolic bombs", tasks, [BOMBS[i % 2] for i in range(adversarial)],
           [math_row] * adversarial)
    tasks = {w: build_task(TaskConfig(name="lisa", reward_workers=w)) for w in (0, 2)}
    rows = tasks[0].rows("train")
    texts = [f"<think>t</think> <answer>({i % 500},{i % 300}),({i % 500 + 200},{i % 300 + 300})</answer>"
             for i in range(ordinary)]
    yield f"ordinary: {ordinary} lisa completions", tasks, texts, [rows[i % len(rows)] for i in range(ordinary)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--adversarial", type=int, default=8, help="completions in the adversarial batch")
    parser.add_argument("--ordinary", type=int, default=512, help="completions in the ordinary batch")
    args = parser.parse_args()
    for name, tasks, texts, rows in batches(args.adversarial, args.ordinary):
        start_reward_workers(tasks[2])
        for w in (0, 2):  # warm both ways: the zygote's and the symbolic worker's imports are not timed
            score_completions(tasks[w], ["\\boxed{3/4}"], rows[:1], CTX)
        times: dict[int, list[float]] = {0: [], 2: []}
        failed = {}
        for _ in range(args.repeats):
            for w in (0, 2):
                start = time.perf_counter()
                got = score_completions(tasks[w], texts, rows, CTX)
                times[w].append(time.perf_counter() - start)
                failed[w] = sum(not ok for _, ok in got)
        here, pool = statistics.median(times[0]), statistics.median(times[2])
        print(f"{name}: in process {here:.3f} s, pool of 2 {pool:.3f} s (ratio {here / pool:.2f}); counted as "
              f"failed: {failed[0]} / {failed[2]} of {len(texts)}; runs {[round(t, 3) for t in times[0]]} / "
              f"{[round(t, 3) for t in times[2]]}")


if __name__ == "__main__":
    main()
