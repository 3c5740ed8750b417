"""SLURM and Kubernetes examples: valid shell and YAML, calling the CLI with options it really has.

Options are checked against the click command behind the typer app, so renaming a CLI option
without updating the examples fails here. The array script runs for real (one shard, on CPU).
"""
from __future__ import annotations

import os
import re
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import typer
import yaml

from seg_transfer.cli import app
from seg_transfer.config import RunConfig
from seg_transfer.inference.cases import discover_cases, shard
from tests.checkpoint_helpers import save_random_checkpoint
from tests.conftest import tiny_config

REPO = Path(__file__).resolve().parents[1]
SLURM = REPO / "examples" / "slurm"
TRAIN_SBATCH = SLURM / "train_multinode.sbatch"
PREDICT_SBATCH = SLURM / "predict_array.sbatch"
K8S_JOB = REPO / "examples" / "k8s" / "train-job.yaml"
#: an option word, also inside ``${VAR:+--option}``
OPTION = re.compile(r"(?:(?<!\S)|(?<=:\+))(--?[a-zA-Z][\w-]*)")
CLI_CALL = re.compile(r"(?:\bseg-transfer|-m\s+seg_transfer)\s+([a-z][a-z-]*)(.*)")


def cli_options() -> dict[str, set[str]]:
    """Every CLI command with the option names it accepts (long and short forms)."""
    group = typer.main.get_command(app)
    return {name: {opt for param in command.params for opt in (*param.opts, *param.secondary_opts)}
            for name, command in group.commands.items()}


def script_lines(text: str) -> list[str]:
    """Logical lines: continuations joined; commented-out command lines (alternatives) included without ``#``."""
    lines, pending = [], ""
    for raw in text.splitlines():
        line = raw.strip()
        if line.startswith("#SBATCH") or line.startswith("#!"):
            continue
        line = line.lstrip("#").strip()
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        lines.append(pending + line)
        pending = ""
    return lines


def cli_calls(text: str) -> list[tuple[str, list[str]]]:
    """``(command, option names)`` for each seg-transfer / ``-m seg_transfer`` call in a script."""
    calls = []
    for line in script_lines(text):
        match = CLI_CALL.search(line)
        if match and not line.startswith(("sbatch ", "kubectl ")):
            calls.append((match.group(1), re.findall(OPTION, match.group(2))))
    return calls


def sbatch_directives(text: str) -> list[str]:
    return [line.split(None, 1)[1] for line in text.splitlines() if line.startswith("#SBATCH ")]


# --------------------------------------------------------------------------- SLURM


@pytest.mark.parametrize("script", [TRAIN_SBATCH, PREDICT_SBATCH], ids=lambda p: p.name)
def test_sbatch_script_is_valid_bash(script):
    done = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr


@pytest.mark.parametrize("script", [TRAIN_SBATCH, PREDICT_SBATCH], ids=lambda p: p.name)
def test_sbatch_directives_come_before_the_first_command(script):
    lines = script.read_text().splitlines()
    assert sbatch_directives(script.read_text()), "no #SBATCH lines"
    first_command = next(i for i, line in enumerate(lines) if line.strip() and not line.startswith("#"))
    late = [line for line in lines[first_command:] if line.startswith("#SBATCH")]
    assert not late, f"sbatch ignores directives after the first command: {late}"


@pytest.mark.parametrize("script", [TRAIN_SBATCH, PREDICT_SBATCH], ids=lambda p: p.name)
def test_cli_calls_use_existing_commands_and_options(script):
    calls = cli_calls(script.read_text())
    assert calls, "the script never calls seg-transfer"
    known = cli_options()
    for command, options in calls:
        assert command in known, f"{script.name}: no CLI command {command!r}"
        unknown = set(options) - known[command]
        assert not unknown, f"{script.name}: seg-transfer {command} has no option(s) {sorted(unknown)}"


def test_option_extraction_sees_what_the_scripts_pass():
    calls = cli_calls("srun torchrun --nnodes 2 -m seg_transfer train --config c.yaml \\\n  --output r ${R:+--resume}\n"
                      "# seg-transfer predict -m x --part-id 1\n")
    assert calls == [("train", ["--config", "--output", "--resume"]), ("predict", ["-m", "--part-id"])]


def test_multinode_training_runs_torchrun_under_srun_with_valid_options():
    from torch.distributed.run import get_args_parser

    text = TRAIN_SBATCH.read_text()
    assert re.search(r"--nodes=\d+", " ".join(sbatch_directives(text)))
    launch = next(line for line in script_lines(text) if line.startswith("srun ") and "torchrun" in line)
    torchrun_args = launch.split("torchrun", 1)[1].split("-m seg_transfer", 1)[0]
    used = set(re.findall(r"(?<!\S)(--[a-z][\w-]*)", torchrun_args))
    valid = {opt for action in get_args_parser()._actions for opt in action.option_strings}
    assert used <= valid, f"torchrun has no option(s) {sorted(used - valid)}"
    assert {"--nnodes", "--nproc-per-node", "--rdzv-backend", "--rdzv-endpoint"} <= used
    assert "--rdzv-backend c10d" in launch and '"$SLURM_NNODES"' in launch and ":29500" in launch
    assert ("train", ["--config", "--output", "--resume"]) in cli_calls(text)


def test_predict_array_shards_by_array_task():
    text = PREDICT_SBATCH.read_text()
    assert any(d.startswith("--array=0-") for d in sbatch_directives(text))
    call = next(line for line in script_lines(text) if line.startswith("seg-transfer predict"))
    assert '--num-parts "$SLURM_ARRAY_TASK_COUNT"' in call and '--part-id "$SLURM_ARRAY_TASK_ID"' in call
    assert "--continue" in call.split()


def _array_env(task_id: int, count: int) -> dict[str, str]:
    return {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}", "DEVICE": "cpu",
            "SLURM_ARRAY_TASK_ID": str(task_id), "SLURM_ARRAY_TASK_COUNT": str(count),
            "SLURM_ARRAY_TASK_MIN": "0", "SLURM_ARRAY_TASK_MAX": str(count - 1)}


def test_predict_array_task_predicts_exactly_its_shard(phantom_root, tmp_path):
    run = save_random_checkpoint(phantom_root, tmp_path / "run")
    images, out = phantom_root / "imagesTr", tmp_path / "preds"
    done = subprocess.run(["bash", str(PREDICT_SBATCH), str(run), str(images), str(out)], env=_array_env(1, 2),
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    expected = {f"{case.name}.nii.gz" for case in shard(discover_cases(images), 2, 1)}
    assert len(expected) == 3
    assert {p.name for p in out.glob("*.nii.gz")} == expected
    assert (out / "summary.part1of2.csv").is_file()


def test_predict_array_refuses_a_one_based_array(tmp_path):
    env = {**_array_env(1, 2), "SLURM_ARRAY_TASK_MIN": "1", "SLURM_ARRAY_TASK_MAX": "2"}
    done = subprocess.run(["bash", str(PREDICT_SBATCH), "run", "in", str(tmp_path / "out")], env=env,
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 2 and "--array=0-7" in done.stderr
    assert not (tmp_path / "out").exists()


def _stub(folder: Path, name: str, body: str) -> None:
    path = folder / name
    path.write_text(f"#!/usr/bin/env bash\n{body}\n")
    path.chmod(path.stat().st_mode | stat.S_IEXEC)


@pytest.mark.slow
def test_multinode_script_trains_on_one_node_through_torchrun(phantom_root, tmp_path):
    """srun and scontrol are stand-ins (no SLURM here); torchrun and the training are real (1 node, 1 process)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    _stub(bin_dir, "scontrol", "echo localhost")
    _stub(bin_dir, "srun", 'while [[ $1 == --* ]]; do shift; done; exec "$@"')
    raw = tiny_config(phantom_root)
    raw["training"]["stages"] = [{"name": "all", "train": "all", "epochs": 1, "lr": 3e-3}]
    config = tmp_path / "tiny.yaml"
    config.write_text(yaml.safe_dump(raw))
    env = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
           "SLURM_NNODES": "1", "SLURM_JOB_ID": "1", "SLURM_JOB_NODELIST": "localhost", "SLURM_GPUS_ON_NODE": "1",
           "SLURM_CPUS_PER_TASK": "2"}
    done = subprocess.run(["bash", str(TRAIN_SBATCH), str(config), str(tmp_path / "run")], env=env,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert (tmp_path / "run" / "checkpoints" / "best.pt").is_file()


# --------------------------------------------------------------------------- Kubernetes


@pytest.fixture(scope="module")
def job() -> dict:
    documents = [d for d in yaml.safe_load_all(K8S_JOB.read_text()) if d]
    assert len(documents) == 1
    return documents[0]


def test_k8s_manifest_is_a_batch_v1_job(job):
    assert (job["apiVersion"], job["kind"]) == ("batch/v1", "Job")
    pod = job["spec"]["template"]["spec"]
    assert pod["restartPolicy"] in ("Never", "OnFailure")
    assert pod["securityContext"]["runAsNonRoot"] is True and pod["securityContext"]["runAsUser"] != 0


def test_k8s_container_runs_a_cli_command_with_existing_options(job):
    (container,) = job["spec"]["template"]["spec"]["containers"]
    assert container["image"] and "command" not in container, "the image's ENTRYPOINT (seg-transfer) runs the args"
    command, *rest = container["args"]
    known = cli_options()
    assert command == "train" and command in known
    options = [arg for arg in rest if arg.startswith("-")]
    assert options and set(options) <= known[command], f"unknown options {sorted(set(options) - known[command])}"
    assert "--config" in options and "--output" in options


def test_k8s_config_is_baked_into_the_image_and_overrides_name_config_keys(job):
    (container,) = job["spec"]["template"]["spec"]["containers"]
    args = container["args"]
    config = args[args.index("--config") + 1]
    assert config.startswith("/opt/seg_transfer/configs/"), "the Dockerfile copies configs/ to /opt/seg_transfer/configs"
    assert (REPO / "configs" / Path(config).name).is_file()
    overrides = [args[i + 1] for i, arg in enumerate(args) if arg == "--set"]
    assert overrides
    for override in overrides:
        section, key = override.split("=", 1)[0].split(".", 1)
        assert key in RunConfig.model_fields[section].annotation.model_fields, override


def test_k8s_pod_has_a_gpu_shared_memory_and_data_and_runs_volumes(job):
    pod = job["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    assert int(container["resources"]["limits"]["nvidia.com/gpu"]) >= 1
    volumes = {volume["name"]: volume for volume in pod["volumes"]}
    mounts = {mount["mountPath"]: mount["name"] for mount in container["volumeMounts"]}
    assert volumes[mounts["/dev/shm"]]["emptyDir"]["medium"] == "Memory"
    assert "claimName" in volumes[mounts["/data"]]["persistentVolumeClaim"]
    assert "claimName" in volumes[mounts["/runs"]]["persistentVolumeClaim"]
    args = container["args"]
    assert args[args.index("--output") + 1].startswith("/runs/")
