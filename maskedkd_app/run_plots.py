"""``--plots``: one PNG beside ``log.txt`` that shows, epoch by epoch, whether masking the teacher is helping.

Three panels from the run's own log lines: the student's validation top-1 (paper Fig. 3 for one run); the
teacher's top-1 on the training labels as the loss saw it (masked) and, from the fidelity probe, the full
teacher's and a random mask's on the same probed images; and the probe's agreement with the full teacher's top-1
for the chosen mask against a random mask of the same size, with the epochs where the mask guard fired marked.
Drawn through ``matplotlib.figure.Figure`` (never pyplot), so the process's matplotlib backend is left alone.
"""
from __future__ import annotations

from pathlib import Path
from typing import Dict, List

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from .runlog import read_log

PLOT_NAME = "masking.png"


def _series(lines: List[Dict[str, float]], key: str):
    points = [(line["epoch"], line[key]) for line in lines if key in line and "epoch" in line]
    return [p[0] for p in points], [p[1] for p in points]


def plot_run(output_dir: Path) -> Path:
    """Draw ``output_dir/masking.png`` from ``output_dir/log.txt``; returns the PNG's path."""
    output_dir = Path(output_dir)
    lines = read_log(output_dir / "log.txt")
    figure = Figure(figsize=(12.0, 3.5), dpi=100)
    student, teacher, probe = figure.subplots(1, 3)

    student.plot(*_series(lines, "test_acc1"), marker="o", label="student (val)")
    student.set(title="student top-1", xlabel="epoch", ylabel="%")

    for key, label in (("train_teacher_acc1", "teacher as the loss saw it"),
                       ("train_probe_acc1_full", "full teacher (probe)"),
                       ("train_probe_acc1_random", "random mask (probe)")):
        epochs, values = _series(lines, key)
        if epochs:
            teacher.plot(epochs, values, marker="o", label=label)
    teacher.set(title="teacher top-1 on training labels", xlabel="epoch", ylabel="%")

    for key, label in (("train_probe_agree_mask", "chosen mask"), ("train_probe_agree_random", "random mask")):
        epochs, values = _series(lines, key)
        if epochs:
            probe.plot(epochs, values, marker="o", label=label)
    fired = [line["epoch"] for line in lines if line.get("train_mask_guard_fired")]
    for n, epoch in enumerate(fired):
        probe.axvline(epoch, color="red", alpha=0.3, label="mask guard fired" if n == 0 else None)
    probe.set(title="agreement with the full teacher's top-1", xlabel="epoch", ylabel="% of probed images")
    for axes in (student, teacher, probe):
        if axes.get_legend_handles_labels()[0]:
            axes.legend(fontsize=8)
        axes.grid(alpha=0.3)
    figure.tight_layout()
    path = output_dir / PLOT_NAME
    FigureCanvasAgg(figure).print_png(str(path))
    return path
