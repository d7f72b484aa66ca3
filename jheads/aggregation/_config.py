"""ConFIG: the conflict-free direction with equal cosines to every head."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

from jheads.aggregation import _base


@jax.jit
def config_core(g, mask, pref):
  """ConFIG's weights on a padded Gramian (`pref` 0 off the real heads)."""
  norms = jnp.sqrt(jnp.maximum(jnp.diagonal(g), 0))
  inv_n = jnp.where(norms > 0, 1 / jnp.where(norms > 0, norms, 1), 0)
  gu = g * inv_n[:, None] * inv_n[None, :]
  c = jnp.matmul(_base.pinv_psd(gu, jnp.sum(mask)), pref, precision="highest")
  dc = inv_n * c  # J' dc = pinv(U) pref
  best_sq = jnp.dot(dc, jnp.matmul(g, dc, precision="highest"), precision="highest")
  best = jnp.maximum(jnp.sqrt(jnp.maximum(best_sq, 0)), 1e-12)
  unit = dc / best  # J' unit is the unit target direction
  length = jnp.sum(jnp.matmul(g, unit, precision="highest"))
  return length * unit


def config(*, pref_vector: jax.typing.ArrayLike | None = None) -> _base.Aggregator:
  """ConFIG (Liu et al., "ConFIG: Towards Conflict-free Training of Physics
  Informed Neural Networks", ICLR 2025, Equation 2).

  With the unit rows `U = diag(1/|g_i|) J` (zero rows stay 0), the direction
  `u = pinv(U) pref / |pinv(U) pref|` has cosines with the heads
  proportional to `pref`, and the update is `(sum_i g_i . u) u`. Sum scale:
  its length is the sum of the heads' projections on `u`.

  Equals torchjd 0.18's `ConFIG` (`aggregation/_config.py`), which works on
  the matrix. Here it is computed from the Gramian alone: `pinv(U) pref =
  U' pinv(U U') pref`, with `U U' = D G D`, so the weights are
  `(1' G D c) D c / |D c|_G^2` with `c = pinv(D G D) pref`, `D =
  diag(1/|g_i|)`. The pseudo-inverse of the Gramian cuts eigenvalues below
  `T eps lambda_max`, i.e. singular values of `U` below `sqrt(T eps)` of the
  largest (torch cuts `U`'s at `max(T, P) eps`): the two agree unless the
  unit rows are nearly dependent, where a Gramian computed in float32
  cannot resolve them anyway. As torch's `normalize`, a direction of norm
  below 1e-12 is not blown up: three heads at 120 degrees give a finite (0)
  update.

  Args:
    pref_vector: `[T]` preference weights; default 1 for every head.

  Returns:
    A stateless `Aggregator`.

  Example:
    >>> import jax.numpy as jnp
    >>> from jheads import aggregation
    >>> a = aggregation.config()
    >>> update, _ = a.update(jnp.array([[1.0, 0.0], [0.0, 3.0]]), a.init(2))
    >>> update.round(4)  # along the bisector of the unit rows
    Array([2., 2.], dtype=float32)
  """
  where = "aggregation.config"
  pref = None if pref_vector is None else _base.check_vector(pref_vector, "pref_vector", where)

  def init(n_heads):
    n_heads = _base.check_n_heads(n_heads, where)
    _base.check_length(pref, "pref_vector", n_heads, where)
    return optax.EmptyState()

  def weights(gramian, state, *, losses=None):
    del losses
    p = (lambda mask, dtype: mask.astype(dtype)) if pref is None else pref
    return _base.padded_weights(gramian, where, config_core, [p]), state

  return _base.Aggregator(init, _base.gramian_update(weights), weights)
