"""Figures of the experiments, drawn with matplotlib's Agg canvas (no display needed; layer 5).

Every function takes plain numpy arrays and returns a ``matplotlib.figure.Figure`` built
without pyplot (no global figure state, nothing to close); the run saves it as PNG and PDF
(:meth:`gdlr_jax.experiments.runner.RunOutput.save_figure`). Sizes are fixed in inches, so a
PNG is ``figsize * dpi`` pixels.

* ``_common``: the trajectory statuses' colours and names (:data:`STATUS_STYLE`),
  :func:`status_shares`, :func:`share`;
* ``two_neuron``: Figure 1 (:func:`phase_portraits`), Figure 2
  (:func:`weak_stability_vs_trapping`) and :func:`basin_map` of the two-neuron study;
* ``mnist``: Figures 3 and 4 (:func:`convergence_figure`) and 5 and 6
  (:func:`heatmaps_figure`) of the MNIST experiments;
* ``sharpness``: :func:`sharpness_trajectories`, the engine's recorded sharpness.
* ``fractal_boundary``: :func:`zoom_figure` (the labels of every zoom level) and
  :func:`box_count_figure` (their box counts), colours by :func:`label_colours`.
* ``critical_step_size``: :func:`collapse_figure` (the converged share per step size and
  depth, the measured collapse interval, the sharpness bound and ``eta = 1``).
"""

from gdlr_jax.experiments.figures._common import STATUS_STYLE as STATUS_STYLE
from gdlr_jax.experiments.figures._common import StatusStyle as StatusStyle
from gdlr_jax.experiments.figures._common import share as share
from gdlr_jax.experiments.figures._common import status_counts as status_counts
from gdlr_jax.experiments.figures._common import status_shares as status_shares
from gdlr_jax.experiments.figures.critical_step_size import (
    CollapseCurve as CollapseCurve,
)
from gdlr_jax.experiments.figures.critical_step_size import (
    collapse_figure as collapse_figure,
)
from gdlr_jax.experiments.figures.fractal_boundary import ZoomLevel as ZoomLevel
from gdlr_jax.experiments.figures.fractal_boundary import (
    box_count_figure as box_count_figure,
)
from gdlr_jax.experiments.figures.fractal_boundary import label_colours as label_colours
from gdlr_jax.experiments.figures.fractal_boundary import zoom_figure as zoom_figure
from gdlr_jax.experiments.figures.mnist import COLOUR_PERCENTILES as COLOUR_PERCENTILES
from gdlr_jax.experiments.figures.mnist import colour_limits as colour_limits
from gdlr_jax.experiments.figures.mnist import convergence_figure as convergence_figure
from gdlr_jax.experiments.figures.mnist import heatmaps_figure as heatmaps_figure
from gdlr_jax.experiments.figures.mnist import status_row_labels as status_row_labels
from gdlr_jax.experiments.figures.sharpness import (
    sharpness_trajectories as sharpness_trajectories,
)
from gdlr_jax.experiments.figures.two_neuron import CRITERION_TEX as CRITERION_TEX
from gdlr_jax.experiments.figures.two_neuron import MinimaCurve as MinimaCurve
from gdlr_jax.experiments.figures.two_neuron import PortraitPanel as PortraitPanel
from gdlr_jax.experiments.figures.two_neuron import basin_map as basin_map
from gdlr_jax.experiments.figures.two_neuron import phase_portraits as phase_portraits
from gdlr_jax.experiments.figures.two_neuron import (
    weak_stability_vs_trapping as weak_stability_vs_trapping,
)
