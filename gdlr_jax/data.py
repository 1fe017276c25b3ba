"""``gdlr_jax.data``: the public name of :mod:`gdlr_jax.problems.data` (layer 1: problems)."""

from gdlr_jax.problems.data import MNIST_SHA256 as MNIST_SHA256
from gdlr_jax.problems.data import MnistData as MnistData
from gdlr_jax.problems.data import load_mnist as load_mnist
