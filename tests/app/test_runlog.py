"""log.txt read back by the demo and the reproduction: a line cut short by a kill is skipped, not a crash."""
import json

from maskedkd_app import demo, reproduce
from maskedkd_app.runlog import read_log


def write_log(folder, records, tail):
    folder.mkdir(parents=True, exist_ok=True)
    text = "".join(json.dumps(r) + "\n" for r in records) + tail
    (folder / "log.txt").write_text(text)


def test_a_cut_short_last_line_is_skipped_by_every_reader(tmp_path):
    records = [{"epoch": 0, "test_acc1": 40.0}, {"epoch": 1, "test_acc1": 45.5, "teacher_gflops_per_img": 0.02}]
    arm = "MaskedKD, keep 0.5"
    run = tmp_path / demo.arm_dir(arm)
    write_log(run, records, tail='{"epoch": 2, "test_ac')  # a kill mid-write (these readers raised on it)
    assert read_log(run / "log.txt") == records
    assert demo._finished_before(arm, tmp_path, epochs=2) and not demo._finished_before(arm, tmp_path, epochs=3)
    record = demo._arm_record(arm, tmp_path, seconds=None)
    assert (record["student_acc1"], record["student_max_acc1"], record["teacher_gflops"]) == (45.5, 45.5, 0.02)
    assert reproduce._epoch_accuracies(run) == [40.0, 45.5]
    assert read_log(tmp_path / "missing" / "log.txt") == []
