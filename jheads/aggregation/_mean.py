"""Mean: the average of the heads' gradients."""

from __future__ import annotations

import jax.numpy as jnp
import optax

from jheads.aggregation import _base


def mean() -> _base.Aggregator:
  """The mean of the rows, `J' 1 / T`. Mean scale.

  torchjd's `Mean` (`aggregation/_mean.py`). The Jacobian's Gramian is never
  formed: `update` is one `tensordot` per leaf.

  Returns:
    A stateless `Aggregator`.

  Example:
    >>> import jax.numpy as jnp
    >>> from jheads import aggregation
    >>> a = aggregation.mean()
    >>> update, _ = a.update(jnp.array([[1.0, 2.0], [3.0, 0.0]]), a.init(2))
    >>> update
    Array([2., 1.], dtype=float32)
  """
  where = "aggregation.mean"

  def init(n_heads):
    _base.check_n_heads(n_heads, where)
    return optax.EmptyState()

  def weights(gramian, state, *, losses=None):
    del losses
    g = _base.check_gramian(gramian, where)
    t = g.shape[0]
    return jnp.full((t,), 1 / t, _base.out_dtype(gramian)), state

  def update(jacobian, state, *, losses=None):
    del losses
    _, t = _base._leaves(jacobian, where)
    w = jnp.full((t,), 1 / t, jnp.float32)
    return _base.combine(w, jacobian), state

  return _base.Aggregator(init, update, weights)
