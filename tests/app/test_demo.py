"""The demo's pieces at toy size: teacher trained then cached, student distilled with masking, summary printed."""
import json

import main_maskedkd

TOY = {"train_size": 128, "val_size": 64, "teacher_epochs": 1, "student_epochs": 1}


def test_demo_end_to_end_and_cached_teacher(tmp_path, capsys):
    parser = main_maskedkd.argparse.ArgumentParser(parents=[main_maskedkd.get_args_parser()])
    args = parser.parse_args(["--demo", "--output_dir", str(tmp_path), "--device", "cpu"])
    summary = main_maskedkd.run_demo(args, cfg=TOY)
    out = capsys.readouterr().out
    assert "[demo] training the teacher" in out and "MaskedKD demo finished" in out
    assert (tmp_path / "teacher.pth").exists()
    assert 0.3 < summary["teacher_compute_saved"] < 0.6          # keep 0.5 of an 8x8 grid, fvcore-counted
    assert summary["teacher_tokens_kept"] == (1 + 32) / (1 + 64)
    assert json.loads((tmp_path / "demo_summary.json").read_text())["student_acc1"] == summary["student_acc1"]

    again = main_maskedkd.run_demo(args, cfg=TOY)  # teacher cached, student run already finished
    out = capsys.readouterr().out
    assert "using cached teacher" in out and "training the teacher" not in out
    assert again["student_acc1"] == summary["student_acc1"]
