"""LogME and ``seg-transfer rank-encoders``: synthetic checks, the exact evidence, pixel sampling, phantom end to end."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
import yaml
from scipy.stats import multivariate_normal

from seg_transfer.cli import main
from seg_transfer.config import ConfigError
from seg_transfer.selection.consistency import cc_fv, class_consistency
from seg_transfer.selection.gbc import VARIANCE_FLOOR, gbc
from seg_transfer.selection.logme import Spectrum, log_evidence, logme, maximise_evidence, project
from seg_transfer.selection.rank import parse_candidate, parse_strides, sample_pixels
from seg_transfer.selection.variety import feature_variety
from tests.conftest import tiny_config


def _blobs(rng: np.random.Generator, n: int = 300, d: int = 8, classes: int = 3):
    labels = rng.integers(0, classes, size=n)
    centres = rng.normal(scale=4.0, size=(classes, d))
    return centres[labels] + rng.normal(size=(n, d)), labels


def test_logme_prefers_separable_labels_and_informative_features():
    rng = np.random.default_rng(0)
    features, labels = _blobs(rng)
    separable = logme(features, labels)
    assert separable > logme(features, rng.permutation(labels))
    assert separable > logme(rng.normal(size=features.shape), labels)
    assert logme(features, labels) == separable  # deterministic


def test_logme_handles_fewer_samples_than_dimensions_and_one_hot_targets():
    rng = np.random.default_rng(1)
    features, labels = _blobs(rng, n=20, d=50)
    one_hot = (labels[:, None] == np.unique(labels)[None, :]).astype(float)
    assert math.isfinite(logme(features, labels))
    assert logme(features, labels) == pytest.approx(logme(features, one_hot))
    with pytest.raises(ValueError, match="20 feature rows but 19 labels"):
        logme(features, labels[:-1])


def test_gbc_is_near_zero_for_separated_classes_and_near_minus_pairs_for_identical_ones():
    rng = np.random.default_rng(2)
    features, labels = _blobs(rng, n=6000, d=20, classes=3)
    assert gbc(features * 10, labels) > -1e-3  # far apart: no overlap between any pair
    assert gbc(features, rng.permutation(labels)) == pytest.approx(-6.0, abs=0.1)  # 3 classes, 6 ordered pairs, BC ~ 1
    assert gbc(features, labels) > gbc(features, rng.permutation(labels))


def test_gbc_matches_the_closed_form_bhattacharyya_coefficient_in_one_dimension():
    """Two 1-D classes with sample means m0, m1 and variances v0, v1: D_B = (m0 - m1)^2 / (4 (v0 + v1))
    + 1/2 ln((v0 + v1) / (2 sqrt(v0 v1))), and GBC = -2 exp(-D_B)."""
    a, b = np.array([0.0, 1.0, 2.0, 3.0]), np.array([2.0, 4.0, 6.0])
    features, labels = np.concatenate([a, b])[:, None], np.array([0] * 4 + [1] * 3)
    v0, v1 = a.var() + VARIANCE_FLOOR, b.var() + VARIANCE_FLOOR
    distance = (a.mean() - b.mean()) ** 2 / (4 * (v0 + v1)) + 0.5 * np.log((v0 + v1) / (2 * np.sqrt(v0 * v1)))
    assert gbc(features, labels) == pytest.approx(-2 * np.exp(-distance), rel=1e-12)


def test_feature_variety_is_log_2_for_features_on_one_line_and_near_2t_for_random_directions():
    """Features along one line are, once centred, two opposite directions: half the pairs at distance 0, half at 2."""
    rng = np.random.default_rng(3)
    direction = rng.normal(size=16)
    collapsed = np.concatenate([np.outer(rng.uniform(1, 2, 200), direction), np.outer(-rng.uniform(1, 2, 200), direction)])
    assert feature_variety(collapsed) == pytest.approx(-np.log(0.5 + 0.5 * np.exp(-8.0)), abs=0.02)
    spread = rng.normal(size=(2000, 512))  # random directions in many dimensions are nearly orthogonal: ||a - b||^2 ~ 2
    assert feature_variety(spread) == pytest.approx(4.0, abs=0.05)
    assert feature_variety(spread[:, :2]) < feature_variety(spread[:, :8]) < feature_variety(spread)
    assert feature_variety(spread, max_rows=500) == feature_variety(spread, max_rows=500)  # seeded subsample


def test_feature_variety_matches_the_pairwise_definition():
    points = np.array([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0]])  # already centred: mean (0, 1/3) is removed first
    centred = points - points.mean(axis=0)
    unit = centred / np.linalg.norm(centred, axis=1, keepdims=True)
    pairs = [np.sum((unit[i] - unit[j]) ** 2) for i in range(3) for j in range(i + 1, 3)]
    assert feature_variety(points) == pytest.approx(-np.log(np.mean(np.exp(-2.0 * np.array(pairs)))), rel=1e-12)


def test_class_consistency_is_the_mean_wasserstein_distance_of_a_class_between_cases():
    """Two cases, one class, 1-D: after centring and unit length every row is +1 or -1. Case 0 holds four
    +1 rows and one -1 row (mean 0.6, sd 0.8), case 1 five +1 rows (mean 1, sd 0): W2 = sqrt(0.4^2 + 0.8^2)."""
    features = np.array([[1.0]] * 4 + [[-1.0]] + [[1.0]] * 5) + 5.0  # an offset the centring removes
    cases = np.repeat([0, 1], 5)
    assert list(np.sign(features[:, 0] - features[:, 0].mean())) == [1, 1, 1, 1, -1, 1, 1, 1, 1, 1]
    assert class_consistency(features, np.zeros(10, dtype=int), cases) == pytest.approx(-np.sqrt(0.8), rel=1e-12)


def test_class_consistency_prefers_features_where_a_class_looks_the_same_in_every_case():
    """Same class centres in every case (consistent) against a per-case shift of every feature (a scanner
    offset the features keep): the separability of classes within a case is identical in both."""
    rng = np.random.default_rng(4)
    centres = rng.normal(scale=3.0, size=(3, 16))
    labels = np.tile(np.repeat(np.arange(3), 40), 6)
    cases = np.repeat(np.arange(6), 120)
    consistent = centres[labels] + rng.normal(size=(labels.size, 16))
    shifted = consistent + rng.normal(scale=3.0, size=(6, 16))[cases]
    assert class_consistency(consistent, labels, cases) > class_consistency(shifted, labels, cases)
    assert cc_fv(consistent, labels, cases) == pytest.approx(class_consistency(consistent, labels, cases) + feature_variety(consistent))
    order = rng.permutation(labels.size)  # the order of the rows does not matter, only which case holds them
    assert class_consistency(consistent[order], labels[order], cases[order]) == pytest.approx(class_consistency(consistent, labels, cases))
    with pytest.raises(ValueError, match="at least two cases"):
        class_consistency(consistent, labels, np.zeros_like(cases))


def test_ranking_leaves_the_callers_thread_count(phantom_root, tmp_path, one_thread):
    """rank_encoders uses the run config's threads while it works (a study calls it between trainings)."""
    from seg_transfer.config import config_from_dict
    from seg_transfer.selection.rank import RankOptions, parse_candidates, rank_encoders

    raw = tiny_config(phantom_root)
    raw["training"]["num_threads"] = 2
    rank_encoders(config_from_dict(raw), parse_candidates("tu-tf_efficientnet_lite0:none"), tmp_path / "r", RankOptions(pixels=20))
    assert torch.get_num_threads() == 1


def test_unknown_score_is_a_one_line_error(config_file, tmp_path, capsys):
    code = main(["rank-encoders", "--config", str(config_file), "--candidates", "tu-tf_efficientnet_lite0:none",
                 "--scores", "hscore", "--output", str(tmp_path / "x")])
    assert code == 2
    assert "unknown transferability score 'hscore'; choose from logme, gbc, variety, cc, ccfv" in capsys.readouterr().err


def test_empty_score_list_is_a_one_line_error_not_the_routes_default(config_file, tmp_path, capsys):
    code = main(["rank-encoders", "--config", str(config_file), "--candidates", "tu-tf_efficientnet_lite0:none",
                 "--scores", ",", "--output", str(tmp_path / "x")])
    assert code == 2
    assert capsys.readouterr().err.strip().endswith("no transferability score given; choose from logme, gbc, variety, cc, ccfv")
    assert not (tmp_path / "x").exists()


@pytest.mark.parametrize("n, d", [(15, 3), (8, 12)])
def test_evidence_is_the_exact_marginal_likelihood(n, d):
    rng = np.random.default_rng(2)
    features = rng.normal(size=(n, d))
    target = features @ rng.normal(size=d) + 0.3 * rng.normal(size=n)
    spectrum, p = Spectrum.of(features), project(Spectrum.of(features), target)
    for alpha, beta in [(0.5, 2.0), (3.0, 7.0)]:
        covariance = features @ features.T / alpha + np.eye(n) / beta
        direct = multivariate_normal(np.zeros(n), covariance).logpdf(target)
        assert log_evidence(alpha, beta, spectrum, p) == pytest.approx(direct, rel=1e-9)


def test_fixed_point_matches_brute_force_maximum():
    rng = np.random.default_rng(3)
    features = rng.normal(size=(40, 4))
    target = features @ np.array([1.0, -0.5, 0.25, 0.0]) + 0.5 * rng.normal(size=40)
    spectrum = Spectrum.of(features)
    p = project(spectrum, target)
    alpha, beta, iterations = maximise_evidence(spectrum, p)
    assert iterations < 100
    grid = np.logspace(-3, 3, 241)
    brute = max(log_evidence(a, b, spectrum, p) for a in grid for b in grid)
    found = log_evidence(alpha, beta, spectrum, p)
    assert found >= brute - 1e-3 * abs(brute)
    assert found <= brute + 0.05  # the grid is fine enough to get within this of the maximum


def test_pixel_sampling_is_class_balanced_and_seeded():
    label = np.zeros((20, 20, 6), np.uint8)
    label[2:8, 2:8, 1:4] = 1
    label[10:12, 10:15, 2:5] = 2  # 30 voxels: caps nothing at 90 // 3
    first = sample_pixels(label, 90, np.random.default_rng([0, 0]))
    values, counts = np.unique(first.labels, return_counts=True)
    assert values.tolist() == [0, 1, 2] and counts.tolist() == [30, 30, 30]
    assert np.array_equal(label.reshape(-1)[first.flat], first.labels)
    assert np.array_equal(first.flat, sample_pixels(label, 90, np.random.default_rng([0, 0])).flat)
    assert not np.array_equal(first.flat, sample_pixels(label, 90, np.random.default_rng([1, 0])).flat)
    capped = sample_pixels(label, 300, np.random.default_rng(0))  # rarest class has 30 voxels
    assert np.unique(capped.labels, return_counts=True)[1].tolist() == [30, 30, 30]


def test_candidate_and_stride_parsing(tmp_path):
    assert parse_candidate("tu-tf_efficientnet_lite0:ImageNet").weights == "imagenet"
    weights = tmp_path / "w.pth"
    weights.write_bytes(b"")
    assert parse_candidate(f"tu-tf_efficientnet_lite0:{weights}").weights == str(weights)
    (tmp_path / "run" / "checkpoints").mkdir(parents=True)
    (tmp_path / "run" / "checkpoints" / "best.pt").write_bytes(b"")
    run_folder = parse_candidate(f"tu-tf_efficientnet_lite0:{tmp_path / 'run'}")  # a run of this project
    assert run_folder.weights == str(tmp_path / "run" / "checkpoints" / "best.pt")
    with pytest.raises(ConfigError, match="a folder without checkpoints/best.pt"):
        parse_candidate(f"tu-tf_efficientnet_lite0:{tmp_path}")
    for bad in ("tu-tf_efficientnet_lite0", "tu-tf_efficientnet_lite0:", "tu-tf_efficientnet_lite0:/no/such.pth",
                "tu-no_such_net:imagenet"):
        with pytest.raises(ConfigError, match="candidate"):
            parse_candidate(bad)
    assert parse_strides("4, 8,16") == (4, 8, 16)
    with pytest.raises(ConfigError, match=r"--strides '8,x': expected comma-separated positive integers"):
        parse_strides("8,x")


@pytest.fixture
def config_file(phantom_root, tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(tiny_config(phantom_root)))
    return path


def test_rank_encoders_cli_on_phantoms(config_file, tmp_path, one_thread, capsys):
    output = tmp_path / "ranking"
    candidates = "tu-tf_efficientnet_lite0:imagenet,tu-tf_efficientnet_lite0:none"
    code = main(["rank-encoders", "--config", str(config_file), "--candidates", candidates,
                 "--pixels", "50", "--strides", "8,16", "--scores", "logme,gbc", "--output", str(output)])
    assert code == 0
    payload = json.loads((output / "ranking.json").read_text())
    rows = payload["ranking"]
    assert {r["candidate"] for r in rows} == set(candidates.split(","))
    assert sorted((r["candidate"], r["stride"]) for r in rows) == sorted(
        (c, s) for c in candidates.split(",") for s in (8, 16))
    scores = [r["values"]["logme"] for r in rows]  # the first score orders the ranking
    assert all(math.isfinite(s) for s in scores) and scores == sorted(scores, reverse=True)
    assert all(r["values"]["gbc"] <= 0 for r in rows)
    assert [r["rank"] for r in rows] == [1, 2, 3, 4]
    assert {r["feature_dim"] for r in rows if r["stride"] == 8} == {40}
    assert len(set(payload["sampled_pixels_per_class"].values())) == 1  # the same count for every class
    assert (output / "ranking.md").read_text(encoding="utf-8").count("tu-tf_efficientnet_lite0:") == 4
    header = capsys.readouterr().out.splitlines()[0].split()
    assert header[2:4] == ["LogME", "GBC"]


def test_rank_encoders_cli_rejects_a_bad_candidate(config_file, tmp_path, capsys):
    code = main(["rank-encoders", "--config", str(config_file), "--candidates",
                 "tu-tf_efficientnet_lite0:imagenet,lite0-imagenet", "--output", str(tmp_path / "out")])
    assert code == 2
    err = capsys.readouterr().err.strip()
    assert "lite0-imagenet" in err and len(err.splitlines()) == 1
    assert not (tmp_path / "out").exists()


def test_inflation_candidates_parse():
    assert parse_candidate("tu-tf_efficientnet_lite0:imagenet:mean").inflation == "mean"
    assert parse_candidate("tu-tf_efficientnet_lite0:imagenet").inflation is None
    with pytest.raises(ConfigError, match="inflation must be one of centre, mean, acs"):
        parse_candidate("tu-tf_efficientnet_lite0:imagenet:sideways")


def test_3d_features_at_voxels_equal_the_upsampled_feature_map():
    """Trilinear reads at voxel centres = the stride-8 map upsampled (align_corners=False) to the padded
    volume, read at the voxels (the 2.5D rule, in 3D); odd sizes exercise the padding."""
    import torch
    import torch.nn.functional as nnf

    from seg_transfer.config import ModelConfig
    from seg_transfer.models.unet3d import build_unet3d
    from seg_transfer.selection.rank import PixelSample, volume_features

    torch.manual_seed(0)
    model = build_unet3d(ModelConfig(dims="3d", encoder="tu-tf_efficientnet_lite0", encoder_weights="none", encoder_depth=3,
                                     decoder_channels=[16, 8, 8]), 3, load_pretrained=False)[0]
    encoder = model.encoder.eval()
    image = np.random.default_rng(0).normal(size=(1, 19, 21, 13)).astype(np.float32)
    flat = np.sort(np.random.default_rng(1).choice(image[0].size, 40, replace=False))
    with torch.inference_mode():
        got = volume_features(encoder, image, PixelSample(flat, np.zeros(40, np.int64)), model.spatial_multiple(), [8],
                              torch.device("cpu"))[8]
        padded = np.full((1, 1, 24, 24, 16), image.min(), np.float32)
        padded[0, :, :19, :21, :13] = image
        level = next(f for f, s in zip(encoder(torch.from_numpy(padded)), encoder.feature_strides) if s[0] == 8)
        upsampled = nnf.interpolate(level, size=(24, 24, 16), mode="trilinear", align_corners=False)[0]
    x, y, z = np.unravel_index(flat, image.shape[1:])
    expected = upsampled[:, x, y, z].T.double().numpy()
    assert got.shape == (40, level.shape[1])
    np.testing.assert_allclose(got, expected, atol=1e-5)


def test_rank_encoders_ranks_3d_inflation_modes(phantom_root, tmp_path, one_thread):
    from tests.test_route_3d import tiny_3d

    config = tmp_path / "run3d.yaml"
    config.write_text(yaml.safe_dump(tiny_3d(phantom_root)))
    candidates = "tu-tf_efficientnet_lite0:imagenet:centre,tu-tf_efficientnet_lite0:imagenet:mean,tu-tf_efficientnet_lite0:none"
    assert main(["rank-encoders", "--config", str(config), "--candidates", candidates, "--pixels", "40",
                 "--strides", "4,8", "--scores", "logme", "--output", str(tmp_path / "out")]) == 0
    rows = json.loads((tmp_path / "out" / "ranking.json").read_text())["ranking"]
    by = {(r["candidate"], r["stride"]): r for r in rows}
    assert len(by) == 6 and all(math.isfinite(r["values"]["logme"]) for r in rows)
    assert {r["feature_dim"] for r in rows if r["stride"] == 8} == {40}
    centre, mean = (by[(f"tu-tf_efficientnet_lite0:imagenet:{m}", 8)]["values"]["logme"] for m in ("centre", "mean"))
    assert centre != mean  # the inflation mode reaches the encoder that is scored


@pytest.mark.parametrize("dims, score, stride", [("2.5d", "logme", 16), ("3d", "variety", 8)])
def test_rank_encoders_defaults_to_the_routes_measured_score_and_stride(dims, score, stride, phantom_root, tmp_path, one_thread):
    """Without --scores/--strides the ranking uses the route's choice from the README's encoder-choice studies."""
    from tests.test_route_3d import tiny_3d

    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump(tiny_3d(phantom_root) if dims == "3d" else tiny_config(phantom_root)))
    assert main(["rank-encoders", "--config", str(config), "--candidates", "tu-tf_efficientnet_lite0:none",
                 "--pixels", "20", "--output", str(tmp_path / "out")]) == 0
    payload = json.loads((tmp_path / "out" / "ranking.json").read_text())
    assert (payload["options"]["scores"], payload["options"]["strides"]) == ([score], [stride])
    assert [(list(r["values"]), r["stride"]) for r in payload["ranking"]] == [([score], stride)]
