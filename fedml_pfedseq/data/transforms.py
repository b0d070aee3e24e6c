"""Image transforms applied lazily (``with_transform``): grey -> RGB, resize and normalise by the backbone's
processor."""
from __future__ import annotations

from typing import Callable

import torch


def image_classification_transform(processor, image_column: str, label_column: str) -> Callable[[dict], dict]:
    """A batch transform turning {image, label} rows into {pixel_values [b,3,H,W], labels [b]}."""

    def apply(batch: dict) -> dict:
        images = [image.convert("RGB") for image in batch[image_column]]
        pixel_values = processor(images=images, return_tensors="pt")["pixel_values"]
        return {"pixel_values": pixel_values, "labels": torch.as_tensor(batch[label_column], dtype=torch.long)}

    return apply
