"""Configs: loading, schema validation (each message checked), --set overrides, fingerprints."""

from __future__ import annotations

import copy
import pathlib
import re

import pytest
import yaml

from gdlr_jax.experiments.config import (
    ConfigError,
    config_from_mapping,
    get_experiment,
    load_config,
    parse_override,
    schema_entries,
)

REPO = pathlib.Path(__file__).resolve().parents[2]
SHIPPED = REPO / "configs" / "two_neuron.yaml"


@pytest.fixture(scope="module")
def raw() -> dict:
    return yaml.safe_load(SHIPPED.read_text())


def _with(raw: dict, key: str, value) -> dict:
    out = copy.deepcopy(raw)
    *parents, last = key.split(".")
    node = out
    for part in parents:
        node = node[int(part)] if isinstance(node, list) else node[part]
    if isinstance(node, list):
        node[int(last)] = value
    else:
        node[last] = value
    return out


def _error(raw, overrides=()) -> str:
    with pytest.raises(ConfigError) as info:
        config_from_mapping(raw, "test", overrides=overrides)
    return str(info.value)


def test_every_shipped_config_is_valid():
    for path in sorted((REPO / "configs").glob("*.yaml")):
        config = load_config(path)
        assert config.name == path.stem
        assert config.description, f"{path.name} has no description for `gdlr list`"


def test_shipped_config_resolves_to_its_values_and_defaults(raw):
    config = load_config(SHIPPED)
    assert config.experiment == "two_neuron"
    assert config.params["sweep"]["eta"] == raw["sweep"]["eta"]
    assert config.params["portraits"][1]["region"] == [0.7, 1.2, 0.6, 1.2]
    # keys and sections left out take the schema defaults
    shortened = copy.deepcopy(raw)
    del shortened["figures"], shortened["sweep"]["steps"]
    params = config_from_mapping(shortened, "t").params
    assert params["figures"] == {"dpi": 150}
    assert params["sweep"]["steps"] == 2000


def test_resolved_config_round_trips_with_the_same_fingerprint(tmp_path):
    config = load_config(SHIPPED)
    path = tmp_path / "resolved.yaml"
    path.write_text(config.to_yaml())
    again = load_config(path)
    assert again.params == config.params
    assert again.fingerprint == config.fingerprint


def test_fingerprint_follows_params_not_description(raw):
    base = config_from_mapping(raw, "a")
    assert (
        config_from_mapping(_with(raw, "description", "other words"), "b").fingerprint
        == base.fingerprint
    )
    assert (
        config_from_mapping(raw, "a", overrides=["sweep.steps=7"]).fingerprint != base.fingerprint
    )
    assert re.fullmatch(r"[0-9a-f]{64}", base.fingerprint)


@pytest.mark.parametrize(
    "key, value, message",
    [
        (
            "sweep.steps",
            "many",
            "config key 'sweep.steps' has value 'many'; allowed: an integer >= 1",
        ),
        ("sweep.steps", 2.5, "config key 'sweep.steps' has value 2.5; allowed: an integer >= 1"),
        ("sweep.steps", True, "config key 'sweep.steps' has value True; allowed: an integer >= 1"),
        ("sweep.steps", 0, "config key 'sweep.steps' has value 0; allowed: an integer >= 1"),
        ("basin.eta", 0.0, "config key 'basin.eta' has value 0.0; allowed: a finite number > 0"),
        ("basin.eta", -1, "config key 'basin.eta' has value -1; allowed: a finite number > 0"),
        (
            "basin.eta",
            float("nan"),
            "config key 'basin.eta' has value nan; allowed: a finite number > 0",
        ),
        (
            "portraits.1.eta",
            "1.1",
            "config key 'portraits.1.eta' has value '1.1'; allowed: a finite number > 0",
        ),
        (
            "sweep.eta.start",
            -0.1,
            "config key 'sweep.eta.start' has value -0.1; allowed: a finite number > 0",
        ),
        ("sweep.eta.num", 0, "config key 'sweep.eta.num' has value 0; allowed: an integer >= 1"),
        (
            "sweep.resolution",
            0,
            "config key 'sweep.resolution' has value 0; allowed: an integer >= 1",
        ),
        (
            "portraits",
            [],
            "config key 'portraits' has value [];"
            " allowed: a list of at least 1 mapping(s) with keys eta, region, starts, steps",
        ),
        (
            "dtype",
            "float16",
            "config key 'dtype' has value 'float16'; allowed: one of 'float32', 'float64'",
        ),
        (
            "weak_stability.criterion",
            "lambda_min",
            "allowed: one of 'lambda_max', 'lambda_min_nonzero'",
        ),
        (
            "sweep.region",
            [0, 1, 0],
            "config key 'sweep.region' has value [0, 1, 0]; allowed: a list of 4 finite numbers",
        ),
        (
            "sweep.region",
            [1.0, 0.0, 0.0, 1.0],
            "allowed: [x_min, x_max, y_min, y_max] with x_min < x_max and y_min < y_max",
        ),
        (
            "sweep.eta",
            0.5,
            "config key 'sweep.eta' has value 0.5; allowed: a mapping with keys start, stop, num",
        ),
        (
            "figures.dpi",
            5,
            "config key 'figures.dpi' has value 5; allowed: an integer >= 20 and <= 1200",
        ),
    ],
)
def test_bad_values_name_key_value_and_what_is_allowed(raw, key, value, message):
    assert message in _error(_with(raw, key, value))


def test_inconsistent_eta_grid(raw):
    bad = _with(raw, "sweep.eta", {"start": 1.0, "stop": 0.5, "num": 3})
    assert _error(bad) == (
        "config section 'sweep.eta' is inconsistent: eta.start = 1.0 must be <= eta.stop = 0.5"
    )


def test_unknown_keys_list_the_allowed_ones(raw):
    assert _error(_with(raw, "sweeps", {})) == (
        "unknown config key 'sweeps'; allowed keys: dtype, critical_step_size, weak_stability, "
        "sweep, portraits, basin, engine, figures"
    )
    assert _error(_with(raw, "sweep.stepz", 3)) == (
        "unknown config key 'sweep.stepz';"
        " allowed keys under 'sweep': eta, region, resolution, steps"
    )
    assert "unknown config key 'portraits.0.colour'" in _error(
        _with(raw, "portraits.0.colour", "red")
    )


def test_experiment_key_missing_unknown_or_not_a_mapping(raw):
    no_experiment = {k: v for k, v in raw.items() if k != "experiment"}
    assert _error(no_experiment) == (
        "config key 'experiment' is missing; expected one of 'two_neuron', 'mnist', "
        "'fractal_boundary', 'critical_step_size' (the experiment to run)"
    )
    assert _error(_with(raw, "experiment", "three_neuron")) == (
        "config key 'experiment' has value 'three_neuron'; allowed: one of 'two_neuron', "
        "'mnist', 'fractal_boundary', 'critical_step_size'"
    )
    assert _error([1, 2]).startswith("a config must be a YAML mapping of keys")
    with pytest.raises(ConfigError, match="allowed: one of 'two_neuron', 'mnist'"):
        get_experiment("three_neuron")


def test_overrides_are_parsed_as_yaml_and_type_checked(raw):
    config = config_from_mapping(
        raw,
        "t",
        overrides=[
            "sweep.steps=500",
            "basin.eta=1e-1",
            "sweep.region=[0, 1, 0, 1]",
            "portraits.1.eta=1.05",
            "dtype=float32",
        ],
    )
    assert config.params["sweep"]["steps"] == 500
    assert config.params["basin"]["eta"] == 0.1
    assert config.params["sweep"]["region"] == [0.0, 1.0, 0.0, 1.0]
    assert config.params["portraits"][1]["eta"] == 1.05
    assert config.params["dtype"] == "float32"
    assert config.overrides[0] == "sweep.steps=500"
    # a section left out of the file can still be overridden
    no_figures = {k: v for k, v in raw.items() if k != "figures"}
    assert config_from_mapping(no_figures, "t", overrides=["figures.dpi=80"]).params["figures"] == {
        "dpi": 80
    }


@pytest.mark.parametrize(
    "override, message",
    [
        (
            "sweep.steps",
            "--set 'sweep.steps': expected KEY=VALUE with a dotted key, e.g. sweep.steps=500",
        ),
        ("=3", "--set '=3': expected KEY=VALUE"),
        ("sweep..steps=3", "--set 'sweep..steps=3': expected KEY=VALUE"),
        (
            "sweep.stepz=3",
            "--set sweep.stepz: unknown config key 'sweep.stepz';"
            " allowed keys under 'sweep': eta, region, resolution, steps",
        ),
        ("sweepz.steps=3", "--set sweepz.steps: unknown config key 'sweepz'; allowed keys: dtype,"),
        (
            "sweep.steps=abc",
            "config key 'sweep.steps' has value 'abc';"
            " allowed: an integer >= 1 and <= 1073741824 (from --set sweep.steps)",
        ),
        (
            "sweep.steps=-5",
            "config key 'sweep.steps' has value -5;"
            " allowed: an integer >= 1 and <= 1073741824 (from --set sweep.steps)",
        ),
        (
            "basin.eta=0",
            "config key 'basin.eta' has value 0;"
            " allowed: a finite number > 0 (from --set basin.eta)",
        ),
        ("sweep.steps.x=1", "--set sweep.steps.x: 'sweep.steps' is a value, not a mapping"),
        (
            "portraits.7.eta=0.3",
            "--set portraits.7.eta: 'portraits' is a list of 2 item(s);"
            " expected an index 0..1, got '7'",
        ),
        (
            "portraits.eta=0.3",
            "--set portraits.eta: 'portraits' is a list of 2 item(s);"
            " expected an index 0..1, got 'eta'",
        ),
        ("experiment=other", "--set experiment: 'experiment' cannot be overridden; edit the file"),
        ("sweep.region=[0, 1", "--set 'sweep.region=[0, 1': the value is not valid YAML"),
    ],
)
def test_bad_overrides(raw, override, message):
    assert message in _error(raw, [override])


MNIST_CPU = REPO / "configs" / "mnist_gelu_mse_cpu.yaml"


@pytest.mark.parametrize(
    "overrides, message",
    [
        # the key at fault is inside the overridden value
        (
            ["training.etas=[.nan]"],
            (
                "config key 'training.etas.0' has value nan; allowed: a finite number > 0"
                " (from --set training.etas)"
            ),
        ),
        (["training.etas=[0.1, -1]"], "'training.etas.1' has value -1"),
        (["training={etas: [.nan]}"], "'training.etas.0' has value nan"),
        (["training={stepz: 1}"], "unknown config key 'training.stepz'"),
        (["model.depths=[2, 1]"], "allowed: strictly increasing values"),
        # a section made inconsistent by the override
        (
            ["training.record_every=5000"],
            (
                "config section 'training' is inconsistent: record_every = 5000 must be <="
                " steps = 2000 (from --set training.record_every)"
            ),
        ),
        (["engine.window=2"], "criteria.window must be an integer >= 2 * max_period"),
    ],
)
def test_every_error_due_to_an_override_names_it(overrides, message):
    with pytest.raises(ConfigError) as info:
        load_config(MNIST_CPU, overrides)
    error = str(info.value)
    assert message in error
    key = overrides[0].partition("=")[0]
    assert error.endswith(f" (from --set {key})"), error


def test_errors_of_the_file_do_not_name_unrelated_overrides(raw):
    inconsistent = _with(raw, "sweep.eta", {"start": 1.0, "stop": 0.5, "num": 3})
    assert _error(inconsistent, ["sweep.eta.num=4", "basin.eta=0.5"]) == (
        "config section 'sweep.eta' is inconsistent: eta.start = 1.0 must be <= eta.stop = 0.5"
    )
    assert _error(raw, ["sweep.eta.start=2", "sweep.steps=10"]) == (
        "config section 'sweep.eta' is inconsistent: eta.start = 2.0 must be <= eta.stop = 1.2"
        " (from --set sweep.eta.start)"
    )
    assert _error(_with(raw, "basin.eta", -1.0), ["sweep.steps=10"]).endswith(
        "allowed: a finite number > 0"
    )


def test_parse_override():
    assert parse_override("a.b=[1, 2.5]") == ("a.b", [1, 2.5])
    assert parse_override("a= true") == ("a", True)
    assert parse_override("a=1e-3") == ("a", 1e-3)


def test_file_errors_name_the_file(tmp_path):
    with pytest.raises(ConfigError, match=r"config file not found: .*nope\.yaml \(`gdlr list`"):
        load_config(tmp_path / "nope.yaml")
    broken = tmp_path / "broken.yaml"
    broken.write_text("experiment: two_neuron\nsweep: [1, 2\n")
    with pytest.raises(ConfigError, match=r"config file .*broken\.yaml is not valid YAML"):
        load_config(broken)
    unknown = tmp_path / "unknown.yaml"
    unknown.write_text("experiment: two_neuron\ncolour: red\n")
    with pytest.raises(ConfigError, match=r"unknown\.yaml: unknown config key 'colour'"):
        load_config(unknown)


def test_yaml_exponent_floats_are_numbers(tmp_path):
    path = tmp_path / "exp.yaml"
    path.write_text("experiment: two_neuron\nbasin: {eta: 5e-1}\n")
    assert load_config(path).params["basin"]["eta"] == 0.5


def test_docs_cli_documents_every_key():
    text = (REPO / "docs" / "cli.md").read_text()
    for key, *_ in schema_entries(get_experiment("two_neuron").schema):
        assert f"`{key}`" in text, f"docs/cli.md does not document the key {key}"
