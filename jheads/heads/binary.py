"""Binary classification: sigmoid cross-entropy on labels in [0, 1]."""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp

from jheads import base
from jheads import checks
from jheads import metrics

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
    num_thresholds: int = metrics.DEFAULT_NUM_THRESHOLDS,
    summation_method: str = metrics.INTERPOLATION,
) -> base.Head:
  """A head for single-label binary classification (TF's `BinaryClassHead`).

  Logits are `[D0, ..., DN, 1]`; labels `[D0, ..., DN, 1]` or `[D0, ..., DN]`,
  floats in [0, 1] (soft labels allowed), or class ids from
  `jheads.encode_labels` when the head has a vocabulary.

  Metrics: `average_loss`, `accuracy`, `precision`, `recall`,
  `prediction/mean`, `label/mean`, `accuracy_baseline`, `auc`,
  `auc_precision_recall`, and per threshold t `accuracy/positive_threshold_<t>`,
  `precision/...` and `recall/...`.

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
  """
  name = checks.check_name(name, KIND)
  where = base.describe(KIND, name)
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
  summation_method = metrics.check_summation_method(where, summation_method)

  def unreduced_loss(batch: base.Batch) -> jax.Array:
    return base.sigmoid_cross_entropy(batch.logits, batch.labels)

  def statistics(batch: base.Batch, losses: jax.Array) -> base.Stats:
    logits, labels, weights = batch.logits, batch.labels, batch.weights
    logistic = base.sigmoid(logits)
    auc, auc_pr = metrics.auc_pair(
        metrics.auc_histogram(
            logistic, labels, weights, num_thresholds=num_thresholds
        ),
        summation_method,
    )
    label_sum, weight_sum = jnp.sum(weights * labels), jnp.sum(weights)
    return {
        "average_loss": metrics.weighted_mean(losses, weights),
        # class_ids are 1 exactly when logits > 0 (argmax of [0, logits]).
        **metrics.binary_decisions(logits > 0, labels, weights),
        "prediction/mean": metrics.weighted_mean(logistic, weights),
        "label/mean": metrics.Ratio(label_sum, weight_sum),
        "accuracy_baseline": metrics.Baseline(label_sum, weight_sum),
        "auc": auc,
        "auc_precision_recall": auc_pr,
        **metrics.at_thresholds(logistic, labels, weights, config.thresholds),
    }

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
      static_options=(num_thresholds, summation_method),
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
