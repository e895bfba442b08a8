"""Qwen2-VL, Qwen2.5-VL and Qwen3-VL: one adapter, three families that differ in the model
class, in how they write boxes (Qwen2-VL and Qwen3-VL: a 0..1000 grid; Qwen2.5-VL: pixels of
the resized image) and in what the vision tower hands the language model (Qwen3-VL: DeepStack
features for its first layers too). Patch sizes (14 px, Qwen3-VL 16 px) and merging come from
each checkpoint's image processor."""

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
    Qwen3VLForConditionalGeneration,
    Qwen3VLMoeForConditionalGeneration,
    Qwen3VLProcessor,
)
from transformers.image_utils import SizeDict

from gpg_vl.boxes import BoxConvention, NormalizedBoxes, ResizedPixelBoxes, Size, smart_resize
from gpg_vl.models.base import EncodedPrompt, ModelAdapter, check_image_count, load_tokenizer, torch_dtype
from gpg_vl.task import IMAGE_MARKER, Prompt

# Tokens that only the processor may place: a sampled image pad makes the next forward
# fail ("Image features and image tokens do not match").
VISION_TOKENS = ("<|vision_start|>", "<|vision_end|>", "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>")
VISION_ID_FIELDS = ("image_token_id", "video_token_id", "vision_start_token_id", "vision_end_token_id")
# What the Qwen-VL chat templates write for an image; the processor expands the pad to one
# token per visual token. A raw prompt's IMAGE_MARKER becomes this.
IMAGE_PLACEHOLDER = "<|vision_start|><|image_pad|><|vision_end|>"


def image_only(processor_cls: type) -> type:
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
    return image_only(processor_cls)(image_processor, tokenizer, chat_template=tokenizer.chat_template)


def set_pixel_limits(image_processor, min_pixels: int, max_pixels: int) -> None:
    """Resize every image so its area lies in [min_pixels, max_pixels] (then sides are
    rounded to multiples of patch * merge, see gpg_vl.boxes.smart_resize)."""
    if not 0 < min_pixels <= max_pixels:
        raise ValueError(f"need 0 < min_pixels <= max_pixels, got {min_pixels} and {max_pixels}")
    image_processor.size = SizeDict(shortest_edge=min_pixels, longest_edge=max_pixels)


class QwenVLAdapter(ModelAdapter):
    """Shared code of the Qwen vision-language families."""

    model_cls: ClassVar[type]
    processor_cls: ClassVar[type]

    @classmethod
    def box_convention_for(cls, image_processor) -> BoxConvention:
        """Qwen2-VL and Qwen3-VL write boxes as integers on a 0..1000 grid of the image."""
        return NormalizedBoxes(1000)

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

    @property
    def image_token_id(self) -> int:
        """The placeholder token the processor expands to one token per visual token."""
        return int(self.model.config.image_token_id)

    def image_embeddings(self, pixel_values: torch.Tensor, image_grid_thw: torch.Tensor) -> list[torch.Tensor]:
        """What the language model reads in place of each image's placeholder tokens:
        [visual tokens of the image, hidden] per image, from the vision tower and merger."""
        out = self.model.model.get_image_features(pixel_values=pixel_values, image_grid_thw=image_grid_thw)
        return list(out.pooler_output)

    def _suppressed_token_ids(self) -> list[int]:
        ids = {self._known_id(t) for t in VISION_TOKENS}
        ids |= {getattr(self.model.config, field, None) for field in VISION_ID_FIELDS}
        return sorted(int(i) for i in ids if i is not None)

    def render(self, prompt: Prompt) -> str:
        if isinstance(prompt, str):
            return prompt.replace(IMAGE_MARKER, IMAGE_PLACEHOLDER)
        return self.processor.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)

    def encode_batch(self, prompts: list[Prompt], images: list[list[Image.Image]]) -> list[EncodedPrompt]:
        for prompt, row_images in zip(prompts, images):
            check_image_count(prompt, len(row_images))
        # One processor call for the batch (much cheaper than one per prompt), split back into prompts.
        texts = [self.render(p) for p in prompts]
        flat = [image for row in images for image in row]
        out = self.processor(text=texts, images=flat or None, padding=True, return_tensors="pt")
        grids = out.get("image_grid_thw")  # [images, 3]
        pixels = out["pixel_values"].split(grids.prod(-1).tolist()) if grids is not None else []
        encoded, first = [], 0
        for n, (text, row_images) in enumerate(zip(texts, images)):
            real = out["attention_mask"][n].bool()
            ids, types = out["input_ids"][n][real], out["mm_token_type_ids"][n][real]  # [P]
            grid = grids[first:first + len(row_images)] if row_images else None
            # The multimodal rotary positions, computed here once: later forwards are given them.
            positions, delta = self.model.model.get_rope_index(ids[None], types[None], image_grid_thw=grid)
            pixel_values = torch.cat(pixels[first:first + len(row_images)]) if row_images else None
            encoded.append(EncodedPrompt(text, ids, positions[:, 0], int(delta) + len(ids), pixel_values, grid, types))
            first += len(row_images)
        return encoded

    def count_prompt_tokens(self, prompt: Prompt, image_sizes: list[Size]) -> int:
        ip = self.processor.image_processor
        factor = ip.patch_size * ip.merge_size
        visual = 0
        for width, height in image_sizes:
            w, h = smart_resize(height, width, factor, ip.size.shortest_edge, ip.size.longest_edge)
            visual += (w // factor) * (h // factor)
        # Each image is one placeholder token in the rendered text, expanded to its visual tokens.
        return len(self.tokenizer(self.render(prompt))["input_ids"]) + visual - len(image_sizes)


class Qwen2VLAdapter(QwenVLAdapter):
    model_type: ClassVar[str] = "qwen2_vl"
    model_cls = Qwen2VLForConditionalGeneration
    processor_cls = Qwen2VLProcessor


class Qwen2_5_VLAdapter(QwenVLAdapter):
    model_type: ClassVar[str] = "qwen2_5_vl"
    model_cls = Qwen2_5_VLForConditionalGeneration
    processor_cls = Qwen2_5_VLProcessor

    @classmethod
    def box_convention_for(cls, image_processor) -> BoxConvention:
        # Absolute pixels: boxes refer to the image as resized by these very settings.
        return ResizedPixelBoxes(factor=image_processor.patch_size * image_processor.merge_size,
                                 min_pixels=image_processor.size.shortest_edge,
                                 max_pixels=image_processor.size.longest_edge)


class Qwen3VLAdapter(QwenVLAdapter):
    model_type: ClassVar[str] = "qwen3_vl"
    model_cls = Qwen3VLForConditionalGeneration
    processor_cls = Qwen3VLProcessor  # boxes: back to Qwen2-VL's relative 0..1000 grid

    def image_embeddings(self, pixel_values: torch.Tensor, image_grid_thw: torch.Tensor) -> list[torch.Tensor]:
        """[visual tokens, hidden * (1 + DeepStack layers)] per image: the merger's output, then
        each DeepStack merger's, side by side (the layout vLLM takes as image embeddings)."""
        out = self.model.model.get_image_features(pixel_values=pixel_values, image_grid_thw=image_grid_thw)
        per_layer = list(zip(*out.deepstack_features)) if out.deepstack_features else [()] * len(out.pooler_output)
        return [torch.cat([main, *deep], dim=-1) for main, deep in zip(out.pooler_output, per_layer)]


class Qwen3VLMoeAdapter(Qwen3VLAdapter):
    """Qwen3-VL with mixture-of-experts language layers (Qwen3-VL-30B-A3B): the same inputs."""

    model_type: ClassVar[str] = "qwen3_vl_moe"
    model_cls = Qwen3VLMoeForConditionalGeneration
