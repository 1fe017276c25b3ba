"""The maximal Lyapunov exponent of the GD map along a trajectory, and the ``CHAOTIC`` status
(layer 4: engine; ``docs/engine.md``, "Lyapunov exponents").

Plain full-batch GD is the map ``G(theta) = theta - D grad L(theta)``, ``D`` the diagonal of the
step sizes (``eta I``, or ``eta_l`` on the entries of leaf ``l`` with step sizes per leaf), with
Jacobian ``DG(theta) = I - D H(theta)``, ``H`` the Hessian of the loss. Its maximal
*finite-time* Lyapunov exponent over the ``L`` steps from ``theta_s`` is

    lambda_1 = (1 / L) sum_{t=s}^{s+L-1} log ||DG(theta_t) v_t||,
    v_{t+1} = DG(theta_t) v_t / ||DG(theta_t) v_t||,   ||v_s|| = 1,

the mean log growth of a tangent vector renormalised every step; for almost every ``v_s`` it
tends to the largest Lyapunov exponent of the orbit as ``L -> infinity`` (Oseledets). Each step
is one JVP of the GD step, which gives ``G(theta_t)`` and ``DG(theta_t) v_t = v_t - D H v_t``
together (forward mode over the step's gradient, about the cost of one Hessian-vector product).

* A trajectory still running after the last step (``NOT_CONVERGED`` or ``PERIODIC``) gets the
  exponent of its last ``L = lyapunov_steps`` steps, replayed from its iterate at
  ``steps - L`` with ``v_s`` a fixed unit vector (normal entries, key 1). On a period-``p``
  orbit it tends to ``(1 / p) log rho(DG(theta_p) ... DG(theta_1))``; on a fixed point to
  ``log rho(DG)``. ``lambda_1 > lyapunov_tol`` on a non-periodic one makes it ``CHAOTIC``.
* A converged trajectory gets the exponent of its fixed point ``theta*``: ``DG = I - D H`` is
  similar to ``I - D^1/2 H D^1/2`` (symmetric), so ``lambda_1 = max_mu log|1 - mu|`` over the
  eigenvalues ``mu`` of ``D^1/2 H D^1/2`` (``eta lambda_i(H)`` for one step size). ``log|1 - mu|``
  is convex in ``mu``, so the maximum is at ``mu_min`` or ``mu_max``: for ``d <=
  sharpness_iterations`` (default ``min(20, d)``) the ends of the dense matrix's spectrum
  (exact), otherwise those of the Ritz spectrum of a Lanczos run on ``D^1/2 H D^1/2`` with
  ``sharpness_iterations`` steps (inner approximations: a lower bound on the exponent).
* A diverged trajectory gets NaN.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable

import jax
import jax.numpy as jnp
from jax import lax
from jaxtyping import Array, Bool, Float, Int

from gdlr_jax.curvature._hessian import hessian
from gdlr_jax.curvature._lanczos import lanczos
from gdlr_jax.engine._lanes import Lanes, StepSizes, pack, packed_block
from gdlr_jax.engine._problem import Problem, State
from gdlr_jax.engine._trajectory_status import TrajectoryStatus

TANGENT_KEY = 1  # the PRNG key of the tangent's start vector
LYAPUNOV_BLOCK = 4096  # lanes whose exponent is computed together (see _packed_map)


def _norm(v: State) -> Float[Array, ""]:
    """``||v||_2`` over every entry of a state of one lane."""
    squares = [jnp.sum(jnp.square(x)) for x in v]
    return jnp.sqrt(sum(squares[1:], squares[0]))


def tangent_exponent(problem: Problem, state: State, eta: State) -> Float[Array, ""]:
    """The finite-time exponent of one lane over ``lyapunov_steps`` GD steps from ``state``:
    ``(1/L) sum_t log ||DG(theta_t) v_t||`` with the tangent renormalised every step (a tangent
    that vanishes, ``DG v = 0``, gives ``-inf``)."""
    layout = problem.layout
    steps = problem.config.lyapunov_steps
    d = sum(layout.sizes)
    start = jax.random.normal(jax.random.key(TANGENT_KEY), (d,), state[0].dtype)
    v = layout.entries(start / jnp.linalg.norm(start))

    def gd_step(state: State) -> State:
        return problem.step(state, (), eta, None)[0]

    def one_step(_, carry):
        state, v, total = carry
        state, w = jax.jvp(gd_step, (state,), (v,))
        norm = _norm(w)
        scale = jnp.where(norm > 0, norm, 1)
        return state, tuple(x / scale for x in w), total + jnp.log(norm)

    total = jnp.zeros((), state[0].dtype)
    _, _, total = lax.fori_loop(0, steps, one_step, (state, v, total))
    return total / steps


def _symmetric_ends(matrix: Float[Array, "d d"]) -> Float[Array, " 2"]:
    """The smallest and largest eigenvalue of a symmetric matrix: in closed form for ``d <= 2``
    (``(a + c)/2 -+ sqrt(((a - c)/2)^2 + b^2)``; vmapped over lanes these are a few vector
    operations, where a batched ``eigvalsh`` makes one LAPACK call per lane, ~100x slower for
    2 x 2), else ``jnp.linalg.eigvalsh``."""
    d = matrix.shape[0]
    if d == 1:
        return jnp.stack([matrix[0, 0], matrix[0, 0]])
    if d == 2:
        (a, b), (_, c) = matrix
        mean, radius = (a + c) / 2, jnp.hypot((a - c) / 2, b)
        return jnp.stack([mean - radius, mean + radius])
    values = jnp.linalg.eigvalsh(matrix)
    return jnp.stack([values[0], values[-1]])


def fixed_point_exponent(problem: Problem, state: State, eta: State) -> Float[Array, ""]:
    """``max(log|1 - mu_min|, log|1 - mu_max|)`` over the eigenvalues of ``D^1/2 H D^1/2`` at
    the iterate of one lane: the Ritz values of ``sharpness_iterations`` Lanczos steps, or,
    when those would span the whole space (``sharpness_iterations >= d``), the ends of the
    dense matrix's spectrum (the same numbers, exactly, and several times faster to compile).
    """
    theta, loss = problem.flat_loss(state)
    root = jnp.sqrt(problem.flat_etas(eta)).astype(theta.dtype)
    iterations = problem.config.sharpness_iterations
    if iterations >= theta.shape[0]:
        mu = _symmetric_ends(root[:, None] * hessian(loss, theta) * root[None, :])
    else:
        _, hvp = problem.hessian_matvec(state)

        def matvec(v: Float[Array, " d"]) -> Float[Array, " d"]:
            return root * hvp(root * v)

        mu = lanczos(matvec, theta, num_iterations=iterations).ritz_values
    return jnp.max(jnp.log(jnp.abs(1 - mu)))


def _packed_map(
    fn: Callable[..., Float[Array, ""]],
    mask: Bool[Array, " m"],
    args: tuple,
    out: Float[Array, " m"],
) -> Float[Array, " m"]:
    """``out`` with ``out[k] = fn(*args[k])`` for the lanes ``k`` of ``mask``: they are packed
    into blocks of up to ``LYAPUNOV_BLOCK`` lanes, so the cost is proportional to their number
    (none: nothing runs); a block's padding slots write nowhere."""
    m = mask.shape[0]
    block = min(LYAPUNOV_BLOCK, m)
    count, order = pack(mask)

    def body(carry):
        b, out = carry
        index, valid = packed_block(order, count, b, block)
        taken = jax.tree_util.tree_map(lambda x: jnp.take(x, index, axis=0), args)
        values = jax.vmap(fn)(*taken).astype(out.dtype)
        return b + 1, out.at[jnp.where(valid, index, m)].set(values, mode="drop")

    _, out = lax.while_loop(lambda carry: carry[0] * block < count, body, (jnp.int32(0), out))
    return out


def lyapunov_exponents(
    problem: Problem,
    lanes: Lanes,
    snapshot: State,
    still_running: Bool[Array, " m"],
    period: Int[Array, " m"],
    etas: StepSizes,
) -> tuple[Lanes, Float[Array, " m"]]:
    """The exponent of every lane and the ``CHAOTIC`` status (module docstring).

    Args:
        problem: the lanes' objective (plain full-batch GD, ``lyapunov_steps > 0``).
        lanes: the lanes after the final window and the divergence replay.
        snapshot: the lanes' iterates at ``steps - lyapunov_steps``.
        still_running: the lanes still running after the last step ``(m,)``.
        period: their periods from the final window ``(m,)`` (0: none).
        etas: the lanes' step sizes.

    Returns:
        ``(lanes, exponent)``: running lanes without a period whose exponent exceeds
        ``criteria.lyapunov_tol`` become ``CHAOTIC``; ``exponent (m,)`` in the loss dtype,
        NaN for diverged lanes.
    """
    status = lanes.status
    dtype = lanes.final_loss.dtype
    converged = (status == TrajectoryStatus.CONVERGED_MINIMUM) | (
        status == TrajectoryStatus.CONVERGED_CRITICAL_POINT
    )
    exponent = jnp.full(status.shape, math.nan, dtype)
    exponent = _packed_map(
        functools.partial(tangent_exponent, problem), still_running, (snapshot, etas.step), exponent
    )
    exponent = _packed_map(
        functools.partial(fixed_point_exponent, problem), converged, (lanes.state, etas.step),
        exponent,
    )  # fmt: skip
    chaotic = still_running & (period == 0) & (exponent > problem.config.criteria.lyapunov_tol)
    status = jnp.where(chaotic, jnp.int32(TrajectoryStatus.CHAOTIC), status)
    return lanes._replace(status=status), exponent
