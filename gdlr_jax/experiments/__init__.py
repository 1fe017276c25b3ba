"""Experiments (layer 5): validated YAML configs, runs that write results and figures, ``gdlr``.

* :mod:`~gdlr_jax.experiments.config`: configs, their schemas, ``--set`` overrides,
  fingerprints, and the registry ``EXPERIMENTS`` (a config's ``experiment:`` key -> module);
* :mod:`~gdlr_jax.experiments.runner`: finding configs, the output folder, :class:`RunOutput`
  (every file of a run is written through it), the summary table;
* ``_skeleton`` (the sections and run steps every experiment shares) and ``_shared_problems``
  (the problems several experiments run);
* the experiments: :mod:`~gdlr_jax.experiments.two_neuron` (the paper's worked example:
  Figures 1 and 2, basin map), :mod:`~gdlr_jax.experiments.mnist` (Figures 3-6),
  :mod:`~gdlr_jax.experiments.fractal_boundary` (zooms into trainability boundaries) and
  :mod:`~gdlr_jax.experiments.critical_step_size` (the collapse step size of Figure 3's MLPs);
  :mod:`~gdlr_jax.experiments.figures`: the figures of each (matplotlib, Agg);
* :mod:`~gdlr_jax.experiments.cli`: the ``gdlr`` command (``docs/cli.md``).

Experiment modules are imported on first use (:func:`get_experiment`).
"""

from gdlr_jax.experiments.config import EXPERIMENTS as EXPERIMENTS
from gdlr_jax.experiments.config import Config as Config
from gdlr_jax.experiments.config import ConfigError as ConfigError
from gdlr_jax.experiments.config import Experiment as Experiment
from gdlr_jax.experiments.config import get_experiment as get_experiment
from gdlr_jax.experiments.config import load_config as load_config
from gdlr_jax.experiments.runner import RunOutcome as RunOutcome
from gdlr_jax.experiments.runner import RunOutput as RunOutput
from gdlr_jax.experiments.runner import RunReport as RunReport
from gdlr_jax.experiments.runner import run_config as run_config
