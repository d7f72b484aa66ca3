"""GradNorm: learned head weights that balance gradient norms with training rates."""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from jheads.aggregation import _base


class GradNormState(NamedTuple):
  """State of `gradnorm`.

  Attributes:
    logits: `[T]` theta; the weights are `T softmax(theta)`.
    opt_state: the state of the optimizer that learns theta.
    initial_losses: `[T]` the losses of the first call, `L_i(0)`.
    count: int32 calls so far.
  """

  logits: jax.Array
  opt_state: Any
  initial_losses: jax.Array
  count: jax.Array


def gradnorm(
    *, alpha: float = 1.5, optimizer: optax.GradientTransformation | None = None
) -> _base.Aggregator:
  """GradNorm (Chen et al., "GradNorm: Gradient Normalization for Adaptive
  Loss Balancing in Deep Multitask Networks", ICML 2018).

  The weights are `w = T softmax(theta)` (sum scale: they sum to `T`, equal
  at the start). Each call applies the current `w`, then takes one step of
  `optimizer` on theta for the GradNorm loss `sum_i |w_i |g_i| -
  sg(mean_j(w_j |g_j|) r_i^alpha)|`, with `|g_i| = sqrt(G_ii)` and `r_i =
  (L_i / L_i(0)) / mean_j(L_j / L_j(0))` the relative inverse training rate
  (`L(0)` the first call's losses, so the first call only equalises the
  weighted norms). Heads that train slower get larger weights; `alpha`
  sets how strongly.

  As LibMTL's `GradNorm.py` (`alpha=1.5` from its `config.py`, the softmax
  parametrisation), with two choices of this library: the norms are over all
  the shared parameters (the paper uses the last shared layer; point the
  train step's `shared` mask there for the paper's version, at the cost of
  the rest of the trunk getting the plain gradient), and theta has its own
  optimizer rather than the model's. torchjd has no GradNorm.

  Args:
    alpha: the asymmetry exponent (>= 0; 0 equalises the weighted norms).
    optimizer: an optax transformation for theta; default `optax.adam(0.025)`.

  Returns:
    An `Aggregator` with `GradNormState` state; `weights` and `update` need
    `losses` (positive, `[T]`).

  Example:
    >>> import jax.numpy as jnp
    >>> from jheads import aggregation
    >>> a = aggregation.gradnorm()
    >>> state = a.init(2)
    >>> g = aggregation.gramian(jnp.array([[1.0, 0.0], [0.0, 10.0]]))
    >>> w, state = a.weights(g, state, losses=jnp.array([1.0, 1.0]))
    >>> w  # equal at the start
    Array([1., 1.], dtype=float32)
    >>> w, state = a.weights(g, state, losses=jnp.array([1.0, 1.0]))
    >>> bool(w[0] > w[1])  # the head with the smaller gradient gains weight
    True
  """
  where = "aggregation.gradnorm"
  alpha = _base.check_real(alpha, "alpha", where)
  optimizer = optax.adam(0.025) if optimizer is None else _base.check_optimizer(optimizer, where)

  def init(n_heads):
    n_heads = _base.check_n_heads(n_heads, where)
    logits = jnp.zeros((n_heads,), jnp.float32)
    return GradNormState(
        logits, optimizer.init(logits), jnp.ones((n_heads,), jnp.float32), jnp.zeros((), jnp.int32)
    )

  def weights(gramian, state, *, losses=None):
    t = state.logits.shape[0]
    g = _base.check_gramian(gramian, where, t)
    losses = _base.check_losses(losses, where, t).astype(jnp.float32)
    norms = jnp.sqrt(jnp.maximum(jnp.diagonal(g), 0)).astype(jnp.float32)
    first = state.count == 0
    initial = jnp.where(first, losses, state.initial_losses)
    ratio = jnp.where(initial > 0, losses / jnp.where(initial > 0, initial, 1), 1.0)
    mean_ratio = jnp.mean(ratio)
    rel = ratio / jnp.where(mean_ratio > 0, mean_ratio, 1)

    def gn_loss(logits):
      wn = t * jax.nn.softmax(logits) * norms
      target = jax.lax.stop_gradient(jnp.mean(wn) * rel**alpha)
      return jnp.sum(jnp.abs(wn - target))

    w = t * jax.nn.softmax(state.logits)
    grads = jax.grad(gn_loss)(state.logits)
    updates, opt_state = optimizer.update(grads, state.opt_state, state.logits)
    logits = optax.apply_updates(state.logits, updates)
    new_state = GradNormState(logits, opt_state, initial, state.count + 1)
    return w.astype(_base.out_dtype(gramian)), new_state

  return _base.Aggregator(init, _base.gramian_update(weights), weights)
