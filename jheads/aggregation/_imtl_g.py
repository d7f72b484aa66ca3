"""IMTL-G: the update with equal projections on every head's direction."""

from __future__ import annotations

import jax.numpy as jnp
import optax

from jheads.aggregation import _base


def imtl_g_core(g, mask):
  """IMTL-G's weights on a padded Gramian (`mask`: the real heads)."""
  d = jnp.sqrt(jnp.maximum(jnp.diagonal(g), 0))
  v = jnp.matmul(_base.pinv_psd(g, jnp.sum(mask)), d, precision="highest")
  total = jnp.sum(v)
  small = jnp.abs(total) < 1e-12
  return jnp.where(small, 0, v / jnp.where(small, 1, total))


def imtl_g() -> _base.Aggregator:
  """IMTL-G (Liu et al., "Towards Impartial Multi-task Learning", ICLR 2021).

  `v = pinv(G) sqrt(diag G)`, `w = v / sum v` (0 when `|sum v| < 1e-12`):
  the combination whose projections on the unit directions of the heads are
  equal, generalised to linearly dependent heads through the pseudo-inverse
  (the Jacobian-descent paper). Mean scale: the weights sum to 1.

  Equals torchjd 0.18's `IMTLG` (`aggregation/_imtl_g.py`). The
  pseudo-inverse cuts eigenvalues below `T eps lambda_max`, torch's default
  relative tolerance. The `1e-12` threshold is torchjd's, absolute.

  Returns:
    A stateless `Aggregator`.

  Example:
    >>> import jax.numpy as jnp
    >>> from jheads import aggregation
    >>> a = aggregation.imtl_g()
    >>> jac = jnp.array([[3.0, 0.0], [0.0, 1.0]])
    >>> update, _ = a.update(jac, a.init(2))
    >>> update  # equal projections on both unit directions
    Array([0.75, 0.75], dtype=float32)
  """
  where = "aggregation.imtl_g"

  def init(n_heads):
    _base.check_n_heads(n_heads, where)
    return optax.EmptyState()

  def weights(gramian, state, *, losses=None):
    del losses
    return _base.padded_weights(gramian, where, imtl_g_core), state

  return _base.Aggregator(init, _base.gramian_update(weights), weights)
