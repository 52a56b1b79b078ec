"""fvcore counts (GMAC per image, one multiply-add each) of a mode's models, written once to a JSON table.

The counts do not depend on the device, so the GPU session reads them from ``bench/gmac_gpu.json`` instead of
tracing 600M-parameter models on a lent machine's clock (and works where fvcore is not installed). Regenerate the
table after changing the GPU-mode models (or once the plugin masks a teacher it did not, for its keep counts):

  python -m bench.flops --mode gpu --write bench/gmac_gpu.json      # ~3 min on 2 CPU cores
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import Any, Dict, List, Optional

import timm
import torch

from deit_patch.cost import student_gflops, teacher_gflops
from deit_patch.teachers import find_family

from .context import MODES, BenchContext
from .models import build_model, keep_count, parse_spec, short_name

TABLE_PATH = os.path.join(os.path.dirname(os.path.abspath(__file__)), "gmac_gpu.json")
KEEPS = (1.0, 0.75, 0.5, 0.25)


def count_table(*, mode: str, extra_teachers: List[str], keeps=KEEPS) -> Dict[str, Any]:
    """Student forward, and each teacher's full forward and pruned forward at each keep (where the plugin masks
    the teacher), at the mode's image size; keyed by ``BenchContext.gmac_key``."""
    settings = MODES[mode]
    img, classes = settings["img_size"], settings["num_classes"]
    counts: Dict[str, float] = {}
    models: Dict[str, Dict[str, Any]] = {}  # what a time estimate needs besides the counts
    notes: List[str] = []
    cpu = torch.device("cpu")
    student = build_model(settings["student"], img_size=img, num_classes=classes, device=cpu)
    counts[BenchContext.gmac_key(settings["student"], None, img_size=img, kind="student")] = \
        student_gflops(student, img_size=(img, img))
    del student
    teachers = [t for t in settings["teachers"].split(",") if t] + list(extra_teachers)
    for spec in teachers:
        t0 = time.perf_counter()
        name, _ = parse_spec(spec)
        if not timm.list_models(name):
            notes.append(f"{spec}: timm {timm.__version__} has no such model")
            continue
        model = build_model(spec, img_size=img, num_classes=classes, device=cpu).eval()
        counts[BenchContext.gmac_key(spec, None, img_size=img, kind="teacher")] = \
            teacher_gflops(model, img_size=(img, img), num_keep=None)
        rows, cols = model.patch_embed.grid_size
        models[spec] = {"depth": len(model.blocks), "params_m": sum(p.numel() for p in model.parameters()) / 1e6,
                        "num_patches": int(rows) * int(cols), "num_prefix_tokens": int(model.num_prefix_tokens),
                        "masked_by_plugin": find_family(model) is not None}
        if find_family(model) is None:
            notes.append(f"{short_name(spec)}: the plugin does not mask it; full forward only")
        else:
            for keep in keeps:
                k = keep_count(model, keep)
                counts[BenchContext.gmac_key(spec, k, img_size=img, kind="teacher")] = \
                    teacher_gflops(model, img_size=(img, img), num_keep=k)
        print(f"  {short_name(spec)}: {time.perf_counter() - t0:.1f} s", flush=True)
        del model
    return {"mode": mode, "img_size": img, "torch": torch.__version__, "timm": timm.__version__,
            "unit": "fvcore GMAC per image (one multiply-add = 1)", "counts": counts, "models": models,
            "notes": notes}


def load_table(path: str = TABLE_PATH) -> Optional[Dict[str, Any]]:
    if not os.path.exists(path):
        return None
    with open(path) as f:
        return json.load(f)


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.flops", description=__doc__.split("\n\n")[0])
    p.add_argument("--mode", choices=tuple(MODES), default="gpu")
    p.add_argument("--extra-teachers", default="eva02_large_patch14_224",
                   help="comma list counted besides the mode's teachers (the GPU session's EVA-02 teacher)")
    p.add_argument("--write", default=None, help="JSON path (default: print only)")
    args = p.parse_args(argv)
    torch.set_num_threads(max(1, min(4, os.cpu_count() or 1)))
    table = count_table(mode=args.mode, extra_teachers=[t for t in args.extra_teachers.split(",") if t])
    for key, value in table["counts"].items():
        print(f"  {key}: {value:.3f}")
    for note in table["notes"]:
        print(f"  note: {note}")
    if args.write:
        with open(args.write, "w") as f:
            json.dump(table, f, indent=1, sort_keys=True)
            f.write("\n")
        print(f"wrote {args.write}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
