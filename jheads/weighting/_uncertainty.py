"""Uncertainty weighting (UW): learned per-head log-variances."""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jheads.weighting import _base


class UncertaintyState(NamedTuple):
  """State of `uncertainty`.

  Attributes:
    log_var: `[T]` log-variances `s`.
    opt_state: the state of the optimizer that learns `s`.
  """

  log_var: jax.Array
  opt_state: Any


def _objective(losses: jax.Array, log_var: jax.Array) -> jax.Array:
  log_var = log_var.astype(losses.dtype)
  return jnp.sum(0.5 * jnp.exp(-log_var) * losses + 0.5 * log_var)


def uncertainty(
    *,
    init_log_var: float = 0.0,
    optimizer: optax.GradientTransformation | None = None,
) -> _base.LossWeighting:
  """Uncertainty weighting (Kendall, Gal and Cipolla, CVPR 2018).

  `S(L, s) = sum_i 0.5 exp(-s_i) L_i + 0.5 s_i`, with `s_i = log sigma_i^2`
  a learned log-variance per head: head weights `0.5 exp(-s)`. This is
  torchjd's `scalarization.UW` (`scalarization/_uw.py`, Eq. 7 of the paper
  in log-variance form) and nash-mtl's `Uncertainty`.

  `s` lives in the state, not in the model's parameters, and `update` takes
  one step of its own optimizer on the exact gradient
  `dS/ds = 0.5 (1 - exp(-s) L)` at the losses `loss` saw; that is what a
  joint torch optimizer over model and `UW.parameters()` does to `s`. For
  fixed losses `s` tends to `log L`, where the head weight is `1 / (2 L)`.
  Pass the model's optimizer to reproduce LibMTL's "same optimizer"
  behaviour. The objective can be negative: that is expected.

  Args:
    init_log_var: the initial `s` (torchjd and nash-mtl: 0, equal weights of
      0.5; LibMTL: -0.5).
    optimizer: an optax transformation for `s`; default `optax.adam(0.025)`,
      the learning rate nash-mtl gives its method parameters.

  Returns:
    A `LossWeighting` with `UncertaintyState` state.

  Example:
    >>> import jax.numpy as jnp
    >>> from jheads import weighting
    >>> w = weighting.uncertainty()
    >>> state = w.init(2)
    >>> losses = jnp.array([0.5, 3.0])
    >>> w.loss(losses, state)
    Array(1.75, dtype=float32)
    >>> weighting.head_weights(w, losses, state)
    Array([0.5, 0.5], dtype=float32)
    >>> state = w.update(losses, state)  # Adam's first step: -0.025 sign(dS/ds)
    >>> [round(float(s), 4) for s in state.log_var]  # s moves towards log L
    [-0.025, 0.025]
  """
  where = "uncertainty"
  if isinstance(init_log_var, bool) or not np.isfinite(np.asarray(init_log_var, float)).all():
    raise ValueError(f"{where}: init_log_var must be a finite number, got {init_log_var!r}.")
  init_log_var = float(init_log_var)
  optimizer = optax.adam(0.025) if optimizer is None else _base.check_optimizer(optimizer, where)

  def init(n_heads):
    log_var = jnp.full(_base.check_n_heads(n_heads, where), init_log_var, dtype=float)
    return UncertaintyState(log_var, optimizer.init(log_var))

  def loss(losses, state):
    losses = _base.check_losses(losses, where, state.log_var.shape[0])
    return _objective(losses, state.log_var)

  def update(losses, state, *, losses_after=None):
    del losses_after
    losses = jax.lax.stop_gradient(_base.check_losses(losses, where, state.log_var.shape[0]))
    grads = jax.grad(lambda s: _objective(losses, s).astype(s.dtype))(state.log_var)
    log_var, opt_state = _base.optimizer_step(optimizer, grads, state.opt_state, state.log_var)
    return UncertaintyState(log_var, opt_state)

  return _base.LossWeighting(init, loss, update)
