"""Geometric loss strategy (GLS): the geometric mean of the head losses."""

from __future__ import annotations

import jax.numpy as jnp
import optax

from jheads import checks
from jheads.weighting import _base


def geometric() -> _base.LossWeighting:
  """Geometric loss strategy (Chennupati et al., CVPR Workshops 2019).

  `S(L) = (prod_i L_i)^(1/T) = exp(mean_i log L_i)`, head weights
  `S / (T L_i)`: a head's weight falls as its loss grows, so the objective
  is invariant to rescaling any one loss. This is torchjd's
  `scalarization.GeometricMean` (`scalarization/_geometric_mean.py`) and
  LibMTL's `GLS.py` (whose logged weights `L_i / (T prod L)` are not the
  applied ones; these are).

  Degenerate inputs:
    * A negative loss raises a ValueError, as in torchjd: eagerly when the
      losses are concrete, under `jax.jit` only inside `jheads.checked`
      (otherwise the objective is NaN).
    * A zero loss makes the objective 0 and every head weight 0. torchjd
      gives the same objective and zero weights for the other heads, but
      NaN (0/0) for the zero head; here it is 0, so a train step stays
      finite (the product is flat at 0 in every other direction).
    * One head: `S = L`, weight 1, also at `L = 0` (torchjd: NaN).

  Returns:
    A `LossWeighting` with `optax.EmptyState()` state.

  Example:
    >>> import jax.numpy as jnp
    >>> from jheads import weighting
    >>> w = weighting.geometric()
    >>> state = w.init(2)
    >>> w.loss(jnp.array([1.0, 4.0]), state)
    Array(2., dtype=float32)
    >>> weighting.head_weights(w, jnp.array([1.0, 4.0]), state)  # S / (T L)
    Array([1.  , 0.25], dtype=float32)
  """
  where = "geometric"

  def init(n_heads):
    _base.check_n_heads(n_heads, where)
    return optax.EmptyState()

  def loss(losses, state):
    del state
    losses = _base.check_losses(losses, where)
    checks.require(
        lambda: jnp.all(losses >= 0),
        f"{where}: losses must be non-negative (the geometric mean of a negative loss is "
        "undefined)",
        losses,
    )
    if losses.shape[0] == 1:
      return losses[0]  # S = L, weight 1 even at L = 0 (torchjd: exp(log 0) has gradient NaN)
    positive = losses > 0
    # A zero loss contributes log 0 = -inf through a constant, so its gradient is 0, not 0/0.
    logs = jnp.where(positive, jnp.log(jnp.where(positive, losses, 1.0)), -jnp.inf)
    logs = jnp.where(losses < 0, jnp.nan, logs)
    return jnp.exp(jnp.mean(logs))

  def update(losses, state, *, losses_after=None):
    del losses_after
    _base.check_losses(losses, where)
    return state

  return _base.LossWeighting(init, loss, update)
