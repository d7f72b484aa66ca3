"""The head interface: the Head spec, its kernel, loss reductions, and the scaffold of every head.

A head is data: a `Head` NamedTuple of pure functions built by a factory, in
the manner of `optax.GradientTransformation`. Nothing here holds state.

Two layers of functions live on a head:

* the public contract, `loss_fn`, `metric_fn` and `predict_fn`, which take raw
  inputs (logits, labels, a features dict) and check them;
* a `HeadKernel`, the same computations on explicit, already checked inputs.
  `multi_head` composes heads through the kernel only, which is what lets it
  evaluate many like heads as one vectorized computation.
"""

from __future__ import annotations

import dataclasses
import enum
import functools
from collections.abc import Callable, Hashable, Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jheads import checks

ArrayLike = jax.typing.ArrayLike
Features = Mapping[str, Any] | None
Stats = dict[str, Any]


class LossReduction(enum.StrEnum):
  """How a head reduces its weighted per-element loss `S = sum(w * l)`.

  Plain strings with these values are accepted wherever a reduction is.
  """

  SUM = "sum"
  """`S`."""
  SUM_OVER_BATCH_SIZE = "sum_over_batch_size"
  """`S` divided by the number of elements of `l` (the default)."""
  MEAN = "mean"
  """`S` divided by the sum of the weights broadcast to `l`."""
  SUM_OVER_NONZERO_WEIGHTS = "sum_over_nonzero_weights"
  """`S` divided by the count of non-zero weights broadcast to `l`."""


def loss_reduction_from(value: str | LossReduction, where: str) -> LossReduction:
  """Parses a loss reduction, naming `where` in the error."""
  try:
    return LossReduction(value)
  except ValueError:
    valid = ", ".join(repr(r.value) for r in LossReduction)
    raise ValueError(
        f"{where}: invalid loss_reduction {value!r}; expected one of {valid}."
    ) from None


@dataclasses.dataclass(frozen=True)
class HeadConfig:
  """The static description of a head, read by vocab, export and multi_head.

  Attributes:
    kind: the factory that built the head, e.g. ``"binary_classification"``.
    name: the head's name, or None.
    logits_dim: size of the last axis of the head's logits.
    n_classes: number of classes of a classification head, else None.
    label_vocabulary: class names of a classification head, if given.
    thresholds: the extra decision thresholds of binary and multi-label heads.
    loss_reduction: how the training loss is reduced.
    weight_column: a features key, a callable `features -> weights`, or None.
  """

  kind: str
  name: str | None
  logits_dim: int
  n_classes: int | None = None
  label_vocabulary: tuple[str, ...] | None = None
  thresholds: tuple[float, ...] = ()
  loss_reduction: LossReduction = LossReduction.SUM_OVER_BATCH_SIZE
  weight_column: Any = None

  @property
  def is_classifier(self) -> bool:
    return self.n_classes is not None

  @property
  def description(self) -> str:
    return describe(self.kind, self.name)


def describe(kind: str, name: str | None) -> str:
  """How error messages name a head: `head 'sex'`, or its factory if unnamed."""
  return f"head {name!r}" if name is not None else f"{kind}_head"


class Batch(NamedTuple):
  """Checked inputs of one head, in compute dtype.

  Attributes:
    logits: `[D0, ..., DN, logits_dim]`, float32 or wider.
    labels: processed labels, `[D0, ..., DN, label_dim]` (ids for multi-class).
    weights: example weights broadcast to the unreduced loss' shape.
    features: the features dict, only for a custom `loss_fn` that takes it.
  """

  logits: jax.Array
  labels: jax.Array
  weights: jax.Array
  features: Features = None


class LossTerms(NamedTuple):
  """A reduced loss as `total / denominator`; `denominator=None` means 1.

  Keeping the two apart lets a loss over a batch split across devices be
  reduced exactly: sum the totals, sum the denominators, then divide.
  """

  total: jax.Array
  denominator: jax.Array | None


class HeadKernel(NamedTuple):
  """A head's computations on explicit inputs (no features dict, no key suffix).

  Attributes:
    get_weights: `features -> weights or None`, per the head's weight column.
    validate: `(logits, labels, weights) -> None`; raises on bad shapes, dtypes
      and (when the values are concrete, or under `checked`) bad values.
    prepare: `(logits, labels, weights) -> Batch`; pure and vmappable.
    loss_terms: `Batch -> LossTerms`.
    statistics: `Batch -> Stats`, additive metric statistics, keys unsuffixed.
    validate_logits: `logits -> None`.
    predictions: `logits -> dict` of arrays; pure and vmappable.
    group_key: heads with equal, non-None keys compute identically up to their
      inputs, so `multi_head` may evaluate them as one vectorized computation.
  """

  get_weights: Callable[[Features], Any]
  validate: Callable[..., None]
  prepare: Callable[..., Batch]
  loss_terms: Callable[[Batch], LossTerms]
  statistics: Callable[[Batch], Stats]
  validate_logits: Callable[[Any], None]
  predictions: Callable[[Any], dict[str, jax.Array]]
  group_key: Hashable | None


class Head(NamedTuple):
  """A head spec: what turns a model's logits into a loss, metrics and predictions.

  Attributes:
    name: the head's name, or None. Inside a multi_head it suffixes metrics.
    logits_dim: size of the last axis of the logits the head expects.
    loss_fn: `(logits, labels, features=None, *, axis_name=None) -> scalar`,
      the reduced training loss. With `axis_name`, the batch is split over
      that named axis (pmap, shard_map) and the result is this shard's share:
      its sum over the axis is the loss of the whole batch, and so is the sum
      of the shares' gradients (under `shard_map`, gradients with respect to
      replicated parameters come back already summed; see the README).
    metric_fn: `(logits, labels, features=None, *, axis_name=None) -> stats`,
      additive sufficient statistics: merge batches with `metrics.merge`, and
      devices with `jax.lax.psum`; `metrics.compute` gives the values.
    predict_fn: `logits -> dict` of numeric arrays.
    config: the static description (`HeadConfig`).
    kernel: the same computations on explicit inputs (`HeadKernel`).
  """

  name: str | None
  logits_dim: int
  loss_fn: Callable[..., jax.Array]
  metric_fn: Callable[..., Stats]
  predict_fn: Callable[[Any], dict[str, jax.Array]]
  config: HeadConfig
  kernel: HeadKernel


def compute_dtype(dtype: Any) -> Any:
  """float32, or wider if the input is wider: low precision accumulates in float32."""
  if jnp.issubdtype(dtype, jnp.floating):
    return jnp.promote_types(dtype, jnp.float32)
  return jnp.dtype(jnp.float32)


def broadcast_weights(weights: Any, shape: tuple[int, ...], dtype: Any) -> jax.Array:
  """Example weights broadcast to the unreduced loss' shape (ones if None)."""
  if weights is None:
    return jnp.ones(shape, dtype)
  weights = jnp.asarray(weights, dtype)
  if weights.ndim == len(shape) - 1:
    weights = weights[..., None]
  return jnp.broadcast_to(weights, shape)


def expand_labels(labels: Any, rank: int) -> jax.Array:
  labels = jnp.asarray(labels)
  return labels[..., None] if labels.ndim == rank - 1 else labels


# ----------------------------------------------------------------------------
# Probabilities.

# Above this, float32 exp(x) exceeds 2**24 and e / (1 + e) rounds to exactly 1.
_SIGMOID_CUTOFF = 16.6355324


def sigmoid(x: jax.Array) -> jax.Array:
  """The logistic function, rounded as TensorFlow's CPU kernel rounds it.

  `jax.nn.sigmoid` and TF's sigmoid differ by an ulp or two on about half of
  all float32 inputs. That is harmless except where a probability lands
  exactly on a decision threshold or an AUC bucket edge, where the last bit
  decides the bucket; computing `e / (1 + e)` with TF's cutoff agrees with
  TF far more often. Used for predictions and metrics, never for losses
  (those stay in log-sigmoid form).
  """
  e = jnp.exp(jnp.minimum(x, _SIGMOID_CUTOFF))
  return e / (1.0 + e)


# ----------------------------------------------------------------------------
# Losses and their reduction.


def sigmoid_cross_entropy(logits: jax.Array, labels: jax.Array) -> jax.Array:
  """Sigmoid cross-entropy, `softplus(x) - x * z`, for labels in [0, 1].

  The same value as `optax.losses.sigmoid_binary_cross_entropy`, which sums
  two log-sigmoids; this form needs one softplus, and its loss and gradient
  run about twice as fast on CPU. It stays finite, with gradient
  `sigmoid(x) - z`, for any finite logits.
  """
  return jax.nn.softplus(logits) - logits * labels



def safe_divide(numerator: ArrayLike, denominator: ArrayLike) -> jax.Array:
  """`numerator / denominator`, and 0 where the denominator is 0 (gradient-safe)."""
  denominator = jnp.asarray(denominator)
  is_zero = denominator == 0
  return jnp.where(is_zero, 0.0, numerator / jnp.where(is_zero, 1.0, denominator))


def loss_terms(
    losses: jax.Array, weights: jax.Array, reduction: LossReduction
) -> LossTerms:
  """The weighted sum of `losses` and the denominator its reduction divides by.

  Args:
    losses: unreduced losses, `[D0, ..., DN, k]`.
    weights: example weights broadcast to `losses`' shape.
    reduction: the head's loss reduction.
  """
  total = jnp.sum(weights * losses)
  if reduction == LossReduction.SUM:
    return LossTerms(total, None)
  if reduction == LossReduction.SUM_OVER_BATCH_SIZE:
    denominator = jnp.asarray(losses.size, total.dtype)
  elif reduction == LossReduction.MEAN:
    denominator = jnp.sum(weights)
  else:
    denominator = jnp.sum((weights != 0).astype(total.dtype))
  return LossTerms(total, denominator)


def shard_share(value: ArrayLike, axis_name: Any = None) -> jax.Array:
  """One shard's share of a value every shard holds: their sum over the axis is `value`."""
  value = jnp.asarray(value)
  if axis_name is None:
    return value
  return value / jax.lax.axis_size(axis_name)


def reduce_loss(terms: LossTerms, axis_name: Any = None) -> jax.Array:
  """Divides out a loss; with `axis_name`, by the denominator of the whole batch."""
  if terms.denominator is None:
    return terms.total
  denominator = jax.lax.stop_gradient(terms.denominator)
  if axis_name is not None:
    denominator = jax.lax.psum(denominator, axis_name)
  return safe_divide(terms.total, denominator)


def call_loss_fn(
    where: str,
    loss_fn: Callable[..., Any],
    takes_features: bool,
    batch: Batch,
    loss_dim: int,
) -> jax.Array:
  """Calls a custom unreduced loss and checks it is `[D0, ..., DN, loss_dim]`."""
  kwargs = {"features": batch.features} if takes_features else {}
  losses = jnp.asarray(loss_fn(labels=batch.labels, logits=batch.logits, **kwargs))
  expected = tuple(batch.logits.shape[:-1]) + (loss_dim,)
  if tuple(losses.shape) != expected:
    raise ValueError(
        f"{where}: loss_fn must return the unreduced loss of shape {expected}"
        f" ([D0, ..., DN, {loss_dim}]), got shape {tuple(losses.shape)}."
    )
  return losses.astype(batch.logits.dtype)


# ----------------------------------------------------------------------------
# Factory helpers.


def suffix_keys(stats: Stats, name: str | None) -> Stats:
  """Appends `/<name>` to every metric key, as a named head reports them."""
  if name is None:
    return dict(stats)
  return {f"{key}/{name}": value for key, value in stats.items()}


def make_head(config: HeadConfig, kernel: HeadKernel) -> Head:
  """Builds the public functions of a head from its kernel."""

  where = config.description

  def loss_fn(logits, labels, features=None, *, axis_name=None):
    weights = kernel.get_weights(features)
    kernel.validate(logits, labels, weights)
    batch = kernel.prepare(logits, labels, weights)._replace(features=features)
    loss = reduce_loss(kernel.loss_terms(batch), axis_name)
    checks.require_finite(where, "the loss", loss, hint=checks.OVERFLOW_HINT)
    return loss

  def metric_fn(logits, labels, features=None, *, axis_name=None):
    del axis_name  # A single head's statistics are already additive shares.
    weights = kernel.get_weights(features)
    kernel.validate(logits, labels, weights)
    batch = kernel.prepare(logits, labels, weights)._replace(features=features)
    stats = kernel.statistics(batch)
    checks.require_finite(where, "the metric statistics", stats, hint=checks.OVERFLOW_HINT)
    return suffix_keys(stats, config.name)

  def predict_fn(logits):
    kernel.validate_logits(logits)
    return kernel.predictions(logits)

  return Head(
      name=config.name,
      logits_dim=config.logits_dim,
      loss_fn=loss_fn,
      metric_fn=metric_fn,
      predict_fn=predict_fn,
      config=config,
      kernel=kernel,
  )


class LabelRule(NamedTuple):
  """How a head family checks and converts its labels.

  Attributes:
    integer: labels must have an integer (or bool) dtype.
    ok: `labels -> bool scalar`, true when every label value is valid.
    message: what valid labels are, for the error.
    convert: `(labels, dtype) -> processed labels`.
  """

  integer: bool
  ok: Callable[[jax.Array], jax.Array] | None
  message: str
  convert: Callable[[jax.Array, Any], jax.Array]


def standard_kernel(
    config: HeadConfig,
    *,
    label_dim: int,
    loss_dim: int,
    per_logit_weights: bool,
    label_rule: LabelRule,
    unreduced_loss: Callable[[Batch], jax.Array],
    statistics: Callable[[Batch, jax.Array], Stats],
    predictions: Callable[[jax.Array], dict[str, jax.Array]],
    custom_loss_fn: Callable[..., Any] | None = None,
    static_options: Hashable = (),
    logits_check: Callable[[str, Any], None] | None = None,
) -> HeadKernel:
  """The kernel of every built-in head: shared checks around family-specific math.

  Args:
    config: the head's static description.
    label_dim: last dimension of the labels.
    loss_dim: last dimension of the unreduced loss.
    per_logit_weights: whether weights may be `[D0..DN, logits_dim]`.
    label_rule: the family's label checks and conversion.
    unreduced_loss: `Batch -> [D0..DN, loss_dim]` loss, used without a custom loss.
    statistics: `(Batch, unreduced loss) -> Stats`.
    predictions: `logits in compute dtype -> dict`.
    custom_loss_fn: a user `loss_fn(labels, logits[, features])`, or None.
    static_options: further static options that set the computation.
    logits_check: optional family-specific value check on logits.
  """
  where = config.description
  takes_features = checks.validate_loss_fn(where, custom_loss_fn)

  def get_weights(features):
    return checks.fetch_weights(where, features, config.weight_column)

  def validate_logits(logits):
    logits = checks.check_logits(where, logits, config.logits_dim)
    checks.require_finite(where, "logits", logits)
    if logits_check is not None:
      logits_check(where, logits)

  def validate(logits, labels, weights):
    validate_logits(logits)
    logits_shape = tuple(np.shape(logits))
    labels = checks.check_labels(
        where,
        labels,
        logits_shape,
        label_dim,
        integer=label_rule.integer,
        has_vocabulary=config.label_vocabulary is not None,
    )
    weights = checks.check_weights(where, weights, logits_shape, per_logit=per_logit_weights)
    if label_rule.ok is not None:
      checks.require(
          lambda: label_rule.ok(jnp.asarray(labels)),
          f"{where}: labels must be {label_rule.message}",
          labels,
          detail=lambda: checks.describe_values(labels),
      )
    checks.require_finite(where, "weights", weights)

  def prepare(logits, labels, weights):
    logits = jnp.asarray(logits)
    logits = logits.astype(compute_dtype(logits.dtype))
    labels = label_rule.convert(expand_labels(labels, logits.ndim), logits.dtype)
    loss_shape = tuple(logits.shape[:-1]) + (loss_dim,)
    return Batch(logits, labels, broadcast_weights(weights, loss_shape, logits.dtype))

  if custom_loss_fn is None:
    compute_loss = unreduced_loss
  else:
    compute_loss = functools.partial(
        call_loss_fn, where, custom_loss_fn, takes_features, loss_dim=loss_dim
    )

  def kernel_loss_terms(batch):
    return loss_terms(compute_loss(batch), batch.weights, config.loss_reduction)

  def kernel_statistics(batch):
    return statistics(batch, compute_loss(batch))

  def kernel_predictions(logits):
    logits = jnp.asarray(logits)
    return predictions(logits.astype(compute_dtype(logits.dtype)))

  group_key = None
  if custom_loss_fn is None:
    group_key = (
        config.kind,
        config.logits_dim,
        config.thresholds,
        config.loss_reduction,
        static_options,
    )
  return HeadKernel(
      get_weights=get_weights,
      validate=validate,
      prepare=prepare,
      loss_terms=kernel_loss_terms,
      statistics=kernel_statistics,
      validate_logits=validate_logits,
      predictions=kernel_predictions,
      group_key=group_key,
  )
