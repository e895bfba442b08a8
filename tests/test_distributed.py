"""Pieces of gpg_vl.distributed that need no second process: the process-group settings and the
ZeRO-3 bucket sizes."""

from datetime import timedelta

from transformers import AutoConfig

from gpg_vl.distributed import process_group_kwargs, size_zero3_buckets


def test_gloo_is_named_only_for_several_processes_without_an_accelerator(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    several = process_group_kwargs(30)
    assert several.to_kwargs() == {"backend": "gloo", "timeout": timedelta(seconds=30)}
    monkeypatch.setenv("WORLD_SIZE", "1")
    # one process: no backend passed (accelerate would look for a process group), the timeout still is
    assert process_group_kwargs(30).to_kwargs() == {"timeout": timedelta(seconds=30)}


def test_zero3_buckets_follow_the_text_models_hidden_size_and_keep_what_the_user_set():
    config = AutoConfig.from_pretrained("assets/tiny/qwen2_vl")  # hidden 64 in its text_config only
    zero = {"stage": 3, "reduce_bucket_size": 1000}
    size_zero3_buckets(zero, config)
    # 10 h, 0.9 h^2, h^2 with h = 64; the user's reduce_bucket_size stays
    assert zero == {"stage": 3, "stage3_param_persistence_threshold": 640, "stage3_prefetch_bucket_size": 3686,
                    "reduce_bucket_size": 1000}
    auto = {"stage3_param_persistence_threshold": "auto"}
    size_zero3_buckets(auto, config)
    assert auto["stage3_param_persistence_threshold"] == 640
