"""The public head API: a new kind of head from its math alone.

`define_head` takes what makes a head kind different (an unreduced loss,
additive statistics, predictions, what valid labels are, serving outputs)
and gives back a `jheads.Head` with everything built-in heads have: example
weights, the four loss reductions, masks and missing labels, value checks
(also under jit, in the step builders), grouping of like heads in
`multi_head`, `axis_name` for pmap and shard_map, streaming metrics and
export. The regression family (`regression_head`, `poisson_regression_head`,
`logistic_regression_head`) is defined with it; the other built-in heads
use the same kernel builder, `jheads.base.standard_kernel`.

Example: a quantile (pinball loss) regression head with coverage metrics.

  >>> import jax.numpy as jnp, jheads
  >>> def quantile_head(quantiles=(0.1, 0.5, 0.9), **options):
  ...   def loss(logits, labels):               # [..., k] logits, [..., 1] labels
  ...     q, error = jnp.asarray(quantiles), labels - logits
  ...     return jnp.mean(jnp.maximum(q * error, (q - 1) * error), -1, keepdims=True)
  ...   def statistics(batch, losses):
  ...     covered = (batch.labels <= batch.logits).astype(batch.weights.dtype)
  ...     return {"average_loss": jheads.metrics.weighted_mean(losses, batch.weights),
  ...             **{f"coverage@{p:g}": jheads.metrics.weighted_mean(
  ...                    covered[..., i:i + 1], batch.weights)
  ...                for i, p in enumerate(quantiles)}}
  ...   return jheads.define_head(
  ...       "quantile_regression", logits_dim=len(quantiles), loss=loss,
  ...       statistics=statistics, predictions=lambda logits: {"quantiles": logits},
  ...       **options)
  >>> head = quantile_head(name="dwell", missing_label=float("nan"))
  >>> logits = jnp.array([[0.0, 1.0, 2.0], [0.0, 1.0, 2.0]])
  >>> labels = jnp.array([1.5, jnp.nan])      # the second label is missing
  >>> round(float(head.loss_fn(logits, labels)), 4)  # (0.15 + 0.25 + 0.05) / 3
  0.15
  >>> values = jheads.metrics.compute(head.metric_fn(logits, labels))
  >>> float(values["coverage@0.1/dwell"]), float(values["coverage@0.9/dwell"])
  (0.0, 1.0)
"""

from __future__ import annotations

import math
from collections.abc import Callable, Hashable, Mapping
from typing import Any

import jax
import jax.numpy as jnp

from jheads import base
from jheads import checks
from jheads import metrics

ArrayLike = jax.typing.ArrayLike

FLOAT_LABELS = base.LabelRule(
    integer=False,
    ok=jnp.isfinite,
    message="finite numbers",
    convert=lambda labels, dtype: labels.astype(dtype),
)
"""Float labels, any finite value (the default of `define_head`)."""


def define_head(
    kind: str,
    *,
    logits_dim: int,
    loss: Callable[[jax.Array, jax.Array], jax.Array],
    predictions: Callable[[jax.Array], dict[str, jax.Array]],
    statistics: Callable[[base.Batch, jax.Array], base.Stats] | None = None,
    label_dim: int = 1,
    loss_dim: int = 1,
    labels: base.LabelRule = FLOAT_LABELS,
    serving: Callable[[Mapping[str, jax.Array]], dict[str, dict[str, jax.Array]]] | None = None,
    options: Hashable = (),
    name: str | None = None,
    weight_column: str | Callable[[Any], Any] | None = None,
    mask_column: str | Callable[[Any], Any] | None = None,
    missing_label: float | int | None = None,
    loss_reduction: str | base.LossReduction = "sum_over_batch_size",
    per_logit_weights: bool = False,
    n_classes: int | None = None,
    label_vocabulary: tuple[str, ...] | list[str] | None = None,
    thresholds: tuple[float, ...] = (),
    loss_fn: Callable[..., Any] | None = None,
    logits_checks: Callable[[jax.Array], dict[str, checks.ValueCheck]] | None = None,
) -> base.Head:
  """A head of a new kind, from its math alone.

  The math sees checked inputs in float32 (or wider), with every absent
  element (masked out, or a missing label) already replaced by safe values
  (logits and labels 0) and given weight 0: it never needs to know about
  masks, weights or reductions.

  Args:
    kind: the kind's name, e.g. ``"quantile_regression"``; names the head in
      errors (`quantile_regression_head`) and in its config.
    logits_dim: size of the last axis of the logits.
    loss: `(logits, labels) -> [D0, ..., DN, loss_dim]`, the unreduced loss.
      Logits are `[D0, ..., DN, logits_dim]`, labels `[D0, ..., DN,
      label_dim]` (converted by `labels.convert`).
    predictions: `logits -> dict` of arrays; pure and vmappable.
    statistics: `(batch, losses) -> dict` of additive statistics
      (`jheads.metrics.Ratio` and friends, or any pytree whose leaves add up
      over batches and whose values have a `result()`), from a
      `jheads.base.Batch` (`logits`, `labels`, `weights`, the last already
      0 where absent) and the unreduced losses. Defaults to `average_loss`.
    label_dim: last dimension of the labels (labels of a head with
      `label_dim == 1` may drop it).
    loss_dim: last dimension of the unreduced loss.
    labels: a `jheads.base.LabelRule`: dtype, which values are valid (checked
      on present labels only) and the conversion. Default: finite floats.
    serving: `predictions -> {signature: {output: array}}`, the serving
      signatures `jheads.export` writes (the first is the default); None
      serves the predictions as `predict` and the first prediction as
      `serving_default`.
    options: static options that change the computation beyond what the
      functions capture; heads of one kind with equal options, functions and
      input shapes are evaluated as one vectorized computation in a
      multi_head.
    name: the head's name.
    weight_column: a features key (or callable) of example weights,
      `[D0..DN]`, `[D0..DN, 1]` (or `[D0..DN, loss_dim]` with
      `per_logit_weights`).
    mask_column: a features key (or callable) of a boolean row mask.
    missing_label: the label value that marks a missing label (NaN allowed).
    loss_reduction: one of `jheads.LossReduction`.
    per_logit_weights: whether weights may be given per loss element.
    n_classes: the number of classes, for a classification kind (class
      names, `encode_labels`).
    label_vocabulary: class names of a classification kind.
    thresholds: decision thresholds the kind's statistics use.
    loss_fn: a user's own unreduced loss `loss_fn(labels, logits[,
      features])` replacing `loss`, as every built-in head offers; heads with
      one are never grouped.
    logits_checks: `logits -> {problem: jheads.checks.ValueCheck}`, value
      checks on logits beyond finiteness (pure and vmappable), e.g. an
      `exp` that would overflow.

  Returns:
    A `jheads.Head`.
  """
  if not isinstance(kind, str) or not kind:
    raise ValueError(f"define_head: kind must be a non-empty string, got {kind!r}.")
  name = checks.check_name(name, kind)
  where = base.describe(kind, name)
  for arg, value in (("logits_dim", logits_dim), ("label_dim", label_dim), ("loss_dim", loss_dim)):
    if not checks.is_integer(value) or value < 1:
      raise ValueError(f"{where}: {arg} must be an int >= 1, got {value!r}.")
  for arg, fn in (("loss", loss), ("predictions", predictions)):
    if not callable(fn):
      raise TypeError(f"{where}: {arg} must be callable, got {type(fn).__name__}.")
  config = base.HeadConfig(
      kind=kind,
      name=name,
      logits_dim=int(logits_dim),
      n_classes=None if n_classes is None else int(n_classes),
      label_vocabulary=(
          None if label_vocabulary is None
          else checks.check_vocabulary(where, label_vocabulary, int(n_classes or 0))
      ),
      thresholds=tuple(thresholds),
      loss_reduction=base.loss_reduction_from(loss_reduction, where),
      weight_column=weight_column,
      mask_column=checks.check_mask_column(where, mask_column),
      missing_label=checks.check_missing_label(where, missing_label, integer=labels.integer),
      serving=serving,
  )

  def unreduced_loss(batch: base.Batch) -> jax.Array:
    return loss(batch.logits, batch.labels)

  def default_statistics(batch: base.Batch, losses: jax.Array) -> base.Stats:
    return {"average_loss": metrics.weighted_mean(losses, batch.weights)}

  kernel = base.standard_kernel(
      config,
      label_dim=int(label_dim),
      loss_dim=int(loss_dim),
      per_logit_weights=per_logit_weights,
      label_rule=labels,
      unreduced_loss=unreduced_loss,
      statistics=statistics or default_statistics,
      predictions=predictions,
      custom_loss_fn=loss_fn,
      logits_check=logits_checks,
      static_options=(
          options,
          function_key(loss),
          function_key(statistics),
          function_key(predictions),
          function_key(serving),
          function_key(logits_checks),
      ),
  )
  return base.make_head(config, kernel)


def function_key(fn: Any) -> Hashable:
  """A key equal for functions that compute the same thing: same code, same captured values.

  Heads built by one factory call with equal arguments get closures with the
  same code and equal captured values, so they can be grouped; a captured
  value that is not hashable (an array) keys by identity.
  """
  if fn is None:
    return None
  code = getattr(fn, "__code__", None)
  if code is None:
    return _hashable(fn)
  cells = tuple(_hashable(cell.cell_contents) for cell in fn.__closure__ or ())
  defaults = tuple(_hashable(d) for d in fn.__defaults__ or ())
  return (code, cells, defaults)


def _hashable(value: Any) -> Hashable:
  if callable(value) and hasattr(value, "__code__"):
    return function_key(value)
  if isinstance(value, float) and math.isnan(value):
    return ("nan",)
  if isinstance(value, (tuple, list)):
    return (type(value).__name__, tuple(_hashable(v) for v in value))
  try:
    hash(value)
  except TypeError:
    return ("id", id(value))
  return value
