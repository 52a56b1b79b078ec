"""``python -m bench`` (the supervision benchmark) in smoke mode, in process: the sections the GPU session does not
run (cost, vitkd, compiled with the dynamo-only 'eager' backend), their JSON keys, and the CLI's bad input."""
import json
import math

import pytest

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


def test_sections_by_number_and_unknown_section_is_refused():
    assert parse_args(["--mode", "smoke", "--section", "3,1"]).sections == ["teacher", "distill"]
    with pytest.raises(SystemExit, match="unknown section '9'"):
        parse_args(["--mode", "smoke", "--section", "9"])
