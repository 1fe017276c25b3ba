"""Experiment configs: YAML data files, validated against a schema per experiment (layer 5).

A config is a YAML mapping with two common keys and the keys of its experiment::

    experiment: two_neuron          # which experiment runs it (see EXPERIMENTS)
    description: one line for `gdlr list`
    sweep:                          # ... keys of the experiment's schema
      steps: 2000

Everything is checked before any compute: an unknown key, a value of the wrong type or an
impossible value (a step size <= 0, an empty grid) raises :class:`ConfigError` naming the key,
the value and what is allowed. Keys left out take the schema's defaults; the *resolved* config
(every key, defaults filled in) is what a run writes to its output folder and what
:attr:`Config.fingerprint` hashes, so a resolved config run again reproduces the run.

``--set key=value`` overrides (:func:`load_config`) address nested keys with dots
(``sweep.steps=500``, ``portraits.0.eta=0.3`` for the first item of a list); the value is read
as YAML (``0.5``, ``[1, 2]``, ``true``) and type-checked like the file.
"""

from __future__ import annotations

import dataclasses
import datetime
import hashlib
import importlib
import json
import math
import pathlib
import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import yaml

from gdlr_jax._version import __version__

#: experiment name (the config's ``experiment:`` key) -> module defining ``EXPERIMENT``.
EXPERIMENTS: dict[str, str] = {
    "two_neuron": "gdlr_jax.experiments.two_neuron",
    "mnist": "gdlr_jax.experiments.mnist",
    "fractal_boundary": "gdlr_jax.experiments.fractal_boundary",
    "critical_step_size": "gdlr_jax.experiments.critical_step_size",
}

_REQUIRED = object()
#: the largest value of an integer key unless its schema says less: 2^30, so that the
#: engine's int32 step counters hold any key and the sum of two (``docs/bad_inputs.md``).
MAX_INT = 1 << 30


class ConfigError(ValueError):
    """A config (file or ``--set`` override) that cannot be run; the message says why.

    Attributes:
        key: the dotted key at fault (``""`` for the file as a whole).
    """

    def __init__(self, message: str, key: str = ""):
        super().__init__(message)
        self.key = key


# ----- the schema ---------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Scalar:
    """A scalar key: ``int``, ``float``, ``str`` or ``bool``, with optional bounds or choices.

    ``float`` keys accept integers and require a finite value; ``int`` keys refuse booleans
    and are at most :data:`MAX_INT` unless ``le`` says less. Bounds: ``gt`` (exclusive) and
    ``ge``/``le`` (inclusive). Once a config is validated, its floats are checked again in
    the run's dtype (:func:`check_run_dtype`).
    """

    type: type
    help: str
    default: Any = _REQUIRED
    gt: float | None = None
    ge: float | None = None
    le: float | None = None
    choices: tuple | None = None

    @property
    def upper(self) -> float | None:
        """The inclusive upper bound: ``le``, or :data:`MAX_INT` for an integer key."""
        if self.type is int:
            return MAX_INT if self.le is None else min(self.le, MAX_INT)
        return self.le

    def describe(self) -> str:
        if self.choices is not None:
            return "one of " + ", ".join(repr(c) for c in self.choices)
        noun = {int: "an integer", float: "a finite number", str: "a string", bool: "true or false"}
        bounds = [
            f"{op} {bound}" if self.type is int else f"{op} {bound:g}"
            for op, bound in ((">", self.gt), (">=", self.ge), ("<=", self.upper))
            if bound is not None
        ]
        return " ".join([noun[self.type], " and ".join(bounds)]).strip()

    def validate(self, given: Any, key: str) -> Any:
        value = given
        if self.type is float and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        ok = isinstance(value, self.type) and not (self.type is int and isinstance(value, bool))
        if ok and self.type is float:
            ok = math.isfinite(value)
        if ok and self.choices is not None:
            ok = value in self.choices
        if ok and self.gt is not None:
            ok = value > self.gt
        if ok and self.ge is not None:
            ok = value >= self.ge
        if ok and self.upper is not None:
            ok = value <= self.upper
        if not ok:
            raise _bad_value(key, given, self.describe())
        return value


@dataclasses.dataclass(frozen=True)
class Numbers:
    """A list of ``length`` finite numbers (e.g. a region ``[x_min, x_max, y_min, y_max]``).

    ``check(values)`` returns what is allowed (a string) when the numbers are inconsistent,
    else None.
    """

    length: int
    help: str
    default: Any = _REQUIRED
    check: Callable[[list[float]], str | None] | None = None

    def describe(self) -> str:
        return f"a list of {self.length} finite numbers"

    def validate(self, value: Any, key: str) -> list[float]:
        numeric = isinstance(value, list) and all(
            isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
            for v in value
        )
        if not numeric or len(value) != self.length:
            raise _bad_value(key, value, self.describe())
        out = [float(v) for v in value]
        problem = self.check(out) if self.check is not None else None
        if problem is not None:
            raise _bad_value(key, value, problem)
        return out


@dataclasses.dataclass(frozen=True)
class Section:
    """A mapping of named keys (nested schema). ``check(resolved)`` returns a problem or None."""

    help: str
    keys: Mapping[str, Any]
    check: Callable[[dict], str | None] | None = None

    @property
    def default(self) -> Any:  # a section can be left out when all of its keys have defaults
        return {} if all(_has_default(node) for node in self.keys.values()) else _REQUIRED

    def describe(self) -> str:
        return "a mapping with keys " + ", ".join(self.keys)

    def validate(self, value: Any, key: str) -> dict:
        if not isinstance(value, Mapping):
            raise _bad_value(key, value, self.describe())
        for name in value:
            if name not in self.keys:
                where = f" under '{key}'" if key else ""
                raise ConfigError(
                    f"unknown config key '{_join(key, name)}'; allowed keys{where}: "
                    + ", ".join(self.keys),
                    _join(key, name),
                )
        out = {}
        for name, node in self.keys.items():
            sub = _join(key, name)
            if name in value:
                out[name] = node.validate(value[name], sub)
            elif _has_default(node):
                out[name] = node.validate(_copy(node.default), sub)
            else:
                raise ConfigError(
                    f"config key '{sub}' is missing; expected {node.describe()} ({node.help})", sub
                )
        problem = self.check(out) if self.check is not None else None
        if problem is not None:
            raise ConfigError(f"config section '{key or '<top>'}' is inconsistent: {problem}", key)
        return out


@dataclasses.dataclass(frozen=True)
class Repeated:
    """A non-empty list of mappings, each validated by ``item``."""

    item: Section
    help: str
    default: Any = _REQUIRED
    min_items: int = 1

    def describe(self) -> str:
        return f"a list of at least {self.min_items} mapping(s) with keys " + ", ".join(
            self.item.keys
        )

    def validate(self, value: Any, key: str) -> list[dict]:
        if not isinstance(value, list) or len(value) < self.min_items:
            raise _bad_value(key, value, self.describe())
        return [self.item.validate(v, _join(key, str(i))) for i, v in enumerate(value)]


Node = Scalar | Numbers | Section | Repeated


def _has_default(node: Node) -> bool:
    return node.default is not _REQUIRED


def _copy(value: Any) -> Any:
    return json.loads(json.dumps(value))


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


def _bad_value(key: str, value: Any, allowed: str) -> ConfigError:
    return ConfigError(f"config key '{key}' has value {value!r}; allowed: {allowed}", key)


def check_run_dtype(schema: Section, params: Mapping[str, Any]) -> None:
    """Checks every float of a validated config as the run holds it: cast to the config's
    ``dtype`` (float64 without one), each must stay finite and a nonzero one a normal
    number (``1e-50`` is 0 and ``1e300`` inf in float32), and the differences of a
    :class:`Numbers` list (a region's extent) finite.

    Raises:
        ConfigError: naming the key, its value and the dtype.
    """
    dtype = np.dtype(params["dtype"] if isinstance(params.get("dtype"), str) else "float64")
    info = np.finfo(dtype)

    def check(value: float, key: str, shown: Any = None) -> None:
        with np.errstate(over="ignore", under="ignore"):
            cast = np.asarray(value, np.float64).astype(dtype)
        if np.isfinite(cast) and (value == 0 or abs(cast) >= info.tiny):
            return
        where = "" if shown is None else f" holding {value!r}"
        raise ConfigError(
            f"config key '{key}' has value {value if shown is None else shown!r}{where}, which "
            f"is {cast.item()!r} in {dtype} (the run's dtype); allowed: numbers {dtype} holds, "
            f"{info.tiny:.3g} to {info.max:.3g} in magnitude (or 0)",
            key,
        )

    def walk(node: Any, value: Any, key: str) -> None:
        if isinstance(node, Section):
            for name, sub in node.keys.items():
                walk(sub, value[name], _join(key, name))
        elif hasattr(node, "item") and isinstance(value, list):  # Repeated, lists of numbers
            for i, sub in enumerate(value):
                walk(node.item, sub, _join(key, str(i)))
        elif isinstance(node, Numbers):
            for number in value:
                check(number, key, value)
            with np.errstate(over="ignore"):
                spread = np.float64(max(value)) - np.float64(min(value))
                cast = spread.astype(dtype)
            if not np.isfinite(cast):
                raise ConfigError(
                    f"config key '{key}' has value {value!r}: its numbers differ by more than "
                    f"{dtype} (the run's dtype) holds; allowed: numbers that differ by at most "
                    f"{info.max:.3g}",
                    key,
                )
        elif isinstance(node, Scalar) and node.type is float:
            check(value, key)

    walk(schema, params, "")


def schema_entries(node: Node, prefix: str = "") -> list[tuple[str, str, str, str]]:
    """Flattens a schema into ``(key, allowed, default, help)`` rows (for docs and ``--help``)."""
    if isinstance(node, Section):
        rows = []
        for name, sub in node.keys.items():
            rows += schema_entries(sub, _join(prefix, name))
        return rows
    if isinstance(node, Repeated):
        default = json.dumps(node.default) if _has_default(node) else "required"
        rows = [(prefix, node.describe(), default, node.help)]
        return rows + schema_entries(node.item, prefix + ".<i>")
    default = json.dumps(node.default) if _has_default(node) else "required"
    return [(prefix, node.describe(), default, node.help)]


# ----- experiments --------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Experiment:
    """An experiment that configs can name in their ``experiment:`` key.

    Attributes:
        name: the registry key (``EXPERIMENTS``).
        summary: one line saying what it computes.
        schema: the :class:`Section` of its keys (besides ``experiment`` and ``description``).
        plan: ``plan(params) -> planned``: from the resolved keys ``params``, checks what
            the keys alone cannot (the data, the memory of every sweep), raising
            :class:`ConfigError`, before the output folder is made and before any compute;
            returns what ``run`` needs (the loaded data, the planned sweeps).
        run: ``run(params, planned, output, progress) -> RunReport``: computes, writes
            arrays and figures through ``output``
            (:class:`gdlr_jax.experiments.runner.RunOutput`) and returns what goes into
            ``summary.json`` and the terminal table.
        describe: ``describe(params, planned) -> [PlannedSweep, ...]``
            (:class:`gdlr_jax.experiments.runner.PlannedSweep`): the sweeps ``run`` would
            make, for ``gdlr run --dry-run``; ``None`` when the experiment does not say.
    """

    name: str
    summary: str
    schema: Section
    plan: Callable[..., Any]
    run: Callable[..., Any]
    describe: Callable[..., Any] | None = None


def get_experiment(name: str) -> Experiment:
    """The experiment registered under ``name`` (its module is imported on first use)."""
    if name not in EXPERIMENTS:
        raise ConfigError(
            f"config key 'experiment' has value {name!r}; allowed: one of "
            + ", ".join(repr(n) for n in EXPERIMENTS),
            "experiment",
        )
    return importlib.import_module(EXPERIMENTS[name]).EXPERIMENT


# ----- YAML ---------------------------------------------------------------------------------
#: the largest config file (and ``--set`` value), in bytes.
MAX_CONFIG_BYTES = 1 << 20
#: the deepest nesting of mappings and lists in a config.
MAX_CONFIG_DEPTH = 32
#: the most values (scalars, mappings and lists) in a config.
MAX_CONFIG_NODES = 100_000


class _Loader(yaml.SafeLoader):
    """Safe YAML that also reads ``1e-3`` as a float (YAML 1.1 wants ``1.0e-3``) and refuses
    duplicate keys in a mapping."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        self.flatten_mapping(node)
        seen: dict[Any, yaml.Mark] = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            try:
                first = seen.setdefault(key, key_node.start_mark)
            except TypeError:  # an unhashable key: the base class says so
                break
            if first is not key_node.start_mark:
                raise yaml.constructor.ConstructorError(
                    None,
                    None,
                    f"duplicate key {key!r} (first at line {first.line + 1}); a key may appear "
                    "once in a mapping",
                    key_node.start_mark,
                )
        return super().construct_mapping(node, deep=deep)


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(
        r"""^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?
        |[-+]?(?:[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)
        |\.[0-9_]+(?:[eE][-+]?[0-9]+)?
        |[-+]?\.(?:inf|Inf|INF)
        |\.(?:nan|NaN|NAN))$""",
        re.X,
    ),
    list("-+0123456789."),
)


def _check_events(text: str, what: str) -> None:
    """Limits a YAML text before any object is built: no aliases (so nothing expands), at
    most :data:`MAX_CONFIG_DEPTH` levels and :data:`MAX_CONFIG_NODES` values."""
    depth = nodes = 0
    for event in yaml.parse(text, Loader=_Loader):
        where = f"line {event.start_mark.line + 1}, column {event.start_mark.column + 1}"
        if isinstance(event, yaml.AliasEvent):
            raise ConfigError(
                f"{what} uses the YAML alias *{event.anchor} at {where}; configs allow no "
                "anchors and aliases (write the values out)"
            )
        if isinstance(event, (yaml.MappingStartEvent, yaml.SequenceStartEvent)):
            depth += 1
            if depth > MAX_CONFIG_DEPTH:
                raise ConfigError(
                    f"{what} nests mappings and lists deeper than {MAX_CONFIG_DEPTH} levels "
                    f"(at {where})"
                )
        elif isinstance(event, (yaml.MappingEndEvent, yaml.SequenceEndEvent)):
            depth -= 1
        if isinstance(event, yaml.NodeEvent):
            nodes += 1
            if nodes > MAX_CONFIG_NODES:
                raise ConfigError(f"{what} holds more than {MAX_CONFIG_NODES} values (at {where})")


_YAML_NAMES = {
    datetime.date: "a YAML date or timestamp",
    datetime.datetime: "a YAML date or timestamp",
    bytes: "YAML !!binary",
    set: "a YAML !!set",
    tuple: "a pair of YAML !!omap or !!pairs",
}


def _check_json_values(value: Any, what: str, key: str = "") -> None:
    """Refuses what JSON cannot hold (dates, ``!!set``, ``!!binary``, keys that are not
    strings): a config is JSON data written in YAML."""
    if isinstance(value, dict):
        for name, sub in value.items():
            if not isinstance(name, str):
                raise ConfigError(
                    f"{what}: the key {name!r} under '{key or '<top>'}' is not a string "
                    f"({type(name).__name__}); config keys are strings (quote it)",
                    key,
                )
            _check_json_values(sub, what, _join(key, name))
    elif isinstance(value, list):
        for i, sub in enumerate(value):
            _check_json_values(sub, what, _join(key, str(i)))
    elif value is not None and not isinstance(value, (str, int, float)):
        kind = next((n for t, n in _YAML_NAMES.items() if isinstance(value, t)), None)
        kind = kind or type(value).__name__
        raise ConfigError(
            f"{what}: config key '{key or '<top>'}' holds {kind}, which a config cannot hold: "
            "configs hold strings, numbers, booleans, null, lists and mappings (quote a value "
            "to make it a string)",
            key,
        )


def read_yaml(text: str, what: str) -> Any:
    """The JSON-compatible data of a YAML text, read within limits.

    Before any object is built the text is checked: at most :data:`MAX_CONFIG_BYTES` bytes,
    no aliases, at most :data:`MAX_CONFIG_DEPTH` levels of nesting and
    :data:`MAX_CONFIG_NODES` values; then duplicate keys and values JSON cannot hold (dates,
    ``!!set``, ``!!binary``, non-string keys) are refused.

    Raises:
        ConfigError: in one line starting with ``what`` (e.g. ``config file x.yaml``).
    """
    size = len(text.encode("utf-8", "surrogatepass"))
    if size > MAX_CONFIG_BYTES:
        raise ConfigError(
            f"{what} is {size} bytes, more than the {MAX_CONFIG_BYTES} bytes a config may hold"
        )
    try:
        _check_events(text, what)
        value = yaml.load(text, Loader=_Loader)
    except yaml.YAMLError as err:
        raise ConfigError(f"{what} is not valid YAML: {' '.join(str(err).split())}") from None
    _check_json_values(value, what)
    return value



# ----- overrides ----------------------------------------------------------------------------
def parse_override(text: str) -> tuple[str, Any]:
    """``"sweep.steps=500"`` -> ``("sweep.steps", 500)``; the value is read as YAML."""
    key, sep, value = text.partition("=")
    key = key.strip()
    if not sep or not key or not re.fullmatch(r"[A-Za-z0-9_]+(\.[A-Za-z0-9_]+)*", key):
        raise ConfigError(
            f"--set {text!r}: expected KEY=VALUE with a dotted key, e.g. sweep.steps=500"
        )
    return key, read_yaml(value, f"--set {text!r}: the value")


def _apply_override(raw: dict, key: str, value: Any, schema: Section) -> None:
    node: Any = schema
    target: Any = raw
    parts = key.split(".")
    for depth, part in enumerate(parts):
        done = ".".join(parts[:depth])
        last = depth == len(parts) - 1
        if isinstance(node, Section):
            if not isinstance(target, dict):
                raise ConfigError(f"--set {key}: '{done}' is not a mapping in the config", key)
            if part not in node.keys:
                where = f" under '{done}'" if done else ""
                raise ConfigError(
                    f"--set {key}: unknown config key '{_join(done, part)}'; allowed keys"
                    f"{where}: " + ", ".join(node.keys),
                    _join(done, part),
                )
            child = node.keys[part]
            if last:
                target[part] = value
                return
            if part not in target:
                if not _has_default(child):
                    raise ConfigError(f"--set {key}: '{_join(done, part)}' is not set", key)
                target[part] = _copy(child.default)
            node, target = child, target[part]
        elif isinstance(node, Repeated):
            if not (part.isdigit() and isinstance(target, list) and int(part) < len(target)):
                count = len(target) if isinstance(target, list) else 0
                raise ConfigError(
                    f"--set {key}: '{done}' is a list of {count} item(s); "
                    f"expected an index 0..{count - 1}, got {part!r}",
                    key,
                )
            if last:
                target[int(part)] = value
                return
            node, target = node.item, target[int(part)]
        else:
            raise ConfigError(f"--set {key}: '{done}' is a value, not a mapping", key)


def _overrides_at_fault(
    err: ConfigError, set_keys: Sequence[str], schema: Section, in_file: dict
) -> list[str]:
    """The overridden keys that ``err``, raised validating the overridden config, is due to.

    An override is at fault when it set the key at fault or a mapping or list holding it
    (``training.etas=[.nan]`` for ``training.etas.0``), or when it set a key inside the
    section whose consistency check failed and the file alone (``in_file``) passes that check.
    """
    at_or_above = [k for k in set_keys if err.key == k or err.key.startswith(k + ".")]
    inside = [k for k in set_keys if k.startswith(err.key + ".") or not err.key]
    if inside:
        try:
            schema.validate(in_file, "")
        except ConfigError as file_err:
            if file_err.key == err.key:
                inside = []
    return list(dict.fromkeys(at_or_above + inside))


# ----- configs ------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Config:
    """A validated config, every key resolved.

    Attributes:
        name: the config's name (its file stem); the default output folder is ``runs/<name>``.
        experiment: the experiment that runs it.
        description: the one-line description.
        params: the experiment's keys, resolved (defaults filled in), JSON-compatible.
        source: the file it was read from (None when built from a mapping).
        overrides: the ``--set`` overrides applied, as given.
    """

    name: str
    experiment: str
    description: str
    params: dict
    source: pathlib.Path | None = None
    overrides: tuple[str, ...] = ()

    def resolved(self) -> dict:
        """The full config as a mapping (``experiment``, ``description``, then its keys)."""
        return {"experiment": self.experiment, "description": self.description, **self.params}

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.resolved(), sort_keys=False, default_flow_style=None)

    @property
    def fingerprint(self) -> str:
        """sha256 of the experiment, its resolved keys and the gdlr_jax version.

        Two runs with equal fingerprints compute the same thing with the same code version;
        the description is left out (it does not change results).
        """
        payload = {"experiment": self.experiment, "params": self.params, "gdlr_jax": __version__}
        text = json.dumps(payload, sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(text.encode()).hexdigest()


def config_from_mapping(
    raw: Any, name: str, *, overrides: Sequence[str] = (), source: pathlib.Path | None = None
) -> Config:
    """Validates a config mapping (as read from YAML), after applying ``--set`` overrides.

    Raises:
        ConfigError: naming the key, its value and what is allowed.
    """
    if not isinstance(raw, Mapping):
        raise ConfigError(
            f"a config must be a YAML mapping of keys (experiment: ..., ...), "
            f"got {type(raw).__name__}"
        )
    raw = _copy(dict(raw))
    top = Section(
        "config",
        {
            "experiment": Scalar(str, "the experiment to run", choices=tuple(EXPERIMENTS)),
            "description": Scalar(str, "one line shown by `gdlr list`", default=""),
        },
    )
    head = {k: raw.pop(k) for k in ("experiment", "description") if k in raw}
    in_file = _copy(raw)
    head = top.validate(head, "")
    experiment = get_experiment(head["experiment"])
    parsed = [parse_override(text) for text in overrides]
    for key, value in parsed:
        if key in top.keys:
            raise ConfigError(f"--set {key}: '{key}' cannot be overridden; edit the file", key)
        _apply_override(raw, key, value, experiment.schema)
    try:
        params = experiment.schema.validate(raw, "")
        check_run_dtype(experiment.schema, params)
    except ConfigError as err:
        blamed = _overrides_at_fault(err, [key for key, _ in parsed], experiment.schema, in_file)
        if blamed:
            sources = ", ".join(f"--set {key}" for key in blamed)
            raise ConfigError(f"{err} (from {sources})", err.key) from None
        raise
    return Config(
        name=name,
        experiment=head["experiment"],
        description=head["description"],
        params=params,
        source=source,
        overrides=tuple(overrides),
    )


def load_config(path: str | pathlib.Path, overrides: Sequence[str] = ()) -> Config:
    """Reads and validates a YAML config file, with ``--set KEY=VALUE`` overrides.

    Args:
        path: the YAML file.
        overrides: strings ``"dotted.key=value"``, applied in order.

    Raises:
        ConfigError: on a missing or unreadable file, invalid YAML, an unknown key, a wrong
            type or an impossible value; the message names the key, the value and what is
            allowed (prefixed by the file name).
    """
    path = pathlib.Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path} (`gdlr list` shows the shipped configs)")
    try:
        with open(path, "rb") as handle:  # at most one byte more than a config may hold
            data = handle.read(MAX_CONFIG_BYTES + 1)
        if len(data) > MAX_CONFIG_BYTES:
            raise ConfigError(
                f"config file {path} is larger than the {MAX_CONFIG_BYTES} bytes a config may "
                "hold"
            )
        text = data.decode("utf-8")
    except (OSError, UnicodeDecodeError) as err:
        raise ConfigError(f"config file {path} cannot be read as UTF-8 text: {err}") from None
    raw = read_yaml(text, f"config file {path}")
    try:
        return config_from_mapping(raw, path.stem, overrides=overrides, source=path)
    except ConfigError as err:
        raise ConfigError(f"{path}: {err}", err.key) from None
