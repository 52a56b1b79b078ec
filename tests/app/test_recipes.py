"""The one recipe (maskedkd_app/recipes.py) behind the demo and the reproduction: what it trains; both use it."""
from pathlib import Path

import pytest

from maskedkd_app import demo, recipes, reproduce, shipped_teacher
from maskedkd_app.args import parse_args


def test_cpu_preset_is_the_one_the_finished_runs_recorded():
    # runs.json stores each finished run's preset; a run is reported again only while the preset is equal to it.
    # These are the values of the runs REPRODUCTION.md reports.
    recorded = {"img": 32, "patch": 4, "train": 5000, "val": 1000, "batch": 64, "student_epochs": 30, "workers": 0,
                "lr": 1e-3, "warmup": 0, "tau": 1.0, "label_noise": 0.2, "teacher": "shipped",
                "student": ["deit_tiny_patch16_224", "embed_dim=64", "depth=3", "num_heads=2"]}
    assert reproduce.PRESETS["cpu"] == recorded


def test_a_masked_arm_trains_what_the_recipe_says(tmp_path):
    # Interrupted runs resume only with the flags their checkpoint recorded: the recipe's meaning, spelled out.
    argv = reproduce.arm_argv("MaskedKD attention, keep 0.5", p=reproduce.PRESETS["cpu"], seed=2, device="cpu",
                              out=tmp_path / "run", teacher_path=shipped_teacher.WEIGHTS, mask_vis=None)
    args = parse_args(argv)
    info = shipped_teacher.read_meta()
    expected = {
        "data_set": "PROCEDURAL", "input_size": 32, "batch_size": 64, "procedural_train_size": 5000,
        "procedural_val_size": 1000, "procedural_label_noise": 0.2, "num_workers": 0, "epochs": 30, "seed": 2,
        "model": "deit_tiny_patch16_224", "mixup": 0.0, "cutmix": 0.0, "reprob": 0.0, "smoothing": 0.0,
        "drop_path": 0.0, "model_ema": False, "repeated_aug": False, "unscale_lr": True, "lr": 1e-3,
        "warmup_epochs": 0, "cooldown_epochs": 0, "distillation_type": "soft", "distillation_alpha": 0.5,
        "distillation_tau": 1.0, "kd_reduction": "batchmean", "mask_mode": "attention", "keep_ratio": 0.5,
        "teacher_model": info["model"], "teacher_path": str(shipped_teacher.WEIGHTS), "teacher_mean": info["mean"],
        "teacher_std": info["std"], "output_dir": str(tmp_path / "run"), "feature_kd": "none", "keep_schedule": "none"}
    assert {key: getattr(args, key) for key in expected} == expected
    assert {k: int(v) for k, v in args.model_kwargs.items()} == {"patch_size": 4, "embed_dim": 64, "depth": 3,
                                                                 "num_heads": 2}
    assert {k: int(v) for k, v in args.teacher_kwargs.items()} == info["model_kwargs"]
    no_kd = parse_args(reproduce.arm_argv("no KD", p=reproduce.PRESETS["cpu"], seed=2, device="cpu",
                                          out=tmp_path / "run", teacher_path=shipped_teacher.WEIGHTS))
    assert no_kd.distillation_type == "none" and no_kd.teacher_path == ""


@pytest.mark.parametrize("arm", list(demo.ARMS))
def test_each_demo_arm_is_the_reproduction_arm_it_names(arm, tmp_path):
    cfg = {"train_size": 300, "val_size": 100, "epochs": 4}
    shown = parse_args(demo.demo_argv(arm, out=tmp_path, device="cpu", seed=5, cfg=cfg))
    # The reproduction's cpu preset with clean labels and the demo's sizes: the same run, flag for flag.
    p = dict(reproduce.PRESETS["cpu"], label_noise=0.0, train=300, val=100, student_epochs=4)
    same = parse_args(reproduce.arm_argv(demo.ARMS[arm], p=p, seed=5, device="cpu", out=tmp_path / demo.arm_dir(arm),
                                         teacher_path=shipped_teacher.WEIGHTS, mask_vis=None))
    assert vars(shown) == vars(same)
    assert shown.procedural_train_size == 300 and shown.epochs == 4 and shown.procedural_label_noise == 0.0
    # And each demo arm is what its name in the table says.
    distils, masks = {"MaskedKD, keep 0.5": (True, True), "no teacher": (False, False),
                      "full teacher": (True, False)}[arm]
    assert (shown.distillation_type == "soft") == distils and (shown.distillation_type == "none") != distils
    assert (shown.mask_mode == "attention" and shown.keep_ratio == 0.5) == masks
    if distils and not masks:
        assert shown.keep_ratio == 1.0


def test_recipe_arms_are_the_reproductions_and_the_demos():
    assert reproduce.ARMS is recipes.ARMS
    assert set(demo.ARMS.values()) <= set(recipes.ARMS)
    assert all(isinstance(arm, recipes.Arm) for arm in recipes.ARMS.values())


def test_a_setup_with_its_own_teacher_passes_the_pipelines_statistics(tmp_path):
    p = reproduce.PRESETS["gpu"]
    args = parse_args(recipes.arm_argv("full-teacher KD", p=p, seed=0, device="cpu", out=tmp_path,
                                       teacher_path=Path("t.pth")))
    assert args.teacher_model == p["teacher"][0] and args.teacher_path == "t.pth"
    assert args.teacher_mean == pytest.approx([0.485, 0.456, 0.406]) and args.model_kwargs["embed_dim"] == 192
