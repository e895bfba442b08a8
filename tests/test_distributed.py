"""Pieces of gpg_vl.distributed that need no second process: the process-group settings, the
ZeRO-3 bucket sizes, the run's shape and its check at resume, the watchdog's report."""

import json
import time
from datetime import timedelta
from types import SimpleNamespace

import pytest
from transformers import AutoConfig

from gpg_vl.config import ConfigError
from gpg_vl.distributed import (
    RankStopped,
    Watchdog,
    check_run_shape,
    engine_name,
    process_group_kwargs,
    run_shape,
    size_zero3_buckets,
    write_run_shape,
)
from gpg_vl.resources import TINY_MODELS


def test_gloo_is_named_only_for_several_processes_without_an_accelerator(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    several = process_group_kwargs(30)
    assert several.to_kwargs() == {"backend": "gloo", "timeout": timedelta(seconds=30)}
    monkeypatch.setenv("WORLD_SIZE", "1")
    # one process: no backend passed (accelerate would look for a process group), the timeout still is
    assert process_group_kwargs(30).to_kwargs() == {"timeout": timedelta(seconds=30)}


def test_zero3_buckets_follow_the_text_models_hidden_size_and_keep_what_the_user_set():
    config = AutoConfig.from_pretrained(TINY_MODELS / "qwen2_vl")  # hidden 64 in its text_config only
    zero = {"stage": 3, "reduce_bucket_size": 1000}
    size_zero3_buckets(zero, config)
    # 10 h, 0.9 h^2, h^2 with h = 64; the user's reduce_bucket_size stays
    assert zero == {"stage": 3, "stage3_param_persistence_threshold": 640, "stage3_prefetch_bucket_size": 3686,
                    "reduce_bucket_size": 1000}
    auto = {"stage3_param_persistence_threshold": "auto"}
    size_zero3_buckets(auto, config)
    assert auto["stage3_param_persistence_threshold"] == 640


def fake_accelerator(zero: dict | None, world: int = 2):
    plugin = None if zero is None else SimpleNamespace(zero_stage=zero["stage"],
                                                       deepspeed_config={"zero_optimization": zero})
    return SimpleNamespace(num_processes=world, mixed_precision="bf16",
                           state=SimpleNamespace(deepspeed_plugin=plugin))


def test_engine_names():
    assert engine_name(fake_accelerator(None)) == "ddp"
    assert engine_name(fake_accelerator({"stage": 2, "offload_optimizer": {"device": "none"}})) == "zero2"
    offloaded = {"stage": 3, "offload_optimizer": {"device": "cpu"}, "offload_param": {"device": "cpu"}}
    assert engine_name(fake_accelerator(offloaded)) == "zero3+offload_optimizer+offload_param"


def test_a_resume_of_another_shape_is_refused_saying_what_differs(tmp_path):
    saved = run_shape(fake_accelerator({"stage": 3}), prompts_per_device=4, grad_accum=2, group_size=8)
    write_run_shape(tmp_path, saved)
    check_run_shape(tmp_path, dict(saved))  # the same shape resumes
    other = run_shape(fake_accelerator(None, world=1), prompts_per_device=8, grad_accum=2, group_size=8)
    with pytest.raises(ConfigError) as err:
        check_run_shape(tmp_path, other)
    message = str(err.value)
    assert "world_size: checkpoint 2, this run 1" in message
    assert "prompts_per_device: checkpoint 4, this run 8" in message
    assert "engine: checkpoint 'zero3', this run 'ddp'" in message and "grad_accum" not in message
    check_run_shape(tmp_path / "older", other)  # a checkpoint from before the record: accepted


def test_a_failed_phase_names_this_rank_the_phase_and_the_rank_that_stopped_beating(tmp_path):
    watch = Watchdog(tmp_path, rank=0, world=2, timeout_s=2.0)  # beats every 0.5 s, stale after 1.25 s
    (tmp_path / "rank1.status").write_text(json.dumps({"rank": 1, "phase": "update", "step": 3,
                                                       "since": time.time() - 9, "alive": time.time() - 5}))
    start = time.perf_counter()
    with pytest.raises(RankStopped) as err, watch.phase("collect", 3):
        raise RuntimeError("Connection closed by peer")
    # a failure at once waits for a dead peer's status to go stale before it reports
    assert time.perf_counter() - start >= watch.stale_after
    message = str(err.value)
    assert message.startswith("rank 0 stopped in phase 'collect' of step 3")
    assert "RuntimeError: Connection closed by peer" in message
    assert "rank 0: alive" in message and "in phase 'collect' of step 3" in message
    assert "rank 1: NOT RESPONDING (dead or stopped), last seen" in message and "phase 'update' of step 3" in message
    assert isinstance(err.value.__cause__, RuntimeError)


def test_one_process_has_no_watchdog_files_and_keeps_its_errors(tmp_path):
    watch = Watchdog(tmp_path / "ranks", rank=0, world=1, timeout_s=60)
    with pytest.raises(KeyError), watch.phase("collect", 1):
        raise KeyError("x")
    assert not (tmp_path / "ranks").exists()
