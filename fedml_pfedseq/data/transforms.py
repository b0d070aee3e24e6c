"""Image transforms, applied once per client (``data_args.preprocess``) or on every access: grey -> RGB, a client's
covariate shift, then resize and normalise by the backbone's processor."""
from __future__ import annotations

from collections.abc import Callable

from PIL import Image, ImageOps

# What ``data_args.cluster_transforms`` may name: shifts a frozen backbone does not undo, applied to every image of
# a client (all three splits), so clients of different clusters see the same labels through different inputs.
CLUSTER_TRANSFORMS: dict[str, Callable[[Image.Image], Image.Image]] = {
    "identity": lambda image: image,
    "rot90": lambda image: image.transpose(Image.Transpose.ROTATE_90),
    "rot180": lambda image: image.transpose(Image.Transpose.ROTATE_180),
    "rot270": lambda image: image.transpose(Image.Transpose.ROTATE_270),
    "hflip": lambda image: image.transpose(Image.Transpose.FLIP_LEFT_RIGHT),
    "vflip": lambda image: image.transpose(Image.Transpose.FLIP_TOP_BOTTOM),
    "invert": ImageOps.invert,
}


def cluster_of(cluster_transforms: list[str] | None, client: int) -> int:
    """Client ``client``'s cluster: clients 0, K, 2K, ... are cluster 0, 1, K+1, ... cluster 1 (one cluster when
    there are no cluster transforms)."""
    return client % len(cluster_transforms) if cluster_transforms else 0


def cluster_transform(cluster_transforms: list[str] | None, client: int) -> str:
    """Client ``client``'s transform: its cluster's name in ``cluster_transforms``."""
    return cluster_transforms[cluster_of(cluster_transforms, client)] if cluster_transforms else "identity"


def image_classification_transform(processor, image_column: str, label_column: str,
                                   shift: str = "identity") -> Callable[[dict], dict]:
    """A batch transform turning {image, label} rows into {pixel_values [b,3,H,W], labels [b]}, each image passed
    through ``CLUSTER_TRANSFORMS[shift]`` before the processor."""
    import torch  # here, not at the top: the recipe check reads CLUSTER_TRANSFORMS without importing torch

    shifted = CLUSTER_TRANSFORMS[shift]

    def apply(batch: dict) -> dict:
        images = [shifted(image.convert("RGB")) for image in batch[image_column]]
        pixel_values = processor(images=images, return_tensors="pt")["pixel_values"]
        return {"pixel_values": pixel_values, "labels": torch.as_tensor(batch[label_column], dtype=torch.long)}

    return apply
