"""Multi-class classification: softmax cross-entropy on integer class ids."""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax

from jheads import base
from jheads import checks
from jheads import metrics

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
) -> base.Head:
  """A head for single-label classification over n_classes > 2 (TF's `MultiClassHead`).

  Logits are `[D0, ..., DN, n_classes]`; labels are integer class ids in
  `[0, n_classes)`, shaped `[D0, ..., DN, 1]` or `[D0, ..., DN]`.

  Metrics: `average_loss`, `accuracy`. Predictions: `logits`,
  `probabilities`, `class_ids`, `all_class_ids`.

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

  def statistics(batch: base.Batch, losses: jax.Array) -> base.Stats:
    class_ids = jnp.argmax(batch.logits, axis=-1, keepdims=True)
    correct = (class_ids == batch.labels).astype(batch.weights.dtype)
    return {
        "average_loss": metrics.weighted_mean(losses, batch.weights),
        "accuracy": metrics.weighted_mean(correct, batch.weights),
    }

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
