"""IMTL-G: the update with equal projections on every head's direction."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

from jheads.aggregation import _base


@jax.jit
def imtl_g_core(g, mask):
  """IMTL-G's weights on a padded Gramian (`mask`: the real heads)."""
  d = jnp.sqrt(jnp.maximum(jnp.diagonal(g), 0))
  pinv = _base.pinv_gramian(g, mask)
  v = jnp.matmul(pinv, d, precision="highest")
  total = jnp.sum(v)
  # torchjd's absolute 1e-12, or a sum at the rounding level of the product
  # (d in the null space of G: three heads at 120 degrees), which the
  # normalisation would blow up to O(1) in float32.
  n_real = jnp.sum(mask)
  noise = 4 * n_real * jnp.finfo(g.dtype).eps * jnp.sum(jnp.matmul(jnp.abs(pinv), d, precision="highest"))
  small = (jnp.abs(total) < 1e-12) | (jnp.abs(total) <= noise)
  return jnp.where(small, 0, v / jnp.where(small, 1, total))


def imtl_g() -> _base.Aggregator:
  """IMTL-G (Liu et al., "Towards Impartial Multi-task Learning", ICLR 2021).

  `v = pinv(G) sqrt(diag G)`, `w = v / sum v` (0 when `|sum v| < 1e-12`, or
  when the sum is at the rounding level of the product):
  the combination whose projections on the unit directions of the heads are
  equal, generalised to linearly dependent heads through the pseudo-inverse
  (the Jacobian-descent paper). Mean scale: the weights sum to 1.

  Equals torchjd 0.18's `IMTLG` (`aggregation/_imtl_g.py`). The
  pseudo-inverse cuts eigenvalues below `T eps lambda_max`, torch's default
  relative tolerance; when the heads are independent it is computed through
  the unit-diagonal scaling of `G`, which keeps float32 accurate for heads
  of very different norms (`_base.pinv_gramian`). The `1e-12` threshold is
  torchjd's, absolute; the rounding-level one (`4 T eps sum |pinv(G)| d`)
  only changes outputs that are rounding noise.

  Returns:
    A stateless `Aggregator`.

  Example:
    >>> import jax.numpy as jnp
    >>> from jheads import aggregation
    >>> a = aggregation.imtl_g()
    >>> jac = jnp.array([[3.0, 0.0], [0.0, 1.0]])
    >>> update, _ = a.update(jac, a.init(2))
    >>> update.round(4)  # equal projections on both unit directions
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
