"""PCGrad: each head's gradient with its conflicts projected out, summed."""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

from jheads.aggregation import _base


class PCGradState(NamedTuple):
  """State of `pcgrad`.

  Attributes:
    key: the PRNG key of this call's projection orders; each call advances it.
  """

  key: jax.Array


@jax.jit
def pcgrad_weights(g, mask, orders):
  """PCGrad's weights given each head's projection order.

  Head `i` starts at `e_i` and, for `j` in `orders[i]` (`j != i`), when
  `g_j . g_i^PC = (G w)_j < 0`, subtracts `(G w)_j / G_jj` from `w_j`: the
  projection of `g_i^PC` on the normal plane of the original `g_j`. A zero
  `g_j` never conflicts. The weights are the sum over heads.

  Args:
    g: `[T, T]` Gramian, zero on padding heads (which never conflict).
    mask: `[T]` bool, the real heads (whose rows are summed).
    orders: `[T, T]` int, row `i` a permutation of the heads.

  Returns:
    `[T]` weights.
  """
  t = g.shape[0]

  def one(i, order):
    def body(w, j):
      ip = jnp.dot(g[j], w, precision="highest")
      conflict = (j != i) & (ip < 0) & (g[j, j] > 0)
      w = w.at[j].add(jnp.where(conflict, -ip / jnp.where(g[j, j] > 0, g[j, j], 1), 0))
      return w, None

    w, _ = lax.scan(body, jax.nn.one_hot(i, t, dtype=g.dtype), order)
    return w

  rows = jax.vmap(one)(jnp.arange(t), orders)
  return jnp.sum(jnp.where(mask[:, None], rows, 0), axis=0)


def pcgrad(*, key: jax.Array) -> _base.Aggregator:
  """PCGrad (Yu et al., "Gradient Surgery for Multi-Task Learning", NeurIPS 2020, Algorithm 1).

  For each head `i`, in a random order of the other heads `j`: if
  `g_i^PC . g_j < 0`, `g_i^PC <- g_i^PC - (g_i^PC . g_j / |g_j|^2) g_j`
  (projections on the original `g_j`). The update is the **sum** of the
  `g_i^PC`: sum scale, as torchjd's and LibMTL's. Computed from the Gramian:
  every `g_i^PC` is a combination of the rows.

  Equals torchjd 0.18's `PCGrad` (`aggregation/_pcgrad.py`) given the same
  orders. Those come from the key in the state, one permutation per head
  per call, so every device draws the same; torchjd draws
  `torch.randperm` from torch's generator, so for `T >= 3` with conflicts a
  given call matches torchjd only in distribution (`T <= 2` is
  order-free).

  Args:
    key: a `jax.random.key` (or a legacy `jax.random.PRNGKey`).

  Returns:
    An `Aggregator` with `PCGradState` state.

  Example:
    >>> import jax, jax.numpy as jnp
    >>> from jheads import aggregation
    >>> a = aggregation.pcgrad(key=jax.random.key(0))
    >>> jac = jnp.array([[1.0, 0.0], [-1.0, 1.0]])
    >>> update, state = a.update(jac, a.init(2))
    >>> update  # [1, 0] + [-1, 1] with each conflict projected out
    Array([0.5, 1.5], dtype=float32)
  """
  where = "aggregation.pcgrad"
  key = _base.check_key(key, where)

  def init(n_heads):
    _base.check_n_heads(n_heads, where)
    return PCGradState(key)

  def weights(gramian, state, *, losses=None):
    del losses
    draw, next_key = jax.random.split(state.key)

    def core(g, mask):
      t = g.shape[0]
      orders = jax.vmap(lambda k: jax.random.permutation(k, t))(jax.random.split(draw, t))
      return pcgrad_weights(g, mask, orders)

    return _base.padded_weights(gramian, where, core), PCGradState(next_key)

  return _base.Aggregator(init, _base.gramian_update(weights), weights)
