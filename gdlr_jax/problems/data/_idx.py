"""Reading MNIST's IDX files with numpy: header magic, dimensions and sizes checked.

An IDX file (the format of the original MNIST distribution) is a big-endian header followed
by the raw data:

    magic (4 bytes) = 0x00 0x00 <type code> <ndim>,   dims (ndim x uint32),   data.

MNIST uses the type code 0x08 (unsigned bytes): images have magic 2051 (``0x00000803``,
three dimensions ``(n, 28, 28)``), labels have magic 2049 (``0x00000801``, one dimension
``(n,)``). Files may be gzipped (detected by the gzip magic bytes, whatever the name).
"""

from __future__ import annotations

import gzip
import hashlib
import math
import os
import pathlib
import zlib
from collections.abc import Mapping
from typing import IO

import numpy as np

IMAGES_MAGIC = 2051
LABELS_MAGIC = 2049
IMAGE_SIDE = 28
_GZIP_MAGIC = b"\x1f\x8b"
_BLOCK = 1 << 20  # bytes read at a time
#: the most items (images or labels) an IDX file may announce: MNIST has 70,000 (60,000 +
#: 10,000), EMNIST's largest split 697,932; a header beyond is refused before any allocation.
MAX_IDX_ITEMS = 1_000_000

# sha256 of the official gzipped MNIST files: the digests tensorflow-datasets registers for its
# download of them (tensorflow_datasets/url_checksums/mnist.txt).
MNIST_SHA256: Mapping[str, str] = {
    "train-images-idx3-ubyte.gz": "440fcabf73cc546fa21475e81ea370265605f56be210a4024d2ca8f203523609",
    "train-labels-idx1-ubyte.gz": "3552534a0a558bbed6aed32b30c495cca23d567ec52cac8be1a0730e8010255c",
    "t10k-images-idx3-ubyte.gz": "8d422c7b0a1c1c79245a5bcf07fe86e33eeafee792b84584aec276f5a2dbc4e6",
    "t10k-labels-idx1-ubyte.gz": "f7ae60f92e00ec6debd23a6088c31dbd2371eca3ffa0defaefb259924204aec6",
}

# The file stems of each split, images then labels; each may be found as ``<stem>`` or
# ``<stem>.gz``, with a hyphen (the official names) or a dot (a common re-packaging) before
# ``idx``.
SPLIT_STEMS: Mapping[str, tuple[str, str]] = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}


def candidate_names(stem: str) -> tuple[str, ...]:
    """File names accepted for ``stem``, in order of preference (gzipped official name first)."""
    dotted = stem.replace("-idx", ".idx")
    return (f"{stem}.gz", stem, f"{dotted}.gz", dotted)


def find_idx_file(folder: pathlib.Path, stem: str) -> pathlib.Path:
    """The first existing file among :func:`candidate_names` of ``stem`` in ``folder``.

    Raises:
        FileNotFoundError: when none exists; the message names the folder, the accepted names
            and what the folder holds.
    """
    for name in candidate_names(stem):
        path = folder / name
        if path.is_file():
            return path
    present = sorted(p.name for p in folder.iterdir()) if folder.is_dir() else []
    raise FileNotFoundError(
        f"MNIST file {stem!r} not found in {str(folder)!r}: expected one of "
        f"{list(candidate_names(stem))}; the folder holds {present or 'nothing'}."
    )


def file_sha256(raw: bytes) -> str:
    """Hex sha256 digest of ``raw``."""
    return hashlib.sha256(raw).hexdigest()


def check_sha256(path: pathlib.Path, expected: Mapping[str, str]) -> None:
    """Compare the sha256 of the file ``path`` (read in blocks) with ``expected[path.name]``.

    Raises:
        ValueError: when ``expected`` has no digest for ``path.name``, or the digests differ.
    """
    if path.name not in expected:
        raise ValueError(
            f"verify_sha256: no expected sha256 for {path.name!r} (read from {str(path)!r}); "
            f"known digests are for {sorted(expected)}. Official digests exist only for the "
            f"gzipped files; for other files pass verify_sha256={{'{path.name}': '<hex digest>'}}."
        )
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(_BLOCK):
            digest.update(block)
    got = digest.hexdigest()
    want = expected[path.name].strip().lower()
    if got != want:
        raise ValueError(
            f"verify_sha256: sha256 mismatch for {str(path)!r}: expected {want}, got {got}. "
            f"The file is not the one expected (corrupt, or not the official release, such as "
            f"a sample); to check other files pass verify_sha256={{'{path.name}': '<digest>'}}."
        )


def _read_into(stream: IO[bytes], out: memoryview) -> int:
    """Fills ``out`` from ``stream`` block by block; the number of bytes read (fewer at the
    end of the stream)."""
    got = 0
    while got < len(out):
        n = stream.readinto(out[got : got + _BLOCK])
        if not n:
            break
        got += n
    return got


def read_idx(
    path: pathlib.Path,
    *,
    magic: int,
    expected_sha256: Mapping[str, str] | None = None,
) -> np.ndarray:
    """Read one unsigned-byte IDX file (gzipped or not) into a ``uint8`` array.

    The file is streamed (gzip decompressed block by block): the header is read and checked
    first, and the data array of the announced size is allocated only once that size is at
    most :data:`MAX_IDX_ITEMS` items (and, uncompressed, equals what the file holds), so a
    small file announcing a huge one, or a gzip bomb, is refused without using its memory;
    reading stops one byte past the announced size.

    Args:
        path: the file.
        magic: the expected magic number (:data:`IMAGES_MAGIC` or :data:`LABELS_MAGIC`).
        expected_sha256: when given, the sha256 of the file's bytes as stored on disk
            (before decompression) is checked against ``expected_sha256[path.name]``.

    Returns:
        ``uint8`` array of the shape given in the header: ``(n, 28, 28)`` for images, ``(n,)``
        for labels.

    Raises:
        ValueError: on a bad gzip stream, a wrong magic number, a header that does not match
            MNIST's shapes or announces more than :data:`MAX_IDX_ITEMS` items, or a data
            section shorter or longer than the header announces.
    """
    if expected_sha256 is not None:
        check_sha256(path, expected_sha256)
    with open(path, "rb") as handle:
        gzipped = handle.read(2) == _GZIP_MAGIC
        handle.seek(0)
        stream: IO[bytes] = gzip.GzipFile(fileobj=handle, mode="rb") if gzipped else handle
        try:
            return _read_idx_stream(path, stream, magic, None if gzipped else handle)
        except (OSError, EOFError, zlib.error) as err:
            if not gzipped:
                raise
            raise ValueError(f"{str(path)!r} is not a valid gzip file: {err}") from err


def _read_idx_stream(
    path: pathlib.Path, stream: IO[bytes], magic: int, plain: IO[bytes] | None
) -> np.ndarray:
    """:func:`read_idx` on an open (decompressed) ``stream``; ``plain``: the file itself
    when it is not gzipped (its size is then known before reading the data)."""
    head = stream.read(4)
    if len(head) < 4:
        raise ValueError(f"{str(path)!r} is too short ({len(head)} bytes) to be an IDX file.")
    found_magic = int.from_bytes(head, "big")
    if found_magic != magic:
        raise ValueError(
            f"{str(path)!r} has IDX magic number {found_magic} (0x{found_magic:08x}); "
            f"expected {magic} (0x{magic:08x}) for MNIST "
            f"{'images' if magic == IMAGES_MAGIC else 'labels'}."
        )
    ndim = head[3]  # the magic fixes the type code (0x08, unsigned byte) and ndim (3 or 1)
    header_len = 4 + 4 * ndim
    raw_dims = stream.read(4 * ndim)
    if len(raw_dims) < 4 * ndim:
        raise ValueError(
            f"{str(path)!r} is truncated inside its header ({4 + len(raw_dims)} bytes, "
            f"header needs {header_len})."
        )
    dims = tuple(int.from_bytes(raw_dims[4 * i : 4 * i + 4], "big") for i in range(ndim))
    if magic == IMAGES_MAGIC and dims[1:] != (IMAGE_SIDE, IMAGE_SIDE):
        raise ValueError(
            f"{str(path)!r}: images of {dims[1:]} pixels; MNIST images are "
            f"{IMAGE_SIDE}x{IMAGE_SIDE}."
        )
    if dims[0] > MAX_IDX_ITEMS:
        raise ValueError(
            f"{str(path)!r}: the header announces {dims[0]} items, more than the "
            f"{MAX_IDX_ITEMS} an IDX file may hold here (MNIST has 70000); the file is "
            "corrupt or not MNIST."
        )
    expected_len = math.prod(dims)

    def mismatch(found: str, problem: str) -> ValueError:
        return ValueError(
            f"{str(path)!r}: the header announces {dims} = {expected_len} bytes of data, "
            f"the file holds {found} ({problem})."
        )

    if plain is not None:
        found_len = os.fstat(plain.fileno()).st_size - header_len
        if found_len != expected_len:
            problem = "truncated" if found_len < expected_len else "extra bytes"
            raise mismatch(str(found_len), problem)
    data = np.empty(expected_len, np.uint8)  # pages are used only as they are filled
    got = _read_into(stream, memoryview(data))
    if got < expected_len:
        raise mismatch(str(got), "truncated")
    extra = _read_into(stream, memoryview(bytearray(_BLOCK)))
    if extra:
        more = "more than " if extra == _BLOCK else ""
        raise mismatch(f"{more}{expected_len + extra}", "extra bytes")
    return data.reshape(dims)
