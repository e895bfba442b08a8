"""Tiny random-init Qwen2-VL, Qwen2.5-VL, Qwen3-VL (dense and MoE) and Qwen2 models, built
offline from configs.

They exist so that tests and smoke runs load through exactly the code path real
checkpoints take (`load_adapter(folder)`), in seconds, on a CPU. The weights are random;
the tokenizer is a small byte-level BPE trained here on a built-in corpus, so every answer
word of the built-in tasks is a single token (a random-init policy learns a one-token
answer in seconds, a multi-token one hardly at all).

    python -m gpg_vl.models.tiny --out gpg_vl/assets/tiny
    gpg-vl build-tiny --out runs/tiny-vllm --head-dim 32     (the same models, vLLM-capable)
"""

from __future__ import annotations

import argparse
import random
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import (
    GenerationConfig,
    PreTrainedTokenizerFast,
    Qwen2_5_VLConfig,
    Qwen2_5_VLForConditionalGeneration,
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen2VLConfig,
    Qwen2VLForConditionalGeneration,
    Qwen3VLConfig,
    Qwen3VLForConditionalGeneration,
    Qwen3VLMoeConfig,
    Qwen3VLMoeForConditionalGeneration,
)
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

from gpg_vl.resources import TINY_MODELS

SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>",
                  "<|image_pad|>", "<|video_pad|>")
# Plain added tokens: decoded back into the text, unlike special tokens.
TAG_TOKENS = ("<think>", "</think>", "<answer>", "</answer>")
# One token each, alone and after a space. Kept short on purpose: a random-init policy
# starts near uniform over the vocabulary, so the chance that it samples a right one-token
# answer is about 1 / vocabulary size; a few hundred tokens keep that chance workable.
ANSWER_WORDS = tuple([str(i) for i in range(10)]
                     + "red green blue yellow circle square triangle yes no left right".split())
CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' }}"
    "{%- if message['content'] is string %}{{- message['content'] }}"
    "{%- else %}{%- for part in message['content'] %}"
    "{%- if part['type'] == 'image' %}{{- '<|vision_start|><|image_pad|><|vision_end|>' }}"
    "{%- elif part['type'] == 'video' %}{{- '<|vision_start|><|video_pad|><|vision_end|>' }}"
    "{%- elif part['type'] == 'text' %}{{- part['text'] }}{%- endif %}"
    "{%- endfor %}{%- endif %}"
    "{{- '<|im_end|>\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)
# Words of the built-in tasks' instructions, so that a prompt is a dozen tokens, not sixty
# characters: a tiny model's attention then falls on the image tokens far more.
PROMPT_WORDS = tuple("""how many what where which is are the in of a an image shapes shape colour color
answer with one digit word its box as think reasoning output final number question user assistant
system please identify this that containing""".split())
BPE_VOCAB = 440  # 256 bytes, specials and the merges of the words above; the tag tokens come on top
MIN_PIXELS, MAX_PIXELS = 3136, 12544  # 4 to 16 image tokens (Qwen3-VL: 4 to 12): fast on a CPU
HIDDEN, LAYERS = 64, 2
HEAD_DIM = 16  # the bundled models: 4 heads of 16
VLLM_HEAD_DIM = 32  # the smallest head vLLM's CPU attention runs: 2 heads of 32
ROPE = {"rope_type": "default", "rope_theta": 10000.0}


def mrope_section(head_dim: int) -> list[int]:
    """Rotary pairs of a head split over (temporal, height, width) in Qwen2-VL's proportions
    (16, 24, 24 of 64): sums to head_dim / 2, as the multimodal rotary embedding requires."""
    half = head_dim // 2
    temporal = half // 4
    height = (half - temporal) // 2
    return [temporal, height, half - temporal - height]


def corpus(seed: int = 0) -> list[str]:
    """Deterministic training text: answer words alone and after a space, so that BPE's
    most frequent merges make both forms one token each, then the instruction words,
    lower-case and capitalised, in sentences."""
    rng = random.Random(seed)
    lines = []
    for _ in range(100):  # answer words first among the merges
        words = list(ANSWER_WORDS)
        rng.shuffle(words)
        lines += words + [" ".join(words)]
    for _ in range(20):
        words = list(PROMPT_WORDS)
        rng.shuffle(words)
        lines += [" ".join(words) + "?", " ".join(w.capitalize() for w in words) + "."]
    return lines


def build_tokenizer(seed: int = 0) -> PreTrainedTokenizerFast:
    """Byte-level BPE: any text, unicode included, decodes back to itself exactly."""
    bpe = Tokenizer(models.BPE())
    # The GPT-2 split keeps a run of digits together, so "1000" can be one token.
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=BPE_VOCAB, min_frequency=2, show_progress=False,
                                  special_tokens=list(SPECIAL_TOKENS),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    bpe.train_from_iterator(corpus(seed), trainer)
    bpe.add_tokens(list(TAG_TOKENS))
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                  chat_template=CHAT_TEMPLATE, clean_up_tokenization_spaces=False,
                                  padding_side="left")
    bad = [w for w in ANSWER_WORDS for text in (w, " " + w) if len(tok.encode(text)) != 1]
    if bad:
        raise RuntimeError(f"answer words that are not one token: {bad}; enlarge the corpus")
    return tok


def text_kwargs(tok: PreTrainedTokenizerFast, head_dim: int = HEAD_DIM) -> dict:
    heads = HIDDEN // head_dim
    return dict(vocab_size=len(tok), hidden_size=HIDDEN, intermediate_size=2 * HIDDEN,
                num_hidden_layers=LAYERS, num_attention_heads=heads, num_key_value_heads=max(1, heads // 2),
                max_position_embeddings=4096, bos_token_id=None,
                eos_token_id=tok.convert_tokens_to_ids("<|im_end|>"), pad_token_id=tok.pad_token_id)


def vision_token_ids(tok: PreTrainedTokenizerFast) -> dict:
    ids = tok.convert_tokens_to_ids
    return dict(image_token_id=ids("<|image_pad|>"), video_token_id=ids("<|video_pad|>"),
                vision_start_token_id=ids("<|vision_start|>"), vision_end_token_id=ids("<|vision_end|>"))


def qwen2_vl_config(tok: PreTrainedTokenizerFast, head_dim: int = HEAD_DIM) -> Qwen2VLConfig:
    text = dict(text_kwargs(tok, head_dim), rope_parameters=dict(ROPE, mrope_section=mrope_section(head_dim)))
    vision = dict(depth=2, embed_dim=32, hidden_size=HIDDEN, num_heads=4, mlp_ratio=2)
    return Qwen2VLConfig(text_config=text, vision_config=vision, tie_word_embeddings=True, **vision_token_ids(tok))


def qwen2_5_vl_config(tok: PreTrainedTokenizerFast, head_dim: int = HEAD_DIM) -> Qwen2_5_VLConfig:
    text = dict(text_kwargs(tok, head_dim), rope_parameters=dict(ROPE, mrope_section=mrope_section(head_dim)))
    # Window attention in layer 0, full attention in layer 1, as in the real model's mix.
    vision = dict(depth=2, hidden_size=32, intermediate_size=64, out_hidden_size=HIDDEN, num_heads=4,
                  window_size=56, fullatt_block_indexes=[1], tokens_per_second=2)
    return Qwen2_5_VLConfig(text_config=text, vision_config=vision, tie_word_embeddings=True,
                            **vision_token_ids(tok))


def qwen3_vl_parts(tok: PreTrainedTokenizerFast, head_dim: int) -> tuple[dict, dict]:
    """Text and vision settings of the tiny Qwen3-VL (dense and MoE alike)."""
    # Heads of 32 whatever is asked: no older bundled files to keep, and vLLM's CPU attention
    # runs no narrower (Qwen3's per-head q/k norms make the width explicit: head_dim).
    head_dim = max(head_dim, VLLM_HEAD_DIM)
    rope = {**ROPE, "mrope_section": mrope_section(head_dim), "mrope_interleaved": True}
    text = {**text_kwargs(tok, head_dim), "head_dim": head_dim, "rope_parameters": rope}
    # 16-pixel patches merged 2 x 2 (32 pixels per visual token), learned position embeddings
    # on an 8 x 8 grid (interpolated to each image), and one DeepStack merger: vision layer 0's
    # features are added to the language model's first layer, as the real model's three are.
    vision = {"depth": 2, "hidden_size": 32, "intermediate_size": 64, "out_hidden_size": HIDDEN, "num_heads": 4,
              "patch_size": 16, "spatial_merge_size": 2, "temporal_patch_size": 2, "num_position_embeddings": 64,
              "deepstack_visual_indexes": [0]}
    return text, vision


def qwen3_vl_config(tok: PreTrainedTokenizerFast, head_dim: int = HEAD_DIM) -> Qwen3VLConfig:
    text, vision = qwen3_vl_parts(tok, head_dim)
    return Qwen3VLConfig(text_config=text, vision_config=vision, tie_word_embeddings=True, **vision_token_ids(tok))


def qwen3_vl_moe_config(tok: PreTrainedTokenizerFast, head_dim: int = HEAD_DIM) -> Qwen3VLMoeConfig:
    text, vision = qwen3_vl_parts(tok, head_dim)
    # Every layer sparse: 4 experts, 2 routed per token (the 30B-A3B model: 128 and 8).
    text.update(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=HIDDEN // 2, decoder_sparse_step=1,
                # transformers always renormalises the routed experts' weights; vLLM does when told.
                norm_topk_prob=True)
    return Qwen3VLMoeConfig(text_config=text, vision_config=vision, tie_word_embeddings=True,
                            **vision_token_ids(tok))


def qwen2_config(tok: PreTrainedTokenizerFast, head_dim: int = HEAD_DIM) -> Qwen2Config:
    return Qwen2Config(**text_kwargs(tok, head_dim), rope_parameters=dict(ROPE), tie_word_embeddings=True)


FAMILIES = {
    "qwen2_vl": (qwen2_vl_config, Qwen2VLForConditionalGeneration),
    "qwen2_5_vl": (qwen2_5_vl_config, Qwen2_5_VLForConditionalGeneration),
    "qwen3_vl": (qwen3_vl_config, Qwen3VLForConditionalGeneration),
    "qwen3_vl_moe": (qwen3_vl_moe_config, Qwen3VLMoeForConditionalGeneration),
    "qwen2": (qwen2_config, Qwen2ForCausalLM),
}
# Image processor settings beyond the pixel limits: Qwen3-VL's patches are 16 pixels and its
# images normalised to [-1, 1], as the released checkpoints' preprocessor_config.json say.
QWEN3_VL_IMAGES = {"patch_size": 16, "image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5]}
IMAGE_PROCESSOR = {"qwen3_vl": QWEN3_VL_IMAGES, "qwen3_vl_moe": QWEN3_VL_IMAGES}


def build_tiny_models(out_dir: Path, seed: int = 0, head_dim: int = HEAD_DIM) -> dict[str, Path]:
    """Write the tiny models under `out_dir`; the same seed gives identical files.
    head_dim: width of the language model's attention heads (HIDDEN / head_dim heads); the
    bundled models have 16, rollout.engine=vllm on a CPU needs at least VLLM_HEAD_DIM."""
    if head_dim < 2 or HIDDEN % head_dim or head_dim % 2:
        raise ValueError(f"head_dim must be an even divisor of the hidden size {HIDDEN}, got {head_dim}")
    out_dir = Path(out_dir)
    tok = build_tokenizer(seed)
    eos = [tok.convert_tokens_to_ids(t) for t in ("<|im_end|>", "<|endoftext|>")]
    written = {}
    for name, (make_config, model_cls) in FAMILIES.items():
        folder = out_dir / name
        torch.manual_seed(seed)
        model = model_cls(make_config(tok, head_dim)).eval()
        model.generation_config = GenerationConfig(eos_token_id=eos, pad_token_id=tok.pad_token_id)
        model.save_pretrained(folder)
        tok.save_pretrained(folder)
        if model.config.model_type != "qwen2":
            # The image processor alone (no processor_config.json): AutoProcessor then builds
            # the family's processor from the model type, with or without torchvision.
            image_processor = Qwen2VLImageProcessorPil(min_pixels=MIN_PIXELS, max_pixels=MAX_PIXELS,
                                                       **IMAGE_PROCESSOR.get(name, {}))
            image_processor.save_pretrained(folder)
        written[name] = folder
    return written


HEAD_DIM_HELP = (f"attention head width: {HEAD_DIM} (the bundled models, default) or {VLLM_HEAD_DIM} "
                 f"(vLLM-capable: its CPU attention takes no narrower head)")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=TINY_MODELS, help="folder to write the models into")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random weights and corpus")
    parser.add_argument("--head-dim", type=int, default=HEAD_DIM, help=HEAD_DIM_HELP)
    args = parser.parse_args(argv)
    for name, folder in build_tiny_models(args.out, args.seed, args.head_dim).items():
        print(f"{name}: {folder}")


if __name__ == "__main__":
    main()
