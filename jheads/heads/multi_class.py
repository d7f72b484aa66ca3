"""Multi-class classification: softmax cross-entropy on integer class ids."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax

from jheads import base
from jheads import checks
from jheads import metrics as metrics_lib

KIND = "multi_class"


def multi_class_head(
    n_classes: int,
    *,
    name: str | None = None,
    weight_column: str | Callable[[Any], Any] | None = None,
    missing_label: float | int | None = None,
    mask_column: str | Callable[[Any], Any] | None = None,
    label_vocabulary: list[str] | tuple[str, ...] | None = None,
    loss_reduction: str | base.LossReduction = "sum_over_batch_size",
    loss_fn: Callable[..., Any] | None = None,
    metrics: Sequence[str] | None = None,
) -> base.Head:
  """A head for single-label classification over n_classes > 2 (TF's `MultiClassHead`).

  Logits are `[D0, ..., DN, n_classes]`; labels are integer class ids in
  `[0, n_classes)`, shaped `[D0, ..., DN, 1]` or `[D0, ..., DN]`.

  Metrics (the default, TF's): `average_loss`, `accuracy`. `metrics=`
  chooses the keys instead, from those names and:

  * `accuracy@<k>`: top-k accuracy, the weight of the elements whose label
    is among the k largest logits (ties go to the lower class id, as
    `argmax` breaks them, so `accuracy@1` is `accuracy`), k < n_classes;
  * `precision/class<c>` and `recall/class<c>` of the predicted class
    (`class_ids`), `precision/<name>` and `recall/<name>` with a
    vocabulary;
  * `f1_macro`: per-class F1 averaged over the classes that occur (with
    weight, in the labels or the predictions), as scikit-learn's
    `f1_score(average="macro")`; `f1_weighted`: averaged by support.

  All are ratios of additive sums (per-class confusion counts for F1), so
  they stream and psum exactly; only the chosen ones are computed.

  Predictions: `logits`, `probabilities`, `class_ids`, `all_class_ids`.

  Differences from TensorFlow: `all_class_ids` is `[D0, ..., DN, n_classes]`
  for any rank (TF tiles over the first axis only).

  Args:
    n_classes: number of classes, > 2 (use `binary_classification_head` for 2).
    name: the head's name; suffixes metric keys and is required in a multi_head.
    weight_column: a features key holding example weights (`[D0..DN]` or
      `[D0..DN, 1]`), or a callable `features -> weights`.
    label_vocabulary: n_classes class names; string labels are mapped to ids
      on the host by `jheads.encode_labels`.
    missing_label: a label value that marks a missing label (`float("nan")`
      matches NaN; e.g. -1 for class ids), or None. A missing label is as if
      that element were not in the batch: it adds nothing to the loss, its
      gradient or the statistics, and no reduction counts it.
    mask_column: a features key (or a callable `features -> mask`) of a
      boolean `[D0, ..., DN]` mask; rows where it is False are absent, as
      missing labels are. Pads a remainder batch to a fixed size exactly.
    loss_reduction: one of `jheads.LossReduction`.
    loss_fn: a custom unreduced loss `loss_fn(labels, logits[, features])`
      returning `[D0, ..., DN, 1]`; labels arrive as int32 ids `[D0..DN, 1]`.
    metrics: the metric keys to report (see above), or None for TF's set.

  Returns:
    A `jheads.Head`.

  Example:
    >>> import jax.numpy as jnp, jheads
    >>> head = jheads.multi_class_head(3)
    >>> logits = jnp.array([[10.0, 0.0, 0.0], [0.0, 10.0, 0.0]])
    >>> labels = jnp.array([0, 2])
    >>> round(float(head.loss_fn(logits, labels)), 3)  # (0 + 10) / 2
    5.0
    >>> head.predict_fn(logits)["class_ids"].tolist()
    [[0], [1]]
    >>> chosen = jheads.multi_class_head(3, metrics=["accuracy@2", "recall/class2"])
    >>> values = jheads.metrics.compute(chosen.metric_fn(logits, labels))
    >>> float(values["accuracy@2"]), float(values["recall/class2"])
    (0.5, 0.0)
  """
  if not checks.is_integer(n_classes):
    raise ValueError(f"multi_class_head: n_classes must be an int > 2, got {n_classes!r}.")
  if n_classes <= 2:
    raise ValueError(
        f"multi_class_head: n_classes must be > 2, got {n_classes}; use"
        " binary_classification_head for two classes."
    )
  n_classes = int(n_classes)
  name = checks.check_name(name, KIND)
  where = base.describe(KIND, name)
  config = base.HeadConfig(
      kind=KIND,
      name=name,
      logits_dim=n_classes,
      n_classes=n_classes,
      label_vocabulary=checks.check_vocabulary(where, label_vocabulary, n_classes),
      loss_reduction=base.loss_reduction_from(loss_reduction, where),
      weight_column=weight_column,
      mask_column=checks.check_mask_column(where, mask_column),
      missing_label=checks.check_missing_label(where, missing_label, integer=True),
  )

  def unreduced_loss(batch: base.Batch) -> jax.Array:
    losses = optax.losses.softmax_cross_entropy_with_integer_labels(
        batch.logits, batch.labels[..., 0]
    )
    return losses[..., None]

  specs = _choose(where, metrics, n_classes, config.label_vocabulary)
  # F1 needs every class' counts; per-class keys then read them too.
  full_counts = any(spec.metric.startswith("f1_") for spec in specs)
  count_columns = tuple(range(n_classes)) if full_counts else tuple(
      dict.fromkeys(spec.arg for spec in specs if spec.form == "class")
  )

  def statistics(batch: base.Batch, losses: jax.Array) -> base.Stats:
    labels, weights = batch.labels, batch.weights
    shared = metrics_lib.Lazy(
        class_ids=lambda: jnp.argmax(batch.logits, axis=-1, keepdims=True),
        counts=lambda: metrics_lib.confusion_counts(
            shared.class_ids == jnp.asarray(count_columns),
            labels == jnp.asarray(count_columns),
            weights,
        ),
    )

    def statistic(spec: metrics_lib.MetricSpec) -> Any:
      if spec.metric == "average_loss":
        return metrics_lib.weighted_mean(losses, weights)
      if spec.metric == "accuracy" and spec.form == "plain":
        correct = (shared.class_ids == labels).astype(weights.dtype)
        return metrics_lib.weighted_mean(correct, weights)
      if spec.metric == "accuracy":
        return metrics_lib.weighted_mean(
            top_k_hits(batch.logits, labels, spec.arg).astype(weights.dtype), weights
        )
      true_positives, predicted, actual = shared.counts
      if spec.form == "class":
        i = count_columns.index(spec.arg)
        denominator = predicted if spec.metric == "precision" else actual
        return metrics_lib.Ratio(true_positives[i], denominator[i])
      average = metrics_lib.MACRO if spec.metric == "f1_macro" else metrics_lib.WEIGHTED
      return metrics_lib.F1(true_positives, predicted, actual, average)

    return {spec.key: statistic(spec) for spec in specs}

  kernel = base.standard_kernel(
      config,
      label_dim=1,
      loss_dim=1,
      per_logit_weights=False,
      label_rule=base.LabelRule(
          integer=True,
          ok=lambda labels: (labels >= 0) & (labels < n_classes),
          message=f"class ids in [0, {n_classes})",
          convert=lambda labels, dtype: labels.astype(jnp.int32),
      ),
      unreduced_loss=unreduced_loss,
      statistics=statistics,
      predictions=predictions,
      custom_loss_fn=loss_fn,
      static_options=(specs,),
  )
  return base.make_head(config, kernel)


def predictions(logits: jax.Array) -> dict[str, jax.Array]:
  """Multi-class predictions of `[D0, ..., DN, n]` logits."""
  return {
      "logits": logits,
      "probabilities": jax.nn.softmax(logits, axis=-1),
      "class_ids": jnp.argmax(logits, axis=-1, keepdims=True).astype(jnp.int32),
      "all_class_ids": jnp.broadcast_to(
          jnp.arange(logits.shape[-1], dtype=jnp.int32), logits.shape
      ),
  }


def top_k_hits(logits: jax.Array, labels: jax.Array, k: int) -> jax.Array:
  """Whether each label is among the k largest logits, `[D0..DN, 1]` bool.

  The label's rank is the number of classes that beat it: larger logits,
  and equal logits of lower class ids (argmax's tie rule). One comparison
  per class; no sort.
  """
  label_logit = jnp.take_along_axis(logits, labels, axis=-1)
  classes = jnp.arange(logits.shape[-1], dtype=labels.dtype)
  beats = (logits > label_logit) | ((logits == label_logit) & (classes < labels))
  return jnp.sum(beats, axis=-1, keepdims=True) < k


PLAIN_METRICS = ("average_loss", "accuracy", "f1_macro", "f1_weighted")
"""Metric names a multi-class head takes as they are; also `accuracy@<k>` and per-class metrics."""

DEFAULT_METRICS = ("average_loss", "accuracy")
"""TF's `MultiClassHead` metrics."""


def _choose(
    where: str, chosen: Any, n_classes: int, vocabulary: tuple[str, ...] | None
) -> tuple[metrics_lib.MetricSpec, ...]:
  if chosen is None:
    return tuple(metrics_lib.MetricSpec(key, key) for key in DEFAULT_METRICS)
  return metrics_lib.choose_metrics(
      where,
      chosen,
      plain=PLAIN_METRICS,
      at={
          "accuracy": metrics_lib.AtMetric(
              "k", limit=n_classes, limit_reason="the number of classes"
          )
      },
      per_class=("precision", "recall"),
      n_classes=n_classes,
      vocabulary=vocabulary,
  )
