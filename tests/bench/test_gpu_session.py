"""The GPU session's CPU smoke mode, end to end: the same script a lent GPU runs (bench/gpu_session.sh), on toy
models, as a subprocess; then the JSON and Markdown it leaves behind.

Compile is left out (--no-compile): inductor builds C++ for a minute on a busy 2-core machine, and the plugin's
compiled teacher has its own tests (tests/plugin/test_fast_teacher.py).
"""
import json
import math
import os
import statistics
import subprocess
import sys

import pytest
import timm

from deit_patch.teachers import find_family
from tinymodels import ROOT

PARTS = ["capture", "teacher", "distill", "paper", "probe", "fast"]  # the brief's parts, most important first
KEEPS = [1.0, 0.75, 0.5, 0.25]
IMG = 48  # smoke mode's image size


def _session(out_dir, *extra, timeout=240):
    env = dict(os.environ, PYTHON=sys.executable, OMP_NUM_THREADS="1")
    env.pop("OUT", None)
    proc = subprocess.run(["bash", os.path.join(ROOT, "bench", "gpu_session.sh"), "--device", "cpu", "--out",
                           str(out_dir), *extra], cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    with open(os.path.join(out_dir, "gpu_session.json")) as f:
        record = json.load(f)
    with open(os.path.join(out_dir, "gpu_session.md")) as f:
        markdown = f.read()
    return proc, record, markdown


def _numbers(value, path="$"):
    """Every number in a JSON value, with where it sits."""
    if isinstance(value, bool):
        return
    if isinstance(value, (int, float)):
        yield path, value
    elif isinstance(value, dict):
        for key, item in value.items():
            yield from _numbers(item, f"{path}.{key}")
    elif isinstance(value, list):
        for i, item in enumerate(value):
            yield from _numbers(item, f"{path}[{i}]")


def _patches(spec: str) -> int:
    """Patch count of a smoke teacher, from its spec alone (img 48 / its patch size, squared)."""
    patch = int(dict(part.split("=") for part in spec.split(":")[1:])["patch_size"])
    return (IMG // patch) ** 2


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu_session")
    proc, record, markdown = _session(out, "--no-compile")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return out, record, markdown


def test_every_part_ran_in_order_and_every_item_is_done_or_skipped_with_a_reason(smoke):
    _, record, _ = smoke
    assert list(record["parts"]) == PARTS
    assert record["meta"]["mode"] == "smoke" and record["meta"]["parts"] == PARTS
    for name, part in record["parts"].items():
        assert part["status"] == "done", (name, part.get("status"), part.get("reason"))
        assert part["items"], name
        for spec, item in part["items"].items():
            assert item["status"] in ("done", "skipped"), (name, spec, item)
            if item["status"] == "skipped":
                assert item.get("reason"), (name, spec)
            else:
                assert isinstance(item["result"], dict) and item["elapsed_s"] >= 0


def test_every_number_is_finite(smoke):
    _, record, _ = smoke
    numbers = list(_numbers(record))
    assert len(numbers) > 200
    bad = [(path, value) for path, value in numbers if not math.isfinite(value)]
    assert not bad, bad[:10]


def test_eva_teacher_is_measured_exactly_when_the_plugin_masks_it(smoke):
    _, record, _ = smoke
    eva = record["meta"]["eva_teacher"]
    assert eva and eva.startswith("eva02")
    name, *overrides = eva.split(":")
    kwargs = {k: int(v) for k, v in (o.split("=") for o in overrides)}
    model = timm.create_model(name, pretrained=False, img_size=IMG, num_classes=10, **kwargs)
    masked = find_family(model) is not None
    for part in ("teacher", "distill", "paper"):
        item = record["parts"][part]["items"][eva]
        if masked:
            assert item["status"] == "done", (part, item)
        else:
            assert item["status"] == "skipped" and "does not mask" in item["reason"], (part, item)


def test_part_figures_have_their_keys_and_agree_with_each_other(smoke):
    _, record, _ = smoke
    parts = record["parts"]
    capture = parts["capture"]["items"]["student"]["result"]
    for variant in ("plain", "capture", "paper"):
        assert capture[variant]["median_ms"] > 0 and capture[variant]["n"] == 3
        assert capture[variant]["ratio_vs_plain_paired"] > 0
    for variant in ("capture", "paper"):  # the paired median, from the samples the record keeps
        pairs = zip(capture[variant]["samples_ms"], capture["plain"]["samples_ms"])
        assert capture[variant]["ratio_vs_plain_paired"] == pytest.approx(statistics.median(a / b for a, b in pairs),
                                                                          rel=1e-3)

    done = {name: {s: i["result"] for s, i in parts[name]["items"].items() if i["status"] == "done"}
            for name in PARTS}
    assert len(done["teacher"]) >= 3 and set(done["distill"]) == set(done["teacher"]) == set(done["paper"])
    for spec, res in done["teacher"].items():
        patches = _patches(spec)
        assert res["num_patches"] == patches and res["full"]["median_ms"] > 0
        assert [k["keep"] for k in res["keeps"]] == KEEPS
        for k in res["keeps"]:
            assert k["num_keep"] == max(1, round(k["keep"] * patches))
            assert k["ratio_plugin_over_reference_paired"] > 0 and k["plugin"]["n"] == 3
    for spec, res in done["distill"].items():
        assert set(res["variants"]) == {"full", "masked", "ceiling"}
        assert res["num_keep"] == round(0.5 * _patches(spec))
        assert res["gap_pp"] == pytest.approx(100 * (res["saving_ceiling"] - res["saving_ours"]))
    for spec, res in done["paper"].items():
        assert set(res["variants"]) == {"masked", "paper"}
        pairs = zip(res["variants"]["paper"]["samples_ms"], res["variants"]["masked"]["samples_ms"])
        assert res["speedup_ours_vs_paper"] == pytest.approx(statistics.median(p / m for p, m in pairs), rel=1e-3)
    assert set(done["probe"]) == set(done["teacher"])
    for spec, res in done["probe"].items():
        assert set(res["variants"]) == {"off", "default", "every"} and res["num_keep"] == round(0.5 * _patches(spec))
        assert res["count"]["probes"] == 1 and res["count"]["calls"] == res["probe_every"] > 1
        assert 0 < res["count"]["share"] <= 0.01 and res["probing_reps"]["every"] == 3
    (spec, fast), = done["fast"].items()
    assert fast["compile"] == {"skipped": "--no-compile"}
    assert {"keep, eager autocast bf16", "keep, bf16 weights eager"} <= set(fast["variants"])
    assert fast["gmac_full"] > fast["gmac_keep"] > 0 and fast["matmul_ceiling_tflops"]["float32"] > 0


def test_markdown_has_a_section_per_part_and_the_targets(smoke):
    out, record, markdown = smoke
    for name in PARTS:
        assert f"### {name}: " in markdown
    assert "### Against the targets" in markdown and "<= 1.03" in markdown
    assert "| probe at its default interval (every " in markdown and "amortised (p25-p75)" in markdown
    assert "toy models" in markdown  # smoke figures are labelled as such
    teacher = next(s for s, i in record["parts"]["teacher"]["items"].items() if i["status"] == "done")
    assert teacher.split(":")[0] in markdown
    assert os.path.getsize(os.path.join(out, "gpu_session.log")) > 0


def test_wall_clock_guard_skips_every_part_with_a_reason(tmp_path):
    proc, record, markdown = _session(tmp_path, "--max-wall-s", "1", timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert list(record["parts"]) == PARTS
    for name, part in record["parts"].items():
        assert part["status"] == "skipped" and "wall-clock guard" in part["reason"], (name, part)
        assert not part["items"]
    assert "Status: skipped (wall-clock guard" in markdown


def test_budgets_fit_the_wall_clock_and_each_part_can_run_its_first_item_on_an_h100():
    from bench.flops import load_table
    from bench.estimate import STARTUP_S, Estimate
    from bench.gpu_session import DEFAULT_MAX_WALL_S, PARTS as SESSION_PARTS, RESERVE_S, parse_args as session_args
    from bench.supervision import parse_args as bench_args

    assert [p.name for p in SESSION_PARTS] == PARTS
    assert sum(p.budget_s for p in SESSION_PARTS) + STARTUP_S + RESERVE_S <= DEFAULT_MAX_WALL_S <= 480
    table = load_table()
    args = bench_args(["--mode", "gpu", "--device", "cuda"])
    # The committed counts cover every GPU-mode configuration the session times (the EVA one: its full forward).
    for spec in args.teachers:
        patches = table["models"][spec]["num_patches"]
        for keep in [None] + KEEPS:
            key = f"teacher|{spec}|224|{'full' if keep is None else max(1, round(keep * patches))}"
            assert key in table["counts"], key
    assert f"student|{args.student}|224|full" in table["counts"]
    est = Estimate(table, args)
    first = {"capture": "student", "fast": args.teachers[0]}
    for part in SESSION_PARTS:
        spec = first.get(part.name, args.teachers[-1] if part.name != "capture" else "student")
        assert max(part.item_min_s, est.item_s(part.name, spec)) <= part.budget_s, part.name
        assert est.item_s(part.name, spec, floor=True) <= est.item_s(part.name, spec)
    # Calibrated on ANCHORS.md's deit3_huge forward (232.5 ms at batch 256): the full forward is that time, and a
    # forward on 128 of its 256 patches is it scaled by the committed fvcore counts (128 kept over the full model).
    huge, counts = "deit3_huge_patch14_224", table["counts"]
    assert est.teacher_ms(huge, 1.0, floor=False) == pytest.approx(232.5, rel=1e-6)
    want = 232.5 * counts[f"teacher|{huge}|224|128"] / counts[f"teacher|{huge}|224|full"]
    assert est.teacher_ms(huge, 0.5, floor=False) == pytest.approx(want, rel=1e-6)
    assert session_args(["--device", "cpu", "--parts", "fast,capture"]).parts == ["fast", "capture"]
    with pytest.raises(SystemExit):
        session_args(["--device", "cpu", "--parts", "nonsense"])


def test_markdown_renders_what_only_a_gpu_run_has(smoke):
    """The compiled variants and CUDA peaks appear only on a GPU: render a smoke record given them."""
    import copy

    from bench.gpu_session import Session, parse_args as session_args

    out, record, _ = smoke
    record = copy.deepcopy(record)
    (spec, fast_item), = record["parts"]["fast"]["items"].items()
    variants = fast_item["result"]["variants"]
    compiled = dict(variants["keep, eager autocast bf16"], ratio_vs_eager_autocast_paired=0.8, peak_extra_mib=812.0)
    variants["keep, bf16 + compile"] = compiled
    fast_item["result"]["compile"] = {"first_call_s": 41.5, "first_call_in_autocast_s": 12.4}
    fast_item["peak_allocated_mib"] = 4321.0
    session = Session(session_args(["--device", "cpu", "--out", str(out / "render")]))
    session.record = record
    markdown = session.markdown()
    assert f"| bf16 + compile speed-up, {spec.split(':')[0]}" in markdown
    row = next(line for line in markdown.splitlines() if line.startswith("| bf16 + compile speed-up"))
    assert "| 1.250 |" in row and row.endswith("| yes |")
    assert "compile 41.5 s (+12.4 s inside autocast)" in markdown
    assert "| 4321 |" in markdown and "| 812 |" in markdown
