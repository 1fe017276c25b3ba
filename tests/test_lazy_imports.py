"""``import gdlr_jax`` imports Flax only when ``gdlr_jax.mlp`` is used (module ``__getattr__``)."""

from __future__ import annotations

import subprocess
import sys

import pytest

import gdlr_jax


def _modules_after(code: str) -> set[str]:
    """The top-level modules loaded by a fresh interpreter after running ``code``."""
    out = subprocess.run(
        [sys.executable, "-c", code + "\nimport sys; print(' '.join(sys.modules))"],
        capture_output=True, text=True, check=True, timeout=120,
    ).stdout
    return {name.partition(".")[0] for name in out.split()}


def test_import_gdlr_jax_does_not_import_flax():
    assert "flax" not in _modules_after("import gdlr_jax, gdlr_jax.curvature, gdlr_jax.engine")


def test_mlp_is_imported_on_first_access():
    assert "flax" in _modules_after("import gdlr_jax; gdlr_jax.mlp.MLP")


@pytest.mark.parametrize(
    "code",
    ["import gdlr_jax; f = gdlr_jax.mlp.mlp_loss",
     "from gdlr_jax.mlp import mlp_loss as f",
     "from gdlr_jax.problems import mlp; f = mlp.mlp_loss",
     "import gdlr_jax.problems; f = gdlr_jax.problems.mlp.mlp_loss"],
)
def test_every_spelling_reaches_the_same_module(code):
    from gdlr_jax.problems.mlp import mlp_loss

    scope: dict = {}
    exec(code, scope)
    assert scope["f"] is mlp_loss


def test_unknown_attribute_is_an_attribute_error():
    with pytest.raises(AttributeError, match="no attribute 'mlpp'"):
        gdlr_jax.mlpp  # noqa: B018
    assert "mlp" in dir(gdlr_jax)
