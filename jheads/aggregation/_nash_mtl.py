"""Nash-MTL: the bargaining solution of the heads, `a_i (G a)_i = 1`."""

from __future__ import annotations

import functools

from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

from jheads.aggregation import _base
from jheads.aggregation import _solvers


class NashMTLState(NamedTuple):
  """State of `nash_mtl`.

  Attributes:
    alpha: `[T]` the last solved weights, before the norm clipping (reused
      between solves when `update_weights_every > 1`).
    step: int32 calls so far.
  """

  alpha: jax.Array
  step: jax.Array


@functools.partial(jax.jit, static_argnames=("max_steps",))
def nash_alpha(g, *, max_steps):
  """The exact Nash-MTL weights of the Gramian `g` (zero heads get 0).

  Padding heads are zero heads. The rest of this docstring is the method.

  In the unit-diagonal scaling `C = D G D`, `D = diag(1/|g_i|)`, the
  equation `a_i (G a)_i = 1` reads `b_i (C b)_i = 1` with `a = D b`; `b` is
  the minimiser of the self-concordant `1/2 b'Cb - sum log b`
  (`_solvers.nash_newton`). The diagonal shift keeping it bounded on
  Pareto-stationary heads is one rounding unit of `C`'s unit diagonal (a
  relative change of `eps b_i^2` to the equation).
  """
  t = g.shape[0]
  eps = jnp.finfo(g.dtype).eps
  d2 = jnp.diagonal(g)
  live = d2 > 0
  inv_n = jnp.where(live, 1 / jnp.sqrt(jnp.where(live, d2, 1)), 0)
  corr = g * inv_n[:, None] * inv_n[None, :]
  # A zero head is decoupled (unit diagonal, no coupling) and dropped after.
  corr = jnp.where(live[:, None] & live[None, :], corr, jnp.eye(t, dtype=g.dtype))
  b = _solvers.nash_newton(corr, max_steps=max_steps, reg=eps)
  return jnp.where(live, inv_n * b, 0)


@functools.partial(jax.jit, static_argnames=("max_steps",))
def _solve_every(g, prev, due, *, max_steps):
  """A fresh solution when `due`, else `prev` (one compilation, eager or not)."""
  solve = lambda: nash_alpha(_base.pad(g)[0], max_steps=max_steps)[: g.shape[0]]
  return lax.cond(due, solve, lambda: prev)


def nash_mtl(
    *, max_norm: float = 1.0, update_weights_every: int = 1, optim_niter: int = 20
) -> _base.Aggregator:
  """Nash-MTL (Navon et al., "Multi-Task Learning as a Bargaining Game", ICML 2022).

  The weights `alpha > 0` solve `alpha_i (G alpha)_i = 1` for every head:
  each head's improvement `g_i . d` is `1 / alpha_i`, the Nash bargaining
  solution. Then `|J' alpha|` (`= sqrt(alpha' G alpha) = sqrt(T)` at the
  solution) is clipped to `max_norm` (0 disables it). Unit scale: the
  update's norm is `min(max_norm, sqrt(T))`, whatever the losses' scale.

  torchjd 0.18's `NashMTL` (`aggregation/_nash_mtl.py`, from nash-mtl's
  code) runs up to `optim_niter = 20` rounds of cvxpy/ECOS on a linearised
  problem from the previous step's alpha; on conflicting heads it stops far
  from the solution (55-170% off on two of 17 test Jacobians). Here the
  solution is exact: damped Newton on the convex `1/2 a'Ga - sum log a`
  (`_solvers.nash_newton`), whose stationary point is that equation, in
  float64 when x64 is enabled. One head gives `g / |g|` (torchjd raises);
  zero heads get weight 0; all-zero and Pareto-stationary Jacobians (no
  exact solution) give finite weights.

  Args:
    max_norm: the clipping norm of the update; 0 disables clipping.
    update_weights_every: solve every this many calls, reusing the last
      alpha in between (the norm is clipped with the current Jacobian).
    optim_niter: the number of Newton steps allowed, at least 40 (Newton
      converges in 5 to 15 on typical Gramians; Pareto-stationary ones, where
      alpha grows without bound, use the rest).

  Returns:
    An `Aggregator` with `NashMTLState` state.

  Example:
    >>> import jax.numpy as jnp
    >>> from jheads import aggregation
    >>> a = aggregation.nash_mtl()
    >>> jac = jnp.array([[1.0, 0.0], [0.0, 4.0]])
    >>> w, state = a.weights(aggregation.gramian(jac), a.init(2))
    >>> w.round(4)  # 1 / |g_i|, then clipped from norm sqrt(2) to 1
    Array([0.7071, 0.1768], dtype=float32)
  """
  where = "aggregation.nash_mtl"
  max_norm = _base.check_real(max_norm, "max_norm", where)
  every = _base.check_int(update_weights_every, "update_weights_every", where)
  niter = _base.check_int(optim_niter, "optim_niter", where)
  max_steps = max(niter, 40)

  def init(n_heads):
    n_heads = _base.check_n_heads(n_heads, where)
    return NashMTLState(jnp.ones((n_heads,), _base.solve_dtype()), jnp.zeros((), jnp.int32))

  def weights(gramian, state, *, losses=None):
    del losses
    g = _base.check_gramian(gramian, where, state.alpha.shape[0])
    prev = state.alpha.astype(g.dtype)
    if every == 1:
      alpha = nash_alpha(_base.pad(g)[0], max_steps=max_steps)[: g.shape[0]]
    else:
      alpha = _solve_every(g, prev, state.step % every == 0, max_steps=max_steps)
    w = alpha
    if max_norm > 0:
      norm = jnp.sqrt(jnp.maximum(jnp.dot(alpha, jnp.matmul(g, alpha, precision="highest")), 0))
      w = jnp.where(norm > max_norm, alpha * (max_norm / jnp.where(norm > 0, norm, 1)), alpha)
    new_state = NashMTLState(alpha.astype(state.alpha.dtype), state.step + 1)
    return w.astype(_base.out_dtype(gramian)), new_state

  return _base.Aggregator(init, _base.gramian_update(weights), weights)
