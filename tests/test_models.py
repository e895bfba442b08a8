"""Model adapters and the tiny offline models: input building, log-probabilities, tokenizer,
box conventions, and that the committed tiny models are what the builder makes."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file
from transformers import AutoConfig, AutoModelForCausalLM
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import smart_resize as hf_smart_resize

from gpg_vl.boxes import NormalizedBoxes, PixelBoxes, ResizedPixelBoxes, smart_resize
from gpg_vl.models import SUPPORTED_MODEL_TYPES, UnsupportedModelError, load_adapter
from gpg_vl.models.qwen_vl import Qwen2_5_VLAdapter, Qwen2VLAdapter
from gpg_vl.models.text import Qwen2Adapter
from gpg_vl.models.tiny import ANSWER_WORDS, build_tiny_models

TINY = Path(__file__).resolve().parent.parent / "assets" / "tiny"
FAMILIES = ("qwen2_vl", "qwen2_5_vl", "qwen2")
VL_FAMILIES = ("qwen2_vl", "qwen2_5_vl")
MAX_PIXELS = 12544


@pytest.fixture(scope="module")
def adapters():
    return {name: load_adapter(str(TINY / name), max_pixels=MAX_PIXELS) for name in FAMILIES}


def chat(text: str, n_images: int) -> list[dict]:
    return [{"role": "user", "content": [{"type": "image"}] * n_images + [{"type": "text", "text": text}]}]


def two_prompts(adapter):
    """A left-padded batch: prompts of different lengths, images of two sizes."""
    n = 1 if adapter.has_vision else 0
    prompts = [chat("What colour is the shape?", n), chat("How many circles are in the image? Answer with a number.", n)]
    images = [[Image.new("RGB", (60, 90), "red")], [Image.new("RGB", (200, 120), "blue")]] if n else [[], []]
    return prompts, images


def completion_mask(ids: torch.Tensor, eos_ids: list[int]) -> torch.Tensor:
    """1 up to and including the first end token of each row."""
    is_end = torch.isin(ids, torch.tensor(eos_ids)).long()  # [N, T]
    return (torch.cumsum(is_end, dim=1) - is_end == 0).long()


def sample(adapter, inputs, max_new_tokens=12, seed=0):
    torch.manual_seed(seed)
    out = adapter.model.generate(
        **inputs, do_sample=True, temperature=1.0, top_k=0, top_p=1.0, max_new_tokens=max_new_tokens,
        suppress_tokens=adapter.suppressed_token_ids or None, eos_token_id=adapter.eos_token_ids,
        pad_token_id=adapter.pad_token_id, output_logits=True, return_dict_in_generate=True)
    ids = out.sequences[:, inputs["input_ids"].shape[1]:]  # [N, T]
    # Raw logits, before suppression: the distribution the policy itself assigns.
    logits = torch.stack(out.logits, dim=1).float()  # [N, T, V]
    return ids, torch.log_softmax(logits, -1).gather(-1, ids.unsqueeze(-1)).squeeze(-1)


# --- choosing the adapter ---------------------------------------------------------------

def test_adapter_chosen_by_model_type_not_path(tmp_path):
    misleading = {"qwen2_5_vl": "Qwen2-VL-2B-Instruct", "qwen2_vl": "Qwen2.5-VL-3B", "qwen2": "qwen2_vl-text"}
    expected = {"qwen2_5_vl": Qwen2_5_VLAdapter, "qwen2_vl": Qwen2VLAdapter, "qwen2": Qwen2Adapter}
    for family, folder_name in misleading.items():
        folder = shutil.copytree(TINY / family, tmp_path / folder_name)
        assert type(load_adapter(str(folder))) is expected[family]


def test_unknown_model_type_lists_supported(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    with pytest.raises(UnsupportedModelError) as err:
        load_adapter(str(tmp_path))
    assert "'gpt2'" in str(err.value)
    assert all(name in str(err.value) for name in SUPPORTED_MODEL_TYPES)
    assert {"qwen2_vl", "qwen2_5_vl", "qwen2"} <= set(SUPPORTED_MODEL_TYPES)


def test_bad_dtype_is_refused():
    with pytest.raises(ValueError, match="float32"):
        load_adapter(str(TINY / "qwen2"), dtype="fp32")


# --- inputs -----------------------------------------------------------------------------

@pytest.mark.parametrize("family", VL_FAMILIES)
@pytest.mark.parametrize("size", [(20, 20), (56, 56), (60, 90), (200, 120), (300, 41), (512, 512)])
def test_image_token_count(adapters, family, size):
    adapter = adapters[family]
    inputs = adapter.build_inputs([chat("Where is it?", 1)], [[Image.new("RGB", size, "green")]])
    n_pads = int((inputs["input_ids"] == adapter.processor.image_token_id).sum())
    w, h = smart_resize(size[1], size[0], 28, 3136, MAX_PIXELS)
    assert n_pads == (h // 28) * (w // 28) == int(inputs["image_grid_thw"].prod()) // 4
    assert int(inputs["mm_token_type_ids"].sum()) == n_pads


@pytest.mark.parametrize("family", FAMILIES)
def test_group_inputs_equal_repeated_prompts(adapters, family):
    adapter = adapters[family]
    prompts, images = two_prompts(adapter)
    if adapter.has_vision:  # a sample with two images of other sizes
        prompts.append(chat("Which is larger?", 2))
        images.append([Image.new("RGB", (300, 41), "white"), Image.new("RGB", (56, 56), "black")])
    grouped = adapter.build_group_inputs(prompts, images, 3)
    expected = adapter.build_inputs([p for p in prompts for _ in range(3)], [i for i in images for _ in range(3)])
    assert grouped.keys() == expected.keys()
    for key in expected:
        assert torch.equal(grouped[key], expected[key]), key


def test_smart_resize_matches_transformers():
    for min_pixels, max_pixels in [(3136, 12544), (3136, 401408), (256 * 28 * 28, 1280 * 28 * 28)]:
        for h in (1, 13, 28, 41, 56, 99, 224, 333, 640, 1080, 2001):
            for w in (1, 17, 28, 55, 120, 479, 720, 1920, 3000):
                if max(h, w) / min(h, w) > 200:  # transformers refuses these
                    continue
                rh, rw = hf_smart_resize(h, w, factor=28, min_pixels=min_pixels, max_pixels=max_pixels)
                assert smart_resize(h, w, 28, min_pixels, max_pixels) == (rw, rh)


@pytest.mark.parametrize("family", FAMILIES)
def test_build_inputs_left_padded(adapters, family):
    adapter = adapters[family]
    inputs = adapter.build_inputs(*two_prompts(adapter))
    assert inputs["input_ids"].shape == inputs["attention_mask"].shape
    # The shorter prompt is padded on the left, so both end at the generation point.
    assert inputs["attention_mask"][:, -1].tolist() == [1, 1]
    assert inputs["attention_mask"][0, 0] == 0 and inputs["input_ids"][0, 0] == adapter.pad_token_id
    for ids, mask in zip(inputs["input_ids"], inputs["attention_mask"]):
        text = adapter.tokenizer.decode(ids[mask == 1])
        assert text.startswith("<|im_start|>user\n") and text.endswith("<|im_end|>\n<|im_start|>assistant\n")


def test_raw_string_prompt_is_sent_as_is(adapters):
    adapter = adapters["qwen2_vl"]
    raw = "Question: <|vision_start|><|image_pad|><|vision_end|> what colour? Answer:"
    inputs = adapter.build_inputs([raw], [[Image.new("RGB", (56, 56))]])
    text = adapter.tokenizer.decode(inputs["input_ids"][0])
    assert text.startswith("Question: <|vision_start|>") and text.endswith(" what colour? Answer:")
    assert "<|im_start|>" not in text


def test_text_adapter_refuses_images(adapters):
    with pytest.raises(ValueError, match="text-only"):
        adapters["qwen2"].build_inputs([chat("hi", 1)], [[Image.new("RGB", (56, 56))]])


# --- log-probabilities ------------------------------------------------------------------

@pytest.mark.parametrize("family", FAMILIES)
def test_logprobs_match_generate(adapters, family):
    adapter = adapters[family]
    inputs = adapter.build_inputs(*two_prompts(adapter))
    ids, generated = sample(adapter, inputs)
    mask = completion_mask(ids, adapter.eos_token_ids)
    with torch.no_grad():
        got = adapter.completion_logprobs(adapter.model, inputs, ids, mask)
    assert got.dtype == torch.float32 and got.shape == ids.shape
    assert torch.allclose(got, generated * mask, atol=1e-4, rtol=0)
    assert not torch.isin(ids, torch.tensor(adapter.suppressed_token_ids or [-1])).any()


@pytest.mark.parametrize("family", ("qwen2_5_vl", "qwen2"))
def test_chunking_and_masking(adapters, family):
    adapter = adapters[family]
    inputs = adapter.build_inputs(*two_prompts(adapter))
    ids, _ = sample(adapter, inputs, seed=1)
    mask = torch.ones_like(ids)
    mask[0, 5:] = 0
    mask[1, -2:] = 0
    results, grads = [], []
    for chunk_size in (1, 5, 64):
        adapter.model.zero_grad()
        logprobs = adapter.completion_logprobs(adapter.model, inputs, ids, mask, chunk_size=chunk_size)
        logprobs.sum().backward()
        results.append(logprobs.detach())
        grads.append(adapter.model.get_input_embeddings().weight.grad.clone())
    for other, grad in zip(results[1:], grads[1:]):
        assert torch.allclose(results[0], other, atol=1e-6, rtol=0)
        assert torch.allclose(grads[0], grad, atol=1e-6, rtol=0)
    assert (results[0][mask == 0] == 0).all() and (results[0][mask == 1] < 0).all()
    adapter.model.zero_grad(set_to_none=True)


def test_masked_tail_does_not_change_logprobs(adapters):
    """Tokens after a row's end (mask 0) must not affect the positions before it."""
    adapter = adapters["qwen2_vl"]
    inputs = adapter.build_inputs(*two_prompts(adapter))
    ids, _ = sample(adapter, inputs, seed=2)
    mask = torch.ones_like(ids)
    mask[:, 6:] = 0
    changed = ids.clone()
    changed[:, 6:] = adapter.pad_token_id
    with torch.no_grad():
        a = adapter.completion_logprobs(adapter.model, inputs, ids, mask)
        b = adapter.completion_logprobs(adapter.model, inputs, changed, mask)
    assert torch.equal(a, b)


def test_decode_skips_masked_and_special(adapters):
    adapter = adapters["qwen2_vl"]
    tok = adapter.tokenizer
    ids = tok("<think>two</think> 3", add_special_tokens=False)["input_ids"] + tok.convert_tokens_to_ids(["<|im_end|>"])
    ids = torch.tensor([ids + [tok.pad_token_id]])
    mask = torch.ones_like(ids)
    mask[0, -1] = 0
    assert adapter.decode(ids, mask) == ["<think>two</think> 3"]


# --- tokenizer and special tokens ------------------------------------------------------

@pytest.mark.parametrize("family", FAMILIES)
def test_tokenizer_round_trip_and_answer_words(adapters, family):
    tok = adapters[family].tokenizer
    text = "Héllo wörld: 日本語, emoji 🙂🚀, tabs\tand  double  spaces\n<think>x</think> <answer>42</answer>"
    assert tok.decode(tok(text, add_special_tokens=False)["input_ids"]) == text
    for word in ANSWER_WORDS:
        for form in (word, " " + word):
            assert len(tok(form, add_special_tokens=False)["input_ids"]) == 1, form
    # small on purpose: a random-init policy's chance of a right one-token answer is ~1/|V|
    assert 300 <= len(tok) <= 600


def test_chat_template_renders_image_placeholder(adapters):
    tok = adapters["qwen2_vl"].tokenizer
    messages = [{"role": "system", "content": "Be brief."}] + chat("Count.", 1)
    text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert text == ("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\n"
                    "<|vision_start|><|image_pad|><|vision_end|>Count.<|im_end|>\n<|im_start|>assistant\n")


def test_special_token_ids(adapters):
    for family in VL_FAMILIES:
        adapter = adapters[family]
        tok = adapter.tokenizer
        assert tok.convert_tokens_to_ids("<|image_pad|>") in adapter.suppressed_token_ids
        assert adapter.model.config.image_token_id in adapter.suppressed_token_ids
        assert not set(adapter.suppressed_token_ids) & set(adapter.eos_token_ids)
    for adapter in adapters.values():
        ends = adapter.tokenizer.convert_tokens_to_ids(["<|im_end|>", "<|endoftext|>"])
        assert set(ends) <= set(adapter.eos_token_ids)
    assert adapters["qwen2"].suppressed_token_ids == []


# --- box conventions --------------------------------------------------------------------

def test_box_conventions(adapters):
    assert adapters["qwen2_vl"].box_convention == NormalizedBoxes(1000)
    assert adapters["qwen2_5_vl"].box_convention == ResizedPixelBoxes(factor=28, min_pixels=3136, max_pixels=MAX_PIXELS)
    assert adapters["qwen2"].box_convention == PixelBoxes()
    other = load_adapter(str(TINY / "qwen2_5_vl"), min_pixels=6272, max_pixels=50176)
    assert other.box_convention == ResizedPixelBoxes(factor=28, min_pixels=6272, max_pixels=50176)


# --- the tiny models --------------------------------------------------------------------

def test_parameter_counts(adapters):
    for adapter in adapters.values():
        assert sum(p.numel() for p in adapter.model.parameters()) < 1_000_000


def test_builder_reproduces_committed_assets(tmp_path):
    built = build_tiny_models(tmp_path, seed=0)
    assert sorted(built) == sorted(FAMILIES)
    for family, folder in built.items():
        committed = TINY / family
        assert sorted(p.name for p in folder.iterdir()) == sorted(p.name for p in committed.iterdir())
        for name in ("config.json", "generation_config.json", "tokenizer_config.json", "preprocessor_config.json"):
            if (committed / name).exists():
                assert json.loads((folder / name).read_text()) == json.loads((committed / name).read_text()), name
        assert (folder / "tokenizer.json").read_bytes() == (committed / "tokenizer.json").read_bytes()
        new, old = load_file(folder / "model.safetensors"), load_file(committed / "model.safetensors")
        assert new.keys() == old.keys()
        assert all(torch.equal(new[k], old[k]) for k in old)


@pytest.mark.parametrize("model_type", ["qwen3", "llama"])
def test_other_text_families(tmp_path, model_type):
    """A plain causal LM of another family, built from a config with the tiny tokenizer."""
    src = TINY / "qwen2"
    base = json.loads((src / "config.json").read_text())
    keys = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
            "num_key_value_heads", "eos_token_id", "pad_token_id", "tie_word_embeddings")
    config = AutoConfig.for_model(model_type, **{k: base[k] for k in keys})
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(tmp_path)
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "generation_config.json"):
        shutil.copy(src / name, tmp_path / name)
    adapter = load_adapter(str(tmp_path))
    assert adapter.model_type == model_type and not adapter.has_vision
    inputs = adapter.build_inputs(*two_prompts(adapter))
    ids, generated = sample(adapter, inputs)
    mask = completion_mask(ids, adapter.eos_token_ids)
    with torch.no_grad():
        got = adapter.completion_logprobs(adapter.model, inputs, ids, mask)
    assert torch.allclose(got, generated * mask, atol=1e-4, rtol=0)


def test_bfloat16_and_gradient_checkpointing():
    adapter = load_adapter(str(TINY / "qwen2_vl"), dtype="bfloat16", max_pixels=MAX_PIXELS, gradient_checkpointing=True)
    assert adapter.model.dtype == torch.bfloat16 and adapter.model.is_activation_checkpointing
    adapter.model.train()
    inputs = adapter.build_inputs(*two_prompts(adapter))
    ids = torch.tensor([[10, 11, 12], [13, 14, 2]])
    logprobs = adapter.completion_logprobs(adapter.model, inputs, ids, torch.ones_like(ids), chunk_size=2)
    assert logprobs.dtype == torch.float32
    logprobs.sum().backward()
    assert adapter.model.get_input_embeddings().weight.grad is not None


class Recorder(torch.nn.Module):
    """Stands in for a DDP/DeepSpeed wrapper: completion_logprobs must call its forward."""

    def __init__(self, inner):
        super().__init__()
        self.inner, self.calls = inner, []

    def forward(self, **kwargs):
        out = self.inner(**kwargs)
        self.calls.append((kwargs, out.logits.shape))
        return out


def test_logprobs_go_through_the_given_model_and_keep_few_logits(adapters):
    adapter = adapters["qwen2_5_vl"]
    inputs = adapter.build_inputs(*two_prompts(adapter))
    ids = torch.tensor([[10, 11, 12, 2], [13, 14, 2, 0]])
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 1, 0]])
    wrapper = Recorder(adapter.model)
    with torch.no_grad():
        adapter.completion_logprobs(wrapper, inputs, ids, mask)
    (kwargs, logits_shape), = wrapper.calls
    n, p = inputs["input_ids"].shape
    assert logits_shape[:2] == (n, ids.shape[1] + 1)
    assert torch.equal(kwargs["attention_mask"][:, p:], mask)
    # Completion tokens are text tokens (type 0) for the multimodal position ids.
    assert torch.equal(kwargs["mm_token_type_ids"][:, :p], inputs["mm_token_type_ids"])
    assert not kwargs["mm_token_type_ids"][:, p:].any()


def test_processor_fallback_only_for_missing_torchvision(monkeypatch):
    from gpg_vl.models import qwen_vl

    def fail(message):
        def from_pretrained(*args, **kwargs):
            raise ImportError(message)
        return from_pretrained

    monkeypatch.setattr(qwen_vl.AutoProcessor, "from_pretrained", fail("needs sentencepiece"))
    with pytest.raises(ImportError, match="sentencepiece"):
        qwen_vl.load_processor(str(TINY / "qwen2_vl"), qwen_vl.Qwen2VLProcessor, False)
    monkeypatch.setattr(qwen_vl.AutoProcessor, "from_pretrained", fail("requires the Torchvision library"))
    processor = qwen_vl.load_processor(str(TINY / "qwen2_vl"), qwen_vl.Qwen2VLProcessor, False)
    assert isinstance(processor, qwen_vl.Qwen2VLProcessor) and not hasattr(processor, "video_processor")
