"""Sum: the sum of the heads' gradients, the plain multi-head step."""

from __future__ import annotations

import jax.numpy as jnp
import optax

from jheads.aggregation import _base


def sum() -> _base.Aggregator:  # noqa: A001 - the method's name, as torchjd's `Sum`
  """The sum of the rows, `J' 1`. Sum scale.

  torchjd's `Sum` (`aggregation/_sum.py`): the gradient of the summed losses,
  so a train step with `aggregator=aggregation.sum()` is the plain step. The
  Gramian is never formed: `update` is one `tensordot` per leaf.

  Returns:
    A stateless `Aggregator`.

  Example:
    >>> import jax.numpy as jnp
    >>> from jheads import aggregation
    >>> a = aggregation.sum()
    >>> update, _ = a.update({"w": jnp.array([[1.0, 2.0], [3.0, 0.0]])}, a.init(2))
    >>> update
    {'w': Array([4., 2.], dtype=float32)}
  """
  where = "aggregation.sum"

  def init(n_heads):
    _base.check_n_heads(n_heads, where)
    return optax.EmptyState()

  def weights(gramian, state, *, losses=None):
    del losses
    g = _base.check_gramian(gramian, where)
    return jnp.ones((g.shape[0],), _base.out_dtype(gramian)), state

  def update(jacobian, state, *, losses=None):
    del losses
    _, t = _base._leaves(jacobian, where)
    return _base.combine(jnp.ones((t,), jnp.float32), jacobian), state

  return _base.Aggregator(init, update, weights)
