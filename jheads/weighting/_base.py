"""The `LossWeighting` interface, the head-weights helper and shared checks."""

from __future__ import annotations

import numbers
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jheads.checks import check_length, check_vector  # noqa: F401  (re-exported)

ArrayLike = jax.typing.ArrayLike
State = Any


class LossWeighting(NamedTuple):
  """A loss-level multi-task method: per-head losses in, one objective out.

  Built by the factories of `jheads.weighting`, in the manner of
  `optax.GradientTransformation`: pure functions and a state pytree that the
  caller threads through, replicated on every device.

  Attributes:
    init: `n_heads -> state`, the initial state (a pytree of arrays).
    loss: `(losses, state) -> scalar`, the objective the model minimises;
      differentiable in the `[T]` losses, and its gradient with respect to
      them is the head weights applied (`head_weights`).
    update: `(losses, state, *, losses_after=None) -> state`, run after the
      model's optimizer step with the same losses `loss` saw. Schedules move
      here (epoch sums, PRNG keys), and learned parameters take a step of
      their own optimizer.
    needs_losses_after: whether `update` needs `losses_after`, the losses
      recomputed on the same batch with the updated model (FAMO).
  """

  init: Callable[[int], State]
  loss: Callable[[ArrayLike, State], jax.Array]
  update: Callable[..., State]
  needs_losses_after: bool = False


def head_weights(
    weighting: LossWeighting, losses: ArrayLike, state: State
) -> jax.Array:
  """The head weights a weighting applies: `jax.grad(weighting.loss)`.

  By the chain rule the model's gradient is `sum_i w_i grad L_i` with
  `w = dS/dL`, for linear objectives and nonlinear ones (GLS, STCH) alike,
  so these are the weights a train step applies and reports.

  Args:
    weighting: a `LossWeighting`.
    losses: `[T]` floating per-head losses.
    state: the weighting's state.

  Returns:
    `[T]` weights, in the losses' dtype.

  Example:
    >>> import jax.numpy as jnp
    >>> from jheads import weighting
    >>> w = weighting.geometric()
    >>> weighting.head_weights(w, jnp.array([1.0, 4.0]), w.init(2))
    Array([1.  , 0.25], dtype=float32)
  """
  return jax.grad(weighting.loss)(losses, state)


# ----------------------------------------------------------------------------
# Shared checks: each names the factory (`where`) and the problem.


def check_n_heads(n_heads: Any, where: str) -> int:
  """`n_heads` as a positive Python int."""
  if isinstance(n_heads, bool) or not isinstance(n_heads, numbers.Integral):
    raise ValueError(f"{where}: n_heads must be a positive int, got {n_heads!r}.")
  if n_heads < 1:
    raise ValueError(f"{where}: n_heads must be a positive int, got {n_heads}.")
  return int(n_heads)


def check_losses(losses: ArrayLike, where: str, n_heads: int | None = None) -> jax.Array:
  """`losses` as a `[T]` float array (float32 or wider), checked at trace time."""
  losses = jnp.asarray(losses)
  if not jnp.issubdtype(losses.dtype, jnp.number):
    raise ValueError(f"{where}: losses must be numeric, got dtype {losses.dtype}.")
  if losses.ndim != 1 or losses.shape[0] == 0:
    raise ValueError(
        f"{where}: losses must be a [T] vector, one per head, got shape {losses.shape}."
    )
  if n_heads is not None and losses.shape[0] != n_heads:
    raise ValueError(
        f"{where}: losses must have shape ({n_heads},), one per head of the state, "
        f"got shape {losses.shape}."
    )
  return losses.astype(compute_dtype(losses.dtype))


def compute_dtype(dtype: Any) -> Any:
  """float32, or the losses' dtype when wider: low-precision losses accumulate in float32."""
  if jnp.issubdtype(dtype, jnp.floating):
    return jnp.promote_types(dtype, jnp.float32)
  return jnp.promote_types(jnp.float32, jnp.result_type(float))


def check_positive(value: Any, name: str, where: str) -> float:
  """A finite, strictly positive float hyper-parameter."""
  if isinstance(value, bool) or not isinstance(value, numbers.Real) or not np.isfinite(value):
    raise ValueError(f"{where}: {name} must be a finite positive number, got {value!r}.")
  if value <= 0:
    raise ValueError(f"{where}: {name} must be strictly positive, got {value}.")
  return float(value)


def check_optimizer(optimizer: Any, where: str) -> optax.GradientTransformation:
  """An optax transformation (anything with `init` and `update`)."""
  methods = (getattr(optimizer, "init", None), getattr(optimizer, "update", None))
  if not all(callable(method) for method in methods):
    raise ValueError(
        f"{where}: optimizer must be an optax GradientTransformation, got {optimizer!r}."
    )
  return optimizer


def optimizer_step(
    optimizer: optax.GradientTransformation, grads: jax.Array, opt_state: Any, params: jax.Array
) -> tuple[jax.Array, Any]:
  """One optax step of a weighting's own parameters."""
  updates, opt_state = optimizer.update(grads, opt_state, params)
  return optax.apply_updates(params, updates), opt_state
