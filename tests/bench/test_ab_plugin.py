"""``python -m bench.ab_plugin``: a git ref's plugin and the working tree's in one process, on toy models, as a
subprocess (the ref's modules stay out of the test process); its JSON; a bad ref refused in one line."""
import json
import os
import subprocess
import sys

import pytest

from tinymodels import ROOT

pytestmark = pytest.mark.skipif(not os.path.isdir(os.path.join(ROOT, ".git")) and
                                not os.path.isfile(os.path.join(ROOT, ".git")), reason="needs the git history")


def _run(*args, timeout=240):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, "-m", "bench.ab_plugin", *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=timeout)


def test_ref_plugin_runs_beside_the_working_tree_and_every_pair_is_recorded(tmp_path):
    out = tmp_path / "ab.json"
    proc = _run("--ref", "HEAD", "--mode", "smoke", "--iters", "2", "--call-reps", "4", "--json", str(out))
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    record = json.loads(out.read_text())
    head = subprocess.run(["git", "-C", ROOT, "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
    assert record["meta"]["ref_commit"] == head
    steps = record["results"]["steps"]
    assert len(steps) == 3
    for entry in steps:
        assert set(entry["variants"]) == {"ref masked", "masked", "masked, probe off", "ref full", "full", "ceiling"}
        assert all(v["n"] == 2 for v in entry["variants"].values())
        for key, ratio in entry["ratios"].items():
            a, b = key.split(" / ")
            samples = zip(entry["variants"][a]["samples_ms"], entry["variants"][b]["samples_ms"])
            ratios = sorted(x / y for x, y in samples)
            assert ratio["median"] == pytest.approx(sum(ratios) / 2, rel=1e-3)  # two samples: their mean
    calls = record["results"]["calls"]
    assert set(calls["us"]) == set(steps[0]["variants"]) - {"ceiling"}
    assert all(n > 20 for n in calls["aten_ops"].values())


def test_a_ref_without_the_plugin_is_refused_in_one_line():
    proc = _run("--ref", "no-such-ref-anywhere", "--mode", "smoke", "--parts", "calls", timeout=120)
    assert proc.returncode != 0
    assert "git archive no-such-ref-anywhere failed" in proc.stderr and "Traceback" not in proc.stderr
