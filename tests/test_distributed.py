"""Data-parallel training: sharding, SLURM launch variables, and real 2-process gloo runs through torchrun on CPU.

What can be equal and what cannot. Each rank trains on every other position of the epoch order with
half the global batch, and DDP averages the ranks' gradients, so a rank pair's step is the
single-process step on the same 8 slices (same augmentation: its seed is the global position). For
a network without BatchNorm the two runs therefore agree to float rounding, which
``test_ddp_reproduces_single_process_training_without_batchnorm`` checks to 1e-6. The U-Nets do
have BatchNorm, whose training-mode statistics come from each rank's 4 slices instead of 8
(SyncBatchNorm would fix that but runs on GPUs only), so a whole DDP run only stays *close* to the
single-process run: see ``test_ddp_run_learns_like_the_single_process_run`` for that tolerance.

Timings on 2 busy CPU cores: each torchrun launch costs ~20 s, most of it importing torch and MONAI
in two processes. The two launches below run in CI; the longer learning/resume runs are ``slow``.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from seg_transfer.config import AugmentConfig, ConfigError, config_from_dict
from seg_transfer.data.augment import SliceAugmenter
from seg_transfer.data.pipeline import prepare_data, volume_dataset
from seg_transfer.data.slices import SliceDataset, shard_positions
from seg_transfer.data.transforms import Preprocessing
from seg_transfer.checkpoint import Checkpoint
from seg_transfer.models.factory import build_model
from seg_transfer.routes.base import InferenceOptions
from seg_transfer.training import distributed
from seg_transfer.training.distributed import DistributedContext, first_host, slurm_environment
from seg_transfer.training.trainer import _open_session, mean_over_ranks, train, validation_scores
from tests.conftest import tiny_config

# --------------------------------------------------------------------------- sharding


def test_shards_split_every_global_batch_between_ranks():
    ranks = [shard_positions(24, rank, 2, global_batch=8, drop_last=True) for rank in range(2)]
    assert len(ranks[0]) == len(ranks[1]) == 12
    assert sorted(np.concatenate(ranks).tolist()) == list(range(24))
    for step in range(3):  # per-rank batch 4: together exactly the single-process batch of 8
        together = np.concatenate([r[4 * step : 4 * step + 4] for r in ranks])
        assert sorted(together.tolist()) == list(range(8 * step, 8 * step + 8))


def test_shards_drop_the_incomplete_batch_or_wrap_around():
    dropped = [shard_positions(30, rank, 2, global_batch=8, drop_last=True) for rank in range(2)]
    assert sorted(np.concatenate(dropped).tolist()) == list(range(24))  # single process drops slices 24..29 too
    wrapped = [shard_positions(5, rank, 2, global_batch=8, drop_last=False) for rank in range(2)]
    assert [r.tolist() for r in wrapped] == [[0, 2, 4], [1, 3, 0]]  # equal length: every rank takes one step
    with pytest.raises(ValueError, match="rank 2"):
        shard_positions(10, 2, 2, 8, True)


def _volumes(count: int = 3, depth: int = 10) -> list[dict]:
    rng = np.random.default_rng(0)
    return [{"image": rng.normal(size=(1, 32, 32, depth)).astype(np.float32),
             "label": (rng.random((1, 32, 32, depth)) > 0.7).astype(np.int64)} for _ in range(count)]


def test_a_shard_serves_the_single_process_samples_at_its_positions():
    volumes = _volumes()
    single = SliceDataset(volumes, 2, 1, 32, SliceAugmenter(AugmentConfig()))
    single.set_epoch(seed=5, epoch=3, size=24, foreground_fraction=0.5)
    for rank in range(2):
        shard = SliceDataset(volumes, 2, 1, 32, SliceAugmenter(AugmentConfig()))
        shard.shard(rank, 2, global_batch=8, drop_last=True)
        shard.set_epoch(seed=5, epoch=3, size=24, foreground_fraction=0.5)
        assert len(shard) == 12
        for item, position in enumerate(shard_positions(24, rank, 2, 8, True)):
            ours, theirs = shard[item], single[int(position)]
            assert torch.equal(ours["image"], theirs["image"]) and torch.equal(ours["label"], theirs["label"])


# --------------------------------------------------------------------------- launch environment


def test_srun_variables_become_torchrun_variables():
    env = {"SLURM_PROCID": "5", "SLURM_LOCALID": "1", "SLURM_STEP_NUM_TASKS": "8", "SLURM_NTASKS": "8",
           "SLURM_STEP_NODELIST": "gpu[007-010,012],cpu1", "SLURM_JOB_ID": "123456"}
    assert slurm_environment(env) == {"RANK": "5", "LOCAL_RANK": "1", "WORLD_SIZE": "8",
                                      "MASTER_ADDR": "gpu007", "MASTER_PORT": str(15000 + 123456 % 20000)}
    given = slurm_environment({**env, "MASTER_ADDR": "head", "MASTER_PORT": "29400"})
    assert (given["MASTER_ADDR"], given["MASTER_PORT"]) == ("head", "29400")


def test_batch_scripts_single_tasks_and_torchrun_are_left_alone():
    batch_script = {"SLURM_PROCID": "0", "SLURM_NTASKS": "4", "SLURM_JOB_NODELIST": "n[1-2]"}  # no srun step
    assert slurm_environment(batch_script) == {}
    assert slurm_environment({**batch_script, "SLURM_STEP_NUM_TASKS": "1"}) == {}
    assert slurm_environment({**batch_script, "SLURM_STEP_NUM_TASKS": "4", "RANK": "0"}) == {}
    assert distributed.launch_world_size({}) == 1


def test_first_host_of_slurm_node_lists():
    assert first_host("node17") == "node17"
    assert first_host("a[3,5-7],b[1-2]") == "a3"
    assert first_host("rack[02-03]-gpu[10-11]") == "rack02-gpu10"
    assert first_host("x1,x2") == "x1"


# --------------------------------------------------------------------------- without a process group

TWO_CPU_RANKS = DistributedContext(rank=0, world_size=2, device=torch.device("cpu"))


def test_sync_batchnorm_on_cpu_is_a_config_error(phantom_root):
    model = build_model(config_from_dict(tiny_config(phantom_root)).model, 3, 3)[0]
    with pytest.raises(ConfigError, match="sync_batchnorm needs CUDA"):
        distributed.convert_sync_batchnorm(model, TWO_CPU_RANKS)
    assert distributed.convert_sync_batchnorm(model, distributed.SINGLE_PROCESS) is model


def test_global_batch_must_divide_between_ranks(phantom_root, tmp_path):
    config = config_from_dict(tiny_config(phantom_root, **{"training.batch_size": 7}))
    with pytest.raises(ConfigError, match="batch_size=7 is the global batch"):
        _open_session(config, tmp_path, False, TWO_CPU_RANKS)


def test_rank_devices():
    assert distributed.rank_device("cpu", 3) == torch.device("cpu")
    with pytest.raises(ConfigError, match="cuda:LOCAL_RANK"):
        distributed.rank_device("cuda:1", 0)


def test_single_process_validation_mean_is_numpy_mean():
    scores = [[0.5, 0.25], [0.75, 0.0], [0.1, 0.9]]
    assert mean_over_ranks(scores, 2, distributed.SINGLE_PROCESS) == np.mean(scores, axis=0).tolist()


# --------------------------------------------------------------------------- real torchrun launches


def torchrun(*args: str, cwd: Path, log_dir: Path | None = None, timeout: int = 600) -> subprocess.CompletedProcess:
    """``python -m torch.distributed.run --standalone --nproc-per-node 2 ARGS`` (gloo on CPU, one thread per rank)."""
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
    if log_dir is not None:
        command += ["--log-dir", str(log_dir), "--redirects", "3"]  # per-rank stdout.log / stderr.log
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    return subprocess.run(command + list(args), check=False, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


def _rank_log(log_dir: Path, rank: int, stream: str) -> str:
    (path,) = log_dir.rglob(f"attempt_0/{rank}/{stream}.log")
    return path.read_text()


EQUIVALENCE_DRIVER = r'''
"""Rank pair vs single process on the same global batches, with a BatchNorm-free net; rank 0 writes JSON."""
import json, sys
import numpy as np, torch
from monai.losses import DiceCELoss
from torch import nn
from torch.utils.data import DataLoader
from seg_transfer.config import AugmentConfig
from seg_transfer.data.augment import SliceAugmenter
from seg_transfer.data.cases import DatasetError
from seg_transfer.data.slices import SliceDataset
from seg_transfer.training import distributed
from seg_transfer.training.trainer import RunDirError, train_step
sys.path.insert(0, sys.argv[2])
from tests.test_distributed import _volumes

context = distributed.init_distributed("cpu")
cpu, loss_fn = torch.device("cpu"), DiceCELoss(to_onehot_y=True, softmax=True)

def net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 2, 1))

def samples(shard):
    dataset = SliceDataset(_volumes(), 2, 1, 32, SliceAugmenter(AugmentConfig()))
    if shard:
        dataset.shard(context.rank, context.world_size, global_batch=8, drop_last=True)
    return dataset

def run(model, dataset, batch_size, epochs=2):
    optimizer = torch.optim.SGD([p for p in model.parameters()], lr=0.5, momentum=0.9)
    losses = []
    for epoch in range(epochs):
        dataset.set_epoch(7, epoch, 24, 0.5)
        for batch in DataLoader(dataset, batch_size=batch_size):
            losses.append(train_step(model, loss_fn, optimizer, batch, cpu, grad_clip=1.0))
    return losses

reference = net()
reference_losses = run(reference, samples(shard=False), 8)
model = net()
rank_losses = run(distributed.wrap_model(model, context), samples(shard=True), 4)
distributed.check_ranks_agree(model, context)
moved = max((a - b).abs().max().item() for a, b in zip(net().parameters(), reference.parameters()))
difference = max((a - b).abs().max().item() for a, b in zip(model.parameters(), reference.parameters()))
losses = distributed.gather_objects(context, rank_losses)

def main_fails():
    raise DatasetError("bad case seen by rank 0")

def rank_one_fails():
    if context.rank == 1:
        raise RunDirError("rank 1 has no last.pt")
    return "fine"

caught = {}
for name, call, fn in (("main", distributed.run_on_main, main_fails), ("every", distributed.run_on_every_rank, rank_one_fails)):
    try:
        call(context, fn)
        caught[name] = None
    except Exception as exc:
        caught[name] = f"{type(exc).__name__}: {exc}"
caught = distributed.gather_objects(context, caught)
if context.is_main:
    json.dump({"moved": moved, "difference": difference, "reference_losses": reference_losses, "rank_losses": losses,
               "caught": caught}, open(sys.argv[1], "w"))
distributed.shutdown(context)
'''


def test_ddp_reproduces_single_process_training_without_batchnorm(tmp_path):
    """The sharding/batch/gradient design is exact: 2 ranks x 4 slices == 1 process x 8 slices, to 1e-6."""
    driver = tmp_path / "equivalence.py"
    driver.write_text(EQUIVALENCE_DRIVER)
    result = torchrun(str(driver), str(tmp_path / "out.json"), str(Path(__file__).parents[1]), cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    out = json.loads((tmp_path / "out.json").read_text())
    assert out["moved"] > 1e-2  # training changed the weights, so agreeing below means something
    assert out["difference"] < 1e-6
    assert len(out["reference_losses"]) == len(out["rank_losses"][0]) == len(out["rank_losses"][1]) == 6
    for reference, rank0, rank1 in zip(out["reference_losses"], *out["rank_losses"]):
        assert (rank0 + rank1) / 2 == pytest.approx(reference, abs=1e-6)  # per-rank means of 4 average to the mean of 8
    for rank in range(2):  # an error on one rank ends every rank with it (no rank left waiting)
        assert out["caught"][rank] == {"main": "DatasetError: bad case seen by rank 0",
                                       "every": "RunDirError: rank 1 has no last.pt"}


DECODER_STAGE = [{"name": "decoder", "train": "decoder", "epochs": 2, "lr": 3e-3}]


@pytest.fixture(scope="module")
def decoder_run(phantom_root, tmp_path_factory):
    """A decoder-only run, launched as users do: torchrun -m seg_transfer train (2 ranks, gloo).

    Foreground-weighted sampling makes the decoder predict some of both classes within 2 epochs, so
    the validation Dice it reports is not trivially zero. Trained with flips along in-plane axis 1, so the end
    of training also validates test-time augmentation across the ranks.
    """
    work = tmp_path_factory.mktemp("ddp_decoder")
    raw = tiny_config(phantom_root, **{"data.slices_per_epoch": 48, "data.foreground_fraction": 0.7,
                                       "data.augment.flip_axes": [1]})
    raw["training"]["stages"] = DECODER_STAGE
    (work / "run.yaml").write_text(yaml.safe_dump(raw))
    result = torchrun("-m", "seg_transfer", "train", "--config", "run.yaml", "--output", "run", cwd=work, log_dir=work / "logs")
    assert result.returncode == 0, result.stderr[-3000:]
    return work / "run", work / "logs", config_from_dict(raw)


def test_only_rank_zero_writes_and_logs(decoder_run, phantom_root, tmp_path):
    run_dir, logs, config = decoder_run
    files = sorted(str(p.relative_to(run_dir)) for p in run_dir.rglob("*") if p.is_file())
    events = [f for f in files if f.startswith("tensorboard/")]
    assert len(events) == 1  # one writer: rank 0
    assert sorted(set(files) - set(events)) == sorted([
        "checkpoints/best.pt", "checkpoints/last.pt", "config.yaml", "metrics.csv", "metrics.jsonl", "splits.json",
        "summary.json"])  # nothing else, no leftover temp files
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in records] == [1, 2] and [r["step"] for r in records] == [6, 12]  # 48 slices / batch 8
    assert json.loads((run_dir / "splits.json").read_text()) == prepare_data(config.data, tmp_path).splits
    assert "INFO seg_transfer.training.trainer: epoch 2/2 (decoder" in _rank_log(logs, 0, "stderr")
    assert " INFO " not in _rank_log(logs, 1, "stderr")


def test_decoder_stage_under_ddp_leaves_encoder_and_its_batchnorm_untouched(decoder_run):
    run_dir, _, config = decoder_run
    torch.manual_seed(config.seed)
    initial = build_model(config.model, 3, 3)[0].state_dict()
    trained = Checkpoint.load(run_dir / "checkpoints" / "last.pt").model
    assert trained.keys() == initial.keys()  # the bare model: no "module." prefix
    encoder = [k for k in trained if k.startswith("encoder.")]
    assert any(k.endswith("running_mean") for k in encoder)
    assert all(torch.equal(trained[k], initial[k]) for k in encoder)
    decoder = [k for k in trained if k.startswith("decoder.")]
    assert any(not torch.equal(trained[k], initial[k]) for k in decoder if k.endswith(".weight"))
    assert any(not torch.equal(trained[k], initial[k]) for k in decoder if k.endswith("running_mean"))


def test_sharded_validation_equals_validating_the_checkpoint_alone(decoder_run, one_thread):
    run_dir, _, config = decoder_run
    from seg_transfer.inference.predictor import load_model

    best = Checkpoint.load(run_dir)
    loaded = load_model(str(run_dir), torch.device("cpu"))
    data = prepare_data(config.data, run_dir)  # reads the run's splits.json
    volumes = volume_dataset(data.subset("val"), Preprocessing.from_config(config.data), config.data)
    assert len(volumes) == 2  # one validation volume per rank in the run
    inferer = loaded.network.inferer(InferenceOptions(batch_size=16, roi_size=None, max_batch_pixels=None))
    alone = np.mean(validation_scores(loaded.model, volumes, inferer, 3, torch.device("cpu")), axis=0).tolist()
    assert min(best.progress["best_per_class"]) > 0.0  # both classes partly found: a comparison that can fail
    assert alone == pytest.approx(best.progress["best_per_class"], abs=1e-9)
    # the test-time augmentation check after the last epoch, sharded the same way, equals it alone
    flipped = loaded.network.inferer(InferenceOptions(batch_size=16, roi_size=None, max_batch_pixels=None, tta=True))
    with_tta = float(np.mean(validation_scores(loaded.model, volumes, flipped, 3, torch.device("cpu"))))
    record = best.inference
    assert (record["val_dice"], record["val_dice_tta"]) == pytest.approx((float(np.mean(alone)), with_tta), abs=1e-9)
    assert record["tta"] == (with_tta > record["val_dice"]) and with_tta != pytest.approx(np.mean(alone), abs=1e-6)


def test_ddp_checkpoint_predicts_with_the_inference_api(decoder_run, phantom_root):
    run_dir, _, _ = decoder_run
    from seg_transfer.inference.cases import discover_cases
    from seg_transfer.inference.predictor import PredictOptions, load_model, predict_case

    loaded = load_model(str(run_dir), torch.device("cpu"))
    (case,) = discover_cases(phantom_root / "imagesTs")
    prediction = predict_case(loaded, case, PredictOptions(progress=False))
    assert prediction.labels.shape == (32, 32, 12)
    assert set(np.unique(prediction.labels).tolist()) <= {0, 1, 2}


# --------------------------------------------------------------------------- slow: learning and resume

LEARNING_STAGES = [{"name": "decoder", "train": "decoder", "epochs": 2, "lr": 1e-2},
                   {"name": "all", "train": "all", "epochs": 8, "lr": 3e-3}]


def _learning_config(root: Path) -> dict:
    """ImageNet encoder, decoder stage then all: learns to Dice ~0.5 in 10 short epochs on the phantoms."""
    raw = tiny_config(root, **{"model.encoder_weights": "imagenet"})
    raw["data"].update(slices_per_epoch=48, foreground_fraction=0.7)
    raw["data"]["augment"]["enabled"] = False
    raw["training"]["stages"] = LEARNING_STAGES
    return raw


@pytest.fixture(scope="module")
def learning_runs(phantom_root, tmp_path_factory):
    """The same staged config trained by torchrun (2 ranks x 4 slices) and by one process (8 slices)."""
    work = tmp_path_factory.mktemp("ddp_learning")
    raw = _learning_config(phantom_root)
    (work / "learn.yaml").write_text(yaml.safe_dump(raw))
    result = torchrun("-m", "seg_transfer", "train", "--config", "learn.yaml", "--output", "ddp", cwd=work)
    assert result.returncode == 0, result.stderr[-3000:]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        single = train(config_from_dict(raw), work / "single")
    finally:
        torch.set_num_threads(threads)
    return work, single


def _records(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.slow
def test_ddp_run_learns_like_the_single_process_run(learning_runs):
    """Both runs learn (Dice > 0.3) and end within 0.15 of each other.

    Not equal: the decoder's BatchNorm normalises with the statistics of each rank's 4 slices
    instead of 8, and from there the runs drift (measured: 0.571 DDP vs 0.486 single, 2 validation
    volumes). 0.15 is about twice that gap; a DDP bug (unsynchronised gradients, overlapping or
    missing shards) shows as a failure to learn or as diverged ranks, which the trainer itself
    checks after each stage.
    """
    work, single = learning_runs
    ddp, alone = _records(work / "ddp"), _records(work / "single")
    assert [r["stage"] for r in ddp] == [r["stage"] for r in alone] == ["decoder"] * 2 + ["all"] * 8
    assert [r["step"] for r in ddp] == [r["step"] for r in alone]  # same global batches per epoch
    ddp_best = max(r["val_dice"] for r in ddp)
    assert single.best_dice > 0.3 and ddp_best > 0.3
    assert abs(ddp_best - single.best_dice) < 0.15


INTERRUPT_DRIVER = r'''
"""torchrun this: train the config, and end every rank (as a kill would) once epoch N is checkpointed."""
import sys
from pathlib import Path
from seg_transfer.config import load_config
from seg_transfer.training import distributed, trainer

config_path, run_dir, stop_after = sys.argv[1], Path(sys.argv[2]), int(sys.argv[3])
original_save = trainer._save

def save_then_stop(session, progress, optimizer, scheduler, which):
    original_save(session, progress, optimizer, scheduler, which)
    if which == "last" and progress.epoch >= stop_after:
        distributed.barrier(session.dist)  # rank 0 has finished writing last.pt
        raise SystemExit(3)

trainer._save = save_then_stop
trainer.train(load_config(config_path), run_dir)
'''


@pytest.mark.slow
def test_ddp_resume_continues_to_the_same_weights(learning_runs):
    work, _ = learning_runs
    driver = work / "interrupt.py"
    driver.write_text(INTERRUPT_DRIVER)
    stopped = torchrun(str(driver), "learn.yaml", "resumed", "5", cwd=work)  # mid-way through the 'all' stage
    assert stopped.returncode != 0
    assert Checkpoint.load(work / "resumed" / "checkpoints" / "last.pt").progress["epoch"] == 5
    resumed = torchrun("-m", "seg_transfer", "train", "--config", "learn.yaml", "--output", "resumed", "--resume", cwd=work)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    straight = Checkpoint.load(work / "ddp" / "checkpoints" / "last.pt").model
    continued = Checkpoint.load(work / "resumed" / "checkpoints" / "last.pt").model
    assert all(torch.equal(straight[k], continued[k]) for k in straight)
    assert [r["epoch"] for r in _records(work / "resumed")] == list(range(1, 11))
    assert [r["val_dice"] for r in _records(work / "resumed")] == [r["val_dice"] for r in _records(work / "ddp")]
