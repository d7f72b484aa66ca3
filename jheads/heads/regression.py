"""Regression heads: squared error, Poisson, and logistic regression.

Poisson and logistic regression are regression with another loss and an
inverse link (`exp` and `sigmoid`), as in TensorFlow.
"""

from __future__ import annotations

import math
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jheads import base
from jheads import checks
from jheads import metrics

REGRESSION = "regression"
POISSON = "poisson_regression"
LOGISTIC = "logistic_regression"


def regression_head(
    *,
    label_dimension: int = 1,
    name: str | None = None,
    weight_column: str | Callable[[Any], Any] | None = None,
    missing_label: float | int | None = None,
    mask_column: str | Callable[[Any], Any] | None = None,
    loss_reduction: str | base.LossReduction = "sum_over_batch_size",
    loss_fn: Callable[..., Any] | None = None,
    inverse_link_fn: Callable[[jax.Array], jax.Array] | None = None,
) -> base.Head:
  """A head for regression with squared error (TF's `RegressionHead`).

  Logits and labels are `[D0, ..., DN, label_dimension]` (labels may drop
  the last axis when it is 1). Weights are `[D0..DN]`, `[D0..DN, 1]` or per
  logit `[D0..DN, label_dimension]`.

  Metrics: `average_loss`, `prediction/mean`, `label/mean`. Predictions:
  `predictions` (`inverse_link_fn(logits)`, or the logits), plus `logits`
  when there is an inverse link.

  Args:
    label_dimension: number of regression targets per example, >= 1.
    name: the head's name; suffixes metric keys and is required in a multi_head.
    weight_column: a features key holding example weights, or a callable
      `features -> weights`.
    missing_label: a label value that marks a missing label (`float("nan")`
      matches NaN; e.g. -1 for class ids), or None. A missing label is as if
      that element were not in the batch: it adds nothing to the loss, its
      gradient or the statistics, and no reduction counts it.
    mask_column: a features key (or a callable `features -> mask`) of a
      boolean `[D0, ..., DN]` mask; rows where it is False are absent, as
      missing labels are. Pads a remainder batch to a fixed size exactly.
    loss_reduction: one of `jheads.LossReduction`.
    loss_fn: a custom unreduced loss `loss_fn(labels, logits[, features])`
      returning `[D0, ..., DN, label_dimension]`.
    inverse_link_fn: maps logits to predictions, e.g. `jnp.exp`.

  Returns:
    A `jheads.Head`.

  Example:
    >>> import jax.numpy as jnp, jheads
    >>> head = jheads.regression_head(weight_column="w", loss_reduction="sum")
    >>> logits = jnp.array([[45.0], [41.0], [44.0]])
    >>> labels = jnp.array([[35.0], [42.0], [45.0]])
    >>> features = {"w": jnp.array([1.0, 0.1, 1.5])}
    >>> round(float(head.loss_fn(logits, labels, features)), 4)
    101.6
  """
  if inverse_link_fn is not None and not callable(inverse_link_fn):
    raise TypeError(
        f"{base.describe(REGRESSION, name)}: inverse_link_fn must be callable,"
        f" got {type(inverse_link_fn).__name__}."
    )
  return _regression(
      REGRESSION,
      label_dimension=label_dimension,
      name=name,
      weight_column=weight_column,
      missing_label=missing_label,
      mask_column=mask_column,
      loss_reduction=loss_reduction,
      custom_loss_fn=loss_fn,
      default_loss=_squared_error,
      inverse_link_fn=inverse_link_fn,
      label_rule=base.LabelRule(
          integer=False,
          ok=lambda labels: jnp.isfinite(labels),
          message="finite numbers",
          convert=lambda labels, dtype: labels.astype(dtype),
      ),
  )


def poisson_regression_head(
    *,
    label_dimension: int = 1,
    name: str | None = None,
    weight_column: str | Callable[[Any], Any] | None = None,
    missing_label: float | int | None = None,
    mask_column: str | Callable[[Any], Any] | None = None,
    loss_reduction: str | base.LossReduction = "sum_over_batch_size",
    compute_full_loss: bool = True,
) -> base.Head:
  """A head for Poisson regression on counts (TF's `PoissonRegressionHead`).

  Logits are log-rates; predictions are `exp(logits)`. The loss is
  `exp(x) - y * x`, plus, with `compute_full_loss`, Stirling's approximation
  of `log(y!)`, `y log y - y + 0.5 log(2 pi y)`, where `y > 1`.

  Differences from TensorFlow: negative labels raise (TF returned NaN), and
  so do logits whose `exp` overflows the compute dtype (above about 88.7 in
  float32), where TF returned infinity. Both are checked eagerly, and under
  jit inside `jheads.checked`.

  Args:
    label_dimension: number of targets per example, >= 1.
    name: the head's name.
    weight_column: a features key holding example weights, or a callable.
    missing_label: a label value that marks a missing label (`float("nan")`
      matches NaN; e.g. -1 for class ids), or None. A missing label is as if
      that element were not in the batch: it adds nothing to the loss, its
      gradient or the statistics, and no reduction counts it.
    mask_column: a features key (or a callable `features -> mask`) of a
      boolean `[D0, ..., DN]` mask; rows where it is False are absent, as
      missing labels are. Pads a remainder batch to a fixed size exactly.
    loss_reduction: one of `jheads.LossReduction`.
    compute_full_loss: add the Stirling term (it does not change gradients).

  Returns:
    A `jheads.Head`.

  Example:
    >>> import jax.numpy as jnp, jheads
    >>> head = jheads.poisson_regression_head()
    >>> logits = jnp.array([[0.0], [-1.0], [1.0]])
    >>> labels = jnp.array([[1], [2], [3]])
    >>> round(float(head.loss_fn(logits, labels)), 6)
    1.834016
  """

  def poisson_loss(batch: base.Batch) -> jax.Array:
    logits, labels = batch.logits, batch.labels
    losses = jnp.exp(logits) - labels * logits
    if compute_full_loss:
      safe_labels = jnp.where(labels > 1, labels, 1.0)
      stirling = (
          safe_labels * jnp.log(safe_labels)
          - safe_labels
          + 0.5 * jnp.log(2 * math.pi * safe_labels)
      )
      losses = losses + jnp.where(labels > 1, stirling, 0.0)
    return losses

  return _regression(
      POISSON,
      label_dimension=label_dimension,
      name=name,
      weight_column=weight_column,
      missing_label=missing_label,
      mask_column=mask_column,
      loss_reduction=loss_reduction,
      custom_loss_fn=None,
      default_loss=poisson_loss,
      inverse_link_fn=jnp.exp,
      label_rule=base.LabelRule(
          integer=False,
          ok=lambda labels: (labels >= 0) & jnp.isfinite(labels),
          message="finite and non-negative (counts)",
          convert=lambda labels, dtype: labels.astype(dtype),
      ),
      static_options=(bool(compute_full_loss),),
      logits_check=_exp_overflow_checks,
  )


def logistic_regression_head(
    *,
    name: str | None = None,
    weight_column: str | Callable[[Any], Any] | None = None,
    missing_label: float | int | None = None,
    mask_column: str | Callable[[Any], Any] | None = None,
    loss_reduction: str | base.LossReduction = "sum_over_batch_size",
) -> base.Head:
  """A head regressing a value in [0, 1] with sigmoid cross-entropy (TF's `LogisticRegressionHead`).

  Unlike the binary classification head, it reports regression metrics and
  predicts `predictions = sigmoid(logits)` (and `logits`).

  Args:
    name: the head's name.
    weight_column: a features key holding example weights, or a callable.
    missing_label: a label value that marks a missing label (`float("nan")`
      matches NaN; e.g. -1 for class ids), or None. A missing label is as if
      that element were not in the batch: it adds nothing to the loss, its
      gradient or the statistics, and no reduction counts it.
    mask_column: a features key (or a callable `features -> mask`) of a
      boolean `[D0, ..., DN]` mask; rows where it is False are absent, as
      missing labels are. Pads a remainder batch to a fixed size exactly.
    loss_reduction: one of `jheads.LossReduction`.

  Returns:
    A `jheads.Head`.

  Example:
    >>> import jax.numpy as jnp, jheads
    >>> head = jheads.logistic_regression_head()
    >>> logits = jnp.array([[0.0], [-1.0], [1.0]])
    >>> labels = jnp.array([[0.4], [0.6], [0.8]])
    >>> round(float(head.loss_fn(logits, labels)), 6)
    0.706557
  """
  return _regression(
      LOGISTIC,
      label_dimension=1,
      name=name,
      weight_column=weight_column,
      missing_label=missing_label,
      mask_column=mask_column,
      loss_reduction=loss_reduction,
      custom_loss_fn=None,
      default_loss=lambda batch: base.sigmoid_cross_entropy(batch.logits, batch.labels),
      inverse_link_fn=base.sigmoid,
      label_rule=base.LabelRule(
          integer=False,
          ok=lambda labels: (labels >= 0) & (labels <= 1),
          message="in [0, 1]",
          convert=lambda labels, dtype: labels.astype(dtype),
      ),
  )


def _squared_error(batch: base.Batch) -> jax.Array:
  return optax.losses.squared_error(batch.logits, batch.labels)


def _exp_overflow_checks(logits: Any) -> dict[str, checks.ValueCheck]:
  dtype = base.compute_dtype(logits.dtype)
  bound = float(np.log(np.finfo(dtype).max))
  return {
      f"logits must be below {bound:.4g}: exp(logits) overflows {dtype}": checks.ValueCheck(
          jnp.all(jnp.asarray(logits, dtype) < bound)
      )
  }


def _regression(
    kind: str,
    *,
    label_dimension: Any,
    name: str | None,
    weight_column: Any,
    missing_label: Any,
    mask_column: Any,
    loss_reduction: Any,
    custom_loss_fn: Callable[..., Any] | None,
    default_loss: Callable[[base.Batch], jax.Array],
    inverse_link_fn: Callable[[jax.Array], jax.Array] | None,
    label_rule: base.LabelRule,
    static_options: tuple[Any, ...] = (),
    logits_check: Callable[[Any], dict[str, checks.ValueCheck]] | None = None,
) -> base.Head:
  name = checks.check_name(name, kind)
  where = base.describe(kind, name)
  if (
      not checks.is_integer(label_dimension)
      or label_dimension < 1
  ):
    raise ValueError(f"{where}: label_dimension must be an int >= 1, got {label_dimension!r}.")
  label_dimension = int(label_dimension)
  config = base.HeadConfig(
      kind=kind,
      name=name,
      logits_dim=label_dimension,
      loss_reduction=base.loss_reduction_from(loss_reduction, where),
      weight_column=weight_column,
      mask_column=checks.check_mask_column(where, mask_column),
      missing_label=checks.check_missing_label(where, missing_label),
  )

  def predictions(logits: jax.Array) -> dict[str, jax.Array]:
    if inverse_link_fn is None:
      return {"predictions": logits}
    return {"predictions": inverse_link_fn(logits), "logits": logits}

  def statistics(batch: base.Batch, losses: jax.Array) -> base.Stats:
    return {
        "average_loss": metrics.weighted_mean(losses, batch.weights),
        "prediction/mean": metrics.weighted_mean(
            predictions(batch.logits)["predictions"], batch.weights
        ),
        "label/mean": metrics.weighted_mean(batch.labels, batch.weights),
    }

  kernel = base.standard_kernel(
      config,
      label_dim=label_dimension,
      loss_dim=label_dimension,
      per_logit_weights=True,
      label_rule=label_rule,
      unreduced_loss=default_loss,
      statistics=statistics,
      predictions=predictions,
      custom_loss_fn=custom_loss_fn,
      static_options=(inverse_link_fn, *static_options),
      logits_check=logits_check,
  )
  return base.make_head(config, kernel)
