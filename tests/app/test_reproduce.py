"""The reproduction script and --mask-vis at toy size: files, PNG sizes, counts that add up."""
import json
import struct

import pytest

from maskedkd_app import train
from maskedkd_app.args import parse_args
from maskedkd_app import reproduce, shipped_teacher
from maskedkd_app.maskvis import mask_grid_size


def png_size(path):
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR"
    return struct.unpack(">II", data[16:24])


def test_mask_vis_from_training_run(tmp_path):
    vis = tmp_path / "vis"
    argv = ["--data-set", "PROCEDURAL", "--procedural-train-size", "96", "--procedural-val-size", "32",
            "--input-size", "32", "--batch-size", "16", "--epochs", "2", "--num_workers", "0", "--device", "cpu",
            "--mixup", "0", "--cutmix", "0", "--no-model-ema", "--no-flops", "--warmup-epochs", "0",
            "--model", "deit_tiny_patch16_224", "--model-kwargs", "patch_size=8", "depth=2", "embed_dim=64",
            "num_heads=2", "--teacher-model", "deit_tiny_patch16_224", "--teacher-kwargs", "patch_size=4", "depth=2",
            "embed_dim=64", "num_heads=2", "--distillation-type", "soft", "--keep-ratio", "0.25",
            "--mask-vis", str(vis), "--output_dir", str(tmp_path / "out")]
    import timm
    import torch
    teacher = timm.create_model("deit_tiny_patch16_224", img_size=32, patch_size=4, depth=2, embed_dim=64,
                                num_heads=2, num_classes=10)
    torch.save({"model": teacher.state_dict()}, tmp_path / "t.pth")
    train.main(parse_args(argv + ["--teacher-path", str(tmp_path / "t.pth")]))
    for epoch in (0, 1):
        counts = json.loads((vis / f"keepfreq_epoch{epoch:03d}.json").read_text())
        images = 96 // 16 * 16
        assert counts["grid"] == [8, 8] and counts["images"] == images
        assert sum(counts["counts"]) == counts["total_kept"] == images * 16  # 16 of 64 teacher patches each
        assert png_size(vis / f"keepfreq_epoch{epoch:03d}.png") == (400, 400)
        assert png_size(vis / f"masks_epoch{epoch:03d}.png") == mask_grid_size(8)


def test_reproduce_writes_report(tmp_path):
    report = tmp_path / "R.md"
    arms = ["no KD", "MaskedKD attention, keep 0.5", "random mask, keep 0.25",
            "MaskedKD 0.5 with keep warm-up from 1.0"]
    # --jobs 1: the in-process path, whatever the machine's load (the parallel path has its own test below).
    small = ["--override", "train=64", "val=32", "student_epochs=2", "batch=32", "--analysis-images", "40",
             "--jobs", "1"]
    code = reproduce.main(["--seeds", "0", "--arms", *arms, "--output-dir", str(tmp_path / "run"),
                           "--report", str(report)] + small)
    assert code == 0
    text = report.read_text()
    for arm in arms:
        assert f"| {arm} |" in text
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["teacher"]["shipped"] and "python main_maskedkd.py" in text
    masked = summary["results"]["MaskedKD attention, keep 0.5"][0]
    assert 0 < masked["teacher_gflops"] and summary["results"]["no KD"][0]["teacher_gflops"] == 0
    assert len(masked["acc_per_epoch"]) == 2 and masked["acc_per_epoch"][-1] == masked["acc1"]
    warm = summary["results"]["MaskedKD 0.5 with keep warm-up from 1.0"][0]
    assert masked["teacher_gflops"] < warm["teacher_gflops"]          # epoch 0 ran the teacher on every patch
    assert (tmp_path / "run" / "masks" / "MaskedKD_attention_keep_05" / "seed0" / "keepfreq_epoch001.png").exists()
    # Fig. 2: the full teacher (keep 1.0) is the same model whatever the criterion; masking changes its output.
    fig2 = summary["masked_teacher"]
    assert fig2["random"]["1.0"]["acc1"] == fig2["attention"]["1.0"]["acc1"] == fig2["teacher"]["1.0"]["acc1"]
    assert fig2["attention"]["1.0"]["kl_from_full"] == pytest.approx(0.0, abs=1e-5)
    assert fig2["random"]["0.125"]["kl_from_full"] > 0
    assert "paper Fig. 2 left" in text and "paper Fig. 3" in text
    png = tmp_path / summary["figures"]["MaskedKD attention, keep 0.5, seed 0"]
    assert png.exists() and f"]({png.relative_to(tmp_path)})" in text
    # A second call reuses the finished runs instead of training again.
    before = (tmp_path / "run" / "runs.json").stat().st_mtime_ns
    reproduce.main(["--seeds", "0", "--arms", *arms, "--output-dir", str(tmp_path / "run"), "--report", str(report)]
                   + small)
    assert (tmp_path / "run" / "runs.json").stat().st_mtime_ns == before


def test_time_budget_leaves_the_rest_for_the_next_call(tmp_path):
    report = tmp_path / "R.md"
    argv = ["--seeds", "0", "1", "--arms", "no KD", "--output-dir", str(tmp_path / "run"), "--report", str(report),
            "--override", "train=64", "val=32", "student_epochs=1", "batch=32", "--analysis-images", "0", "--jobs", "1"]
    reproduce.main(argv + ["--max-minutes", "0"])   # a spent budget starts nothing
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["results"] == {} and summary["not_run"] == ["no KD | seed 0", "no KD | seed 1"]
    assert "**Not run**" in report.read_text()
    reproduce.main(argv)
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert [r["seed"] for r in summary["results"]["no KD"]] == [0, 1] and not summary["not_run"]


def test_parallel_jobs_record_every_run_once(tmp_path):
    # Two runs in two single-threaded child processes sharing one runs.json (locked read-modify-write).
    report = tmp_path / "R.md"
    argv = ["--seeds", "0", "1", "--arms", "no KD", "--output-dir", str(tmp_path / "run"), "--report", str(report),
            "--override", "train=64", "val=32", "student_epochs=1", "batch=32", "--analysis-images", "0",
            "--jobs", "2"]
    reproduce.main(argv + ["--max-minutes", "0"])   # the scheduler honours the budget too: nothing started
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["not_run"] == ["no KD | seed 0",
                                                                                     "no KD | seed 1"]
    assert reproduce.main(argv) == 0
    runs = json.loads((tmp_path / "run" / "runs.json").read_text())
    assert sorted(runs) == ["no KD | seed 0", "no KD | seed 1"]
    for seed in (0, 1):
        assert (tmp_path / "run" / "logs" / f"no_KD_seed{seed}.out").exists()
        assert len(runs[f"no KD | seed {seed}"]["acc_per_epoch"]) == 1
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert [r["seed"] for r in summary["results"]["no KD"]] == [0, 1] and summary["jobs"] == 2


def test_failed_parallel_run_is_named_and_the_others_kept(tmp_path, monkeypatch):
    # A child that cannot start (unknown arm passed through --run-one) fails; the error names it and its log.
    monkeypatch.setitem(reproduce.ARMS, "bogus arm", reproduce.ARMS["no KD"])
    argv = ["--seeds", "0", "--arms", "no KD", "bogus arm", "--output-dir", str(tmp_path / "run"),
            "--report", str(tmp_path / "R.md"), "--override", "train=64", "val=32", "student_epochs=1", "batch=32",
            "--analysis-images", "0", "--jobs", "2"]
    with pytest.raises(RuntimeError, match=r"bogus arm \| seed 0 \(exit 2; log .*bogus_arm_seed0.out"):
        reproduce.main(argv)
    assert list(json.loads((tmp_path / "run" / "runs.json").read_text())) == ["no KD | seed 0"]


def test_runs_from_another_teacher_or_preset_are_not_reported_as_this_one(tmp_path):
    argv = ["--seeds", "0", "--arms", "random mask, keep 0.5", "--output-dir", str(tmp_path / "run"),
            "--report", str(tmp_path / "R.md"), "--analysis-images", "0", "--no-mask-vis",
            "--override", "train=64", "val=32", "student_epochs=1", "batch=32"]
    reproduce.main(argv)
    runs_file = tmp_path / "run" / "runs.json"
    runs = json.loads(runs_file.read_text())
    record = runs["random mask, keep 0.5 | seed 0"]
    assert record["teacher_sha256"] == shipped_teacher.read_meta()["sha256"] and record["params"]["train"] == 64
    # The same directory with another preset value: refused, naming the entry and what differs.
    with pytest.raises(RuntimeError, match=r"random mask, keep 0.5 \| seed 0.*params differ"):
        reproduce.main(argv[:-2] + ["student_epochs=2", "batch=32"])
    # A record distilled from another teacher (e.g. before the shipped teacher was retrained): refused too.
    record["teacher_sha256"] = "0" * 64
    runs_file.write_text(json.dumps(runs))
    with pytest.raises(RuntimeError, match="teacher_sha256 differ"):
        reproduce.main(argv)


def test_label_noise_override_reaches_the_training_flags():
    p = dict(reproduce.PRESETS["cpu"], label_noise=0.2)
    argv = reproduce.arm_argv("no KD", p=p, seed=0, device="cpu", out=reproduce.Path("o"),
                              teacher_path=shipped_teacher.WEIGHTS, mask_vis=None)
    assert parse_args(argv).procedural_label_noise == 0.2
    p["label_noise"] = 0.0
    argv = reproduce.arm_argv("no KD", p=p, seed=0, device="cpu", out=reproduce.Path("o"),
                              teacher_path=shipped_teacher.WEIGHTS, mask_vis=None)
    assert parse_args(argv).procedural_label_noise == 0.0


@pytest.mark.parametrize("item, says", [("nope=1", "KEY one of"), ("lr=abc", "not a float"),
                                        ("teacher=x", "KEY one of"), ("lr", "KEY one of")])
def test_bad_override_is_a_usage_error_naming_the_keys(item, says, capsys):
    with pytest.raises(SystemExit) as exit_info:
        reproduce.main(["--override", item, "--output-dir", "/nonexistent/never-written"])
    assert exit_info.value.code == 2 and says in capsys.readouterr().err


@pytest.mark.parametrize("extra, analysis, added", [([], False, []), (["--analysis-arms"], True, []),
                                                    (["--add-arms", "ViTKD + full KD"], False, ["ViTKD + full KD"]),
                                                    (["--analysis-arms", "--add-arms", "ViTKD + full KD"], True,
                                                     ["ViTKD + full KD"])])
def test_analysis_arms_only_on_request(extra, analysis, added, tmp_path, monkeypatch):
    seen = {}

    def fake_run(preset, p, *, arms, **kwargs):
        seen["arms"] = list(arms)
        raise SystemExit(0)  # stop before training anything

    monkeypatch.setattr(reproduce, "run", fake_run)
    with pytest.raises(SystemExit):
        reproduce.main(["--output-dir", str(tmp_path / "o"), "--jobs", "1"] + extra)
    # The default leaves out the analysis arms and the dearest one; each flag brings back only what it names.
    expected = [arm for arm in reproduce.ARMS
                if (analysis or not arm.endswith("(analysis)")) and (arm != "ViTKD + full KD" or arm in added)
                and arm not in reproduce.FIX_ARMS]  # the cpu preset's default: the paper's arms only
    assert sorted(seen["arms"]) == sorted(expected) and len(seen["arms"]) == len(set(seen["arms"]))
    assert any(arm.endswith("(analysis)") for arm in reproduce.ARMS)  # the split is not vacuous


def test_a_preset_teacher_trains_on_clean_labels_while_its_student_gets_the_noise(tmp_path):
    p = dict(reproduce.PRESETS["gpu"], label_noise=0.2)
    teacher = parse_args(reproduce.teacher_argv(p, device="cpu", root=tmp_path))
    student = parse_args(reproduce.arm_argv("full-teacher KD", p=p, seed=0, device="cpu", out=tmp_path / "s",
                                            teacher_path=tmp_path / "teacher.pth", mask_vis=None))
    assert teacher.procedural_label_noise == 0.0 and student.procedural_label_noise == 0.2
    assert teacher.model_kwargs["embed_dim"] == 384 and teacher.epochs == p["teacher_epochs"]


def test_runs_recorded_before_a_preset_key_existed_are_read_with_its_old_value(tmp_path):
    # Records written before 'label_noise' existed lack the key; they were trained with clean labels.
    argv = ["--seeds", "0", "--arms", "no KD", "--output-dir", str(tmp_path / "run"), "--report",
            str(tmp_path / "R.md"), "--analysis-images", "0", "--no-mask-vis",
            "--override", "train=64", "val=32", "student_epochs=1", "batch=32", "label_noise=0"]
    reproduce.main(argv)
    runs_file = tmp_path / "run" / "runs.json"
    runs = json.loads(runs_file.read_text())
    record = runs["no KD | seed 0"]
    del record["params"]["label_noise"]
    runs_file.write_text(json.dumps(runs))
    reproduce.main(argv)  # reported, not refused
    assert json.loads(runs_file.read_text()) == runs  # nor retrained
    # The same old record under a call with wrong labels is another experiment: refused.
    with pytest.raises(RuntimeError, match=r"no KD \| seed 0.*params differ"):
        reproduce.main(argv[:-1] + ["label_noise=0.2"])
