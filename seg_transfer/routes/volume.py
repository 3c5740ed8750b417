"""The 3D route: the 2D ImageNet encoder inflated to 3D in a 3D U-Net, patch training, sliding windows.

Inference is MONAI's ``sliding_window_inference`` with Gaussian blending of softmax probabilities
(``overlap`` 0.5, ``sigma_scale`` 0.125 by default, as nnU-Net), windows of the training patch size,
``batch_size`` windows per forward (capped at ``max_batch_pixels`` voxels), mirror TTA over the axes flipped in
training applied to each batch of windows before blending (as nnU-Net mirrors each patch: one probability
volume is stitched whatever the number of flips), and stitching on the CPU once a volume's probabilities
exceed :data:`GPU_STITCH_MAX_VOXELS` so that GPU memory does not grow with it.
"""
from __future__ import annotations

import math
import sys
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from monai.inferers import sliding_window_inference
from torch import nn

from seg_transfer.config import DataConfig, ModelConfig
from seg_transfer.data.patches import median_patch_size, patch_loader
from seg_transfer.data.restoration import RestorationPatches
from seg_transfer.routes.base import (
    InferenceOptions,
    NetworkSpec,
    Route,
    argmax_labels,
    flip_average,
    tta_flips,
)
from seg_transfer.routes.precision import autocast

DEFAULT_OVERLAP = 0.5
SIGMA_SCALE = 0.125
#: above this many output values (classes x voxels) probabilities are stitched on the CPU
GPU_STITCH_MAX_VOXELS = 2**28


@dataclass(frozen=True)
class SlidingWindowInferer3d:
    """Whole-volume inference of a 3D network by overlapping ``roi_size`` windows."""

    roi_size: tuple[int, int, int]
    options: InferenceOptions
    classes: int = 2
    flips: tuple[tuple[int, ...], ...] = ((),)  # test-time mirrorings (dims of a (B, C, X, Y, Z) batch)

    @torch.no_grad()
    def probabilities(self, model: nn.Module, image: torch.Tensor, device: torch.device) -> torch.Tensor:
        volume = torch.as_tensor(np.asarray(image) if not isinstance(image, torch.Tensor) else image)
        volume = volume.as_tensor() if hasattr(volume, "as_tensor") else volume
        batch = volume.float()[None]  # (1, 1, X, Y, Z), stays on the CPU; windows move to ``device``
        return self._stitched_probabilities(model, batch, device)[0].float().cpu()

    def _stitched_probabilities(self, model: nn.Module, batch: torch.Tensor, device: torch.device) -> torch.Tensor:
        def softmax(windows: torch.Tensor) -> torch.Tensor:
            with autocast(device, self.options.amp):
                logits = model(windows)
            return torch.softmax(logits.float(), dim=1)

        def predictor(windows: torch.Tensor) -> torch.Tensor:  # (B, 1, x, y, z) windows: flips are dims 2-4
            return flip_average(softmax, windows, self.flips)

        stitch_device = device if batch[0, 0].numel() * self.classes <= GPU_STITCH_MAX_VOXELS else torch.device("cpu")
        overlap = DEFAULT_OVERLAP if self.options.overlap is None else self.options.overlap
        return sliding_window_inference(batch, self.roi_size, self.windows_per_forward(), predictor, overlap=overlap,
                                        mode="gaussian", sigma_scale=SIGMA_SCALE, cval=float(batch.min()),
                                        sw_device=device, device=stitch_device,
                                        progress=self.options.progress and sys.stderr.isatty())

    def windows_per_forward(self) -> int:
        """``options.batch_size`` windows, capped so that windows x window voxels stays within
        ``options.max_batch_pixels`` (at least one): activation memory stays bounded for big windows."""
        cap = self.options.max_batch_pixels
        if cap is None:
            return self.options.batch_size
        return max(1, min(self.options.batch_size, cap // math.prod(self.roi_size)))

    def label_map(self, model: nn.Module, image: torch.Tensor, device: torch.device) -> torch.Tensor:
        probs = self.probabilities(model, image, device)
        return argmax_labels(probs)


def _in_channels(data: DataConfig) -> int:
    return 1


def _build(model: ModelConfig, in_channels: int, classes: int, load_pretrained: bool = True):
    from seg_transfer.models.unet3d import build_unet3d

    return build_unet3d(model, classes, load_pretrained=load_pretrained)


def _multiple(network: nn.Module) -> tuple[int, int, int]:
    return tuple(int(m) for m in network.spatial_multiple())


def _settings(data: DataConfig, volumes, network: nn.Module) -> dict[str, Any]:
    """The patch size: ``data.patch_size`` (checked against the network's multiple) or the median training shape."""
    multiple = _multiple(network)
    if data.patch_size is not None:
        bad = [f"{size} (axis {axis})" for axis, (size, step) in enumerate(zip(data.patch_size, multiple)) if size % step]
        if bad:
            from seg_transfer.config import ConfigError

            raise ConfigError(f"data.patch_size {list(data.patch_size)}: every size must be a multiple of the "
                              f"network's {list(multiple)}; not {', '.join(bad)}")
        return {"patch_size": [int(s) for s in data.patch_size]}
    shapes = [tuple(item["image"].shape[1:]) for item in volumes]
    return {"patch_size": list(median_patch_size(shapes, multiple))}


def _training_samples(volumes, data: DataConfig, batch_size: int, settings: dict, network: nn.Module, *,
                      rank: int = 0, world_size: int = 1, pin_memory: bool = False, labelled: int | None = None):
    return patch_loader(volumes, data, batch_size, settings["patch_size"], rank=rank, world_size=world_size,
                        pin_memory=pin_memory, labelled=labelled)


def _restoration_samples(volumes, data: DataConfig, settings: dict, network: nn.Module, corruption, count: int | None,
                         seed: int):
    """Patches of ``settings``' patch size (held-out patches take the pretraining scans' size too)."""
    return RestorationPatches(volumes, settings["patch_size"], corruption, count, seed)


def _inferer(spec: NetworkSpec, options: InferenceOptions, network: nn.Module) -> SlidingWindowInferer3d:
    return SlidingWindowInferer3d(tuple(spec.settings["patch_size"]), options, spec.classes, tta_flips(spec.data, options))


VOLUME_ROUTE = Route(
    name="3d",
    spatial_dims=3,
    sample_name="patches",
    in_channels=_in_channels,
    build_network=_build,
    spatial_multiple=_multiple,
    settings=_settings,
    training_samples=_training_samples,
    inferer=_inferer,
    fixed_input_shapes=True,   # patches in training, roi-sized windows in validation
    # feature variety at stride 8: tau 0.74 over the inflation modes, declared before it ran (LogME: -0.53);
    # tau 0.60 over ImageNet Lite0/1/2, the three inflations of Lite0 and scratch, declared before those ran
    # (LogME: -0.47; docs/results.md)
    ranking_scores=("variety",),
    ranking_strides=(8,),
    train_channels_last=("cpu",),  # CPU 1.15-1.23x; on an H200 channels_last_3d trained 0.94x (slower)
    # contiguous: channels last predicted only 1.03-1.06x faster on the CPU (0.05 GB more per 128x128x64 window), 0.90x on an H200
    predict_channels_last=(),
    restoration_samples=_restoration_samples,
)
