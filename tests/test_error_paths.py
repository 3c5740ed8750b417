"""Error paths and the newcomer's first hour (issue 13): output paths, failed-run leftovers, fast ``--help``,
file-relative data paths, class names for ``evaluate``, quiet library warnings, error wording."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import yaml
import torch

from seg_transfer.atomic import OutputPathError, check_writable
from seg_transfer.cli import main
from seg_transfer.config import load_config
from tests.checkpoint_helpers import save_random_checkpoint
from tests.conftest import tiny_config

REPO = Path(__file__).resolve().parents[1]


def _one_line_error(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err and "Traceback" not in err, err
    return err


@pytest.fixture
def config_file(phantom_root, tmp_path) -> Path:
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(tiny_config(phantom_root)))
    return path


@pytest.fixture(scope="module")
def run_dir(phantom_root, tmp_path_factory) -> Path:
    return save_random_checkpoint(phantom_root, tmp_path_factory.mktemp("error_paths") / "run")


# ----------------------------------------------------------------------------- 1. output paths


def _file_and_below_file(tmp_path: Path) -> list[tuple[Path, str]]:
    existing = tmp_path / "taken.txt"
    existing.write_text("keep me")
    return [(existing, "is an existing file, not a folder"), (existing / "sub", f"{existing} is a file")]


def test_check_writable_names_the_path(tmp_path):
    folder = tmp_path / "out"
    folder.mkdir()
    with pytest.raises(OutputPathError, match=f"--output {folder}: is an existing folder, not a file"):
        check_writable(folder, folder=False)
    assert check_writable(tmp_path / "new" / "deeper", folder=True) == tmp_path / "new" / "deeper"
    assert not (tmp_path / "new").exists()  # nothing created


@pytest.mark.skipif(os.geteuid() == 0, reason="root may write anywhere")
def test_read_only_folder_is_refused(config_file, tmp_path, capsys):
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        assert main(["train", "--config", str(config_file), "--output", str(locked / "run")]) == 2
        assert f"no permission to write in {locked}" in _one_line_error(capsys)
    finally:
        locked.chmod(0o700)


def test_train_output_that_is_a_file(config_file, tmp_path, capsys):
    for output, cause in _file_and_below_file(tmp_path):
        assert main(["train", "--config", str(config_file), "--output", str(output)]) == 2
        err = _one_line_error(capsys)
        assert f"--output {output}:" in err and cause in err
    assert (tmp_path / "taken.txt").read_text() == "keep me"


def test_predict_output_that_is_a_file(run_dir, phantom_root, tmp_path, capsys):
    scan = str(phantom_root / "imagesTr" / "phantom_000.nii.gz")
    for output, cause in _file_and_below_file(tmp_path):
        assert main(["predict", "-m", str(run_dir), "-i", scan, "-o", str(output)]) == 2
        err = _one_line_error(capsys)
        assert f"--output {output}:" in err and cause in err
    assert (tmp_path / "taken.txt").read_text() == "keep me"


def test_export_checks_the_output_before_tracing(run_dir, tmp_path, capsys, monkeypatch):
    from seg_transfer.inference import export

    def no_work(*args, **kwargs):
        raise AssertionError("the checkpoint was loaded before the output path was checked")

    monkeypatch.setattr(export, "load_network", no_work)
    (tmp_path / "folder.onnx").mkdir()
    (tmp_path / "taken.txt").write_text("keep me")
    cases = [(tmp_path / "folder.onnx", "is an existing folder, not a file"),
             (tmp_path / "taken.txt" / "m.onnx", f"{tmp_path / 'taken.txt'} is a file")]
    for output, cause in cases:
        assert main(["export", "-m", str(run_dir), "-o", str(output)]) == 2
        err = _one_line_error(capsys)
        assert str(output) in err and cause in err


# ----------------------------------------------------------------------------- 2. failed runs leave no folder


def _bad_labels(root: Path, tmp_path: Path) -> Path:
    """A copy of ``root`` where one label map holds an unknown label (7)."""
    import shutil

    bad = tmp_path / "bad_data"
    shutil.copytree(root, bad)
    label_path = sorted((bad / "labelsTr").glob("*.nii.gz"))[0]
    image = nib.load(label_path)
    data = np.asarray(image.dataobj).copy()
    data[0, 0, 0] = 7
    nib.save(nib.Nifti1Image(data, image.affine), label_path)
    return bad


def test_failed_run_on_bad_data_leaves_no_run_folder(phantom_root, tmp_path, capsys):
    config = tmp_path / "bad.yaml"
    config.write_text(yaml.safe_dump(tiny_config(_bad_labels(phantom_root, tmp_path))))
    out = tmp_path / "runs" / "nested" / "run"
    assert main(["train", "--config", str(config), "--output", str(out)]) == 2
    assert "1 bad case(s)" in capsys.readouterr().err  # one line per bad case
    assert not (tmp_path / "runs").exists()  # the run folder and the parents this call made


def test_failed_run_after_writing_its_files_leaves_no_run_folder(config_file, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["train", "--config", str(config_file), "--output", str(out), "--set", "model.arch=Unett"]) == 2
    assert "unknown model.arch 'Unett'" in _one_line_error(capsys)
    assert not out.exists()


def test_failed_run_keeps_a_folder_that_existed(config_file, tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    assert main(["train", "--config", str(config_file), "--output", str(out), "--set", "model.arch=Unett"]) == 2
    _one_line_error(capsys)
    assert (out / "notes.txt").read_text() == "mine"


# ----------------------------------------------------------------------------- 3. fast --help


def test_help_imports_no_heavy_library():
    script = textwrap.dedent("""
        import contextlib, io, json, sys
        from seg_transfer.cli import main
        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            codes = [main(["--help"]), main(["train", "--help"]), main(["predict", "--help"])]
        heavy = [m for m in ("torch", "monai", "segmentation_models_pytorch", "timm", "SimpleITK") if m in sys.modules]
        print(json.dumps({"codes": codes, "heavy": heavy, "help": out.getvalue()}))
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=REPO, timeout=120)
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["codes"] == [0, 0, 0] and result["heavy"] == []
    assert "--resume" in result["help"] and "<bool>" not in result["help"]


# ----------------------------------------------------------------------------- 4. data.root relative to the file


def test_relative_data_root_resolves_against_the_config_folder(phantom_root, tmp_path, monkeypatch):
    (tmp_path / "data").symlink_to(phantom_root, target_is_directory=True)
    folder = tmp_path / "configs"
    folder.mkdir()
    path = folder / "run.yaml"
    path.write_text(yaml.safe_dump(tiny_config(Path("../data"))))
    elsewhere = tmp_path / "somewhere" / "else"  # ../data from here does not exist
    elsewhere.mkdir(parents=True)
    monkeypatch.chdir(elsewhere)
    assert load_config(path).data.root == (tmp_path / "data").resolve()
    # --set is what the user typed: relative to the working directory
    monkeypatch.chdir(tmp_path)
    assert load_config(path, ["data.root=data"]).data.root == (tmp_path / "data").resolve()


def test_relative_encoder_weights_file_resolves_against_the_config_folder(phantom_root, tmp_path, monkeypatch):
    """A weights file next to the config (``encoder_weights: ../weights/x.pth``) is found from any folder;
    the named weights ``imagenet``/``none`` are never taken for paths."""
    (tmp_path / "weights").mkdir()
    torch.save({}, tmp_path / "weights" / "enc.pth")
    folder = tmp_path / "configs"
    folder.mkdir()
    raw = tiny_config(phantom_root)
    raw["model"]["encoder_weights"] = "../weights/enc.pth"
    (folder / "run.yaml").write_text(yaml.safe_dump(raw))
    monkeypatch.chdir(phantom_root)
    assert load_config(folder / "run.yaml").model.encoder_weights == str((tmp_path / "weights" / "enc.pth").resolve())
    assert load_config(folder / "run.yaml", ["model.encoder_weights=none"]).model.encoder_weights == "none"


def test_working_directory_path_still_works_with_a_warning(phantom_root, tmp_path, monkeypatch, caplog):
    (tmp_path / "data").symlink_to(phantom_root, target_is_directory=True)
    folder = tmp_path / "configs"
    folder.mkdir()
    (folder / "run.yaml").write_text(yaml.safe_dump(tiny_config(Path("data"))))  # written relative to the cwd
    monkeypatch.chdir(tmp_path)
    assert load_config(folder / "run.yaml").data.root == (tmp_path / "data").resolve()
    assert "relative to its folder" in caplog.text and "write ../data" in caplog.text


# ----------------------------------------------------------------------------- 5. evaluate names the classes


def _eval_folders(tmp_path: Path, label_folder: str = "labels") -> tuple[Path, Path]:
    pred, ref = tmp_path / "pred", tmp_path / label_folder
    pred.mkdir()
    ref.mkdir()
    volume = np.zeros((8, 8, 4), dtype=np.uint8)
    volume[1:4, 1:4, 1:3], volume[5:7, 5:7, 1:3] = 1, 2
    for folder in (pred, ref):
        nib.save(nib.Nifti1Image(volume, np.eye(4)), str(folder / "case_a.nii.gz"))
    return pred, ref


def test_evaluate_takes_class_names_from_the_predict_summary(tmp_path, capsys):
    pred, ref = _eval_folders(tmp_path)
    (pred / "summary.json").write_text(json.dumps({"labels": {"0": "background", "1": "head", "2": "tail"}, "cases": []}))
    assert main(["evaluate", "--pred", str(pred), "--label", str(ref)]) == 0
    out = capsys.readouterr().out
    assert "head: Dice 1.0000" in out and "tail: Dice 1.0000" in out and "class_1" not in out


def test_evaluate_takes_class_names_from_the_dataset_json(tmp_path, capsys):
    pred, ref = _eval_folders(tmp_path, "labelsTr")
    (tmp_path / "dataset.json").write_text(json.dumps({"labels": {"0": "background", "1": "anterior", "2": "posterior"}}))
    assert main(["evaluate", "--pred", str(pred), "--label", str(ref)]) == 0
    assert "anterior: Dice" in capsys.readouterr().out


def test_evaluate_without_names_says_how_to_pass_them(tmp_path, capsys, caplog):
    pred, ref = _eval_folders(tmp_path)
    assert main(["evaluate", "--pred", str(pred), "--label", str(ref)]) == 0
    assert "class_1: Dice" in capsys.readouterr().out
    assert "pass --labels dataset.json" in caplog.text


# ----------------------------------------------------------------------------- 6. library warnings stay quiet


def test_junk_dicom_folder_gives_no_itk_warning(run_dir, tmp_path, capfd):
    junk = tmp_path / "junk"
    junk.mkdir()
    (junk / "a.dcm").write_bytes(np.random.default_rng(0).bytes(2000))
    assert main(["predict", "-m", str(run_dir), "-i", str(junk), "-o", str(tmp_path / "out")]) == 2
    err = capfd.readouterr().err
    assert f"error: {junk}: no volumes" in err
    assert "GDCMSeriesFileNames" not in err and "WARNING: In" not in err


def test_python_warnings_go_to_the_debug_log():
    script = textwrap.dedent("""
        import sys, types, warnings
        from seg_transfer.errors import UserError
        fake = types.ModuleType("seg_transfer.evaluation.evaluate")
        class EvaluationError(UserError, ValueError):
            pass
        def evaluate_folders(*args, **kwargs):
            warnings.warn("You are using `torch.load` with `weights_only=False`", FutureWarning)
            raise EvaluationError("stopped here")
        fake.EvaluationError, fake.evaluate_folders = EvaluationError, evaluate_folders
        sys.modules["seg_transfer.evaluation.evaluate"] = fake
        from seg_transfer.cli import main
        sys.exit(main(sys.argv[1:]))
    """)
    argv = [sys.executable, "-W", "default", "-c", script, "evaluate", "--pred", "p", "--label", "l"]
    quiet = subprocess.run(argv, capture_output=True, text=True, cwd=REPO, timeout=120)
    assert quiet.returncode == 2 and quiet.stderr.strip() == "error: stopped here"
    verbose = subprocess.run([*argv, "-v"], capture_output=True, text=True, cwd=REPO, timeout=120)
    assert "DEBUG py.warnings: FutureWarning: You are using `torch.load`" in verbose.stderr


# ----------------------------------------------------------------------------- 7. error wording


def test_empty_config_names_every_missing_key(tmp_path, capsys):
    path = tmp_path / "config.yaml"
    path.write_text("")
    assert main(["train", "--config", str(path)]) == 2
    assert _one_line_error(capsys) == f"error: {path}: missing required keys: data, training"


def test_bad_study_control_names_the_field_and_the_arms(tmp_path, capsys):
    path = tmp_path / "study.yaml"
    path.write_text(yaml.safe_dump({"base_config": "base.yaml", "control": "scrach", "train_sizes": [2],
                                    "arms": [{"name": "imagenet"}, {"name": "scratch", "scratch_control": True}]}))
    assert main(["compare", "--config", str(path), "--output", str(tmp_path / "out")]) == 2
    err = _one_line_error(capsys)
    assert err == f"error: {path}: 'control': 'scrach' is not an arm; the arms are imagenet, scratch"
    assert not (tmp_path / "out").exists()


# ----------------------------------------------------------------------------- 5. internal errors


def test_an_internal_error_is_one_line_with_the_traceback_in_a_file(monkeypatch, capsys):
    import seg_transfer.quickstart

    def broken(*_args, **_kwargs):
        return {}["missing key"]  # a bug, not a user error

    monkeypatch.setattr(seg_transfer.quickstart, "run_quickstart", broken)
    assert main(["quickstart"]) == 1
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and err.startswith("internal error: KeyError: 'missing key' (traceback in ")
    log = Path(err.split("traceback in ", 1)[1].split(";", 1)[0])
    assert "Traceback" in log.read_text() and "broken" in log.read_text()
    with pytest.raises(KeyError):
        main(["quickstart", "-v"])


def test_every_error_class_of_the_package_is_a_user_error():
    """One base class: every exception class the package defines derives from UserError (one line, exit 2)."""
    import importlib
    import inspect
    import pkgutil

    import seg_transfer
    from seg_transfer.errors import UserError

    classes = {}
    for module_info in pkgutil.walk_packages(seg_transfer.__path__, "seg_transfer."):
        if module_info.name.endswith("__main__"):
            continue
        module = importlib.import_module(module_info.name)
        classes.update({f"{module.__name__}.{name}": cls for name, cls in inspect.getmembers(module, inspect.isclass)
                        if issubclass(cls, Exception) and cls.__module__ == module.__name__})
    assert len(classes) >= 14
    assert [name for name, cls in classes.items() if not issubclass(cls, UserError)] == []


def test_one_line_names_the_type_the_root_cause_and_shortens_paths_and_length():
    from seg_transfer.errors import one_line

    path = Path("/data/images/case_007.nii.gz")
    try:
        try:
            raise OSError(f"{path}: unexpected end of file\nwhile reading the header")
        except OSError as inner:
            raise RuntimeError("applying transform <LoadImaged>") from inner
    except RuntimeError as outer:
        wrapped = outer
    assert one_line(wrapped) == "RuntimeError: applying transform <LoadImaged>"
    assert one_line(wrapped, root_cause=True, path=path) == "OSError: case_007.nii.gz: unexpected end of file"
    assert one_line(ValueError()) == "ValueError"
    long = one_line(ValueError("x" * 500), limit=40)
    assert len(long) == 40 and long.startswith("ValueError: xxx") and long.endswith("...")
