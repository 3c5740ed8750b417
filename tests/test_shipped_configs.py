"""The shipped study configs: valid, equal step budgets across arms, fixed test cases shared by all studies."""
from __future__ import annotations

from pathlib import Path

import pytest

from seg_transfer.config import load_config
from seg_transfer.study.arms import arm_config, check_equal_budgets
from seg_transfer.study.config import load_study_config
from tests.conftest import optimiser_steps

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
HIPPOCAMPUS = CONFIGS.parent.parent / "shared" / "data" / "Task04_Hippocampus"
STUDIES = {"ablation_hippocampus_n10.yaml": 240, "robustness_hippocampus_n10.yaml": 240,
           "robustness_hippocampus_n10_half.yaml": 120, "study_hippocampus.yaml": 240, "study_hippocampus_3d.yaml": 240,
           "encoder_choice_hippocampus_n10.yaml": 240, "inflation_hippocampus_3d_n10.yaml": 240,
           "budget_hippocampus_3d_n10.yaml": 960, "budget_hippocampus_n10.yaml": 1875,
           "ablation_stages_hippocampus_n10.yaml": 240, "study_hippocampus_3d_all_long.yaml": 2400,
           "ablation_unfreeze_hippocampus_n10.yaml": 240, "robustness_hippocampus_3d_n10.yaml": 240,
           "ablation_depth_hippocampus_n10.yaml": 240, "ablation_3d_depth_hippocampus_n10.yaml": 240,
           "ablation_scale_hippocampus_n10.yaml": 240, "budget_hippocampus_3d_all.yaml": 960,
           "ablation_3d_decoder_hippocampus_n10.yaml": 240, "staging_hippocampus_05mm.yaml": 240,
           "ablation_augment_hippocampus_n10.yaml": 240, "ablation_augment_hippocampus_n10_600.yaml": 600,
           "ablation_intensity_hippocampus_n10.yaml": 240, "ablation_augment_3d_hippocampus_n10.yaml": 240,
           "ablation_lr_loss_hippocampus_n10.yaml": 240, "ablation_scale3_hippocampus_n10.yaml": 240,
           "ablation_l2sp_hippocampus_n10.yaml": 240, "study_hippocampus_3d_default_budget.yaml": 960,
           "ablation_slices_hippocampus_n10.yaml": 240, "ablation_width_lr_hippocampus_n10.yaml": 240,
           "lr_double_600_hippocampus_n10.yaml": 600, "restoration_pretrain_hippocampus_n10.yaml": 240,
           "restoration_pretrain_600_hippocampus_n10.yaml": 600, "restoration_pretrain_3d_hippocampus_n10.yaml": 240,
           "restoration_decoder_hippocampus_n10.yaml": 240, "restoration_pretrain_3d_960_hippocampus_n10.yaml": 960}


def without_missing_weights(arm):
    """The arm, its encoder weights file replaced by ``none`` where that file is not made yet (the phantom
    encoder and the restoration-pretrained networks are made by README commands; a fresh clone has no
    ``runs/``), and with it ``decoder_from_weights``, which needs that file; budgets depend on neither."""
    weights = arm.set.get("model.encoder_weights")
    if weights in (None, "imagenet", "none") or Path(weights).is_file():
        return arm
    kept = {key: value for key, value in arm.set.items() if key != "model.decoder_from_weights"}
    return arm.model_copy(update={"set": {**kept, "model.encoder_weights": "none"}})


pytestmark = [pytest.mark.hippocampus,
              pytest.mark.skipif(not HIPPOCAMPUS.is_dir(), reason="needs ../shared/data/Task04_Hippocampus")]


@pytest.mark.parametrize("name, steps", STUDIES.items())
def test_every_arm_takes_the_stated_steps(name, steps, monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)  # data.root is relative to the config file: any working directory will do
    study = load_study_config(CONFIGS / name)
    configs = {arm.name: arm_config(study, without_missing_weights(arm), study.seeds[0], arm.name) for arm in study.arms}
    check_equal_budgets(configs)
    for config in configs.values():
        assert optimiser_steps(config) == steps
    assert len(study.seeds) >= 3 and study.split.model_dump() == {"test_fraction": 0.2, "val_fraction": 0.1, "seed": 0}


def test_the_self_training_study_compares_teacher_plus_student_steps_with_the_default_at_their_sum(monkeypatch, tmp_path):
    """configs/self_training_3d_hippocampus_n10.yaml: the student (960 steps, on the cases its 960-step teacher
    labelled) against the 3D default at 1920 steps, and the same from scratch; the students' patch size is the
    teachers' derived one, and the scratch student is a scratch network."""
    monkeypatch.chdir(tmp_path)
    from seg_transfer.study.plan import plan_runs

    study = load_study_config(CONFIGS / "self_training_3d_hippocampus_n10.yaml")
    _, specs = plan_runs(study, tmp_path / "study")
    steps = {spec.arm: optimiser_steps(spec.config) for spec in specs}
    assert steps == {"imagenet_3d": 960, "scratch_3d": 960, "self_trained_3d": 960, "self_trained_scratch_3d": 960,
                     "imagenet_3d_1920": 1920} and study.allow_unequal_budgets
    teachers = {"self_trained_3d": "imagenet_3d", "self_trained_scratch_3d": "scratch_3d"}
    for spec in specs:
        if spec.arm in teachers:
            assert spec.teacher_dir == tmp_path / "study" / "runs" / teachers[spec.arm] / f"n010_seed{spec.seed}"
            assert spec.config.data.pseudo_labelled.labels_dir == spec.teacher_dir / "unlabelled_predictions"
            assert spec.config.data.patch_size == (40, 56, 36)
            assert spec.config.model.pretrained == (spec.arm == "self_trained_3d")
    assert study.seeds == [3, 4, 5] and study.split.model_dump() == {"test_fraction": 0.2, "val_fraction": 0.1, "seed": 0}


def plan_beside(name: str, earlier_name: str, output: Path, earlier_output: Path):
    """(study ``name``, its planned runs, study ``earlier_name``, {(arm, seed): run config} of the earlier study's
    runs): a follow-up study's arms that repeat earlier ones must resolve to their configs to reproduce them."""
    from seg_transfer.study.plan import plan_runs

    study, earlier = load_study_config(CONFIGS / name), load_study_config(CONFIGS / earlier_name)
    configs = {(spec.arm, spec.seed): spec.config for spec in plan_runs(earlier, earlier_output)[1]}
    return study, plan_runs(study, output)[1], earlier, configs


def test_the_self_training_share_study_gives_the_student_half_its_patches_from_the_labelled_cases(monkeypatch, tmp_path):
    """configs/self_training_share_3d_hippocampus_n10.yaml: the first self-training study's teacher, student steps and
    1920-step control, with the student drawing half of every epoch from the pseudo-labelled scans; its teacher and
    control resolve to exactly the first study's configs (so that they reproduce its runs)."""
    monkeypatch.chdir(tmp_path)
    study, specs, first, earlier = plan_beside("self_training_share_3d_hippocampus_n10.yaml",
                                               "self_training_3d_hippocampus_n10.yaml", tmp_path / "study", tmp_path / "first")
    assert {spec.arm: optimiser_steps(spec.config) for spec in specs} == {
        "imagenet_3d": 960, "self_trained_half_3d": 960, "imagenet_3d_1920": 1920}
    for spec in specs:
        if spec.arm == "self_trained_half_3d":
            assert spec.config.data.pseudo_labelled.share == 0.5 and spec.config.data.patch_size == (40, 56, 36)
            assert spec.teacher_dir == tmp_path / "study" / "runs" / "imagenet_3d" / f"n010_seed{spec.seed}"
        else:
            assert spec.config == earlier[(spec.arm, spec.seed)]
    assert study.seeds == first.seeds == [3, 4, 5] and study.split == first.split


def test_the_from_teacher_study_continues_each_teacher_and_reuses_the_share_studys_runs(monkeypatch, tmp_path):
    """configs/self_training_from_teacher_3d_hippocampus_n10.yaml: the share study's three arms resolve to exactly
    its configs in the same output folder (so its runs are reused), and both new arms start from the teacher run of
    their seed, whole network, for 960 steps: teacher + student is the control's 1920."""
    monkeypatch.chdir(tmp_path)
    study, specs, share, earlier = plan_beside("self_training_from_teacher_3d_hippocampus_n10.yaml",
                                               "self_training_share_3d_hippocampus_n10.yaml", tmp_path / "study", tmp_path / "study")
    assert {spec.arm: optimiser_steps(spec.config) for spec in specs} == {
        "imagenet_3d": 960, "self_trained_half_3d": 960, "imagenet_3d_1920": 1920, "restarted_3d": 960,
        "self_trained_from_teacher_3d": 960}
    for spec in specs:
        teacher = tmp_path / "study" / "runs" / "imagenet_3d" / f"n010_seed{spec.seed}"
        if (spec.arm, spec.seed) in earlier:
            assert spec.config == earlier[(spec.arm, spec.seed)]
        else:
            model = spec.config.model
            assert (spec.start_dir, Path(model.encoder_weights), model.decoder_from_weights, model.head_from_weights) \
                == (teacher, teacher, True, True)
            pseudo = spec.config.data.pseudo_labelled
            assert (pseudo.share if pseudo else None) == (0.5 if spec.arm == "self_trained_from_teacher_3d" else None)
    assert study.seeds == share.seeds and study.split == share.split and study.control == "imagenet_3d_1920"


def test_the_five_case_self_training_study_differs_from_its_control_by_the_pseudo_labels_only(monkeypatch, tmp_path):
    """configs/self_training_3d_hippocampus_n5.yaml: the control and the student both continue the teacher run of their
    seed for 960 steps with the same recipe; the student's config differs from the control's in its pseudo-labelled
    scans (labelled by that teacher, half of every epoch) and its name, nothing else."""
    monkeypatch.chdir(tmp_path)
    from seg_transfer.study.plan import plan_runs

    specs = plan_runs(load_study_config(CONFIGS / "self_training_3d_hippocampus_n5.yaml"), tmp_path / "study")[1]
    assert {spec.arm: optimiser_steps(spec.config) for spec in specs} == {
        "imagenet_3d": 960, "restarted_3d": 960, "self_trained_from_teacher_3d": 960}
    by_run = {(spec.arm, spec.seed): spec for spec in specs}
    for seed in (3, 4, 5):
        teacher, control, student = (by_run[(arm, seed)] for arm in ("imagenet_3d", "restarted_3d",
                                                                      "self_trained_from_teacher_3d"))
        assert control.start_dir == student.start_dir == student.teacher_dir == teacher.run_dir
        assert len(teacher.splits["train"]) == 5 and teacher.splits == control.splits == student.splits
        plain = student.config.model_copy(update={"name": control.config.name, "data": student.config.data.model_copy(
            update={"pseudo_labelled": None})})
        assert plain == control.config and student.config.data.pseudo_labelled.share == 0.5


@pytest.mark.parametrize("follow_up, first_study, size", [
    ("self_training_3d_hippocampus_n5_more_seeds.yaml", "self_training_3d_hippocampus_n5.yaml", 5),
    ("self_training_3d_hippocampus_n3_more_seeds.yaml", "self_training_3d_hippocampus_n3.yaml", 3)])
def test_a_self_training_follow_up_adds_seeds_and_reuses_the_first_runs(monkeypatch, tmp_path, follow_up, first_study,
                                                                        size):
    """configs/self_training_3d_hippocampus_n{5,3}_more_seeds.yaml: the same three arms on seeds 3-7; in the first
    study's folder its seeds 3-5 resolve to exactly that study's configs (reused), seeds 6 and 7 are new subsets."""
    monkeypatch.chdir(tmp_path)
    study, specs, first, earlier = plan_beside(follow_up, first_study, tmp_path / "study", tmp_path / "study")
    assert study.seeds == [3, 4, 5, 6, 7] and study.arms == first.arms and study.split == first.split
    assert study.train_sizes == first.train_sizes == [size]
    assert {(spec.arm, spec.seed) for spec in specs} - set(earlier) == {
        (arm, seed) for arm in ("imagenet_3d", "restarted_3d", "self_trained_from_teacher_3d") for seed in (6, 7)}
    assert all(spec.config == earlier[(spec.arm, spec.seed)] for spec in specs if spec.seed < 6)
    new_subsets = {spec.seed: tuple(spec.splits["train"]) for spec in specs if spec.seed >= 6}
    assert len(set(new_subsets.values())) == 2 and all(len(train) == size for train in new_subsets.values())


def test_the_three_case_self_training_study_is_the_five_case_design_on_nested_three_case_subsets(monkeypatch, tmp_path):
    """configs/self_training_3d_hippocampus_n3.yaml: the five-case study's arms and split; each seed's 3 training cases
    are the first 3 of its 5 (subsets are nested per seed), and the student differs from its control only in its
    pseudo-labels."""
    monkeypatch.chdir(tmp_path)
    from seg_transfer.study.plan import plan_runs

    study, first = (load_study_config(CONFIGS / name) for name in ("self_training_3d_hippocampus_n3.yaml",
                                                                   "self_training_3d_hippocampus_n5.yaml"))
    assert study.arms == first.arms and study.split == first.split and study.seeds == first.seeds
    specs, five = plan_runs(study, tmp_path / "n3")[1], plan_runs(first, tmp_path / "n5")[1]
    for spec in specs:
        larger = next(s for s in five if (s.arm, s.seed) == (spec.arm, spec.seed))
        assert len(spec.splits["train"]) == 3 and set(spec.splits["train"]) < set(larger.splits["train"])
        assert spec.splits["val"] == larger.splits["val"] and spec.splits["test"] == larger.splits["test"]
    by_run = {(spec.arm, spec.seed): spec for spec in specs}
    control, student = by_run[("restarted_3d", 3)], by_run[("self_trained_from_teacher_3d", 3)]
    plain = student.config.model_copy(update={"name": control.config.name, "data": student.config.data.model_copy(
        update={"pseudo_labelled": None})})
    assert plain == control.config and optimiser_steps(student.config) == 960


def test_the_tta_label_study_reuses_the_five_case_runs_and_changes_only_the_teachers_labels(monkeypatch, tmp_path):
    """configs/self_training_tta_teacher_3d_hippocampus_n5.yaml: in the five-case study's folder its three arms resolve
    to exactly that study's configs (reused); the new student differs from the plain-label student in the folder its
    teacher's labels come from (the TTA one) and its name, nothing else."""
    monkeypatch.chdir(tmp_path)
    study, specs, first, earlier = plan_beside("self_training_tta_teacher_3d_hippocampus_n5.yaml",
                                               "self_training_3d_hippocampus_n5_more_seeds.yaml", tmp_path / "study",
                                               tmp_path / "study")
    assert study.arms[:3] == first.arms and study.seeds == first.seeds and study.split == first.split
    new = [spec for spec in specs if (spec.arm, spec.seed) not in earlier]
    assert {(spec.arm, spec.seed) for spec in new} == {("self_trained_tta_labels_3d", seed) for seed in first.seeds}
    assert all(spec.config == earlier[(spec.arm, spec.seed)] for spec in specs if spec not in new)
    for spec in new:
        plain = earlier[("self_trained_from_teacher_3d", spec.seed)]
        teacher = tmp_path / "study" / "runs" / "imagenet_3d" / f"n005_seed{spec.seed}"
        assert spec.teacher_tta and spec.teacher_dir == spec.start_dir == teacher
        assert spec.config.data.pseudo_labelled.labels_dir == teacher / "unlabelled_predictions_tta"
        same = spec.config.model_copy(update={"name": plain.name, "data": spec.config.data.model_copy(update={
            "pseudo_labelled": plain.data.pseudo_labelled})})
        assert same == plain


def test_the_scale_budget_study_gives_both_arms_about_the_same_wall_clock_not_the_same_steps(monkeypatch, tmp_path):
    """configs/budget_scale_hippocampus_n10.yaml compares at equal wall clock on purpose: a 0.5 mm step costs
    about 3x a 1 mm step, so the 0.5 mm arm takes 600 steps against 1875, with the same staged schedule."""
    monkeypatch.chdir(tmp_path)
    study = load_study_config(CONFIGS / "budget_scale_hippocampus_n10.yaml")
    configs = {arm.name: arm_config(study, arm, 0, arm.name) for arm in study.arms}
    steps = {name: optimiser_steps(config) for name, config in configs.items()}
    assert steps == {"imagenet_1875": 1875, "imagenet_x2_600": 600} and study.allow_unequal_budgets
    with pytest.raises(ValueError):
        check_equal_budgets(configs)
    assert tuple(configs["imagenet_x2_600"].data.spacing) == (0.5, 0.5, 1.0) and configs["imagenet_1875"].data.spacing is None
    assert [(s.name, s.epochs) for s in configs["imagenet_x2_600"].training.stages] == \
        [(s.name, s.epochs) for s in configs["imagenet_1875"].training.stages]


def test_the_scale3_budget_study_gives_the_0333mm_arms_600_steps_over_their_pixel_ratio(monkeypatch, tmp_path):
    """configs/budget_scale3_hippocampus_n10.yaml: 0.333 mm slices have 1.67x the pixels of 0.5 mm ones, so its
    0.333 mm arms take 360 steps against the default's 600, with the default's staged epochs, at equal steps
    with their own scratch network."""
    monkeypatch.chdir(tmp_path)
    study = load_study_config(CONFIGS / "budget_scale3_hippocampus_n10.yaml")
    configs = {arm.name: arm_config(study, arm, 0, arm.name) for arm in study.arms}
    steps = {name: optimiser_steps(config) for name, config in configs.items()}
    assert steps == {"imagenet": 600, "scratch": 600, "imagenet_x3_360": 360, "scratch_x3_360": 360}
    assert study.allow_unequal_budgets and study.arm("imagenet_x3_360").control == "imagenet"
    check_equal_budgets({name: configs[name] for name in ("imagenet_x3_360", "scratch_x3_360")})
    x3, default = configs["imagenet_x3_360"], configs["imagenet"]
    assert tuple(x3.data.spacing) == (0.333, 0.333, 1.0) and tuple(default.data.spacing) == (0.5, 0.5, 1.0)
    assert [(s.name, s.epochs) for s in x3.training.stages] == [(s.name, s.epochs) for s in default.training.stages]


def test_the_l2sp_row_pulls_only_the_imagenet_arms_encoders_toward_their_pretrained_weights(monkeypatch, tmp_path):
    """configs/ablation_l2sp_hippocampus_n10.yaml: pretrained_decay 10 / 100 in the stages that train the encoder;
    the default and the scratch control (random encoder: nothing to pull toward) keep 0."""
    monkeypatch.chdir(tmp_path)
    study = load_study_config(CONFIGS / "ablation_l2sp_hippocampus_n10.yaml")
    decay = {arm.name: [s.pretrained_decay for s in arm_config(study, arm, 0, arm.name).training.stages] for arm in study.arms}
    assert decay == {"imagenet": [0, 0, 0], "imagenet_l2sp10": [0, 10, 10], "imagenet_l2sp100": [0, 100, 100], "scratch": [0]}


def test_the_thin_decoder_wall_clock_study_gives_it_its_step_time_saving_in_extra_steps(monkeypatch, tmp_path):
    """configs/wallclock_3d_decoder_hippocampus_n10.yaml: the 8-channel full-resolution block is 16% faster per
    step, so it takes 288 steps (1.2x) against the 3D default's 240, with the same staged schedule."""
    monkeypatch.chdir(tmp_path)
    study = load_study_config(CONFIGS / "wallclock_3d_decoder_hippocampus_n10.yaml")
    configs = {arm.name: arm_config(study, arm, 0, arm.name) for arm in study.arms}
    steps = {name: optimiser_steps(config) for name, config in configs.items()}
    assert steps == {"imagenet_3d": 240, "imagenet_3d_dec8_x1.2": 288} and study.allow_unequal_budgets
    thin, default = configs["imagenet_3d_dec8_x1.2"], configs["imagenet_3d"]
    assert (list(thin.model.decoder_channels), list(default.model.decoder_channels)) == ([64, 32, 8], [64, 32, 16])
    assert [(s.name, s.epochs) for s in thin.training.stages] == [(s.name, s.epochs) for s in default.training.stages]


def test_the_2p5d_default_is_the_arm_that_won_at_equal_wall_clock_and_earlier_studies_stay_at_1mm(monkeypatch, tmp_path):
    """Since round 5 the shipped 2.5D configs resample to 0.5 mm in-plane with 600 steps (the budget-scale
    study's winning arm); the studies that ran at 1 mm pin it, so their recorded runs still match."""
    monkeypatch.chdir(tmp_path)
    study = load_study_config(CONFIGS / "budget_scale_hippocampus_n10.yaml")
    winner = arm_config(study, study.arm("imagenet_x2_600"), 0, "run")
    for name in ("hippocampus_2p5d_effnet_lite0.yaml", "hippocampus_2p5d_scratch.yaml"):
        shipped = load_config(CONFIGS / name)
        assert tuple(shipped.data.spacing) == tuple(winner.data.spacing) == (0.5, 0.5, 1.0)
        assert shipped.data.slices_per_epoch == winner.data.slices_per_epoch == 1280
    assert load_config(CONFIGS / "hippocampus_2p5d_effnet_lite0.yaml").training.stages == winner.training.stages
    for name, arm in [("study_hippocampus.yaml", "imagenet"), ("robustness_hippocampus_n10.yaml", "scratch"),
                      ("budget_hippocampus_n10.yaml", "imagenet_1875"), ("budget_scale_hippocampus_n10.yaml", "imagenet_1875")]:
        earlier = load_study_config(CONFIGS / name)
        assert arm_config(earlier, earlier.arm(arm), 0, "run").data.spacing is None


def test_default_recipe_is_what_the_ablation_chose(monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    study = load_study_config(CONFIGS / "study_hippocampus.yaml")
    config = arm_config(study, study.arm("imagenet"), 0, "imagenet")
    assert config.model.encoder_weights == "imagenet" and config.model.frozen_bn == "train"
    assert config.training.loss.batch_dice and [s.name for s in config.training.stages] == ["decoder", "top2", "all"]
    scratch = arm_config(study, study.arm("scratch"), 0, "scratch")
    assert scratch.model.encoder_weights == "none" and scratch.training.loss.batch_dice


@pytest.mark.parametrize("name", ["hippocampus_2p5d_effnet_lite0.yaml", "hippocampus_2p5d_scratch.yaml",
                                  "hippocampus_3d_effnet_lite0.yaml", "hippocampus_3d_scratch.yaml"])
def test_run_configs_find_the_data_from_any_working_directory(name, monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    assert load_config(CONFIGS / name).data.root == HIPPOCAMPUS.resolve()


def test_the_3d_study_mixes_routes_and_its_2p5d_arm_is_the_learning_curves_default(monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    study = load_study_config(CONFIGS / "study_hippocampus_3d.yaml")
    dims = {arm.name: arm_config(study, arm, 0, "run").model.dims for arm in study.arms}
    assert dims == {"imagenet_3d": "3d", "scratch_3d": "3d", "imagenet_2p5d": "2.5d"}
    curve = load_study_config(CONFIGS / "study_hippocampus.yaml")
    assert arm_config(study, study.arm("imagenet_2p5d"), 1, "run") == arm_config(curve, curve.arm("imagenet"), 1, "run")
    assert study.split == curve.split


def test_3d_default_keeps_z_in_its_first_downsampling_and_earlier_studies_stay_as_they_ran(monkeypatch, tmp_path):
    """The 3D default (and its scratch control) keep stride 1 along z in the first stage, as the inflation and
    budget studies chose; those two studies pin the earlier geometry so that their recorded runs still match."""
    monkeypatch.chdir(tmp_path)
    for name in ("hippocampus_3d_effnet_lite0.yaml", "hippocampus_3d_scratch.yaml"):
        assert load_config(CONFIGS / name).model.depth_stride_one_stages == 1
    main = load_study_config(CONFIGS / "study_hippocampus_3d.yaml")
    assert {arm_config(main, arm, 0, "r").model.depth_stride_one_stages
            for arm in main.arms if arm.name.endswith("_3d")} == {1}
    for name in ("inflation_hippocampus_3d_n10.yaml", "budget_hippocampus_3d_n10.yaml"):
        study = load_study_config(CONFIGS / name)
        strides = {arm.name: arm_config(study, arm, 0, "r").model.depth_stride_one_stages for arm in study.arms}
        assert {arm for arm, stride in strides.items() if stride == 1} == {a for a in strides if "zstride1" in a}


def test_the_3d_budget_study_compares_each_geometry_with_its_own_scratch_network(monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    study = load_study_config(CONFIGS / "budget_hippocampus_3d_n10.yaml")
    assert study.controls() == {"imagenet_3d_x4": "scratch_3d_x4", "imagenet_3d_zstride1_x4": "scratch_3d_zstride1_x4",
                                "scratch_3d_zstride1_x4": "scratch_3d_x4"}
    control = arm_config(study, study.arm("scratch_3d_zstride1_x4"), 0, "r")
    assert control.model.encoder_weights == "none" and control.model.depth_stride_one_stages == 1


def test_the_3d_default_is_the_960_step_network_the_budget_studies_measured(monkeypatch, tmp_path):
    """The shipped 3D config and its scratch control take 960 steps, and apart from the thread count they are the
    budget study's zstride1 arms (the README's 0.850 at 10 cases); the 240-step 3D studies pin their budget."""
    monkeypatch.chdir(tmp_path)
    study = load_study_config(CONFIGS / "budget_hippocampus_3d_n10.yaml")
    for shipped, arm in (("hippocampus_3d_effnet_lite0.yaml", "imagenet_3d_zstride1_x4"),
                         ("hippocampus_3d_scratch.yaml", "scratch_3d_zstride1_x4")):
        config = load_config(CONFIGS / shipped)
        measured = arm_config(study, study.arm(arm), 0, "r")
        assert optimiser_steps(config) == 960
        assert config.model == measured.model and config.data == measured.data
        assert config.training.model_copy(update={"num_threads": 1}) == measured.training
