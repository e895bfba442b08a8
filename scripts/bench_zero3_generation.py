"""Generation under ZeRO-3: how often the sharded weights are gathered, and how long a call takes.

    accelerate launch --config_file scripts/accelerate/zero3.yaml --num_processes 2 \
        scripts/bench_zero3_generation.py [--model gpg_vl/assets/tiny/qwen2_vl] [--repeats 5] [--large-model-regime]
    (on CPU: OMP_NUM_THREADS=1; DeepSpeed picks its CPU accelerator and gloo)

The policy is built and prepared as the trainer builds it (gpg_vl.build: the process group,
the ZeRO-3 bucket sizes, PolicyLogprobs prepared by accelerate), then the trainer's own
decoding loop (gpg_vl.rollout.HFEngine) generates greedily, the same prompts on every rank,
three ways, alternated A B C A B C:
  hooks     plain ZeRO-3: DeepSpeed's hooks fetch each module's weights when it runs
  gathered  inside deepspeed.zero.GatheredParameters (what the trainer did before): the hooks
            still run for every module at every token
  once      inside gpg_vl.distributed.generation_context: gathered once, hooks off, put back
Counted per call: all-gathers issued through deepspeed.comm, and fetches by DeepSpeed's
parameter coordinator (one per module forward while the hooks are on).
--large-model-regime sets DeepSpeed's reuse and live-parameter limits to 0, so that a tiny
model is released and re-gathered as a model above the default limits (1e9 elements) is.
The last line is the result as JSON (RESULT {...}), for tests.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import time

import torch

from gpg_vl import build
from gpg_vl.config import load_config
from gpg_vl.distributed import generation_context
from gpg_vl.models.base import collate
from gpg_vl.models.policy import PolicyLogprobs
from gpg_vl.rollout import HFEngine, SamplingSettings, encode_rows
from gpg_vl.task import build_task

MODES = ("hooks", "gathered", "once")


def counting(deepspeed, engine) -> dict[str, int]:
    """Counters of all-gathers and of the coordinator's fetches, wrapped around DeepSpeed's own calls."""
    counts = {"all_gathers": 0, "fetches": 0}
    backend = deepspeed.comm.comm.cdb
    for name in ("all_gather", "all_gather_into_tensor", "all_gather_coalesced", "all_gather_base"):
        if hasattr(backend, name):
            setattr(backend, name, _counted(getattr(backend, name), counts, "all_gathers"))
    coordinator = engine.optimizer.parameter_offload.get_param_coordinator()
    coordinator.fetch_sub_module = _counted(coordinator.fetch_sub_module, counts, "fetches")
    return counts


def _counted(fn, counts: dict[str, int], key: str):
    def wrapper(*args, **kwargs):
        counts[key] += 1
        return fn(*args, **kwargs)

    return wrapper


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="gpg_vl/assets/tiny/qwen2_vl")
    p.add_argument("--prompts", type=int, default=4)
    p.add_argument("--group-size", type=int, default=8)
    p.add_argument("--new-tokens", type=int, default=16)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--large-model-regime", action="store_true")
    args = p.parse_args()

    import deepspeed

    cfg = load_config(None, [f"model.path={args.model}", "model.max_pixels=12544", "train.grad_accum=1",
                             f"train.prompts_per_device={args.prompts}", f"algorithm.group_size={args.group_size}",
                             "task.name=shapes", "task.options.kinds=[colour]"])
    acc = build.make_accelerator(cfg.train)
    if build.distributed.zero_stage(acc) != 3:
        raise SystemExit("launch with --config_file scripts/accelerate/zero3.yaml (or zero3_offload.yaml)")
    adapter = build.load_policy(cfg, build.weights_dtype(cfg, acc), gradient_checkpointing=False)
    build.tell_deepspeed(acc, cfg.train, args.group_size, adapter.model.config)
    if args.large_model_regime:
        zero = acc.state.deepspeed_plugin.deepspeed_config["zero_optimization"]
        zero.update(stage3_max_reuse_distance=0, stage3_max_live_parameters=0, stage3_prefetch_bucket_size=0)
    policy = PolicyLogprobs(adapter.model)
    engine, _ = acc.prepare(policy, build.make_optimizer(policy, cfg.train))
    params = list(adapter.model.parameters())
    sharded = sum(not p.ds_persist for p in params)
    hooks_before = len(engine.optimizer.parameter_offload.forward_hooks)

    task = build_task(cfg.task)
    rows = list(task.rows("train"))[:args.prompts]  # the same prompts on every rank: equal lengths
    prompts = encode_rows(adapter, task, rows)
    greedy = SamplingSettings(args.new_tokens, greedy=True)
    hf = HFEngine(adapter)
    counts = counting(deepspeed, engine)
    contexts = {"hooks": lambda: contextlib.nullcontext(),
                "gathered": lambda: deepspeed.zero.GatheredParameters(list(engine.parameters())),
                "once": lambda: generation_context(acc, engine)}
    times: dict[str, list[float]] = {m: [] for m in MODES}
    per_call: dict[str, dict[str, int]] = {}
    tokens: dict[str, torch.Tensor] = {}
    adapter.model.eval()
    for _ in range(args.repeats):
        for mode in MODES:
            acc.wait_for_everyone()
            before = dict(counts)
            start = time.perf_counter()
            with contexts[mode]():
                out = hf.generate(prompts, args.group_size, greedy)
            times[mode].append(time.perf_counter() - start)
            per_call[mode] = {k: counts[k] - before[k] for k in counts}
            tokens.setdefault(mode, out.completion_ids)

    # The hooks are back after generation_context: a training step on the completions still runs.
    engine.train()
    batch = collate(prompts, adapter.pad_token_id).to(acc.device)
    logprobs = engine(batch, out.completion_ids.to(acc.device), out.completion_mask.to(acc.device), args.group_size)
    engine.backward(-logprobs.sum())
    engine.step()
    result = {"sharded": sharded, "tensors": len(params), "hooks_before": hooks_before,
              "hooks_after": len(engine.optimizer.parameter_offload.forward_hooks),
              "same_tokens": all(torch.equal(tokens[m], tokens["hooks"]) for m in MODES),
              "new_tokens": int(tokens["hooks"].shape[1]),
              **{m: {"median_s": statistics.median(times[m]), **per_call[m]} for m in MODES}}
    if acc.is_main_process:
        print(f"{args.model}: {sharded} of {len(params)} weight tensors sharded over {acc.num_processes} ranks"
              f"{' (large-model regime: reuse/live limits 0)' if args.large_model_regime else ''}; "
              f"{args.prompts} prompts x {args.group_size}, {result['new_tokens']} new tokens, "
              f"median of {args.repeats}")
        for m in MODES:
            r = result[m]
            print(f"  {m:9s} {r['median_s']:.3f} s  all-gathers/call {r['all_gathers']:5d}  "
                  f"fetches/call {r['fetches']:5d}  x{result['hooks']['median_s'] / r['median_s']:.2f} vs hooks")
        print("RESULT " + json.dumps(result))


if __name__ == "__main__":
    main()
