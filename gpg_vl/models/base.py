"""What the trainer and the rollout need from a model family, whatever the family.

An adapter owns the model, its processor and tokenizer, and knows how the family renders a
prompt, encodes it with its images, and writes boxes. It knows nothing about tasks.

A prompt is encoded once (`encode`): the tokens, the pixel values and the position ids the
model reads. Generation, the loss forward and the evaluation all use that one record.
"""

from __future__ import annotations

from typing import ClassVar, NamedTuple

import torch
from PIL import Image
from torch import Tensor
from transformers import AutoTokenizer
from transformers.models.auto.tokenization_auto import get_tokenizer_config
from transformers.tokenization_utils_tokenizers import TokenizersBackend

from gpg_vl.boxes import BoxConvention, Size
from gpg_vl.lora import LoraSettings
from gpg_vl.task import IMAGE_MARKER, Prompt

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16, "auto": "auto"}
END_TOKENS = ("<|im_end|>", "<|endoftext|>")


def image_count(prompt: Prompt) -> int:
    """The images a prompt places: IMAGE_MARKER in a raw prompt, {"type": "image"} parts in a chat."""
    if isinstance(prompt, str):
        return prompt.count(IMAGE_MARKER)
    return sum(1 for message in prompt if not isinstance(message["content"], str)
               for part in message["content"] if part.get("type") == "image")


def check_image_count(prompt: Prompt, n_images: int) -> None:
    """A prompt must place exactly the row's images (else the model's forward pass fails later,
    with a message about tokens and features)."""
    placed = image_count(prompt)
    if placed != n_images:
        raise ValueError(f"the prompt places {placed} image(s) but the row has {n_images}: a chat places one "
                         f"{{\"type\": \"image\"}} part per image, a raw prompt one IMAGE_MARKER {IMAGE_MARKER!r}")


def torch_dtype(name: str) -> torch.dtype | str:
    if name not in DTYPES:
        raise ValueError(f"dtype {name!r} is not one of {', '.join(DTYPES)}")
    return DTYPES[name]


def load_tokenizer(path: str, trust_remote_code: bool = False):
    """The tokenizer at `path`. One that declares the generic class is loaded as its
    tokenizer.json says: AutoTokenizer (transformers 5.23) would load a `qwen2` checkpoint
    with Qwen2Tokenizer whatever it declares, and that class rebuilds the pre-tokenizer with
    Qwen's digit-splitting pattern, so the tiny models' numbers would stop being one token."""
    declared = get_tokenizer_config(path).get("tokenizer_class")
    if declared in ("TokenizersBackend", "PreTrainedTokenizerFast"):
        return TokenizersBackend.from_pretrained(path)
    return AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)


class EncodedPrompt(NamedTuple):
    """One prompt exactly as the model reads it, computed once per prompt (not per sample)."""

    text: str
    """The rendered prompt (chat template applied, image placeholders not yet expanded)."""
    input_ids: Tensor
    """[P] token ids, image placeholders expanded to one token per visual token."""
    position_ids: Tensor
    """[A, P] rotary positions: A = 1 for text models, 3 (temporal, height, width) for Qwen-VL."""
    next_position: int
    """Position of the first generated token (every axis): text positions continue from it."""
    pixel_values: Tensor | None = None
    """[patches, D] the processor's pixel values of the prompt's images, one after another."""
    image_grid_thw: Tensor | None = None
    """[images, 3] patch grid (t, h, w) of each image."""
    mm_token_type_ids: Tensor | None = None
    """[P] 0 = text token, 1 = image token."""

    @property
    def num_tokens(self) -> int:
        return int(self.input_ids.shape[0])


class PromptBatch(NamedTuple):
    """Prompts left-padded into one batch, so that every prompt ends where generation starts."""

    input_ids: Tensor  # [B, P]
    attention_mask: Tensor  # [B, P] 1 = a real prompt token
    position_ids: Tensor  # [A, B, P]
    next_position: Tensor  # [B]
    pixel_values: Tensor | None  # [patches of all images, D]
    image_grid_thw: Tensor | None  # [images, 3]
    mm_token_type_ids: Tensor | None  # [B, P]

    def to(self, device) -> "PromptBatch":
        return PromptBatch(*(t.to(device) if t is not None else None for t in self))

    def model_inputs(self) -> dict[str, Tensor]:
        """Keyword arguments of the family's base-model forward for the whole prompt."""
        inputs = {"input_ids": self.input_ids, "attention_mask": self.attention_mask,
                  "position_ids": squeeze_axes(self.position_ids)}
        for key in ("pixel_values", "image_grid_thw", "mm_token_type_ids"):
            if getattr(self, key) is not None:
                inputs[key] = getattr(self, key)
        return inputs


def squeeze_axes(position_ids: Tensor) -> Tensor:
    """[A, B, L] -> what the model takes: [B, L] for text models (A = 1), else as it is."""
    return position_ids[0] if position_ids.shape[0] == 1 else position_ids


def continued_positions(next_position: Tensor, start: int, length: int, axes: int) -> Tensor:
    """[axes, N, length] positions of generated tokens start .. start+length-1: text tokens
    after the prompt advance every rotary axis together."""
    steps = torch.arange(start, start + length, device=next_position.device)  # [length]
    return (next_position.unsqueeze(1) + steps).unsqueeze(0).expand(axes, -1, -1)


def collate(prompts: list[EncodedPrompt], pad_token_id: int) -> PromptBatch:
    """Left-pad encoded prompts into one batch (pixel values and grids concatenated in order)."""
    width = max(p.num_tokens for p in prompts)

    def left(t: Tensor, value: int) -> Tensor:
        return torch.nn.functional.pad(t, (width - t.shape[-1], 0), value=value)

    ids = torch.stack([left(p.input_ids, pad_token_id) for p in prompts])  # [B, P]
    mask = torch.stack([left(torch.ones_like(p.input_ids), 0) for p in prompts])  # [B, P]
    positions = torch.stack([left(p.position_ids, 0) for p in prompts], dim=1)  # [A, B, P]
    nxt = torch.tensor([p.next_position for p in prompts])  # [B]
    with_images = [p for p in prompts if p.pixel_values is not None]
    pixels = torch.cat([p.pixel_values for p in with_images]) if with_images else None
    grids = torch.cat([p.image_grid_thw for p in with_images]) if with_images else None
    types = None
    if prompts[0].mm_token_type_ids is not None:
        types = torch.stack([left(p.mm_token_type_ids, 0) for p in prompts])  # [B, P]
    return PromptBatch(ids, mask, positions, nxt, pixels, grids, types)


class ModelAdapter:
    """Base of the model families. Subclasses set `model_type`, load themselves in `load`,
    render prompts in `render` and encode them in `encode`."""

    model_type: ClassVar[str] = ""

    def __init__(self, model, processor, tokenizer, box_convention: BoxConvention):
        self.model = model
        self.processor = processor
        self.tokenizer = tokenizer
        self.box_convention = box_convention
        self.eos_token_ids = self._eos_token_ids()
        if tokenizer.pad_token_id is None:
            tokenizer.pad_token_id = self.eos_token_ids[0]
        self.pad_token_id: int = tokenizer.pad_token_id
        self.suppressed_token_ids: list[int] = self._suppressed_token_ids()
        # The LoRA adapters injected into the model for training (gpg_vl.build.load_policy); none here.
        self.lora = LoraSettings()

    @classmethod
    def load(cls, path: str, *, dtype: str, max_pixels: int, min_pixels: int, attn_implementation: str | None,
             trust_remote_code: bool) -> "ModelAdapter":
        """Load model, processor and tokenizer (see gpg_vl.models.load_adapter); models
        without vision ignore the pixel limits."""
        raise NotImplementedError

    def _known_id(self, token: str) -> int | None:
        """The id of `token` if the vocabulary has it as a single token, else None."""
        ids = self.tokenizer.convert_tokens_to_ids([token])
        tid = ids[0] if ids else None
        return tid if tid is not None and tid != self.tokenizer.unk_token_id else None

    def _eos_token_ids(self) -> list[int]:
        found = [self._known_id(t) for t in END_TOKENS] + [self.tokenizer.eos_token_id]
        config_eos = getattr(getattr(self.model, "generation_config", None), "eos_token_id", None)
        found += config_eos if isinstance(config_eos, list) else [config_eos]
        ids = sorted({int(t) for t in found if t is not None})
        if not ids:
            raise ValueError(f"{self.model_type}: no end-of-completion token found in the tokenizer or generation config")
        return ids

    def _suppressed_token_ids(self) -> list[int]:
        return []

    def render(self, prompt: Prompt) -> str:
        """The text the model reads for `prompt`: a chat with the family's template and the
        generation prompt; a raw string as it is, each IMAGE_MARKER replaced by the family's
        image placeholder (image placeholders are not yet expanded to one token per visual token)."""
        raise NotImplementedError

    def encode(self, prompt: Prompt, images: list[Image.Image]) -> EncodedPrompt:
        """Tokens, pixel values and positions of one prompt with its images."""
        return self.encode_batch([prompt], [images])[0]

    def encode_batch(self, prompts: list[Prompt], images: list[list[Image.Image]]) -> list[EncodedPrompt]:
        """`encode` of each prompt with its images."""
        raise NotImplementedError

    def count_prompt_tokens(self, prompt: Prompt, image_sizes: list[Size]) -> int:
        """The length `encode` would give, from the images' sizes alone (nothing decoded)."""
        raise NotImplementedError

    def save_processor(self, path) -> None:
        """Tokenizer and chat template (and, for vision families, the image processor) in
        the layout released checkpoints use, so `load_adapter(path)` reads them back."""
        self.tokenizer.save_pretrained(path)

    def decode(self, completion_ids: torch.Tensor, completion_mask: torch.Tensor) -> list[str]:
        """Text of each completion, masked-out positions and special tokens left out."""
        texts = []
        for ids, mask in zip(completion_ids.tolist(), completion_mask.tolist()):
            kept = [t for t, m in zip(ids, mask) if m]
            texts.append(self.tokenizer.decode(kept, skip_special_tokens=True, clean_up_tokenization_spaces=False))
        return texts
