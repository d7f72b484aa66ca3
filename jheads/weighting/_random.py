"""Random loss weighting (RLW): fresh softmax-normal weights every step."""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from jheads.weighting import _base


class RandomState(NamedTuple):
  """State of `random`.

  Attributes:
    key: the PRNG key of this step's weights; `update` advances it.
  """

  key: jax.Array


def _is_key(key) -> bool:
  key = jnp.asarray(key) if not isinstance(key, jax.Array) else key
  if jnp.issubdtype(key.dtype, jax.dtypes.prng_key):
    return key.ndim == 0
  return key.dtype == jnp.uint32 and key.shape == (2,)


def random(*, key: jax.Array) -> _base.LossWeighting:
  """Random loss weighting (Lin et al., TMLR 2022, Algorithm 2).

  `S(L) = sum_i w_i L_i` with `w = softmax(z)`, `z ~ N(0, I_T)` drawn anew
  each step: positive head weights summing to 1. This is torchjd's
  `scalarization.Random` (`scalarization/_random.py`) and LibMTL's `RLW.py`.

  The draw comes from the key in the state, not a global generator: `loss`
  draws from a subkey of `state.key` (so `loss` and its gradient see the
  same weights) and `update` replaces `state.key` with the other subkey.
  With the state replicated, every device draws the same weights. torchjd
  draws from torch's generator, so the values differ from its draws; the
  distribution is the same.

  Args:
    key: a `jax.random.key` (or a legacy `jax.random.PRNGKey`).

  Returns:
    A `LossWeighting` with `RandomState` state.

  Example:
    >>> import jax, jax.numpy as jnp
    >>> from jheads import weighting
    >>> w = weighting.random(key=jax.random.key(0))
    >>> state = w.init(3)
    >>> h = weighting.head_weights(w, jnp.array([1.0, 2.0, 3.0]), state)
    >>> bool(jnp.all(h > 0)), round(float(h.sum()), 6)
    (True, 1.0)
    >>> h2 = weighting.head_weights(w, jnp.ones(3), w.update(jnp.ones(3), state))
    >>> bool(jnp.any(h != h2))  # a new draw after each update
    True
  """
  where = "random"
  if key is None or not _is_key(key):
    raise ValueError(
        f"{where}: key must be a jax.random.key (or PRNGKey), got {key!r}."
    )

  def init(n_heads):
    _base.check_n_heads(n_heads, where)
    return RandomState(key)

  def loss(losses, state):
    losses = _base.check_losses(losses, where)
    draw_key, _ = jax.random.split(state.key)
    # Drawn in float32 whatever the losses' dtype, so x64 does not change the draw.
    z = jax.random.normal(draw_key, losses.shape, jnp.float32).astype(losses.dtype)
    return jnp.sum(jax.nn.softmax(z) * losses)

  def update(losses, state, *, losses_after=None):
    del losses_after
    _base.check_losses(losses, where)
    _, next_key = jax.random.split(state.key)
    return RandomState(next_key)

  return _base.LossWeighting(init, loss, update)
