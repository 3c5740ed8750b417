"""Build any segmentation-models-pytorch architecture with any smp or timm (``tu-``) encoder from config."""
from __future__ import annotations

import difflib
import logging
from collections import OrderedDict

import segmentation_models_pytorch as smp
import timm
from torch import nn

from seg_transfer.config import ModelConfig
from seg_transfer.errors import UserError
from seg_transfer.models.freezing import drop_unread_layers
from seg_transfer.models.weights import (
    WeightsError,
    WeightsProvenance,
    encoder_part,
    imagenet_weight_source,
    load_decoder_file,
    load_head_file,
    map_state_dict,
    no_weights_message,
    read_state_dict,
    sha256_file,
    timm_name,
    weights_file,
)

log = logging.getLogger(__name__)

CLASSIFIER_PREFIXES = ("fc.", "classifier.", "last_linear.", "head.", "_fc.")
#: smp's default U-Net decoder channels (one per encoder stage), cut to ``model.encoder_depth``
SMP_DECODER_CHANNELS = (256, 128, 64, 32, 16)


class ModelConfigError(UserError, ValueError):
    """Unknown architecture or encoder name (message lists the valid ones)."""


def architecture_names() -> list[str]:
    return sorted(smp.MODEL_ARCHITECTURES_MAPPING)


def validate_names(config: ModelConfig) -> None:
    """Raise :class:`ModelConfigError` for an unknown arch or encoder, listing the valid ones."""
    if config.arch.lower() not in smp.MODEL_ARCHITECTURES_MAPPING:
        raise ModelConfigError(f"unknown model.arch '{config.arch}'; valid: {', '.join(architecture_names())}")
    encoder = config.encoder
    if encoder.startswith("tu-"):
        if not timm.is_model(timm_name(encoder)):
            close = difflib.get_close_matches(timm_name(encoder), timm.list_models(), n=5)
            raise ModelConfigError(
                f"unknown timm encoder '{encoder}'; closest: {', '.join('tu-' + c for c in close) or 'none'} "
                f"({len(timm.list_models())} timm models, see timm.list_models())"
            )
    elif encoder not in smp.encoders.get_encoder_names():
        raise ModelConfigError(
            f"unknown model.encoder '{encoder}'; valid smp encoders: {', '.join(smp.encoders.get_encoder_names())}, "
            "or any timm model as tu-<name>"
        )


def build_model(
    config: ModelConfig, in_channels: int, classes: int, *, load_pretrained: bool = True, drop_unread: bool = True
) -> tuple[nn.Module, WeightsProvenance]:
    """Create the network and load its encoder weights as ``config.encoder_weights`` says (and its decoder's
    and heads' from the same file with ``config.decoder_from_weights`` / ``config.head_from_weights``).

    ``load_pretrained=False`` builds the bare network (e.g. before loading a checkpoint). Encoder layers the
    decoder does not read are then dropped (:func:`drop_unread_encoder_layers`) unless ``drop_unread=False``.
    Raises :class:`ModelConfigError` or :class:`WeightsError` with one-line messages.
    """
    validate_names(config)
    model = _create(config, in_channels, classes, encoder_weights=None)
    provenance = _load_encoder_weights(model, config, in_channels, classes) if load_pretrained else WeightsProvenance("none")
    if load_pretrained and config.decoder_from_weights:
        load_decoder_file(model.decoder, weights_file(config.encoder_weights))
    if load_pretrained and config.head_from_weights:
        load_head_file(model, weights_file(config.encoder_weights))
    if drop_unread:
        drop_unread_encoder_layers(model.encoder, in_channels, config, announce=load_pretrained)
    return model, provenance


def drop_unread_encoder_layers(encoder: nn.Module, in_channels: int, config: ModelConfig, *, spatial_dims: int = 2,
                               announce: bool = True) -> None:
    """:func:`~seg_transfer.models.freezing.drop_unread_layers`, logged (``announce``) when it drops anything."""
    dropped = drop_unread_layers(encoder, in_channels, spatial_dims)
    if dropped and announce:
        log.info("encoder_depth %d: dropped %.2f M parameters of encoder layers the decoder does not read (%s)",
                 config.encoder_depth, sum(dropped.values()) / 1e6, ", ".join(dropped))


def _load_encoder_weights(model: nn.Module, config: ModelConfig, in_channels: int, classes: int) -> WeightsProvenance:
    """Load ``config.encoder_weights`` into ``model.encoder`` (whole, before unread layers are dropped)."""
    if config.encoder_weights == "none":
        return WeightsProvenance("none")
    if config.encoder_weights == "imagenet":
        provenance, path = imagenet_weight_source(config.encoder)
        if path is None:
            _from_hub(config, in_channels, classes, model)
            return provenance
    else:
        path = weights_file(config.encoder_weights)
        provenance = WeightsProvenance("file", str(path), sha256_file(path))
    dropped = load_encoder_file(model.encoder, config.encoder, path)
    log.info("encoder weights: %s %s", provenance.source, provenance.path)
    return WeightsProvenance(provenance.source, provenance.path, provenance.sha256, dropped)


def _create(config: ModelConfig, in_channels: int, classes: int, encoder_weights: str | bool | None) -> nn.Module:
    kwargs = {"decoder_channels": config.decoder_channels} if config.decoder_channels else {}
    if config.encoder_depth != 5:
        kwargs["encoder_depth"] = config.encoder_depth
        kwargs.setdefault("decoder_channels", list(SMP_DECODER_CHANNELS[: config.encoder_depth]))
    return smp.create_model(
        config.arch,
        encoder_name=config.encoder,
        encoder_weights=encoder_weights,
        in_channels=in_channels,
        classes=classes,
        **kwargs,
    )


def _from_hub(config: ModelConfig, in_channels: int, classes: int, model: nn.Module) -> nn.Module:
    try:
        # smp wants True for timm encoders (the pretrained tag is part of the name), "imagenet" otherwise
        hub_weights = True if config.encoder.startswith("tu-") else "imagenet"
        downloaded = _create(config, in_channels, classes, encoder_weights=hub_weights)
    except Exception as exc:  # noqa: BLE001 - any download failure becomes one actionable error
        raise WeightsError(no_weights_message(config.encoder, exc)) from None
    model.encoder.load_state_dict(downloaded.encoder.state_dict())
    return model


def load_encoder_file(encoder: nn.Module, encoder_name: str, path) -> tuple[str, ...]:
    """Load a weights file into ``encoder`` (key names, else order and shape); returns dropped head keys.

    A whole network's checkpoint (a seg_transfer ``best.pt``) gives its encoder part.

    For timm encoders a full-classifier file is first mapped onto timm's classifier (so a file
    in another naming maps one-to-one), then onto the features-only encoder by name.
    """
    source = encoder_part(read_state_dict(path))
    target = OrderedDict((k, v) for k, v in encoder.state_dict().items())
    if encoder_name.startswith("tu-"):
        source, target = _prefixed(source, target)
    origin = str(path)
    try:
        mapped, dropped = map_state_dict(source, target, origin=origin, allowed_extra=_is_classifier_key)
    except WeightsError:
        if not encoder_name.startswith("tu-"):
            raise
        classifier = timm.create_model(timm_name(encoder_name), pretrained=False).state_dict()
        via_classifier, _ = map_state_dict(source, OrderedDict(classifier), origin=origin)
        head_keys = set(classifier) - set(target)
        mapped, dropped = map_state_dict(via_classifier, target, origin=origin, allowed_extra=head_keys.__contains__)
    encoder.load_state_dict(_unprefixed(mapped, encoder_name))
    return dropped


def _prefixed(source, target):
    """timm encoders live under ``model.`` in smp; compare in timm's own naming."""
    target = OrderedDict((k.removeprefix("model."), v) for k, v in target.items())
    if all(k.startswith("model.") for k in source):
        source = OrderedDict((k.removeprefix("model."), v) for k, v in source.items())
    return source, target


def _unprefixed(mapped, encoder_name):
    if encoder_name.startswith("tu-"):
        return OrderedDict((f"model.{k}", v) for k, v in mapped.items())
    return mapped


def _is_classifier_key(key: str) -> bool:
    return key.startswith(CLASSIFIER_PREFIXES)


def count_parameters(model: nn.Module, trainable_only: bool = False) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)


def encoder_output_stride(model: nn.Module) -> int:
    """Spatial sizes must be a multiple of this (32 for most encoders)."""
    return int(getattr(model.encoder, "output_stride", 32))
