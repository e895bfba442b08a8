"""Two CPU processes through the launchers a GPU user runs: scripts/run_task.sh with the
shapes preset and scripts/accelerate/*.yaml. DeepSpeed runs on its CPU accelerator (gloo).

Tolerances against plain two-process data parallel (fp32, lr 5e-4, 4 steps): rewards, valid
fractions, 1/alpha, resampling rounds and sample counts exactly equal (the same completions
are sampled); loss, grad_norm and kl within 1e-5; weights within 2e-5 (seen: 3e-6). They are
not bitwise: DeepSpeed sums the clipping norm and reduces gradients in another order.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

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
                          timeout=900)
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
    for x, y in zip(ma, mb):
        assert x.keys() == y.keys()
        for k in x:
            if k in CLOSE:
                assert x[k] == pytest.approx(y[k], abs=1e-5), (x["step"], k)
            else:
                assert x[k] == y[k], (x["step"], k)
    for step in steps:
        wa, wb = weights(a, step), weights(b, step)
        assert wa.keys() == wb.keys()
        worst = max(float((wa[k].float() - wb[k].float()).abs().max()) for k in wa)
        assert worst <= weight_tol, (step, worst)


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
                          timeout=1200)
    assert done.returncode == 0, done.stderr[-3000:]
    print(done.stdout)


@pytest.fixture(scope="module")
def runs(tmp_path_factory, deepspeed_ops):
    """Uninterrupted two-process runs, each made once per module: name -> output folder."""
    made: dict[str, Path] = {}
    plans = {"ddp": ("ddp",), "zero2": ("zero2",), "zero3": ("zero3",),
             "ddp_grpo": ("ddp", "algorithm.name=grpo", "algorithm.kl_coef=0.04", "train.max_steps=2"),
             "zero3_grpo": ("zero3", "algorithm.name=grpo", "algorithm.kl_coef=0.04", "train.max_steps=2")}

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
    source = load_file(ROOT / "assets" / "tiny" / "qwen2_vl" / "model.safetensors")
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
                           "--new-tokens", "8"], cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.split("RESULT ", 1)[1])
    assert result["sharded"] >= result["tensors"] // 3  # the bucket sizes really shard the tiny model
    once, gathered = result["once"], result["gathered"]
    # one all-gather per weight tensor for the whole call, and no per-module fetch at any token
    assert once["fetches"] == 0 and once["all_gathers"] <= result["tensors"]
    # inside a plain GatheredParameters every module still fetches at every token
    assert gathered["fetches"] >= result["new_tokens"] * result["sharded"] and result["hooks"]["fetches"] > 0
    assert result["same_tokens"] and result["hooks_after"] == result["hooks_before"]


def test_grpo_reference_under_zero3_gives_the_kl_of_data_parallel(runs):
    ddp, zero3 = runs("ddp_grpo"), runs("zero3_grpo")
    assert any(r.get("kl", 0) > 0 for r in metrics(ddp))  # the KL term is really there
    assert_same_run(ddp, zero3, steps=(2,))


def test_skewed_valid_groups_are_balanced_so_no_rank_trains_filler(tmp_path):
    out = tmp_path / "skew"
    launch(out, "ddp", f"task.name={SKEW}", "task.eval_split=", "train.prompts_per_device=2", "train.grad_accum=2",
           "algorithm.beta_th=1.0", "train.max_steps=3", "train.save_every=0")
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
