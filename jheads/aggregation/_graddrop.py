"""GradDrop: per coordinate, keep the heads of one sign, chosen by sign purity."""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from jheads.aggregation import _base


class GradDropState(NamedTuple):
  """State of `graddrop`.

  Attributes:
    key: the PRNG key of this call's uniform draws; each call advances it.
  """

  key: jax.Array


@jax.jit
def graddrop_combine(leaf, u, leak):
  """GradDrop on one Jacobian leaf `[T, ...]` with uniforms `u` `[...]`.

  `P = (1 + sum_i g_i / sum_i |g_i|) / 2` per coordinate (the positive sign
  purity; 1/2 where every head is 0), `M_i = [P > U][g_i > 0] + [P < U][g_i
  < 0]`, and the result is `sum_i (leak_i + (1 - leak_i) M_i) g_i`.
  """
  acc = _base.accumulation_dtype(leaf.dtype)
  x = leaf.astype(acc)
  total = jnp.sum(x, axis=0)
  mass = jnp.sum(jnp.abs(x), axis=0)
  purity = 0.5 * (1 + jnp.where(mass > 0, total / jnp.where(mass > 0, mass, 1), 0))
  u = u.astype(acc)
  keep = ((purity > u) & (x > 0)) | ((purity < u) & (x < 0))
  lk = leak.astype(acc).reshape((-1,) + (1,) * (x.ndim - 1))
  return jnp.sum((lk + (1 - lk) * keep) * x, axis=0).astype(leaf.dtype)


def graddrop(*, key: jax.Array, leak: jax.typing.ArrayLike | None = None) -> _base.Aggregator:
  """GradDrop (Chen et al., "Just Pick a Sign: Optimizing Deep Multitask
  Models with Gradient Sign Dropout", NeurIPS 2020, Algorithm 1 lines 10-15).

  Per coordinate, with the positive sign purity `P = (1 + sum_i g_i /
  sum_i |g_i|) / 2` and `U ~ Uniform(0, 1)`: keep the positive entries when
  `P > U`, the negative ones when `P < U`; head `i` also leaks `leak_i` of
  its gradient through. Sum scale: with no sign conflict the update is the
  sum. It reads the entries' signs, so it has no Gramian form (`weights` is
  None) and the draws cover every coordinate of every leaf.

  Equals torchjd 0.18's `GradDrop` (`aggregation/_graddrop.py`, `f` the
  identity) given the same uniforms. Those come from the key in the state
  (a fresh split per call and leaf), so every device draws the same; torchjd
  draws `torch.rand`, so a given call matches it only in distribution.

  Args:
    key: a `jax.random.key` (or a legacy `jax.random.PRNGKey`).
    leak: `[T]` leak fractions in [0, 1]; default 0 for every head.

  Returns:
    An `Aggregator` with `GradDropState` state and `weights=None`.

  Example:
    >>> import jax, jax.numpy as jnp
    >>> from jheads import aggregation
    >>> a = aggregation.graddrop(key=jax.random.key(0))
    >>> jac = jnp.array([[1.0, 2.0], [3.0, 0.0]])  # no sign conflict
    >>> update, state = a.update(jac, a.init(2))
    >>> update
    Array([4., 2.], dtype=float32)
  """
  where = "aggregation.graddrop"
  key = _base.check_key(key, where)
  leak_arr = None if leak is None else _base.check_vector(leak, "leak", where)

  def init(n_heads):
    n_heads = _base.check_n_heads(n_heads, where)
    _base.check_length(leak_arr, "leak", n_heads, where)
    return GradDropState(key)

  def update(jacobian, state, *, losses=None):
    del losses
    leaves, t = _base._leaves(jacobian, where)
    _base.check_length(leak_arr, "leak", t, where)
    lk = jnp.zeros((t,), jnp.float32) if leak_arr is None else jnp.asarray(leak_arr, jnp.float32)
    draw, next_key = jax.random.split(state.key)
    treedef = jax.tree.structure(jacobian)
    keys = jax.random.split(draw, len(leaves))
    out = [
        graddrop_combine(leaf, jax.random.uniform(k, leaf.shape[1:], jnp.float32), lk)
        for leaf, k in zip(leaves, keys)
    ]
    return jax.tree.unflatten(treedef, out), GradDropState(next_key)

  return _base.Aggregator(init, update, None)
