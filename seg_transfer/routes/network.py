"""The one place a checkpoint becomes a network: :func:`load_network` (predict, export, study, resume)."""
from __future__ import annotations

import logging
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
from torch import nn

from seg_transfer.checkpoint import Checkpoint, CheckpointError, resolve_checkpoint
from seg_transfer.config import RunConfig
from seg_transfer.data.transforms import Preprocessing
from seg_transfer.routes import get_route
from seg_transfer.routes.base import InferenceOptions, Inferer, NetworkSpec, Route, tta_flips
from seg_transfer.routes.precision import lay_out_weights, memory_format_for

log = logging.getLogger(__name__)


@dataclass
class LoadedNetwork:
    """A checkpoint's eval-mode network on ``device``, with what inferring it needs."""

    model: nn.Module
    config: RunConfig
    prep: Preprocessing
    labels: dict[int, str]
    route: Route
    spec: NetworkSpec
    device: torch.device
    path: Path
    validated: dict = field(default_factory=dict)  # the checkpoint's ``inference`` record (end of training)

    def inference_options(self, options: InferenceOptions) -> InferenceOptions:
        """``options`` with ``tta=None`` resolved: test-time augmentation where it scored higher on the validation
        cases at the end of training (``Checkpoint.inference``), and for checkpoints written before that choice was
        recorded; ``tta`` given as True/False is kept."""
        if options.tta is not None:
            return options
        return replace(options, tta=bool(self.validated.get("tta", True)))

    def flips(self, options: InferenceOptions) -> list[list[int]]:
        """The input flips the inferer of ``options`` averages (``[[]]``: as is), ``options`` resolved."""
        return [list(dims) for dims in tta_flips(self.spec.data, self.inference_options(options))]

    def inferer(self, options: InferenceOptions) -> Inferer:
        """The route's inferer (the same one training validation uses), ``options`` resolved
        (:meth:`inference_options`)."""
        return self.route.inferer(self.spec, self.inference_options(options), self.model)

    @property
    def in_channels(self) -> int:
        return self.route.in_channels(self.config.data)

    @property
    def multiple(self) -> tuple[int, ...]:
        """Per-axis multiple of the network's input sizes."""
        return self.route.spatial_multiple(self.model)


def network_spec(config: RunConfig, classes: int, settings: dict) -> NetworkSpec:
    return NetworkSpec(config.model, config.data, classes, dict(settings))


def load_network(checkpoint: str | Path | Checkpoint, device: torch.device | str = "cpu") -> LoadedNetwork:
    """Build the checkpoint's network (no pretrained download), load its weights, eval mode, on ``device``, channels
    last where the route predicts faster so (:attr:`~seg_transfer.routes.base.Route.predict_channels_last`).

    ``checkpoint`` is a file, a run folder (its best checkpoint) or a loaded :class:`Checkpoint`.
    Raises :class:`CheckpointError` (one line) when the stored config is invalid, names another route,
    or does not fit the stored weights.
    """
    source = Path("checkpoint")
    if not isinstance(checkpoint, Checkpoint):
        source = resolve_checkpoint(checkpoint)
        checkpoint = Checkpoint.load(source)
    config = checkpoint.run_config(source)
    if config.model.dims != checkpoint.route:
        raise CheckpointError(f"{source}: route {checkpoint.route!r} but its config says model.dims={config.model.dims!r}")
    route = get_route(checkpoint.route)
    labels = checkpoint.labels
    try:
        model, _ = route.build_network(config.model, route.in_channels(config.data), len(labels), False)
    except Exception as exc:  # noqa: BLE001 - a stored config this version cannot build
        raise CheckpointError(f"{source}: cannot build the stored network ({type(exc).__name__}: {str(exc)[:160]})") from None
    load_weights(model, checkpoint.model, source)
    device = torch.device(device)
    channels_last = device.type in route.predict_channels_last
    lay_out_weights(model.to(device), memory_format_for(channels_last, route.spatial_dims + 2)).eval()
    spec = network_spec(config, len(labels), checkpoint.route_settings)
    return LoadedNetwork(model, config, Preprocessing.from_dict(checkpoint.preprocessing), labels, route, spec,
                         device, source, dict(checkpoint.inference))


def load_weights(model: nn.Module, state: dict[str, torch.Tensor], source: str | Path) -> None:
    """``model.load_state_dict(state)``, or :class:`CheckpointError` saying how config and weights disagree.

    Extra ``encoder.*`` tensors are dropped when every tensor the network has is there with its shape: they
    belong to encoder layers the decoder does not read, which checkpoints of earlier versions still held."""
    expected = model.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    mismatched = [f"{k} {tuple(state[k].shape)} vs {tuple(v.shape)}" for k, v in expected.items()
                  if k in state and tuple(state[k].shape) != tuple(v.shape)]
    unread = [k for k in unexpected if k.startswith("encoder.")] if not (missing or mismatched) else []
    if unread:
        log.info("%s: left out %d tensors of encoder layers the decoder does not read", source, len(unread))
        state = {k: v for k, v in state.items() if k not in unread}
        unexpected = [k for k in unexpected if k not in unread]
    if missing or unexpected or mismatched:
        parts = [f"{len(missing)} missing (e.g. {missing[0]})" if missing else "",
                 f"{len(unexpected)} unexpected (e.g. {unexpected[0]})" if unexpected else "",
                 f"{len(mismatched)} of another shape (e.g. {mismatched[0]}, stored vs config)" if mismatched else ""]
        raise CheckpointError(f"{source}: the weights do not fit the network its config describes: "
                              + "; ".join(p for p in parts if p))
    model.load_state_dict(state)
