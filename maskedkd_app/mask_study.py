"""Why student-attention masks can fail: ``python -m maskedkd_app.mask_study --preset digits``.

Reads the students and the teacher of a finished reproduction (``maskedkd_app.reproduce``) and measures, on the
validation images, what the teacher is left with under each mask criterion:

* per student (every arm and seed with a checkpoint): the masked teacher's top-1 when that student's class-token
  attention chooses the patches (keep 0.5 and 0.25), the share of kept patches that hold ink (the object) and that
  lie on the image border, and the attention mass the student puts on blank patches. Comparing students trained
  without the mask (no KD, full KD) with students trained under it separates "attention is a poor criterion here"
  from "training under the mask made the attention worse" (the feedback loop);
* oracle criteria that ignore every student: the brightest patches (ink only), the darkest (background only), a
  uniform draw, to show what the teacher needs;
* over training, with ``--snapshots ARM SEED``: the same run retrained with a snapshot per epoch (it must end at the
  recorded accuracy), and the masked teacher's top-1 under each epoch's attention;
* pictures (PNG): validation images with the kept patches of each criterion and the teacher's prediction.

Writes JSON (``--json``) and PNGs (``--figures``); the Markdown write-up (results/digits/real_images.md) quotes them.
"""
from __future__ import annotations

import json
import shutil
import threading
import time
from pathlib import Path
from typing import Callable, Dict, List, Optional, Tuple

import numpy as np
import torch

from deit_patch.argtypes import OneLineParser, positive_int, seed_int

from . import build, reproduce
from .args import parse_args
from .recipes import arm_argv

INK = 0.15          # a patch holds ink when its mean pixel (in [0, 1], before normalisation) is above this
BLANK = 0.02        # and is blank background below this
KEEPS = (0.5, 0.25)


# ------------------------------------------------------------------------------------------------- loading


def _args_for(p: Dict, out: Path, teacher_path: Path):
    return parse_args(arm_argv("MaskedKD attention, keep 0.5", p=p, seed=0, device="cpu", out=out,
                                               teacher_path=teacher_path, mask_vis=None))


def load_teacher(p: Dict, root: Path) -> Tuple[torch.nn.Module, object]:
    record = json.loads((root / "teacher_run.json").read_text()) if (root / "teacher_run.json").exists() else None
    path = Path(record["path"]) if record else Path(reproduce.ensure_teacher(p, device="cpu", root=root)["path"])
    args = _args_for(p, root / "unused", path)
    return build.create_teacher(args, 10).eval(), args


def load_student(args, checkpoint: Path) -> torch.nn.Module:
    import timm
    from .checkpoint import extract_state_dict, read_checkpoint
    student = timm.create_model(args.model, pretrained=False, num_classes=10, img_size=args.input_size,
                                **args.model_kwargs)
    student.load_state_dict(extract_state_dict(read_checkpoint(str(checkpoint))))
    return student.eval()


def val_images(args, limit: Optional[int] = None) -> Tuple[torch.Tensor, torch.Tensor, np.ndarray]:
    """Normalised val images (N, 3, H, W), labels (N,) and the raw grey level (N, H, W) in [0, 1]."""
    from .data import build_dataset
    data, _ = build_dataset(is_train=False, args=args)
    count = len(data) if limit is None else min(limit, len(data))
    x = torch.stack([data[i][0] for i in range(count)])
    y = torch.tensor([data[i][1] for i in range(count)])
    raw = np.stack([data.render(i).astype(np.float32).mean(-1) / 255.0 for i in range(count)])
    return x, y, raw


def patch_means(raw: np.ndarray, grid: Tuple[int, int]) -> torch.Tensor:
    """(N, rows*cols) mean grey level of every patch, raster order as in deit_patch.masking."""
    n, h, w = raw.shape
    rows, cols = grid
    blocks = raw.reshape(n, rows, h // rows, cols, w // cols).mean(axis=(2, 4))
    return torch.from_numpy(blocks.reshape(n, rows * cols))


def border_patches(grid: Tuple[int, int]) -> torch.Tensor:
    rows, cols = grid
    ring = torch.zeros(rows, cols, dtype=torch.bool)
    ring[0], ring[-1], ring[:, 0], ring[:, -1] = True, True, True, True
    return ring.flatten()


def attention_scores(student: torch.nn.Module, x: torch.Tensor, batch: int = 150) -> torch.Tensor:
    """The student's last-layer class-token attention over its patches (what MaskedKD ranks), (N, P)."""
    from deit_patch.capture import AttentionCapture
    capture = AttentionCapture(student, always=True)
    out = []
    try:
        with torch.no_grad():
            for start in range(0, len(x), batch):
                chunk = x[start:start + batch]
                student(chunk)
                out.append(capture.take(len(chunk), image_hw=tuple(chunk.shape[-2:])))
    finally:
        capture.remove()
    return torch.cat(out)


def teacher_predictions(teacher: torch.nn.Module, x: torch.Tensor, keep: Optional[torch.Tensor],
                        batch: int = 150) -> torch.Tensor:
    """Teacher probabilities (N, C) on all patches (``keep`` None) or on the kept ones only."""
    from deit_patch.teachers import find_family, pruned_forward
    family = find_family(teacher)
    probs = []
    with torch.no_grad():
        for start in range(0, len(x), batch):
            chunk = x[start:start + batch]
            logits = teacher(chunk) if keep is None else pruned_forward(teacher, chunk, keep[start:start + batch],
                                                                       family)
            probs.append(logits.softmax(-1))
    return torch.cat(probs)


# ----------------------------------------------------------------------------------------------- criteria

def _top(scores: torch.Tensor, k: int) -> torch.Tensor:
    return scores.topk(k, dim=1).indices.sort(dim=1).values


Chooser = Callable[[int], torch.Tensor]


def criteria(scores: Optional[torch.Tensor], ink: torch.Tensor, seed: int = 0) -> Dict[str, Chooser]:
    """name -> (num_keep -> (N, num_keep) kept patches). Ties in the oracles are broken by a fixed random draw."""
    from deit_patch.masking import mixed_selector
    n, p = ink.shape
    gen = torch.Generator().manual_seed(seed)
    jitter = torch.rand(n, p, generator=gen) * 1e-6

    def uniform(k: int) -> torch.Tensor:
        return _top(torch.rand(n, p, generator=torch.Generator().manual_seed(seed + k)), k)

    chosen = {"random": uniform, "ink (brightest patches)": lambda k: _top(ink + jitter, k),
              "background (darkest patches)": lambda k: _top(-ink + jitter, k)}
    if scores is not None:
        def mixed(k: int) -> torch.Tensor:
            torch.manual_seed(seed + k)
            return mixed_selector(attention_share=0.5)(scores=scores, batch_size=n, num_patches=p, num_keep=k,
                                                       device=scores.device)
        chosen = {"attention": lambda k: _top(scores, k), "mixed": mixed, **chosen}
    return chosen


def describe_keep(keep: torch.Tensor, ink: torch.Tensor, border: torch.Tensor) -> Dict[str, float]:
    kept_ink = ink.gather(1, keep)
    return {"ink_share": float((kept_ink > INK).float().mean()),
            "blank_share": float((kept_ink < BLANK).float().mean()),
            "border_share": float(border[keep].float().mean())}


def painted(x: torch.Tensor, keep: torch.Tensor, grid: Tuple[int, int], blank: torch.Tensor) -> torch.Tensor:
    """``x`` with every patch outside ``keep`` painted the blank background (``blank``: (3,) normalised value)."""
    n, _, h, w = x.shape
    mask = torch.zeros(n, grid[0] * grid[1], dtype=torch.bool)
    mask.scatter_(1, keep, True)
    pixels = mask.reshape(n, 1, grid[0], 1, grid[1], 1).expand(n, 1, grid[0], h // grid[0], grid[1], w // grid[1])
    pixels = pixels.reshape(n, 1, h, w)
    return torch.where(pixels, x, blank.reshape(1, 3, 1, 1).to(x.dtype))


def measure(teacher, x, y, ink, border, scores: Optional[torch.Tensor], keeps=KEEPS,
            blank: Optional[torch.Tensor] = None) -> Dict[str, Dict]:
    """Masked teacher top-1 and what its kept patches hold, per criterion and keep.

    With ``blank`` (the normalised value of an empty pixel) also ``acc1_painted``: the full teacher on the image with
    the dropped patches painted blank instead of removed, i.e. whether the kept patches still carry the class when
    the teacher is told that the rest is empty.
    """
    p = ink.shape[1]
    grid = (int(round(p ** 0.5)),) * 2
    out: Dict[str, Dict] = {}
    for name, choose in criteria(scores, ink).items():
        for keep_ratio in keeps:
            keep = choose(int(round(keep_ratio * p)))
            probs = teacher_predictions(teacher, x, keep)
            preds = probs.argmax(-1)
            row = {"acc1": 100.0 * float((preds == y).float().mean()), **describe_keep(keep, ink, border),
                   # a collapsing target: how sure the teacher is, and how often it names its most frequent class
                   "entropy": float(-(probs * probs.clamp_min(1e-12).log()).sum(-1).mean()),
                   "top_class_share": float(torch.bincount(preds, minlength=probs.shape[1]).max()) / len(preds)}
            if blank is not None:
                filled = teacher_predictions(teacher, painted(x, keep, grid, blank), None)
                row["acc1_painted"] = 100.0 * float((filled.argmax(-1) == y).float().mean())
            out.setdefault(name, {})[str(keep_ratio)] = row
    return out


def attention_profile(scores: torch.Tensor, ink: torch.Tensor, border: torch.Tensor) -> Dict[str, float]:
    """Where the student's class-token attention goes: mass on ink, on blank patches, on the border ring."""
    mass = scores / scores.sum(1, keepdim=True)
    return {"on_ink": float((mass * (ink > INK)).sum(1).mean()),
            "on_blank": float((mass * (ink < BLANK)).sum(1).mean()),
            "on_border": float((mass * border).sum(1).mean()),
            "top1_patch_share": float(mass.max(1).values.mean())}


# ----------------------------------------------------------------------------------------- over training


class SnapshotWatcher:
    """Keeps the student weights of every epoch of a run that is training (the app keeps only the last checkpoint).

    ``poll()`` copies ``<run_dir>/checkpoint.pth`` (written atomically once per epoch) when it changed, checks the
    epoch recorded inside, and stores the weights as ``<snap_dir>/epochNNN.pth``; call it more often than epochs end.
    """

    def __init__(self, run_dir: Path, snap_dir: Path):
        self.run_dir, self.snap_dir = Path(run_dir), Path(snap_dir)
        self.seen: Dict[int, Path] = {int(f.stem[5:]): f for f in self.snap_dir.glob("epoch*.pth")}
        self._stamp: Optional[int] = None

    def poll(self) -> None:
        from .checkpoint import read_checkpoint, save_atomic
        try:
            stamp = (self.run_dir / "checkpoint.pth").stat().st_mtime_ns
        except FileNotFoundError:
            return
        if stamp == self._stamp:
            return
        try:
            state = read_checkpoint(self.run_dir / "checkpoint.pth")
            epoch = int(state["epoch"])
        except (OSError, RuntimeError, KeyError, EOFError):
            return  # replaced while reading: read it again at the next poll
        self.snap_dir.mkdir(parents=True, exist_ok=True)
        target = self.snap_dir / f"epoch{epoch:03d}.pth"
        save_atomic({"model": state["model"], "epoch": epoch}, target)
        self.seen[epoch], self._stamp = target, stamp


def watch_runs(root: Path, arms: List[str], seeds: List[int], *, poll_s: float = 1.0) -> None:
    """Snapshot every epoch of these arms' runs in a reproduction that is training, until all are in runs.json."""
    watchers = {f"{arm} | seed {seed}": SnapshotWatcher(root / reproduce.slug(arm) / f"seed{seed}",
                                                        root / "snapshots" / reproduce.slug(arm) / f"seed{seed}")
                for arm in arms for seed in seeds}
    while True:
        done = json.loads((root / "runs.json").read_text()) if (root / "runs.json").exists() else {}
        for watcher in watchers.values():
            watcher.poll()
        if all(key in done for key in watchers):
            for watcher in watchers.values():
                watcher.poll()
            return
        time.sleep(poll_s)


def train_with_snapshots(argv: List[str], snap_dir: Path, *, poll_s: float = 0.2) -> Dict:
    """Train one run through the app and keep its weights after every epoch (``SnapshotWatcher`` in a thread);
    the epochs found are checked against the run's length, so a missed snapshot is reported, not skipped."""
    out = Path(argv[argv.index("--output_dir") + 1])
    watcher = SnapshotWatcher(out, snap_dir)
    stop = threading.Event()

    def watch() -> None:
        while not stop.is_set():
            watcher.poll()
            time.sleep(poll_s)
        watcher.poll()

    thread = threading.Thread(target=watch, daemon=True)
    thread.start()
    try:
        stats = reproduce._run(argv)
    finally:
        time.sleep(2 * poll_s)
        stop.set()
        thread.join()
    epochs = int(argv[argv.index("--epochs") + 1])
    missing = sorted(set(range(epochs)) - set(watcher.seen))
    return {"stats": stats, "snapshots": {e: str(path) for e, path in sorted(watcher.seen.items())},
            "missing": missing}


# ------------------------------------------------------------------------------------------------ pictures


def kept_patches_figure(png: Path, raw: np.ndarray, y: torch.Tensor, panels: Dict[str, Tuple[Optional[torch.Tensor],
                        torch.Tensor]], grid: Tuple[int, int], *, title: str) -> Path:
    """Rows: images; columns: criteria. Dropped patches are greyed out; the title gives the teacher's prediction."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    rows, cols = len(raw), len(panels)
    gh, gw = raw.shape[1] // grid[0], raw.shape[2] // grid[1]
    fig, axes = plt.subplots(rows, cols, figsize=(1.9 * cols, 1.9 * rows + 0.9), squeeze=False)
    for col, (name, (keep, probs)) in enumerate(panels.items()):
        for row in range(rows):
            ax = axes[row][col]
            image = np.repeat(raw[row][:, :, None], 3, axis=2).copy()
            if keep is not None:
                mask = np.zeros(grid[0] * grid[1], dtype=bool)
                mask[keep[row].numpy()] = True
                dropped = np.kron(~mask.reshape(grid), np.ones((gh, gw), dtype=bool))
                image[dropped] = image[dropped] * 0.25 + np.array([0.45, 0.2, 0.2]) * 0.75
            ax.imshow(image, vmin=0, vmax=1, interpolation="nearest")
            pred, conf = int(probs[row].argmax()), float(probs[row].max())
            ok = pred == int(y[row])
            header = name.replace(", keep", "\nkeep") + "\n" if row == 0 else ""
            ax.set_title(f"{header}pred {pred} ({conf:.0%})", fontsize=7, color="green" if ok else "red")
            ax.set_xticks([])
            ax.set_yticks([])
    fig.suptitle(title, fontsize=8)
    fig.tight_layout(rect=(0, 0, 1, 0.97))
    png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png, dpi=80)
    plt.close(fig)
    return png


def over_training_plot(png: Path, series: Dict[str, Dict[int, float]], *, ylabel: str, title: str) -> Path:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(9, 4))
    for name, values in series.items():
        epochs = sorted(values)
        ax.plot(epochs, [values[e] for e in epochs], marker=".", label=name)
    ax.set_xlabel("student epoch")
    ax.set_ylabel(ylabel)
    ax.set_ylim(-2, 102)
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5))
    fig.tight_layout()
    png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png, dpi=90)
    plt.close(fig)
    return png


# ---------------------------------------------------------------------------------------------------- main


def main(argv: Optional[List[str]] = None) -> int:
    parser = OneLineParser(prog="mask_study.py", description=__doc__.splitlines()[0])
    parser.add_argument("--preset", choices=sorted(reproduce.PRESETS), default="digits")
    parser.add_argument("--root", default=None, help="the reproduction's output folder (default: the preset's)")
    parser.add_argument("--json", default=None, help="results (default: <root>/mask_study.json)")
    parser.add_argument("--figures", default=None,
                        help="figures (default: results/digits/real_images_figures; <root>/figures with --root)")
    parser.add_argument("--images", type=positive_int, default=1000, help="val images measured (all of DIGITS' 450)")
    parser.add_argument("--picture-seed", type=seed_int, default=None,
                        help="seed of the MaskedKD attention student whose masks are drawn (default: its worst seed)")
    parser.add_argument("--snapshots", nargs=2, metavar=("ARM", "SEED"), default=None,
                        help="measure each epoch's attention of this arm/seed: from the snapshots --watch kept, else "
                             "by retraining it with a snapshot per epoch")
    parser.add_argument("--watch", nargs="+", metavar="ARM", default=None,
                        help="only keep per-epoch snapshots of these arms' runs (seeds 0 1 2) while a reproduction "
                             "trains them, until they are recorded; no measurement")
    args = parser.parse_args(argv)
    p = dict(reproduce.PRESETS[args.preset])
    root = Path(args.root or reproduce.PRESET_FILES.get(args.preset, ("", "output/reproduce"))[1])
    # Another --root's figures go beside it: they overwrote the repository's shipped ones.
    figures = Path(args.figures or (root / "figures" if args.root else "results/digits/real_images_figures"))
    if not args.watch and not (root / "runs.json").is_file():
        # Checked first: the teacher was trained (minutes) before runs.json was found missing (a traceback).
        parser.error(f"--root {root} holds no runs.json (no reproduction there): run python -m maskedkd_app.reproduce "
                     f"--preset {args.preset} --output-dir {root} first, or pass the --root of one")
    if args.watch:
        watch_runs(root, args.watch, [0, 1, 2])
        return 0
    result_file = Path(args.json) if args.json else root / "mask_study.json"
    results = json.loads(result_file.read_text()) if result_file.exists() else {}
    torch.manual_seed(0)
    teacher, targs = load_teacher(p, root)
    x, y, raw = val_images(targs, args.images)
    from deit_patch.layout import patch_grid
    grid = patch_grid(teacher)
    ink, border = patch_means(raw, grid), border_patches(grid)
    full = teacher_predictions(teacher, x, None)
    from .data import data_stats
    mean, std = data_stats(targs)
    blank = (torch.zeros(3) - torch.tensor(mean)) / torch.tensor(std)  # an empty (black) pixel, normalised
    results["images"] = len(y)
    results["teacher_full_acc1"] = 100.0 * float((full.argmax(-1) == y).float().mean())
    results["patches_with_ink"] = float((ink > INK).float().mean())
    results["blank_patches"] = float((ink < BLANK).float().mean())
    results["oracles"] = measure(teacher, x, y, ink, border, None, blank=blank)
    own = attention_scores(teacher, x)  # one full pass over the images, used twice
    results["teacher_attention"] = {"profile": attention_profile(own, ink, border),
                                    **measure(teacher, x, y, ink, border, own, blank=blank)}
    runs = json.loads((root / "runs.json").read_text())
    students: Dict[str, Dict] = {}
    for key, record in sorted(runs.items()):
        arm, seed = key.split(" | seed ")
        ckpt = root / reproduce.slug(arm) / f"seed{seed}" / "checkpoint.pth"
        if not ckpt.exists():
            continue
        student = load_student(targs, ckpt)
        scores = attention_scores(student, x)
        got = measure(teacher, x, y, ink, border, scores, blank=blank)
        students[key] = {"arm": arm, "seed": int(seed), "student_acc1": record["acc1"],
                         "attention_profile": attention_profile(scores, ink, border),
                         **{name: got[name] for name in ("attention", "mixed")}}
        print(f"[mask_study] {key}: student {record['acc1']:.1f}%, masked teacher (attention 0.5) "
              f"{got['attention']['0.5']['acc1']:.1f}%, ink share {got['attention']['0.5']['ink_share']:.2f}")
    results["students"] = students
    arm = "MaskedKD attention, keep 0.5"
    seeds = {s["seed"]: s["student_acc1"] for s in students.values() if s["arm"] == arm}
    if seeds:
        seed = args.picture_seed if args.picture_seed is not None else min(seeds, key=seeds.get)
        pictures = {}
        for name, chosen_arm in (("maskedkd", arm), ("no_kd", "no KD")):
            ckpt = root / reproduce.slug(chosen_arm) / f"seed{seed}" / "checkpoint.pth"
            if not ckpt.exists():
                continue
            scores = attention_scores(load_student(targs, ckpt), x)
            picks = criteria(scores, ink)
            rows = np.r_[0:8]
            panels = {"all patches": (None, full[rows])}
            for crit in ("attention", "random", "mixed", "ink (brightest patches)"):
                keep = picks[crit](int(round(0.5 * ink.shape[1])))
                panels[f"{crit}, keep 0.5"] = (keep[rows], teacher_predictions(teacher, x[rows], keep[rows]))
            png = kept_patches_figure(figures / f"kept_patches_{name}_seed{seed}.png", raw[rows], y[rows], panels,
                                      grid, title=f"Teacher's prediction (confidence) from the kept patches (red: "
                                                  f"dropped); attention of the '{chosen_arm}' student, seed {seed}")
            pictures[name] = str(png)
        results["pictures"] = pictures
    if args.snapshots:
        snap_arm, snap_seed = args.snapshots[0], int(args.snapshots[1])
        out = root / "snapshots" / reproduce.slug(snap_arm) / f"seed{snap_seed}"
        run_argv = arm_argv(snap_arm, p=p, seed=snap_seed, device="cpu", out=out / "run",
                                      teacher_path=Path(json.loads((root / "teacher_run.json").read_text())["path"]),
                                      mask_vis=None)
        done = out / "snapshots.json"
        watched = root / "snapshots" / reproduce.slug(snap_arm) / f"seed{snap_seed}"
        if not done.exists() and any(watched.glob("epoch*.pth")):  # kept by --watch while the reproduction trained
            found = {int(f.stem[5:]): str(f) for f in sorted(watched.glob("epoch*.pth"))}
            out.mkdir(parents=True, exist_ok=True)
            done.write_text(json.dumps({"final_acc1": runs[f"{snap_arm} | seed {snap_seed}"]["acc1"],
                                        "missing": sorted(set(range(p["student_epochs"])) - set(found)),
                                        "snapshots": found}, indent=1))
        if not done.exists():
            shutil.rmtree(out / "run", ignore_errors=True)
            trained = train_with_snapshots(run_argv, out / "epochs")
            done.write_text(json.dumps({"final_acc1": trained["stats"]["test_acc1"], "missing": trained["missing"],
                                        "snapshots": trained["snapshots"]}, indent=1))
        snaps = json.loads(done.read_text())
        per_epoch: Dict[str, Dict[str, float]] = {}
        for epoch, path in sorted(snaps["snapshots"].items(), key=lambda kv: int(kv[0])):
            student = load_student(targs, Path(path))  # each snapshot loaded once
            scores = attention_scores(student, x)
            got = measure(teacher, x, y, ink, border, scores, keeps=(0.5,))
            student_preds = teacher_predictions(student, x, None).argmax(-1)
            per_epoch[epoch] = {"student_acc1": 100.0 * float((student_preds == y).float().mean()),
                                "student_top_class_share": float(torch.bincount(student_preds).max()) / len(y),
                                "attention_acc1": got["attention"]["0.5"]["acc1"],
                                "attention_entropy": got["attention"]["0.5"]["entropy"],
                                "attention_top_class_share": got["attention"]["0.5"]["top_class_share"],
                                "attention_border_share": got["attention"]["0.5"]["border_share"],
                                "mixed_acc1": got["mixed"]["0.5"]["acc1"],
                                "attention_ink_share": got["attention"]["0.5"]["ink_share"],
                                "attention_blank_share": got["attention"]["0.5"]["blank_share"],
                                **{f"attention_{k}": v for k, v in attention_profile(scores, ink, border).items()}}
        recorded = runs.get(f"{snap_arm} | seed {snap_seed}", {}).get("acc1")
        results.setdefault("over_training", {})[f"{snap_arm} | seed {snap_seed}"] = {
            "final_acc1": snaps["final_acc1"], "recorded_acc1": recorded, "missing_epochs": snaps["missing"],
            "per_epoch": per_epoch}
        series = {"student top-1": {int(e): v["student_acc1"] for e, v in per_epoch.items()},
                  "teacher top-1, attention keep 0.5": {int(e): v["attention_acc1"] for e, v in per_epoch.items()},
                  "kept patches on the border ring (%)": {int(e): 100 * v["attention_border_share"]
                                                          for e, v in per_epoch.items()},
                  "teacher top-1, mixed keep 0.5": {int(e): v["mixed_acc1"] for e, v in per_epoch.items()},
                  "kept patches with ink (%)": {int(e): 100 * v["attention_ink_share"] for e, v in per_epoch.items()},
                  "attention mass on blank patches (%)": {int(e): 100 * v["attention_on_blank"]
                                                          for e, v in per_epoch.items()}}
        over_training_plot(figures / f"over_training_{reproduce.slug(snap_arm)}_seed{snap_seed}.png", series,
                           ylabel="%", title=f"{snap_arm}, seed {snap_seed}: what the student's attention leaves "
                                             "the teacher")
    result_file.parent.mkdir(parents=True, exist_ok=True)
    result_file.write_text(json.dumps(results, indent=1))
    print(json.dumps({k: v for k, v in results.items() if k not in ("students", "over_training")}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
