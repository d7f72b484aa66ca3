"""Multi-label classification: independent sigmoid cross-entropy per class."""

from __future__ import annotations

import operator
from collections.abc import Sequence
from typing import Any, Callable

import jax
import jax.numpy as jnp

from jheads import base
from jheads import checks
from jheads import metrics as metrics_lib

KIND = "multi_label"


def multi_label_head(
    n_classes: int,
    *,
    name: str | None = None,
    weight_column: str | Callable[[Any], Any] | None = None,
    missing_label: float | int | None = None,
    mask_column: str | Callable[[Any], Any] | None = None,
    thresholds: Any = None,
    label_vocabulary: list[str] | tuple[str, ...] | None = None,
    loss_reduction: str | base.LossReduction = "sum_over_batch_size",
    loss_fn: Callable[..., Any] | None = None,
    classes_for_class_based_metrics: Any = None,
    num_thresholds: int = metrics_lib.DEFAULT_NUM_THRESHOLDS,
    summation_method: str = metrics_lib.INTERPOLATION,
    metrics: Sequence[str] | None = None,
) -> base.Head:
  """A head where each example may belong to any subset of n_classes (TF's `MultiLabelHead`).

  Logits are `[D0, ..., DN, n_classes]`; labels are a 0/1 indicator of the
  same shape. With a vocabulary, `jheads.encode_labels` turns per-example
  lists of class names into that indicator on the host.

  The unreduced loss is the sigmoid cross-entropy averaged over classes,
  `[D0, ..., DN, 1]`, so `sum_over_batch_size` divides by the batch size,
  not by batch size x n_classes. Example weights are `[D0..DN]` or
  `[D0..DN, 1]`; there are no per-class weights.

  Metrics (the default, TF's): `average_loss`, `auc`,
  `auc_precision_recall` (every (example, class) cell pooled into one
  curve); per threshold t `accuracy/positive_threshold_<t>`,
  `precision/...`, `recall/...`; per class c of
  `classes_for_class_based_metrics`: `probability_mean/class<c>`,
  `auc/class<c>`, `auc_precision_recall/class<c>` (the class name instead of
  `class<c>` with a vocabulary).

  `metrics=` chooses the keys instead, from those names (per-class ones for
  any class, threshold ones for any t in (0, 1) written as `%g` prints it)
  and:

  * `precision/class<c>` and `recall/class<c>` of the decision
    `probability > 0.5` for class c;
  * `f1_macro`: the per-class F1 at 0.5 averaged over the classes that
    occur (with weight, in the labels or the decisions); `f1_weighted`:
    averaged by each class' weight of positive labels.

  Only the chosen metrics are computed: per-class histograms only for the
  classes whose AUCs are asked for, none without an AUC.

  Predictions: `logits`, `probabilities`.

  Differences from TensorFlow: labels must be exactly 0 or 1 (TF accepted
  any value in [0, 1]).

  Args:
    n_classes: number of classes, >= 2.
    name: the head's name; suffixes metric keys and is required in a multi_head.
    weight_column: a features key holding example weights, or a callable
      `features -> weights`.
    thresholds: extra decision thresholds in (0, 1).
    label_vocabulary: n_classes class names.
    missing_label: a label value that marks a missing label (`float("nan")`
      matches NaN; e.g. -1 for class ids), or None. A missing label is as if
      that element were not in the batch: it adds nothing to the loss, its
      gradient or the statistics, and no reduction counts it.
    mask_column: a features key (or a callable `features -> mask`) of a
      boolean `[D0, ..., DN]` mask; rows where it is False are absent, as
      missing labels are. Pads a remainder batch to a fixed size exactly.
    loss_reduction: one of `jheads.LossReduction`.
    loss_fn: a custom unreduced loss `loss_fn(labels, logits[, features])`
      returning `[D0, ..., DN, 1]`; labels arrive as a float indicator.
    classes_for_class_based_metrics: class ids, or names from the vocabulary,
      to report per-class metrics for.
    num_thresholds: number of thresholds of the AUC curves.
    summation_method: PR-AUC integration, ``"interpolation"`` (TF 2) or
      ``"trapezoidal"`` (TF 1).
    metrics: the metric keys to report (see above), or None for TF's set.
      With `metrics`, `thresholds` and `classes_for_class_based_metrics`
      must be None: name those metrics in `metrics`.

  Returns:
    A `jheads.Head`.

  Example:
    >>> import jax.numpy as jnp, jheads
    >>> head = jheads.multi_label_head(2)
    >>> logits = jnp.array([[-1.0, 1.0], [-1.5, 1.5]])
    >>> labels = jnp.array([[1, 0], [1, 1]])
    >>> round(float(head.loss_fn(logits, labels)), 5)
    1.13234
    >>> chosen = jheads.multi_label_head(2, metrics=["recall/class0", "f1_macro"])
    >>> values = jheads.metrics.compute(chosen.metric_fn(logits, labels))
    >>> float(values["recall/class0"]), round(float(values["f1_macro"]), 4)
    (0.0, 0.3333)
  """
  if not checks.is_integer(n_classes):
    raise ValueError(f"multi_label_head: n_classes must be an int >= 2, got {n_classes!r}.")
  if n_classes < 2:
    raise ValueError(f"multi_label_head: n_classes must be >= 2, got {n_classes}.")
  n_classes = int(n_classes)
  name = checks.check_name(name, KIND)
  where = base.describe(KIND, name)
  vocabulary = checks.check_vocabulary(where, label_vocabulary, n_classes)
  if metrics is None:
    specs = None
  else:
    metrics_lib.check_exclusive(
        where, metrics, "thresholds", thresholds, "precision/positive_threshold_0.7"
    )
    metrics_lib.check_exclusive(
        where,
        metrics,
        "classes_for_class_based_metrics",
        classes_for_class_based_metrics,
        metrics_lib.class_metric_key("auc", 0, vocabulary),
    )
    specs = metrics_lib.choose_metrics(
        where,
        metrics,
        plain=PLAIN_METRICS,
        thresholded=metrics_lib.DECISION_METRICS,
        per_class=PER_CLASS_METRICS,
        n_classes=n_classes,
        vocabulary=vocabulary,
    )
    thresholds = tuple(dict.fromkeys(s.arg for s in specs if s.form == "threshold"))
  config = base.HeadConfig(
      kind=KIND,
      name=name,
      logits_dim=n_classes,
      n_classes=n_classes,
      label_vocabulary=vocabulary,
      thresholds=checks.check_thresholds(where, thresholds),
      loss_reduction=base.loss_reduction_from(loss_reduction, where),
      weight_column=weight_column,
      mask_column=checks.check_mask_column(where, mask_column),
      missing_label=checks.check_missing_label(where, missing_label),
  )
  num_thresholds = checks.check_num_thresholds(where, num_thresholds)
  summation_method = metrics_lib.check_summation_method(where, summation_method)
  if specs is None:
    class_ids = _class_ids(where, classes_for_class_based_metrics, n_classes, vocabulary)
    specs = _default_specs(config.thresholds, class_ids, vocabulary)
  class_specs = [spec for spec in specs if spec.form == "class"]
  # Columns of the per-class histograms, and of the confusion counts (all
  # classes for F1).
  auc_columns = tuple(dict.fromkeys(
      s.arg for s in class_specs if s.metric in ("auc", "auc_precision_recall")
  ))
  count_columns = (
      tuple(range(n_classes))
      if any(s.metric.startswith("f1_") for s in specs)
      else tuple(dict.fromkeys(
          s.arg for s in class_specs if s.metric in metrics_lib.DECISION_METRICS
      ))
  )

  def unreduced_loss(batch: base.Batch) -> jax.Array:
    losses = base.sigmoid_cross_entropy(batch.logits, batch.labels)
    if batch.label_present is None:
      return jnp.mean(losses, axis=-1, keepdims=True)
    # The mean over the classes whose label is present.
    present = batch.label_present.astype(losses.dtype)
    count = jnp.sum(present, axis=-1, keepdims=True)
    return base.safe_divide(jnp.sum(losses * present, axis=-1, keepdims=True), count)

  def statistics(batch: base.Batch, losses: jax.Array) -> base.Stats:
    labels = batch.labels

    def cell_weights():
      weights = jnp.broadcast_to(batch.weights, labels.shape)
      if batch.label_present is not None:
        weights = jnp.where(batch.label_present, weights, 0)
      return weights

    def counts():
      columns = jnp.asarray(count_columns)
      return metrics_lib.confusion_counts(
          shared.probabilities[..., columns] > 0.5,
          labels[..., columns] != 0,
          shared.cell_weights[..., columns],
      )

    def class_histograms():
      columns = jnp.asarray(auc_columns)
      return metrics_lib.auc_histogram(
          shared.probabilities[..., columns],
          labels[..., columns],
          shared.cell_weights[..., columns],
          num_thresholds=num_thresholds,
          per_column=True,
      )

    shared = metrics_lib.Lazy(
        probabilities=lambda: base.sigmoid(batch.logits),
        cell_weights=cell_weights,
        auc=lambda: metrics_lib.auc_pair(
            metrics_lib.auc_histogram(
                shared.probabilities,
                labels,
                shared.cell_weights,
                num_thresholds=num_thresholds,
            ),
            summation_method,
        ),
        counts=counts,
        class_histograms=class_histograms,
    )

    def statistic(spec: metrics_lib.MetricSpec) -> Any:
      metric = spec.metric
      if spec.form == "threshold":
        return metrics_lib.decision_metric(
            metric, shared.probabilities > spec.arg, labels, shared.cell_weights
        )
      if spec.form == "class":
        c = spec.arg
        if metric == "probability_mean":
          return metrics_lib.weighted_mean(
              shared.probabilities[..., c : c + 1], shared.cell_weights[..., c : c + 1]
          )
        if metric in metrics_lib.DECISION_METRICS:
          true_positives, predicted, actual = shared.counts
          i = count_columns.index(c)
          denominator = predicted if metric == "precision" else actual
          return metrics_lib.Ratio(true_positives[i], denominator[i])
        pair = metrics_lib.auc_pair(
            shared.class_histograms[auc_columns.index(c)], summation_method
        )
        return pair[0] if metric == "auc" else pair[1]
      if metric == "average_loss":
        return metrics_lib.weighted_mean(losses, batch.weights)
      if metric == "auc":
        return shared.auc[0]
      if metric == "auc_precision_recall":
        return shared.auc[1]
      average = metrics_lib.MACRO if metric == "f1_macro" else metrics_lib.WEIGHTED
      return metrics_lib.F1(*shared.counts, average)

    return {spec.key: statistic(spec) for spec in specs}

  kernel = base.standard_kernel(
      config,
      label_dim=n_classes,
      loss_dim=1,
      per_logit_weights=False,
      label_rule=base.LabelRule(
          integer=False,
          ok=lambda labels: (labels == 0) | (labels == 1),
          message="a 0/1 indicator of shape [D0, ..., DN, n_classes]",
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
  """Multi-label predictions of `[D0, ..., DN, n]` logits."""
  return {"logits": logits, "probabilities": base.sigmoid(logits)}


PLAIN_METRICS = ("average_loss", "auc", "auc_precision_recall", "f1_macro", "f1_weighted")
"""Metric names a multi-label head takes as they are; also threshold and per-class metrics."""

PER_CLASS_METRICS = (
    "probability_mean",
    "auc",
    "auc_precision_recall",
    "precision",
    "recall",
)
"""Metrics written `"<metric>/class<c>"` (`"<metric>/<name>"` with a vocabulary)."""


def _default_specs(
    thresholds: tuple[float, ...],
    class_ids: tuple[int, ...],
    vocabulary: tuple[str, ...] | None,
) -> tuple[metrics_lib.MetricSpec, ...]:
  """TF's keys, in TF's order."""
  specs = [
      metrics_lib.MetricSpec(key, key)
      for key in ("average_loss", "auc", "auc_precision_recall")
  ]
  for threshold in thresholds:
    for metric in metrics_lib.DECISION_METRICS:
      specs.append(
          metrics_lib.MetricSpec(
              metrics_lib.threshold_key(metric, threshold), metric, "threshold", threshold
          )
      )
  for c in class_ids:
    for metric in ("probability_mean", "auc", "auc_precision_recall"):
      specs.append(
          metrics_lib.MetricSpec(
              metrics_lib.class_metric_key(metric, c, vocabulary), metric, "class", c
          )
      )
  return tuple(specs)


def _class_ids(
    where: str,
    classes: Any,
    n_classes: int,
    vocabulary: tuple[str, ...] | None,
) -> tuple[int, ...]:
  """Resolves classes_for_class_based_metrics to class ids."""
  if classes is None:
    return ()
  if isinstance(classes, (str, int)):
    classes = [classes]
  ids = []
  for cls in classes:
    if isinstance(cls, str):
      if vocabulary is None:
        raise ValueError(
            f"{where}: classes_for_class_based_metrics has class name {cls!r}"
            " but the head has no label_vocabulary."
        )
      if cls not in vocabulary:
        raise ValueError(
            f"{where}: classes_for_class_based_metrics has {cls!r}, which is"
            f" not in label_vocabulary {list(vocabulary)}."
        )
      ids.append(vocabulary.index(cls))
    elif isinstance(cls, bool) or not hasattr(cls, "__index__"):
      raise ValueError(
          f"{where}: classes_for_class_based_metrics must hold class ids or"
          f" names, got {cls!r}."
      )
    else:
      cls = operator.index(cls)
      if not 0 <= cls < n_classes:
        raise ValueError(
            f"{where}: classes_for_class_based_metrics must be in [0,"
            f" {n_classes}), got {cls}."
        )
      ids.append(cls)
  return tuple(ids)
