"""CAGrad: the update that maximises the worst head's improvement near the mean."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import optax

from jheads.aggregation import _base
from jheads.aggregation import _solvers


@functools.partial(jax.jit, static_argnames=("norm_eps",))
def cagrad_core(g, mask, *, c, norm_eps):
  """CAGrad's weights on a padded Gramian (`mask`: the real heads; `c` may be traced)."""
  t = g.shape[0]
  m = mask.astype(g.dtype)
  n_real = jnp.sum(m)
  gn = _base.normalize(g, norm_eps)
  b = jnp.matmul(gn, m, precision="highest") / n_real  # Gn 1/T: the heads' dots with g_0
  g0 = jnp.sqrt(jnp.maximum(jnp.sum(b) / n_real, 0))
  phi = c * g0
  if t == 2:  # two real heads (bucket keeps T <= 4 unpadded): the closed form
    w_opt, norm = _solvers.cagrad_two(gn, b, jnp.where(phi > 0, phi, 1))
  else:
    w_opt, norm = _solvers.cagrad_direction(gn, b, jnp.where(phi > 0, phi, 1), allowed=mask)
  # phi = 0 (c = 0, or a zero mean gradient): the linear problem's vertex.
  vertex = jnp.argmin(jnp.where(mask, b, jnp.inf))
  w_lin = jax.nn.one_hot(vertex, t, dtype=g.dtype)
  norm_lin = jnp.sqrt(jnp.maximum(gn[vertex, vertex], 0))
  linear = phi <= 0
  w_opt = jnp.where(linear, w_lin, w_opt)
  norm = jnp.where(linear, norm_lin, norm)
  on = norm >= norm_eps
  scale = jnp.where(on, phi / jnp.where(norm > 0, norm, 1), 0)
  return jnp.where(on, m / n_real + scale * w_opt, 0)


def cagrad(*, c: float = 0.5, norm_eps: float = 1e-4) -> _base.Aggregator:
  """CAGrad (Liu et al., "Conflict-Averse Gradient Descent", NeurIPS 2021, Algorithm 1).

  The update `d` maximises `min_i g_i . d` over the ball `|d - g_0| <= c
  |g_0|` around the mean gradient `g_0`. With `Gn = G / tr(G)` (0 when
  `tr(G) < norm_eps`): `w* = argmin_{w in simplex} w'Gn 1/T + c |g_0|
  sqrt(w'Gn w)`, and the weights are `1/T + (c |g_0| / |g_w|) w*`, or 0
  when `|g_w| < norm_eps` (0 is in the heads' hull: on the Pareto front).
  Mean scale, **not** divided by `1 + c^2` (LibMTL's `rescale=1`) nor by
  `1 + c` (CAGrad's toy): with `T = 1` the update is `(1 + c) g`.

  Equals torchjd 0.18's `CAGrad` (`aggregation/_cagrad.py`, which solves the
  inner problem with cvxpy's Clarabel to about 2e-4); here it is solved
  exactly (`_solvers.cagrad_direction`: a root search over warm-started
  simplex QPs with the closed form of each support's root), in float64 when
  x64 is enabled. torchjd has no default `c`; 0.5 is LibMTL's and the CAGrad
  toy's.

  Args:
    c: the radius of the ball, relative to `|g_0|` (>= 0; 0 gives the mean).
    norm_eps: the absolute thresholds on `tr(G)` and `|g_w|`, as torchjd.

  Returns:
    A stateless `Aggregator`.

  Example:
    >>> import jax.numpy as jnp
    >>> from jheads import aggregation
    >>> a = aggregation.cagrad(c=0.5)
    >>> update, _ = a.update(jnp.array([[2.0, 0.0]]), a.init(1))
    >>> update  # (1 + c) g for one head
    Array([3., 0.], dtype=float32)
  """
  where = "aggregation.cagrad"
  c = _base.check_real(c, "c", where)
  norm_eps = _base.check_real(norm_eps, "norm_eps", where)

  def init(n_heads):
    _base.check_n_heads(n_heads, where)
    return optax.EmptyState()

  core = functools.partial(cagrad_core, c=c, norm_eps=norm_eps)

  def weights(gramian, state, *, losses=None):
    del losses
    return _base.padded_weights(gramian, where, core), state

  return _base.Aggregator(init, _base.gramian_update(weights), weights)
