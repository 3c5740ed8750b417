"""Cached frozen-encoder features: equality with recomputation, keys, disk reload, the cached decoder stage, rank-encoders."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from seg_transfer.checkpoint import Checkpoint
from seg_transfer.config import ConfigError, config_from_dict
from seg_transfer.data.augment import SliceAugmenter
from seg_transfer.data.pipeline import prepare_data, slice_loader, volume_dataset
from seg_transfer.data.slices import label_slice, pad_to_multiple, slab
from seg_transfer.data.transforms import Preprocessing
from seg_transfer.models.factory import build_model
from seg_transfer.training import cached_samples as cs
from seg_transfer.training import feature_cache as fc
from seg_transfer.training.trainer import train
from tests.conftest import tiny_config

REPO = Path(__file__).resolve().parents[1]
BENCHMARK = REPO / "benchmarks" / "feature_cache.py"


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    """Every test here on one intra-op thread (bit-equality across runs, a busy 2-core machine)."""


def _config(phantom_root, tmp_path, **overrides):
    raw = tiny_config(phantom_root, **{"data.cache_dir": str(tmp_path / "cache"), "model.frozen_bn": "eval", **overrides})
    return config_from_dict(raw)


def _setup(config, tmp_path):
    """(model, training SliceDataset, loader) as a fresh run of ``config`` builds them (seeded model init)."""
    data = prepare_data(config.data, tmp_path / "run")
    volumes = volume_dataset(data.subset("train"), Preprocessing.from_config(config.data), config.data)
    torch.manual_seed(config.seed)
    model = build_model(config.model, config.data.in_channels, len(data.labels))[0]
    dataset, loader = slice_loader(volumes, config.data, config.training.batch_size, 32, train=True)
    dataset.set_epoch(config.seed, 0, config.data.slices_per_epoch, config.data.foreground_fraction)
    return model, dataset, loader


def _count_encoder_calls(encoder) -> list[int]:
    calls = [0]
    encoder.register_forward_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))
    return calls


def test_cached_features_equal_recomputed_ones(phantom_root, tmp_path):
    config = _config(phantom_root, tmp_path, **{"data.augment": {"enabled": True, "flip_axes": [0]}})
    model, dataset, loader = _setup(config, tmp_path)
    cache = fc.DecoderStageCache(config, folder=None)
    entries = cache.epoch_entries(dataset)
    assert {slot for _, slot, _ in entries} <= set(range(1, 5)) and len({slot for _, slot, _ in entries}) > 1
    picked = entries[:6] + [(entries[0][0], cs.PLAIN_SLOT, entries[0][2])]  # + a plain slab, as rank-encoders reads
    store = cache.prepare(model.encoder, dataset, picked, torch.device("cpu"))
    features, labels = store.read(picked)
    augment = SliceAugmenter(config.data.augment)
    model.eval()
    for row, (case, slot, index) in enumerate(picked):
        volume, name = dataset.volumes[case], dataset.volumes[case]["name"]
        image = slab(volume["image"], 2, index, 1).astype(np.float32)
        label = label_slice(volume["label"], 2, index)
        if slot:
            image, label = augment(image, label, cs.variant_seed(config.seed, name, index, slot))
        image = pad_to_multiple(image, 32, value=float(image.min()))
        with torch.no_grad():
            expected = model.encoder(torch.from_numpy(image)[None])[1:]
        for cached, fresh in zip(features, expected):
            torch.testing.assert_close(cached[row], fresh[0], rtol=2e-3, atol=2e-3 * float(fresh.abs().max()))
        assert torch.equal(labels[row, 0], torch.from_numpy(pad_to_multiple(np.asarray(label), 32).astype(np.int64)))


def test_key_changes_with_a_weight_a_batchnorm_statistic_or_the_preprocessing(phantom_root, tmp_path):
    config = _config(phantom_root, tmp_path)
    model, dataset, _ = _setup(config, tmp_path)
    spec = cs.slice_spec(config, 32)
    base = fc.encoder_checksum(model.encoder)
    assert fc.encoder_checksum(model.encoder) == base
    decoder_weight = next(p for n, p in model.named_parameters() if n.startswith("decoder."))
    with torch.no_grad():
        decoder_weight.add_(1.0)
    assert fc.encoder_checksum(model.encoder) == base  # only the encoder counts
    norm = next(m for m in model.encoder.modules() if isinstance(m, torch.nn.BatchNorm2d))
    conv = next(m for m in model.encoder.modules() if isinstance(m, torch.nn.Conv2d))
    with torch.no_grad():
        conv.weight.view(-1)[0] += 1e-6
        changed_weight = fc.encoder_checksum(model.encoder)
        conv.weight.view(-1)[0] -= 1e-6
        norm.running_mean[0] += 1e-6
        changed_statistic = fc.encoder_checksum(model.encoder)
    assert len({base, changed_weight, changed_statistic}) == 3
    other_prep = cs.slice_spec(config.model_copy(update={"data": config.data.model_copy(
        update={"mri_percentiles": (1.0, 99.0)})}), 32)
    other_context = cs.slice_spec(config.model_copy(update={"data": config.data.model_copy(
        update={"context_slices": 2})}), 32)
    other_seed = cs.slice_spec(config.model_copy(update={"seed": 1}), 32)
    keys = {fc.store_key(s, base) for s in (spec, other_prep, other_context, other_seed)} | {fc.store_key(spec, changed_statistic)}
    assert len(keys) == 5
    # a changed BatchNorm statistic is a cache miss: the trainer's cache encodes again, into another store
    cache = fc.DecoderStageCache(config, folder=None)
    entries = cache.epoch_entries(dataset)
    first = cache.prepare(model.encoder, dataset, entries, torch.device("cpu")).store
    computed = cache.slices_computed
    assert cache.prepare(model.encoder, dataset, entries, torch.device("cpu")).store is first
    assert cache.slices_computed == computed  # a hit
    with torch.no_grad():
        norm.running_var[0] *= 1.5
    assert cache.prepare(model.encoder, dataset, entries, torch.device("cpu")).store.key != first.key
    assert cache.slices_computed == 2 * computed


RELOAD_SCRIPT = """
import json, sys, numpy as np, torch
torch.set_num_threads(1)
from seg_transfer.config import config_from_dict
from seg_transfer.training import cached_samples as cs
from seg_transfer.training import feature_cache as fc
from tests.test_feature_cache import _setup, _count_encoder_calls
from pathlib import Path
config = config_from_dict(json.loads(sys.argv[1]))
model, dataset, _ = _setup(config, Path(sys.argv[2]))
calls = _count_encoder_calls(model.encoder)
cache = fc.DecoderStageCache(config, fc.feature_cache_dir(config))
entries = cache.epoch_entries(dataset)
features, labels = cache.prepare(model.encoder, dataset, entries, torch.device("cpu")).read(entries)
np.savez(sys.argv[3], *[f.numpy() for f in features], labels=labels.numpy(), calls=calls[0])
"""


def test_disk_cache_round_trips_and_survives_a_new_process(phantom_root, tmp_path):
    raw = tiny_config(phantom_root, **{"data.cache_dir": str(tmp_path / "cache"), "model.frozen_bn": "eval"})
    config = config_from_dict(raw)
    model, dataset, _ = _setup(config, tmp_path)
    disk = fc.DecoderStageCache(config, fc.feature_cache_dir(config))
    entries = disk.epoch_entries(dataset)
    from_disk = disk.prepare(model.encoder, dataset, entries, torch.device("cpu"))
    in_memory = fc.DecoderStageCache(config, None).prepare(model.encoder, dataset, entries, torch.device("cpu"))
    features, labels = from_disk.read(entries)
    for a, b in zip(features, in_memory.read(entries)[0]):
        assert torch.equal(a, b)
    folder = from_disk.store.folder
    assert {p.name for p in folder.iterdir()} >= {"index.json", "32x32.level1.bin", "32x32.label.bin"}
    assert not list(folder.glob(".*.tmp"))

    out = tmp_path / "reloaded.npz"
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    subprocess.run([sys.executable, "-c", RELOAD_SCRIPT, json.dumps(raw), str(tmp_path), str(out)],
                   check=True, cwd=REPO, env=env, capture_output=True)
    reloaded = np.load(out)
    assert int(reloaded["calls"]) == 0  # nothing recomputed, not even a probe
    for k, mine in enumerate(features):
        assert np.array_equal(reloaded[f"arr_{k}"], mine.numpy())
    assert np.array_equal(reloaded["labels"], labels.numpy())

    # a group whose rows the index does not list (an interrupted write) is encoded again, and only it
    index = json.loads((folder / "index.json").read_text())
    dropped = index["filled"].pop()
    (folder / "index.json").write_text(json.dumps(index))
    again = fc.DecoderStageCache(config, fc.feature_cache_dir(config))
    calls = _count_encoder_calls(model.encoder)
    again.prepare(model.encoder, dataset, entries, torch.device("cpu"))
    depth = next(c.rows for c in again.store.cases if c.name == dropped[0])
    assert again.slices_computed == depth and calls[0] == -(-depth // fc.FILL_BATCH)


def test_a_disk_fill_flushes_once_per_commit_and_its_index_lists_only_flushed_groups(phantom_root, tmp_path, monkeypatch):
    raw = tiny_config(phantom_root, **{"data.cache_dir": str(tmp_path / "cache"), "model.frozen_bn": "eval"})
    config = config_from_dict(raw)
    model, dataset, _ = _setup(config, tmp_path)
    flushes = []
    monkeypatch.setattr(np.memmap, "flush", lambda self: flushes.append(self.filename))
    disk = fc.DecoderStageCache(config, fc.feature_cache_dir(config))
    entries = disk.epoch_entries(dataset)
    prepared = disk.prepare(model.encoder, dataset, entries, torch.device("cpu"))
    store = prepared.store
    groups = len(store.filled)
    files = sum(len(arrays) for arrays in store.arrays.values())
    assert groups > files and len(flushes) == files  # one commit at the end: each file flushed once, not per group
    index = json.loads((store.folder / "index.json").read_text())
    assert len(index["filled"]) == groups

    # a later write without commit reaches the index only through commit, which flushes before indexing
    name, slot = sorted(store.filled)[0]
    case = store.case_index[name]
    rows = store.rows(case, slot, range(store.cases[case].rows))
    *features, labels = [np.array(array[rows]) for array in store.arrays[store.bucket_of[case]]]
    index["filled"].remove([name, slot])
    (store.folder / "index.json").write_text(json.dumps(index))
    store.filled.discard((name, slot))
    store.write(case, slot, features, labels)
    assert [name, slot] not in json.loads((store.folder / "index.json").read_text())["filled"]
    flushes.clear()
    index_writes = []
    real_write_index = fc.FeatureStore._write_index
    monkeypatch.setattr(fc.FeatureStore, "_write_index", lambda self: (index_writes.append(len(flushes)), real_write_index(self)))
    store.commit()
    assert flushes and index_writes == [len(flushes)]  # all flushes happened before the index was written
    assert [name, slot] in json.loads((store.folder / "index.json").read_text())["filled"]
    store.commit()
    assert index_writes == [len(flushes)]  # nothing written since: no flush, no index


def _decoder_stage(epochs: int, **overrides) -> dict:
    return {"training.stages": [{"name": "decoder", "train": "decoder", "epochs": epochs, "lr": 3e-3}], **overrides}


def test_cached_decoder_stage_trains_the_decoder_and_leaves_every_encoder_tensor_bit_identical(phantom_root, tmp_path):
    config = _config(phantom_root, tmp_path, **_decoder_stage(1, **{"training.feature_cache": "memory"}))
    torch.manual_seed(config.seed)
    initial = {k: v.clone() for k, v in build_model(config.model, 3, 3)[0].state_dict().items()}
    train(config, tmp_path / "run")
    trained = Checkpoint.load(tmp_path / "run" / "checkpoints" / "last.pt").model
    encoder = [k for k in trained if k.startswith("encoder.")]
    assert encoder and all(torch.equal(trained[k], initial[k]) for k in encoder)  # weights and BatchNorm buffers
    decoder_weights = [k for k in trained if k.startswith("decoder.") and k.endswith("weight") and trained[k].ndim == 4]
    assert decoder_weights and all(not torch.equal(trained[k], initial[k]) for k in decoder_weights)


def _records(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("storage", [np.float32, np.float16])
def test_cached_decoder_stage_matches_recomputing_without_augmentation(phantom_root, tmp_path, monkeypatch, storage):
    """Without augmentation the paths differ only by storage precision: float32 rows give the recomputing
    stage's losses and Dice bit for bit; float16 (the cache's format) moves them by ~2e-3."""
    monkeypatch.setattr(fc, "FEATURE_DTYPE", storage)
    results = {}
    for mode in ("off", "memory"):
        config = _config(phantom_root, tmp_path, **_decoder_stage(2, **{"training.feature_cache": mode,
                                                                         "data.augment": {"enabled": False}}))
        train(config, tmp_path / mode)
        results[mode] = [(r["train_loss"], r["val_dice"]) for r in _records(tmp_path / mode)]
    if storage is np.float32:
        assert results["memory"] == results["off"]
    for (off_loss, off_dice), (on_loss, on_dice) in zip(results["off"], results["memory"]):
        assert on_loss == pytest.approx(off_loss, abs=5e-3) and on_dice == pytest.approx(off_dice, abs=0.01)


def test_cached_decoder_stage_with_variants_is_close_to_fresh_augmentation(phantom_root, tmp_path):
    """With augmentation the cached stage sees 4 fixed variants per slice instead of a fresh draw per sample:
    another, equally valid, draw. Measured on these 3-epoch phantom runs (seeds 0-2): final losses differ by
    0.004-0.025 while seeds alone move them by 0.8, Dice by up to 0.05 (all Dice here are below 0.1, so
    Dice says little; the benchmark compares Dice on real data)."""
    results = {}
    for mode in ("off", "memory"):
        config = _config(phantom_root, tmp_path, **_decoder_stage(3, **{"training.feature_cache": mode}))
        train(config, tmp_path / mode)
        results[mode] = _records(tmp_path / mode)
    off, on = results["off"][-1], results["memory"][-1]
    assert on["train_loss"] == pytest.approx(off["train_loss"], abs=0.05)
    assert on["val_dice"] == pytest.approx(off["val_dice"], abs=0.1)


def test_resume_with_the_cache_continues_to_the_same_result(phantom_root, tmp_path):
    from tests.test_training import _equal_states, _train_until_epoch

    config = _config(phantom_root, tmp_path, **{"training.feature_cache": "memory", "training.stages": [
        {"name": "decoder", "train": "decoder", "epochs": 2, "lr": 3e-3},
        {"name": "all", "train": "all", "epochs": 1, "lr": 1e-3}]})
    straight = train(config, tmp_path / "straight")
    interrupted = tmp_path / "interrupted"
    _train_until_epoch(config, interrupted, 1)  # mid decoder stage: the memory cache is gone with the process
    resumed = train(config, interrupted, resume=True)
    a = Checkpoint.load(tmp_path / "straight" / "checkpoints" / "last.pt")
    b = Checkpoint.load(interrupted / "checkpoints" / "last.pt")
    assert resumed.epochs == straight.epochs == 3 and _equal_states(a.model, b.model)
    assert resumed.best_dice == pytest.approx(straight.best_dice, abs=1e-7)


def test_what_the_cache_cannot_serve_is_a_one_line_config_error(phantom_root, tmp_path):
    config = _config(phantom_root, tmp_path, **{"training.feature_cache": "memory", "model.frozen_bn": "train"})
    with pytest.raises(ConfigError, match="needs model.frozen_bn eval or adapt: with train, frozen BatchNorm") as error:
        train(config, tmp_path / "run")
    assert "\n" not in str(error.value) and not (tmp_path / "run" / "checkpoints").exists()
    config = _config(phantom_root, tmp_path, **{"training.feature_cache": "disk"})
    model = build_model(config.model, 3, 3)[0]
    with pytest.raises(ConfigError, match="single-process run"):
        fc.open_decoder_cache(config, model, 3, world_size=2)
    assert fc.open_decoder_cache(config, model, 3).folder == tmp_path / "cache" / "features"
    no_decoder_stage = _config(phantom_root, tmp_path, **{"training.feature_cache": "memory", "model.frozen_bn": "train",
                                                           "training.stages": [{"train": "all", "epochs": 1}]})
    assert fc.open_decoder_cache(no_decoder_stage, model, 3) is None


def test_rank_encoders_reads_the_store_a_training_run_filled(phantom_root, tmp_path, monkeypatch):
    from seg_transfer.selection.rank import RankOptions, parse_candidates, rank_encoders

    overrides = {"training.feature_cache": "disk", "data.augment": {"enabled": False},
                 "model.encoder_weights": "imagenet", "data.slices_per_epoch": 48}
    config = _config(phantom_root, tmp_path, **_decoder_stage(1, **overrides))
    train(config, tmp_path / "run")
    encoded = []
    original = fc.encode
    monkeypatch.setattr(fc, "encode", lambda encoder, images, device: encoded.append(len(images))
                        or original(encoder, images, device))
    candidates = parse_candidates("tu-tf_efficientnet_lite0:imagenet")
    cached = rank_encoders(config, candidates, tmp_path / "ranked", RankOptions(pixels=200, strides=(4, 8)))
    assert encoded == []  # every plain slab came from the training run's store
    fresh_config = config.model_copy(update={"training": config.training.model_copy(update={"feature_cache": "off"})})
    fresh = rank_encoders(fresh_config, candidates, tmp_path / "fresh", RankOptions(pixels=200, strides=(4, 8)))
    for a, b in zip(cached.scores, fresh.scores):
        assert a.stride == b.stride and a.values["logme"] == pytest.approx(b.values["logme"], abs=1e-3)


# --------------------------------------------------------------------------- 3D: pre-drawn patches


def _config_3d(phantom_root, tmp_path, **overrides):
    from tests.test_route_3d import tiny_3d

    raw = tiny_3d(phantom_root, **{"data.cache_dir": str(tmp_path / "cache"), "model.frozen_bn": "eval",
                                   "data.slices_per_epoch": 8, **overrides})
    return config_from_dict(raw)


def _setup_3d(config, tmp_path):
    """(model, training PatchDataset, loader) as a fresh 3D run of ``config`` builds them."""
    from seg_transfer.routes import get_route

    route = get_route("3d")
    data = prepare_data(config.data, tmp_path / "run")
    volumes = volume_dataset(data.subset("train"), Preprocessing.from_config(config.data), config.data)
    torch.manual_seed(config.seed)
    model = route.build_network(config.model, 1, len(data.labels), True)[0]
    settings = route.settings(config.data, volumes, model)
    dataset, loader = route.training_samples(volumes, config.data, config.training.batch_size, settings, model)
    dataset.set_epoch(config.seed, 0, config.data.slices_per_epoch, config.data.foreground_fraction)
    return model, dataset, loader


def test_cached_3d_features_are_the_encoders_on_the_patch_the_sampler_draws_for_the_slot(phantom_root, tmp_path):
    config = _config_3d(phantom_root, tmp_path)
    model, dataset, _ = _setup_3d(config, tmp_path)
    cache = fc.DecoderStageCache(config, folder=None)
    entries = cache.epoch_entries(dataset)
    assert len(entries) == 8 and {row for _, _, row in entries} == {0}
    assert {slot for _, slot, _ in entries} <= set(range(1, 5)) and len({slot for _, slot, _ in entries}) > 1
    assert [case for case, _, _ in entries] == [int(dataset.order[i]) for i in range(8)]
    store = cache.prepare(model.encoder, dataset, entries, torch.device("cpu"))
    features, labels = store.read(entries)
    assert [tuple(f.shape[2:]) for f in features] == [(8, 8, 8), (4, 4, 4), (2, 2, 2)]  # strides 2, 4, 8 per axis
    assert labels.shape == (8, 1, 16, 16, 16)
    model.eval()
    patches = {}
    for row, (case, slot, _) in enumerate(entries):
        patch = dataset.sample(case, cs.variant_seed(config.seed, dataset.names[case], 0, slot))
        patches[(case, slot)] = patch["image"]
        with torch.no_grad():
            expected = model.encoder(patch["image"][None])[1:]
        for cached, fresh in zip(features, expected):
            torch.testing.assert_close(cached[row], fresh[0], rtol=2e-3, atol=2e-3 * float(fresh.abs().max()))
        assert torch.equal(labels[row], patch["label"])
    by_case: dict[int, list[torch.Tensor]] = {}
    for (case, _), image in patches.items():
        by_case.setdefault(case, []).append(image)
    assert any(len(images) > 1 and not torch.equal(images[0], images[1]) for images in by_case.values())  # slots differ


@pytest.mark.parametrize("deep_supervision", [False, True])
def test_a_cached_3d_decoder_step_equals_the_full_networks_step_on_the_same_patches(phantom_root, tmp_path, monkeypatch,
                                                                                    deep_supervision):
    """Same patches, same frozen encoder: with float32 rows the cached step's loss and updated decoder equal the
    recomputing step's (the network's own forward with a frozen, eval-mode encoder) to float tolerance, with
    and without deep supervision (whose auxiliary heads the cached step trains too)."""
    from seg_transfer.config import LossConfig
    from seg_transfer.models.freezing import set_train_mode
    from seg_transfer.training.loss import build_loss
    from seg_transfer.training.trainer import train_step

    monkeypatch.setattr(fc, "FEATURE_DTYPE", np.float32)
    config = _config_3d(phantom_root, tmp_path, **{"data.augment": {"enabled": False},
                                                   "model.deep_supervision": deep_supervision})
    model, dataset, loader = _setup_3d(config, tmp_path)
    cache = fc.DecoderStageCache(config, folder=None)
    entries = cache.epoch_entries(dataset)[:2]
    features, labels = cache.prepare(model.encoder, dataset, entries, torch.device("cpu")).read(entries)
    images = torch.stack([dataset.sample(case, cs.variant_seed(config.seed, dataset.names[case], 0, slot))["image"]
                          for case, slot, _ in entries])
    results = []
    for path in ("recompute", "cached"):
        torch.manual_seed(0)
        copy = _setup_3d(config, tmp_path / path)[0]
        copy.load_state_dict(model.state_dict())
        for parameter in copy.encoder.parameters():
            parameter.requires_grad_(False)
        copy.train()
        set_train_mode(copy, "eval")
        optimizer = torch.optim.SGD([p for p in copy.parameters() if p.requires_grad], lr=0.1)
        loss_fn = build_loss(LossConfig(batch_dice=True), config.model.supervised_outputs, torch.device("cpu"))
        if path == "recompute":
            loss = train_step(copy, loss_fn, optimizer, {"image": images, "label": labels}, torch.device("cpu"), None)
        else:
            loss = cache.step(copy, loss_fn, optimizer, {"features": features, "label": labels,
                                                         "size": tuple(labels.shape[2:])}, torch.device("cpu"), None)
        results.append((loss, {k: v.clone() for k, v in copy.state_dict().items()}))
    (loss_a, state_a), (loss_b, state_b) = results
    assert loss_b == pytest.approx(loss_a, rel=1e-5)
    moved = {k.split(".")[0] for k in state_a if not torch.equal(state_a[k], model.state_dict()[k])}
    assert moved == ({"decoder", "segmentation_head", "aux_heads"} if deep_supervision else {"decoder", "segmentation_head"})
    for key in state_a:
        torch.testing.assert_close(state_b[key], state_a[key], rtol=1e-4, atol=1e-6)


def test_a_cached_3d_decoder_stage_trains_the_decoder_only_and_a_second_run_reads_the_disk_store(phantom_root, tmp_path,
                                                                                               monkeypatch):
    config = _config_3d(phantom_root, tmp_path, **_decoder_stage(2, **{"training.feature_cache": "disk"}))
    from seg_transfer.routes import get_route

    torch.manual_seed(config.seed)
    initial = get_route("3d").build_network(config.model, 1, 3, True)[0].state_dict()
    encoded = []
    original = fc.encode
    monkeypatch.setattr(fc, "encode", lambda encoder, images, device: encoded.append(len(images))
                        or original(encoder, images, device))
    first = train(config, tmp_path / "first")
    trained = Checkpoint.load(tmp_path / "first" / "checkpoints" / "last.pt").model
    encoder = [k for k in initial if k.startswith("encoder.")]
    assert encoder and all(torch.equal(trained[k], initial[k]) for k in encoder)
    decoder = [k for k in initial if k.startswith("decoder.") and k.endswith("weight") and initial[k].ndim == 5]
    assert decoder and all(not torch.equal(trained[k], initial[k]) for k in decoder)
    assert 0 < len(encoded) <= 2 * 4 * 4  # at most (training cases) x 4 variants, one patch per group
    folder = next((tmp_path / "cache" / "features").iterdir())
    assert {p.name for p in folder.iterdir()} >= {"index.json", "16x16x16.level1.bin", "16x16x16.label.bin"}
    encoded.clear()
    second = train(config, tmp_path / "second")
    assert encoded == [] and second.best_dice == pytest.approx(first.best_dice, abs=1e-7)


def test_a_resumed_cached_3d_stage_continues_to_the_same_result(phantom_root, tmp_path):
    """The memory cache dies with the process; refilled after resuming, it holds the same bits (each patch is
    encoded alone), so the interrupted run ends where the straight one does."""
    from tests.test_training import _equal_states, _train_until_epoch

    config = _config_3d(phantom_root, tmp_path, **{"training.feature_cache": "memory", "training.stages": [
        {"name": "decoder", "train": "decoder", "epochs": 2, "lr": 3e-3},
        {"name": "all", "train": "all", "epochs": 1, "lr": 1e-3}]})
    straight = train(config, tmp_path / "straight")
    interrupted = tmp_path / "interrupted"
    _train_until_epoch(config, interrupted, 1)  # mid decoder stage
    resumed = train(config, interrupted, resume=True)
    a = Checkpoint.load(tmp_path / "straight" / "checkpoints" / "last.pt")
    b = Checkpoint.load(interrupted / "checkpoints" / "last.pt")
    assert resumed.epochs == straight.epochs == 3 and _equal_states(a.model, b.model)
    assert resumed.best_dice == pytest.approx(straight.best_dice, abs=1e-7)


def test_benchmark_summary_compares_cached_and_recomputing_runs_over_seeds(tmp_path):
    """benchmarks/feature_cache.py --summarise merges the --json files of several processes by path and seed and
    counts failed runs per path; a seed run twice in one path keeps its last record."""
    def record(mode, seed, dice):
        return {"mode": mode, "seed": seed, "epochs": 20, "variants": 16, "route": "2.5d", "best_dice": dice,
                "best_epoch": 20, "seconds": [1.0]}

    first, second = tmp_path / "a.json", tmp_path / "b.json"
    first.write_text(json.dumps({"off s5": record("off", 5, 0.80), "memory s5": record("memory", 5, 0.40),
                                 "off s6": record("off", 6, 0.10)}))
    second.write_text(json.dumps({"off s6": record("off", 6, 0.78), "memory s6": record("memory", 6, 0.79),
                                  "off s7": record("off", 7, 0.76), "memory s7": record("memory", 7, 0.81)}))
    out = subprocess.run([sys.executable, str(BENCHMARK), "--summarise", str(first), str(second)],
                         capture_output=True, text=True, check=True).stdout
    lines = out.splitlines()
    assert lines[0].startswith("recomputing 3 seeds, mean 0.780,") and "below 0.7: 0;" in lines[0]
    assert lines[1].startswith("cached      3 seeds, mean 0.667,") and "below 0.7: 1;" in lines[1]
    assert lines[2].startswith("cached - recomputing: -0.113, 95% CI [") and "1 cached, 0 recomputing" in lines[2]


def test_benchmark_summary_refuses_a_bad_file_in_one_line(tmp_path):
    broken = tmp_path / "broken.json"
    broken.write_text("{not json")
    run = subprocess.run([sys.executable, str(BENCHMARK), "--summarise", str(broken)], capture_output=True, text=True)
    assert run.returncode == 2 and "Traceback" not in run.stderr
    assert f"--summarise: {broken}: not a --json file of this benchmark" in run.stderr.splitlines()[-1]


@pytest.mark.parametrize(("low", "high", "verdict"), [
    (-0.015, 0.012, "equal within +-0.02"), (-0.02, 0.02, "equal within +-0.02"), (-0.03, 0.01, "not settled"),
    (-0.05, -0.001, "worse"), (0.001, 0.03, "better"),
    (-0.008, -0.001, "equal within +-0.02, but lower (CI below 0)"), (0.001, 0.01, "equal within +-0.02, but higher (CI above 0)")])
def test_equivalence_verdict_follows_the_declared_rule(low, high, verdict):
    """A CI inside +-margin is "equal" (and says so when it also lies on one side of 0); one wholly below or above
    0 and reaching past the margin is "worse" / "better"; else "not settled"."""
    import runpy

    assert runpy.run_path(str(BENCHMARK))["equivalence_verdict"](low, high, 0.02) == verdict


def test_benchmark_summary_prints_the_equivalence_verdict(tmp_path):
    """Two paths with the same runs give a CI of width about 0 around 0: equal within +-0.02."""
    records = {f"{mode} s{seed}": {"mode": mode, "seed": seed, "best_dice": 0.80 + 0.001 * seed}
               for mode in ("off", "memory") for seed in range(5)}
    path = tmp_path / "runs.json"
    path.write_text(json.dumps(records))
    out = subprocess.run([sys.executable, str(BENCHMARK), "--summarise", str(path), "--margin", "0.02"],
                         capture_output=True, text=True, check=True).stdout
    assert out.splitlines()[-1] == "verdict (95% CI against +-0.02): equal within +-0.02"


@pytest.mark.parametrize("arguments", [["--margin", "0.02"], ["--summarise", "runs.json", "--margin", "0"]])
def test_benchmark_refuses_a_margin_it_cannot_use_in_one_line(arguments):
    """``--margin`` only means something with ``--summarise`` and above 0: anything else is a one-line error, exit 2."""
    run = subprocess.run([sys.executable, str(BENCHMARK), *arguments], capture_output=True, text=True)
    assert run.returncode == 2 and "Traceback" not in run.stderr
    assert "--margin" in run.stderr.splitlines()[-1]


@pytest.mark.parametrize(("setting", "other"), [("epochs", 40), ("augment", False), ("lr", 3e-3), ("route", "3d")])
def test_benchmark_summary_refuses_runs_of_different_stages(tmp_path, setting, other):
    """Merging a 20-epoch file with a 40-epoch one (or another augmentation, LR or route) would compare two
    different stages as one: refused in one line naming both files and the setting."""
    def record(mode, seed, **changed):
        return {"mode": mode, "seed": seed, "epochs": 20, "variants": 16, "route": "2.5d", "lr": None, "augment": True,
                "best_dice": 0.8, "best_epoch": 20, "seconds": [1.0], **changed}

    first, second = tmp_path / "a.json", tmp_path / "b.json"
    first.write_text(json.dumps({"off s5": record("off", 5)}))
    second.write_text(json.dumps({"memory s5": record("memory", 5, **{setting: other})}))
    run = subprocess.run([sys.executable, str(BENCHMARK), "--summarise", str(first), str(second)],
                         capture_output=True, text=True)
    assert run.returncode == 2 and "Traceback" not in run.stderr
    message = run.stderr.splitlines()[-1]
    assert f"{second} (memory s5) has {setting} {other!r} but {first} (off s5)" in message


def test_benchmark_summary_checks_variants_only_among_cached_runs(tmp_path):
    """Recomputing runs record the command's --variants but do not use it; two cached runs must agree on it."""
    records = {f"{mode} s{seed}": {"mode": mode, "seed": seed, "variants": 4 if mode == "off" else 16, "best_dice": 0.8}
               for mode in ("off", "memory") for seed in (1, 2)}
    path = tmp_path / "runs.json"
    path.write_text(json.dumps(records))
    ok = subprocess.run([sys.executable, str(BENCHMARK), "--summarise", str(path)], capture_output=True, text=True)
    assert ok.returncode == 0
    records["memory s3"] = {"mode": "memory", "seed": 3, "variants": 4, "best_dice": 0.8}
    path.write_text(json.dumps(records))
    run = subprocess.run([sys.executable, str(BENCHMARK), "--summarise", str(path)], capture_output=True, text=True)
    assert run.returncode == 2 and "has variants 4 but" in run.stderr.splitlines()[-1]


def test_a_plain_decoder_stage_in_an_augmented_run_is_cached_exactly(phantom_root, tmp_path, monkeypatch):
    """``stages[].augment: false`` on the decoder-only stage of an augmented run: that stage trains on plain slabs,
    so its cache holds slot 0 only and, with float32 rows, gives the recomputing stage's losses and Dice bit for bit;
    the next stage augments again (its training loss differs from the same run without augmentation)."""
    monkeypatch.setattr(fc, "FEATURE_DTYPE", np.float32)
    stages = [{"name": "decoder", "train": "decoder", "epochs": 2, "lr": 3e-3, "augment": False},
              {"name": "all", "train": "all", "epochs": 1, "lr": 1e-3}]
    results = {}
    for name, overrides in {"off": {"training.feature_cache": "off"}, "memory": {"training.feature_cache": "memory"},
                            "never": {"data.augment": {"enabled": False}}}.items():
        config = _config(phantom_root, tmp_path, **{"training.stages": stages, **overrides})
        assert config.data.augment.enabled == (name != "never")
        train(config, tmp_path / name)
        results[name] = [(r["train_loss"], r["val_dice"]) for r in _records(tmp_path / name)]
    assert results["memory"][:2] == results["off"][:2] == results["never"][:2]
    assert results["off"][2][0] != results["never"][2][0]
