"""Dynamic Weight Average (DWA): weights from the last two epochs' loss ratios."""

from __future__ import annotations

import numbers
from typing import NamedTuple

import jax
import jax.numpy as jnp

from jheads.weighting import _base


class DWAState(NamedTuple):
  """State of `dwa`.

  Attributes:
    loss_sum: `[T]` sum of this epoch's losses so far.
    count: int32 scalar, the updates seen this epoch.
    older: `[T]` average loss of the epoch before last (`L(t-2)`).
    newer: `[T]` average loss of the last epoch (`L(t-1)`).
    n_epochs: int32 scalar, the epochs completed, counted up to 2.
  """

  loss_sum: jax.Array
  count: jax.Array
  older: jax.Array
  newer: jax.Array
  n_epochs: jax.Array


def dwa(*, steps_per_epoch: int, temperature: float = 2.0) -> _base.LossWeighting:
  """Dynamic Weight Average (Liu, Johns and Davison, CVPR 2019).

  `S(L) = sum_k lambda_k L_k` with `lambda = T softmax(r / temperature)`,
  `r_k = Lbar_k(t-1) / Lbar_k(t-2)` the ratio of head k's average loss over
  the last two epochs, and `lambda = 1` during the first two epochs. The
  weights sum to T and depend on past epochs only, so they are the head
  weights. This is torchjd's `scalarization.DWA` (`scalarization/_dwa.py`)
  and LibMTL's `DWA.py`.

  torchjd's `DWA.step()` ends an epoch; here an epoch is `steps_per_epoch`
  calls of `update`, so the epoch sums roll inside `jax.jit`. nash-mtl's
  iteration-level variant (25-iteration windows) is `steps_per_epoch=25`.

  As in torchjd the losses should keep a consistent non-zero sign: a zero
  epoch average gives an infinite ratio and NaN weights.

  Args:
    steps_per_epoch: updates per epoch, a positive int.
    temperature: the softmax temperature, strictly positive; larger is more
      uniform (the paper's and torchjd's default, 2.0).

  Returns:
    A `LossWeighting` with `DWAState` state.

  Example:
    >>> import jax.numpy as jnp
    >>> from jheads import weighting
    >>> w = weighting.dwa(steps_per_epoch=1)
    >>> state = w.init(2)
    >>> for losses in ([1.0, 1.0], [0.5, 1.0]):  # two one-step epochs: weights 1
    ...   state = w.update(jnp.array(losses), state)
    >>> h = weighting.head_weights(w, jnp.array([0.5, 1.0]), state)
    >>> [round(float(x), 4) for x in h]  # 2 softmax([0.5, 1] / 2)
    [0.8756, 1.1244]
  """
  where = "dwa"
  if (
      isinstance(steps_per_epoch, bool)
      or not isinstance(steps_per_epoch, numbers.Integral)
      or steps_per_epoch < 1
  ):
    raise ValueError(f"{where}: steps_per_epoch must be a positive int, got {steps_per_epoch!r}.")
  steps_per_epoch = int(steps_per_epoch)
  temperature = _base.check_positive(temperature, "temperature", where)

  def init(n_heads):
    n_heads = _base.check_n_heads(n_heads, where)
    zeros, ones = jnp.zeros(n_heads, dtype=float), jnp.ones(n_heads, dtype=float)
    count = jnp.zeros((), jnp.int32)
    # Unused averages start at 1, so the unselected branch below stays finite.
    return DWAState(zeros, count, ones, ones, count)

  def weights(state, dtype):
    rates = state.newer.astype(dtype) / state.older.astype(dtype)
    dynamic = rates.shape[0] * jax.nn.softmax(rates / temperature)
    return jnp.where(state.n_epochs >= 2, dynamic, jnp.ones_like(dynamic))

  def loss(losses, state):
    losses = _base.check_losses(losses, where, state.loss_sum.shape[0])
    return jnp.sum(jax.lax.stop_gradient(weights(state, losses.dtype)) * losses)

  def update(losses, state, *, losses_after=None):
    del losses_after
    losses = jax.lax.stop_gradient(_base.check_losses(losses, where, state.loss_sum.shape[0]))
    loss_sum = state.loss_sum + losses.astype(state.loss_sum.dtype)
    count = state.count + 1
    end = count >= steps_per_epoch
    average = loss_sum / count.astype(loss_sum.dtype)
    return DWAState(
        loss_sum=jnp.where(end, jnp.zeros_like(loss_sum), loss_sum),
        count=jnp.where(end, jnp.zeros_like(count), count),
        older=jnp.where(end, state.newer, state.older),
        newer=jnp.where(end, average, state.newer),
        n_epochs=jnp.where(end, jnp.minimum(state.n_epochs + 1, 2), state.n_epochs),
    )

  return _base.LossWeighting(init, loss, update)
