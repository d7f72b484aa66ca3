"""Regression heads: squared error, Poisson, and logistic regression.

Poisson and logistic regression are regression with another loss and an
inverse link (`exp` and `sigmoid`), as in TensorFlow.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jheads import base
from jheads import checks
from jheads import define
from jheads import metrics as metrics_lib

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
    metrics: Sequence[str] | None = None,
) -> base.Head:
  """A head for regression with squared error (TF's `RegressionHead`).

  Logits and labels are `[D0, ..., DN, label_dimension]` (labels may drop
  the last axis when it is 1). Weights are `[D0..DN]`, `[D0..DN, 1]` or per
  logit `[D0..DN, label_dimension]`.

  Metrics (the default, TF's): `average_loss`, `prediction/mean`,
  `label/mean` (weighted means over every element). `metrics=` chooses the
  keys instead, from those names and, of the predictions against the
  labels, per label dimension and averaged over the dimensions as
  scikit-learn's default `multioutput="uniform_average"`:

  * `mae`: weighted mean absolute error;
  * `rmse`: root of the weighted mean squared error;
  * `r2`: the coefficient of determination (see `jheads.metrics.RSquared`);
  * `mape`: weighted mean of `|error| / max(|y|, 2.2e-16)`, a fraction.

  All stream and psum exactly; only the chosen ones are computed.

  Predictions: `predictions` (`inverse_link_fn(logits)`, or the logits),
  plus `logits` when there is an inverse link.

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
    metrics: the metric keys to report, or None for TF's set.

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
    >>> chosen = jheads.regression_head(weight_column="w", metrics=["mae", "rmse"])
    >>> values = jheads.metrics.compute(chosen.metric_fn(logits, labels, features))
    >>> round(float(values["mae"]), 4), round(float(values["rmse"]), 4)  # / 2.6
    (4.4615, 6.2512)
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
      metrics=metrics,
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
    metrics: Sequence[str] | None = None,
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
    metrics: the metric keys to report (as `regression_head`'s, of the
      predicted rates), or None for TF's set.

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
      metrics=metrics,
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
    metrics: Sequence[str] | None = None,
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
    metrics: the metric keys to report (as `regression_head`'s, of the
      predicted probabilities), or None for TF's set.

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
      metrics=metrics,
      label_rule=base.LabelRule(
          integer=False,
          ok=lambda labels: (labels >= 0) & (labels <= 1),
          message="in [0, 1]",
          convert=lambda labels, dtype: labels.astype(dtype),
      ),
  )


DEFAULT_METRICS = ("average_loss", "prediction/mean", "label/mean")
"""TF's regression metrics."""

REGRESSION_METRICS = ("mae", "rmse", "r2", "mape")
"""Metrics on request, of the predictions (`inverse_link_fn(logits)`) against the labels.

Each is computed per label dimension (with that dimension's weights; a
missing label weighs 0) and averaged over the dimensions that have weight,
as scikit-learn's default `multioutput="uniform_average"`:

* ``"mae"``: weighted mean absolute error;
* ``"rmse"``: the square root of the weighted mean squared error;
* ``"r2"``: the coefficient of determination, `1 - SSE / SST`, from
  weighted sums of y, y^2 and the squared error (see `metrics.RSquared`);
* ``"mape"``: weighted mean of `|error| / max(|y|, 2.2e-16)`, a fraction
  (not percent), as scikit-learn's `mean_absolute_percentage_error`.
"""

PLAIN_METRICS = DEFAULT_METRICS + REGRESSION_METRICS
"""Every metric name a regression head takes."""


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
    metrics: Sequence[str] | None,
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

  def predictions(logits: jax.Array) -> dict[str, jax.Array]:
    if inverse_link_fn is None:
      return {"predictions": logits}
    return {"predictions": inverse_link_fn(logits), "logits": logits}

  if metrics is None:
    specs = tuple(metrics_lib.MetricSpec(key, key) for key in DEFAULT_METRICS)
  else:
    specs = metrics_lib.choose_metrics(where, metrics, plain=PLAIN_METRICS)

  def statistics(batch: base.Batch, losses: jax.Array) -> base.Stats:
    labels, weights = batch.labels, batch.weights
    shared = metrics_lib.Lazy(
        predictions=lambda: predictions(batch.logits)["predictions"]
    )

    def statistic(spec: metrics_lib.MetricSpec) -> Any:
      if spec.metric == "average_loss":
        return metrics_lib.weighted_mean(losses, weights)
      if spec.metric == "prediction/mean":
        return metrics_lib.weighted_mean(shared.predictions, weights)
      if spec.metric == "label/mean":
        return metrics_lib.weighted_mean(labels, weights)
      return metrics_lib.regression_statistic(
          spec.metric, shared.predictions, labels, weights
      )

    return {spec.key: statistic(spec) for spec in specs}

  # The regression family is defined through the public head API.
  return define.define_head(
      kind,
      logits_dim=label_dimension,
      loss=lambda logits, labels: default_loss(base.Batch(logits, labels, None)),
      predictions=predictions,
      statistics=statistics,
      label_dim=label_dimension,
      loss_dim=label_dimension,
      labels=label_rule,
      options=(inverse_link_fn, specs, *static_options),
      name=name,
      weight_column=weight_column,
      mask_column=mask_column,
      missing_label=missing_label,
      loss_reduction=loss_reduction,
      per_logit_weights=True,
      loss_fn=custom_loss_fn,
      logits_checks=logits_check,
  )
