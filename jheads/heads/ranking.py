"""Ranking: losses and IR metrics over lists of items (TF-Ranking's Estimator head).

Logits and labels are `[D0, ..., DN, L]`: the list of `L` items is the last
axis. Each loss is a set of elements (lists, ordered pairs or items) with an
unreduced loss and an element weight, exactly TF-Ranking's `(losses,
weights)` pair, so the four reductions are `base.loss_terms` and psum like
every other head's. Each metric is a `metrics.Ratio` of per-list sums: it
streams over batches and psums over devices exactly.
"""

from __future__ import annotations

import inspect
import math
import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jheads import base
from jheads import checks
from jheads import metrics as metrics_lib

KIND = "ranking"

LOSSES = (
    "softmax",
    "pairwise_logistic",
    "pairwise_hinge",
    "sigmoid_cross_entropy",
    "mean_squared",
    "approx_ndcg",
)
"""The built-in losses; TF-Ranking's `RankingLossKey` names (`"softmax_loss"`) are aliases."""

METRICS = ("ndcg", "mrr", "precision", "recall", "map", "arp")
"""The metrics a head may report, as `"<metric>"` or `"<metric>@<k>"`."""

DEFAULT_METRICS = ("ndcg@5", "ndcg@10", "ndcg", "mrr@10", "mrr")
"""TF-Ranking's `EstimatorBuilder` evaluation metrics."""

DEFAULT_TEMPERATURE = 0.1
"""ApproxNDCG's default temperature (`losses_impl.ApproxNDCGLoss`)."""

# 2**128 overflows float32, so NDCG gains need labels below this.
_MAX_NDCG_LABEL = 128.0

_CUTOFF = re.compile(r"[1-9][0-9]*")


class MetricSpec(NamedTuple):
  """One requested metric: its key, its kind, and its cutoff (None: the whole list)."""

  key: str
  kind: str
  k: int | None


class Prepared(NamedTuple):
  """A prepared ranking batch, unpacked from `base.Batch` for the math below.

  `base.Batch` holds logits with invalid items replaced by 0, labels with
  invalid items set to -1, and item weights `[D0..DN, L]` that are 0 at
  invalid items; validity is therefore `labels >= 0`.
  """

  logits: jax.Array
  labels: jax.Array
  weights: jax.Array
  valid: jax.Array

  @classmethod
  def of(cls, batch: base.Batch) -> Prepared:
    valid = batch.labels >= 0
    labels = jnp.where(valid, batch.labels, 0.0)
    return cls(batch.logits, labels, batch.weights, valid)


def valid_items(labels: Any, mask: Any, shape: tuple[int, ...]) -> jax.Array:
  """`labels >= 0`, and the mask (per item, or per row broadcast over the items)."""
  valid = jnp.asarray(labels) >= 0
  if mask is None:
    return valid
  return valid & base.broadcast_mask(jnp.asarray(mask) != 0, tuple(shape))


# ----------------------------------------------------------------------------
# Losses: per-element losses and element weights (TF-Ranking's losses_impl).


def softmax_elements(p: Prepared, temperature: float) -> tuple[jax.Array, jax.Array]:
  """Listwise softmax: `loss = CE(u / U, softmax(s))` per list, weight `U = sum(y w)`."""
  del temperature
  label_mass = jnp.sum(p.labels * p.weights, axis=-1)
  # weight * loss per list; optax masks invalid items with -inf, TF with log(1e-10)
  # (which is wrong when valid logits are below -23).
  weighted = optax.losses.ranking_softmax_loss(
      p.logits, p.labels, where=p.valid, weights=p.weights, reduce_fn=None
  )
  has_mass = label_mass > 0
  losses = jnp.where(has_mass, weighted / jnp.where(has_mass, label_mass, 1.0), 0.0)
  return losses, jnp.where(has_mass, label_mass, 0.0)


def _pairs(p: Prepared) -> tuple[jax.Array, jax.Array]:
  """Logit differences `s_i - s_j` and pair weights `w_i [v_i and v_j and y_i > y_j]`."""
  differences = p.logits[..., :, None] - p.logits[..., None, :]
  ordered = (
      p.valid[..., :, None]
      & p.valid[..., None, :]
      & (p.labels[..., :, None] > p.labels[..., None, :])
  )
  # Only the more relevant item's weight enters (TF expands weights on axis 2).
  return differences, jnp.where(ordered, p.weights[..., :, None], 0.0)


def pairwise_logistic_elements(p: Prepared, temperature: float) -> tuple[jax.Array, jax.Array]:
  """Pairwise logistic loss `log(1 + exp(-(s_i - s_j)))` over ordered pairs."""
  del temperature
  differences, omega = _pairs(p)
  return jax.nn.softplus(-differences), omega


def pairwise_hinge_elements(p: Prepared, temperature: float) -> tuple[jax.Array, jax.Array]:
  """Pairwise hinge loss `max(0, 1 - (s_i - s_j))` over ordered pairs."""
  del temperature
  differences, omega = _pairs(p)
  return jax.nn.relu(1.0 - differences), omega


def sigmoid_cross_entropy_elements(
    p: Prepared, temperature: float
) -> tuple[jax.Array, jax.Array]:
  """Pointwise sigmoid cross-entropy on labels in [0, 1], weighted `w` at valid items."""
  del temperature
  return base.sigmoid_cross_entropy(p.logits, p.labels), p.weights


def mean_squared_elements(p: Prepared, temperature: float) -> tuple[jax.Array, jax.Array]:
  """Pointwise squared error `(y - s)**2`, weighted `w` at valid items."""
  del temperature
  return jnp.square(p.labels - p.logits), p.weights


def _ideal_discounted_sum(
    gains: jax.Array, discount: Callable[[jax.Array], jax.Array]
) -> jax.Array:
  """`sum_p g_(p) discount(p)` over gains sorted in descending order."""
  ordered = -jnp.sort(-gains, axis=-1)
  positions = jnp.arange(1, gains.shape[-1] + 1, dtype=gains.dtype)
  return jnp.sum(ordered * discount(positions), axis=-1)


def approx_ndcg_elements(p: Prepared, temperature: float) -> tuple[jax.Array, jax.Array]:
  """ApproxNDCG: `loss = -NDCG` with sigmoid-smoothed ranks, one element per list."""
  scaled = p.logits / temperature
  # rank_i = 1 + sum_{valid j != i} sigmoid(t_j - t_i); the self term is 1/2.
  smoothed = jax.nn.sigmoid(scaled[..., None, :] - scaled[..., :, None])
  ranks = 0.5 + jnp.sum(jnp.where(p.valid[..., None, :], smoothed, 0.0), axis=-1)
  # Max-shifted gains 2^(y - m) - 2^(-m) (TF's _safe_default_gain_fn): the
  # factor 2^(-m) cancels in the ratio and large labels cannot overflow.
  top = jnp.max(p.labels, axis=-1, keepdims=True)
  gains = jnp.where(p.valid, jnp.exp2(p.labels - top) - jnp.exp2(-top), 0.0)
  dcg = jnp.sum(gains / jnp.log1p(ranks), axis=-1)
  ideal = _ideal_discounted_sum(gains, lambda r: 1.0 / jnp.log1p(r))
  losses = -base.safe_divide(dcg, ideal)
  label_sum = jnp.sum(p.labels, axis=-1)
  omega = base.safe_divide(jnp.sum(p.weights * p.labels, axis=-1), label_sum)
  return losses, jnp.where(label_sum > 0, omega, 0.0)


_ELEMENTS = {
    "softmax": softmax_elements,
    "pairwise_logistic": pairwise_logistic_elements,
    "pairwise_hinge": pairwise_hinge_elements,
    "sigmoid_cross_entropy": sigmoid_cross_entropy_elements,
    "mean_squared": mean_squared_elements,
    "approx_ndcg": approx_ndcg_elements,
}


def custom_elements(
    where: str, loss_fn: Callable[..., Any], batch: base.Batch
) -> tuple[jax.Array, jax.Array]:
  """A user loss `loss_fn(labels, logits, *, where, weights) -> [D0..DN]`: one element per list."""
  p = Prepared.of(batch)
  losses = jnp.asarray(
      loss_fn(labels=batch.labels, logits=p.logits, where=p.valid, weights=p.weights)
  )
  expected = tuple(p.logits.shape[:-1])
  if tuple(losses.shape) != expected:
    raise ValueError(
        f"{where}: loss_fn must return one loss per list, shape {expected}"
        f" ([D0, ..., DN]), got shape {tuple(losses.shape)}."
    )
  omega = (jnp.sum(p.weights, axis=-1) > 0).astype(p.logits.dtype)
  # Lists without a valid item must not turn a 0 weight into NaN.
  return jnp.where(omega != 0, losses.astype(p.logits.dtype), 0.0), omega


# ----------------------------------------------------------------------------
# Ranks and metrics (TF-Ranking's metrics_impl, ties broken by position).


def _sort_key(scores: jax.Array) -> jax.Array:
  # Ascending sort of -s is a descending sort of s; lax.sort ties -0.0 with 0.0
  # (as tf.math.top_k does), so no canonicalization is needed.
  return -scores


def ranks(scores: jax.Array, where: jax.Array | None = None) -> jax.Array:
  """1-based ranks by descending score, ties by position; items not in `where` last.

  Args:
    scores: `[..., L]`.
    where: optional boolean `[..., L]`; `False` items rank after every `True` one.

  Returns:
    int32 `[..., L]`.

  Example:
    >>> import jax.numpy as jnp
    >>> from jheads.heads import ranking
    >>> ranking.ranks(jnp.array([1.0, 3.0, 1.0, -jnp.inf])).tolist()
    [2, 1, 3, 4]
  """
  scores = jnp.asarray(scores)
  dimension = scores.ndim - 1
  # The positions share the scores' sharding (an Explicit mesh would reject the sort otherwise).
  iota = jax.lax.broadcasted_iota(
      jnp.int32, scores.shape, dimension, out_sharding=jax.typeof(scores).sharding
  )
  keys = (_sort_key(scores),)
  if where is not None:
    keys = (jnp.logical_not(where).astype(jnp.int32),) + keys
  *_, order = jax.lax.sort(
      keys + (iota,), dimension=dimension, is_stable=True, num_keys=len(keys)
  )
  _, position = jax.lax.sort((order, iota), dimension=dimension, num_keys=1)
  return position + 1


def _list_weights(relevance: jax.Array, weights: jax.Array, count: jax.Array) -> jax.Array:
  """List weights: `sum(w R) / sum(R)`; the mean valid item weight without relevance; 0 if empty.

  TF-Ranking gives an empty list a positive weight and a list without
  relevance the batch's mean weight; both break additivity (spec R5.3).
  """
  total_relevance = jnp.sum(relevance, axis=-1)
  own = base.safe_divide(jnp.sum(weights * relevance, axis=-1), total_relevance)
  mean_weight = base.safe_divide(jnp.sum(weights, axis=-1), count)
  return jnp.where(count == 0, 0.0, jnp.where(total_relevance > 0, own, mean_weight))


def _discount(positions: jax.Array) -> jax.Array:
  return 1.0 / jnp.log2(1.0 + positions)


def metric_statistics(
    p: Prepared, specs: Sequence[MetricSpec]
) -> dict[str, metrics_lib.Ratio]:
  """Each metric as `Ratio(sum over lists of weight * value, sum of list weights)`.

  Items with weight 0 are invalid for the metrics
  (`metrics_impl._prepare_and_validate_params`).
  """
  if not specs:
    return {}
  dtype = p.logits.dtype
  valid = p.valid & (p.weights > 0)
  labels = jnp.where(valid, p.labels, 0.0)
  weights = jnp.where(valid, p.weights, 0.0)
  dimension = p.logits.ndim - 1
  invalid = jnp.logical_not(valid).astype(jnp.int32)
  # One stable sort serves every metric and cutoff.
  _, _, sorted_labels, sorted_weights = jax.lax.sort(
      (invalid, _sort_key(p.logits), labels, weights),
      dimension=dimension,
      is_stable=True,
      num_keys=2,
  )
  size = p.logits.shape[-1]
  positions = jnp.arange(1, size + 1, dtype=dtype)
  count = jnp.sum(valid.astype(dtype), axis=-1)
  relevant = (labels >= 1).astype(dtype)
  sorted_relevant = (sorted_labels >= 1).astype(dtype)
  relevant_weight = _list_weights(relevant, weights, count)
  gains = jnp.exp2(labels) - 1.0
  sorted_gains = jnp.exp2(sorted_labels) - 1.0
  ideal_gains = -jnp.sort(-(weights * gains), axis=-1)

  def ratio(omega, value):
    return metrics_lib.Ratio(jnp.sum(omega * value), jnp.sum(omega))

  stats = {}
  for spec in specs:
    k = size if spec.k is None else min(spec.k, size)
    top = (positions <= k).astype(dtype)
    if spec.kind == "ndcg":
      dcg = jnp.sum(top * sorted_weights * sorted_gains * _discount(positions), axis=-1)
      ideal = jnp.sum(top * ideal_gains * _discount(positions), axis=-1)
      stats[spec.key] = ratio(
          _list_weights(gains, weights, count), base.safe_divide(dcg, ideal)
      )
    elif spec.kind == "mrr":
      value = jnp.max(top * sorted_relevant / positions, axis=-1)
      stats[spec.key] = ratio(relevant_weight, value)
    elif spec.kind == "precision":
      hits = jnp.sum(top * sorted_relevant, axis=-1)
      stats[spec.key] = ratio(relevant_weight, base.safe_divide(hits, jnp.minimum(count, k)))
    elif spec.kind == "recall":
      hits = jnp.sum(top * sorted_relevant, axis=-1)
      stats[spec.key] = ratio(
          relevant_weight, base.safe_divide(hits, jnp.sum(relevant, axis=-1))
      )
    elif spec.kind == "map":
      precision_at = jnp.cumsum(sorted_relevant, axis=-1) / positions
      total = jnp.sum(top * sorted_relevant * sorted_weights * precision_at, axis=-1)
      # Divided by all relevant items, whatever the cutoff (as TF).
      value = base.safe_divide(total, jnp.sum(weights * relevant, axis=-1))
      stats[spec.key] = ratio(relevant_weight, value)
    else:  # arp: weighted by label mass, no cutoff.
      mass = sorted_weights * sorted_labels
      stats[spec.key] = metrics_lib.Ratio(jnp.sum(positions * mass), jnp.sum(mass))
  return stats


# ----------------------------------------------------------------------------
# Configuration.


def _check_loss(where: str, loss: Any) -> tuple[tuple[str, float], ...]:
  """The loss as `((name, weight), ...)`; a single name has weight 1."""

  def canonical(key):
    if isinstance(key, str):
      name = key[: -len("_loss")] if key.endswith("_loss") else key
      if name in LOSSES:
        return name
    raise ValueError(
        f"{where}: unknown loss {key!r}; expected one of {', '.join(LOSSES)}"
        " (or their TF-Ranking names with a '_loss' suffix)."
    )

  if isinstance(loss, Mapping):
    if not loss:
      raise ValueError(f"{where}: the loss mapping must not be empty.")
    components = []
    for key, weight in loss.items():
      name = canonical(key)
      if isinstance(weight, bool) or not isinstance(weight, (int, float, np.number)):
        raise ValueError(
            f"{where}: loss weights must be numbers; got {weight!r} for {key!r}."
        )
      if not math.isfinite(float(weight)):
        raise ValueError(f"{where}: loss weights must be finite; got {weight} for {key!r}.")
      if any(name == n for n, _ in components):
        raise ValueError(f"{where}: loss {name!r} appears twice in the loss mapping.")
      components.append((name, float(weight)))
    return tuple(components)
  return ((canonical(loss), 1.0),)


def _check_metrics(where: str, metrics: Any) -> tuple[MetricSpec, ...]:
  if isinstance(metrics, str) or not isinstance(metrics, Sequence):
    raise ValueError(
        f"{where}: metrics must be a list or tuple of strings such as 'ndcg@5',"
        f" got {metrics!r}."
    )
  specs = []
  for key in metrics:
    if not isinstance(key, str):
      raise ValueError(f"{where}: metrics must be strings, got {key!r}.")
    kind, at, cutoff = key.partition("@")
    if kind not in METRICS:
      raise ValueError(
          f"{where}: unknown metric {key!r}; expected one of {', '.join(METRICS)},"
          " optionally with a cutoff '@<k>'."
      )
    k = None
    if at:
      if kind == "arp":
        raise ValueError(f"{where}: metric {key!r}: arp has no cutoff; use 'arp'.")
      if not _CUTOFF.fullmatch(cutoff):
        raise ValueError(
            f"{where}: metric {key!r}: the cutoff after '@' must be a positive integer."
        )
      k = int(cutoff)
    if any(s.key == key for s in specs):
      raise ValueError(f"{where}: metric {key!r} is listed twice.")
    specs.append(MetricSpec(key, kind, k))
  return tuple(specs)


def _check_column(where: str, option: str, column: Any) -> Any:
  if column is not None and not isinstance(column, str) and not callable(column):
    raise ValueError(
        f"{where}: {option} must be a features key, a callable `features -> array`"
        f" or None, got {type(column).__name__}."
    )
  return column


def _check_custom_loss(where: str, loss_fn: Any) -> Callable[..., Any] | None:
  if loss_fn is None:
    return None
  if not callable(loss_fn):
    raise TypeError(f"{where}: loss_fn must be callable, got {type(loss_fn).__name__}.")
  try:
    parameters = inspect.signature(loss_fn).parameters
  except (TypeError, ValueError):
    return loss_fn
  if any(p.kind is p.VAR_KEYWORD for p in parameters.values()):
    return loss_fn
  names = {n for n, p in parameters.items() if p.kind is not p.VAR_POSITIONAL}
  missing = [n for n in ("labels", "logits", "where", "weights") if n not in names]
  if missing:
    raise ValueError(
        f"{where}: loss_fn is called as loss_fn(labels=, logits=, where=, weights=);"
        f" it lacks {missing} (it takes {sorted(names)})."
    )
  return loss_fn


# ----------------------------------------------------------------------------
# The head.


def ranking_head(
    *,
    name: str | None = None,
    loss: str | Mapping[str, float] = "softmax",
    metrics: Sequence[str] = DEFAULT_METRICS,
    list_size: int | None = None,
    weight_column: str | Callable[[Any], Any] | None = None,
    mask_column: str | Callable[[Any], Any] | None = None,
    temperature: float | None = None,
    loss_reduction: str | base.LossReduction = "sum_over_nonzero_weights",
    loss_fn: Callable[..., Any] | None = None,
) -> base.Head:
  """A learning-to-rank head (TF-Ranking's `create_ranking_head` with `make_loss_fn`).

  Logits are scores `[D0, ..., DN, L]` of lists of `L` items (the list is the
  last axis); labels the same shape, graded relevance `>= 0`, and any
  negative label marks padding (TF-Ranking pads with -1). Logits of padded
  items are never read, so they may be anything, NaN included.

  Losses (`loss`): ``"softmax"`` (listwise, TF-Ranking's default),
  ``"pairwise_logistic"``, ``"pairwise_hinge"``, ``"sigmoid_cross_entropy"``
  (labels in [0, 1]), ``"mean_squared"``, ``"approx_ndcg"``; or a mapping
  `{loss: weight}`, the weighted sum of the separately reduced losses. The
  default reduction, ``"sum_over_nonzero_weights"``, is TF-Ranking's.

  Metrics: each `metrics` string (``"ndcg@5"``, ``"mrr"``, ``"precision@3"``,
  ``"recall@10"``, ``"map"``, ``"arp"``), plus `labels_mean`, `logits_mean`
  and `average_loss` (a mapping loss reports `average_loss_<loss>` per
  component instead). Per-list values are TF-Ranking's (gain `2^y - 1`,
  discount `1/log2(1 + rank)`, relevant when `y >= 1`); score ties are broken
  by position, lower index first.

  Predictions: `logits`, and `ranks` (1-based, int32, by descending logit,
  ties by position).

  Differences from TF-Ranking: ties are broken by position, not at random; a
  list with no valid item weighs 0 in the metrics, and a list with no
  relevant item keeps its own weight (TF: the batch's mean weight), so
  metrics stream and psum exactly; the softmax loss masks padding exactly
  (TF fills padded logits with log(1e-10)); the ApproxNDCG `average_loss`
  uses the loss' temperature; sigmoid cross-entropy rejects labels above 1.

  Args:
    name: the head's name; suffixes metric keys and is required in a multi_head.
    loss: a loss name, or a mapping from loss names to weights.
    metrics: the metrics to report, also their keys.
    list_size: the fixed list size `L`, or None for any. A multi_head can
      split one logits array only when it is set.
    weight_column: a features key (or callable) of per-list weights
      `[D0..DN]` or `[D0..DN, 1]`, or per-item weights `[D0..DN, L]`; it weighs
      the loss and the metrics.
    mask_column: a features key (or callable) of a boolean or 0/1
      `[D0..DN, L]` mask; False marks padding, as a negative label does.
    temperature: ApproxNDCG's temperature (default 0.1); only with an
      ``"approx_ndcg"`` loss.
    loss_reduction: one of `jheads.LossReduction`.
    loss_fn: a custom per-list loss `loss_fn(labels, logits, *, where,
      weights) -> [D0..DN]`, e.g. a rax loss with `reduce_fn=None`; it
      replaces `loss`.

  Returns:
    A `jheads.Head`.

  Example:
    >>> import jax.numpy as jnp, jheads
    >>> from jheads.heads.ranking import ranking_head
    >>> head = ranking_head(metrics=("mrr",))
    >>> logits = jnp.array([[1.0, 3.0, 2.0], [1.0, 2.0, 3.0]])
    >>> labels = jnp.array([[0.0, 0.0, 1.0], [0.0, 1.0, 2.0]])
    >>> round(float(head.loss_fn(logits, labels)), 4)  # (1.4076 + 2.2228) / 2 lists
    1.8152
    >>> float(jheads.metrics.compute(head.metric_fn(logits, labels))["mrr"])
    0.75
    >>> head.predict_fn(logits)["ranks"].tolist()
    [[3, 1, 2], [3, 2, 1]]
  """
  name = checks.check_name(name, KIND)
  where = base.describe(KIND, name)
  custom_loss = _check_custom_loss(where, loss_fn)
  if custom_loss is not None and not (isinstance(loss, str) and loss == "softmax"):
    raise ValueError(f"{where}: pass either loss or loss_fn, not both.")
  components = () if custom_loss is not None else _check_loss(where, loss)
  is_mapping = isinstance(loss, Mapping) and custom_loss is None
  specs = _check_metrics(where, metrics)
  if list_size is not None and (
      isinstance(list_size, bool) or not isinstance(list_size, (int, np.integer)) or list_size < 1
  ):
    raise ValueError(f"{where}: list_size must be a positive int or None, got {list_size!r}.")
  list_size = None if list_size is None else int(list_size)
  if temperature is not None:
    if custom_loss is not None or not any(n == "approx_ndcg" for n, _ in components):
      raise ValueError(
          f"{where}: temperature applies only to the approx_ndcg loss, which"
          f" {'loss_fn replaces' if custom_loss is not None else 'loss does not include'}."
      )
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float, np.number)):
      raise ValueError(f"{where}: temperature must be a positive number, got {temperature!r}.")
    if not (math.isfinite(float(temperature)) and float(temperature) > 0):
      raise ValueError(f"{where}: temperature must be positive and finite, got {temperature}.")
  temperature = DEFAULT_TEMPERATURE if temperature is None else float(temperature)
  reduction = base.loss_reduction_from(loss_reduction, where)
  weight_column = _check_column(where, "weight_column", weight_column)
  mask_column = checks.check_mask_column(where, mask_column)
  sigmoid_labels = any(n == "sigmoid_cross_entropy" for n, _ in components)
  ndcg_labels = any(s.kind == "ndcg" for s in specs)

  config = base.HeadConfig(
      kind=KIND,
      name=name,
      logits_dim=list_size,
      loss_reduction=reduction,
      weight_column=weight_column,
      mask_column=mask_column,
  )

  def get_weights(features):
    return base.RowWeights(
        checks.fetch_weights(where, features, weight_column),
        checks.fetch_mask(where, features, mask_column),
    )

  def check_logits(logits):
    if logits is None:
      raise ValueError(f"{where}: logits are required, got None.")
    logits = checks.as_array(logits)
    if not (jnp.issubdtype(logits.dtype, jnp.number) or logits.dtype == bool):
      raise ValueError(f"{where}: logits must be numeric, got dtype {logits.dtype}.")
    if logits.ndim < 2 or (list_size is not None and logits.shape[-1] != list_size):
      size = "L" if list_size is None else str(list_size)
      raise ValueError(
          f"{where}: logits must have shape [D0, ..., DN, {size}] (rank >= 2, the"
          f" list on the last axis), got shape {tuple(logits.shape)}."
      )
    return logits

  def validate_logits(logits):
    logits = check_logits(logits)
    if checks.should_check(logits):
      # -inf ranks an item last; only NaN has no rank.
      checks.enforce(where, {
          "logits must not be NaN for predictions (give padded items -inf to rank"
          " them last)": checks.ValueCheck(
              jnp.logical_not(jnp.any(jnp.isnan(jnp.asarray(logits))))
          ),
      })

  def validate(logits, labels, row_weights):
    """Shapes and dtypes, at trace time; values are `value_checks`' job."""
    shape = tuple(check_logits(logits).shape)
    if labels is None:
      raise ValueError(f"{where}: labels are required, got None.")
    if isinstance(labels, Mapping):
      raise ValueError(f"{where}: labels must be an array, got a dict.")
    labels = checks.as_array(labels)
    if not (jnp.issubdtype(labels.dtype, jnp.number) or labels.dtype == bool):
      raise ValueError(
          f"{where}: labels must be numeric graded relevance, got dtype {labels.dtype}."
      )
    if tuple(labels.shape) != shape:
      raise ValueError(
          f"{where}: labels shape {tuple(labels.shape)} must equal logits shape {shape}"
          " (one label per item; pad with -1)."
      )
    checks.check_weights(where, row_weights.weights, shape, per_logit=True)
    mask = row_weights.mask
    if mask is not None:
      mask = checks.as_array(mask)
      if tuple(mask.shape) != shape:
        # Not per item: then a row mask (a multi_head's), `[D0..DK]`.
        checks.check_mask(where, mask, shape)
      elif not (jnp.issubdtype(mask.dtype, jnp.number) or mask.dtype == bool):
        raise ValueError(
            f"{where}: the mask must be bool or 0/1 numbers, got dtype {mask.dtype}."
        )

  def value_checks(logits, labels, row_weights):
    """Label, logit, weight and mask values: pure and vmappable, enforced by the caller."""
    logits, labels = jnp.asarray(logits), jnp.asarray(labels)
    valid = valid_items(labels, row_weights.mask, tuple(logits.shape))
    results = {
        "labels must be finite (no NaN or infinity); mark padding with a negative"
        " label such as -1": checks.ValueCheck(checks.all_finite(labels)),
        "logits must be finite (no NaN or infinity) at valid items (padded items"
        " may hold anything)": checks.ValueCheck(checks.all_finite(logits, valid)),
    }
    if sigmoid_labels:
      results["the sigmoid_cross_entropy loss needs labels in [0, 1] at valid items"] = (
          checks.ValueCheck(jnp.all((labels <= 1) | ~valid), labels, valid)
      )
    if ndcg_labels:
      results[
          "NDCG metrics need labels below 128 at valid items (2**label overflows float32)"
      ] = checks.ValueCheck(jnp.all((labels < _MAX_NDCG_LABEL) | ~valid), labels, valid)
    weights = row_weights.weights
    if weights is not None:
      weights = jnp.asarray(weights)
      results["weights must be finite (no NaN or infinity)"] = checks.ValueCheck(
          checks.all_finite(weights)
      )
      # NaN is the finiteness check's to report.
      results["weights must be >= 0"] = checks.ValueCheck(jnp.all(~(weights < 0)))
    mask = row_weights.mask
    if mask is not None and jnp.asarray(mask).dtype != bool:
      mask = jnp.asarray(mask)
      results["the mask must hold only 0 and 1 (or booleans)"] = checks.ValueCheck(
          jnp.all((mask == 0) | (mask == 1))
      )
    return results

  def prepare(logits, labels, row_weights):
    logits = jnp.asarray(logits)
    dtype = base.compute_dtype(logits.dtype)
    logits = logits.astype(dtype)
    labels = jnp.asarray(labels).astype(dtype)
    valid = valid_items(labels, row_weights.mask, logits.shape)
    item_weights = base.broadcast_weights(row_weights.weights, logits.shape, dtype)
    # Replace invalid items before any arithmetic: their logits may be NaN.
    return base.Batch(
        logits=jnp.where(valid, logits, 0.0),
        labels=jnp.where(valid, labels, -1.0),
        weights=jnp.where(valid, item_weights, 0.0),
    )

  def elements(batch):
    """`(name, losses, element weights)` for each loss component."""
    if custom_loss is not None:
      return [("custom", *custom_elements(where, custom_loss, batch))]
    p = Prepared.of(batch)
    return [(n, *_ELEMENTS[n](p, temperature)) for n, _ in components]

  def loss_terms(batch):
    terms = [base.loss_terms(l, w, reduction) for _, l, w in elements(batch)]
    if not is_mapping:
      return terms[0]
    total = jnp.stack([t.total for t in terms])
    denominator = None
    if reduction != base.LossReduction.SUM:
      denominator = jnp.stack([t.denominator for t in terms])
    return base.LossTerms(
        total, denominator, component_weights=jnp.asarray([a for _, a in components], total.dtype)
    )

  def statistics(batch):
    p = Prepared.of(batch)
    stats = metric_statistics(p, specs)
    count = jnp.sum(p.valid.astype(p.logits.dtype))
    stats["labels_mean"] = metrics_lib.Ratio(jnp.sum(p.labels), count)
    stats["logits_mean"] = metrics_lib.Ratio(jnp.sum(p.logits), count)
    for n, losses, omega in elements(batch):
      key = f"average_loss_{n}" if is_mapping else "average_loss"
      stats[key] = metrics_lib.Ratio(jnp.sum(omega * losses), jnp.sum(omega))
    return stats

  def predictions(logits):
    logits = jnp.asarray(logits)
    logits = logits.astype(base.compute_dtype(logits.dtype))
    return {"logits": logits, "ranks": ranks(logits)}

  group_key = None
  if custom_loss is None:
    group_key = (KIND, components, specs, list_size, reduction, temperature, is_mapping)
  kernel = base.HeadKernel(
      get_weights=get_weights,
      validate=validate,
      prepare=prepare,
      loss_terms=loss_terms,
      statistics=statistics,
      validate_logits=validate_logits,
      predictions=predictions,
      group_key=group_key,
      value_checks=value_checks,
  )
  return base.make_head(config, kernel)
