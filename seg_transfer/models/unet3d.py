"""The 3D network of the 3D route: an ImageNet 2D encoder inflated to 3D inside a 3D U-Net.

Tensors are ``(B, C, X, Y, Z)``; Z is the inflated depth axis (see :mod:`seg_transfer.models.inflate`).
"""
from __future__ import annotations

import torch
from monai.networks.nets.flexible_unet import UNetDecoder
from torch import nn

from seg_transfer.config import NAMED_WEIGHTS, ModelConfig
from seg_transfer.models.factory import ModelConfigError, build_model, drop_unread_encoder_layers
from seg_transfer.models.inflate import inflate_encoder
from seg_transfer.models.weights import (
    WeightsProvenance,
    encoder_part,
    is_volumetric,
    load_decoder_file,
    load_head_file,
    load_exact,
    read_state_dict,
    sha256_file,
    weights_file,
)

DEFAULT_DECODER_CHANNELS = (256, 128, 64, 32, 16)
#: decoder normalisation. Instance norm, as nnU-Net: 3D patches come in batches of 1-4, where batch
#: statistics are noisy, and instance norm behaves the same in training and inference. The encoder keeps
#: its BatchNorm: its ImageNet affine parameters and running statistics are part of what is transferred.
DECODER_NORM = ("instance", {"affine": True})
DECODER_ACT = ("relu", {"inplace": True})


class Unet3d(nn.Module):
    """U-Net on ``(B, C, X, Y, Z)``: ``encoder`` (inflated smp encoder with ``feature_strides``), MONAI's
    ``UNetDecoder`` in 3D (nearest upsampling by each level's per-axis stride ratio, so Z may be downsampled
    less than X and Y), ``segmentation_head`` (3x3x3 Conv3d to ``classes`` logits). With ``deep_supervision``,
    ``aux_heads`` (1x1x1 Conv3d) read the coarser decoder levels, and in training mode the network returns a list
    of logits, full resolution first; in eval mode it always returns the full-resolution logits alone.

    Input sizes must be multiples of :meth:`spatial_multiple` (per axis); the output has the input's size.
    """

    def __init__(self, encoder: nn.Module, classes: int, decoder_channels: tuple[int, ...] | None = None,
                 deep_supervision: bool = False) -> None:
        super().__init__()
        strides: tuple[tuple[int, int, int], ...] = tuple(encoder.feature_strides)
        depth = len(strides) - 1
        channels = tuple(decoder_channels or DEFAULT_DECODER_CHANNELS[:depth])
        if len(channels) != depth:
            raise ValueError(f"{len(channels)} decoder channels for an encoder with {depth} levels")
        self.encoder = encoder
        self.decoder = UNetDecoder(
            spatial_dims=3,
            encoder_channels=tuple(encoder.out_channels),
            decoder_channels=channels,
            act=DECODER_ACT,
            norm=DECODER_NORM,
            dropout=0.0,
            bias=False,
            upsample="nontrainable",
            pre_conv="default",
            interp_mode="nearest",
            align_corners=None,
            is_pad=False,
        )
        _set_upsample_factors(self.decoder, strides)
        self.segmentation_head = nn.Conv3d(channels[-1], classes, kernel_size=3, padding=1)
        # finest first: block depth-2's output (one level above full resolution), then coarser
        self.aux_heads = nn.ModuleList(nn.Conv3d(c, classes, kernel_size=1) for c in channels[-2::-1]) \
            if deep_supervision else None
        self.classes = classes

    @property
    def output_stride(self) -> int:
        """Stride of the deepest features along X and Y."""
        return int(self.encoder.feature_strides[-1][0])

    def spatial_multiple(self) -> tuple[int, int, int]:
        """``(X, Y, Z)`` multiples the input sizes must be (Z smaller with ``depth_stride_one_stages``)."""
        return tuple(int(s) for s in self.encoder.feature_strides[-1])  # type: ignore[return-value]

    def forward(self, x: torch.Tensor) -> torch.Tensor | list[torch.Tensor]:
        """``(B, C, X, Y, Z)`` -> logits ``(B, classes, X, Y, Z)`` (a list, finest first, when deeply
        supervised and training)."""
        multiple = self.spatial_multiple()
        if x.ndim != 5 or any(size % m for size, m in zip(x.shape[2:], multiple)):
            raise ValueError(f"Unet3d needs (B, C, X, Y, Z) with sizes multiples of {multiple}, got {tuple(x.shape)}")
        return self.decode(self.encoder(x)[1:])  # smp encoders return the input first

    def decode(self, features: list[torch.Tensor]) -> torch.Tensor | list[torch.Tensor]:
        """Logits from encoder levels 1.. (the input level is not read): the feature cache's entry point.
        The loop is MONAI ``UNetDecoder.forward``'s, keeping each block's output for the auxiliary heads."""
        skips = features[:-1][::-1]
        x, levels = features[-1], []
        for i, block in enumerate(self.decoder.blocks):
            x = block(x, skips[i] if i < len(skips) else None)
            levels.append(x)
        logits = self.segmentation_head(x)
        if self.aux_heads is None or not self.training:
            return logits
        return [logits, *(head(level) for head, level in zip(self.aux_heads, levels[-2::-1]))]


def _set_upsample_factors(decoder: UNetDecoder, strides: tuple[tuple[int, int, int], ...]) -> None:
    """Decoder block ``i`` goes from encoder level ``depth - i`` to ``depth - i - 1``: upsample by their ratio."""
    depth = len(strides) - 1
    for i, block in enumerate(decoder.blocks):
        upsamplers = [m for m in block.upsample.modules() if isinstance(m, nn.Upsample)]
        if len(upsamplers) != 1:
            raise TypeError(f"decoder block {i}: expected one nn.Upsample, found {len(upsamplers)}")
        coarse, fine = strides[depth - i], strides[depth - i - 1]
        upsamplers[0].scale_factor = tuple(float(c // f) for c, f in zip(coarse, fine))


def decoder_channels(config: ModelConfig) -> tuple[int, ...]:
    """``config.decoder_channels`` (or the smp default) truncated to ``encoder_depth`` entries."""
    channels = tuple(config.decoder_channels or DEFAULT_DECODER_CHANNELS)
    if len(channels) < config.encoder_depth:
        raise ModelConfigError(
            f"model.decoder_channels has {len(channels)} entries; encoder_depth {config.encoder_depth} needs "
            f"{config.encoder_depth}"
        )
    return channels[: config.encoder_depth]


def build_unet3d(config: ModelConfig, classes: int, *, load_pretrained: bool = True) -> tuple[Unet3d, WeightsProvenance]:
    """The 3D U-Net of ``config``: the 2D smp encoder (weights as ``config.encoder_weights`` says, through
    :func:`~seg_transfer.models.factory.build_model`) inflated by ``config.inflation`` with
    ``config.depth_stride_one_stages``, one input channel; encoder layers the decoder does not read are dropped
    after inflation (which draws random numbers per layer, so the decoder's initialisation does not depend
    on them being dropped). A weights file holding a 3D encoder (``seg-transfer pretrain`` on this route)
    is loaded as it is into the inflated encoder, exactly; ``config.decoder_from_weights`` loads the decoder
    from the same file, ``config.head_from_weights`` the segmentation head(s). Raises ``ModelConfigError`` for an arch other than
    ``Unet``, ``WeightsError`` / ``InflationError`` with one-line messages.
    """
    if config.arch.lower() != "unet":
        raise ModelConfigError(f"model.arch '{config.arch}' has no 3D version; the 3D route (dims: 3d) builds a Unet")
    channels = decoder_channels(config)
    path, whole = _weights_file_state(config) if load_pretrained else (None, None)
    volumetric = whole is not None and is_volumetric(encoder_part(whole))
    # the 2D decoder is discarded; giving it the 3D decoder's channels keeps smp's depth check satisfied
    config_2d = config.model_copy(update={"decoder_channels": list(channels), "decoder_from_weights": False,
                                          "head_from_weights": False,
                                          **({"encoder_weights": "none"} if volumetric else {})})
    model_2d, provenance = build_model(config_2d, 1, classes, load_pretrained=load_pretrained, drop_unread=False)
    encoder = inflate_encoder(model_2d.encoder, config.inflation, config.depth_stride_one_stages)
    drop_unread_encoder_layers(encoder, 1, config, spatial_dims=3, announce=load_pretrained)
    if volumetric:
        load_exact(encoder, encoder_part(whole), str(path), "3D encoder")
        provenance = WeightsProvenance("file", str(path), sha256_file(path))
    network = Unet3d(encoder, classes, channels, config.deep_supervision)
    if load_pretrained and config.decoder_from_weights:
        load_decoder_file(network.decoder, path, whole)
    if load_pretrained and config.head_from_weights:
        load_head_file(network, path, whole)
    return network, provenance


def _weights_file_state(config: ModelConfig):
    """(file, its state dict) when ``config.encoder_weights`` names a file (read once here: it may hold a 3D
    encoder and a decoder), else (None, None)."""
    if config.encoder_weights in NAMED_WEIGHTS:
        return None, None
    path = weights_file(config.encoder_weights)
    return path, read_state_dict(path)
