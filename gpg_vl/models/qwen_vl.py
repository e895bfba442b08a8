"""Qwen2-VL and Qwen2.5-VL: one adapter, two families that differ in the model class and in
how they write boxes (Qwen2-VL: 0..1000 grid; Qwen2.5-VL: pixels of the resized image)."""

from __future__ import annotations

from typing import ClassVar

import torch
from PIL import Image
from transformers import (
    AutoImageProcessor,
    AutoProcessor,
    Qwen2_5_VLForConditionalGeneration,
    Qwen2_5_VLProcessor,
    Qwen2VLForConditionalGeneration,
    Qwen2VLProcessor,
)
from transformers.image_utils import SizeDict

from gpg_vl.boxes import BoxConvention, NormalizedBoxes, ResizedPixelBoxes
from gpg_vl.models.base import ModelAdapter, load_tokenizer, torch_dtype
from gpg_vl.task import Prompt

# Tokens that only the processor may place: a sampled image pad makes the next forward
# fail ("Image features and image tokens do not match").
VISION_TOKENS = ("<|vision_start|>", "<|vision_end|>", "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>")
IMAGE_KEYS = ("pixel_values", "image_grid_thw")  # one entry per image (per patch), not per sample
VISION_ID_FIELDS = ("image_token_id", "video_token_id", "vision_start_token_id", "vision_end_token_id")


def _image_only(processor_cls: type) -> type:
    """`processor_cls` without its video processor. The processor's sub-processors are the
    parameters of its __init__, so dropping the parameter drops the video processor."""

    class ImageOnlyProcessor(processor_cls):
        def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kwargs):
            super().__init__(image_processor, tokenizer, chat_template=chat_template, **kwargs)

    ImageOnlyProcessor.__name__ = f"ImageOnly{processor_cls.__name__}"
    return ImageOnlyProcessor


def load_processor(path: str, processor_cls: type, trust_remote_code: bool):
    """The family's processor; image-only where torchvision is missing, because the video
    processor requires torchvision and images do not."""
    try:
        return AutoProcessor.from_pretrained(path, trust_remote_code=trust_remote_code)
    except ImportError as err:
        if "torchvision" not in str(err).lower():
            raise
    tokenizer = load_tokenizer(path, trust_remote_code)
    image_processor = AutoImageProcessor.from_pretrained(path, trust_remote_code=trust_remote_code)
    return _image_only(processor_cls)(image_processor, tokenizer, chat_template=tokenizer.chat_template)


def set_pixel_limits(image_processor, min_pixels: int, max_pixels: int) -> None:
    """Resize every image so its area lies in [min_pixels, max_pixels] (then sides are
    rounded to multiples of patch * merge, see gpg_vl.boxes.smart_resize)."""
    if not 0 < min_pixels <= max_pixels:
        raise ValueError(f"need 0 < min_pixels <= max_pixels, got {min_pixels} and {max_pixels}")
    image_processor.size = SizeDict(shortest_edge=min_pixels, longest_edge=max_pixels)


class QwenVLAdapter(ModelAdapter):
    """Shared code of the Qwen vision-language families."""

    has_vision: ClassVar[bool] = True
    model_cls: ClassVar[type]
    processor_cls: ClassVar[type]

    @classmethod
    def box_convention_for(cls, image_processor) -> BoxConvention:
        raise NotImplementedError

    @classmethod
    def load(cls, path: str, *, dtype: str, max_pixels: int, min_pixels: int, attn_implementation: str | None,
             trust_remote_code: bool) -> "QwenVLAdapter":
        model = cls.model_cls.from_pretrained(path, dtype=torch_dtype(dtype), attn_implementation=attn_implementation)
        processor = load_processor(path, cls.processor_cls, trust_remote_code)
        set_pixel_limits(processor.image_processor, min_pixels, max_pixels)
        return cls(model, processor, processor.tokenizer, cls.box_convention_for(processor.image_processor))

    def save_processor(self, path) -> None:
        # One file per sub-processor (preprocessor_config.json, ...), as released Qwen-VL
        # checkpoints ship them: a nested processor_config.json names a video processor
        # that a machine without torchvision cannot load.
        super().save_processor(path)
        self.processor.image_processor.save_pretrained(path)
        video = getattr(self.processor, "video_processor", None)
        if video is not None:
            video.save_pretrained(path)

    def _suppressed_token_ids(self) -> list[int]:
        ids = {self._known_id(t) for t in VISION_TOKENS}
        ids |= {getattr(self.model.config, field, None) for field in VISION_ID_FIELDS}
        return sorted(int(i) for i in ids if i is not None)

    def render(self, prompt: Prompt) -> str:
        if isinstance(prompt, str):
            return prompt
        return self.processor.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)

    def build_inputs(self, prompts: list[Prompt], images: list[list[Image.Image]]) -> dict[str, torch.Tensor]:
        if len(prompts) != len(images):
            raise ValueError(f"{len(prompts)} prompts but {len(images)} image lists")
        texts = [self.render(p) for p in prompts]
        flat = [img for row in images for img in row]
        batch = self.processor(text=texts, images=flat or None, padding=True, return_tensors="pt")
        return dict(batch)

    def repeat_samples(self, batch: dict[str, torch.Tensor], images_per_sample: list[int],
                       repeats: int) -> dict[str, torch.Tensor]:
        # pixel_values holds each image's patches one after another (t*h*w rows per image).
        per_image = {k: batch[k] for k in IMAGE_KEYS if k in batch}
        per_sample = {k: v for k, v in batch.items() if k not in IMAGE_KEYS}
        out = super().repeat_samples(per_sample, images_per_sample, repeats)
        if per_image:
            grids = per_image["image_grid_thw"]  # [n_images, 3]
            patches = per_image["pixel_values"].split(grids.prod(-1).tolist())
            starts = [sum(images_per_sample[:i]) for i in range(len(images_per_sample))]
            order = [start + j for start, n in zip(starts, images_per_sample) for _ in range(repeats) for j in range(n)]
            out["image_grid_thw"] = grids[order]
            out["pixel_values"] = torch.cat([patches[i] for i in order])
        return out


class Qwen2VLAdapter(QwenVLAdapter):
    model_type: ClassVar[str] = "qwen2_vl"
    model_cls = Qwen2VLForConditionalGeneration
    processor_cls = Qwen2VLProcessor

    @classmethod
    def box_convention_for(cls, image_processor) -> BoxConvention:
        return NormalizedBoxes(1000)


class Qwen2_5_VLAdapter(QwenVLAdapter):
    model_type: ClassVar[str] = "qwen2_5_vl"
    model_cls = Qwen2_5_VLForConditionalGeneration
    processor_cls = Qwen2_5_VLProcessor

    @classmethod
    def box_convention_for(cls, image_processor) -> BoxConvention:
        # Boxes refer to the image as resized by these very settings.
        return ResizedPixelBoxes(factor=image_processor.patch_size * image_processor.merge_size,
                                 min_pixels=image_processor.size.shortest_edge,
                                 max_pixels=image_processor.size.longest_edge)
