"""Rollout: the sampling rule, the Hugging Face engine against transformers' own generate,
masks up to the first EOS, settings honoured, vision tokens never emitted, scoring."""

import pytest
import torch
from transformers import TopKLogitsWarper, TopPLogitsWarper

from gpg_vl.models import load_adapter
from gpg_vl.models.base import collate
from gpg_vl.models.policy import PolicyLogprobs
from gpg_vl.models.qwen_vl import QwenVLAdapter
from gpg_vl.rollout import (HFEngine, SamplingSettings, completion_mask, encode_rows, keep_top_p, pick_tokens,
                            rollout, sample_categorical, score)
from gpg_vl.task import ScoreContext, TaskConfig, build_task

EOS = [7, 9]


def test_mask_keeps_tokens_up_to_and_including_the_first_eos():
    ids = torch.tensor([[5, 6, 7, 8, 7], [9, 1, 1, 1, 1], [1, 2, 3, 4, 5]])
    # row 0: EOS at 2 -> 1,1,1,0,0 ; row 1: EOS first -> 1,0,0,0,0 ; row 2: truncated -> all 1
    assert completion_mask(ids, EOS).tolist() == [[1, 1, 1, 0, 0], [1, 0, 0, 0, 0], [1, 1, 1, 1, 1]]


# --- the sampling rule ------------------------------------------------------------------

def test_categorical_draws_follow_the_weights():
    torch.manual_seed(0)
    weights = torch.tensor([[0.0, 1.0, 3.0, 0.0, 6.0]]).expand(200_000, -1)  # unnormalised
    counts = torch.bincount(sample_categorical(weights), minlength=5).float() / 200_000
    # expected 0, .1, .3, 0, .6; the standard error of each share is below 0.0011
    assert counts[0] == 0 and counts[3] == 0
    assert torch.allclose(counts, torch.tensor([0.0, 0.1, 0.3, 0.0, 0.6]), atol=0.005)


def test_top_p_keeps_the_nucleus_transformers_keeps():
    torch.manual_seed(1)
    for top_p in (0.05, 0.3, 0.8, 0.95, 0.999):
        logits = torch.randn(16, 3000) * 3
        ours = keep_top_p(torch.softmax(logits, -1), top_p) > 0
        theirs = TopPLogitsWarper(top_p)(None, logits.clone()) > -float("inf")
        assert torch.equal(ours, theirs), top_p


def test_pick_tokens_rule():
    torch.manual_seed(2)
    logits = torch.randn(64, 50) * 2
    banned = torch.zeros(50, dtype=torch.bool)
    banned[[3, int(logits[0].argmax())]] = True
    greedy, _ = pick_tokens(logits, SamplingSettings(1, greedy=True), banned)
    assert torch.equal(greedy, logits.masked_fill(banned, -float("inf")).argmax(-1))
    tokens, lp = pick_tokens(logits, SamplingSettings(1, temperature=0.7, top_k=5), banned)
    allowed = TopKLogitsWarper(5)(None, logits.masked_fill(banned, -float("inf"))) > -float("inf")
    assert allowed.gather(1, tokens[:, None]).all()
    # log pi_T over the whole vocabulary, whatever shaped the draw
    expected = torch.log_softmax(logits / 0.7, -1).gather(1, tokens[:, None])[:, 0]
    assert torch.allclose(lp, expected, atol=1e-6)


# --- the engine ---------------------------------------------------------------------------

@pytest.fixture(scope="module")
def setup():
    adapter = load_adapter("tiny:qwen2_vl", max_pixels=12544)
    task = build_task(TaskConfig(name="shapes", options={"num_train": 8, "num_test": 4}))
    return adapter, task


@pytest.fixture(scope="module", params=["qwen2_vl", "qwen2_5_vl", "qwen2"])
def spread(request):
    """A tiny model whose outputs depend on the prompt (the random-init ones say the same token
    everywhere), for comparing greedy outputs token by token."""
    adapter = load_adapter(f"tiny:{request.param}", max_pixels=12544)
    torch.manual_seed(3)
    with torch.no_grad():
        for p in adapter.model.parameters():
            if p.ndim > 1:
                p.normal_(0.0, 0.3)
    return adapter


def prompts_of(adapter):
    from PIL import Image

    n = 1 if isinstance(adapter, QwenVLAdapter) else 0
    chats = [[{"role": "user", "content": [{"type": "image"}] * n + [{"type": "text", "text": t}]}]
             for t in ("What colour is it?", "How many shapes are in the image? Answer with one digit.")]
    images = [[Image.new("RGB", (60, 90), "red")], [Image.new("RGB", (200, 120), "blue")]] if n else [[], []]
    return adapter.encode_batch(chats, images)


def test_greedy_equals_transformers_generate(spread):
    adapter = spread
    prompts = prompts_of(adapter)
    ours = HFEngine(adapter).generate(prompts, 1, SamplingSettings(10, greedy=True))
    for i, p in enumerate(prompts):  # each prompt alone, no padding, through transformers' generate
        inputs = dict(input_ids=p.input_ids[None], attention_mask=torch.ones(1, p.num_tokens, dtype=torch.long))
        if p.pixel_values is not None:
            inputs.update(pixel_values=p.pixel_values, image_grid_thw=p.image_grid_thw,
                          mm_token_type_ids=p.mm_token_type_ids[None])
        out = adapter.model.generate(**inputs, do_sample=False, max_new_tokens=10, eos_token_id=adapter.eos_token_ids,
                                     suppress_tokens=adapter.suppressed_token_ids or None,
                                     pad_token_id=adapter.pad_token_id)[0, p.num_tokens:]
        kept = ours.completion_ids[i][ours.completion_mask[i].bool()]
        assert kept.tolist() == out[:len(kept)].tolist()
        assert len(set(kept.tolist())) > 1  # a real comparison, not one repeated token


def test_sampled_logprobs_equal_the_loss_forward(spread):
    adapter = spread
    prompts = prompts_of(adapter)
    torch.manual_seed(4)
    out = HFEngine(adapter).generate(prompts, 4, SamplingSettings(12, temperature=1.3))
    with torch.no_grad():
        again = PolicyLogprobs(adapter.model)(collate(prompts, adapter.pad_token_id), out.completion_ids,
                                              out.completion_mask, 4, temperature=1.3)
    assert torch.allclose(out.logprobs, again, atol=1e-5, rtol=0)
    assert torch.equal(out.completion_mask, completion_mask(out.completion_ids, adapter.eos_token_ids))


def test_group_of_g_per_prompt_with_vision_tokens_suppressed(setup):
    adapter, task = setup
    torch.manual_seed(0)
    rows = task.rows("train")[:2]
    # a hot temperature spreads mass over the whole vocabulary, vision tokens included
    out = rollout(HFEngine(adapter), adapter, rows, encode_rows(adapter, task, rows), 4,
                  SamplingSettings(12, temperature=5.0))
    assert out.completion_ids.shape[0] == 8 and out.completion_ids.shape[1] <= 12
    kept = out.completion_ids[out.completion_mask.bool()]
    assert not torch.isin(kept, torch.tensor(adapter.suppressed_token_ids)).any()
    assert all(isinstance(t, str) for t in out.texts) and len(out.prompts) == 2
    scored = score(task, out, ScoreContext(adapter.box_convention), 4)
    assert scored.rewards.shape == (8,) and set(scored.components) == {"accuracy", "format"}


def test_prefill_runs_the_vision_tower_once_per_prompt(setup):
    adapter, task = setup
    rows = task.rows("train")[:2]
    prompts = encode_rows(adapter, task, rows)
    seen = []
    hook = adapter.model.model.visual.register_forward_hook(lambda m, args, out: seen.append(args[0].shape[0]))
    try:
        HFEngine(adapter).generate(prompts, 8, SamplingSettings(3))
    finally:
        hook.remove()
    assert seen == [sum(p.pixel_values.shape[0] for p in prompts)]


def test_greedy_is_deterministic_and_max_new_tokens_is_honoured(setup):
    adapter, task = setup
    prompts = encode_rows(adapter, task, task.rows("test")[:2])
    a = HFEngine(adapter).generate(prompts, 1, SamplingSettings(3, greedy=True))
    b = HFEngine(adapter).generate(prompts, 1, SamplingSettings(3, greedy=True))
    assert torch.equal(a.completion_ids, b.completion_ids) and a.completion_ids.shape[1] <= 3


def test_the_checkpoints_sampling_defaults_do_not_leak_in(setup):
    # A repetition penalty or a top-k in the checkpoint's generation_config would make the
    # rollouts come from another distribution than the policy's.
    adapter, task = setup
    prompts = encode_rows(adapter, task, task.rows("test")[:2])
    engine = HFEngine(adapter)
    clean = engine.generate(prompts, 1, SamplingSettings(6, greedy=True)).completion_ids
    saved = adapter.model.generation_config
    try:
        adapter.model.generation_config = saved.__class__(**saved.to_dict())
        adapter.model.generation_config.update(repetition_penalty=50.0, no_repeat_ngram_size=1, min_new_tokens=6)
        again = engine.generate(prompts, 1, SamplingSettings(6, greedy=True)).completion_ids
    finally:
        adapter.model.generation_config = saved
    assert torch.equal(clean, again)


def test_temperature_is_honoured(setup):
    # A cold sampler agrees with greedy decoding; a hot one does not.
    adapter, task = setup
    prompts = encode_rows(adapter, task, task.rows("test")[:2])
    engine = HFEngine(adapter)
    greedy = engine.generate(prompts, 1, SamplingSettings(4, greedy=True)).completion_ids
    torch.manual_seed(1)
    cold = engine.generate(prompts, 1, SamplingSettings(4, temperature=1e-4)).completion_ids
    hot = engine.generate(prompts, 1, SamplingSettings(4, temperature=50.0)).completion_ids
    assert torch.equal(cold, greedy)
    assert not torch.equal(hot, greedy)
