"""bnlib.data: the synthetic set, splits, load_data, augmentation and the CIFAR loader."""
import hashlib
import io
import pickle
import struct

import numpy as np
import pytest
import torch
import torchvision

import bnlib
from bnlib.data import augment, load_data, make_synthetic, stratified_split

CPU = torch.device("cpu")


# ----------------------------------------------------------------------------------------------
# make_synthetic
# ----------------------------------------------------------------------------------------------

def test_synthetic_shapes_and_dtypes():
    x, y = make_synthetic(37, seed=0)
    assert x.shape == (37, 3, 32, 32) and x.dtype == np.uint8
    assert y.shape == (37,) and y.dtype == np.int64
    assert set(np.unique(y)) <= set(range(10))
    assert x.min() < 60 and x.max() > 200  # uses the pixel range, not a constant image
    x16, _ = make_synthetic(5, seed=0, size=16)
    assert x16.shape == (5, 3, 16, 16)


def test_synthetic_deterministic():
    x1, y1 = make_synthetic(50, seed=3)
    x2, y2 = make_synthetic(50, seed=3)
    assert np.array_equal(x1, x2) and np.array_equal(y1, y2)
    x3, y3 = make_synthetic(50, seed=4)
    assert not np.array_equal(x1, x3)
    assert not np.array_equal(y1, y3)


def test_synthetic_train_and_test_streams_differ():
    xtr, _ = make_synthetic(50, seed=0, split="train")
    xte, _ = make_synthetic(50, seed=0, split="test")
    assert not np.array_equal(xtr, xte)
    tr = {im.tobytes() for im in xtr}
    assert not any(im.tobytes() in tr for im in xte)
    with pytest.raises(KeyError):
        make_synthetic(5, split="val")


@pytest.mark.parametrize("n", [10, 100, 103, 7])
def test_synthetic_labels_balanced(n):
    _, y = make_synthetic(n, seed=1)
    counts = np.bincount(y, minlength=10)
    assert counts.sum() == n
    assert counts.max() - counts.min() <= 1
    assert counts.min() == n // 10


def test_synthetic_images_distinct():
    x, _ = make_synthetic(200, seed=0)
    assert len({im.tobytes() for im in x}) == 200


# ----------------------------------------------------------------------------------------------
# stratified_split
# ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("fraction", [0.1, 0.25, 0.5, 0.9])
def test_stratified_split(fraction):
    rng = np.random.default_rng(0)
    labels = rng.choice(5, size=203, p=[0.4, 0.3, 0.15, 0.1, 0.05])
    rest, part = stratified_split(labels, fraction, seed=7)
    assert np.intersect1d(rest, part).size == 0
    assert np.array_equal(np.sort(np.concatenate([rest, part])), np.arange(len(labels)))
    assert np.array_equal(rest, np.sort(rest)) and np.array_equal(part, np.sort(part))
    for c in range(5):
        n_c = int((labels == c).sum())
        got = int((labels[part] == c).sum())
        assert abs(got - fraction * n_c) < 1  # largest-remainder rounding per class
    assert len(part) == round(fraction * len(labels))  # exact total
    # fixed by seed
    r2, p2 = stratified_split(labels, fraction, seed=7)
    assert np.array_equal(part, p2) and np.array_equal(rest, r2)
    _, p3 = stratified_split(labels, fraction, seed=8)
    assert not np.array_equal(part, p3)


# ----------------------------------------------------------------------------------------------
# load_data (synthetic)
# ----------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def small():
    cfg = bnlib.validate(synthetic_size=500, n_train=200, n_test=50, val_fraction=0.2)
    return cfg, load_data(cfg, CPU)


def test_load_data_sizes_and_dtypes(small):
    _, d = small
    assert d.sizes() == {"n_train": 200, "n_val": 100, "n_test": 50}
    for x in (d.x_train, d.x_val, d.x_test):
        assert x.dtype == torch.uint8 and x.shape[1:] == (3, 32, 32) and x.device.type == "cpu"
    for y in (d.y_train, d.y_val, d.y_test):
        assert y.dtype == torch.int64
    assert d.num_classes == 10
    # caps and the validation split are stratified
    assert torch.bincount(d.y_train, minlength=10).tolist() == [20] * 10
    assert torch.bincount(d.y_val, minlength=10).tolist() == [10] * 10
    assert torch.bincount(d.y_test, minlength=10).tolist() == [5] * 10


def test_load_data_comes_from_make_synthetic(small):
    cfg, d = small
    xtr, ytr = make_synthetic(500, seed=cfg["data_seed"], split="train")
    xte, yte = make_synthetic(100, seed=cfg["data_seed"], split="test")
    pool = {im.tobytes(): int(lab) for im, lab in zip(xtr, ytr)}
    test_pool = {im.tobytes(): int(lab) for im, lab in zip(xte, yte)}
    for x, y, src in ((d.x_train, d.y_train, pool), (d.x_val, d.y_val, pool), (d.x_test, d.y_test, test_pool)):
        for im, lab in zip(x.numpy(), y.tolist()):
            assert src[im.tobytes()] == lab  # every image is a pool image, with its own label


def test_load_data_train_val_test_disjoint(small):
    _, d = small
    tr = {im.tobytes() for im in d.x_train.numpy()}
    va = {im.tobytes() for im in d.x_val.numpy()}
    te = {im.tobytes() for im in d.x_test.numpy()}
    assert len(tr) == 200 and len(va) == 100 and len(te) == 50  # no duplicates either
    assert not tr & va and not tr & te and not va & te


def test_load_data_mean_std(small):
    _, d = small
    px = d.x_train.numpy().astype(np.float64) / 255
    mean = px.mean(axis=(0, 2, 3))
    std = px.std(axis=(0, 2, 3), ddof=1)
    assert len(d.mean) == len(d.std) == 3
    np.testing.assert_allclose(d.mean, mean, rtol=1e-5)
    np.testing.assert_allclose(d.std, std, rtol=1e-4)


def test_load_data_is_deterministic_and_follows_data_seed(small):
    cfg, d = small
    d2 = load_data(cfg, CPU)
    assert torch.equal(d.x_train, d2.x_train) and torch.equal(d.x_val, d2.x_val)
    d3 = load_data({**cfg, "data_seed": 1}, CPU)
    assert not torch.equal(d.x_val, d3.x_val)


def test_split_cache_gives_what_a_fresh_split_gives(monkeypatch):
    """A reused kernel loads each (data set, data_seed, sizes) split once: the cached split and
    statistics are exactly the ones computed afresh, and new sizes, a new seed or reloaded
    arrays (a cleared loader cache) are split again."""
    from bnlib import data

    calls = []
    real = data.stratified_split
    monkeypatch.setattr(data, "stratified_split", lambda *a, **k: (calls.append(1), real(*a, **k))[1])
    cfg = bnlib.validate(synthetic_size=500, n_train=200, n_test=50, val_fraction=0.2)

    def fresh(c):
        data._SPLITS.clear()
        data._synthetic_arrays.cache_clear()
        return load_data(c, CPU)

    def same(a, b):
        for f in ("x_train", "y_train", "x_val", "y_val", "x_test", "y_test"):
            assert torch.equal(getattr(a, f), getattr(b, f)), f
        assert a.mean == b.mean and a.std == b.std and a.num_classes == b.num_classes

    first = fresh(cfg)
    n = len(calls)
    assert n > 0
    cached = load_data(cfg, CPU)
    assert len(calls) == n  # nothing split again
    same(cached, first)
    assert data._synthetic_arrays(500, cfg["data_seed"]) is data._synthetic_arrays(500, cfg["data_seed"])
    for change in ({"n_train": 100}, {"n_test": 40}, {"val_fraction": 0.1}, {"data_seed": 1}):
        n = len(calls)
        got = load_data({**cfg, **change}, CPU)
        assert len(calls) > n, change
        same(got, fresh({**cfg, **change}))
    data._synthetic_arrays.cache_clear()  # the same data set, loaded again: other arrays
    n = len(calls)
    same(load_data(cfg, CPU), first)
    assert len(calls) > n
    keep = next(v for v in data._SPLITS.values())[1][0]
    with pytest.raises(ValueError):  # shared by later runs: read-only
        keep[0] = 0


@pytest.mark.filterwarnings("ignore:std\\(\\)")
@pytest.mark.parametrize("n_train", [15, 5])
def test_n_train_is_a_cap(n_train):
    cfg = bnlib.validate(synthetic_size=500, n_train=n_train, n_test=50, val_fraction=0.2, batch_size=2)
    d = load_data(cfg, CPU)
    assert 0 < d.sizes()["n_train"] <= n_train


# ----------------------------------------------------------------------------------------------
# augment
# ----------------------------------------------------------------------------------------------

def _images(b=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(1, 256, (b, 3, 32, 32), dtype=torch.uint8, generator=g)  # no zero pixels


def test_augment_crop_is_a_window_of_the_padded_image():
    x = _images()
    out = augment(x, crop_pad=4, flip=False, generator=torch.Generator().manual_seed(0))
    assert out.shape == x.shape and out.dtype == torch.uint8
    padded = torch.nn.functional.pad(x, (4, 4, 4, 4))
    offsets = []
    for i in range(len(x)):
        hits = [(dy, dx) for dy in range(9) for dx in range(9)
                if torch.equal(out[i], padded[i, :, dy:dy + 32, dx:dx + 32])]
        assert len(hits) == 1, i
        offsets.append(hits[0])
    assert len(set(offsets)) > 1  # offsets are drawn per image


def test_augment_crop_offsets_cover_the_range():
    x = _images(b=400)
    out = augment(x, crop_pad=2, flip=False, generator=torch.Generator().manual_seed(1))
    padded = torch.nn.functional.pad(x, (2, 2, 2, 2))
    seen = set()
    for i in range(len(x)):
        for dy in range(5):
            for dx in range(5):
                if torch.equal(out[i], padded[i, :, dy:dy + 32, dx:dx + 32]):
                    seen.add((dy, dx))
    assert seen == {(dy, dx) for dy in range(5) for dx in range(5)}


def test_augment_flip_gives_image_or_mirror():
    x = _images(b=64)
    out = augment(x, crop_pad=0, flip=True, generator=torch.Generator().manual_seed(0))
    flipped = 0
    for i in range(len(x)):
        same, mirror = torch.equal(out[i], x[i]), torch.equal(out[i], x[i].flip(-1))
        assert same != mirror, i
        flipped += mirror
    assert 10 < flipped < 54


def test_augment_identity_without_crop_or_flip():
    x = _images()
    assert torch.equal(augment(x, crop_pad=0, flip=False), x)


def test_augment_same_seed_same_output():
    x = _images(b=16)
    a = augment(x, 4, True, generator=torch.Generator().manual_seed(5))
    b = augment(x, 4, True, generator=torch.Generator().manual_seed(5))
    c = augment(x, 4, True, generator=torch.Generator().manual_seed(6))
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


# ----------------------------------------------------------------------------------------------
# CIFAR-10 through torchvision, from a tiny fake in the real on-disk format
# ----------------------------------------------------------------------------------------------

class _Py2Pickler(pickle._Pickler):
    """Writes bytes as Python 2 `str` (BINSTRING), as the real CIFAR pickles (written by Python 2)
    do: loaded with encoding='bytes' they give b'data', with torchvision's encoding='latin1'
    they give 'data'."""

    dispatch = pickle._Pickler.dispatch.copy()

    def save_bytes(self, obj):
        n = len(obj)
        if n < 256:
            self.write(pickle.SHORT_BINSTRING + bytes([n]) + obj)
        else:
            self.write(pickle.BINSTRING + struct.pack("<i", n) + obj)
        self.memoize(obj)

    dispatch[bytes] = save_bytes


def _py2_dump(obj, path):
    buf = io.BytesIO()
    _Py2Pickler(buf, protocol=2).dump(obj)
    path.write_bytes(buf.getvalue())
    return hashlib.md5(buf.getvalue()).hexdigest()


N_PER_BATCH = 20
LABEL_NAMES = [b"airplane", b"automobile", b"bird", b"cat", b"deer", b"dog", b"frog", b"horse", b"ship",
               b"truck"]


@pytest.fixture
def fake_cifar10(tmp_path, monkeypatch):
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    rng = np.random.default_rng(0)
    rows, labels, md5 = {}, {}, {}
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        data = rng.integers(0, 256, size=(N_PER_BATCH, 3072), dtype=np.uint8)
        lab = [int(v) for v in rng.permutation(np.arange(N_PER_BATCH) % 10)]
        md5[name] = _py2_dump({b"batch_label": b"fake " + name.encode(), b"labels": lab, b"data": data,
                               b"filenames": [b"img_%d.png" % i for i in range(N_PER_BATCH)]},
                              folder / name)
        rows[name], labels[name] = data, lab
    md5["batches.meta"] = _py2_dump({b"num_cases_per_batch": N_PER_BATCH, b"label_names": LABEL_NAMES,
                                     b"num_vis": 3072}, folder / "batches.meta")
    with open(folder / "data_batch_1", "rb") as f:  # the same layout as the real files
        assert set(pickle.load(f, encoding="bytes")) == {b"batch_label", b"labels", b"data", b"filenames"}
    C = torchvision.datasets.CIFAR10
    monkeypatch.setattr(C, "train_list", [[f"data_batch_{i}", md5[f"data_batch_{i}"]] for i in range(1, 6)])
    monkeypatch.setattr(C, "test_list", [["test_batch", md5["test_batch"]]])
    monkeypatch.setattr(C, "meta", {**C.meta, "md5": md5["batches.meta"]})
    train_rows = np.concatenate([rows[f"data_batch_{i}"] for i in range(1, 6)])
    train_labels = sum((labels[f"data_batch_{i}"] for i in range(1, 6)), [])
    return tmp_path, (train_rows, train_labels), (rows["test_batch"], labels["test_batch"])


def _cifar_image(row):
    """CIFAR row: 1024 R, then 1024 G, then 1024 B values, each a row-major 32x32 plane."""
    img = np.empty((3, 32, 32), np.uint8)
    for c in range(3):
        for r in (0, 5, 31):
            img[c, r, :] = row[c * 1024 + r * 32: c * 1024 + r * 32 + 32]
    return img


def test_cifar10_loader_reads_real_format(fake_cifar10):
    root, (tr_rows, tr_labels), (te_rows, te_labels) = fake_cifar10
    cfg = bnlib.validate(dataset="cifar10", data_dir=str(root), download=False, val_fraction=0.1, batch_size=8)
    d = load_data(cfg, CPU)
    assert d.num_classes == 10
    assert d.sizes() == {"n_train": 90, "n_val": 10, "n_test": 20}
    assert d.x_train.shape == (90, 3, 32, 32) and d.x_train.dtype == torch.uint8
    assert d.y_train.dtype == torch.int64
    # pixel layout: each (3, 32, 32) image is a CIFAR row, R/G/B planes in order, rows of 32
    both = np.concatenate([d.x_train.numpy(), d.x_val.numpy()])
    first = tr_rows[0]
    idx = np.flatnonzero((both.reshape(len(both), -1) == first).all(1))
    assert len(idx) == 1
    im, ref = both[idx[0]], _cifar_image(first)
    for c in range(3):
        for r in (0, 5, 31):
            assert np.array_equal(im[c, r], ref[c, r])
    assert im[1, 0, 0] == first[1024] and im[2, 31, 31] == first[3071] and im[0, 1, 0] == first[32]
    # every image comes with its own label; train+val is exactly the five batches
    by_row = {r.tobytes(): lab for r, lab in zip(tr_rows, tr_labels)}
    seen = []
    for xs, ys in ((d.x_train, d.y_train), (d.x_val, d.y_val)):
        for im, lab in zip(xs.numpy(), ys.tolist()):
            key = im.reshape(-1).tobytes()  # (3, 32, 32) flattened is the CIFAR row again
            assert by_row[key] == lab
            seen.append(key)
    assert sorted(seen) == sorted(by_row)
    test_rows = {r.tobytes(): lab for r, lab in zip(te_rows, te_labels)}
    assert {im.reshape(-1).tobytes(): lab for im, lab in zip(d.x_test.numpy(), d.y_test.tolist())} == test_rows
    assert torch.bincount(d.y_val, minlength=10).tolist() == [1] * 10


def test_cifar10_missing_folder_raises(tmp_path):
    cfg = bnlib.validate(dataset="cifar10", data_dir=str(tmp_path), download=False)
    with pytest.raises(bnlib.ConfigError) as ei:
        load_data(cfg, CPU)
    msg = str(ei.value)
    assert "cifar-10-batches-py" in msg
    assert str(tmp_path) in msg
    assert "cifar10" in msg


# ----------------------------------------------------------------------------------------------
# Fashion-MNIST: data_dir, the Debian package's folder, or a clear error naming the three ways
# ----------------------------------------------------------------------------------------------

from bnlib.data import FASHION_SYSTEM_DIR, _fashion_arrays  # noqa: E402

FASHION_GZ = [g for g, _ in torchvision.datasets.FashionMNIST.resources]
have_debian_fashion = pytest.mark.skipif(
    not all((__import__("pathlib").Path(FASHION_SYSTEM_DIR) / g).exists() for g in FASHION_GZ),
    reason=f"Debian package dataset-fashion-mnist not installed ({FASHION_SYSTEM_DIR}; .ci/run installs it)")


def _check_fashion(arrays):
    xtr, ytr, xte, yte, k = arrays
    assert xtr.shape == (60000, 1, 28, 28) and xte.shape == (10000, 1, 28, 28) and xtr.dtype == np.uint8
    assert k == 10 and ytr.dtype == np.int64
    # Fashion-MNIST is exactly balanced: 6 000 training and 1 000 test images per class
    assert np.bincount(ytr).tolist() == [6000] * 10 and np.bincount(yte).tolist() == [1000] * 10
    assert 60 < xtr.mean() < 90  # mean pixel ~72.9 on the real images: not zeros, not noise


@have_debian_fashion
def test_fashion_mnist_from_the_debian_folder(tmp_path):
    _fashion_arrays.cache_clear()
    arrays = _fashion_arrays(str(tmp_path / "data"), False)
    _check_fashion(arrays)
    # extracted where torchvision's FashionMNIST reads them, nothing half-written left beside
    raw = tmp_path / "data" / "FashionMNIST" / "raw"
    assert sorted(p.name for p in raw.iterdir()) == sorted(g[:-3] for g in FASHION_GZ)


@have_debian_fashion
def test_fashion_mnist_from_a_data_dir_copy(tmp_path):
    import shutil

    for g in FASHION_GZ:  # the .gz files copied into data_dir itself; no system folder to fall back on
        shutil.copy(f"{FASHION_SYSTEM_DIR}/{g}", tmp_path / g)
    _fashion_arrays.cache_clear()
    arrays = _fashion_arrays(str(tmp_path), False, system_dir=str(tmp_path / "nowhere"))
    _check_fashion(arrays)


@have_debian_fashion
def test_fashion_mnist_runs_as_one_channel(tmp_path):
    cfg = bnlib.validate(dataset="fashion_mnist", data_dir=str(tmp_path), n_train=200, n_test=100, val_fraction=0.01)
    data = load_data(cfg, CPU)
    assert data.x_train.shape[1:] == (1, 28, 28) and data.channels == 1 and len(data.mean) == 1
    assert data.sizes() == {"n_train": 200, "n_val": 600, "n_test": 100}
    from bnlib.train import build_model

    model = build_model(cfg, data.mean, data.std, data.num_classes)
    assert model.stem[0].in_channels == 1
    assert model(torch.rand(2, 1, 28, 28)).shape == (2, 10)


def test_fashion_mnist_missing_names_the_three_ways(tmp_path):
    _fashion_arrays.cache_clear()
    with pytest.raises(bnlib.ConfigError) as e:
        _fashion_arrays(str(tmp_path / "empty"), False, system_dir=str(tmp_path / "no-package"))
    msg = str(e.value)
    for part in ("dataset='fashion_mnist'", str(tmp_path / "empty"), "apt-get install dataset-fashion-mnist",
                 "download=True", "dataset='synthetic'", "make study DATASET=synthetic"):
        assert part in msg
    assert not (tmp_path / "empty").exists()  # a failed check creates no folder
