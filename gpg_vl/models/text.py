"""Text-only causal language models (Qwen2, Qwen3, Llama-style): the math path is a task
without images, served by this adapter."""

from __future__ import annotations

from typing import ClassVar

import torch
from PIL import Image
from transformers import AutoModelForCausalLM

from gpg_vl.boxes import PixelBoxes, Size
from gpg_vl.models.base import EncodedPrompt, ModelAdapter, load_tokenizer, torch_dtype
from gpg_vl.task import IMAGE_MARKER, Prompt


def _text_only(prompt: list[dict]) -> list[dict]:
    """Chat messages with list contents flattened to strings, as text chat templates expect."""
    messages = []
    for message in prompt:
        content = message["content"]
        if not isinstance(content, str):
            if any(part.get("type") != "text" for part in content):
                raise ValueError(f"a text-only model cannot take this message content: {content!r}")
            content = "".join(part["text"] for part in content)
        messages.append({**message, "content": content})
    return messages


class TextAdapter(ModelAdapter):
    @classmethod
    def load(cls, path: str, *, dtype: str, max_pixels: int, min_pixels: int, attn_implementation: str | None,
             trust_remote_code: bool) -> "TextAdapter":
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch_dtype(dtype), trust_remote_code=trust_remote_code,
                                                     attn_implementation=attn_implementation)
        tokenizer = load_tokenizer(path, trust_remote_code)
        return cls(model, tokenizer, tokenizer, PixelBoxes())

    def render(self, prompt: Prompt) -> str:
        if isinstance(prompt, str):
            if IMAGE_MARKER in prompt:
                raise ValueError(f"{self.model_type} is a text-only model but the prompt has images")
            return prompt
        return self.tokenizer.apply_chat_template(_text_only(prompt), tokenize=False, add_generation_prompt=True)

    def _token_ids(self, prompt: Prompt) -> list[int]:
        if isinstance(prompt, str):
            # A raw prompt gets the tokenizer's own prefix (a BOS token for Llama, none for Qwen).
            return self.tokenizer(prompt)["input_ids"]
        # The chat template writes any BOS token itself.
        return self.tokenizer(self.render(prompt), add_special_tokens=False)["input_ids"]

    def encode_batch(self, prompts: list[Prompt], images: list[list[Image.Image]]) -> list[EncodedPrompt]:
        if any(images):
            raise ValueError(f"{self.model_type} is a text-only model but the prompt has images")
        encoded = []
        for prompt in prompts:
            ids = torch.tensor(self._token_ids(prompt), dtype=torch.long)  # [P]
            encoded.append(EncodedPrompt(self.render(prompt), ids, torch.arange(len(ids)).unsqueeze(0), len(ids)))
        return encoded

    def count_prompt_tokens(self, prompt: Prompt, image_sizes: list[Size]) -> int:
        if image_sizes:
            raise ValueError(f"{self.model_type} is a text-only model but the prompt has images")
        return len(self._token_ids(prompt))


class Qwen2Adapter(TextAdapter):
    model_type: ClassVar[str] = "qwen2"


class Qwen3Adapter(TextAdapter):
    model_type: ClassVar[str] = "qwen3"


class LlamaAdapter(TextAdapter):
    model_type: ClassVar[str] = "llama"
