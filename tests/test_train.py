"""End-to-end training runs in subprocesses: smoke, two CPU processes, kill and resume."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parent.parent
COIN = str(ROOT / "tests" / "plugins" / "coin_task.py")
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1"}


def train_cmd(out: Path, *overrides: str) -> list[str]:
    return [sys.executable, "-m", "gpg_vl.cli", "train", f"train.output_dir={out}", "train.tensorboard=false",
            "train.plot=false", *overrides]


def shapes_args(steps: int) -> list[str]:
    return ["--config", str(ROOT / "tasks/presets/shapes.yaml"), f"train.max_steps={steps}", "task.eval_size=16",
            "train.eval_every=0", "train.prompts_per_device=4", "task.options.num_train=256"]


def coin_args(steps: int) -> list[str]:
    return ["model.path=assets/tiny/qwen2", f"task.name={COIN}", "task.eval_split=", "algorithm.group_size=4",
            "algorithm.beta_th=0.6", "rollout.max_new_tokens=3", "train.prompts_per_device=2", "train.grad_accum=2",
            "train.learning_rate=1e-4", f"train.max_steps={steps}"]


def records(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_smoke_run_writes_metrics_checkpoint_and_a_loadable_model(tmp_path):
    out = tmp_path / "run"
    done = subprocess.run([*train_cmd(out, *shapes_args(2)), "train.plot=true"], cwd=ROOT, env=ENV,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    steps = [r for r in records(out / "metrics.jsonl") if "reward/mean" in r]
    assert [r["step"] for r in steps] == [1, 2]
    for key in ("reward/accuracy", "reward/format", "valid_fraction", "inverse_alpha", "resample_rounds",
                "loss", "grad_norm", "completion_length/mean", "tokens_per_s", "step_time", "samples_generated"):
        assert key in steps[0], key
    assert (out / "curves.png").stat().st_size > 0
    hf = out / "checkpoints" / "step_000002" / "hf"
    from gpg_vl.models import load_adapter

    adapter = load_adapter(str(hf), max_pixels=12544)
    assert adapter.model_type == "qwen2_vl"


def test_two_cpu_processes_resample_in_lock_step(tmp_path):
    out = tmp_path / "ddp"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "gpg_vl.cli", "train",
           f"train.output_dir={out}", "train.tensorboard=false", "train.plot=false", *coin_args(5)]
    done = subprocess.run(cmd, cwd=ROOT, env={**ENV, "ACCELERATE_USE_CPU": "1"}, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    ranks = [records(out / "ranks" / f"rank{r}.jsonl") for r in range(2)]
    assert len(ranks[0]) == len(ranks[1]) == 5
    main = {r["step"]: r for r in records(out / "metrics.jsonl") if "reward/mean" in r}
    n_groups = 2 * 2 * 2  # prompts_per_device * grad_accum * processes
    resampled = 0
    for a, b in zip(*ranks):
        # lock-step: same rounds, same data position, same alpha on both ranks
        assert a["rounds"] == b["rounds"] and a["batches_consumed"] == b["batches_consumed"]
        assert a["inverse_alpha"] == b["inverse_alpha"]
        # alpha from what is really trained on both ranks together
        n_valid = a["local_valid"] + b["local_valid"]
        assert a["inverse_alpha"] == pytest.approx(min(1.0, n_valid / n_groups) if n_valid else 1.0)
        assert main[a["step"]]["valid_fraction"] == pytest.approx(n_valid / n_groups)
        resampled += a["rounds"] > 1
    assert resampled, "the test task should force at least one resampling round"


def test_sample_budget_stops_resampling_and_training_at_the_budget(tmp_path):
    out = tmp_path / "budget"
    per_round = 2 * 2 * 4  # prompts_per_device * grad_accum * group_size
    done = subprocess.run(train_cmd(out, *coin_args(0), "train.max_samples=100", "train.log_every=1000"),
                          cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    steps = [r for r in records(out / "metrics.jsonl") if "samples_generated" in r]
    totals = [r["samples_generated"] for r in steps]
    assert totals == sorted(totals) and all(t < 100 for t in totals[:-1])
    # Resampling stops once the budget is reached, so a run passes it by less than one round.
    assert 100 <= totals[-1] < 100 + per_round
    assert [r["samples_generated"] - p for r, p in zip(steps, [0] + totals)] == \
        [r["resample_rounds"] * per_round for r in steps]


@pytest.mark.slow
def test_killed_and_resumed_run_equals_an_uninterrupted_one(tmp_path):
    args = shapes_args(6) + ["train.save_every=2", "train.keep_checkpoints=5"]
    whole = tmp_path / "whole"
    done = subprocess.run(train_cmd(whole, *args), cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]

    cut = tmp_path / "cut"
    proc = subprocess.Popen(train_cmd(cut, *args), cwd=ROOT, env=ENV, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + 600
    while not (cut / "checkpoints" / "step_000004" / "COMPLETE").exists():
        assert proc.poll() is None and time.time() < deadline, "the run ended before its step-4 checkpoint"
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    done = subprocess.run([*train_cmd(cut, *args), "--resume"], cwd=ROOT, env=ENV, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "resumed from" in done.stdout + done.stderr

    a = load_file(whole / "checkpoints" / "step_000006" / "model.safetensors")
    b = load_file(cut / "checkpoints" / "step_000006" / "model.safetensors")
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    timing = ("step_time", "generate_time", "tokens_per_s")
    strip = lambda rs: [{k: v for k, v in r.items() if k not in timing and not k.startswith("time/")}  # noqa: E731
                        for r in rs]
    assert strip(records(whole / "metrics.jsonl")) == strip(records(cut / "metrics.jsonl"))
    assert records(whole / "ranks" / "rank0.jsonl") == records(cut / "ranks" / "rank0.jsonl")


def test_the_bad_rows_skipped_reach_the_metrics(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    good = [json.dumps({"question": f"{i} + 1?", "answer": str(i + 1)}).encode() for i in range(4)]
    latin1 = b'{"question": "caf\xe9?", "answer": "1"}'
    deep = json.dumps({"question": "?", "answer": "1", "x": json.loads("[" * 150 + "]" * 150)}).encode()
    (data / "train.jsonl").write_bytes(b"\n".join(good + [b'{"question": "no answer"}', latin1]) + b"\n")
    (data / "test.jsonl").write_bytes(b"\n".join(good[:2] + [deep]) + b"\n")
    from gpg_vl.config import load_config
    from gpg_vl.trainer import Trainer

    out = tmp_path / "run"
    cfg = load_config(None, ["model.path=assets/tiny/qwen2", "task.name=math", f"task.data_path={data}",
                             "task.on_bad_row=skip", "train.prompts_per_device=2", f"train.output_dir={out}",
                             "train.tensorboard=false"])
    with pytest.warns(UserWarning, match="skipped"):
        Trainer(cfg)  # the record is written as the run starts
    assert records(out / "metrics.jsonl") == [{"step": 0, "data/train_rows": 4, "data/eval_rows": 2,
                                               "data/train_rows_skipped": 2, "data/eval_rows_skipped": 1}]
