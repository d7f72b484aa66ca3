"""Binary classification: sigmoid cross-entropy on labels in [0, 1]."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Callable

import jax
import jax.numpy as jnp

from jheads import base
from jheads import checks
from jheads import metrics as metrics_lib

KIND = "binary_classification"


def binary_classification_head(
    *,
    name: str | None = None,
    weight_column: str | Callable[[Any], Any] | None = None,
    missing_label: float | int | None = None,
    mask_column: str | Callable[[Any], Any] | None = None,
    thresholds: Any = None,
    label_vocabulary: list[str] | tuple[str, ...] | None = None,
    loss_reduction: str | base.LossReduction = "sum_over_batch_size",
    loss_fn: Callable[..., Any] | None = None,
    num_thresholds: int = metrics_lib.DEFAULT_NUM_THRESHOLDS,
    summation_method: str = metrics_lib.INTERPOLATION,
    metrics: Sequence[str] | None = None,
) -> base.Head:
  """A head for single-label binary classification (TF's `BinaryClassHead`).

  Logits are `[D0, ..., DN, 1]`; labels `[D0, ..., DN, 1]` or `[D0, ..., DN]`,
  floats in [0, 1] (soft labels allowed), or class ids from
  `jheads.encode_labels` when the head has a vocabulary.

  Metrics (the default, TF's): `average_loss`, `accuracy`, `precision`,
  `recall`, `prediction/mean`, `label/mean`, `accuracy_baseline`, `auc`,
  `auc_precision_recall`, and per threshold t of `thresholds`
  `accuracy/positive_threshold_<t>`, `precision/...` and `recall/...`.
  Decisions (accuracy, precision, recall) are `logits > 0`.

  `metrics=` chooses the keys instead, from those names and:

  * `normalized_entropy`: the weighted mean sigmoid cross-entropy divided by
    the binary entropy of the weighted mean label (1 is the base rate's
    score; lower is better); from the logits, also with a custom `loss_fn`;
  * `calibration`: weighted mean probability / weighted mean label;
  * `ece`: expected calibration error over 10 equal-width probability bins,
    weighted, or `ece@<bins>` over another count (bin b holds
    probabilities in `(b/B, (b+1)/B]`);
  * `accuracy/positive_threshold_<t>` (and `precision/...`, `recall/...`)
    for any t in (0, 1), written as `%g` prints it.

  Only the chosen metrics are computed: without an AUC no histogram is
  built, without `ece` no bins.

  Predictions: `logits`, `logistic`, `probabilities` (`[1 - p, p]`),
  `class_ids`, `all_class_ids`.

  Differences from TensorFlow: `all_class_ids` is `[D0, ..., DN, 2]` for any
  rank (TF tiles over the first axis only); non-finite inputs and labels
  outside [0, 1] raise instead of producing NaN.

  Args:
    name: the head's name; suffixes metric keys and is required in a multi_head.
    weight_column: a key of the features dict holding example weights
      (`[D0..DN]` or `[D0..DN, 1]`), or a callable `features -> weights`.
    thresholds: extra decision thresholds in (0, 1) for accuracy, precision
      and recall.
    label_vocabulary: two class names; labels are then given as strings and
      mapped to ids on the host by `jheads.encode_labels`.
    missing_label: a label value that marks a missing label (`float("nan")`
      matches NaN; e.g. -1 for class ids), or None. A missing label is as if
      that element were not in the batch: it adds nothing to the loss, its
      gradient or the statistics, and no reduction counts it.
    mask_column: a features key (or a callable `features -> mask`) of a
      boolean `[D0, ..., DN]` mask; rows where it is False are absent, as
      missing labels are. Pads a remainder batch to a fixed size exactly.
    loss_reduction: one of `jheads.LossReduction`.
    loss_fn: a custom unreduced loss `loss_fn(labels, logits[, features])`
      returning `[D0, ..., DN, 1]`; labels arrive as floats.
    num_thresholds: number of thresholds of the AUC curves.
    summation_method: how the PR curve is integrated: ``"interpolation"``
      (TF 2, default) or ``"trapezoidal"`` (TF 1).
    metrics: the metric keys to report (see above), or None for TF's set.
      With `metrics`, `thresholds` must be None: name the threshold
      metrics in `metrics`.

  Returns:
    A `jheads.Head`.

  Example:
    >>> import jax.numpy as jnp, jheads
    >>> head = jheads.binary_classification_head()
    >>> logits = jnp.array([[45.0], [-41.0]])
    >>> labels = jnp.array([[1.0], [1.0]])
    >>> float(head.loss_fn(logits, labels))  # (0 + 41) / 2
    20.5
    >>> stats = head.metric_fn(logits, labels)
    >>> float(jheads.metrics.compute(stats)["accuracy"])
    0.5
    >>> chosen = jheads.binary_classification_head(metrics=["calibration", "ece"])
    >>> values = jheads.metrics.compute(chosen.metric_fn(logits, labels))
    >>> sorted(values), round(float(values["calibration"]), 4)  # (1 + 0) / 2 / 1
    (['calibration', 'ece'], 0.5)
  """
  name = checks.check_name(name, KIND)
  where = base.describe(KIND, name)
  specs = _choose(where, metrics, thresholds)
  if metrics is not None:
    thresholds = tuple(dict.fromkeys(s.arg for s in specs if s.form == "threshold"))
  config = base.HeadConfig(
      kind=KIND,
      name=name,
      logits_dim=1,
      n_classes=2,
      label_vocabulary=checks.check_vocabulary(where, label_vocabulary, 2),
      thresholds=checks.check_thresholds(where, thresholds),
      loss_reduction=base.loss_reduction_from(loss_reduction, where),
      weight_column=weight_column,
      mask_column=checks.check_mask_column(where, mask_column),
      missing_label=checks.check_missing_label(where, missing_label),
  )
  num_thresholds = checks.check_num_thresholds(where, num_thresholds)
  summation_method = metrics_lib.check_summation_method(where, summation_method)

  def unreduced_loss(batch: base.Batch) -> jax.Array:
    return base.sigmoid_cross_entropy(batch.logits, batch.labels)

  if specs is None:
    specs = _default_specs(config.thresholds)

  def statistics(batch: base.Batch, losses: jax.Array) -> base.Stats:
    logits, labels, weights = batch.logits, batch.labels, batch.weights
    shared = metrics_lib.Lazy(
        logistic=lambda: base.sigmoid(logits),
        auc=lambda: metrics_lib.auc_pair(
            metrics_lib.auc_histogram(
                shared.logistic, labels, weights, num_thresholds=num_thresholds
            ),
            summation_method,
        ),
        label_sum=lambda: jnp.sum(weights * labels),
        weight_sum=lambda: jnp.sum(weights),
        # The log loss of the logits, whatever loss the head trains with.
        cross_entropy=lambda: (
            losses if loss_fn is None else base.sigmoid_cross_entropy(logits, labels)
        ),
    )

    def statistic(spec: metrics_lib.MetricSpec) -> Any:
      metric = spec.metric
      if spec.form == "threshold":
        return metrics_lib.decision_metric(
            metric, shared.logistic > spec.arg, labels, weights
        )
      if spec.form == "at":  # ece@<bins>
        return metrics_lib.calibration_error(shared.logistic, labels, weights, bins=spec.arg)
      if metric == "average_loss":
        return metrics_lib.weighted_mean(losses, weights)
      if metric in metrics_lib.DECISION_METRICS:
        # class_ids are 1 exactly when logits > 0 (argmax of [0, logits]).
        return metrics_lib.decision_metric(metric, logits > 0, labels, weights)
      if metric == "prediction/mean":
        return metrics_lib.weighted_mean(shared.logistic, weights)
      if metric == "label/mean":
        return metrics_lib.Ratio(shared.label_sum, shared.weight_sum)
      if metric == "accuracy_baseline":
        return metrics_lib.Baseline(shared.label_sum, shared.weight_sum)
      if metric == "auc":
        return shared.auc[0]
      if metric == "auc_precision_recall":
        return shared.auc[1]
      if metric == "normalized_entropy":
        return metrics_lib.NormalizedEntropy(
            jnp.sum(weights * shared.cross_entropy), shared.label_sum, shared.weight_sum
        )
      if metric == "calibration":
        return metrics_lib.Ratio(jnp.sum(weights * shared.logistic), shared.label_sum)
      raise AssertionError(metric)

    return {spec.key: statistic(spec) for spec in specs}

  kernel = base.standard_kernel(
      config,
      label_dim=1,
      loss_dim=1,
      per_logit_weights=False,
      label_rule=base.LabelRule(
          integer=False,
          ok=lambda labels: (labels >= 0) & (labels <= 1),
          message="in [0, 1]",
          convert=lambda labels, dtype: labels.astype(dtype),
      ),
      unreduced_loss=unreduced_loss,
      statistics=statistics,
      predictions=predictions,
      custom_loss_fn=loss_fn,
      static_options=(num_thresholds, summation_method, specs),
  )
  return base.make_head(config, kernel)


def predictions(logits: jax.Array) -> dict[str, jax.Array]:
  """Binary predictions of `[D0, ..., DN, 1]` logits."""
  two_class_logits = jnp.concatenate([jnp.zeros_like(logits), logits], axis=-1)
  return {
      "logits": logits,
      "logistic": base.sigmoid(logits),
      "probabilities": jax.nn.softmax(two_class_logits, axis=-1),
      "class_ids": (logits > 0).astype(jnp.int32),
      "all_class_ids": jnp.broadcast_to(
          jnp.arange(2, dtype=jnp.int32), two_class_logits.shape
      ),
  }


PLAIN_METRICS = (
    "average_loss",
    "accuracy",
    "precision",
    "recall",
    "prediction/mean",
    "label/mean",
    "accuracy_baseline",
    "auc",
    "auc_precision_recall",
    "normalized_entropy",
    "calibration",
)
"""Metric names a binary head takes as they are; also `ece[@<bins>]` and threshold metrics_lib."""

DEFAULT_METRICS = PLAIN_METRICS[:9]
"""TF's `BinaryClassHead` metrics, before the threshold metrics_lib."""


def _choose(where: str, chosen: Any, thresholds: Any) -> tuple[metrics_lib.MetricSpec, ...] | None:
  if chosen is None:
    return None
  metrics_lib.check_exclusive(
      where, chosen, "thresholds", thresholds, "precision/positive_threshold_0.7"
  )
  return metrics_lib.choose_metrics(
      where,
      chosen,
      plain=PLAIN_METRICS,
      at={"ece": metrics_lib.AtMetric("bins", bare=metrics_lib.DEFAULT_CALIBRATION_BINS)},
      thresholded=metrics_lib.DECISION_METRICS,
  )


def _default_specs(thresholds: tuple[float, ...]) -> tuple[metrics_lib.MetricSpec, ...]:
  """TF's keys, in TF's order."""
  specs = [metrics_lib.MetricSpec(key, key) for key in DEFAULT_METRICS]
  for threshold in thresholds:
    for metric in metrics_lib.DECISION_METRICS:
      specs.append(
          metrics_lib.MetricSpec(
              metrics_lib.threshold_key(metric, threshold), metric, "threshold", threshold
          )
      )
  return tuple(specs)
