"""What the kernel of the engine steps: the static settings of a sweep (:class:`EngineConfig`)
and the objective of one trajectory in the layout its lanes are stored in (:class:`Problem`)
(layer 4: engine; the design is in ``docs/engine.md``, "How it is made fast").

The parameters of the ``m`` trajectories (lanes) of a device are a tuple of arrays whose
first axis is the lane, never concatenated into an ``(m, d)`` matrix while stepping:

* **columns** (plain full-batch GD of a model with at most ``FORWARD_MODE_MAX_PARAMS`` scalar
  parameters): one ``(m,)`` array per scalar parameter, in the order of ``ravel_pytree``; for
  array leaves the gradient is taken by forward mode, one JVP per scalar with the others held
  fixed, ``dL/dtheta_i = jvp(L, theta, e_i)``, for scalar leaves by reverse mode
  (:attr:`Layout.forward_mode`). Every intermediate is then one number per lane, which XLA
  vectorises across lanes whatever the shapes of the user's leaves. On CPU the step loop
  carries the columns packed in pairs as complex numbers (``pack_pairs``:
  :mod:`gdlr_jax.engine._stepping`);
* **leaves** (everything else): the leaves of the user's pytree, each ``(m, ...)``, and the
  gradient by reverse mode (``jax.grad``), leaf by leaf.

The flat vector ``theta (d,)`` of one lane (``ravel_pytree`` order) is formed only where it is
needed: the bound check and gradient norm of an evaluation, the final window's orbit summary and
the sharpness (Lanczos).
"""

from __future__ import annotations

import dataclasses
import itertools
import math
from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax
from jax.flatten_util import ravel_pytree
from jaxtyping import Array, Bool, Float

from gdlr_jax.curvature._extreme_eigenvalues import top_eigenvalues
from gdlr_jax.engine._minibatches import Minibatches, full_batch_value_and_grad
from gdlr_jax.engine._scalar_loss import scalar_loss
from gdlr_jax.engine._trajectory_status import ConvergenceCriteria, reduce_row, sum_last_axis
from gdlr_jax.problems._pytree import PyTree

LossFn = Callable[..., Float[Array, ""]]
OptimizerFactory = Callable[..., optax.GradientTransformation]
State = tuple  # the parameters of one lane (or of m lanes, each entry with a lane axis first)

# Plain GD of models with at most this many scalar parameters keeps one column per scalar
# (and takes forward-mode gradients for array leaves): d JVPs cost about d evaluations of the
# loss, against ~3 for reverse mode. Measured on scalar chains (benchmarks/bench_sweep.py
# --layouts, docs/benchmarks.md): forward mode took 0.68x the time of reverse mode at d = 2,
# 0.44x at d = 4, 1.6x at d = 8 and 3.3x at d = 16.
FORWARD_MODE_MAX_PARAMS = 4
SHARPNESS_ITERATIONS = 20  # default Lanczos steps per sharpness measurement (at most d)
# default final steps of the Lyapunov exponent (at least the window, at most steps): its
# spread over starts of a chaotic cubic map is ~0.015 at 256 steps (ConvergenceCriteria)
LYAPUNOV_STEPS = 256
STEP_BLOCK = {"cpu": 4, "gpu": 4, "tpu": 4}  # default steps per unrolled block, per backend
# Backends whose step loop carries the columns packed in pairs, x_0 + i x_1, ... (complex):
# XLA:CPU writes each output array of a fused step in its own loop over the lanes, which
# recomputes the whole step for each; one complex array is one loop (docs/benchmarks.md).
PACK_PAIRS = frozenset({"cpu"})
_PAIRED_DTYPES = {jnp.dtype("float32"), jnp.dtype("float64")}  # complex64, complex128 pairs


@dataclasses.dataclass(frozen=True)
class EngineConfig:
    """Everything static about a sweep (a jit static argument: equal configs share a compile).

    ``loss_fn`` and ``optimizer`` compare by identity: pass the same function objects to
    reuse a compilation.
    """

    loss_fn: LossFn
    optimizer: OptimizerFactory | None
    criteria: ConvergenceCriteria
    min_loss_value: float | None
    steps: int
    check_every: int
    record_every: int | None
    record_params: bool
    batch_size: int | None  # None: full-batch GD
    same_batches: bool
    sharpness_every: int | None = None
    sharpness_iterations: int = 0  # Lanczos iterations per sharpness estimate
    step_block: int = 1  # steps per unrolled block of the step loop
    per_leaf_etas: bool = False  # etas is a pytree like the params, one step size per leaf
    stop_at_convergence: bool = True  # False: converged lanes keep stepping and recording
    lyapunov_steps: int = 0  # final steps of the Lyapunov exponent (0: not measured)
    pack_pairs: bool = False  # the step loop carries columns in complex pairs (PACK_PAIRS)

    @property
    def window(self) -> int:
        return min(self.criteria.window, self.steps)

    @property
    def num_records(self) -> int:
        return 0 if self.record_every is None else self.steps // self.record_every + 1

    @property
    def num_sharpness(self) -> int:
        return 0 if self.sharpness_every is None else self.steps // self.sharpness_every + 1


def transform(factory: OptimizerFactory, eta: Float[Array, ""]) -> optax.GradientTransformation:
    """The optax optimiser of one trajectory, its learning rate ``eta`` traced in its state."""
    return optax.inject_hyperparams(factory)(learning_rate=eta)


def uses_columns(config: EngineConfig, num_params: int, has_data: bool) -> bool:
    """Whether the lanes are stored as one column per scalar parameter."""
    return config.optimizer is None and not has_data and num_params <= FORWARD_MODE_MAX_PARAMS


class Layout(NamedTuple):
    """How one trajectory's parameter pytree is stored as a :data:`State`.

    Attributes:
        treedef: the structure of the user's parameters.
        shapes: the shape of each leaf of one trajectory.
        columns: one scalar per entry of ``theta`` (else one array per leaf).
    """

    treedef: jax.tree_util.PyTreeDef
    shapes: tuple[tuple[int, ...], ...]
    columns: bool

    @classmethod
    def of(cls, params: PyTree, columns: bool) -> Layout:
        """The layout of ``params`` (leaves ``(m, ...)``)."""
        leaves, treedef = jax.tree_util.tree_flatten(params)
        return cls(treedef, tuple(leaf.shape[1:] for leaf in leaves), columns)

    @property
    def forward_mode(self) -> bool:
        """Whether the gradient is taken by forward mode, one JVP per scalar: for columns of
        array leaves. Columns that are scalar leaves take reverse mode: its adjoint is shared by
        every entry (about 9 operations per step of ``1/2 (1 - x y)^2`` against 13), and
        without array leaves the user's loss builds no array of the entries, whose JVP would
        multiply by the zero tangents of the others (``x * 0`` is not folded: IEEE)."""
        return self.columns and any(shape != () for shape in self.shapes)

    @property
    def sizes(self) -> tuple[int, ...]:
        return tuple(math.prod(shape) for shape in self.shapes)

    def leaf_of_entry(self) -> tuple[int, ...]:
        """For each entry of the state, the index of the leaf it belongs to."""
        if not self.columns:
            return tuple(range(len(self.shapes)))
        return tuple(i for i, size in enumerate(self.sizes) for _ in range(size))

    # ----- m lanes: leaves (m, ...) <-> state ------------------------------------------
    def state_of(self, params: PyTree) -> State:
        """The state of ``m`` lanes from parameters with leaves ``(m, ...)``."""
        leaves = jax.tree_util.tree_leaves(params)
        if not self.columns:
            return tuple(leaves)
        flat = [leaf.reshape(leaf.shape[0], -1) for leaf in leaves]
        return tuple(x[:, j] for x in flat for j in range(x.shape[1]))

    def params_of(self, state: State) -> PyTree:
        """Parameters with leaves ``(m, ...)`` (or ``(m, n, ...)``) from a state of lanes."""
        if not self.columns:
            return jax.tree_util.tree_unflatten(self.treedef, list(state))
        leaves, at = [], 0
        for shape, size in zip(self.shapes, self.sizes):
            block = jnp.stack(state[at : at + size], axis=-1)
            leaves.append(block.reshape(block.shape[:-1] + shape))
            at += size
        return jax.tree_util.tree_unflatten(self.treedef, leaves)

    # ----- one lane -------------------------------------------------------------------
    def params(self, state: State) -> PyTree:
        """The user's parameter pytree of one lane."""
        if not self.columns:
            return jax.tree_util.tree_unflatten(self.treedef, list(state))
        leaves, at = [], 0
        for shape, size in zip(self.shapes, self.sizes):
            leaves.append(jnp.stack(state[at : at + size]).reshape(shape))
            at += size
        return jax.tree_util.tree_unflatten(self.treedef, leaves)

    def flat(self, state: State) -> Float[Array, " d"]:
        """``theta (d,)`` of one lane, in ``ravel_pytree`` order."""
        if self.columns:
            return jnp.stack(state)
        return jnp.concatenate([jnp.ravel(x) for x in state])

    def sum_of_squares(self, state: State) -> Float[Array, ""]:
        """``||theta||_2^2`` of one lane: ``sum_last_axis`` of ``theta^2`` (columns: over the
        entries, without forming ``theta``)."""
        if self.columns:
            return reduce_row([jnp.square(x) for x in state], jnp.add, jnp.sum)
        return sum_last_axis(jnp.square(self.flat(state)))

    def entries(self, theta: Float[Array, " d"]) -> State:
        """The state of one lane from its ``theta (d,)`` (the inverse of :meth:`flat`)."""
        if self.columns:
            return tuple(theta[i] for i in range(theta.shape[0]))
        bounds = [0, *itertools.accumulate(self.sizes)]
        return tuple(
            theta[a:b].reshape(shape) for a, b, shape in zip(bounds, bounds[1:], self.shapes)
        )


class Problem(NamedTuple):
    """The objective of one trajectory over its :data:`State` (vmapped over lanes)."""

    config: EngineConfig
    layout: Layout
    data: PyTree | None

    def loss(self, state: State, batch: PyTree | None = None) -> Float[Array, ""]:
        args = () if batch is None else (batch,)
        return self.config.loss_fn(self.layout.params(state), *args)

    def value_and_grad(
        self, state: State, batch: PyTree | None = None
    ) -> tuple[Float[Array, ""], State]:
        """``L`` and ``grad L`` at ``state``: reverse mode, for columns of array leaves on
        the loss unrolled into scalars (:meth:`unrolled_loss`); where it cannot be unrolled,
        forward mode per scalar (one JVP of the unit tangent of each entry, the other entries
        held fixed; :attr:`Layout.forward_mode`)."""
        if not self.layout.forward_mode:
            return jax.value_and_grad(self.loss)(state, batch)
        unrolled = self.unrolled_loss(state)
        if unrolled is not None:
            return jax.value_and_grad(unrolled)(state)

        def along(i):
            def loss_i(x):
                return self.loss(state[:i] + (x,) + state[i + 1 :], batch)

            return jax.jvp(loss_i, (state[i],), (jnp.ones_like(state[i]),))

        pairs = [along(i) for i in range(len(state))]
        return pairs[0][0], tuple(derivative for _, derivative in pairs)

    def unrolled_loss(self, state: State) -> Callable[[State], Float[Array, ""]] | None:
        """The loss of one lane of columns as a function of its scalars, the user's arrays
        unrolled (:func:`gdlr_jax.engine._scalar_loss.scalar_loss`), or ``None``."""
        first = [0, *itertools.accumulate(self.layout.sizes)][:-1]
        dtypes = tuple(jnp.dtype(state[i].dtype) for i in first)
        return scalar_loss(self.config.loss_fn, self.layout.shapes, dtypes, self.layout.treedef)

    def step(
        self,
        state: State,
        opt_state: PyTree,
        eta: State,
        batch: PyTree | None,
        grad: State | None = None,
    ) -> tuple[State, PyTree]:
        """One step: ``theta_l - eta_l * grad_l L(theta)`` for every entry ``l`` of the state
        (``eta`` holds the step size of each entry), or the optax update (on the pytree);
        ``grad``: the gradient at ``state`` if already known (else taken here)."""
        if grad is None:
            _, grad = self.value_and_grad(state, batch)
        factory = self.config.optimizer
        if factory is None:
            return tuple(x - e * g for x, e, g in zip(state, eta, grad)), opt_state
        params = self.layout.params(state)
        updates, opt_state = transform(factory, eta[0]).update(
            self.layout.params(grad), opt_state, params
        )
        return tuple(jax.tree_util.tree_leaves(optax.apply_updates(params, updates))), opt_state

    def pack(self, state: State) -> State:
        """The state of ``m`` lanes as the step loop carries it: with ``config.pack_pairs``,
        columns of one float32 or float64 dtype (``d > 1``) packed in pairs, ``x_0 + i x_1,
        x_2 + i x_3, ...`` (complex, exact; an odd last column as it is), else as it is.
        XLA:CPU writes each output array of a fused step in a loop of its own that recomputes
        the step: ``d = 2`` columns in one complex array are stepped by one loop."""
        dtypes = {jnp.dtype(x.dtype) for x in state}
        pairs = self.config.pack_pairs and self.layout.columns and len(state) > 1
        if not (pairs and len(dtypes) == 1 and dtypes <= _PAIRED_DTYPES):
            return state
        packed = tuple(jax.lax.complex(a, b) for a, b in zip(state[::2], state[1::2]))
        return packed + state[len(packed) * 2 :]

    def unpack(self, packed: State) -> State:
        """The state of :meth:`pack` (complex entries are packed pairs: the parameters of a
        sweep are real)."""
        columns = []
        for z in packed:
            columns += [jnp.real(z), jnp.imag(z)] if jnp.iscomplexobj(z) else [z]
        return tuple(columns)

    def init_optimizer(self, state: State, eta: State) -> PyTree:
        if self.config.optimizer is None:
            return ()
        return transform(self.config.optimizer, eta[0]).init(self.layout.params(state))

    def flat_loss(
        self, state: State
    ) -> tuple[Float[Array, " d"], Callable[..., Float[Array, ""]]]:
        """``theta (d,)`` of ``state`` (``ravel_pytree``) and the loss as a function of
        ``theta`` (and a batch): the view the evaluations and the sharpness use, once per
        evaluation time, not per step."""
        theta, unravel = ravel_pytree(self.layout.params(state))

        def loss(theta: Float[Array, " d"], batch: PyTree | None = None) -> Float[Array, ""]:
            args = () if batch is None else (batch,)
            return self.config.loss_fn(unravel(theta), *args)

        return theta, loss

    def full_batch_value_and_grad(
        self, loss: Callable[..., Float[Array, ""]], theta: PyTree
    ) -> tuple[Float[Array, ""], PyTree]:
        """Full-batch ``loss`` and its gradient at ``theta`` (the flat vector, or a state of
        leaves) by reverse mode (batches weighted by their share of the data)."""
        if self.data is None:
            return jax.value_and_grad(loss)(theta)
        source = Minibatches(self.data, self.config.batch_size)
        return full_batch_value_and_grad(loss, theta, source)

    def _entry_sizes(self) -> tuple[int, ...]:
        """The number of scalars of each entry of the state."""
        return (1,) * sum(self.layout.sizes) if self.layout.columns else self.layout.sizes

    def flat_etas(self, eta: State) -> Float[Array, " d"]:
        """The step size of every scalar parameter of one lane, ``(d,)`` in ``ravel_pytree``
        order (``eta`` holds the step size of each entry of the state)."""
        sizes = self._entry_sizes()
        return jnp.concatenate([jnp.broadcast_to(e, (n,)) for e, n in zip(eta, sizes)])

    def within_bound(self, state: State) -> Bool[Array, ""]:
        """Every entry finite with ``|theta_i| <= divergence_bound`` (a NaN compares false)."""
        bound = self.config.criteria.divergence_bound
        inside = [jnp.all(jnp.abs(x) <= bound) for x in state]
        return jnp.stack(inside).all() if len(inside) > 1 else inside[0]

    def evaluate(
        self, state: State, eta: State, check_eta: Float[Array, ""]
    ) -> tuple[Float[Array, ""], Float[Array, ""], Float[Array, ""], Bool[Array, ""], State]:
        """Full-batch loss, gradient norm ``||grad L||_2``, step norm, whether the lane is
        sound (inside the bound, with a finite loss and gradient) and the gradient itself,
        like the state (taken like a step's: forward mode for the columns,
        reverse mode for the leaves; the norm over the flat gradient, in ``ravel_pytree``
        order).

        The step norm is the length of the next plain GD step: ``eta ||grad L||`` for one step
        size (``check_eta``), ``sqrt(sum_l eta_l^2 ||grad_l L||^2)`` with one per leaf."""
        if self.layout.columns:  # one number per lane throughout (forward mode)
            loss, grad_entries = self.value_and_grad(state)
        else:  # reverse mode on the leaves, like a step
            loss, grad_entries = self.full_batch_value_and_grad(self.loss, state)
        squares = self.layout.sum_of_squares(grad_entries)
        grad_norm = jnp.sqrt(squares)
        if self.config.per_leaf_etas:
            scaled = self.flat_etas(eta) * self.layout.flat(grad_entries)
            step_norm = jnp.sqrt(sum_last_axis(jnp.square(scaled)))
        else:
            step_norm = check_eta * grad_norm
        # a finite gradient is a finite sum of squares: the tests that only ask whether a lane
        # is sound need no square root (XLA then writes no gradient norm for them)
        sound = self.within_bound(state) & jnp.isfinite(loss) & jnp.isfinite(squares)
        return loss, grad_norm, step_norm, sound, grad_entries

    @property
    def keeps_gradient(self) -> bool:
        """Whether the lanes keep the full-batch gradient of their evaluation for the next
        step: the leaves of full-batch plain GD, where a gradient is the cost of a step and
        the first step after an evaluation time would take it again. (Not with an optax
        optimiser: the kept gradient may differ from the step's in the last bit, XLA fusing
        it with other operations, and an adaptive update such as Adam's amplifies that.)"""
        return not self.layout.columns and self.data is None and self.config.optimizer is None

    def hessian_matvec(
        self, state: State
    ) -> tuple[Float[Array, " d"], Callable[[Float[Array, " d"]], Float[Array, " d"]]]:
        """``theta (d,)`` of ``state`` and ``v -> H v``, the full-batch Hessian at ``theta``
        applied to a flat vector (forward over reverse: a JVP of the gradient)."""
        theta, loss = self.flat_loss(state)

        def gradient(theta: Float[Array, " d"]) -> Float[Array, " d"]:
            return self.full_batch_value_and_grad(loss, theta)[1]

        def matvec(v: Float[Array, " d"]) -> Float[Array, " d"]:
            return jax.jvp(gradient, (theta,), (v,))[1]

        return theta, matvec

    def sharpness(
        self, state: State, v0: Float[Array, " d"]
    ) -> tuple[Float[Array, ""], Float[Array, " d"]]:
        """``lambda_max`` of the full-batch Hessian at ``state`` and its Ritz vector, by
        ``sharpness_iterations`` Lanczos steps from ``v0`` (forward-over-reverse products on
        the flat vector ``theta``)."""
        theta, matvec = self.hessian_matvec(state)
        values, vectors = top_eigenvalues(
            matvec,
            theta,
            num_iterations=self.config.sharpness_iterations,
            v0=v0,
            return_vectors=True,
        )
        return values[0], vectors[0]
