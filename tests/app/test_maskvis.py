"""Tests for maskedkd_app.maskvis: keep-frequency counting, PNG sizes, grey-out blending, recorder output files."""
from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Tuple

import pytest
import torch

from maskedkd_app import maskvis
from maskedkd_app.maskvis import (KeepFrequency, MaskRecorder, grey_out_dropped, mask_grid_size, save_frequency_heatmap,
                                save_mask_grid)

MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.225)
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def png_size(path: Path) -> Tuple[int, int]:
    """(width, height) from the IHDR chunk, which the PNG spec requires to come first."""
    data = Path(path).read_bytes()
    assert data[:8] == PNG_SIGNATURE, "not a PNG file"
    length, chunk_type = struct.unpack(">I4s", data[8:16])
    assert chunk_type == b"IHDR" and length == 13
    return struct.unpack(">II", data[16:24])


def random_keep_idx(batch: int, num_patches: int, keep: int, gen: torch.Generator) -> torch.Tensor:
    """Distinct sorted indices per row, like masking.select_patches returns."""
    return torch.rand(batch, num_patches, generator=gen).argsort(dim=1)[:, :keep].sort(dim=1).values


def test_keep_frequency_matches_python_histogram() -> None:
    gen = torch.Generator().manual_seed(0)
    grid = (3, 4)
    freq = KeepFrequency(grid)
    expected = [0] * 12
    batches = [random_keep_idx(5, 12, 4, gen), random_keep_idx(3, 12, 7, gen), random_keep_idx(1, 12, 12, gen)]
    for keep_idx in batches:
        freq.update(keep_idx)
        for row in keep_idx.tolist():
            for idx in row:
                expected[idx] += 1
    assert freq.counts.dtype == torch.int64
    assert freq.counts.tolist() == expected
    assert freq.images == 9
    assert freq.total_kept == 5 * 4 + 3 * 7 + 1 * 12 == int(freq.counts.sum())
    f = freq.frequency()
    assert torch.allclose(f, torch.tensor(expected, dtype=torch.float32) / 9)
    assert float(f.min()) >= 0.0 and float(f.max()) <= 1.0
    freq.reset()
    assert freq.images == 0 and freq.total_kept == 0 and int(freq.counts.sum()) == 0
    freq.all_reduce()  # not distributed: must be a no-op
    assert int(freq.counts.sum()) == 0


def test_heatmap_png_size(tmp_path: Path) -> None:
    counts = torch.arange(14 * 14, dtype=torch.int64) % 5
    out = save_frequency_heatmap(counts, (14, 14), tmp_path / "sub" / "heat.png", title="epoch 3, keep 49/196",
                                 images=4)
    assert out == tmp_path / "sub" / "heat.png" and out.exists()
    assert png_size(out) == (400, 400)


def test_heatmap_rejects_wrong_count_length(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="grid"):
        save_frequency_heatmap(torch.zeros(10, dtype=torch.int64), (3, 4), tmp_path / "x.png", title="", images=1)


@pytest.mark.parametrize("num_images,ncols", [(8, 4), (5, 4), (3, 4), (1, 2)])
def test_mask_grid_png_size(tmp_path: Path, num_images: int, ncols: int) -> None:
    gen = torch.Generator().manual_seed(1)
    images = torch.randn(num_images, 3, 32, 32, generator=gen)
    keep_idx = random_keep_idx(num_images, 16, 5, gen)
    out = save_mask_grid(images, keep_idx, (4, 4), tmp_path / "grid.png", mean=MEAN, std=STD, title="t",
                         ncols=ncols)
    cols = min(ncols, num_images)
    rows = -(-num_images // cols)
    expected = (cols * 200, rows * 200 + 50)  # documented formula
    assert mask_grid_size(num_images, ncols) == expected
    assert png_size(out) == expected


def test_grey_out_dropped_exact() -> None:
    gen = torch.Generator().manual_seed(2)
    grid = (2, 3)
    images = torch.rand(2, 3, 8, 12, generator=gen)  # patches of 4 x 4 px
    keep_idx = torch.tensor([[0, 4], [1, 2]])
    out = grey_out_dropped(images, keep_idx, grid, grey=0.5, strength=0.8)
    assert out.shape == images.shape
    for n in range(2):
        kept = set(keep_idx[n].tolist())
        for p in range(6):
            r, c = divmod(p, 3)
            sl = (n, slice(None), slice(4 * r, 4 * r + 4), slice(4 * c, 4 * c + 4))
            if p in kept:
                assert torch.equal(out[sl], images[sl]), f"kept patch {p} of image {n} changed"
            else:
                blended = images[sl] * 0.2 + 0.5 * 0.8
                torch.testing.assert_close(out[sl], blended, rtol=0, atol=1e-6)
    assert torch.equal(images, images.clone())  # input untouched (sanity: function is pure)


def test_grey_out_custom_strength() -> None:
    images = torch.ones(1, 3, 4, 4)
    out = grey_out_dropped(images, torch.tensor([[0]]), (2, 2), grey=0.0, strength=1.0)
    assert torch.equal(out[0, :, :2, :2], torch.ones(3, 2, 2))
    assert torch.equal(out[0, :, 2:, :], torch.zeros(3, 2, 4))


def test_non_divisible_grid_raises(tmp_path: Path) -> None:
    images = torch.rand(1, 3, 30, 30)
    keep_idx = torch.tensor([[0, 1]])
    with pytest.raises(ValueError, match=r"does not divide the 30x30 image evenly"):
        grey_out_dropped(images, keep_idx, (4, 4))
    with pytest.raises(ValueError, match="divide"):
        save_mask_grid(images, keep_idx, (4, 4), tmp_path / "bad.png", mean=MEAN, std=STD, title="")
    rec = MaskRecorder(tmp_path, (4, 4), mean=MEAN, std=STD)
    rec.start_epoch(0, is_first=True, is_last=False)
    with pytest.raises(ValueError, match="divide"):
        rec.observe(keep_idx, images)


def test_keep_idx_out_of_range_raises() -> None:
    with pytest.raises(ValueError, match="keep_idx"):
        grey_out_dropped(torch.rand(1, 3, 8, 8), torch.tensor([[4]]), (2, 2))


def test_recorder_two_epochs(tmp_path: Path) -> None:
    gen = torch.Generator().manual_seed(3)
    grid, keep, batch, steps = (4, 4), 6, 5, 3
    rec = MaskRecorder(tmp_path / "vis", grid, mean=MEAN, std=STD, num_samples=4)
    num_epochs = 2
    for epoch in range(num_epochs):
        is_first, is_last = epoch == 0, epoch == num_epochs - 1
        rec.start_epoch(epoch, is_first=is_first, is_last=is_last)
        for _ in range(steps):
            rec.observe(random_keep_idx(batch, 16, keep, gen), torch.randn(batch, 3, 32, 32, generator=gen))
        written = rec.end_epoch(epoch, is_last=is_last)
        assert set(written) == {"heatmap", "counts", "masks"}
        assert rec.freq.images == 0  # reset after writing

    out = tmp_path / "vis"
    names = sorted(p.name for p in out.iterdir())
    assert names == ["keepfreq_epoch000.json", "keepfreq_epoch000.png", "keepfreq_epoch001.json",
                     "keepfreq_epoch001.png", "masks_epoch000.png", "masks_epoch001.png"]
    for epoch in range(num_epochs):
        data = json.loads((out / f"keepfreq_epoch{epoch:03d}.json").read_text())
        assert data["grid"] == [4, 4]
        assert data["images"] == batch * steps
        assert data["total_kept"] == batch * steps * keep == sum(data["counts"])
        assert len(data["counts"]) == 16
        assert png_size(out / f"keepfreq_epoch{epoch:03d}.png") == (400, 400)
        assert png_size(out / f"masks_epoch{epoch:03d}.png") == mask_grid_size(4, 4) == (800, 250)


def test_recorder_middle_epoch_has_no_mask_grid(tmp_path: Path) -> None:
    rec = MaskRecorder(tmp_path, (2, 2), mean=MEAN, std=STD, num_samples=2)
    rec.start_epoch(1, is_first=False, is_last=False)
    rec.observe(torch.tensor([[0, 3], [1, 2]]), torch.randn(2, 3, 8, 8))
    written = rec.end_epoch(1, is_last=False)
    assert set(written) == {"heatmap", "counts"}
    assert not (tmp_path / "masks_epoch001.png").exists()
    assert json.loads((tmp_path / "keepfreq_epoch001.json").read_text())["counts"] == [1, 1, 1, 1]


def test_module_does_not_switch_pyplot_backend() -> None:
    # The module must draw without pyplot so a training script's backend choice is left alone.
    assert not hasattr(maskvis, "plt")


def test_all_reduce_single_rank_gloo(tmp_path: Path) -> None:
    # A world of one exercises the packed all_reduce path (counts + images + total_kept) without extra processes.
    dist = torch.distributed
    if not dist.is_available() or dist.is_initialized():
        pytest.skip("torch.distributed unavailable or already initialised")
    try:
        dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    except Exception as exc:  # sandbox without a usable loopback device
        pytest.skip(f"cannot start gloo: {exc}")
    try:
        rec = MaskRecorder(tmp_path / "vis", (2, 2), mean=MEAN, std=STD, num_samples=2)
        rec.start_epoch(0, is_first=True, is_last=True)
        rec.observe(torch.tensor([[0, 3], [1, 3]]), torch.randn(2, 3, 8, 8))
        written = rec.end_epoch(0, is_last=True)
        assert set(written) == {"heatmap", "counts", "masks"}
        data = json.loads(written["counts"].read_text())
        assert data == {"grid": [2, 2], "images": 2, "total_kept": 4, "counts": [1, 1, 0, 2]}
    finally:
        dist.destroy_process_group()
