"""elanet.data: tiny datasets written in the real on-disk formats, checked against hand computations."""
from __future__ import annotations

import pickle

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from elanet.data import CIFAR_MEAN, CIFAR_STD, IMAGENET_MEAN, IMAGENET_STD, build_data
from elanet.data.memory import crop_flip, crop_flip_params
from elanet.data.sharding import shard_indices

C10 = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


def write_cifar10(root, x_train, y_train, x_test, y_test):
    """torchvision's cifar-10-batches-py: five pickled train batches, a test batch, batches.meta (bytes keys)."""
    d = root / "cifar-10-batches-py"
    d.mkdir(parents=True)
    for i, part in enumerate(np.array_split(np.arange(len(x_train)), 5), 1):
        with open(d / f"data_batch_{i}", "wb") as f:
            pickle.dump({b"batch_label": b"x", b"data": x_train[part].reshape(len(part), -1),
                         b"labels": [int(v) for v in y_train[part]]}, f, protocol=2)
    with open(d / "test_batch", "wb") as f:
        pickle.dump({b"data": x_test.reshape(len(x_test), -1), b"labels": [int(v) for v in y_test]}, f, protocol=2)
    with open(d / "batches.meta", "wb") as f:
        pickle.dump({b"label_names": [c.encode() for c in C10], b"num_vis": 3072}, f, protocol=2)
    return d


def random_cifar(rng, n):
    return rng.integers(0, 256, (n, 3, 32, 32), dtype=np.uint8), rng.integers(0, 10, n)


def unnormalize(x, mean, std):
    """Normalised float batch back to uint8 pixels."""
    m = torch.tensor(mean).view(1, -1, 1, 1)
    s = torch.tensor(std).view(1, -1, 1, 1)
    return torch.round((x * s + m) * 255).to(torch.uint8)


def test_cifar10_pickles_shapes_and_normalisation(tmp_path):
    rng = np.random.default_rng(0)
    (xtr, ytr), (xte, yte) = random_cifar(rng, 20), random_cifar(rng, 10)
    write_cifar10(tmp_path, xtr, ytr, xte, yte)
    data = build_data("cifar10", data_dir=str(tmp_path), batch_size=8, eval_batch_size=4)
    assert (data.num_classes, data.in_chans, data.image_size, data.classes) == (10, 3, 32, C10)
    assert data.mean == CIFAR_MEAN and data.std == CIFAR_STD
    assert (len(data.train), len(data.test)) == (2, 3)  # 20 // 8 (partial batch dropped); ceil(10 / 4)
    batches = list(data.test)
    assert [len(y) for _, y in batches] == [4, 4, 2]
    x = torch.cat([b[0] for b in batches])
    y = torch.cat([b[1] for b in batches])
    assert x.dtype == torch.float32 and y.dtype == torch.int64 and x.shape == (10, 3, 32, 32)
    want = (xte / 255.0 - np.array(CIFAR_MEAN)[:, None, None]) / np.array(CIFAR_STD)[:, None, None]
    torch.testing.assert_close(x, torch.from_numpy(want).float(), atol=1e-5, rtol=0)
    assert y.tolist() == yte.tolist()
    xs, ys = data.sample_images(3)
    torch.testing.assert_close(xs, x[:3])
    assert ys.tolist() == yte[:3].tolist()
    xb, yb = next(iter(data.train))
    assert xb.shape == (8, 3, 32, 32) and yb.dtype == torch.int64 and 0 <= yb.min() and yb.max() < 10


def test_cifar100_fine_labels_and_names(tmp_path):
    rng = np.random.default_rng(1)
    d = tmp_path / "cifar-100-python"
    d.mkdir()
    names = [f"class{i:03d}" for i in range(100)]
    for split, n in (("train", 12), ("test", 6)):
        x = rng.integers(0, 256, (n, 3072), dtype=np.uint8)
        fine = rng.integers(0, 100, n)
        with open(d / split, "wb") as f:
            pickle.dump({b"data": x, b"fine_labels": fine.tolist(), b"coarse_labels": (fine // 5).tolist()}, f)
        if split == "test":
            x_test, fine_test = x, fine
    with open(d / "meta", "wb") as f:
        pickle.dump({b"fine_label_names": [s.encode() for s in names],
                     b"coarse_label_names": [b"c"] * 20}, f)
    data = build_data("cifar100", data_dir=str(d), batch_size=4)  # the cifar-100-python folder itself works too
    assert (data.num_classes, data.classes, len(data.train), len(data.test)) == (100, names, 3, 2)
    x, y = (torch.cat(t) for t in zip(*data.test))
    assert y.tolist() == fine_test.tolist()
    assert torch.equal(unnormalize(x, CIFAR_MEAN, CIFAR_STD).flatten(1), torch.from_numpy(x_test))


def test_crop_flip_matches_per_sample_crop():
    x = torch.randint(0, 256, (16, 3, 6, 7), dtype=torch.uint8)
    params = crop_flip_params(16, pad=2, flip=True, generator=torch.Generator().manual_seed(3))
    again = crop_flip_params(16, pad=2, flip=True, generator=torch.Generator().manual_seed(3))
    assert all(torch.equal(a, b) for a, b in zip(params, again))
    top, left, mirror = params
    assert 0 <= top.min() and top.max() <= 4 and 0 <= left.min() and left.max() <= 4
    assert (top != 2).any() and (left != 2).any() and mirror.any() and not mirror.all()
    out = crop_flip(x, pad=2, top=top, left=left, mirror=mirror)
    padded = F.pad(x, (2, 2, 2, 2))
    for b in range(16):
        want = padded[b, :, top[b]:top[b] + 6, left[b]:left[b] + 7]
        if mirror[b]:
            want = want.flip(-1)
        assert torch.equal(out[b], want)
    _, _, no_mirror = crop_flip_params(16, pad=1, flip=False, generator=torch.Generator().manual_seed(3))
    assert not no_mirror.any()


def test_train_batches_are_crops_of_training_images_and_epochs_reshuffle(tmp_path):
    rng = np.random.default_rng(2)
    (xtr, ytr), (xte, yte) = random_cifar(rng, 20), random_cifar(rng, 5)
    write_cifar10(tmp_path, xtr, ytr, xte, yte)
    data = build_data("cifar10", data_dir=str(tmp_path), batch_size=10, seed=7)
    x, y = (torch.cat(t) for t in zip(*data.train))
    assert torch.equal(x, torch.cat([b[0] for b in data.train]))  # a second pass of epoch 0 is identical
    # Independent check: each augmented image is some (source, offset, flip) of the padded training images.
    pixels = unnormalize(x, CIFAR_MEAN, CIFAR_STD)
    padded = F.pad(torch.from_numpy(xtr), (4, 4, 4, 4))
    windows = padded.unfold(2, 32, 1).unfold(3, 32, 1)  # [20, 3, 9, 9, 32, 32]
    found = []
    for img, label in zip(pixels, y):
        for mirror in (False, True):
            target = img.flip(-1) if mirror else img
            hit = (windows == target[:, None, None]).flatten(4).all(-1).all(1).nonzero()
            if len(hit):
                src, top, left = hit[0].tolist()
                found.append((src, top, left, mirror))
                assert ytr[src] == label
                break
        else:
            pytest.fail("a training image is not a padded crop/flip of any source image")
    assert len({f[0] for f in found}) == 20  # the epoch visits every image once
    assert any((t, l) != (4, 4) for _, t, l, _ in found) and any(m for *_, m in found)
    data.train.set_epoch(1)
    x1, y1 = (torch.cat(t) for t in zip(*data.train))
    assert not torch.equal(x1, x)
    other = build_data("cifar10", data_dir=str(tmp_path), batch_size=10, seed=7)
    other.train.set_epoch(1)  # a resumed run sees the same order and augmentation
    assert torch.equal(torch.cat([b[0] for b in other.train]), x1)
    other.train.set_epoch(0)
    assert torch.equal(torch.cat([b[1] for b in other.train]), y)


def test_rank_shards_are_disjoint_and_cover(tmp_path):
    # Constant images coded by index, so the centre pixel survives any crop and names the sample.
    ids = np.arange(20)
    xtr = np.broadcast_to((ids * 10 + 3).astype(np.uint8)[:, None, None, None], (20, 3, 32, 32)).copy()
    xte = xtr[:10].copy()
    write_cifar10(tmp_path, xtr, ids % 10, xte, ids[:10] % 10)
    train_ids, test_ids = [], []
    for rank in range(3):
        data = build_data("cifar10", data_dir=str(tmp_path), batch_size=2, rank=rank, world_size=3, seed=5)
        assert (len(data.train), len(data.test)) == (3, [2, 2, 2][rank])  # 6 // 2; ceil([4, 3, 3] / 2)
        data.train.set_epoch(4)
        for split, out in ((data.train, train_ids), (data.test, test_ids)):
            x = torch.cat([b[0] for b in split])
            out.append(((unnormalize(x, CIFAR_MEAN, CIFAR_STD)[:, 0, 16, 16].int() - 3) // 10).tolist())
    assert [len(s) for s in train_ids] == [6, 6, 6]
    assert len(set(sum(train_ids, []))) == 18  # disjoint; 20 % 3 = 2 samples skipped this epoch
    assert sorted(sum(test_ids, [])) == list(range(10))  # every test sample exactly once
    for e in range(3):  # the skipped samples change with the epoch; all ranks agree on the permutation
        shards = [shard_indices(10, train=True, rank=r, world_size=4, seed=0, epoch=e) for r in range(4)]
        flat = torch.cat(shards)
        assert [len(s) for s in shards] == [2] * 4 and len(set(flat.tolist())) == 8


def test_digits_split_and_shapes():
    from sklearn.datasets import load_digits

    data = build_data("digits", batch_size=64, seed=3)
    assert (data.num_classes, data.in_chans, data.image_size, data.classes) == (10, 1, 8, [str(i) for i in range(10)])
    x, y = (torch.cat(t) for t in zip(*data.test))
    assert x.shape == (360, 1, 8, 8) and len(data.train) == 1437 // 64
    counts = torch.bincount(y, minlength=10)
    assert counts.min() >= 35 and counts.max() <= 37  # stratified 20 %: ~36 per class
    raw = torch.round((x * data.std[0] + data.mean[0]) * 16)
    all_images = torch.from_numpy(load_digits().images).flatten(1)
    match = (raw.flatten(1)[:, None] == all_images[None]).all(-1)
    assert match.any(1).all()  # every test image is a bundled digit ...
    assert 0.25 < data.mean[0] < 0.35 and 0.3 < data.std[0] < 0.45  # stats of pixel / 16 on the train split
    xt, _ = next(iter(data.train))
    assert xt.shape == (64, 1, 8, 8)
    same = build_data("digits", batch_size=64, seed=99)  # the split does not depend on the seed
    assert torch.equal(torch.cat([b[1] for b in same.test]), y)


def write_folder(root, classes, n_per_class, colour=None, size=(48, 40), rng=None):
    for k, c in enumerate(classes):
        (root / c).mkdir(parents=True)
        for i in range(n_per_class):
            if colour is not None:
                img = Image.new("RGB", size, colour(k, i))
            elif i == 0:  # a grayscale file: ImageFolder converts it to RGB
                img = Image.fromarray(rng.integers(0, 256, size[::-1], dtype=np.uint8), mode="L")
            else:
                img = Image.fromarray(rng.integers(0, 256, (*size[::-1], 3), dtype=np.uint8))
            img.save(root / c / f"{i}.png")


def colour(k, i):
    return (20 * k + 10, 100 + i, 250 - 30 * k)


def test_image_folder_pipeline(tmp_path):
    rng = np.random.default_rng(4)
    classes = ["cat", "dog", "eel"]
    write_folder(tmp_path / "train", classes, 3, rng=rng)
    write_folder(tmp_path / "val", classes, 2, colour=colour)
    data = build_data("folder", data_dir=str(tmp_path), batch_size=4, workers=0, image_size=32, seed=1)
    assert (data.num_classes, data.classes, data.in_chans, data.image_size) == (3, classes, 3, 32)
    assert (len(data.train), len(data.test)) == (2, 2)  # 9 // 4; ceil(6 / 4)
    x, y = (torch.cat(t) for t in zip(*data.test))
    assert x.shape == (6, 3, 32, 32) and y.tolist() == [0, 0, 1, 1, 2, 2]
    mean, std = torch.tensor(IMAGENET_MEAN), torch.tensor(IMAGENET_STD)
    want = torch.stack([(torch.tensor(colour(k, i)) / 255 - mean) / std for k in range(3) for i in range(2)])
    torch.testing.assert_close(x, want[:, :, None, None].expand_as(x), atol=1e-5, rtol=0)  # resize of a flat image
    xs, ys = data.sample_images(4)
    torch.testing.assert_close(xs, x[:4])
    assert ys.tolist() == [0, 0, 1, 1]
    xt, yt = (torch.cat(t) for t in zip(*data.train))
    assert xt.shape == (8, 3, 32, 32) and yt.dtype == torch.int64 and set(yt.tolist()) <= {0, 1, 2}
    assert torch.equal(torch.cat([b[0] for b in data.train]), xt)  # augmentation seeded by (seed, epoch, index)
    two_workers = build_data("folder", data_dir=str(tmp_path), batch_size=4, workers=2, image_size=32, seed=1)
    assert torch.equal(torch.cat([b[0] for b in two_workers.train]), xt)  # independent of the worker count
    data.train.set_epoch(1)
    assert not torch.equal(torch.cat([b[0] for b in data.train]), xt)


def expect(exc, match, **kwargs):
    with pytest.raises(exc, match=match) as info:
        build_data(**kwargs)
    assert "\n" not in str(info.value)


def test_bad_inputs_raise_one_line_errors(tmp_path):
    expect(ValueError, "unknown dataset 'mnist'.*digits, cifar10, cifar100, imagenet, folder", name="mnist")
    expect(ValueError, "needs --data-dir", name="cifar10")
    expect(FileNotFoundError, "does not exist.*--download", name="cifar10", data_dir=str(tmp_path / "nope"))
    expect(FileNotFoundError, "data_batch_1.*--download", name="cifar10", data_dir=str(tmp_path))
    expect(ValueError, "32x32", name="cifar10", data_dir=str(tmp_path), image_size=64)
    rng = np.random.default_rng(5)
    (xtr, ytr), (xte, yte) = random_cifar(rng, 10), random_cifar(rng, 5)
    d = write_cifar10(tmp_path / "c10", xtr, ytr, xte, yte)
    (d / "data_batch_3").write_bytes(b"\x80\x02}q\x00(U\x04data")  # truncated pickle
    expect(ValueError, "data_batch_3.*--download", name="cifar10", data_dir=str(tmp_path / "c10"))
    with open(d / "data_batch_3", "wb") as f:
        pickle.dump({b"data": xtr[:2].reshape(2, -1), b"labels": [3, 11]}, f)
    expect(ValueError, "labels outside 0..9", name="cifar10", data_dir=str(tmp_path / "c10"))

    folder = tmp_path / "imgs"
    write_folder(folder / "train", ["a", "b"], 1, colour=colour)
    expect(FileNotFoundError, "lacks val/", name="folder", data_dir=str(folder))
    (folder / "val" / "a").mkdir(parents=True)
    expect(FileNotFoundError, "val: no images found", name="imagenet", data_dir=str(folder))
    mismatch = tmp_path / "mismatch"
    write_folder(mismatch / "train", ["a", "b"], 1, colour=colour)
    write_folder(mismatch / "val", ["a", "c"], 1, colour=colour)
    expect(ValueError, r"different classes \(only in train: \['b'\], only in val: \['c'\]\)",
           name="folder", data_dir=str(mismatch))
    expect(ValueError, "cannot be downloaded", name="folder", data_dir=str(folder), download=True)
    expect(ValueError, "rank", name="digits", rank=2, world_size=2)
