"""The version of gdlr_jax, in a module of its own that imports nothing, so that every layer can
read it without importing the package's public API (``gdlr_jax/__init__.py``)."""

__version__ = "0.1.0"
