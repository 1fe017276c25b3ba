"""Tests of gdlr_jax.data.mnist: IDX folders (real sample, copies, corrupt files), sha256,
the TFDS route and its fast failure offline."""

from __future__ import annotations

import gzip
import hashlib
import importlib.util
import pathlib
import shutil
import socket
import struct
import sys
import time
import tracemalloc

import numpy as np
import pytest

from gdlr_jax.data import MNIST_SHA256, MnistData, load_mnist
from gdlr_jax.problems.data import _tfds

SAMPLE_FILES = ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz")
TFDS_INSTALLED = importlib.util.find_spec("tensorflow_datasets") is not None


def _raw_sample(mnist_dir: pathlib.Path) -> tuple[np.ndarray, np.ndarray]:
    """The sample's pixels (n, 784) and labels, decoded here independently of the package."""
    images = gzip.decompress((mnist_dir / SAMPLE_FILES[0]).read_bytes())
    labels = gzip.decompress((mnist_dir / SAMPLE_FILES[1]).read_bytes())
    return (
        np.frombuffer(images, np.uint8, offset=16).reshape(-1, 784),
        np.frombuffer(labels, np.uint8, offset=8),
    )


def _idx_bytes(array: np.ndarray, magic: int) -> bytes:
    header = struct.pack(">I", magic) + b"".join(struct.pack(">I", d) for d in array.shape)
    return header + array.astype(np.uint8).tobytes()


def _write_pair(
    folder: pathlib.Path,
    images: np.ndarray,
    labels: np.ndarray,
    *,
    gz: bool = True,
    prefix: str = "train",
) -> tuple[pathlib.Path, pathlib.Path]:
    folder.mkdir(parents=True, exist_ok=True)
    out = []
    for stem, array, magic in (
        (f"{prefix}-images-idx3-ubyte", images, 2051),
        (f"{prefix}-labels-idx1-ubyte", labels, 2049),
    ):
        raw = _idx_bytes(array, magic)
        path = folder / (stem + (".gz" if gz else ""))
        path.write_bytes(gzip.compress(raw) if gz else raw)
        out.append(path)
    return out[0], out[1]


@pytest.fixture
def small_pair() -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    return rng.integers(0, 256, (12, 28, 28), dtype=np.uint8), np.arange(12, dtype=np.uint8) % 3


# ----- the real sample ---------------------------------------------------------------------


def test_sample_digits_zero_one(mnist_dir):
    data = load_mnist(mnist_dir)
    assert isinstance(data, MnistData)
    assert data.images.shape == (2128, 784) and data.images.dtype == np.float32
    assert data.labels.shape == (2128,) and data.labels.dtype == np.int32
    assert data.digits == (0, 1)
    assert np.bincount(data.labels).tolist() == [1001, 1127]
    assert data.images.min() == 0.0 and data.images.max() == 1.0
    pixels, labels = _raw_sample(mnist_dir)
    keep = (labels == 0) | (labels == 1)
    np.testing.assert_array_equal(data.images, (pixels[keep] / 255.0).astype(np.float32))
    np.testing.assert_array_equal(data.labels, labels[keep])


def test_sample_label_order_follows_digits(mnist_dir):
    data = load_mnist(mnist_dir, digits=(7, 3, 5))
    assert np.bincount(data.labels).tolist() == [1070, 1032, 863]
    _, labels = _raw_sample(mnist_dir)
    digit_of_label = np.array([7, 3, 5])
    np.testing.assert_array_equal(digit_of_label[data.labels], labels[np.isin(labels, [3, 5, 7])])
    swapped = load_mnist(mnist_dir, digits=(1, 0))
    np.testing.assert_array_equal(swapped.labels, 1 - load_mnist(mnist_dir).labels)


def test_max_examples_keeps_the_first_in_file_order(mnist_dir):
    full = load_mnist(mnist_dir)
    head = load_mnist(mnist_dir, max_examples=50)
    np.testing.assert_array_equal(head.images, full.images[:50])
    np.testing.assert_array_equal(head.labels, full.labels[:50])


def test_standardize_per_pixel(mnist_dir):
    raw = load_mnist(mnist_dir, max_examples=300).images.astype(np.float64)
    data = load_mnist(mnist_dir, max_examples=300, standardize=True)
    assert data.images.dtype == np.float32
    std = raw.std(axis=0)
    np.testing.assert_allclose(data.images.mean(axis=0), 0.0, atol=1e-5)
    np.testing.assert_allclose(data.images.std(axis=0)[std > 0], 1.0, atol=1e-4)
    assert np.all(data.images[:, std == 0] == 0.0) and np.any(std == 0)


# ----- copies of the sample: gzipped or not, names ----------------------------------------


@pytest.mark.parametrize(
    "names",
    [
        ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
        ("train-images.idx3-ubyte", "train-labels.idx1-ubyte"),
        ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte"),
    ],
)
def test_uncompressed_and_renamed_copies(mnist_dir, tmp_path, names):
    for source, target in zip(SAMPLE_FILES, names):
        raw = (mnist_dir / source).read_bytes()
        (tmp_path / target).write_bytes(raw if target.endswith(".gz") else gzip.decompress(raw))
    copy = load_mnist(tmp_path)
    original = load_mnist(mnist_dir)
    np.testing.assert_array_equal(copy.images, original.images)
    np.testing.assert_array_equal(copy.labels, original.labels)


def test_test_split_files(tmp_path, small_pair):
    images, labels = small_pair
    _write_pair(tmp_path, images, labels, prefix="t10k")
    data = load_mnist(tmp_path, split="test", digits=(2,))
    expected = (images[labels == 2].reshape(-1, 784) / 255.0).astype(np.float32)
    np.testing.assert_array_equal(data.images, expected)
    with pytest.raises(FileNotFoundError, match=r"'train-images-idx3-ubyte' not found .* holds"):
        load_mnist(tmp_path, split="train")


# ----- missing and corrupt files -----------------------------------------------------------


def test_missing_split_lists_expected_names_and_folder_contents(mnist_dir):
    with pytest.raises(FileNotFoundError) as info:
        load_mnist(mnist_dir, split="test")
    message = str(info.value)
    assert "t10k-images-idx3-ubyte.gz" in message and "train-images-idx3-ubyte.gz" in message


def test_missing_labels_file(tmp_path, mnist_dir):
    shutil.copy(mnist_dir / SAMPLE_FILES[0], tmp_path)
    with pytest.raises(FileNotFoundError, match="'train-labels-idx1-ubyte' not found"):
        load_mnist(tmp_path)


def test_missing_folder(tmp_path):
    with pytest.raises(FileNotFoundError, match="(?s)is not a folder.*pass data_dir"):
        load_mnist(tmp_path / "nowhere")


def test_swapped_files_give_magic_error(tmp_path, small_pair):
    images_path, labels_path = _write_pair(tmp_path, *small_pair)
    images_bytes = images_path.read_bytes()
    images_path.write_bytes(labels_path.read_bytes())
    labels_path.write_bytes(images_bytes)
    with pytest.raises(ValueError, match=r"magic number 2049 \(0x00000801\); expected 2051"):
        load_mnist(tmp_path)


def test_corrupt_magic_uncompressed(tmp_path, small_pair):
    images_path, _ = _write_pair(tmp_path, *small_pair, gz=False)
    images_path.write_bytes(b"\x00\x00\x0d\x03" + images_path.read_bytes()[4:])
    with pytest.raises(ValueError, match="magic number 3331"):
        load_mnist(tmp_path)


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda raw: raw[:-100], r"header announces \(12, 28, 28\) = 9408 bytes of data, the file holds 9308 \(truncated\)"),
        (lambda raw: raw + b"\x00", r"holds 9409 \(extra bytes\)"),
        (lambda raw: raw[:10], "truncated inside its header"),
        (lambda raw: raw[:3], "too short"),
    ],
)
def test_truncated_or_padded_images(tmp_path, small_pair, mutate, message):
    images_path, _ = _write_pair(tmp_path, *small_pair)
    images_path.write_bytes(gzip.compress(mutate(gzip.decompress(images_path.read_bytes()))))
    with pytest.raises(ValueError, match=message):
        load_mnist(tmp_path)


def _peak_bytes(function) -> int:
    """The peak of memory allocated (numpy included) while ``function()`` runs."""
    tracemalloc.start()
    try:
        function()
    except ValueError:
        pass
    finally:
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
    return peak


def test_a_header_announcing_too_many_items_is_refused_before_allocating(tmp_path, small_pair):
    images, labels = small_pair
    _write_pair(tmp_path, images, labels)
    header = struct.pack(">IIII", 2051, 2_000_000, 28, 28)
    (tmp_path / "train-images-idx3-ubyte.gz").write_bytes(
        gzip.compress(header + bytes(1_500_000))
    )
    with pytest.raises(ValueError, match=r"the header announces 2000000 items, more than the "
                       r"1000000 an IDX file may hold here \(MNIST has 70000\)"):
        load_mnist(tmp_path)
    assert _peak_bytes(lambda: load_mnist(tmp_path)) < 8 << 20


def test_a_gzip_bomb_is_read_no_further_than_its_header_announces(tmp_path, small_pair):
    images, labels = small_pair
    images_path, _ = _write_pair(tmp_path, images, labels)
    # 12 images announced, then 200 MB of zeros that compress to about 200 kB
    with gzip.open(images_path, "wb") as handle:
        handle.write(_idx_bytes(images, 2051))
        for _ in range(200):
            handle.write(bytes(1 << 20))
    assert images_path.stat().st_size < 1 << 20
    with pytest.raises(ValueError, match=r"= 9408 bytes of data, the file holds more than "
                       r"1057984 \(extra bytes\)"):
        load_mnist(tmp_path)
    assert _peak_bytes(lambda: load_mnist(tmp_path)) < 8 << 20


def test_an_uncompressed_file_is_checked_against_its_size_before_reading(tmp_path, monkeypatch):
    header = struct.pack(">IIII", 2051, 900_000, 28, 28)  # 705.6 MB announced
    images_path, _ = _write_pair(tmp_path, np.zeros((3, 28, 28)), np.zeros(3), gz=False)
    images_path.write_bytes(header + bytes(784))
    with pytest.raises(ValueError, match=r"= 705600000 bytes of data, the file holds 784 "
                       r"\(truncated\)"):
        load_mnist(tmp_path)
    assert _peak_bytes(lambda: load_mnist(tmp_path)) < 8 << 20


def test_truncated_gzip_stream(tmp_path, small_pair):
    images_path, _ = _write_pair(tmp_path, *small_pair)
    images_path.write_bytes(images_path.read_bytes()[:200])
    with pytest.raises(ValueError, match="is not a valid gzip file"):
        load_mnist(tmp_path)


def test_inconsistent_counts_and_bad_labels(tmp_path, small_pair):
    images, labels = small_pair
    _write_pair(tmp_path, images, labels[:11])
    with pytest.raises(ValueError, match="holds 12 images but .* holds 11 labels"):
        load_mnist(tmp_path)
    _write_pair(tmp_path, images, np.full(12, 10, np.uint8))
    with pytest.raises(ValueError, match="holds label 10; MNIST labels are 0..9"):
        load_mnist(tmp_path)


def test_wrong_image_size(tmp_path):
    _write_pair(tmp_path, np.zeros((3, 27, 28), np.uint8), np.zeros(3, np.uint8))
    with pytest.raises(ValueError, match=r"images of \(27, 28\) pixels; MNIST images are 28x28"):
        load_mnist(tmp_path)


def test_no_image_of_the_digits(tmp_path, small_pair):
    _write_pair(tmp_path, *small_pair)
    with pytest.raises(ValueError, match=r"holds no image of the digits \(8, 9\)"):
        load_mnist(tmp_path, digits=(8, 9))


# ----- sha256 ----------------------------------------------------------------------------------


def test_official_digest_table():
    assert sorted(MNIST_SHA256) == sorted(
        f"{s}-{k}-idx{d}-ubyte.gz" for s in ("train", "t10k") for k, d in (("images", 3), ("labels", 1))
    )
    assert all(len(v) == 64 and int(v, 16) >= 0 for v in MNIST_SHA256.values())


def test_sample_fails_official_sha256(mnist_dir):
    with pytest.raises(ValueError, match="sha256 mismatch .*train-images-idx3-ubyte.gz.*expected "
                       + MNIST_SHA256["train-images-idx3-ubyte.gz"]):
        load_mnist(mnist_dir, verify_sha256=True)


def test_sha256_against_given_digests(mnist_dir):
    digests = {n: hashlib.sha256((mnist_dir / n).read_bytes()).hexdigest() for n in SAMPLE_FILES}
    verified = load_mnist(mnist_dir, verify_sha256=digests)
    np.testing.assert_array_equal(verified.labels, load_mnist(mnist_dir).labels)
    wrong = dict(digests, **{SAMPLE_FILES[1]: "0" * 64})
    with pytest.raises(ValueError, match="sha256 mismatch .*train-labels-idx1-ubyte.gz"):
        load_mnist(mnist_dir, verify_sha256=wrong)
    with pytest.raises(ValueError, match="no expected sha256 for 'train-labels-idx1-ubyte.gz'"):
        load_mnist(mnist_dir, verify_sha256={SAMPLE_FILES[0]: digests[SAMPLE_FILES[0]]})


def test_uncompressed_files_have_no_official_digest(tmp_path, small_pair):
    _write_pair(tmp_path, *small_pair, gz=False)
    with pytest.raises(ValueError, match="Official digests exist only for the gzipped files"):
        load_mnist(tmp_path, digits=(0, 1), verify_sha256=True)


# ----- argument validation ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"digits": ()}, r"digits must be a non-empty sequence of distinct integers in 0..9, got \(\)"),
        ({"digits": (1, 1)}, r"digits must .* got \(1, 1\)"),
        ({"digits": (0, 10)}, r"digits must .* got \(0, 10\)"),
        ({"digits": ("0", "1")}, r"digits must .* got \('0', '1'\)"),
        ({"split": "validation"}, r"split must be one of \['train', 'test'\], got 'validation'"),
        ({"standardize": 1}, "standardize must be a bool, got 1"),
        ({"max_examples": 0}, "max_examples must be None or a positive integer, got 0"),
        ({"max_examples": True}, "max_examples must be None or a positive integer, got True"),
        ({"source": "web"}, r"source must be one of \['auto', 'idx', 'tfds'\], got 'web'"),
        ({"verify_sha256": "yes"}, "verify_sha256 must be a bool or a mapping"),
    ],
)
def test_bad_arguments(mnist_dir, kwargs, message):
    with pytest.raises(ValueError, match=message):
        load_mnist(mnist_dir, **kwargs)


def test_idx_source_needs_data_dir():
    with pytest.raises(ValueError, match="source='idx' needs data_dir"):
        load_mnist(source="idx")


def test_verify_sha256_is_for_idx_folders_only():
    with pytest.raises(ValueError, match="applies to IDX folders only"):
        load_mnist(source="tfds", verify_sha256=True)


# ----- TFDS: absent, offline, prepared ---------------------------------------------------------


@pytest.fixture
def without_tfds(monkeypatch):
    """Make ``tensorflow_datasets`` unimportable, installed or not."""
    monkeypatch.setitem(sys.modules, "tensorflow_datasets", None)


def test_auto_without_data_dir_or_tfds_says_what_to_do(without_tfds):
    start = time.perf_counter()
    with pytest.raises(RuntimeError) as info:
        load_mnist()
    assert time.perf_counter() - start < 5.0
    message = str(info.value)
    assert "no data_dir was given and tensorflow-datasets is not installed" in message
    assert "pass data_dir=<folder>" in message and "pip install -e '.[tfds]'" in message


def test_tfds_source_without_tfds(without_tfds, mnist_dir):
    with pytest.raises(ImportError, match="(?s)source='tfds' needs tensorflow-datasets.*pass data_dir"):
        load_mnist(source="tfds")
    # with a data_dir, 'auto' reads the IDX folder and never needs TFDS
    assert load_mnist(mnist_dir, max_examples=3).images.shape == (3, 784)


def test_network_probe_on_loopback():
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen(1)
        assert _tfds.network_reachable("127.0.0.1", server.getsockname()[1], timeout=2.0)
    with socket.socket() as closed:
        closed.bind(("127.0.0.1", 0))
        port = closed.getsockname()[1]
    start = time.perf_counter()
    assert not _tfds.network_reachable("127.0.0.1", port, timeout=2.0)
    assert time.perf_counter() - start < 3.5


needs_tfds = pytest.mark.skipif(not TFDS_INSTALLED, reason="tensorflow-datasets not installed")


@needs_tfds
def test_tfds_offline_fails_fast(tmp_path, monkeypatch, mnist_dir):
    monkeypatch.setattr(_tfds, "network_reachable", lambda host, port, timeout: False)
    start = time.perf_counter()
    with pytest.raises(RuntimeError) as info:
        load_mnist(source="tfds", tfds_data_dir=tmp_path)
    assert time.perf_counter() - start < 10.0
    message = str(info.value)
    assert "MNIST is not prepared in the TFDS data dir" in message
    assert "storage.googleapis.com:443 is unreachable" in message and "200 s" in message
    assert "pass data_dir=<folder>" in message
    with pytest.raises(RuntimeError, match="is not the official MNIST file"):
        load_mnist(mnist_dir, source="tfds", tfds_data_dir=tmp_path)
    with pytest.raises(RuntimeError, match="installed but MNIST is not prepared in its data dir"):
        load_mnist(tfds_data_dir=tmp_path)


@needs_tfds
@pytest.mark.skipif(
    not (TFDS_INSTALLED and _tfds.tfds_mnist_prepared(None)),
    reason="MNIST is not prepared in the default TFDS data dir",
)
def test_tfds_prepared_mnist():
    data = load_mnist(source="tfds", split="test")
    assert data.images.dtype == np.float32 and data.images.shape[1] == 784
    assert data.labels.dtype == np.int32 and set(np.unique(data.labels)) == {0, 1}
    assert 0.0 <= data.images.min() and data.images.max() <= 1.0
    np.testing.assert_array_equal(load_mnist(split="test").images, data.images)  # 'auto' = TFDS
