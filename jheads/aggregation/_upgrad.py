"""UPGrad: the average of each head's projection onto the dual cone of all heads."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import optax

from jheads.aggregation import _base
from jheads.aggregation import _solvers


def dual_cone_weights(g, u, norm_eps, reg_eps):
  """`argmin_{v >= u} v' Gh v`, `Gh = normalize(G) + reg_eps I`, for each row of `u`.

  `J' v` is the projection of `J' u` onto the dual cone `{d : J d >= 0}`
  (Proposition 1 of the Jacobian-descent paper). With `v = u + x` this is
  the nonnegative QP `min 1/2 x'Gh x + (Gh u)'x`, solved exactly.

  Args:
    g: `[T, T]` Gramian in the solvers' dtype.
    u: `[..., T]` lower bounds.
    norm_eps, reg_eps: torchjd's `QuadprogProjector` parameters.

  Returns:
    `[..., T]` the minimisers `v`.
  """
  t = g.shape[0]
  gh = _base.normalize(g, norm_eps) + reg_eps * jnp.eye(t, dtype=g.dtype)
  u2 = u.reshape(-1, t)
  q = jnp.matmul(u2, gh, precision=jax.lax.Precision.HIGHEST)
  return (u2 + _solvers.nonneg_qp(gh, q)).reshape(u.shape)


@functools.partial(jax.jit, static_argnames=("norm_eps", "reg_eps"))
def upgrad_core(g, mask, pref, *, norm_eps, reg_eps):
  """UPGrad's weights on a padded Gramian (`mask`: the real heads; `pref` 0 off them)."""
  del mask  # a padding head has u = 0: its QP is trivial and it never enters another
  return jnp.sum(dual_cone_weights(g, jnp.diag(pref), norm_eps, reg_eps), axis=0)


def upgrad(
    *,
    pref_vector: jax.typing.ArrayLike | None = None,
    norm_eps: float = 1e-4,
    reg_eps: float = 1e-4,
) -> _base.Aggregator:
  """UPGrad (Quinton and Rey, "Jacobian Descent for Multi-Objective Optimization", 2024).

  Each head's gradient, scaled by `pref_i`, is projected onto the dual cone
  `{d : g_j . d >= 0 for all j}` (no head's loss increases to first order)
  and the projections are summed: the weights are `sum_i v_i` with
  `v_i = argmin_{v >= pref_i e_i} v' Gh v`, `Gh = G / tr(G) + reg_eps I`
  (`G / tr(G)` is replaced by 0 when `tr(G) < norm_eps`). Mean scale: with
  the default `pref = 1/T` and no conflict the update is the mean gradient.

  Equals torchjd 0.18's `UPGrad` (`aggregation/_upgrad.py` with
  `_linalg/_dual_cone.py`'s quadprog projector, same `norm_eps` and
  `reg_eps`). The `T` QPs are solved exactly inside jit, all at once, by
  block principal pivoting with an active-set fallback
  (`_solvers.nonneg_qp`), in float64 when x64 is enabled.
  `reg_eps` is part of the definition: with `g2 = -g1` the weights are
  `[0.9999, 0.9999]`, not `[1, 1]`, exactly as torchjd's.

  Args:
    pref_vector: `[T]` preference weights; default `1/T` for every head.
    norm_eps: below this trace the Gramian is treated as 0 (absolute, as
      torchjd; then the weights are `pref`).
    reg_eps: the ridge added to the normalised Gramian.

  Returns:
    A stateless `Aggregator`.

  Example:
    >>> import jax.numpy as jnp
    >>> from jheads import aggregation
    >>> a = aggregation.upgrad()
    >>> jac = jnp.array([[1.0, 0.0], [-1.0, 1.0]])  # conflicting heads
    >>> update, _ = a.update(jac, a.init(2))
    >>> update.round(4)
    Array([0.2499, 0.75  ], dtype=float32)
    >>> bool(jnp.all(jac @ update >= 0))  # no head's loss goes up
    True
  """
  where = "aggregation.upgrad"
  pref = None if pref_vector is None else _base.check_vector(pref_vector, "pref_vector", where)
  norm_eps = _base.check_real(norm_eps, "norm_eps", where)
  reg_eps = _base.check_real(reg_eps, "reg_eps", where)

  def init(n_heads):
    n_heads = _base.check_n_heads(n_heads, where)
    _base.check_length(pref, "pref_vector", n_heads, where)
    return optax.EmptyState()

  core = functools.partial(upgrad_core, norm_eps=norm_eps, reg_eps=reg_eps)

  def weights(gramian, state, *, losses=None):
    del losses
    p = _base.mean_pref if pref is None else pref
    return _base.padded_weights(gramian, where, core, [p]), state

  return _base.Aggregator(init, _base.gramian_update(weights), weights)
