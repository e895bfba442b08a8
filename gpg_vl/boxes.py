"""Box conventions: how a model family writes boxes, and the conversion to image pixels.

A model adapter declares its convention; a task's reward converts the model's box to the
pixels of the original image before comparing it with the ground truth, and converts the
ground truth the other way when it shows a box to the model. Boxes are (x1, y1, x2, y2).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Protocol

Box = tuple[float, float, float, float]
Size = tuple[int, int]  # (width, height), as PIL reports it


class BoxConvention(Protocol):
    name: str

    def to_pixels(self, box: Box, image_size: Size) -> Box:
        """The model's box -> pixels of the original image."""

    def from_pixels(self, box: Box, image_size: Size) -> Box:
        """Pixels of the original image -> the model's box (rounded to integers)."""


@dataclass(frozen=True)
class NormalizedBoxes:
    """Qwen2-VL: integers on a 0..scale grid of the image, whatever its size."""

    scale: int = 1000
    name: str = "normalized_0_1000"

    def to_pixels(self, box: Box, image_size: Size) -> Box:
        w, h = image_size
        x1, y1, x2, y2 = box
        return (x1 * w / self.scale, y1 * h / self.scale, x2 * w / self.scale, y2 * h / self.scale)

    def from_pixels(self, box: Box, image_size: Size) -> Box:
        w, h = image_size
        x1, y1, x2, y2 = box
        s = self.scale
        return (round(x1 * s / w), round(y1 * s / h), round(x2 * s / w), round(y2 * s / h))


def smart_resize(height: int, width: int, factor: int, min_pixels: int, max_pixels: int) -> Size:
    """The size Qwen-VL image processors resize to: each side a multiple of `factor`,
    the area kept within [min_pixels, max_pixels], the aspect ratio kept. Returns (w, h).
    Mirrors transformers' Qwen2-VL `smart_resize` (which returns (h, w)); a test holds them equal."""
    h = round(height / factor) * factor
    w = round(width / factor) * factor
    if h * w > max_pixels:
        beta = math.sqrt(height * width / max_pixels)
        h = max(factor, math.floor(height / beta / factor) * factor)
        w = max(factor, math.floor(width / beta / factor) * factor)
    elif h * w < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h = math.ceil(height * beta / factor) * factor
        w = math.ceil(width * beta / factor) * factor
    return (w, h)


@dataclass(frozen=True)
class ResizedPixelBoxes:
    """Qwen2.5-VL: absolute pixels of the image as the processor resized it."""

    factor: int
    min_pixels: int
    max_pixels: int
    name: str = "resized_pixels"

    def _scale(self, image_size: Size) -> tuple[float, float]:
        w, h = image_size
        rw, rh = smart_resize(h, w, self.factor, self.min_pixels, self.max_pixels)
        return rw / w, rh / h

    def to_pixels(self, box: Box, image_size: Size) -> Box:
        sx, sy = self._scale(image_size)
        x1, y1, x2, y2 = box
        return (x1 / sx, y1 / sy, x2 / sx, y2 / sy)

    def from_pixels(self, box: Box, image_size: Size) -> Box:
        sx, sy = self._scale(image_size)
        x1, y1, x2, y2 = box
        return (round(x1 * sx), round(y1 * sy), round(x2 * sx), round(y2 * sy))


@dataclass(frozen=True)
class PixelBoxes:
    """Text models and anything that sees the original image: plain pixels."""

    name: str = "pixels"

    def to_pixels(self, box: Box, image_size: Size) -> Box:
        return tuple(float(v) for v in box)

    def from_pixels(self, box: Box, image_size: Size) -> Box:
        return tuple(round(v) for v in box)
