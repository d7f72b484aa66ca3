"""Metrics as additive sufficient statistics.

Every Estimator metric is a ratio of weighted sums: a weighted mean is
(sum of w * x, sum of w); accuracy, precision and recall are ratios of
confusion counts; an AUC is read off weighted label counts per threshold
bucket. A head's `metric_fn` returns a flat dict of such statistics, so:

* two batches merge with `merge`, a sum of every leaf;
* devices merge with `jax.lax.psum`, or with nothing at all under sharded jit;
* `compute` is the only place that divides.

Each statistic type carries its finalizing rule (which ratio, which AUC
summation) as static pytree metadata, so `compute` needs nothing but the stats.

Example:
  >>> import jax.numpy as jnp, jheads
  >>> head = jheads.binary_classification_head()
  >>> logits, labels = jnp.array([[2.0], [-1.0]]), jnp.array([[1.0], [1.0]])
  >>> first = head.metric_fn(logits[:1], labels[:1])
  >>> second = head.metric_fn(logits[1:], labels[1:])
  >>> float(jheads.metrics.compute(jheads.metrics.merge(first, second))["accuracy"])
  0.5
"""

from __future__ import annotations

import dataclasses
import operator
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jheads import base
from jheads import checks

ArrayLike = jax.typing.ArrayLike

DEFAULT_NUM_THRESHOLDS = 200
"""Number of AUC thresholds, as in TF 2's `tf.keras.metrics.AUC`."""

INTERPOLATION = "interpolation"
TRAPEZOIDAL = "trapezoidal"
SUMMATION_METHODS = (INTERPOLATION, TRAPEZOIDAL)

# TF 1's tf.metrics.auc adds this to its precision and recall ratios.
_TF1_EPSILON = 1e-7

# One scatter-add accumulates sequentially: in float32 a bucket stops
# counting at 2**24. Histograms of more predictions are built in chunks.
_HISTOGRAM_CHUNK = 2**20


def _xp(*values: Any) -> Any:
  """numpy for statistics merged on the host (float64), jax.numpy otherwise."""
  if all(isinstance(v, (np.ndarray, np.generic)) for v in values):
    return np
  return jnp


def _divide(xp: Any, numerator: Any, denominator: Any) -> Any:
  if xp is jnp:
    return base.safe_divide(numerator, denominator)
  with np.errstate(divide="ignore", invalid="ignore"):
    return np.where(denominator == 0, 0.0, numerator / np.where(denominator == 0, 1.0, denominator))


def _reverse_cumsum(xp: Any, x: Any) -> Any:
  if xp is jnp:
    return jax.lax.cumsum(x, axis=x.ndim - 1, reverse=True)
  return np.flip(np.cumsum(np.flip(x, -1), -1), -1)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Ratio:
  """`numerator / denominator`, 0 when the denominator is 0.

  Weighted means (average loss, label and prediction means), accuracies,
  precision and recall are all ratios of weighted sums.
  """

  numerator: jax.Array
  denominator: jax.Array

  def result(self) -> jax.Array:
    return _divide(_xp(self.numerator, self.denominator), self.numerator, self.denominator)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Baseline:
  """Accuracy of always predicting the majority class: `max(m, 1 - m)`.

  `m = label_sum / weight_sum` is the weighted mean of binary labels.
  """

  label_sum: jax.Array
  weight_sum: jax.Array

  def result(self) -> jax.Array:
    xp = _xp(self.label_sum, self.weight_sum)
    mean = _divide(xp, self.label_sum, self.weight_sum)
    return xp.where(self.weight_sum == 0, 0.0, xp.maximum(mean, 1.0 - mean))


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class AUC:
  """Area under the ROC or precision-recall curve, from bucketed label weights.

  Thresholds are `[0 - eps, 1/(T-1), ..., (T-2)/(T-1), 1 + eps]` and a
  prediction is positive at a threshold when it exceeds it.
  `positives[i]` and `negatives[i]` hold the weight of positive and negative
  labels whose prediction is positive at threshold i but not at i + 1, so
  reverse cumulative sums give the confusion counts at every threshold.

  Attributes:
    positives: `[T]` weighted positive labels per bucket.
    negatives: `[T]` weighted negative labels per bucket.
    curve: ``"ROC"`` or ``"PR"``.
    summation_method: ``"interpolation"`` (TF 2 and Keras: trapezoids for
      ROC, Davis-Goadrich interpolation for PR) or ``"trapezoidal"`` (TF 1's
      `tf.metrics.auc`: trapezoids over epsilon-smoothed rates for both).
  """

  positives: jax.Array
  negatives: jax.Array
  curve: str = dataclasses.field(default="ROC", metadata=dict(static=True))
  summation_method: str = dataclasses.field(
      default=INTERPOLATION, metadata=dict(static=True)
  )

  def confusion(self) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
    """True/false positives and negatives at each threshold."""
    xp = _xp(self.positives, self.negatives)
    tp = _reverse_cumsum(xp, self.positives)
    fp = _reverse_cumsum(xp, self.negatives)
    fn = tp[..., :1] - tp
    tn = fp[..., :1] - fp
    return tp, fp, tn, fn

  def result(self) -> jax.Array:
    xp = _xp(self.positives, self.negatives)
    tp, fp, tn, fn = self.confusion()
    if self.summation_method == TRAPEZOIDAL:
      # TF 1's tf.metrics.auc: epsilon-smoothed rates, trapezoids for both curves.
      recall = (tp + _TF1_EPSILON) / (tp + fn + _TF1_EPSILON)
      if self.curve == "ROC":
        x, y = fp / (fp + tn + _TF1_EPSILON), recall
      else:
        x, y = recall, (tp + _TF1_EPSILON) / (tp + fp + _TF1_EPSILON)
    elif self.curve == "ROC":
      x = _divide(xp, fp, fp + tn)
      y = _divide(xp, tp, tp + fn)
    else:
      return _interpolated_pr_auc(xp, tp, fp, fn)
    heights = (y[..., :-1] + y[..., 1:]) / 2.0
    return xp.sum((x[..., :-1] - x[..., 1:]) * heights, axis=-1)


def _interpolated_pr_auc(xp: Any, tp: Any, fp: Any, fn: Any) -> Any:
  """Davis & Goadrich (2006) interpolation of the PR curve between thresholds.

  Within a bucket, precision is taken to vary as the number of predicted
  positives P varies linearly; the area integrates that exactly.
  """
  dtp = tp[..., :-1] - tp[..., 1:]
  p = tp + fp
  dp = p[..., :-1] - p[..., 1:]
  slope = _divide(xp, dtp, xp.maximum(dp, 0))
  intercept = tp[..., 1:] - slope * p[..., 1:]
  both_positive = (p[..., :-1] > 0) & (p[..., 1:] > 0)
  p_ratio = xp.where(
      both_positive, _divide(xp, p[..., :-1], xp.maximum(p[..., 1:], 0)), 1.0
  )
  increments = _divide(
      xp,
      slope * (dtp + intercept * xp.log(p_ratio)),
      xp.maximum(tp[..., 1:] + fn[..., 1:], 0),
  )
  return xp.sum(increments, axis=-1)


def merge(a: Any, b: Any) -> Any:
  """Merges two stats pytrees of the same structure: a sum of every leaf.

  This is also what `jax.lax.psum` of stats across devices computes. On the
  host (concrete statistics, as an eval loop holds them) the sum is taken
  in float64 numpy after one transfer of each side, so streamed counts stay
  exact far beyond float32's 2**24 (to 2**53), and no small device op is
  dispatched per leaf (which can deadlock a multi-process CPU run waiting on
  a cross-process all-reduce). Under a trace it is a plain device sum.

  Example:
    >>> import numpy as np, jheads
    >>> a = {"n": jheads.metrics.Ratio(np.float32(2.0**24), np.float32(1.0))}
    >>> float(jheads.metrics.merge(a, a)["n"].numerator - 2.0**25)
    0.0
  """
  a, b = _checked(a), _checked(b)
  if checks.is_concrete(a, b):
    return jax.tree.map(operator.add, _to_host(a), _to_host(b))
  return jax.tree.map(operator.add, a, b)


def compute(stats: Mapping[str, Any]) -> dict[str, Any]:
  """Final metric values from a flat dict of statistics, keys unchanged.

  Statistics on the host are finished in float64 numpy; traced ones on
  the device.
  """
  stats = _checked(stats)
  if checks.is_concrete(stats):
    stats = _to_host(stats)
  return {key: stat.result() for key, stat in stats.items()}


def _checked(stats: Any) -> Any:
  """Raises the value checks carried by a step's outputs; the plain statistics."""
  if isinstance(stats, checks.CheckedDict):
    stats.check()
    return dict(stats)
  return stats


def _to_host(stats: Any) -> Any:
  """One transfer of every leaf, floats widened to float64."""
  def widen(x):
    x = np.asarray(x)
    return x.astype(np.float64) if x.dtype.kind == "f" else x

  return jax.tree.map(widen, jax.device_get(stats))


# ----------------------------------------------------------------------------
# Building statistics from a batch.


def weighted_mean(values: jax.Array, weights: jax.Array) -> Ratio:
  """`sum(w * values) / sum(w)`, the weights broadcast to `values`."""
  weights = jnp.broadcast_to(weights, values.shape)
  return Ratio(jnp.sum(weights * values), jnp.sum(weights))


def binary_decisions(
    predicted: jax.Array, labels: jax.Array, weights: jax.Array
) -> dict[str, Ratio]:
  """Accuracy, precision and recall of boolean predictions.

  Args:
    predicted: boolean predictions.
    labels: labels in [0, 1]; non-zero is positive for precision and recall,
      while accuracy requires an exact match (a soft 0.8 never matches 1).
    weights: example weights broadcast to `predicted`.
  """
  predicted_float = predicted.astype(weights.dtype)
  positive = (labels != 0).astype(weights.dtype)
  true_positives = jnp.sum(weights * predicted_float * positive)
  return {
      "accuracy": weighted_mean((labels == predicted_float).astype(weights.dtype), weights),
      "precision": Ratio(true_positives, jnp.sum(weights * predicted_float)),
      "recall": Ratio(true_positives, jnp.sum(weights * positive)),
  }


def threshold_key(metric: str, threshold: float) -> str:
  """`accuracy/positive_threshold_0.5`: the threshold printed with `%g`."""
  return f"{metric}/positive_threshold_{threshold:g}"


def at_thresholds(
    probabilities: jax.Array,
    labels: jax.Array,
    weights: jax.Array,
    thresholds: tuple[float, ...],
) -> dict[str, Ratio]:
  """Accuracy, precision and recall of `probabilities > t` for each threshold."""
  stats = {}
  for threshold in thresholds:
    decisions = binary_decisions(probabilities > threshold, labels, weights)
    for metric, ratio in decisions.items():
      stats[threshold_key(metric, threshold)] = ratio
  return stats


def _replicated_out_sharding(index: jax.Array) -> Any:
  """Explicit-axis sharding cannot infer where a scatter's result lives; say replicated."""
  spec = getattr(jax.typeof(index).sharding, "spec", ())
  if any(axis is not None for axis in spec):
    return jax.sharding.PartitionSpec()
  return None


def auc_histogram(
    predictions: jax.Array,
    labels: jax.Array,
    weights: jax.Array,
    *,
    num_thresholds: int,
    per_column: bool = False,
) -> jax.Array:
  """Weighted positive and negative labels per threshold bucket, in O(N + T).

  A prediction `p` falls in bucket `max(ceil(p * (T - 1)) - 1, 0)`: the
  thresholds it exceeds are exactly those up to its bucket. One scatter-add
  builds the histogram; no `[N, T]` comparison is ever formed.

  Args:
    predictions: probabilities, any shape (clipped to [0, 1]).
    labels: same shape; non-zero is positive.
    weights: same shape.
    num_thresholds: T.
    per_column: keep the last axis apart (one histogram per class).

  Returns:
    `[2, T]` (positives, negatives), or `[n, 2, T]` with `per_column`.
  """
  t = num_thresholds
  scaled = jnp.clip(predictions, 0.0, 1.0) * (t - 1)
  bucket = jnp.maximum(jnp.ceil(scaled) - 1, 0).astype(jnp.int32)
  index = bucket + t * (labels == 0).astype(jnp.int32)
  size = 2 * t
  if per_column:
    n = predictions.shape[-1]
    index = index + size * jnp.arange(n, dtype=jnp.int32)
    size *= n
  histogram = _scatter_add(index, jnp.broadcast_to(weights, index.shape), size)
  return histogram.reshape((-1, 2, t) if per_column else (2, t))


def _scatter_add(index: jax.Array, weights: jax.Array, size: int) -> jax.Array:
  """`zeros(size).at[index].add(weights)`, exact in float32 however many predictions."""
  index, weights = index.reshape(-1), weights.reshape(-1)
  n = index.size
  if n <= _HISTOGRAM_CHUNK:
    return jnp.zeros((size,), weights.dtype).at[index].add(
        weights, mode="promise_in_bounds", out_sharding=_replicated_out_sharding(index)
    )
  chunks = -(-n // _HISTOGRAM_CHUNK)
  pad = chunks * _HISTOGRAM_CHUNK - n
  index = jnp.pad(index, (0, pad)).reshape(chunks, _HISTOGRAM_CHUNK)
  weights = jnp.pad(weights, (0, pad)).reshape(chunks, _HISTOGRAM_CHUNK)
  partial = jax.vmap(
      lambda i, w: jnp.zeros((size,), w.dtype).at[i].add(w, mode="promise_in_bounds")
  )(index, weights)
  return jnp.sum(partial, axis=0)


def auc_pair(
    histogram: jax.Array, summation_method: str
) -> tuple[AUC, AUC]:
  """The ROC and PR AUC statistics of one `[2, T]` histogram."""
  positives, negatives = histogram[..., 0, :], histogram[..., 1, :]
  return (
      AUC(positives, negatives, "ROC", summation_method),
      AUC(positives, negatives, "PR", summation_method),
  )


def check_summation_method(where: str, summation_method: str) -> str:
  if summation_method not in SUMMATION_METHODS:
    raise ValueError(
        f"{where}: summation_method must be one of {SUMMATION_METHODS},"
        f" got {summation_method!r}."
    )
  return summation_method
