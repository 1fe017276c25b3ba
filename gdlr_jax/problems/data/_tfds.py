"""MNIST through tensorflow-datasets (TFDS), imported lazily, failing fast when offline.

Facts this module relies on (checked with tensorflow-datasets 4.9):

* TFDS reads an already *prepared* MNIST without TensorFlow when it was prepared in a
  random-access format (``array_record``, ``parquet``); the default ``tfrecord`` format is read
  through ``tf.data`` and needs TensorFlow.
* *Preparing* MNIST always needs TensorFlow (the builder decodes the IDX files with
  ``tf.io.gfile``) and the four official gzipped files, downloaded or found in a manual dir
  under their official names; TFDS checks their sha256.
* Offline, ``download_and_prepare`` retries each download and fails only after about 200 s.
  :func:`load_tfds_mnist` checks the prerequisites first (TensorFlow, the files or a reachable
  download host) and raises within seconds instead.
"""

from __future__ import annotations

import importlib
import importlib.util
import pathlib
import socket
import threading
import urllib.parse
from typing import Any

import numpy as np

from gdlr_jax.problems.data._idx import MNIST_SHA256, file_sha256

HOW_TO_GET_MNIST = (
    "To load MNIST, either\n"
    "  * pass data_dir=<folder> holding the IDX files train-images-idx3-ubyte[.gz] and "
    "train-labels-idx1-ubyte[.gz] (t10k-* for split='test'): the official MNIST files or the "
    "project's sample (see docs/data.md); or\n"
    "  * install the TFDS extra (pip install -e '.[tfds]': tensorflow-datasets, tensorflow-cpu, "
    "pillow, importlib_resources) and, with network access, call "
    "load_mnist(source='tfds') once to download and prepare MNIST in the TFDS data dir "
    "($TFDS_DATA_DIR, else ~/tensorflow_datasets); a folder with the four official .gz files "
    "given as data_dir together with source='tfds' serves as TFDS's manual dir instead of the "
    "download."
)


def tfds_installed() -> bool:
    """Whether ``tensorflow_datasets`` can be imported (found on the path; not imported)."""
    return importlib.util.find_spec("tensorflow_datasets") is not None


def _import_tfds() -> Any:
    try:
        return importlib.import_module("tensorflow_datasets")
    except ImportError as err:
        raise ImportError(
            f"source='tfds' needs tensorflow-datasets, which cannot be imported ({err}).\n"
            + HOW_TO_GET_MNIST
        ) from err


def _mnist_builder(tfds: Any, tfds_data_dir: str | pathlib.Path | None) -> Any:
    return tfds.builder("mnist", data_dir=None if tfds_data_dir is None else str(tfds_data_dir))


def tfds_mnist_prepared(tfds_data_dir: str | pathlib.Path | None) -> bool:
    """Whether TFDS is installed and MNIST is prepared in ``tfds_data_dir`` (TFDS's default when
    ``None``); never downloads."""
    if not tfds_installed():
        return False
    return bool(_mnist_builder(_import_tfds(), tfds_data_dir).is_prepared())


def network_reachable(host: str, port: int, timeout: float) -> bool:
    """Whether a TCP connection to ``host:port`` opens within about ``timeout`` seconds.

    The name lookup, which a socket timeout does not bound, runs in a daemon thread that is
    abandoned after ``timeout + 1`` seconds.
    """
    opened: list[bool] = []

    def connect() -> None:
        try:
            socket.create_connection((host, port), timeout=timeout).close()
            opened.append(True)
        except OSError:
            pass

    thread = threading.Thread(target=connect, daemon=True)
    thread.start()
    thread.join(timeout + 1.0)
    return bool(opened)


def _check_can_prepare(
    builder: Any, manual_dir: pathlib.Path | None, probe_timeout: float
) -> None:
    """Raise ``RuntimeError`` listing every missing prerequisite of ``download_and_prepare``."""
    problems = []
    if importlib.util.find_spec("tensorflow") is None:
        problems.append(
            "TensorFlow is not installed; TFDS needs it to prepare MNIST (tf.io.gfile)."
        )
    missing = []
    for name, digest in MNIST_SHA256.items():
        path = None if manual_dir is None else manual_dir / name
        if path is None or not path.is_file():
            missing.append(name)
        elif file_sha256(path.read_bytes()) != digest:
            problems.append(
                f"{str(path)!r} is not the official MNIST file (sha256 differs), so TFDS "
                f"would reject it; load such a folder with source='idx'."
            )
    if missing:
        host = urllib.parse.urlparse(builder.URL).hostname
        if not network_reachable(host, 443, probe_timeout):
            where = "no manual dir was given" if manual_dir is None else (
                f"they are not in the manual dir {str(manual_dir)!r}"
            )
            problems.append(
                f"{host}:443 is unreachable (offline?) and {missing} must be downloaded "
                f"({where}); TFDS would retry for about 200 s before failing."
            )
    if problems:
        raise RuntimeError(
            f"MNIST is not prepared in the TFDS data dir {builder.data_dir!r} and cannot be "
            "prepared now:\n  - " + "\n  - ".join(problems) + "\n" + HOW_TO_GET_MNIST
        )


def _read_prepared(tfds: Any, builder: Any, split: str) -> tuple[np.ndarray, np.ndarray]:
    random_access = tfds.core.file_adapters.FileFormat.with_random_access()
    if builder.info.file_format in random_access:
        examples = list(builder.as_data_source(split=split))
        images = np.stack([example["image"] for example in examples])
        labels = np.array([example["label"] for example in examples])
    else:
        if importlib.util.find_spec("tensorflow") is None:
            raise RuntimeError(
                f"MNIST is prepared in {builder.data_dir!r} in the "
                f"{builder.info.file_format.value} format, which TFDS reads only through "
                "TensorFlow, and TensorFlow is not installed: pip install -e '.[tfds]', or "
                "prepare it again with file_format='array_record' (readable without "
                "TensorFlow), or load the IDX files with source='idx'."
            )
        arrays = tfds.as_numpy(builder.as_dataset(split=split, batch_size=-1))
        images, labels = arrays["image"], arrays["label"]
    return images.reshape(images.shape[0], *images.shape[1:3]), labels


def load_tfds_mnist(
    split: str,
    *,
    manual_dir: pathlib.Path | None,
    tfds_data_dir: str | pathlib.Path | None,
    probe_timeout: float = 3.0,
) -> tuple[np.ndarray, np.ndarray]:
    """Read one MNIST split through TFDS, preparing it first if needed and possible.

    Args:
        split: ``"train"`` or ``"test"``.
        manual_dir: a folder with the official gzipped IDX files, used as TFDS's manual dir so
            that preparing needs no download; ``None`` to download.
        tfds_data_dir: the TFDS data dir; ``None`` for TFDS's default.
        probe_timeout: seconds allowed to the reachability probe of the download host.

    Returns:
        ``(images, labels)``: ``uint8 (n, 28, 28)`` and integer ``(n,)`` numpy arrays, in the
        order of the prepared dataset (TFDS shuffles the files when preparing).

    Raises:
        ImportError: tensorflow-datasets is not installed.
        RuntimeError: MNIST is not prepared and a prerequisite of preparing is missing
            (TensorFlow, the official files, or network access); or it is prepared in a format
            that needs TensorFlow to read, and TensorFlow is missing.
    """
    tfds = _import_tfds()
    builder = _mnist_builder(tfds, tfds_data_dir)
    if not builder.is_prepared():
        _check_can_prepare(builder, manual_dir, probe_timeout)
        config = tfds.download.DownloadConfig(
            manual_dir=None if manual_dir is None else str(manual_dir)
        )
        builder.download_and_prepare(download_config=config)
    return _read_prepared(tfds, builder, split)
