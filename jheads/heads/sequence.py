"""Sequence heads: any head applied per time step, with a mask of the real steps.

The successor of TF 2's `SequentialHeadWrapper`. TF flattened the unmasked
steps with `tf.boolean_mask` and ran the wrapped head on them; here the
wrapped head runs on the whole `[B, T, ...]` batch and the mask makes the
padded steps absent, through the same mechanism as every head's
`mask_column`: their values are never read, and every reduction and
statistic equals that of the flattened real steps, with static shapes.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import numpy as np

from jheads import base
from jheads import checks
from jheads import combinator

DEFAULT_MASK_COLUMN = "sequence_length_mask"


def sequence_head(
    head: base.Head | combinator.MultiHead,
    *,
    mask_column: str | Callable[[Any], Any] = DEFAULT_MASK_COLUMN,
    name: str | None = None,
) -> base.Head | combinator.MultiHead:
  """A head over sequences: `head` at every step, padded steps masked out.

  Logits are `[B, T, D2, ..., DN, d]` (rank >= 3) and labels as `head` takes
  them for those logits; `features[mask_column]` is a `[B, T]` bool (or 0/1)
  mask of the real steps. Masked-out steps are as if they were not in the
  batch: their logits, labels and weights are never read (any value,
  NaN included, is fine there), they add nothing to the loss, its gradient
  or the statistics, and `sum_over_batch_size` divides by the number of
  unmasked steps, as TF's flattening did. A batch with every step masked
  gives loss 0 and empty statistics.

  Predictions are the wrapped head's on every step (there is no mask at
  prediction time). Metric keys, `loss_reduction`, vocabulary and serving
  outputs are the wrapped head's.

  Differences from TensorFlow: the name stays the wrapped head's (TF
  appended `_sequential`); a `MultiHead` is accepted, as a multi_head of
  sequence heads; regression heads predict (TF's wrapper raised a
  `TypeError` on them); the mask must hold 0/1 only.

  Args:
    head: a jheads head, or a multi_head (each of its heads is wrapped).
    mask_column: a features key or a callable `features -> [B, T] mask`.
    name: the sequence head's name; defaults to the wrapped head's.

  Returns:
    A `jheads.Head` (a `MultiHead` for a multi_head).

  Example:
    >>> import jax.numpy as jnp, jheads
    >>> head = jheads.sequence_head(jheads.regression_head(name="dwell"))
    >>> logits = jnp.array([[[1.0], [2.0]], [[3.0], [99.0]]])   # [B=2, T=2, 1]
    >>> labels = jnp.zeros((2, 2))
    >>> mask = jnp.array([[True, True], [True, False]])
    >>> float(head.loss_fn(logits, labels, {"sequence_length_mask": mask}))  # (1 + 4 + 9) / 3
    4.666...
  """
  if isinstance(head, combinator.MultiHead):
    if name is not None:
      raise ValueError("sequence_head: name applies to one head; a multi_head keeps its heads' names.")
    return combinator.multi_head(
        [sequence_head(h, mask_column=mask_column) for h in head.heads],
        list(head.head_weights),
    )
  if not isinstance(head, base.Head):
    raise ValueError(f"sequence_head: head must be a jheads head, got {type(head).__name__}.")
  inner = head.kernel
  name = head.name if name is None else checks.check_name(name, head.config.kind)
  config = _with(head.config, name=name)
  where = config.description
  if not (callable(mask_column) or (isinstance(mask_column, str) and mask_column)):
    raise ValueError(
        f"{where}: sequence_head's mask_column must be a features key (a string)"
        f" or a callable features -> mask, got {mask_column!r}."
    )
  config = _with(config, mask_column=mask_column)

  def get_weights(features):
    row_weights = inner.get_weights(features)
    steps = checks.fetch_mask(where, features, mask_column)
    own = row_weights.mask
    if own is not None:
      shape = max(np.shape(own), np.shape(steps), key=len)
      steps = base.broadcast_mask(own, shape) & base.broadcast_mask(steps, shape)
    return row_weights._replace(mask=steps)

  def check_sequence_shapes(logits, row_weights):
    shape = tuple(np.shape(checks.as_array(logits)))
    if len(shape) < 3:
      raise ValueError(
          f"{where}: sequence logits must be [B, T, ..., d] (rank >= 3), got"
          f" shape {shape}."
      )
    mask = row_weights.mask
    if np.ndim(mask) < 2 or tuple(np.shape(mask)[:2]) != shape[:2]:
      raise ValueError(
          f"{where}: the sequence mask must be [B, T] = {list(shape[:2])}, got"
          f" shape {tuple(np.shape(mask))}."
      )

  def validate(logits, labels, row_weights):
    check_sequence_shapes(logits, row_weights)
    inner.validate(logits, labels, row_weights)

  kernel = inner._replace(get_weights=get_weights, validate=validate)
  return base.make_head(config, kernel)


def _with(config: base.HeadConfig, **changes: Any) -> base.HeadConfig:
  return dataclasses.replace(config, **changes)
