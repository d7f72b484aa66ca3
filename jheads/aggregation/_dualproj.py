"""DualProj: the projection of the mean gradient onto the dual cone of the heads."""

from __future__ import annotations

import functools

import jax
import optax

from jheads.aggregation import _base
from jheads.aggregation import _upgrad


@functools.partial(jax.jit, static_argnames=("norm_eps", "reg_eps"))
def dualproj_core(g, mask, pref, *, norm_eps, reg_eps):
  """DualProj's weights on a padded Gramian (`pref` 0 off the real heads)."""
  del mask  # padding heads have u = 0 and never enter
  return _upgrad.dual_cone_weights(g, pref, norm_eps, reg_eps)


def dualproj(
    *,
    pref_vector: jax.typing.ArrayLike | None = None,
    norm_eps: float = 1e-4,
    reg_eps: float = 1e-4,
) -> _base.Aggregator:
  """DualProj: `J' pref` projected onto the dual cone of the heads.

  The weights are `argmin_{v >= pref} v' Gh v`, `Gh = G / tr(G) + reg_eps I`
  (`G / tr(G)` is replaced by 0 when `tr(G) < norm_eps`): the update closest
  to `J' pref` that increases no head's loss to first order. This is Equation
  11 of GEM (Lopez-Paz and Ranzato, "Gradient Episodic Memory for Continual
  Learning", NeurIPS 2017) applied to the weighted mean. Mean scale.

  Equals torchjd 0.18's `DualProj` (`aggregation/_dualproj.py`, quadprog
  projector with the same `norm_eps` and `reg_eps`); the QP is solved
  exactly by an active-set method inside jit, in float64 when x64 is
  enabled.

  Args:
    pref_vector: `[T]` preference weights; default `1/T` for every head.
    norm_eps: below this trace the Gramian is treated as 0 (then the weights
      are `pref`).
    reg_eps: the ridge added to the normalised Gramian.

  Returns:
    A stateless `Aggregator`.

  Example:
    >>> import jax.numpy as jnp
    >>> from jheads import aggregation
    >>> a = aggregation.dualproj()
    >>> jac = jnp.array([[1.0, 0.0], [-1.0, 1.0]])
    >>> update, _ = a.update(jac, a.init(2))
    >>> update.round(4)
    Array([0. , 0.5], dtype=float32)
    >>> bool(jnp.all(jac @ update >= -1e-6))
    True
  """
  where = "aggregation.dualproj"
  pref = None if pref_vector is None else _base.check_vector(pref_vector, "pref_vector", where)
  norm_eps = _base.check_real(norm_eps, "norm_eps", where)
  reg_eps = _base.check_real(reg_eps, "reg_eps", where)

  def init(n_heads):
    n_heads = _base.check_n_heads(n_heads, where)
    _base.check_length(pref, "pref_vector", n_heads, where)
    return optax.EmptyState()

  core = functools.partial(dualproj_core, norm_eps=norm_eps, reg_eps=reg_eps)

  def weights(gramian, state, *, losses=None):
    del losses
    p = _base.mean_pref if pref is None else pref
    return _base.padded_weights(gramian, where, core, [p]), state

  return _base.Aggregator(init, _base.gramian_update(weights), weights)
