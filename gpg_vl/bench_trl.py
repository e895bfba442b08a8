"""The TRL arm of `gpg-vl bench`: TRL's GRPOTrainer on the benchmark's model, prompts, images
and reward, timed step by step. TRL is an optional extra (`pip install -e '.[bench]'`);
training never imports it."""

from __future__ import annotations

import statistics
import time
from pathlib import Path

from gpg_vl.bench import PROMPT, Shape, bench_image, hash_reward, peak_memory_gb


def _hash_rewards(completions, **kwargs) -> list[float]:
    """The benchmark's reward on TRL's completions (conversational: a list of messages each)."""
    texts = [c[-1]["content"] if isinstance(c, list) else c for c in completions]
    return [hash_reward(t) for t in texts]


def run_trl(shape: Shape, model_dir: Path, steps: int, warmup: int, out: Path) -> dict:
    """`warmup` + `steps` GRPO steps of TRL (no KL term, one update per batch, the same
    sampling settings as gpg-vl's arm); the timed steps' wall times and the peak memory."""
    import torch
    from datasets import Dataset
    from transformers import TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    from gpg_vl.models import load_adapter

    adapter = load_adapter(str(model_dir), dtype="float32", max_pixels=shape.image_size ** 2)
    chat = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": PROMPT}]}]
    rows = [{"prompt": chat, "image": bench_image(i, shape.image_size)}
            for i in range(max(64, shape.prompts * (steps + warmup)))]
    config = GRPOConfig(
        output_dir=str(out), num_generations=shape.group_size, per_device_train_batch_size=shape.prompts * shape.group_size,
        gradient_accumulation_steps=1, max_completion_length=shape.new_tokens, temperature=1.0, top_p=1.0, top_k=0,
        beta=0.0, learning_rate=1e-6, max_steps=steps + warmup, logging_steps=1, report_to=[], save_strategy="no",
        use_cpu=not torch.cuda.is_available(), bf16=torch.cuda.is_available(), seed=0, dataloader_num_workers=0,
        shuffle_dataset=False, log_completions=False, gradient_checkpointing=False)
    times: list[float] = []

    class StepClock(TrainerCallback):
        def on_step_begin(self, args, state, control, **kwargs):
            self.start = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            times.append(time.perf_counter() - self.start)

    trainer = GRPOTrainer(model=adapter.model, reward_funcs=_hash_rewards, args=config,
                          train_dataset=Dataset.from_list(rows), processing_class=adapter.processor,
                          callbacks=[StepClock()])
    trainer.train()
    timed = times[warmup:]
    return {"step_time": timed, "peak_gb": peak_memory_gb(),
            "completion_length": statistics.mean(r.get("completions/mean_length", float("nan"))
                                                 for r in trainer.state.log_history if "loss" in r)}
