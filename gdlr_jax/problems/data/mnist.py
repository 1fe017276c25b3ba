"""MNIST digits as flat float arrays (layer 1: problems).

:func:`load_mnist` returns the images of the chosen digits (default 0 and 1, the task of the
paper's Figures 3-6) as ``float32 (n, 784)`` arrays with pixel values ``k / 255`` in
``[0, 1]`` (or standardised per pixel), and their labels renumbered ``0, ..., len(digits) - 1``
in the order of ``digits``. Sources, never mixed silently:

1. ``"idx"``: a folder of standard MNIST IDX files (the official names
   ``train-images-idx3-ubyte``, ``train-labels-idx1-ubyte``, ``t10k-images-idx3-ubyte``,
   ``t10k-labels-idx1-ubyte``, each gzipped or not); only the two files of the requested split
   need to be there. Headers are checked; sha256 digests on request.
2. ``"tfds"``: tensorflow-datasets (optional extra, imported only when used), reading a
   prepared MNIST or preparing it, with a fast failure instead of TFDS's ~200 s of retries
   when offline.
3. ``"auto"``: the IDX folder when ``data_dir`` is given, else TFDS when MNIST is already
   prepared there, else an error saying what to do.

See ``docs/data.md``.
"""

from __future__ import annotations

import operator
import os
import pathlib
from collections.abc import Mapping, Sequence
from typing import NamedTuple

import numpy as np
from jaxtyping import Float, Int

from gdlr_jax.problems.data._idx import (
    IMAGE_SIDE,
    IMAGES_MAGIC,
    LABELS_MAGIC,
    MNIST_SHA256,
    SPLIT_STEMS,
    find_idx_file,
    read_idx,
)
from gdlr_jax.problems.data._tfds import (
    HOW_TO_GET_MNIST,
    load_tfds_mnist,
    tfds_installed,
    tfds_mnist_prepared,
)

NUM_PIXELS = IMAGE_SIDE * IMAGE_SIDE
SOURCES = ("auto", "idx", "tfds")


class MnistData(NamedTuple):
    """Images and labels of the chosen MNIST digits.

    Attributes:
        images: ``float32 (n, 784)``, row-major flattened 28x28 images; pixel values
            ``k / 255`` in ``[0, 1]``, or standardised per pixel (``standardize=True``).
        labels: ``int32 (n,)``; ``labels[i] = j`` when image ``i`` shows ``digits[j]``.
        digits: the digits, in the order that defines the labels.
    """

    images: Float[np.ndarray, "n 784"]
    labels: Int[np.ndarray, " n"]
    digits: tuple[int, ...]


def _check_digits(digits: Sequence[int]) -> tuple[int, ...]:
    try:
        out = tuple(operator.index(d) for d in digits)
    except TypeError:
        out = ()
    if not out or len(set(out)) != len(out) or any(not 0 <= d <= 9 for d in out):
        raise ValueError(
            f"digits must be a non-empty sequence of distinct integers in 0..9, got {digits!r}."
        )
    return out


def _check_arguments(
    split: str,
    standardize: bool,
    max_examples: int | None,
    source: str,
    verify_sha256: bool | Mapping[str, str],
) -> None:
    if split not in SPLIT_STEMS:
        raise ValueError(f"split must be one of {list(SPLIT_STEMS)}, got {split!r}.")
    if not isinstance(standardize, bool):
        raise ValueError(f"standardize must be a bool, got {standardize!r}.")
    if max_examples is not None and (
        isinstance(max_examples, bool)
        or not isinstance(max_examples, (int, np.integer))
        or max_examples < 1
    ):
        raise ValueError(f"max_examples must be None or a positive integer, got {max_examples!r}.")
    if source not in SOURCES:
        raise ValueError(f"source must be one of {list(SOURCES)}, got {source!r}.")
    if not isinstance(verify_sha256, (bool, Mapping)):
        raise ValueError(
            "verify_sha256 must be a bool or a mapping {file name: sha256 hex digest}, "
            f"got {verify_sha256!r}."
        )


def _read_idx_split(
    folder: pathlib.Path, split: str, verify_sha256: bool | Mapping[str, str]
) -> tuple[np.ndarray, np.ndarray]:
    if not folder.is_dir():
        raise FileNotFoundError(
            f"data_dir {str(folder)!r} is not a folder.\n" + HOW_TO_GET_MNIST
        )
    if verify_sha256 is True:
        expected: Mapping[str, str] | None = MNIST_SHA256
    elif verify_sha256 is False:
        expected = None
    else:
        expected = verify_sha256
    images_stem, labels_stem = SPLIT_STEMS[split]
    images_path = find_idx_file(folder, images_stem)
    labels_path = find_idx_file(folder, labels_stem)
    images = read_idx(images_path, magic=IMAGES_MAGIC, expected_sha256=expected)
    labels = read_idx(labels_path, magic=LABELS_MAGIC, expected_sha256=expected)
    if images.shape[0] != labels.shape[0]:
        raise ValueError(
            f"{str(images_path)!r} holds {images.shape[0]} images but {str(labels_path)!r} "
            f"holds {labels.shape[0]} labels."
        )
    if labels.size and labels.max() > 9:
        raise ValueError(
            f"{str(labels_path)!r} holds label {int(labels.max())}; MNIST labels are 0..9."
        )
    return images, labels


def _standardized(images: np.ndarray) -> np.ndarray:
    """Per-pixel ``(x - mean) / std`` over the examples; pixels of zero spread keep std 1."""
    mean = images.mean(axis=0)
    std = images.std(axis=0)
    return (images - mean) / np.where(std > 0, std, 1.0)


def load_mnist(
    data_dir: str | os.PathLike[str] | None = None,
    *,
    digits: Sequence[int] = (0, 1),
    split: str = "train",
    standardize: bool = False,
    max_examples: int | None = None,
    source: str = "auto",
    verify_sha256: bool | Mapping[str, str] = False,
    tfds_data_dir: str | os.PathLike[str] | None = None,
) -> MnistData:
    """Load the MNIST images of ``digits`` as flat ``float32`` arrays.

    Args:
        data_dir: a folder of MNIST IDX files (for ``source="idx"``/``"auto"``), or, with
            ``source="tfds"``, an optional TFDS manual dir holding the four official ``.gz``
            files (then preparing needs no download).
        digits: distinct digits in ``0..9``; label ``j`` stands for ``digits[j]``.
        split: ``"train"`` or ``"test"`` (files ``train-*`` or ``t10k-*``).
        standardize: when true, each pixel is shifted and scaled to mean 0 and standard
            deviation 1 over the returned examples (pixels constant over them, such as the
            border, are only shifted).
        max_examples: keep only the first ``max_examples`` selected images, in file order.
        source: ``"idx"``, ``"tfds"`` or ``"auto"`` (see the module docstring).
        verify_sha256: ``True`` checks the files read against the official MNIST digests
            (:data:`MNIST_SHA256`, known for the gzipped files only); a mapping
            ``{file name: hex digest}`` checks against given digests, and must name every file
            read. Only for IDX folders (TFDS checks its downloads itself).
        tfds_data_dir: the TFDS data dir; ``None`` for TFDS's default (``$TFDS_DATA_DIR``,
            else ``~/tensorflow_datasets``).

    Returns:
        :class:`MnistData` ``(images float32 (n, 784), labels int32 (n,), digits)``, numpy
        arrays, in the order of the source files.

    Raises:
        ValueError: bad arguments; malformed IDX files (wrong magic, truncated, inconsistent
            counts); a sha256 mismatch; no image of the chosen digits.
        FileNotFoundError: ``data_dir`` missing, or without the files of ``split``.
        ImportError: ``source="tfds"`` without tensorflow-datasets.
        RuntimeError: no source can provide MNIST (``source="auto"`` without ``data_dir`` and
            no prepared TFDS copy; ``source="tfds"`` offline, without TensorFlow, ...): the
            message says what to do.
    """
    digits = _check_digits(digits)
    _check_arguments(split, standardize, max_examples, source, verify_sha256)
    if source == "auto":
        if data_dir is not None:
            source = "idx"
        elif tfds_mnist_prepared(tfds_data_dir):
            source = "tfds"
        else:
            state = (
                "tensorflow-datasets is installed but MNIST is not prepared in its data dir"
                if tfds_installed()
                else "tensorflow-datasets is not installed"
            )
            raise RuntimeError(f"No MNIST source: no data_dir was given and {state}.\n"
                               + HOW_TO_GET_MNIST)
    if source == "idx":
        if data_dir is None:
            raise ValueError("source='idx' needs data_dir, the folder of IDX files.\n"
                             + HOW_TO_GET_MNIST)
        raw_images, raw_labels = _read_idx_split(pathlib.Path(data_dir), split, verify_sha256)
    else:
        if verify_sha256 is not False:
            raise ValueError(
                f"verify_sha256={verify_sha256!r} applies to IDX folders only; TFDS verifies "
                "the checksums of the files it prepares MNIST from."
            )
        raw_images, raw_labels = load_tfds_mnist(
            split,
            manual_dir=None if data_dir is None else pathlib.Path(data_dir),
            tfds_data_dir=tfds_data_dir,
        )
    selected = np.flatnonzero(np.isin(raw_labels, digits))
    if max_examples is not None:
        selected = selected[:max_examples]
    if selected.size == 0:
        raise ValueError(f"The {split} split holds no image of the digits {digits}.")
    images = raw_images[selected].reshape(selected.size, NUM_PIXELS).astype(np.float64) / 255.0
    if standardize:
        images = _standardized(images)
    label_of_digit = np.full(10, -1, dtype=np.int32)
    label_of_digit[list(digits)] = np.arange(len(digits), dtype=np.int32)
    return MnistData(
        images=images.astype(np.float32),
        labels=label_of_digit[raw_labels[selected]],
        digits=digits,
    )
