"""Constant weights: `equal` (the plain sum) and `fixed` (a given weighted sum)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

from jheads.weighting import _base


def equal() -> _base.LossWeighting:
  """Equal weighting: the plain sum of the head losses.

  `S(L) = sum_i L_i`, head weights 1. This is `multi_head`'s default (head
  weights of 1), torchjd's `scalarization.Sum` (`scalarization/_sum.py`) and
  LibMTL's `EW.py` (which sums despite its docstring's 1/T). For the mean
  (torchjd's `scalarization.Mean`) use `fixed(jnp.full(T, 1 / T))`.

  The state is `optax.EmptyState()`; `update` returns it unchanged.

  Returns:
    A `LossWeighting`.

  Example:
    >>> import jax.numpy as jnp
    >>> from jheads import weighting
    >>> w = weighting.equal()
    >>> state = w.init(2)
    >>> w.loss(jnp.array([1.0, 2.0]), state)
    Array(3., dtype=float32)
    >>> weighting.head_weights(w, jnp.array([1.0, 2.0]), state)
    Array([1., 1.], dtype=float32)
  """
  where = "equal"

  def init(n_heads):
    _base.check_n_heads(n_heads, where)
    return optax.EmptyState()

  def loss(losses, state):
    del state
    return jnp.sum(_base.check_losses(losses, where))

  def update(losses, state, *, losses_after=None):
    del losses_after
    _base.check_losses(losses, where)
    return state

  return _base.LossWeighting(init, loss, update)


def fixed(weights: jax.typing.ArrayLike) -> _base.LossWeighting:
  """A fixed weighted sum of the head losses.

  `S(L) = sum_i w_i L_i`, head weights `w`: what `multi_head(...,
  head_weights=w)` computes, torchjd's `scalarization.Constant`
  (`scalarization/_constant.py`); `fixed(ones(T) / T)` is torchjd's
  `scalarization.Mean`. The weights must be finite (negative ones are
  allowed, as in torchjd); they are computed in float32 or the losses'
  dtype when wider.

  Args:
    weights: `[T]` weights, one per head; `init(n_heads)` raises unless
      `n_heads == T`.

  Returns:
    A `LossWeighting` with `optax.EmptyState()` state.

  Example:
    >>> import jax.numpy as jnp
    >>> from jheads import weighting
    >>> w = weighting.fixed([0.5, 2.0])
    >>> state = w.init(2)
    >>> w.loss(jnp.array([1.0, 2.0]), state)
    Array(4.5, dtype=float32)
    >>> weighting.head_weights(w, jnp.array([1.0, 2.0]), state)
    Array([0.5, 2. ], dtype=float32)
  """
  where = "fixed"
  weights = _base.check_vector(weights, "weights", where)
  n_weights = weights.shape[0]

  def init(n_heads):
    _base.check_length(weights, "weights", _base.check_n_heads(n_heads, where), where)
    return optax.EmptyState()

  def loss(losses, state):
    del state
    losses = _base.check_losses(losses, where, n_weights)
    return jnp.sum(jnp.asarray(weights, losses.dtype) * losses)

  def update(losses, state, *, losses_after=None):
    del losses_after
    _base.check_losses(losses, where, n_weights)
    return state

  return _base.LossWeighting(init, loss, update)
