"""The layer rule of ``docs/architecture.md``, read from the code: every import of a gdlr_jax
module, at any depth of a module (function-level imports included), goes to the same layer or
an earlier one, and the package's imports have no circles; every name of the public API of
before the layout change is still importable."""

from __future__ import annotations

import ast
import importlib
import pathlib

import pytest

PACKAGE = pathlib.Path(__file__).resolve().parents[1] / "gdlr_jax"
LAYERS = ("problems", "curvature", "dynamics", "engine", "experiments")
# The top-level modules: the public API (``__init__``, above every layer), the version (imports
# nothing) and the public names of the layer-1 modules.
FACADES = {"__init__": len(LAYERS), "_version": 0, "linear": 0, "mlp": 0, "data": 0}


def _module_name(path: pathlib.Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _layer(module: str) -> int:
    """The layer index of a module name ``gdlr_jax.X...``."""
    parts = module.split(".")
    if len(parts) == 1:
        return FACADES["__init__"]
    if parts[1] in LAYERS:
        return LAYERS.index(parts[1])
    return FACADES[parts[1]]


def _imports(path: pathlib.Path) -> list[tuple[int, str]]:
    """(line, module) of every gdlr_jax import in a file; ``from gdlr_jax import x`` names
    ``gdlr_jax.x`` when ``x`` is a module, else ``gdlr_jax`` (e.g. ``__version__``)."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, a.name) for a in node.names if a.name.startswith("gdlr_jax")]
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("gdlr_jax"):
            for alias in node.names:
                candidate = f"{node.module}.{alias.name}"
                is_module = (PACKAGE.parent / candidate.replace(".", "/")).with_suffix(".py").exists() or (
                    PACKAGE.parent / candidate.replace(".", "/") / "__init__.py"
                ).exists()
                found.append((node.lineno, candidate if is_module else node.module))
    return found


MODULES = sorted(PACKAGE.rglob("*.py"))


def test_every_module_is_in_a_layer():
    for path in MODULES:
        rel = path.relative_to(PACKAGE)
        assert rel.parts[0] in LAYERS or rel.stem in FACADES, f"{rel} is in no layer"


@pytest.mark.parametrize("path", MODULES, ids=lambda p: str(p.relative_to(PACKAGE)))
def test_no_import_against_the_layer_order(path):
    own = _layer(_module_name(path))
    for line, module in _imports(path):
        assert _layer(module) <= own, (
            f"{path.relative_to(PACKAGE)}:{line} (layer {own + 1}, {LAYERS[min(own, 4)]}) imports "
            f"{module} (layer {_layer(module) + 1}): imports go only to the same or earlier layers"
        )


def test_no_import_circles():
    graph = {_module_name(p): set() for p in MODULES}
    for path in MODULES:
        for _, module in _imports(path):
            if module in graph and module != "gdlr_jax":
                graph[_module_name(path)].add(module)
    # packages import their own modules to re-export them; a circle is between modules
    def is_package(name):
        return (PACKAGE.parent / name.replace(".", "/") / "__init__.py").exists()

    state: dict[str, int] = {}

    def visit(node, stack):
        state[node] = 1
        for nxt in sorted(graph[node]):
            if is_package(nxt) or is_package(node):
                continue
            if state.get(nxt) == 1:
                circle = stack[stack.index(nxt):] + [nxt]
                pytest.fail("import circle: " + " -> ".join(circle))
            if nxt not in state:
                visit(nxt, stack + [nxt])
        state[node] = 2

    for name in sorted(graph):
        if name not in state:
            visit(name, [name])



def _experiment_imports(path: pathlib.Path) -> list[str]:
    """``file:line imports module`` for every import of a registered experiment module
    (``EXPERIMENTS`` of ``gdlr_jax/experiments/config.py``) in a file, its own name aside."""
    from gdlr_jax.experiments.config import EXPERIMENTS

    own = _module_name(path)
    experiments = set(EXPERIMENTS.values())
    return [
        f"{path.relative_to(PACKAGE)}:{line} imports {module}"
        for line, module in _imports(path)
        if module in experiments and module != own
    ]


EXPERIMENT_LAYER = sorted((PACKAGE / "experiments").rglob("*.py"))


@pytest.mark.parametrize("path", EXPERIMENT_LAYER, ids=lambda p: str(p.relative_to(PACKAGE)))
def test_no_module_imports_an_experiment_module(path):
    # each experiment holds only what is its own: what experiments share lives in _skeleton,
    # _shared_problems and figures/, and the registry names the experiments as strings
    found = _experiment_imports(path)
    assert not found, "; ".join(found) + ": move what is shared to a shared module"


def test_the_experiment_import_check_sees_such_an_import(tmp_path, monkeypatch):
    # what fractal_boundary.py did before it was decoupled, in the three forms of an import
    copy = tmp_path / "gdlr_jax" / "experiments" / "fractal_boundary.py"
    copy.parent.mkdir(parents=True)
    for name in ("mnist", "two_neuron", "_skeleton"):
        (copy.parent / f"{name}.py").write_text("")
    copy.write_text(
        "from gdlr_jax.experiments import _skeleton, mnist\n"
        "from gdlr_jax.experiments.two_neuron import initial_grid\n"
        "import gdlr_jax.experiments.fractal_boundary\n"
        "def f():\n"
        "    import gdlr_jax.experiments.two_neuron as tn\n"
    )
    monkeypatch.setitem(globals(), "PACKAGE", tmp_path / "gdlr_jax")
    assert _experiment_imports(copy) == [
        "experiments/fractal_boundary.py:1 imports gdlr_jax.experiments.mnist",
        "experiments/fractal_boundary.py:2 imports gdlr_jax.experiments.two_neuron",
        "experiments/fractal_boundary.py:5 imports gdlr_jax.experiments.two_neuron",
    ]

# Every public name importable before the layout change (commit 546a733).
PUBLIC = {
    "gdlr_jax": """CheckpointMismatchError ChunkMemoryError ConvergenceCriteria CriticalStepSize
        FixedPointStability GdMapSpectrum HostMemoryError LanczosResult Minibatches
        SpectralQuadrature SweepChunk SweepPlan SweepResult TrajectoryStatus bottom_eigenvalues
        classify_fixed_point critical_step_size data gd_map gd_map_eigenvalues gd_map_jacobian
        gd_map_slogdet gd_map_spectral_radius gd_map_spectrum hessian hessian_matvec
        hessian_spectrum hvp lanczos linear log_spectral_density mlp plan_sweep
        smallest_nonzero_eigenvalue spectral_density spectrum_counts
        stochastic_lanczos_quadrature sweep top_eigenvalues weak_stability_threshold
        weakly_stable __version__""",
    "gdlr_jax.linear": "Coordinates LinearNetwork Params deep_scalar two_neuron",
    "gdlr_jax.mlp": "LOSSES MLP Batch Params init_mlp_params mlp_apply mlp_loss",
    "gdlr_jax.data": "MNIST_SHA256 MnistData load_mnist",
    "gdlr_jax.experiments": """EXPERIMENTS Config ConfigError Experiment get_experiment
        load_config RunOutcome RunOutput RunReport run_config""",
}


@pytest.mark.parametrize("module", sorted(PUBLIC))
def test_public_names_still_import(module):
    mod = importlib.import_module(module)
    missing = [name for name in PUBLIC[module].split() if not hasattr(mod, name)]
    assert not missing, f"{module} lacks {missing}"


def test_public_aliases_are_the_layer_modules():
    import gdlr_jax
    from gdlr_jax.problems import data, linear, mlp

    assert gdlr_jax.linear.LinearNetwork is linear.LinearNetwork
    assert gdlr_jax.mlp.mlp_loss is mlp.mlp_loss
    assert gdlr_jax.data.load_mnist is data.load_mnist
