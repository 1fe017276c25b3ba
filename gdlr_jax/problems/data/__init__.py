"""Data sets (layer 1: problems): MNIST from IDX files or tensorflow-datasets.

See :mod:`gdlr_jax.problems.data.mnist` and ``docs/data.md``.
"""

from gdlr_jax.problems.data.mnist import MNIST_SHA256 as MNIST_SHA256
from gdlr_jax.problems.data.mnist import MnistData as MnistData
from gdlr_jax.problems.data.mnist import load_mnist as load_mnist
