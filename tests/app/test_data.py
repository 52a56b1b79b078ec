"""Data sets, transforms, samplers, loaders and metric logging (CPU, no files beyond tmp_path)."""
from __future__ import annotations

import builtins
import socket
from collections import Counter
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import SequentialSampler
from torchvision import transforms

from maskedkd_app import distributed
from maskedkd_app.data import (DATASETS, DataError, ProceduralObjects, RASampler, build_dataset, build_loaders,
                             build_transform, data_stats)
from maskedkd_app.distributed import MetricLogger, SmoothedValue, all_reduce_mean


def make_args(**overrides) -> SimpleNamespace:
    args = dict(data_set="PROCEDURAL", data_path="/nonexistent", input_size=32, batch_size=8, num_workers=0,
                pin_mem=False, seed=0, distributed=False, dist_eval=False, repeated_aug=False,
                procedural_train_size=40, procedural_val_size=20)
    args.update(overrides)
    return SimpleNamespace(**args)


# ---------------------------------------------------------------------------------------------- procedural


def test_procedural_is_deterministic_per_seed_split_and_index():
    first = ProceduralObjects(20, seed=3)
    again = ProceduralObjects(20, seed=3)
    image, label = first[7]
    assert image.shape == (3, 32, 32) and image.dtype == torch.float32
    assert torch.equal(image, again[7][0]) and label == again[7][1]
    assert not torch.equal(image, first[8][0])
    assert not torch.equal(image, ProceduralObjects(20, seed=3, split="val")[7][0])
    assert not torch.equal(image, ProceduralObjects(20, seed=4)[7][0])


def test_procedural_labels_cover_every_class():
    dataset = ProceduralObjects(50, num_classes=10)
    labels = [dataset[i][1] for i in range(len(dataset))]
    assert set(labels) == set(range(10))
    assert max(Counter(labels).values()) == 5  # balanced


def test_label_noise_flips_the_asked_share_to_other_classes_and_leaves_images_alone():
    clean, noisy = ProceduralObjects(4000), ProceduralObjects(4000, label_noise=0.3)
    shown = np.array([clean.label(i) for i in range(4000)])
    returned = np.array([noisy[i][1] for i in range(4000)])
    flipped = returned != shown
    # Binomial(4000, 0.3): standard deviation 0.007, so +-0.03 fails only on a wrong rate.
    assert abs(flipped.mean() - 0.3) < 0.03
    # A flip goes to any other class with equal chance: every class pair occurs, none dominates.
    pairs = Counter(zip(shown[flipped].tolist(), returned[flipped].tolist()))
    assert len(pairs) == 90 and max(pairs.values()) < 3 * len(returned[flipped]) / 90
    for i in (0, 11, 123):
        assert torch.equal(clean[i][0], noisy[i][0]) and noisy.label(i) == clean.label(i)
    assert [noisy[i][1] for i in range(50)] == [ProceduralObjects(4000, label_noise=0.3)[i][1] for i in range(50)]
    assert [clean[i][1] for i in range(50)] == shown[:50].tolist()


def test_label_noise_reaches_training_labels_only():
    args = make_args(procedural_train_size=400, procedural_val_size=400, procedural_label_noise=0.5)
    train, _ = build_dataset(True, args)
    val, _ = build_dataset(False, args)
    assert train.label_noise == 0.5 and val.label_noise == 0.0
    assert sum(val[i][1] != val.label(i) for i in range(0, 400, 7)) == 0
    assert sum(train.target(i) != train.label(i) for i in range(400)) > 150


@pytest.mark.parametrize("noise", [-0.1, 0.9, 1.0])
def test_label_noise_that_would_hide_the_class_is_refused(noise):
    with pytest.raises(DataError, match="label_noise"):
        ProceduralObjects(10, num_classes=10, label_noise=noise)


def test_procedural_tensor_path_matches_totensor_normalize():
    mean, std = (0.5, 0.4, 0.3), (0.2, 0.25, 0.3)
    plain = ProceduralObjects(5, mean=mean, std=std)
    via_pil = ProceduralObjects(5, mean=mean, std=std,
                                transform=transforms.Compose([transforms.ToTensor(), transforms.Normalize(mean, std)]))
    torch.testing.assert_close(plain[2][0], via_pil[2][0])


@pytest.mark.parametrize("img_size", [32, 64])
def test_object_box_is_inside_the_image_and_holds_the_object(img_size):
    dataset = ProceduralObjects(30, img_size=img_size)
    for index in range(len(dataset)):
        y0, x0, y1, x1 = dataset.object_box(index)
        assert 0 <= y0 < y1 <= img_size and 0 <= x0 < x1 <= img_size
        # The brief's size: roughly 10-20% of the image for the bounding box (rotation and thin bars vary it).
        assert 0.03 <= (y1 - y0) * (x1 - x0) / img_size ** 2 <= 0.35
        pixels = dataset.render(index).astype(np.float32)
        box = np.zeros(pixels.shape[:2], dtype=bool)
        box[y0:y1, x0:x1] = True
        # The object is a flat colour painted over clutter: its box departs from the background average more
        # than the clutter elsewhere does.
        background = pixels[~box].mean(axis=0)
        inside = np.abs(pixels[box] - background).sum(axis=1).mean()
        outside = np.abs(pixels[~box] - background).sum(axis=1).mean()
        assert inside > outside, f"index {index}: object box is indistinguishable from clutter"


def test_clutter_carries_no_label():
    # Outside the object the image is exactly the clutter, and the clutter of an index stays the same when
    # its label changes (10 vs 7 classes relabels index 12 from 2 to 5): only the object can decide the class.
    ten, seven = ProceduralObjects(20, num_classes=10), ProceduralObjects(20, num_classes=7)
    assert ten.label(12) != seven.label(12)
    np.testing.assert_array_equal(ten._clutter(12), seven._clutter(12))
    alpha, _ = ten._object(12)
    assert (alpha > 0.99).sum() > 20
    clutter = np.clip(ten._clutter(12) * 255.0 + 0.5, 0, 255).astype(np.uint8).transpose(1, 2, 0)
    outside = alpha == 0
    np.testing.assert_array_equal(ten.render(12)[outside], clutter[outside])
    assert not np.array_equal(ten.render(12), clutter)


def test_procedural_rejects_bad_arguments():
    with pytest.raises(DataError, match="split"):
        ProceduralObjects(10, split="test")
    with pytest.raises(DataError, match="nb-classes"):
        ProceduralObjects(10, num_classes=1000)


def test_build_transform_on_procedural_images():
    args = make_args()
    train = ProceduralObjects(4, transform=build_transform(True, args))
    val = ProceduralObjects(4, transform=build_transform(False, args))
    assert train[0][0].shape == (3, 32, 32) and val[0][0].shape == (3, 32, 32)
    assert isinstance(build_transform(True, args).transforms[0], transforms.RandomCrop)  # DeiT's CIFAR crop
    big = build_transform(False, make_args(input_size=64))
    assert isinstance(big.transforms[0], transforms.Resize) and big.transforms[0].size == int(64 / 0.875)
    # At 32 px eval keeps the whole image (no 0.875 crop): a 32 px input passes through unchanged.
    pixels = ProceduralObjects(1).render(0)
    expected = transforms.Normalize(*data_stats(args))(transforms.ToTensor()(pixels))
    torch.testing.assert_close(build_transform(False, args)(Image.fromarray(pixels)), expected)


def test_data_stats_prefers_args():
    mean, std = data_stats(make_args(data_mean=(0.1, 0.2, 0.3), data_std=(1.0, 1.0, 1.0)))
    assert mean == (0.1, 0.2, 0.3) and std == (1.0, 1.0, 1.0)
    assert data_stats(make_args())[0] == pytest.approx((0.485, 0.456, 0.406))


def test_build_dataset_procedural():
    args = make_args(nb_classes=12, procedural_train_size=30)
    train, classes = build_dataset(True, args)
    val, _ = build_dataset(False, args)
    assert classes == 12 and len(train) == 30 and len(val) == 20
    assert train[0][0].shape == val[0][0].shape == (3, 32, 32)
    assert not torch.equal(train[5][0], val[5][0])  # disjoint splits
    assert all(0 <= val[i][1] < 12 for i in range(len(val)))


# ----------------------------------------------------------------------------------------------- registry


def write_tree(root, splits=("train", "val"), classes=("cat", "dog")):
    for split in splits:
        for class_index, name in enumerate(classes):
            folder = root / split / name
            folder.mkdir(parents=True)
            for i in range(2):
                Image.new("RGB", (40, 40), (40 * class_index, 10 * i, 90)).save(folder / f"{i}.png")


@pytest.mark.parametrize("name", ["IMFOLDER", "IMNET", "imfolder"])
def test_image_folder_from_a_tiny_tree(tmp_path, name):
    write_tree(tmp_path)
    args = make_args(data_set=name, data_path=str(tmp_path))
    train, classes = build_dataset(True, args)
    val, _ = build_dataset(False, args)
    assert classes == 2 and len(train) == len(val) == 4
    assert val[3][0].shape == (3, 32, 32) and val[3][1] == 1


def test_image_folder_without_val_names_the_missing_folder(tmp_path):
    write_tree(tmp_path, splits=("train",))
    with pytest.raises(DataError, match=r"val/.*<data-path>/val/<class>/\*\.jpg"):
        build_dataset(True, make_args(data_set="IMFOLDER", data_path=str(tmp_path)))


def test_image_folder_with_different_classes_is_refused(tmp_path):
    write_tree(tmp_path, splits=("train",))
    write_tree(tmp_path, splits=("val",), classes=("cat", "emu"))
    with pytest.raises(DataError, match="emu"):
        build_dataset(False, make_args(data_set="IMFOLDER", data_path=str(tmp_path)))


def test_unknown_dataset_lists_choices():
    with pytest.raises(DataError, match="CIFAR10.*PROCEDURAL"):
        build_dataset(True, make_args(data_set="MNIST"))
    assert issubclass(DataError, ValueError)
    assert {"IMNET", "IMFOLDER", "CIFAR10", "CIFAR100", "PROCEDURAL"} <= set(DATASETS)


def test_missing_cifar_says_where_to_put_it(tmp_path):
    with pytest.raises(DataError, match="cifar-10-batches-py"):
        build_dataset(True, make_args(data_set="CIFAR10", data_path=str(tmp_path)))


# ----------------------------------------------------------------------------------------------- samplers


def test_rasampler_repeats_each_sample_across_replicas():
    dataset = list(range(12))
    samplers = [RASampler(dataset, num_replicas=2, rank=rank, num_repeats=3) for rank in range(2)]
    passes = [list(sampler) for sampler in samplers]
    assert [len(p) for p in passes] == [len(s) for s in samplers] == [6, 6]  # an epoch costs one dataset pass
    counts = Counter(passes[0] + passes[1])
    assert len(counts) == 4 and set(counts.values()) == {3}  # 12 draws = 4 distinct samples x 3 repeats
    # Repeats are interleaved over ranks: every sample seen in the epoch reaches both replicas.
    assert set(passes[0]) == set(passes[1])
    assert list(samplers[0]) == passes[0]  # same epoch, same order
    samplers[0].set_epoch(1)
    assert list(samplers[0]) != passes[0]


def test_build_loaders_single_process():
    args = make_args(batch_size=4)
    train, _ = build_dataset(True, args)
    val, _ = build_dataset(False, args)
    loader_train, loader_val, sampler = build_loaders(args, train, val)
    assert loader_train.sampler is sampler and isinstance(loader_val.sampler, SequentialSampler)
    assert len(loader_train) == 10 and loader_train.drop_last
    assert loader_val.batch_size == 6 and len(loader_val) == 4
    images, labels = next(iter(loader_train))
    assert images.shape == (4, 3, 32, 32) and labels.shape == (4,)
    # The shuffle is a function of (args.seed, epoch): a rebuilt loader repeats it, set_epoch changes it.
    order = list(sampler)
    assert sorted(order) == list(range(len(train))) and order != sorted(order)
    _, _, rebuilt = build_loaders(args, train, val)
    assert list(rebuilt) == order
    rebuilt.set_epoch(1)
    assert list(rebuilt) != order
    _, _, other_seed = build_loaders(make_args(batch_size=4, seed=1), train, val)
    assert list(other_seed) != order


# -------------------------------------------------------------------------------------------- distributed


def test_smoothed_value_math():
    meter = SmoothedValue(window_size=3)
    for value, n in [(1.0, 1), (2.0, 1), (4.0, 2), (10.0, 1)]:
        meter.update(value, n=n)
    assert meter.global_avg == pytest.approx((1 + 2 + 8 + 10) / 5)
    assert meter.median == 4.0 and meter.max == 10.0 and meter.value == 10.0
    assert meter.avg == pytest.approx((2 + 4 + 10) / 3)  # window of 3 drops the first value


def test_metric_logger_accepts_floats_and_scalar_tensors():
    logger = MetricLogger(delimiter=" | ")
    logger.update(loss=1.0, acc=torch.tensor(0.5))
    logger.update(loss=3, acc=torch.tensor(1.0))
    assert logger.global_averages() == pytest.approx({"loss": 2.0, "acc": 0.75})
    assert logger.loss.value == 3.0 and "loss: " in str(logger) and " | " in str(logger)
    with pytest.raises(ValueError, match="shape"):
        logger.update(loss=torch.ones(3))
    with pytest.raises(AttributeError):
        logger.missing


def test_log_every_yields_everything_and_prints(capsys):
    logger = MetricLogger()
    seen = []
    for item in logger.log_every(range(5), print_freq=2, header="Epoch: [0]"):
        logger.update(loss=float(item))
        seen.append(item)
    out = capsys.readouterr().out
    assert seen == list(range(5))
    assert "Epoch: [0]" in out and "eta:" in out and "[4/5]" in out and "Total time" in out


def test_single_process_helpers(monkeypatch):
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    args = SimpleNamespace(device="cpu")
    distributed.init_distributed_mode(args)
    assert (args.distributed, args.rank, args.world_size, args.gpu) == (False, 0, 1, None)
    assert distributed.get_world_size() == 1 and distributed.is_main_process()
    assert all_reduce_mean(2.5) == 2.5
    distributed.barrier()
    distributed.cleanup()


def test_setup_for_distributed_silences_non_master(capsys):
    try:
        distributed.setup_for_distributed(False)
        print("hidden")
        print("shown", force=True)
    finally:
        distributed.setup_for_distributed(True)
    print("restored")
    out = capsys.readouterr().out
    assert "hidden" not in out and "shown" in out and "restored" in out
    assert builtins.print is distributed._BUILTIN_PRINT


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_gloo_group_of_one(monkeypatch):
    # A real (world size 1) process group exercises the collective code paths without spawning processes.
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "1")
    monkeypatch.setenv("LOCAL_RANK", "0")
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", str(_free_port()))
    args = SimpleNamespace(device="cpu")
    try:
        distributed.init_distributed_mode(args)
        assert args.distributed and args.dist_backend == "gloo" and distributed.is_dist_avail_and_initialized()
        assert all_reduce_mean(3.0) == 3.0
        meter = SmoothedValue()
        meter.update(2.0, n=4)
        meter.synchronize_between_processes()
        assert (meter.count, meter.global_avg) == (4, 2.0)
        args.dist_eval, args.repeated_aug, args.batch_size, args.num_workers = True, True, 2, 0
        loader_train, loader_val, sampler = build_loaders(args, list(range(10)), list(range(5)))
        assert isinstance(sampler, RASampler) and len(loader_val.sampler) == 5
    finally:
        distributed.cleanup()
    assert not distributed.is_dist_avail_and_initialized()
