"""Two CPU processes through the launchers a GPU user runs: scripts/run_task.sh with the
shapes preset and scripts/accelerate/*.yaml. DeepSpeed runs on its CPU accelerator (gloo).

Tolerances against plain two-process data parallel (fp32, lr 5e-4, 4 steps): rewards, valid
fractions, 1/alpha, resampling rounds and sample counts exactly equal (the same completions
are sampled); loss, grad_norm and kl within 1e-5; weights within 2e-5 (seen: 3e-6 at most).
They are not bitwise: DeepSpeed sums the clipping norm and reduces gradients in another order.
"""

import contextlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import torch
from safetensors.torch import load_file

from gpg_vl.resources import TINY_MODELS

ROOT = Path(__file__).resolve().parent.parent
SKEW = str(ROOT / "tests" / "plugins" / "skew_task.py")
ENV = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}", "HF_HUB_OFFLINE": "1",
       "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu",
       # DeepSpeed's ops compile on first use; kept with this environment, built once (deepspeed_ops)
       "TORCH_EXTENSIONS_DIR": str(Path(sys.prefix) / "torch_extensions")}
SHAPES = ["task.eval_size=16", "train.eval_every=0", "train.prompts_per_device=4", "task.options.num_train=256",
          "train.max_steps=4", "train.save_every=2", "train.keep_checkpoints=5", "train.tensorboard=false",
          "train.plot=false"]
TIMING = ("step_time", "generate_time", "tokens_per_s")
CLOSE = ("loss", "grad_norm", "kl")  # within 1e-5; everything else logged is equal


def run_task(*args: str) -> list[str]:
    return ["bash", "scripts/run_task.sh", "shapes", *args]


def launch(out: Path, launcher: str, *overrides: str, nproc: int = 2, check: bool = True):
    done = subprocess.run(run_task("--launcher", launcher, "--nproc", str(nproc), f"train.output_dir={out}",
                                   *SHAPES, *overrides), cwd=ROOT, env=ENV, capture_output=True, text=True,
                          timeout=900, check=False)
    if check:
        assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
    return done


def records(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def metrics(out: Path) -> list[dict]:
    return [{k: v for k, v in r.items() if k not in TIMING and not k.startswith("time/")}
            for r in records(out / "metrics.jsonl")]


def weights(out: Path, step: int) -> dict[str, torch.Tensor]:
    return load_file(out / "checkpoints" / f"step_{step:06d}" / "hf" / "model.safetensors")


def assert_same_run(a: Path, b: Path, steps=(2, 4), weight_tol: float = 2e-5) -> None:
    ma, mb = metrics(a), metrics(b)
    assert len(ma) == len(mb)
    seen = dict.fromkeys(CLOSE, 0.0)
    for x, y in zip(ma, mb):
        assert x.keys() == y.keys()
        for k in x:
            if k in CLOSE:
                assert x[k] == pytest.approx(y[k], abs=1e-5), (x["step"], k)
                seen[k] = max(seen[k], abs(x[k] - y[k]))
            else:
                assert x[k] == y[k], (x["step"], k)
    for step in steps:
        wa, wb = weights(a, step), weights(b, step)
        assert wa.keys() == wb.keys()
        worst = max(float((wa[k].float() - wb[k].float()).abs().max()) for k in wa)
        assert worst <= weight_tol, (step, worst)
        seen[f"weights at step {step}"] = worst
    print(f"{b.name} against {a.name}, largest differences: {seen}")  # the figures the README quotes (pytest -rP)


def assert_bitwise(a: Path, b: Path, step: int = 4) -> None:
    wa, wb = weights(a, step), weights(b, step)
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
    assert metrics(a) == metrics(b)
    for r in range(2):
        assert records(a / "ranks" / f"rank{r}.jsonl") == records(b / "ranks" / f"rank{r}.jsonl")


@pytest.fixture(scope="session")
def deepspeed_ops():
    """DeepSpeed's CPU ops, compiled once before the runs need them (every DeepSpeed launch on
    CPU loads the shared-memory op; the offload launcher's CPU Adam its own): 1-2 min each on
    2 cores the first time, then loaded from TORCH_EXTENSIONS_DIR."""
    code = ("import time; from deepspeed.accelerator import get_accelerator\n"
            "for name in ('ShareMemCommBuilder', 'CPUAdamBuilder'):\n"
            "    start = time.perf_counter(); get_accelerator().create_op_builder(name).load()\n"
            "    print(f'{name} ready in {time.perf_counter() - start:.1f} s')")
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=ENV, capture_output=True, text=True,
                          timeout=1200, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    print(done.stdout)


@pytest.fixture(scope="module")
def runs(tmp_path_factory, deepspeed_ops):
    """Uninterrupted two-process runs, each made once per module: name -> output folder."""
    made: dict[str, Path] = {}
    grpo = ("algorithm.name=grpo", "algorithm.kl_coef=0.04", "train.max_steps=2")
    plans = {"ddp": ("ddp",), "zero2": ("zero2",), "zero3": ("zero3",),
             **{f"{launcher}_grpo": (launcher, *grpo) for launcher in ("ddp", "zero3", "zero3_offload")}}

    def run(name: str) -> Path:
        if name not in made:
            out = tmp_path_factory.mktemp(name)
            launch(out, *plans[name])
            made[name] = out
        return made[name]

    return run


@pytest.mark.parametrize("launcher", ["zero2", "zero3"])
def test_deepspeed_trains_like_data_parallel(runs, launcher):
    assert_same_run(runs("ddp"), runs(launcher))


def test_zero3_hf_folder_holds_the_whole_model_under_its_own_names(runs, tmp_path):
    from transformers import AutoModelForImageTextToText

    hf = runs("zero3") / "checkpoints" / "step_000004" / "hf"
    source = load_file(TINY_MODELS / "qwen2_vl" / "model.safetensors")
    saved = load_file(hf / "model.safetensors")
    assert saved.keys() == source.keys()  # the checkpoint's names (no model.model.*), tied lm_head left out
    assert all(saved[k].shape == source[k].shape for k in saved)  # whole tensors, not this rank's shard
    model, info = AutoModelForImageTextToText.from_pretrained(hf, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    model.save_pretrained(tmp_path)  # what plain transformers loaded, written back: the same tensors
    again = load_file(tmp_path / "model.safetensors")
    assert again.keys() == saved.keys() and all(torch.equal(again[k], saved[k]) for k in saved)


def test_zero3_generation_gathers_the_weights_once_per_call(deepspeed_ops):
    done = subprocess.run(["accelerate", "launch", "--config_file", "scripts/accelerate/zero3.yaml",
                           "--num_processes", "2", "scripts/bench_zero3_generation.py", "--repeats", "1",
                           "--new-tokens", "8"], cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=600,
                          check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.split("RESULT ", 1)[1])
    assert result["sharded"] >= result["tensors"] // 3  # the bucket sizes really shard the tiny model
    once, gathered = result["once"], result["gathered"]
    # one all-gather per weight tensor for the whole call, and no per-module fetch at any token
    assert once["fetches"] == 0 and once["all_gathers"] <= result["tensors"]
    # inside a plain GatheredParameters every module still fetches at every token
    assert gathered["fetches"] >= result["new_tokens"] * result["sharded"] and result["hooks"]["fetches"] > 0
    assert result["same_tokens"] and result["hooks_after"] == result["hooks_before"]


@pytest.mark.parametrize("launcher", ["zero3", "zero3_offload"])
def test_grpo_reference_under_zero3_gives_the_kl_of_data_parallel(runs, launcher):
    """zero3_offload: the optimizer state and parameters offloaded, DeepSpeed's CPU Adam, the
    reference's parameters offloaded too (on a CPU the code path is proven, not the memory saved)."""
    ddp, zero = runs("ddp_grpo"), runs(f"{launcher}_grpo")
    assert any(r.get("kl", 0) > 0 for r in metrics(ddp))  # the KL term is really there
    shape = json.loads((zero / "checkpoints" / "step_000002" / "run_shape.json").read_text())
    assert shape["engine"] == {"zero3": "zero3", "zero3_offload": "zero3+offload_optimizer+offload_param"}[launcher]
    assert_same_run(ddp, zero, steps=(2,))


def test_skewed_valid_groups_are_balanced_so_no_rank_trains_filler(tmp_path):
    out = tmp_path / "skew"
    launch(out, "ddp", f"task.name={SKEW}", "task.options={}", "task.eval_split=", "train.prompts_per_device=2",
           "train.grad_accum=2", "algorithm.beta_th=1.0", "train.max_steps=3", "train.save_every=0")
    ranks = [records(out / "ranks" / f"rank{r}.jsonl") for r in range(2)]
    steps = {r["step"]: r for r in records(out / "metrics.jsonl") if "loss" in r}
    per_rank, n_groups = 2 * 2, 2 * 2 * 2
    for zero, one in zip(*ranks):
        assert one["generated_valid"] == 0 and zero["generated_valid"] >= n_groups  # all valid ones on rank 0
        # rank 1 trains only what rank 0 sent it, whole groups with their images: valid, no filler
        assert zero["local_valid"] == one["local_valid"] == per_rank and zero["local_groups"] == per_rank
        assert zero["sent"] == one["received"] == per_rank and one["sent"] == zero["received"] == 0
        m = steps[zero["step"]]
        assert m["valid_fraction"] == 1.0 and m["inverse_alpha"] == 1.0 and m["groups_moved"] == per_rank
        # valid groups dropped: only those beyond B
        assert m["valid_groups_dropped"] == zero["generated_valid"] - n_groups
    assert any(steps[s]["valid_groups_dropped"] == 0 for s in steps)


def workers(launcher: subprocess.Popen) -> dict[int, psutil.Process]:
    """The training processes under a launcher, by rank (torchrun starts them in sessions of their own)."""
    found = {}
    for p in psutil.Process(launcher.pid).children(recursive=True):
        try:
            if "gpg_vl.cli" in " ".join(p.cmdline()) and "RANK" in p.environ() and "LOCAL_RANK" in p.environ():
                found[int(p.environ()["RANK"])] = p
        except psutil.NoSuchProcess:
            continue
    return found


def start(args: list[str], log: Path) -> subprocess.Popen:
    with log.open("w") as f:
        return subprocess.Popen(args, cwd=ROOT, env=ENV, stdout=f, stderr=subprocess.STDOUT, start_new_session=True)


def wait_for(condition, proc: subprocess.Popen, what: str, seconds: float = 600) -> None:
    deadline = time.time() + seconds
    while not condition():
        assert proc.poll() is None, f"the run ended before {what}"
        assert time.time() < deadline, f"no {what} within {seconds} s"
        time.sleep(0.05)


def end(proc: subprocess.Popen, ranks: dict[int, psutil.Process]) -> None:
    """Kill what is left of a launch: the workers (in sessions of their own), then the launcher's group."""
    for p in ranks.values():
        with contextlib.suppress(psutil.NoSuchProcess):
            p.kill()
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=60)


def test_a_stalled_rank_stops_the_other_with_its_name_and_phase_and_the_run_resumes(runs, tmp_path):
    out, log = tmp_path / "stalled", tmp_path / "stalled.log"
    args = run_task("--launcher", "zero3", "--nproc", "2", f"train.output_dir={out}", *SHAPES,
                    "train.dist_timeout_s=10")
    proc = start(args, log)
    wait_for(lambda: (out / "checkpoints" / "step_000002" / "COMPLETE").exists(), proc, "the step-2 checkpoint")
    ranks = workers(proc)
    ranks[1].suspend()  # SIGSTOP: alive, silent
    stalled = time.time()
    try:
        ranks[0].wait(timeout=90)
        stopped_after = time.time() - stalled
    finally:
        end(proc, ranks)
    print(f"rank 0 ended {stopped_after:.1f} s after rank 1 stalled")  # the README's figure (pytest -rP)
    text = log.read_text()
    # bounded: the collective timeout (10 s) and the watchdog's report, not gloo's default of 30 minutes
    assert stopped_after < 10 + 30, stopped_after
    assert re.search(r"rank 0 stopped in phase '(collect|metrics|update|checkpoint)' of step [23] after", text), \
        text[-3000:]
    assert re.search(r"rank 1: NOT RESPONDING \(dead or stopped\), last seen \d+ s ago in phase '\w+'", text)
    assert "rank 0: alive" in text
    resumed = launch(out, "zero3", "train.dist_timeout_s=10", "--resume")
    assert "resumed from" in resumed.stdout + resumed.stderr
    assert_bitwise(runs("zero3"), out)


def test_a_killed_rank_ends_the_run_at_once_naming_it(tmp_path):
    out, log = tmp_path / "killed", tmp_path / "killed.log"
    proc = start(run_task("--nproc", "2", f"train.output_dir={out}", *SHAPES, "train.max_steps=50",
                          "train.save_every=0"), log)
    wait_for(lambda: (out / "metrics.jsonl").exists() and '"loss"' in (out / "metrics.jsonl").read_text(), proc,
             "step 1")
    ranks = workers(proc)
    ranks[1].kill()
    killed = time.time()
    try:
        rc = proc.wait(timeout=60)
    finally:
        end(proc, ranks)
    ended_after = time.time() - killed
    print(f"the launcher ended {ended_after:.1f} s after rank 1 was killed")  # the README's figure (pytest -rP)
    assert ended_after < 30 and rc != 0
    text = log.read_text()
    assert re.search(r"rank\s*:\s*1 \(local_rank: 1\)\s+exitcode\s*:\s*-9", text), text[-3000:]
    status = json.loads((out / "ranks" / "rank1.status").read_text())
    assert status["rank"] == 1 and status["step"] >= 1 and status["phase"]


def test_a_resume_with_another_world_size_is_refused(runs, tmp_path):
    out = tmp_path / "one_process"
    shutil.copytree(runs("zero3"), out)
    done = launch(out, "ddp", "--resume", nproc=1, check=False)
    assert done.returncode == 2
    assert "world_size: checkpoint 2, this run 1" in done.stderr and "engine: checkpoint 'zero3', this run 'ddp'" \
        in done.stderr


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_simulated_machines_reach_the_result_of_one(runs, tmp_path):
    out, port = tmp_path / "two_machines", free_port()
    nodes = []
    for rank in (0, 1):
        args = run_task("--launcher", "zero3", "--nproc", "1", "--nnodes", "2", "--node-rank", str(rank),
                        "--master", f"127.0.0.1:{port}", f"train.output_dir={out}", *SHAPES)
        nodes.append(start(args, tmp_path / f"node{rank}.log"))
        if rank == 0:  # machine 0 hosts the rendezvous: it starts first, as on a real cluster
            wait_for(lambda: socket.socket().connect_ex(("127.0.0.1", port)) == 0, nodes[0], "the rendezvous")
    for rank, node in enumerate(nodes):
        assert node.wait(timeout=900) == 0, (tmp_path / f"node{rank}.log").read_text()[-3000:]
    assert_bitwise(runs("zero3"), out)
