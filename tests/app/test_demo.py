"""The demo at toy size: shipped teacher verified, three student arms, one table whose numbers come from the run."""
import json

from maskedkd_app.args import parse_args
from maskedkd_app import demo, procs

TOY = {"train_size": 128, "val_size": 64, "epochs": 1}


def test_demo_table_from_its_own_runs(tmp_path, capsys):
    args = parse_args(["--demo", "--output_dir", str(tmp_path), "--device", "cpu"])
    summary = demo.run_demo(args, cfg=TOY)
    out = capsys.readouterr().out
    assert "sha256 ok" in out
    arms = summary["arms"]
    assert list(arms) == list(demo.ARMS)
    masked, none, full = arms["MaskedKD, keep 0.5"], arms["no teacher"], arms["full teacher"]
    # Each arm's numbers are its own run's final log line.
    for name, a in arms.items():
        last = json.loads((tmp_path / demo.arm_dir(name) / "log.txt").read_text().splitlines()[-1])
        assert a["student_acc1"] == last["test_acc1"]
    assert none["teacher_gflops"] == 0 and full["teacher_gflops"] == full["teacher_gflops_full"] > 0
    assert masked["teacher_patch_share"] == 32 / 64   # keep 0.5 of the 8x8 grid
    saved = 1 - masked["teacher_gflops"] / full["teacher_gflops"]
    assert 0.3 < saved < 0.6
    # The table prints every arm with its top-1, GFLOPs and the saving computed from them.
    for name, a in arms.items():
        assert f"| {name} | {a['student_acc1']:.1f}% |" in out
    assert f"| {100 * saved:.0f}% |" in out and "0 (no teacher)" in out
    assert f"shipped teacher {summary['teacher_acc1']:.1f}%" in out
    assert json.loads((tmp_path / "demo_summary.json").read_text())["arms"]["no teacher"]["student_acc1"] == \
        none["student_acc1"]


def test_demo_threads_leave_busy_cores_alone(monkeypatch):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(procs.os, "sched_getaffinity", lambda pid: {0, 1}, raising=False)
    for busy, threads in [(1.2, 1), (6.0, 1), (0.1, 2), (0.4, 2), (0.6, 1), (0.0, 2)]:
        monkeypatch.setattr(procs, "busy_cores", lambda busy=busy: busy)
        assert demo.demo_threads() == threads, busy
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    assert demo.demo_threads() == 3


def test_busy_cores_reads_the_last_second_not_the_load_average(monkeypatch):
    # /proc/stat samples: 2 cores, 100 jiffies elapsed per core, 150 of the 200 busy -> 1.5 cores busy,
    # while the (lagging) load average still says 2.
    samples = iter([(1000, 5000), (1150, 5200)])
    monkeypatch.setattr(procs, "_cpu_times", lambda: next(samples))
    monkeypatch.setattr(procs.os, "cpu_count", lambda: 2)
    monkeypatch.setattr(procs.os, "getloadavg", lambda: (2.0, 2.0, 2.0))
    monkeypatch.setattr(procs.time, "sleep", lambda s: None)
    assert procs.busy_cores() == 1.5
    # Without /proc/stat the load average is the fallback.
    monkeypatch.setattr(procs, "_cpu_times", lambda: None)
    assert procs.busy_cores() == 2.0


def test_arms_are_scheduled_longest_first_from_their_own_flags():
    # The full teacher runs on every patch, MaskedKD on half, the no-teacher arm not at all.
    assert sorted(demo.ARMS, key=lambda arm: -demo.expected_cost(arm)) == \
        ["full teacher", "MaskedKD, keep 0.5", "no teacher"]
    assert demo.expected_cost("MaskedKD, keep 0.5") == 1.5
