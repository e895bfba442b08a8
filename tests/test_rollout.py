"""Rollout: masks up to the first EOS, sampling settings honoured, vision tokens never emitted."""

import pytest
import torch

from gpg_vl.models import load_adapter
from gpg_vl.rollout import completion_mask, generate, score
from gpg_vl.task import ScoreContext, TaskConfig, build_task

EOS = [7, 9]


def test_mask_keeps_tokens_up_to_and_including_the_first_eos():
    ids = torch.tensor([[5, 6, 7, 8, 7], [9, 1, 1, 1, 1], [1, 2, 3, 4, 5]])
    # row 0: EOS at 2 -> 1,1,1,0,0 ; row 1: EOS first -> 1,0,0,0,0 ; row 2: truncated -> all 1
    assert completion_mask(ids, EOS).tolist() == [[1, 1, 1, 0, 0], [1, 0, 0, 0, 0], [1, 1, 1, 1, 1]]


@pytest.fixture(scope="module")
def setup():
    adapter = load_adapter("assets/tiny/qwen2_vl", max_pixels=12544)
    task = build_task(TaskConfig(name="shapes", options={"num_train": 8, "num_test": 4}))
    return adapter, task


def test_group_of_g_per_prompt_with_vision_tokens_suppressed(setup):
    adapter, task = setup
    torch.manual_seed(0)
    rows = task.rows("train")[:2]
    # a hot temperature spreads mass over the whole vocabulary, vision tokens included
    out = generate(adapter.model, adapter, task, rows, 4, temperature=5.0, max_new_tokens=12)
    assert out.completion_ids.shape[0] == 8 and out.completion_ids.shape[1] <= 12
    kept = out.completion_ids[out.completion_mask.bool()]
    assert not torch.isin(kept, torch.tensor(adapter.suppressed_token_ids)).any()
    assert all(isinstance(t, str) for t in out.texts)
    scored = score(task, out, ScoreContext(adapter.box_convention), 4)
    assert scored.rewards.shape == (8,) and set(scored.components) == {"accuracy", "format"}


def test_greedy_is_deterministic_and_max_new_tokens_is_honoured(setup):
    adapter, task = setup
    rows = task.rows("test")[:2]
    a = generate(adapter.model, adapter, task, rows, 1, greedy=True, max_new_tokens=3)
    b = generate(adapter.model, adapter, task, rows, 1, greedy=True, max_new_tokens=3)
    assert torch.equal(a.completion_ids, b.completion_ids) and a.completion_ids.shape[1] <= 3


def test_the_checkpoints_sampling_defaults_do_not_leak_in(setup):
    # A repetition penalty or a top-k in the checkpoint's generation_config would make the
    # rollouts come from another distribution than the policy's.
    adapter, task = setup
    rows = task.rows("test")[:2]
    clean = generate(adapter.model, adapter, task, rows, 1, greedy=True, max_new_tokens=6).completion_ids
    saved = adapter.model.generation_config
    try:
        adapter.model.generation_config = saved.__class__(**saved.to_dict())
        adapter.model.generation_config.update(repetition_penalty=50.0, no_repeat_ngram_size=1, min_new_tokens=6)
        again = generate(adapter.model, adapter, task, rows, 1, greedy=True, max_new_tokens=6).completion_ids
    finally:
        adapter.model.generation_config = saved
    assert torch.equal(clean, again)


def test_temperature_is_honoured(setup):
    # A cold sampler agrees with greedy decoding; a hot one does not.
    adapter, task = setup
    rows = task.rows("test")[:2]
    greedy = generate(adapter.model, adapter, task, rows, 1, greedy=True, max_new_tokens=4).completion_ids
    torch.manual_seed(1)
    cold = generate(adapter.model, adapter, task, rows, 1, temperature=1e-4, max_new_tokens=4).completion_ids
    hot = generate(adapter.model, adapter, task, rows, 1, temperature=50.0, max_new_tokens=4).completion_ids
    assert torch.equal(cold, greedy)
    assert not torch.equal(hot, greedy)
