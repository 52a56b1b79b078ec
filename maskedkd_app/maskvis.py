"""See which teacher patches MaskedKD keeps: per-position keep frequency heat maps and greyed-out sample grids.

Everything draws through ``matplotlib.figure.Figure`` + ``FigureCanvasAgg`` directly, never pyplot, so importing
this module neither selects nor changes the process-wide matplotlib backend (a training script may use another).

PNG sizes are fixed so that they are predictable (and testable). Figure sizes are chosen as exact binary
fractions of an inch so that ``inches * dpi`` is an exact integer (Agg truncates the pixel size):

* heat map: ``HEATMAP_INCHES * DPI`` = 400 x 400 px.
* mask grid of N images with ``cols = min(ncols, N)`` and ``rows = ceil(N / cols)``:
  width = ``cols * CELL_PX`` = ``cols * 200`` px, height = ``rows * CELL_PX + TITLE_PX`` = ``rows * 200 + 50`` px.

Patch indices follow ``deit_patch.masking``: raster order over the teacher's (rows, cols) grid, no class token.
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Dict, Optional, Sequence, Tuple, Union

import torch
import torch.distributed as dist
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

Grid = Tuple[int, int]
PathLike = Union[str, Path]

DPI = 100
HEATMAP_INCHES = 4.0          # 4 in x 100 dpi = 400 px per side
CELL_INCHES = 2.0             # one sample image per 2 in x 2 in cell = 200 px
TITLE_INCHES = 0.5            # title band above the grid = 50 px
CELL_PX = int(CELL_INCHES * DPI)
TITLE_PX = int(TITLE_INCHES * DPI)
HEATMAP_PX = int(HEATMAP_INCHES * DPI)


def _check_grid(grid: Sequence[int]) -> Grid:
    if len(grid) != 2 or int(grid[0]) <= 0 or int(grid[1]) <= 0:
        raise ValueError(f"grid must be (rows, cols) of positive ints, got {tuple(grid)}")
    return int(grid[0]), int(grid[1])


def _is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def _is_rank_zero() -> bool:
    return not _is_distributed() or dist.get_rank() == 0


# --------------------------------------------------------------------------------------------------------------
# Keep-frequency accumulation
# --------------------------------------------------------------------------------------------------------------

class KeepFrequency:
    """Counts, per teacher patch position, in how many images that patch was kept.

    ``counts`` lives on the device of the keep indices (it starts on ``device`` and follows the first update
    from elsewhere once), so ``update`` is a single on-device ``scatter_add_`` with no host synchronisation.
    ``images`` and ``total_kept`` are python ints derived from tensor shapes, again to avoid syncs.
    """

    def __init__(self, grid: Sequence[int], device: Union[str, torch.device] = "cpu") -> None:
        self.grid: Grid = _check_grid(grid)
        self.num_patches = self.grid[0] * self.grid[1]
        self.counts = torch.zeros(self.num_patches, dtype=torch.int64, device=device)
        self.images = 0
        self.total_kept = 0

    def update(self, keep_idx: torch.Tensor) -> None:
        """Add one batch of (B, K) kept patch indices."""
        if keep_idx.dim() != 2:
            raise ValueError(f"keep_idx must be (B, K), got shape {tuple(keep_idx.shape)}")
        if self.counts.device != keep_idx.device:
            # One-off move so that every later update stays on the indices' device.
            self.counts = self.counts.to(keep_idx.device)
        flat = keep_idx.detach().reshape(-1).long()
        # scatter_add_ rather than bincount: CUDA bincount reads max() back to size its output (a sync).
        self.counts.scatter_add_(0, flat, torch.ones_like(flat))
        batch, keep = keep_idx.shape
        self.images += int(batch)
        self.total_kept += int(batch) * int(keep)

    def frequency(self) -> torch.Tensor:
        """Fraction of seen images in which each position was kept, float in [0, 1] (zeros before any update)."""
        return self.counts.double().div(max(self.images, 1)).float()

    def reset(self) -> None:
        self.counts.zero_()
        self.images = 0
        self.total_kept = 0

    def all_reduce(self) -> None:
        """Sum counts, images and total_kept over all ranks (no-op unless torch.distributed is initialised).

        Call once per accumulation period: a second call would add the already-global sums again.
        """
        if not _is_distributed():
            return
        # One packed collective instead of three: the int totals must stay consistent with the counts.
        packed = torch.cat([self.counts,
                            torch.tensor([self.images, self.total_kept], dtype=torch.int64,
                                         device=self.counts.device)])
        dist.all_reduce(packed, op=dist.ReduceOp.SUM)
        self.counts.copy_(packed[:self.num_patches])
        self.images, self.total_kept = (int(v) for v in packed[self.num_patches:].tolist())


# --------------------------------------------------------------------------------------------------------------
# Pure image helpers
# --------------------------------------------------------------------------------------------------------------

def patch_size_for(image_hw: Sequence[int], grid: Sequence[int]) -> Tuple[int, int]:
    """Pixel size of one teacher patch on an image; the grid must tile the image exactly."""
    rows, cols = _check_grid(grid)
    height, width = int(image_hw[0]), int(image_hw[1])
    if height % rows or width % cols:
        raise ValueError(
            f"teacher grid {rows}x{cols} does not divide the {height}x{width} image evenly "
            f"({height}/{rows}, {width}/{cols} are not integers): cannot map teacher patches onto pixels")
    return height // rows, width // cols


def keep_mask(keep_idx: torch.Tensor, grid: Sequence[int]) -> torch.Tensor:
    """(N, K) kept indices -> (N, rows, cols) bool mask, True where the teacher saw the patch."""
    rows, cols = _check_grid(grid)
    if keep_idx.dim() != 2:
        raise ValueError(f"keep_idx must be (N, K), got shape {tuple(keep_idx.shape)}")
    if keep_idx.numel() and (int(keep_idx.min()) < 0 or int(keep_idx.max()) >= rows * cols):
        raise ValueError(f"keep_idx values must lie in [0, {rows * cols}) for a {rows}x{cols} grid")
    mask = torch.zeros(keep_idx.shape[0], rows * cols, dtype=torch.bool, device=keep_idx.device)
    mask.scatter_(1, keep_idx.long(), True)
    return mask.view(-1, rows, cols)


def grey_out_dropped(images01: torch.Tensor, keep_idx: torch.Tensor, grid: Sequence[int],
                     grey: float = 0.5, strength: float = 0.8) -> torch.Tensor:
    """Blend the patches the teacher did NOT see towards ``grey``: ``x * (1 - strength) + grey * strength``.

    ``images01`` is (N, C, H, W) in [0, 1]; kept patches are returned bit-for-bit unchanged.
    """
    if images01.dim() != 4:
        raise ValueError(f"images must be (N, C, H, W), got shape {tuple(images01.shape)}")
    if keep_idx.shape[0] != images01.shape[0]:
        raise ValueError(f"{images01.shape[0]} images but {keep_idx.shape[0]} rows of keep_idx")
    patch_h, patch_w = patch_size_for(images01.shape[-2:], grid)
    mask = keep_mask(keep_idx.to(images01.device), grid)
    pixel_mask = mask.repeat_interleave(patch_h, dim=1).repeat_interleave(patch_w, dim=2).unsqueeze(1)
    greyed = images01 * (1.0 - strength) + grey * strength
    # where() rather than a masked blend so kept pixels are copied, not recomputed (exactly unchanged).
    return torch.where(pixel_mask, images01, greyed)


def unnormalize(images: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """Undo ``(x - mean) / std`` per channel and clamp to [0, 1] for display."""
    shape = (1, -1, 1, 1)
    mean_t = torch.as_tensor(mean, dtype=torch.float32, device=images.device).view(shape)
    std_t = torch.as_tensor(std, dtype=torch.float32, device=images.device).view(shape)
    return (images.float() * std_t + mean_t).clamp_(0.0, 1.0)


# --------------------------------------------------------------------------------------------------------------
# PNG writers
# --------------------------------------------------------------------------------------------------------------

def _write_png(fig: Figure, path: PathLike) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # print_png on the Agg canvas directly: no savefig rcParams (bbox='tight', savefig.dpi) can change the size.
    FigureCanvasAgg(fig).print_png(str(path))
    return path


def save_frequency_heatmap(counts: torch.Tensor, grid: Sequence[int], path: PathLike, *, title: str = "",
                           images: int) -> Path:
    """Heat map of the fraction of ``images`` in which each patch position was kept; 400 x 400 px PNG."""
    rows, cols = _check_grid(grid)
    if counts.numel() != rows * cols:
        raise ValueError(f"counts has {counts.numel()} entries, grid {rows}x{cols} needs {rows * cols}")
    freq = counts.detach().double().cpu().div(max(int(images), 1)).view(rows, cols).numpy()
    fig = Figure(figsize=(HEATMAP_INCHES, HEATMAP_INCHES), dpi=DPI)
    # Explicit axes rectangles (figure fractions) leave room for a 3-line title and the colorbar's label,
    # which the default subplot layout clips at this fixed size.
    ax = fig.add_axes((0.08, 0.06, 0.70, 0.74))
    cax = fig.add_axes((0.81, 0.06, 0.04, 0.74))
    # Fixed [0, 1] colour scale so heat maps from different epochs are comparable.
    im = ax.imshow(freq, vmin=0.0, vmax=1.0, cmap="viridis", interpolation="nearest")
    fig.colorbar(im, cax=cax, label="fraction of images kept")
    cax.tick_params(labelsize=7)
    ax.set_title(f"{title}\n{int(images)} images" if title else f"{int(images)} images", fontsize=9)
    ax.tick_params(labelsize=7)
    return _write_png(fig, path)


def mask_grid_size(num_images: int, ncols: int = 4) -> Tuple[int, int]:
    """(width, height) in px of ``save_mask_grid``'s PNG: (cols * 200, rows * 200 + 50)."""
    cols = max(1, min(int(ncols), int(num_images)))
    rows = max(1, math.ceil(int(num_images) / cols))
    return cols * CELL_PX, rows * CELL_PX + TITLE_PX


def save_mask_grid(images: torch.Tensor, keep_idx: torch.Tensor, grid: Sequence[int], path: PathLike, *,
                   mean: Sequence[float], std: Sequence[float], title: str = "", ncols: int = 4) -> Path:
    """Grid of normalised (N, 3, H, W) images with the teacher's dropped patches greyed out.

    Size: ``cols = min(ncols, N)``, ``rows = ceil(N / cols)``; PNG is ``cols*200`` x ``rows*200 + 50`` px.
    """
    if images.shape[0] == 0:
        raise ValueError("save_mask_grid needs at least one image")
    shown = grey_out_dropped(unnormalize(images.detach().cpu(), mean, std), keep_idx.detach().cpu(), grid)
    width_px, height_px = mask_grid_size(shown.shape[0], ncols)
    cols = width_px // CELL_PX
    fig = Figure(figsize=(width_px / DPI, height_px / DPI), dpi=DPI)
    pad = 0.03  # fraction of a cell left blank around each image so neighbours do not touch
    for i, img in enumerate(shown):
        row, col = divmod(i, cols)
        left = (col + pad) * CELL_PX / width_px
        bottom = (height_px - TITLE_PX - (row + 1 - pad) * CELL_PX) / height_px
        ax = fig.add_axes((left, bottom, (1 - 2 * pad) * CELL_PX / width_px, (1 - 2 * pad) * CELL_PX / height_px))
        ax.imshow(img.permute(1, 2, 0).numpy(), interpolation="nearest")
        ax.set_axis_off()
    if title:
        fig.text(0.5, 1.0 - 0.5 * TITLE_PX / height_px, title, ha="center", va="center", fontsize=9)
    return _write_png(fig, path)


# --------------------------------------------------------------------------------------------------------------
# Training-loop glue
# --------------------------------------------------------------------------------------------------------------

class MaskRecorder:
    """Per-epoch keep-frequency heat maps (+ raw JSON counts) and, for the first/last epoch, a sample mask grid.

    Loop usage::

        rec.start_epoch(epoch, is_first=epoch == start, is_last=epoch == end - 1)
        for ...: rec.observe(keep_idx, samples)
        rec.end_epoch(epoch, is_last=epoch == end - 1)   # on every rank: it may all_reduce

    Only rank 0 snapshots samples and writes files; every rank accumulates counts.
    """

    def __init__(self, out_dir: PathLike, grid: Sequence[int], *, mean: Sequence[float], std: Sequence[float],
                 num_samples: int = 8, ncols: int = 4) -> None:
        self.out_dir = Path(out_dir)
        self.grid = _check_grid(grid)
        self.mean = tuple(float(m) for m in mean)
        self.std = tuple(float(s) for s in std)
        self.num_samples = int(num_samples)
        self.ncols = int(ncols)
        self.freq = KeepFrequency(self.grid)
        self._want_snapshot = False
        self._is_first = False
        self._snapshot: Optional[Tuple[torch.Tensor, torch.Tensor]] = None

    def start_epoch(self, epoch: int, *, is_first: bool, is_last: bool) -> None:
        """Arm the sample snapshot for the first and last epochs only (grids of every epoch would be noise)."""
        self._is_first = bool(is_first)
        self._want_snapshot = bool(is_first or is_last) and self.num_samples > 0
        self._snapshot = None

    def observe(self, keep_idx: torch.Tensor, samples: Optional[torch.Tensor] = None) -> None:
        """Record one step's (B, K) kept indices; ``samples`` are the matching normalised (B, 3, H, W) inputs."""
        self.freq.update(keep_idx)
        if self._snapshot is not None or not self._want_snapshot or samples is None or not _is_rank_zero():
            return
        n = min(self.num_samples, samples.shape[0], keep_idx.shape[0])
        # Fail on the first step rather than at the end of the epoch if the grid cannot map onto the pixels.
        patch_size_for(samples.shape[-2:], self.grid)
        self._snapshot = (samples[:n].detach().float().cpu(), keep_idx[:n].detach().cpu())

    def end_epoch(self, epoch: int, *, is_last: bool) -> Dict[str, Path]:
        """Reduce counts over ranks, write this epoch's files on rank 0, reset; returns {kind: path} written."""
        self.freq.all_reduce()  # collective: every rank must reach it
        written: Dict[str, Path] = {}
        try:
            if _is_rank_zero():
                written = self._write(epoch, is_last=is_last)
        finally:  # a picture that failed to draw must not carry its counts into the next epoch's
            self.freq.reset()
            self._snapshot = None
            self._want_snapshot = False
        return written

    def _keep_info(self) -> str:
        f = self.freq
        per_image = f.total_kept / f.images if f.images else 0.0
        return f"keep {per_image:.4g}/{f.num_patches} patches"

    def _write(self, epoch: int, *, is_last: bool) -> Dict[str, Path]:
        f = self.freq
        stem = f"epoch{epoch:03d}"
        tag = " (last)" if is_last else (" (first)" if self._is_first else "")
        written = {"heatmap": save_frequency_heatmap(
            f.counts, self.grid, self.out_dir / f"keepfreq_{stem}.png",
            title=f"teacher keep frequency, epoch {epoch}{tag}\n{self._keep_info()}", images=f.images)}
        json_path = self.out_dir / f"keepfreq_{stem}.json"
        json_path.write_text(json.dumps({"grid": list(self.grid), "images": f.images, "total_kept": f.total_kept,
                                         "counts": f.counts.cpu().tolist()}))
        written["counts"] = json_path
        if self._snapshot is not None and (self._is_first or is_last):
            images, keep_idx = self._snapshot
            written["masks"] = save_mask_grid(
                images, keep_idx, self.grid, self.out_dir / f"masks_{stem}.png", mean=self.mean, std=self.std,
                title=f"teacher patches, epoch {epoch}{tag}: {keep_idx.shape[1]}/{f.num_patches} kept",
                ncols=self.ncols)
        return written
