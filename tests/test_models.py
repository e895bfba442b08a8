"""Model adapters and the tiny offline models: prompt encoding, log-probabilities, tokenizer,
box conventions, and that the committed tiny models are what the builder makes."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file
from transformers import AutoConfig, AutoModelForCausalLM
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import smart_resize as hf_smart_resize

from gpg_vl.boxes import NormalizedBoxes, PixelBoxes, ResizedPixelBoxes, smart_resize
from gpg_vl.models import SUPPORTED_MODEL_TYPES, UnsupportedModelError, load_adapter
from gpg_vl.models.base import collate, image_count
from gpg_vl.models.policy import PolicyLogprobs
from gpg_vl.models.qwen_vl import Qwen2_5_VLAdapter, Qwen2VLAdapter, Qwen3VLAdapter, Qwen3VLMoeAdapter, QwenVLAdapter
from gpg_vl.models.text import Qwen2Adapter
from gpg_vl.models.tiny import ANSWER_WORDS, build_tiny_models
from gpg_vl.rollout import completion_mask
from gpg_vl.task import IMAGE_MARKER
from gpg_vl.resources import TINY_MODELS


FAMILIES = ("qwen2_vl", "qwen2_5_vl", "qwen3_vl", "qwen3_vl_moe", "qwen2")
VL_FAMILIES = ("qwen2_vl", "qwen2_5_vl", "qwen3_vl", "qwen3_vl_moe")
PIXELS_PER_TOKEN = {"qwen2_vl": 28, "qwen2_5_vl": 28, "qwen3_vl": 32, "qwen3_vl_moe": 32}  # patch x merge
MAX_PIXELS = 12544


@pytest.fixture(scope="module")
def adapters():
    return {name: load_adapter(str(TINY_MODELS / name), max_pixels=MAX_PIXELS) for name in FAMILIES}


def chat(text: str, n_images: int) -> list[dict]:
    return [{"role": "user", "content": [{"type": "image"}] * n_images + [{"type": "text", "text": text}]}]


def two_prompts(adapter):
    """A left-padded batch: prompts of different lengths, images of two sizes."""
    n = 1 if isinstance(adapter, QwenVLAdapter) else 0
    prompts = [chat("What colour is the shape?", n), chat("How many circles are in the image? Answer with a number.", n)]
    images = [[Image.new("RGB", (60, 90), "red")], [Image.new("RGB", (200, 120), "blue")]] if n else [[], []]
    return prompts, images


def sample(adapter, prompts, max_new_tokens=12, seed=0):
    """transformers' own sampling from the left-padded batch, with the raw per-token logits."""
    batch = collate(prompts, adapter.pad_token_id)
    inputs = {k: v for k, v in batch.model_inputs().items() if k != "position_ids"}
    torch.manual_seed(seed)
    out = adapter.model.generate(
        **inputs, do_sample=True, temperature=1.0, top_k=0, top_p=1.0, max_new_tokens=max_new_tokens,
        suppress_tokens=adapter.suppressed_token_ids or None, eos_token_id=adapter.eos_token_ids,
        pad_token_id=adapter.pad_token_id, output_logits=True, return_dict_in_generate=True)
    ids = out.sequences[:, inputs["input_ids"].shape[1]:]  # [N, T]
    # Raw logits, before suppression: the distribution the policy itself assigns.
    logits = torch.stack(out.logits, dim=1).float()  # [N, T, V]
    return ids, torch.log_softmax(logits, -1).gather(-1, ids.unsqueeze(-1)).squeeze(-1)


def encoded(adapter):
    return adapter.encode_batch(*two_prompts(adapter))


# --- choosing the adapter ---------------------------------------------------------------

def test_adapter_chosen_by_model_type_not_path(tmp_path):
    misleading = {"qwen2_5_vl": "Qwen2-VL-2B-Instruct", "qwen2_vl": "Qwen2.5-VL-3B", "qwen2": "qwen2_vl-text",
                  "qwen3_vl": "Qwen2.5-VL-7B", "qwen3_vl_moe": "Qwen3-VL-4B-Instruct"}
    expected = {"qwen2_5_vl": Qwen2_5_VLAdapter, "qwen2_vl": Qwen2VLAdapter, "qwen2": Qwen2Adapter,
                "qwen3_vl": Qwen3VLAdapter, "qwen3_vl_moe": Qwen3VLMoeAdapter}
    for family, folder_name in misleading.items():
        folder = shutil.copytree(TINY_MODELS / family, tmp_path / folder_name)
        assert type(load_adapter(str(folder))) is expected[family]


def test_unknown_model_type_lists_supported(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    with pytest.raises(UnsupportedModelError) as err:
        load_adapter(str(tmp_path))
    assert "'gpt2'" in str(err.value)
    assert all(name in str(err.value) for name in SUPPORTED_MODEL_TYPES)
    assert {"qwen2_vl", "qwen2_5_vl", "qwen3_vl", "qwen3_vl_moe", "qwen2"} <= set(SUPPORTED_MODEL_TYPES)


def test_bad_dtype_is_refused():
    with pytest.raises(ValueError, match="float32"):
        load_adapter(str(TINY_MODELS / "qwen2"), dtype="fp32")


# --- inputs -----------------------------------------------------------------------------

@pytest.mark.parametrize("family", VL_FAMILIES)
@pytest.mark.parametrize("size", [(20, 20), (56, 56), (60, 90), (200, 120), (300, 41), (512, 512)])
def test_image_token_count(adapters, family, size):
    adapter = adapters[family]
    prompt, image = chat("Where is it?", 1), Image.new("RGB", size, "green")
    enc = adapter.encode(prompt, [image])
    n_pads = int((enc.input_ids == adapter.processor.image_token_id).sum())
    factor = PIXELS_PER_TOKEN[family]
    w, h = smart_resize(size[1], size[0], factor, 3136, MAX_PIXELS)
    assert n_pads == (h // factor) * (w // factor) == int(enc.image_grid_thw.prod()) // 4
    assert int(enc.mm_token_type_ids.sum()) == n_pads
    # counted from the size alone, as the prompt-length limit counts it
    assert adapter.count_prompt_tokens(prompt, [size]) == enc.num_tokens


@pytest.mark.parametrize("family", FAMILIES)
def test_batch_encoding_equals_one_by_one(adapters, family):
    adapter = adapters[family]
    prompts, images = two_prompts(adapter)
    if isinstance(adapter, QwenVLAdapter):  # a prompt with two images of other sizes
        prompts.append(chat("Which is larger?", 2))
        images.append([Image.new("RGB", (300, 41), "white"), Image.new("RGB", (56, 56), "black")])
    for together, p, i in zip(adapter.encode_batch(prompts, images), prompts, images):
        alone = adapter.encode(p, i)
        for name, a, b in zip(alone._fields, together, alone):
            assert torch.equal(a, b) if torch.is_tensor(b) else a == b, name
        assert adapter.count_prompt_tokens(p, [im.size for im in i]) == alone.num_tokens


@pytest.mark.parametrize("family", ["qwen2_5_vl", "qwen3_vl"])
def test_multimodal_positions_are_the_models_own(adapters, family):
    adapter = adapters[family]
    enc = adapter.encode(chat("Where?", 1), [Image.new("RGB", (200, 120))])
    positions, delta = adapter.model.model.get_rope_index(enc.input_ids[None], enc.mm_token_type_ids[None],
                                                          image_grid_thw=enc.image_grid_thw)
    assert torch.equal(enc.position_ids, positions[:, 0])
    # the first generated token continues one past the largest position of the prompt
    assert enc.next_position == int(positions.max()) + 1 == enc.num_tokens + int(delta)


def test_smart_resize_matches_transformers():
    for min_pixels, max_pixels in [(3136, 12544), (3136, 401408), (256 * 28 * 28, 1280 * 28 * 28)]:
        for h in (1, 13, 28, 41, 56, 99, 224, 333, 640, 1080, 2001):
            for w in (1, 17, 28, 55, 120, 479, 720, 1920, 3000):
                if max(h, w) / min(h, w) > 200:  # transformers refuses these
                    continue
                rh, rw = hf_smart_resize(h, w, factor=28, min_pixels=min_pixels, max_pixels=max_pixels)
                assert smart_resize(h, w, 28, min_pixels, max_pixels) == (rw, rh)


@pytest.mark.parametrize("family", FAMILIES)
def test_collate_left_pads(adapters, family):
    adapter = adapters[family]
    batch = collate(encoded(adapter), adapter.pad_token_id)
    assert batch.input_ids.shape == batch.attention_mask.shape == batch.position_ids.shape[1:]
    # The shorter prompt is padded on the left, so both end at the generation point.
    assert batch.attention_mask[:, -1].tolist() == [1, 1]
    assert batch.attention_mask[0, 0] == 0 and batch.input_ids[0, 0] == adapter.pad_token_id
    for ids, mask in zip(batch.input_ids, batch.attention_mask):
        text = adapter.tokenizer.decode(ids[mask == 1])
        assert text.startswith("<|im_start|>user\n") and text.endswith("<|im_end|>\n<|im_start|>assistant\n")


def test_raw_string_prompt_is_sent_as_is_with_its_image_marker_expanded(adapters):
    adapter = adapters["qwen2_vl"]
    raw = f"Question: {IMAGE_MARKER} what colour? Answer:"
    enc = adapter.encode(raw, [Image.new("RGB", (56, 56))])
    text = adapter.tokenizer.decode(enc.input_ids)
    assert text.startswith("Question: <|vision_start|><|image_pad|>") and text.endswith(" what colour? Answer:")
    assert "<|im_start|>" not in text and enc.text == raw.replace(IMAGE_MARKER, "<|vision_start|><|image_pad|><|vision_end|>")
    with pytest.raises(ValueError, match="places 0 image"):  # the family's own tokens are the adapter's to write
        adapter.encode("Question: <|vision_start|><|image_pad|><|vision_end|> what?", [Image.new("RGB", (56, 56))])


def test_text_adapter_refuses_images(adapters):
    with pytest.raises(ValueError, match="text-only"):
        adapters["qwen2"].encode(chat("hi", 1), [Image.new("RGB", (56, 56))])


# --- log-probabilities ------------------------------------------------------------------

@pytest.mark.parametrize("family", FAMILIES)
def test_logprobs_match_generate(adapters, family):
    adapter = adapters[family]
    prompts = encoded(adapter)
    ids, generated = sample(adapter, prompts)
    mask = completion_mask(ids, adapter.eos_token_ids)
    with torch.no_grad():
        got = PolicyLogprobs(adapter.model)(collate(prompts, adapter.pad_token_id), ids, mask, 1)
    assert got.dtype == torch.float32 and got.shape == ids.shape
    assert torch.allclose(got, generated * mask, atol=1e-4, rtol=0)
    assert not torch.isin(ids, torch.tensor(adapter.suppressed_token_ids or [-1])).any()


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
    assert adapters["qwen3_vl"].box_convention == adapters["qwen3_vl_moe"].box_convention == NormalizedBoxes(1000)
    assert adapters["qwen2"].box_convention == PixelBoxes()
    other = load_adapter(str(TINY_MODELS / "qwen2_5_vl"), min_pixels=6272, max_pixels=50176)
    assert other.box_convention == ResizedPixelBoxes(factor=28, min_pixels=6272, max_pixels=50176)


# --- the tiny models --------------------------------------------------------------------

def test_parameter_counts(adapters):
    for adapter in adapters.values():
        assert sum(p.numel() for p in adapter.model.parameters()) < 1_000_000


def test_builder_reproduces_committed_assets(tmp_path):
    built = build_tiny_models(tmp_path, seed=0)
    assert sorted(built) == sorted(FAMILIES)
    for family, folder in built.items():
        committed = TINY_MODELS / family
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
    src = TINY_MODELS / "qwen2"
    base = json.loads((src / "config.json").read_text())
    keys = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
            "num_key_value_heads", "eos_token_id", "pad_token_id", "tie_word_embeddings")
    config = AutoConfig.for_model(model_type, **{k: base[k] for k in keys})
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(tmp_path)
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "generation_config.json"):
        shutil.copy(src / name, tmp_path / name)
    adapter = load_adapter(str(tmp_path))
    assert adapter.model_type == model_type and not isinstance(adapter, QwenVLAdapter)
    prompts = encoded(adapter)
    ids, generated = sample(adapter, prompts)
    mask = completion_mask(ids, adapter.eos_token_ids)
    with torch.no_grad():
        got = PolicyLogprobs(adapter.model)(collate(prompts, adapter.pad_token_id), ids, mask, 1)
    assert torch.allclose(got, generated * mask, atol=1e-4, rtol=0)


def test_processor_fallback_only_for_missing_torchvision(monkeypatch):
    from gpg_vl.models import qwen_vl

    def fail(message):
        def from_pretrained(*args, **kwargs):
            raise ImportError(message)
        return from_pretrained

    monkeypatch.setattr(qwen_vl.AutoProcessor, "from_pretrained", fail("needs sentencepiece"))
    with pytest.raises(ImportError, match="sentencepiece"):
        qwen_vl.load_processor(str(TINY_MODELS / "qwen2_vl"), qwen_vl.Qwen2VLProcessor, False)
    monkeypatch.setattr(qwen_vl.AutoProcessor, "from_pretrained", fail("requires the Torchvision library"))
    processor = qwen_vl.load_processor(str(TINY_MODELS / "qwen2_vl"), qwen_vl.Qwen2VLProcessor, False)
    assert isinstance(processor, qwen_vl.Qwen2VLProcessor) and not hasattr(processor, "video_processor")


def test_the_images_a_prompt_places_are_its_image_parts_or_markers():
    chat = [{"role": "system", "content": "Be brief."},
            {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "and"}, {"type": "image"}]}]
    assert image_count(chat) == 2 and image_count("a raw prompt") == 0
    assert image_count(f"{IMAGE_MARKER} left, {IMAGE_MARKER} right: which is brighter?") == 2


@pytest.mark.parametrize("family", VL_FAMILIES)
def test_image_embeddings_are_what_the_language_model_reads(adapters, family):
    """One [visual tokens, width] block per image; Qwen3-VL's DeepStack features side by side
    with the merger's, and the merger's part equal to what the forward places in the prompt."""
    adapter = adapters[family]
    enc = adapter.encode(chat("Which is larger?", 2), [Image.new("RGB", (300, 41)), Image.new("RGB", (56, 56))])
    with torch.no_grad():
        blocks = adapter.image_embeddings(enc.pixel_values, enc.image_grid_thw)
    hidden = adapter.model.config.get_text_config().hidden_size
    deepstack = len(getattr(adapter.model.config.vision_config, "deepstack_visual_indexes", []))
    assert [b.shape for b in blocks] == [(int(g.prod()) // 4, hidden * (1 + deepstack)) for g in enc.image_grid_thw]
    with torch.no_grad():
        main = adapter.model.model.get_image_features(pixel_values=enc.pixel_values,
                                                      image_grid_thw=enc.image_grid_thw).pooler_output
    assert all(torch.equal(b[:, :hidden], m) for b, m in zip(blocks, main))
