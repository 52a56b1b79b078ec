"""``python -m bench`` (the supervision benchmark) in smoke mode, in process: the sections the GPU session does not
run (cost, vitkd, compiled with the dynamo-only 'eager' backend; probe), their JSON keys, and the CLI's bad input."""
import json
import math
import statistics

import pytest

from bench.context import MODES
from bench.supervision import main, parse_args


def test_cost_vitkd_and_compiled_sections_write_their_figures(tmp_path):
    out = tmp_path / "bench.json"
    rc = main(["--mode", "smoke", "--section", "cost,vitkd,compiled", "--compile-backend", "eager", "--iters", "2",
               "--json", str(out)])
    assert rc == 0
    record = json.loads(out.read_text())
    assert record["meta"]["sections"] == ["cost", "vitkd", "compiled"] and record["meta"]["errors"] == {}
    results = record["results"]
    cost = results["cost"]
    assert cost["student_train_gmac"] == pytest.approx(3 * cost["student_fwd_gmac"])
    assert len(cost["teachers"]) == 3
    for entry in cost["teachers"]:
        gmacs = [entry["keeps"][str(k)]["gmac"] for k in (1.0, 0.75, 0.5, 0.25)]
        assert gmacs == sorted(gmacs, reverse=True) and gmacs[0] == pytest.approx(entry["full_gmac"], rel=1e-6)
        assert set(entry["distill_gmac"]) == {"full", "masked", "ceiling", "paper"}
    vitkd = results["vitkd_step"]
    assert set(vitkd["variants"]) == {"logit@1", "logit@0.5", "vitkd@1", "vitkd@0.5"}
    assert vitkd["variants"]["vitkd@0.5"]["heads_gmac_per_img"] > 0
    assert vitkd["variants"]["logit@1"]["heads_gmac_per_img"] is None
    compiled = results["compiled_student_step"]
    assert set(compiled["variants"]) == {"eager", "eager+capture", "compiled", "compiled+capture"}
    assert compiled["max_abs_score_diff"] <= 1e-4
    for value in (compiled["capture_overhead_eager"], vitkd["vitkd_overhead_full"], cost["student_fwd_gmac"]):
        assert math.isfinite(value) and value > 0


def _paired_median(a, b):
    return statistics.median(x / y for x, y in zip(a, b))


def test_probe_section_counts_one_probe_per_interval_within_one_percent_and_amortises_its_cost(tmp_path):
    out = tmp_path / "probe.json"
    assert main(["--mode", "smoke", "--section", "probe", "--iters", "3", "--json", str(out)]) == 0
    record = json.loads(out.read_text())
    assert record["meta"]["sections"] == ["probe"] and record["meta"]["errors"] == {}
    entries = record["results"]["probe_step"]
    smoke = MODES["smoke"]
    assert [e["teacher"] for e in entries] == smoke["teachers"].split(",")
    batch, images = smoke["batch_size"], min(8, smoke["batch_size"])  # probe_images defaults to 8
    for e in entries:
        # The interval, written out from the rule: the smallest N whose probe (a full pass and a random-mask
        # pass on `images` images) stays within 1% of N masked steps' teacher tokens (class token included).
        patch = int(dict(p.split("=") for p in e["teacher"].split(":")[1:])["patch_size"])
        patches = (smoke["img_size"] // patch) ** 2
        kept = round(0.5 * patches)
        per_probe, per_step = images * ((patches + 1) + (kept + 1)), batch * (kept + 1)
        every = math.ceil(per_probe / (0.01 * per_step))
        assert (e["num_patches"], e["num_keep"], e["prefix"], e["probe_every"]) == (patches, kept, 1, every)
        assert per_probe / ((every - 1) * per_step) > 0.01  # one step fewer would exceed the budget
        count = e["count"]
        assert count == {"calls": every, "tokens": every * per_step, "probe_tokens": per_probe, "probes": 1,
                         "share": pytest.approx(per_probe / (every * per_step))}
        assert 0.0099 < count["share"] <= 0.01
        v = {name: e["variants"][name]["samples_ms"] for name in ("off", "default", "every")}
        assert [len(s) for s in v.values()] == [3, 3, 3]
        # ~300 steps between probes: none of the timed default-interval steps probed; every probe_every=1 step did.
        assert e["probing_reps"] == {"default": 0, "every": 3} and e["ratio_between"]["n"] == 3
        between, probing = _paired_median(v["default"], v["off"]), _paired_median(v["every"], v["off"])
        assert e["ratio_between"]["median"] == pytest.approx(between, rel=1e-4)
        assert e["ratio_probing"]["median"] == pytest.approx(probing, rel=1e-4)
        assert e["overhead_amortised"] == pytest.approx(((every - 1) * between + probing) / every, rel=1e-4)
        assert e["overhead_amortised_p25"] <= e["overhead_amortised"] <= e["overhead_amortised_p75"]
        assert e["probe_part_amortised"] == pytest.approx((probing - between) / every, rel=1e-3)
        assert e["target_met"] == (e["overhead_amortised"] <= 1.02)
        assert all(e["variants"][n]["host_syncs_per_step"] is None for n in v)  # CUDA only


def test_sections_by_number_and_unknown_section_is_refused():
    assert parse_args(["--mode", "smoke", "--section", "3,1"]).sections == ["teacher", "distill"]
    assert parse_args(["--mode", "smoke", "--section", "8"]).sections == ["probe"]
    with pytest.raises(SystemExit, match="unknown section '9'"):
        parse_args(["--mode", "smoke", "--section", "9"])
