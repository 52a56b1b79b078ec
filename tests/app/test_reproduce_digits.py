"""The real-image (digits) reproduction preset, the mixed-criterion arms and the Fig. 2 / Fig. 3 plots."""
import struct
from pathlib import Path

import pytest

from maskedkd_app import reproduce
from maskedkd_app.args import parse_args
from maskedkd_app.data import data_stats


def png_size(path):
    data = Path(path).read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    return struct.unpack(">II", data[16:24])


def test_digits_preset_trains_on_the_digits_without_flips_and_tells_the_teacher_their_statistics(tmp_path):
    p = reproduce.PRESETS["digits"]
    teacher = parse_args(reproduce.teacher_argv(p, device="cpu", root=tmp_path))
    arm = "MaskedKD mixed (half attention, half random), keep 0.5"
    student = parse_args(reproduce.arm_argv(arm, p=p, seed=2, device="cpu", out=tmp_path / "s",
                                                  teacher_path=tmp_path / "teacher.pth", mask_vis=None))
    for args in (teacher, student):
        assert args.data_set == "DIGITS" and args.hflip == 0.0 and args.aa == "" and args.input_size == 32
    mean, std = data_stats(student)
    assert 0.2 < mean[0] < 0.4  # the digits' own, not ImageNet's
    assert student.teacher_mean == list(mean) and student.teacher_std == list(std)
    assert student.mask_mode == "mixed" and student.keep_ratio == 0.5 and student.seed == 2
    assert student.distillation_tau == 1.0 and student.kd_reduction == "batchmean"
    assert teacher.model_kwargs["embed_dim"] == 96 and teacher.epochs == p["teacher_epochs"]
    # The procedural presets keep their own flags (and ImageNet statistics for a teacher trained here).
    gpu = parse_args(reproduce.arm_argv("full-teacher KD", p=reproduce.PRESETS["gpu"], seed=0, device="cpu",
                                              out=tmp_path / "g", teacher_path=tmp_path / "t.pth", mask_vis=None))
    assert gpu.data_set == "PROCEDURAL" and gpu.hflip == 0.5 and gpu.teacher_mean == [0.485, 0.456, 0.406]


@pytest.mark.parametrize("preset, report, out, fixes", [
    ("cpu", "results/procedural/REPRODUCTION.md", "output/reproduce", False),
    ("digits", "results/digits/REPRODUCTION_DIGITS.md", "output/reproduce_digits", True)])
def test_preset_defaults(preset, report, out, fixes, monkeypatch):
    seen = {}

    def fake_run(name, p, *, arms, root, **kwargs):
        seen.update(arms=list(arms), root=root)
        raise SystemExit(0)

    monkeypatch.setattr(reproduce, "run", fake_run)
    with pytest.raises(SystemExit):
        reproduce.main(["--preset", preset, "--jobs", "1"])
    assert str(seen["root"]) == out
    assert all(arm in seen["arms"] for arm in reproduce.DEFAULT_ARMS)
    assert all((arm in seen["arms"]) == fixes for arm in reproduce.FIX_ARMS)
    assert reproduce.PRESET_FILES[preset] == (report, out)


def test_fig3_and_fig2_plots(tmp_path):
    summary = {"results": {"no KD": [{"acc_per_epoch": [10.0, 30.0, 50.0]}, {"acc_per_epoch": [12.0, 35.0, 60.0]}],
                           "full KD": [{"acc_per_epoch": [11.0, 40.0, 70.0]}]}}
    assert png_size(reproduce.curves_plot(summary, tmp_path / "f3.png")) == (720, 450)
    analysis = {mode: {k: {"acc1": 90 * float(k)} for k in ("1.0", "0.5", "0.25")} for mode in ("attention", "mixed")}
    assert png_size(reproduce.keep_plot(analysis, tmp_path / "f2.png")) == (540, 360)
    assert reproduce.curves_plot({"results": {"no KD": [{}]}}, tmp_path / "none.png") is None
    assert reproduce.keep_plot(None, tmp_path / "none2.png") is None
    assert not (tmp_path / "none.png").exists()
