"""Fast Adaptive Multitask Optimization (FAMO)."""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jheads import checks
from jheads.weighting import _base

# torchjd's and FAMO's `famo.py` epsilon, added to L - min_losses before the log.
_EPSILON = 1e-8


class FAMOState(NamedTuple):
  """State of `famo`.

  Attributes:
    logits: `[T]` task-weighting logits `w` (the weights are `softmax(w)`).
    opt_state: the state of the optimizer that learns `w`.
  """

  logits: jax.Array
  opt_state: Any


def famo(
    *,
    min_losses: jax.typing.ArrayLike | None = None,
    optimizer: optax.GradientTransformation | None = None,
) -> _base.LossWeighting:
  """FAMO (Liu, Liu, Stone and Liu, NeurIPS 2023).

  `S(L) = sum_i z_i log D_i / c`, `z = softmax(w)`, `D = L - min_losses +
  1e-8`, `c = sum_i z_i / D_i` held constant: head weights
  `(z_i / D_i) / sum_j (z_j / D_j)`, a convex combination that decreases
  every log-loss at about the same rate. This is torchjd's
  `scalarization.FAMO` (`scalarization/_famo.py`), adapted from FAMO's
  `famo.py`.

  The logits `w` are not learned from `S`. After the model's step, the
  caller recomputes the losses on the same batch and calls
  `update(losses, state, losses_after=...)` (`needs_losses_after` is True):
  with `delta = log D(losses) - log D(losses_after)`, `w` takes one step of
  its optimizer on the gradient `J_softmax(w)' delta`.

  When every head's loss changes by the same factor the logits' gradient is
  rounding noise, which Adam normalises into a step (torchjd's too); in
  float32 that noise is 1e-9 against Adam's `eps` of 1e-8, so such steps
  can move the logits by a fraction of the learning rate.

  Losses must stay above `min_losses` (their logs are taken): violations
  raise a ValueError when the losses are concrete, and inside
  `jheads.checked` under `jax.jit`; otherwise they give NaN, as in torchjd.

  Args:
    min_losses: `[T]` (or scalar) lower bounds of the losses; default 0. For
      losses that can be negative (the CAGrad toy) give bounds below them.
    optimizer: an optax transformation for the logits; default
      `optax.chain(optax.add_decayed_weights(1e-3), optax.adam(0.025))`,
      torch's `Adam(lr=0.025, weight_decay=1e-3)` (coupled L2, as torchjd;
      1e-3 is the paper's Algorithm 2 and LibMTL's; FAMO's `famo.py` uses
      0.01 and its experiments 1e-5).

  Returns:
    A `LossWeighting` with `FAMOState` state and `needs_losses_after=True`.

  Example:
    >>> import jax.numpy as jnp
    >>> from jheads import weighting
    >>> w = weighting.famo()
    >>> state = w.init(2)
    >>> losses = jnp.array([1.0, 4.0])
    >>> weighting.head_weights(w, losses, state)  # proportional to 1 / L at the start
    Array([0.8, 0.2], dtype=float32)
    >>> state = w.update(losses, state, losses_after=jnp.array([0.9, 3.0]))
    >>> [round(float(x), 4) for x in state.logits]  # the head whose log-loss fell less gains
    [0.025, -0.025]
  """
  where = "famo"
  if min_losses is None:
    lower = None
  else:
    lower = np.asarray(_base.check_vector(np.atleast_1d(min_losses), "min_losses", where))
    if np.ndim(min_losses) == 0:
      lower = lower.reshape(())
  optimizer = (
      optax.chain(optax.add_decayed_weights(1e-3), optax.adam(0.025))
      if optimizer is None else _base.check_optimizer(optimizer, where)
  )

  def init(n_heads):
    n_heads = _base.check_n_heads(n_heads, where)
    if lower is not None and lower.ndim == 1:
      _base.check_length(lower, "min_losses", n_heads, where)
    logits = jnp.zeros(n_heads, dtype=float)
    return FAMOState(logits, optimizer.init(logits))

  def shifted(losses, name):
    checks.require(
        lambda: jnp.all(losses - (0.0 if lower is None else lower) + _EPSILON > 0),
        f"{where}: {name} must be above min_losses (their logs are taken)",
        losses,
    )
    return losses - (0.0 if lower is None else jnp.asarray(lower, losses.dtype)) + _EPSILON

  def loss(losses, state):
    losses = _base.check_losses(losses, where, state.logits.shape[0])
    z = jax.lax.stop_gradient(jax.nn.softmax(state.logits.astype(losses.dtype)))
    d = shifted(losses, "losses")
    normalizer = jax.lax.stop_gradient(jnp.sum(z / d))
    return jnp.sum((z / normalizer) * jnp.log(d))

  def update(losses, state, *, losses_after=None):
    if losses_after is None:
      raise ValueError(
          f"{where}: update needs losses_after, the losses recomputed on the same batch "
          "after the model's step."
      )
    n_heads = state.logits.shape[0]
    before = jax.lax.stop_gradient(_base.check_losses(losses, where, n_heads))
    after = jax.lax.stop_gradient(_base.check_losses(losses_after, where, n_heads))
    d_before, d_after = shifted(before, "losses"), shifted(after, "losses_after")
    # log D_before - log D_after, without the cancellation of two nearby logs: in float32 the
    # difference of logs is off by ulp(log D), which Adam's first steps amplify where two
    # heads' log-changes nearly agree; this form is off by ulp(delta).
    delta = jnp.log1p((d_before - d_after) / d_after)
    _, softmax_vjp = jax.vjp(jax.nn.softmax, state.logits)
    (grads,) = softmax_vjp(delta.astype(state.logits.dtype))
    logits, opt_state = _base.optimizer_step(optimizer, grads, state.opt_state, state.logits)
    return FAMOState(logits, opt_state)

  return _base.LossWeighting(init, loss, update, needs_losses_after=True)
