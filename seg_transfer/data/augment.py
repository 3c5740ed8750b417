"""2D augmentation with albumentations, applied identically to a 2.5D image and its mask.

The image is rescaled to [0, 1] for augmentation and mapped back afterwards: gamma is defined only
for non-negative values, and geometric transforms then fill borders with the image's minimum
(its background) instead of an arbitrary zero.
"""
from __future__ import annotations

import albumentations as A
import cv2
import numpy as np

from seg_transfer.config import AugmentConfig


def build_augmentation(config: AugmentConfig) -> A.Compose:
    """The albumentations pipeline for training (validation uses none)."""
    steps: list[A.BasicTransform] = [
        A.Affine(
            rotate=(-config.rotate_degrees, config.rotate_degrees),
            scale=tuple(config.scale),
            translate_percent=(-config.translate_fraction, config.translate_fraction),
            interpolation=cv2.INTER_LINEAR,
            mask_interpolation=cv2.INTER_NEAREST,
            border_mode=cv2.BORDER_CONSTANT,
            fill=0,
            fill_mask=0,
            p=config.affine_probability,
        ),
        A.ElasticTransform(alpha=20, sigma=5, p=config.elastic_probability),
        A.RandomBrightnessContrast(brightness_limit=0.1, contrast_limit=0.15, p=config.intensity_probability),
        A.RandomGamma(gamma_limit=tuple(int(100 * g) for g in config.gamma_range), p=config.gamma_probability),
    ]
    if 0 in config.flip_axes:
        steps.append(A.VerticalFlip(p=0.5))
    if 1 in config.flip_axes:
        steps.append(A.HorizontalFlip(p=0.5))
    return A.Compose(steps)


class SliceAugmenter:
    """Callable ``(image CHW float32, label HW, seed) -> (image, label)`` for :class:`SliceDataset`."""

    def __init__(self, config: AugmentConfig):
        self.pipeline = build_augmentation(config)

    def __call__(self, image: np.ndarray, label: np.ndarray, seed: int) -> tuple[np.ndarray, np.ndarray]:
        low, high = float(image.min()), float(image.max())
        scale = high - low if high > low else 1.0
        unit = np.ascontiguousarray(((image - low) / scale).transpose(1, 2, 0), dtype=np.float32)
        self.pipeline.set_random_seed(seed)
        out = self.pipeline(image=unit, mask=np.ascontiguousarray(label))
        augmented = np.clip(out["image"], 0.0, 1.0).transpose(2, 0, 1) * scale + low
        return augmented.astype(np.float32), out["mask"]
