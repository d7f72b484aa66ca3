"""Multi-label classification: independent sigmoid cross-entropy per class."""

from __future__ import annotations

import operator
from typing import Any, Callable

import jax
import jax.numpy as jnp

from jheads import base
from jheads import checks
from jheads import metrics

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
    num_thresholds: int = metrics.DEFAULT_NUM_THRESHOLDS,
    summation_method: str = metrics.INTERPOLATION,
) -> base.Head:
  """A head where each example may belong to any subset of n_classes (TF's `MultiLabelHead`).

  Logits are `[D0, ..., DN, n_classes]`; labels are a 0/1 indicator of the
  same shape. With a vocabulary, `jheads.encode_labels` turns per-example
  lists of class names into that indicator on the host.

  The unreduced loss is the sigmoid cross-entropy averaged over classes,
  `[D0, ..., DN, 1]`, so `sum_over_batch_size` divides by the batch size,
  not by batch size x n_classes. Example weights are `[D0..DN]` or
  `[D0..DN, 1]`; there are no per-class weights.

  Metrics: `average_loss`, `auc`, `auc_precision_recall` (every
  (example, class) cell pooled into one curve); per threshold t
  `accuracy/positive_threshold_<t>`, `precision/...`, `recall/...`; per
  class c of `classes_for_class_based_metrics`: `probability_mean/class<c>`,
  `auc/class<c>`, `auc_precision_recall/class<c>` (the class name instead of
  `class<c>` with a vocabulary).

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

  Returns:
    A `jheads.Head`.

  Example:
    >>> import jax.numpy as jnp, jheads
    >>> head = jheads.multi_label_head(2)
    >>> logits = jnp.array([[-1.0, 1.0], [-1.5, 1.5]])
    >>> labels = jnp.array([[1, 0], [1, 1]])
    >>> round(float(head.loss_fn(logits, labels)), 5)
    1.13234
  """
  if not checks.is_integer(n_classes):
    raise ValueError(f"multi_label_head: n_classes must be an int >= 2, got {n_classes!r}.")
  if n_classes < 2:
    raise ValueError(f"multi_label_head: n_classes must be >= 2, got {n_classes}.")
  n_classes = int(n_classes)
  name = checks.check_name(name, KIND)
  where = base.describe(KIND, name)
  vocabulary = checks.check_vocabulary(where, label_vocabulary, n_classes)
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
  summation_method = metrics.check_summation_method(where, summation_method)
  class_ids = _class_ids(where, classes_for_class_based_metrics, n_classes, vocabulary)
  class_keys = tuple(
      f"class{c}" if vocabulary is None else vocabulary[c] for c in class_ids
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
    probabilities = base.sigmoid(batch.logits)
    cell_weights = jnp.broadcast_to(batch.weights, probabilities.shape)
    if batch.label_present is not None:
      cell_weights = jnp.where(batch.label_present, cell_weights, 0)
    auc, auc_pr = metrics.auc_pair(
        metrics.auc_histogram(
            probabilities, batch.labels, cell_weights, num_thresholds=num_thresholds
        ),
        summation_method,
    )
    stats = {
        "average_loss": metrics.weighted_mean(losses, batch.weights),
        "auc": auc,
        "auc_precision_recall": auc_pr,
        **metrics.at_thresholds(
            probabilities, batch.labels, cell_weights, config.thresholds
        ),
    }
    if class_ids:
      columns = jnp.asarray(class_ids)
      class_probabilities = probabilities[..., columns]
      per_class = metrics.auc_histogram(
          class_probabilities,
          batch.labels[..., columns],
          cell_weights[..., columns],
          num_thresholds=num_thresholds,
          per_column=True,
      )
      for i, key in enumerate(class_keys):
        class_auc, class_auc_pr = metrics.auc_pair(per_class[i], summation_method)
        stats[f"probability_mean/{key}"] = metrics.weighted_mean(
            class_probabilities[..., i : i + 1], cell_weights[..., class_ids[i] : class_ids[i] + 1]
        )
        stats[f"auc/{key}"] = class_auc
        stats[f"auc_precision_recall/{key}"] = class_auc_pr
    return stats

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
      static_options=(num_thresholds, summation_method, class_ids, class_keys),
  )
  return base.make_head(config, kernel)


def predictions(logits: jax.Array) -> dict[str, jax.Array]:
  """Multi-label predictions of `[D0, ..., DN, n]` logits."""
  return {"logits": logits, "probabilities": base.sigmoid(logits)}


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
