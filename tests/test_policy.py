"""The once-per-group loss forward (gpg_vl.models.policy) against the plain forward: every
completion as its own prompt + completion sequence through the model's own forward, with
the model's own position ids. Same log-probs and gradients in float32, on both Qwen-VL
families and a text model, with prompts of different lengths and images of different sizes."""

from __future__ import annotations

import copy

import pytest
import torch
from PIL import Image

from gpg_vl.models import load_adapter
from gpg_vl.models.base import collate
from gpg_vl.models.policy import PolicyLogprobs, chunked_head_logprobs, token_logprobs
from gpg_vl.models.qwen_vl import QwenVLAdapter
from gpg_vl.resources import TINY_MODELS


FAMILIES = ("qwen2_vl", "qwen2_5_vl", "qwen2")
G = 3


def chat(text: str, n_images: int) -> list[dict]:
    return [{"role": "user", "content": [{"type": "image"}] * n_images + [{"type": "text", "text": text}]}]


def encoded_prompts(adapter):
    """Three prompts of different lengths; for VL models images of three sizes, one prompt with two."""
    if not isinstance(adapter, QwenVLAdapter):
        texts = ["What colour?", "How many circles are in the image? Answer with a number.", "Count."]
        return adapter.encode_batch([chat(t, 0) for t in texts], [[], [], []])
    prompts = [chat("What colour is the shape?", 1), chat("How many circles are there? Answer with a number.", 1),
               chat("Which is larger?", 2)]
    images = [[Image.new("RGB", (60, 90), "red")], [Image.new("RGB", (200, 120), "blue")],
              [Image.new("RGB", (300, 41), "white"), Image.new("RGB", (56, 56), "black")]]
    return adapter.encode_batch(prompts, images)


def completions(n: int, t: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(20, 300, (n, t), generator=g)
    mask = torch.ones_like(ids)
    mask[1, 3:] = 0  # ended early
    mask[4, 1:] = 0  # ended at its first token
    return ids, mask


def plain_logprobs(adapter, model, prompts, ids, mask):
    """Reference: N full sequences (each prompt repeated G times, left-padded), one forward of
    the Hugging Face model with its own position ids, whole-vocabulary logits."""
    rows = [prompts[i // G] for i in range(ids.shape[0])]
    width = max(p.num_tokens for p in prompts)
    n, t = ids.shape
    input_ids = torch.full((n, width + t), adapter.pad_token_id)
    attention = torch.zeros((n, width + t), dtype=torch.long)
    types = torch.zeros((n, width + t), dtype=torch.long)
    for i, p in enumerate(rows):
        input_ids[i, width - p.num_tokens:width] = p.input_ids
        attention[i, width - p.num_tokens:width] = 1
        if p.mm_token_type_ids is not None:
            types[i, width - p.num_tokens:width] = p.mm_token_type_ids
    input_ids[:, width:], attention[:, width:] = ids, mask
    extra = {}
    if isinstance(adapter, QwenVLAdapter):
        with_images = [p for p in rows if p.pixel_values is not None]
        extra = dict(pixel_values=torch.cat([p.pixel_values for p in with_images]),
                     image_grid_thw=torch.cat([p.image_grid_thw for p in with_images]), mm_token_type_ids=types)
    logits = model(input_ids=input_ids, attention_mask=attention, use_cache=False, **extra).logits
    return token_logprobs(logits[:, width - 1:width + t - 1], ids) * mask


@pytest.fixture(scope="module")
def adapters():
    return {f: load_adapter(str(TINY_MODELS / f), max_pixels=12544) for f in FAMILIES}


def grads(model) -> dict[str, torch.Tensor]:
    out = {k: p.grad.detach().clone() for k, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return out


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("checkpointing", [False, True])
def test_once_per_group_equals_the_plain_forward(adapters, family, checkpointing):
    adapter = adapters[family]
    model = copy.deepcopy(adapter.model).train()
    if checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    prompts = encoded_prompts(adapter)
    ids, mask = completions(len(prompts) * G, 7)
    got = PolicyLogprobs(model)(collate(prompts, adapter.pad_token_id), ids, mask, G, chunk_size=3)
    (got * torch.linspace(-1, 1, got.numel()).view_as(got)).sum().backward()  # a loss that weighs each token
    ours = grads(model)
    expected = plain_logprobs(adapter, model, prompts, ids, mask)
    (expected * torch.linspace(-1, 1, got.numel()).view_as(got)).sum().backward()
    plain = grads(model)
    assert got.dtype == torch.float32 and got.shape == ids.shape
    assert torch.allclose(got, expected, atol=1e-5, rtol=0), (got - expected).abs().max()
    assert ours.keys() == plain.keys() and len(ours) == len(list(model.parameters()))
    for name in plain:
        assert torch.allclose(ours[name], plain[name], atol=1e-5, rtol=1e-4), name
    assert (got[mask == 0] == 0).all() and (got[mask == 1] < 0).all()


def test_the_vision_tower_runs_once_per_prompt(adapters):
    adapter = adapters["qwen2_vl"]
    prompts = encoded_prompts(adapter)
    ids, mask = completions(len(prompts) * G, 5)
    seen = []
    hook = adapter.model.model.visual.register_forward_hook(lambda m, args, out: seen.append(args[0].shape[0]))
    try:
        with torch.no_grad():
            PolicyLogprobs(adapter.model)(collate(prompts, adapter.pad_token_id), ids, mask, G)
    finally:
        hook.remove()
    assert seen == [sum(p.pixel_values.shape[0] for p in prompts)]  # one call, each image's patches once


def test_chunk_size_changes_neither_values_nor_gradients(adapters):
    adapter = adapters["qwen2_5_vl"]
    model = copy.deepcopy(adapter.model).train()
    prompts = encoded_prompts(adapter)
    ids, mask = completions(len(prompts) * G, 9, seed=1)
    results = []
    for chunk in (1, 4, 64):
        lp = PolicyLogprobs(model)(collate(prompts, adapter.pad_token_id), ids, mask, G, chunk_size=chunk)
        lp.sum().backward()
        results.append((lp.detach(), grads(model)))
    for lp, g in results[1:]:
        assert torch.allclose(lp, results[0][0], atol=1e-6, rtol=0)
        assert all(torch.allclose(g[k], results[0][1][k], atol=1e-6, rtol=1e-5) for k in g)


def test_temperature_divides_the_logits(adapters):
    adapter = adapters["qwen2"]
    prompts = encoded_prompts(adapter)
    ids, mask = completions(len(prompts) * G, 4)
    with torch.no_grad():
        hot = PolicyLogprobs(adapter.model)(collate(prompts, adapter.pad_token_id), ids, mask, G, temperature=2.0)
        body = adapter.model(**{"input_ids": torch.cat([prompts[0].input_ids, ids[0]])[None]}).logits[0]
    p = prompts[0].num_tokens
    expected = torch.log_softmax(body[p - 1:p + 3] / 2.0, -1).gather(-1, ids[0, :, None])[:, 0]
    assert torch.allclose(hot[0], expected, atol=1e-5, rtol=0)


def test_masked_tail_does_not_change_logprobs(adapters):
    """Tokens after a completion's end (mask 0) must not affect the positions before it."""
    adapter = adapters["qwen2_vl"]
    prompts = encoded_prompts(adapter)
    ids, mask = completions(len(prompts) * G, 8, seed=2)
    mask[:, 5:] = 0
    changed = ids.clone()
    changed[:, 5:] = adapter.pad_token_id
    with torch.no_grad():
        a = PolicyLogprobs(adapter.model)(collate(prompts, adapter.pad_token_id), ids, mask, G)
        b = PolicyLogprobs(adapter.model)(collate(prompts, adapter.pad_token_id), changed, mask, G)
    assert torch.equal(a, b)


def test_chunked_head_holds_one_chunk_of_logits():
    """The LM head sees `chunk` positions per call, forward and backward (checkpointed)."""
    head = torch.nn.Linear(8, 50, bias=False)
    shapes = []
    head.register_forward_hook(lambda m, args, out: shapes.append(tuple(out.shape)))
    hidden = torch.randn(2, 10, 8, requires_grad=True)
    ids = torch.randint(0, 50, (2, 10))
    out = chunked_head_logprobs(head, hidden, ids, 4)
    out.sum().backward()
    # forward: chunks of 4, 4, 2; backward recomputes each once
    assert sorted(shapes) == sorted([(2, 4, 50), (2, 4, 50), (2, 2, 50)] * 2)
    expected = torch.log_softmax(head(hidden), -1).gather(-1, ids[..., None])[..., 0]
    assert torch.allclose(out, expected, atol=1e-6)
    with pytest.raises(ValueError, match="at least 1"):
        chunked_head_logprobs(head, hidden, ids, 0)


def test_bfloat16_weights_give_float32_logprobs_and_gradients():
    adapter = load_adapter(str(TINY_MODELS / "qwen2_vl"), dtype="bfloat16", max_pixels=12544, gradient_checkpointing=True)
    assert adapter.model.dtype == torch.bfloat16 and adapter.model.is_gradient_checkpointing
    adapter.model.train()
    prompts = encoded_prompts(adapter)
    ids, mask = completions(len(prompts) * G, 3)
    lp = PolicyLogprobs(adapter.model)(collate(prompts, adapter.pad_token_id), ids, mask, G, chunk_size=2)
    assert lp.dtype == torch.float32
    lp.sum().backward()
    assert adapter.model.get_input_embeddings().weight.grad is not None
    assert adapter.model.model.visual.patch_embed.proj.weight.grad is not None
