"""The mask study's measurements: patch grey levels, border ring, oracle criteria, per-epoch snapshots."""
from pathlib import Path

import numpy as np
import pytest
import torch

from maskedkd_app import mask_study, reproduce
from maskedkd_app.checkpoint import read_checkpoint


def test_patch_means_border_and_oracles():
    raw = np.zeros((2, 8, 8), dtype=np.float32)
    raw[0, 0:2, 2:4] = 1.0       # image 0: patch (0, 1) of a 4x4 grid of 2x2 patches is full ink
    raw[1, 6:8, 6:8] = 0.5       # image 1: patch (3, 3) half grey
    ink = mask_study.patch_means(raw, (4, 4))
    want = torch.zeros(2, 16, dtype=torch.float64)
    want[0, 1], want[1, 15] = 1.0, 0.5
    assert torch.allclose(ink.double(), want)
    border = mask_study.border_patches((4, 4))
    assert int(border.sum()) == 12 and not border[5] and border[0] and border[15]
    picks = mask_study.criteria(None, ink.float())
    assert set(picks) == {"random", "ink (brightest patches)", "background (darkest patches)"}
    assert picks["ink (brightest patches)"](1).tolist() == [[1], [15]]
    assert 1 not in picks["background (darkest patches)"](15)[0].tolist()
    described = mask_study.describe_keep(torch.tensor([[1, 5], [0, 15]]), ink.float(), border)
    assert described == pytest.approx({"ink_share": 0.5, "blank_share": 0.5, "border_share": 0.75})
    scores = torch.rand(2, 16)
    with_scores = mask_study.criteria(scores, ink.float())
    assert torch.equal(with_scores["attention"](4), scores.topk(4, dim=1).indices.sort(1).values)
    mixed = with_scores["mixed"](8)
    for row, s in zip(mixed.tolist(), scores):
        assert set(s.topk(4).indices.tolist()) <= set(row)


def test_train_with_snapshots_keeps_one_checkpoint_per_epoch(tmp_path):
    p = dict(reproduce.PRESETS["cpu"], train=64, val=32, batch=32, student_epochs=3)
    argv = reproduce.arm_argv("no KD", p=p, seed=0, device="cpu", out=tmp_path / "run", teacher_path=Path("unused"),
                              mask_vis=None)
    got = mask_study.train_with_snapshots(argv, tmp_path / "snaps", poll_s=0.05)
    assert got["missing"] == [] and sorted(got["snapshots"]) == [0, 1, 2]
    for epoch, path in got["snapshots"].items():
        assert int(read_checkpoint(path)["epoch"]) == epoch
    last = read_checkpoint(got["snapshots"][2])["model"]
    final = read_checkpoint(tmp_path / "run" / "checkpoint.pth")["model"]
    assert all(torch.equal(last[k], final[k]) for k in final)


def test_painted_blanks_exactly_the_dropped_patches():
    x = torch.arange(2 * 3 * 8 * 8, dtype=torch.float32).reshape(2, 3, 8, 8)
    blank = torch.tensor([-1.0, -2.0, -3.0])
    out = mask_study.painted(x, torch.tensor([[0, 5], [15, 3]]), (4, 4), blank)
    for i, kept in enumerate(([0, 5], [15, 3])):
        for patch in range(16):
            r, c = divmod(patch, 4)
            block, original = out[i, :, 2 * r:2 * r + 2, 2 * c:2 * c + 2], x[i, :, 2 * r:2 * r + 2, 2 * c:2 * c + 2]
            if patch in kept:
                assert torch.equal(block, original)
            else:
                assert torch.equal(block, blank.reshape(3, 1, 1).expand(3, 2, 2))


def test_watch_runs_keeps_the_epoch_of_each_checkpoint_and_stops_when_recorded(tmp_path):
    import json
    from maskedkd_app.checkpoint import save_atomic
    arm = "MaskedKD attention, keep 0.5"
    run = tmp_path / reproduce.slug(arm) / "seed0"
    run.mkdir(parents=True)
    save_atomic({"model": {"w": torch.ones(2)}, "epoch": 4, "optimizer": {}}, run / "checkpoint.pth")
    (tmp_path / "runs.json").write_text(json.dumps({f"{arm} | seed 0": {"acc1": 1.0}}))
    watcher = mask_study.SnapshotWatcher(run, tmp_path / "snaps")
    watcher.poll()
    watcher.poll()  # unchanged checkpoint: nothing new
    assert list(watcher.seen) == [4]
    mask_study.watch_runs(tmp_path, [arm], [0], poll_s=0.01)   # returns: the run is recorded
    kept = read_checkpoint(tmp_path / "snapshots" / reproduce.slug(arm) / "seed0" / "epoch004.pth")
    assert kept["epoch"] == 4 and torch.equal(kept["model"]["w"], torch.ones(2)) and "optimizer" not in kept
