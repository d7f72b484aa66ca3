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
import functools
import math
import operator
import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple

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
  if hasattr(stats, "results"):  # stacked per group of like heads (jheads.stacked)
    return stats.results()
  return {key: stat.result() for key, stat in stats.items()}


def _checked(stats: Any) -> Any:
  """Raises the value checks carried by a step's outputs; the plain statistics."""
  if isinstance(stats, checks.CheckedDict):
    stats.check()
    return dict(stats)
  if getattr(stats, "errors", None) is not None and hasattr(stats, "with_errors"):
    return stats.check().with_errors(None)
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
  return {
      metric: decision_metric(metric, predicted, labels, weights)
      for metric in DECISION_METRICS
  }


DECISION_METRICS = ("accuracy", "precision", "recall")
"""The metrics of boolean decisions, in TF's order."""


def decision_metric(
    metric: str, predicted: jax.Array, labels: jax.Array, weights: jax.Array
) -> Ratio:
  """One of `DECISION_METRICS` of boolean predictions (see `binary_decisions`)."""
  predicted_float = predicted.astype(weights.dtype)
  if metric == "accuracy":
    return weighted_mean((labels == predicted_float).astype(weights.dtype), weights)
  positive = (labels != 0).astype(weights.dtype)
  true_positives = jnp.sum(weights * predicted_float * positive)
  if metric == "precision":
    return Ratio(true_positives, jnp.sum(weights * predicted_float))
  if metric == "recall":
    return Ratio(true_positives, jnp.sum(weights * positive))
  raise ValueError(f"decision_metric: unknown metric {metric!r}.")


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
    return _flat_scatter_add(size)(index, weights)
  chunks = -(-n // _HISTOGRAM_CHUNK)
  pad = chunks * _HISTOGRAM_CHUNK - n
  index = jnp.pad(index, (0, pad)).reshape(chunks, _HISTOGRAM_CHUNK)
  weights = jnp.pad(weights, (0, pad)).reshape(chunks, _HISTOGRAM_CHUNK)
  partial = jax.vmap(
      lambda i, w: jnp.zeros((size,), w.dtype).at[i].add(w, mode="promise_in_bounds")
  )(index, weights)
  return jnp.sum(partial, axis=0)


@functools.lru_cache(maxsize=None)
def _flat_scatter_add(size: int) -> Callable[[jax.Array, jax.Array], jax.Array]:
  """`(index, weights) -> zeros(size).at[index].add(weights)` of flat arrays, vmapped flat.

  Under `vmap` (a multi_head's group of like heads), G histograms are one
  flat scatter into `G * size` bins, each head's indices offset by its
  bins, as a hand-written stacked histogram does; `vmap`'s own batched
  scatter would first build a `[G * n, 2]` index of (head, bin) pairs,
  which cost more than the scatter.
  """

  def plain(index, weights):
    return jnp.zeros((size,), weights.dtype).at[index].add(
        weights, mode="promise_in_bounds", out_sharding=_replicated_out_sharding(index)
    )

  scatter_add = jax.custom_batching.custom_vmap(plain)

  @scatter_add.def_vmap
  def batched(axis_size, in_batched, index, weights):
    index, weights = (
        x if batched else jnp.broadcast_to(x, (axis_size,) + x.shape)
        for x, batched in zip((index, weights), in_batched)
    )
    if _replicated_out_sharding(index) is not None:
      # Sharded over explicit mesh axes: flattening would need a sharding of its own.
      return jax.vmap(plain)(index, weights), True
    offsets = size * jnp.arange(axis_size, dtype=index.dtype)[:, None]
    flat = _flat_scatter_add(axis_size * size)((index + offsets).reshape(-1), weights.reshape(-1))
    return flat.reshape(axis_size, size), True

  return scatter_add


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


# ----------------------------------------------------------------------------
# Statistics of the metrics a head reports on request (`metrics=`).


def _xlogx(xp: Any, x: Any) -> Any:
  """`x log x`, 0 at (and below) 0."""
  positive = x > 0
  return xp.where(positive, x * xp.log(xp.where(positive, x, 1.0)), 0.0)


def _mean_where(xp: Any, values: Any, counted: Any) -> Any:
  """The mean of `values` over the last axis where `counted`, 0 if none is."""
  counted_float = counted.astype(values.dtype)
  return _divide(
      xp, xp.sum(xp.where(counted, values, 0.0), axis=-1), xp.sum(counted_float, axis=-1)
  )


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class NormalizedEntropy:
  """Log loss over the entropy of the mean label (He et al., 2014), the recommender standard.

  `(loss_sum / weight_sum) / H(label_sum / weight_sum)` with the binary
  entropy `H(p) = -p log p - (1 - p) log(1 - p)` in nats: 1 is no better
  than always predicting the base rate, lower is better. 0 when the labels
  are all of one class (`H = 0`) or there is no weight.

  Attributes:
    loss_sum: weighted sum of the sigmoid cross-entropy.
    label_sum: weighted sum of the labels.
    weight_sum: sum of the weights.
  """

  loss_sum: jax.Array
  label_sum: jax.Array
  weight_sum: jax.Array

  def result(self) -> jax.Array:
    xp = _xp(self.loss_sum, self.label_sum, self.weight_sum)
    mean_loss = _divide(xp, self.loss_sum, self.weight_sum)
    p = _divide(xp, self.label_sum, self.weight_sum)
    entropy = -(_xlogx(xp, p) + _xlogx(xp, 1.0 - p))
    return _divide(xp, mean_loss, entropy)


DEFAULT_CALIBRATION_BINS = 10
"""Bins of `"ece"`; `"ece@<bins>"` chooses another count."""


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class CalibrationError:
  """Expected calibration error over equal-width probability bins.

  `sum_b |prediction_b - label_b| / sum_b weight_b`, which is
  `sum_b (W_b / W) |mean prediction_b - mean label_b|`: the weighted gap
  between confidence and frequency, bin by bin. Bin b of B holds the
  probabilities in `(b / B, (b + 1) / B]` (the first also holds 0), as
  scikit-learn's `calibration_curve(strategy="uniform")` bins them; the
  per-bin sums are a reliability diagram.

  Attributes:
    weight: `[B]` sum of the weights per bin.
    prediction: `[B]` weighted sum of the probabilities per bin.
    label: `[B]` weighted sum of the labels per bin.
  """

  weight: jax.Array
  prediction: jax.Array
  label: jax.Array

  def result(self) -> jax.Array:
    xp = _xp(self.weight, self.prediction, self.label)
    gap = xp.sum(xp.abs(self.prediction - self.label), axis=-1)
    return _divide(xp, gap, xp.sum(self.weight, axis=-1))


MACRO = "macro"
WEIGHTED = "weighted"


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class F1:
  """Macro or support-weighted F1 from per-class confusion counts.

  Per class, `F1_c = 2 tp_c / (predicted_c + actual_c)`. ``"macro"``
  averages it over the classes that occur, in the labels or the
  predictions (a class with no weight in either has no F1, and
  scikit-learn's `f1_score(average="macro")` leaves out such classes of a
  multi-class problem too); ``"weighted"`` averages it weighted by
  `actual_c`, the class' support.

  Attributes:
    true_positives: `[n]` weight of the elements predicted c with label c.
    predicted: `[n]` weight of the elements predicted c.
    actual: `[n]` weight of the elements with label c.
    average: ``"macro"`` or ``"weighted"``.
  """

  true_positives: jax.Array
  predicted: jax.Array
  actual: jax.Array
  average: str = dataclasses.field(default=MACRO, metadata=dict(static=True))

  def result(self) -> jax.Array:
    xp = _xp(self.true_positives, self.predicted, self.actual)
    occurring = self.predicted + self.actual
    f1 = _divide(xp, 2.0 * self.true_positives, occurring)
    if self.average == MACRO:
      return _mean_where(xp, f1, occurring > 0)
    return _divide(
        xp, xp.sum(self.actual * f1, axis=-1), xp.sum(self.actual, axis=-1)
    )


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class ColumnMean:
  """Per-column weighted means, averaged over the columns (multi-output regression).

  Column j's value is `numerator_j / denominator_j` (its square root with
  `root`); the result is their plain mean over the columns with weight,
  scikit-learn's `multioutput="uniform_average"`.

  Attributes:
    numerator: `[d]` weighted sums.
    denominator: `[d]` sums of the weights.
    root: take the square root of each column's mean (RMSE).
  """

  numerator: jax.Array
  denominator: jax.Array
  root: bool = dataclasses.field(default=False, metadata=dict(static=True))

  def result(self) -> jax.Array:
    xp = _xp(self.numerator, self.denominator)
    per_column = _divide(xp, self.numerator, self.denominator)
    if self.root:
      per_column = xp.sqrt(xp.maximum(per_column, 0.0))
    return _mean_where(xp, per_column, self.denominator > 0)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class RSquared:
  """The coefficient of determination R^2, per column, averaged over the columns.

  `R^2_j = 1 - SSE_j / SST_j` with `SST_j = sum w y^2 - (sum w y)^2 / sum w`,
  so it streams from sums; columns average as scikit-learn's default
  `multioutput="uniform_average"`, and a column of constant labels scores 1
  when its predictions are exact and 0 otherwise (scikit-learn's
  `force_finite`). `SST` is a difference of sums, so in float32 its
  relative error is about `1e-7 * mean(y^2) / var(y)`: labels whose spread
  is tiny next to their mean should be centered first.

  Attributes:
    weight: `[d]` sums of the weights.
    label_sum: `[d]` weighted sums of the labels.
    label_square_sum: `[d]` weighted sums of the squared labels.
    squared_error_sum: `[d]` weighted sums of the squared errors.
  """

  weight: jax.Array
  label_sum: jax.Array
  label_square_sum: jax.Array
  squared_error_sum: jax.Array

  def result(self) -> jax.Array:
    xp = _xp(self.weight, self.label_sum, self.label_square_sum, self.squared_error_sum)
    mean = _divide(xp, self.label_sum, self.weight)
    total = xp.maximum(self.label_square_sum - mean * self.label_sum, 0.0)
    error = self.squared_error_sum
    r2 = xp.where(
        total > 0, 1.0 - _divide(xp, error, total), xp.where(error == 0, 1.0, 0.0)
    )
    return _mean_where(xp, r2, self.weight > 0)


# scikit-learn's mean_absolute_percentage_error divides by max(|y|, this).
MAPE_EPSILON = float(np.finfo(np.float64).eps)


def column_sum(values: jax.Array) -> jax.Array:
  """Sums over every axis but the last: `[D0..DN, d] -> [d]`."""
  return jnp.sum(values, axis=tuple(range(values.ndim - 1)))


def regression_statistic(
    metric: str, predictions: jax.Array, labels: jax.Array, weights: jax.Array
) -> ColumnMean | RSquared:
  """``"mae"``, ``"rmse"``, ``"r2"`` or ``"mape"`` of `[D0..DN, d]` predictions.

  Args:
    metric: the metric.
    predictions: predictions in the labels' space.
    labels: labels, same shape.
    weights: weights, same shape (0 where absent).
  """
  error = predictions - labels
  weight = column_sum(weights)
  if metric == "mae":
    return ColumnMean(column_sum(weights * jnp.abs(error)), weight)
  if metric == "rmse":
    return ColumnMean(column_sum(weights * jnp.square(error)), weight, root=True)
  if metric == "mape":
    relative = jnp.abs(error) / jnp.maximum(jnp.abs(labels), MAPE_EPSILON)
    # An element with weight 0 adds 0 even where its ratio is huge.
    return ColumnMean(column_sum(jnp.where(weights == 0, 0.0, weights * relative)), weight)
  if metric == "r2":
    return RSquared(
        weight,
        column_sum(weights * labels),
        column_sum(weights * jnp.square(labels)),
        column_sum(weights * jnp.square(error)),
    )
  raise ValueError(f"regression_statistic: unknown metric {metric!r}.")


def calibration_error(
    probabilities: jax.Array, labels: jax.Array, weights: jax.Array, *, bins: int
) -> CalibrationError:
  """Per-bin sums of weights, probabilities and labels, by one scatter-add in O(N + B)."""
  bucket = jnp.clip(jnp.ceil(probabilities * bins) - 1, 0, bins - 1).astype(jnp.int32)
  index = bucket[..., None] + bins * jnp.arange(3, dtype=jnp.int32)
  values = jnp.stack([weights, weights * probabilities, weights * labels], axis=-1)
  sums = _scatter_add(index, values, 3 * bins).reshape(3, bins)
  return CalibrationError(sums[0], sums[1], sums[2])


def confusion_counts(
    predicted: jax.Array, actual: jax.Array, weights: jax.Array
) -> tuple[jax.Array, jax.Array, jax.Array]:
  """Per-column true positives, predicted and actual weight of boolean `[D0..DN, k]` arrays.

  `predicted` and `actual` broadcast against each other and `weights`.
  """
  shape = jnp.broadcast_shapes(predicted.shape, actual.shape, weights.shape)
  weights = jnp.broadcast_to(weights, shape)
  predicted = jnp.broadcast_to(predicted, shape).astype(weights.dtype)
  actual = jnp.broadcast_to(actual, shape).astype(weights.dtype)
  return (
      column_sum(weights * predicted * actual),
      column_sum(weights * predicted),
      column_sum(weights * actual),
  )


# ----------------------------------------------------------------------------
# Choosing metrics by name.


class MetricSpec(NamedTuple):
  """One metric a head reports: its key, and what to compute under it.

  Attributes:
    key: the metric's key (before a named head's `/<name>` suffix).
    metric: the metric, e.g. ``"precision"`` for ``"precision/class2"``.
    form: ``"plain"``, ``"at"`` (``"accuracy@5"``), ``"threshold"``
      (``"recall/positive_threshold_0.7"``) or ``"class"``
      (``"recall/class2"``).
    arg: the number after '@', the threshold, or the class id; else None.
  """

  key: str
  metric: str
  form: str = "plain"
  arg: Any = None


class AtMetric(NamedTuple):
  """A metric written `"<metric>@<n>"`.

  Attributes:
    placeholder: what n is, for messages (``"k"``, ``"bins"``).
    bare: n when written without '@' (``"ece"`` is ``"ece@10"``), or None
      when the bare name is another metric or none.
    limit: n must be below it, or None.
    limit_reason: why, for the error.
  """

  placeholder: str
  bare: int | None = None
  limit: int | None = None
  limit_reason: str = ""


_POSITIVE_INT = re.compile(r"[1-9][0-9]*")
_CLASS_ID = re.compile(r"class(0|[1-9][0-9]*)")
_THRESHOLD_PREFIX = "positive_threshold_"


def choose_metrics(
    where: str,
    metrics: Any,
    *,
    plain: tuple[str, ...] = (),
    at: Mapping[str, AtMetric] | None = None,
    thresholded: tuple[str, ...] = (),
    per_class: tuple[str, ...] = (),
    n_classes: int | None = None,
    vocabulary: tuple[str, ...] | None = None,
) -> tuple[MetricSpec, ...]:
  """Parses a head's `metrics=` names, raising on unknown or malformed ones.

  Args:
    where: the head, for errors.
    metrics: a list or tuple of names.
    plain: names taken as they are (``"auc"``).
    at: metrics written `"<metric>@<n>"`.
    thresholded: metrics written `"<metric>/positive_threshold_<t>"`, t in
      (0, 1) printed as `%g` prints it.
    per_class: metrics written `"<metric>/class<c>"`, or `"<metric>/<name>"`
      with a vocabulary.
    n_classes: the number of classes, for `per_class`.
    vocabulary: the class names, or None.

  Returns:
    One `MetricSpec` per name, in order.
  """
  at = dict(at or {})
  valid = _valid_names(plain, at, thresholded, per_class, n_classes, vocabulary)
  if isinstance(metrics, str) or not isinstance(metrics, Sequence):
    raise ValueError(
        f"{where}: metrics must be a list or tuple of metric names (one of {valid}),"
        f" got {metrics!r}."
    )
  specs: list[MetricSpec] = []
  for key in metrics:
    if not isinstance(key, str):
      raise ValueError(f"{where}: metrics must be strings, got {key!r}.")
    if any(spec.key == key for spec in specs):
      raise ValueError(f"{where}: metric {key!r} is listed twice.")
    spec = _parse_metric(where, key, plain, at, thresholded, per_class, n_classes, vocabulary)
    if spec is None:
      raise ValueError(f"{where}: unknown metric {key!r}; expected one of {valid}.")
    specs.append(spec)
  return tuple(specs)


def _parse_metric(where, key, plain, at, thresholded, per_class, n_classes, vocabulary):
  if key in plain:
    return MetricSpec(key, key)
  name, sep, tail = key.partition("@")
  if name in at:
    form = at[name]
    if not sep:
      return None if form.bare is None else MetricSpec(key, name, "at", form.bare)
    if not _POSITIVE_INT.fullmatch(tail):
      raise ValueError(
          f"{where}: metric {key!r}: the {form.placeholder} after '@' must be a"
          " positive integer."
      )
    n = int(tail)
    if form.limit is not None and n >= form.limit:
      raise ValueError(
          f"{where}: metric {key!r}: {form.placeholder} must be below {form.limit}"
          f" ({form.limit_reason})."
      )
    return MetricSpec(key, name, "at", n)
  name, sep, tail = key.partition("/")
  if not sep:
    return None
  if name in thresholded and tail.startswith(_THRESHOLD_PREFIX):
    text = tail[len(_THRESHOLD_PREFIX):]
    try:
      threshold = float(text)
    except ValueError:
      threshold = math.nan
    if not 0.0 < threshold < 1.0:
      raise ValueError(
          f"{where}: metric {key!r}: the threshold must be a number in (0, 1)."
      )
    if threshold_key(name, threshold) != key:
      raise ValueError(
          f"{where}: metric {key!r}: write the threshold as %g prints it,"
          f" {threshold_key(name, threshold)!r}."
      )
    return MetricSpec(key, name, "threshold", threshold)
  if name in per_class:
    if vocabulary is not None:
      if tail not in vocabulary:
        raise ValueError(
            f"{where}: metric {key!r}: {tail!r} is not in label_vocabulary"
            f" {list(vocabulary)}."
        )
      return MetricSpec(key, name, "class", vocabulary.index(tail))
    match = _CLASS_ID.fullmatch(tail)
    if match is None or int(match.group(1)) >= n_classes:
      raise ValueError(
          f"{where}: metric {key!r}: per-class metrics are written"
          f" '{name}/class<c>' with c in [0, {n_classes})."
      )
    return MetricSpec(key, name, "class", int(match.group(1)))
  return None


def _valid_names(plain, at, thresholded, per_class, n_classes, vocabulary) -> str:
  names = list(plain)
  for name, form in at.items():
    if form.bare is not None:
      names.append(name)
    names.append(f"{name}@<{form.placeholder}>")
  names += [f"{name}/{_THRESHOLD_PREFIX}<t>" for name in thresholded]
  if per_class:
    cls = "<class name>" if vocabulary is not None else f"class<c> (c < {n_classes})"
    names += [f"{name}/{cls}" for name in per_class]
  return ", ".join(repr(n) if "<" not in n else n for n in names)


def class_metric_key(metric: str, class_id: int, vocabulary: tuple[str, ...] | None) -> str:
  """`recall/class2`, or `recall/<name>` with a vocabulary."""
  return f"{metric}/{'class%d' % class_id if vocabulary is None else vocabulary[class_id]}"


def check_exclusive(where: str, metrics: Any, option: str, value: Any, example: str) -> None:
  """An option that only shapes the default metrics cannot be given with `metrics`."""
  if metrics is not None and value is not None:
    raise ValueError(
        f"{where}: {option} sets keys of the default metrics; with metrics=, name"
        f" them in metrics instead (e.g. {example!r})."
    )


class Lazy:
  """Values computed once, on first use: shared inputs of the chosen metrics.

  A head's statistics build only what its chosen metrics read, so a metric
  not asked for costs nothing, not even an op in the traced program.
  """

  def __init__(self, **builders: Callable[[], Any]):
    self._builders = builders
    self._values: dict[str, Any] = {}

  def __getattr__(self, name: str) -> Any:
    values = self.__dict__.get("_values")
    if values is None:
      raise AttributeError(name)
    if name not in values:
      try:
        builder = self.__dict__["_builders"][name]
      except KeyError:
        raise AttributeError(name) from None
      values[name] = builder()
    return values[name]
