"""One module per benchmark section; ``SECTIONS`` lists them in run order (the cost table reads the ones before).

Each section module has ``KEY`` (where its figures go in the JSON's ``results``) and ``run(ctx, ...)``, which prints
its table and returns those figures.
"""
from __future__ import annotations

from types import ModuleType
from typing import Dict

from . import compiled, cost, distill, fast, probe, student, teacher, vitkd

SECTIONS: Dict[str, ModuleType] = {
    "teacher": teacher,
    "student": student,
    "distill": distill,
    "cost": cost,
    "fast": fast,
    "vitkd": vitkd,
    "compiled": compiled,
    "probe": probe,
}
