"""Model families behind one small adapter interface, chosen by the checkpoint's
`config.model_type` (never by its path)."""

from __future__ import annotations

from transformers import AutoConfig

from gpg_vl.models.base import ModelAdapter
from gpg_vl.models.qwen_vl import (
    Qwen2_5_VLAdapter,
    Qwen2VLAdapter,
    Qwen3VLAdapter,
    Qwen3VLMoeAdapter,
)
from gpg_vl.models.text import LlamaAdapter, Qwen2Adapter, Qwen3Adapter
from gpg_vl.resources import model_location

ADAPTERS: dict[str, type[ModelAdapter]] = {
    cls.model_type: cls for cls in (Qwen2VLAdapter, Qwen2_5_VLAdapter, Qwen3VLAdapter, Qwen3VLMoeAdapter,
                                    Qwen2Adapter, Qwen3Adapter, LlamaAdapter)
}
SUPPORTED_MODEL_TYPES = tuple(ADAPTERS)


class UnsupportedModelError(ValueError):
    """A checkpoint whose model_type has no adapter."""


def adapter_class(model_type: str) -> type[ModelAdapter]:
    if model_type not in ADAPTERS:
        raise UnsupportedModelError(f"model_type {model_type!r} has no adapter; supported model types: "
                                    f"{', '.join(SUPPORTED_MODEL_TYPES)}")
    return ADAPTERS[model_type]


def load_adapter(path: str, *, dtype: str = "float32", max_pixels: int = 401408, min_pixels: int = 3136,
                 attn_implementation: str | None = None, trust_remote_code: bool = False,
                 gradient_checkpointing: bool = False) -> ModelAdapter:
    """Load the model and processor at `path` (a local folder, a hub name or tiny:<family>) into the
    adapter of its family. max_pixels / min_pixels bound the area of each image after
    resizing (vision models only)."""
    path = model_location(path)
    config = AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
    cls = adapter_class(config.model_type)
    adapter = cls.load(path, dtype=dtype, max_pixels=max_pixels, min_pixels=min_pixels,
                       attn_implementation=attn_implementation, trust_remote_code=trust_remote_code)
    if gradient_checkpointing:
        # Non-reentrant: works when some inputs (pixel values, frozen parts) need no grad.
        adapter.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return adapter


__all__ = ["ModelAdapter", "SUPPORTED_MODEL_TYPES", "UnsupportedModelError", "adapter_class", "load_adapter"]
