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
import math
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
    mask_column: a features key or a callable `features -> mask` of the rows
      (or steps) that take part, or None.
    missing_label: the label value that marks a missing label, or None.
    serving: `predictions -> {signature: {output: array}}`, the serving
      signatures of a kind defined with `jheads.define_head`; None for the
      built-in kinds, whose signatures `jheads.export` knows.
  """

  kind: str
  name: str | None
  logits_dim: int
  n_classes: int | None = None
  label_vocabulary: tuple[str, ...] | None = None
  thresholds: tuple[float, ...] = ()
  loss_reduction: LossReduction = LossReduction.SUM_OVER_BATCH_SIZE
  weight_column: Any = None
  mask_column: Any = None
  missing_label: Any = None
  serving: Any = None

  @property
  def is_classifier(self) -> bool:
    return self.n_classes is not None

  @property
  def description(self) -> str:
    return describe(self.kind, self.name)


def describe(kind: str, name: str | None) -> str:
  """How error messages name a head: `head 'sex'`, or its factory if unnamed."""
  return f"head {name!r}" if name is not None else f"{kind}_head"


class RowWeights(NamedTuple):
  """What a head reads from the features dict about its rows: weights and a mask.

  Attributes:
    weights: example weights as given (`[D0..DN]`, `[D0..DN, 1]`, ...), or None.
    mask: a boolean (or 0/1) array of the rows that take part, or None.
  """

  weights: Any = None
  mask: Any = None


class Batch(NamedTuple):
  """Checked inputs of one head, in compute dtype.

  Elements that are absent (masked out, or with a missing label) hold safe
  values (logits and labels 0) and weight 0, so nothing downstream reads
  their real values.

  Attributes:
    logits: `[D0, ..., DN, logits_dim]`, float32 or wider.
    labels: processed labels, `[D0, ..., DN, label_dim]` (ids for multi-class).
    weights: example weights broadcast to the unreduced loss' shape, 0 where
      an element is absent.
    features: the features dict, only for a custom `loss_fn` that takes it.
    present: bool, the unreduced loss' shape: which elements take part; None
      when all do.
    label_present: bool, the labels' shape: which labels take part; None
      when all do.
    screen: int32, broadcasting to the unreduced loss' shape: 0 where the
      element's inputs pass the head's value checks, else `K - k` for the
      first of its K problems (in `value_checks`' order), k, that fails; or
      None. `loss_terms` hands it on as `LossTerms.failed`; its largest value
      names the head's first failing problem (`checks.enforce_screens`), so
      the checks cost no pass of their own (`HeadKernel.screens`).
  """

  logits: jax.Array
  labels: jax.Array
  weights: jax.Array
  features: Features = None
  present: jax.Array | None = None
  label_present: jax.Array | None = None
  screen: jax.Array | None = None


class LossTerms(NamedTuple):
  """A reduced loss as `total / denominator`; `denominator=None` means 1.

  Keeping the two apart lets a loss over a batch split across devices be
  reduced exactly: sum the totals, sum the denominators, then divide.

  A loss made of K separately reduced components (a ranking head's
  `{"softmax": 1.0, "mean_squared": 0.25}`) has `[K]` totals and
  denominators and their `component_weights`: it reduces to
  `sum_k a_k * total_k / denominator_k`.

  `failed`, with a `Batch.screen`, is that screen broadcast to the losses'
  shape, unreduced (a multi_head reduces all its groups' screens in one
  go): its largest value is 0 when every value check passed, else `K - k`
  for the first problem k that failed (`checks.enforce_screens` names it).
  """

  total: jax.Array
  denominator: jax.Array | None
  component_weights: jax.Array | None = None
  failed: jax.Array | None = None


class HeadKernel(NamedTuple):
  """A head's computations on explicit inputs (no features dict, no key suffix).

  Attributes:
    get_weights: `features -> RowWeights` (or another pytree), what the head
      reads from the features: its weight column and mask.
    validate: `(logits, labels, row_weights) -> None`; raises on bad shapes
      and dtypes (at trace time). Value checks are `value_checks`' job; a
      kernel without `value_checks` enforces them here.
    prepare: `(logits, labels, row_weights) -> Batch`; pure and vmappable.
    loss_terms: `Batch -> LossTerms`.
    statistics: `Batch -> Stats`, additive metric statistics, keys unsuffixed.
    validate_logits: `logits -> None`, the checks of `predict_fn`.
    predictions: `logits -> dict` of arrays; pure and vmappable.
    group_key: heads with equal, non-None keys compute identically up to their
      inputs, so `multi_head` may evaluate them as one vectorized computation.
    value_checks: `(logits, labels, row_weights) -> {problem: ValueCheck}`,
      pure and vmappable, or None. The problems are static strings; the
      caller enforces them as `"<head>: <problem>"`.
    screens: `(value_checks, prepare, loss_terms)` when `prepare` adds those
      value checks to the batch as `Batch.screen` (with checks on) and
      `loss_terms` hands it on as `LossTerms.failed`, else None. Then a caller
      may enforce the checks from `failed` (`checks.enforce_screens`), at
      next to no cost of their own; `screened(kernel)` says whether that
      still holds (a kernel with any of the three replaced is checked the
      plain way).
  """

  get_weights: Callable[[Features], Any]
  validate: Callable[..., None]
  prepare: Callable[..., Batch]
  loss_terms: Callable[[Batch], LossTerms]
  statistics: Callable[[Batch], Stats]
  validate_logits: Callable[[Any], None]
  predictions: Callable[[Any], dict[str, jax.Array]]
  group_key: Hashable | None
  value_checks: Callable[..., dict[str, checks.ValueCheck]] | None = None
  screens: tuple[Callable[..., Any], ...] | None = None


def screened(kernel: HeadKernel) -> bool:
  """Whether a kernel's value checks ride on its loss (see `HeadKernel.screens`)."""
  return kernel.screens is not None and all(
      a is b
      for a, b in zip(kernel.screens, (kernel.value_checks, kernel.prepare, kernel.loss_terms))
  )


def check_inputs(kernel: HeadKernel, where: str, logits: Any, labels: Any, row_weights: Any) -> None:
  """A head's shape checks, then, where they can act, its value checks."""
  kernel.validate(logits, labels, row_weights)
  if kernel.value_checks is None:
    return
  if checks.should_check(logits, labels, row_weights):
    checks.enforce(where, kernel.value_checks(logits, labels, row_weights))
  elif checks.is_concrete(labels, row_weights):
    # Labels and weights closed over as constants can be checked at trace
    # time, beside stand-in logits (which pass every logits check).
    with jax.ensure_compile_time_eval():
      stand_in = np.zeros(np.shape(logits), np.float32)
      checks.enforce(where, kernel.value_checks(stand_in, labels, row_weights))


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


def _sigmoid_cutoff(dtype: Any) -> float:
  """TF's float32 cutoff; for wider floats, where e / (1 + e) rounds to 1 in them."""
  if jnp.finfo(dtype).bits <= 32:
    return _SIGMOID_CUTOFF
  return float(np.log(2.0 ** (jnp.finfo(dtype).nmant + 1)))


def sigmoid(x: jax.Array) -> jax.Array:
  """The logistic function, rounded as TensorFlow's CPU kernel rounds it.

  `jax.nn.sigmoid` and TF's sigmoid differ by an ulp or two on about half of
  all float32 inputs. That is harmless except where a probability lands
  exactly on a decision threshold or an AUC bucket edge, where the last bit
  decides the bucket; computing `e / (1 + e)` with TF's cutoff agrees with
  TF far more often. Used for predictions and metrics, never for losses
  (those stay in log-sigmoid form).
  """
  x = jnp.asarray(x)
  e = jnp.exp(jnp.minimum(x, _sigmoid_cutoff(x.dtype)))
  return e / (1.0 + e)


# ----------------------------------------------------------------------------
# Losses and their reduction.


@jax.custom_jvp
def sigmoid_cross_entropy(logits: jax.Array, labels: jax.Array) -> jax.Array:
  """Sigmoid cross-entropy, `max(x, 0) - x z + log1p(exp(-|x|))`, for labels in [0, 1].

  The stable form TensorFlow and optax use: exact in float32 for confident
  predictions, where `softplus(x) - x z` cancels (it is 0 from x = 16 with
  z = 1). The gradient, `sigmoid(x) - z`, is written from the same
  `exp(-|x|)` so that it too keeps full relative precision (`1 - z - e/(1+e)`
  for x >= 0), and costs one exponential for loss and gradient together.
  """
  return jnp.maximum(logits, 0) - logits * labels + jnp.log1p(jnp.exp(-jnp.abs(logits)))


@sigmoid_cross_entropy.defjvp
def _sigmoid_cross_entropy_jvp(primals, tangents):
  logits, labels = primals
  logits_dot, labels_dot = tangents
  e = jnp.exp(-jnp.abs(logits))
  loss = jnp.maximum(logits, 0) - logits * labels + jnp.log1p(e)
  small = e / (1 + e)  # sigmoid(-|x|)
  d_logits = jnp.where(logits >= 0, (1 - labels) - small, small - labels)
  return loss, d_logits * logits_dot - logits * labels_dot


def safe_divide(numerator: ArrayLike, denominator: ArrayLike) -> jax.Array:
  """`numerator / denominator`, and 0 where the denominator is 0 (gradient-safe)."""
  denominator = jnp.asarray(denominator)
  is_zero = denominator == 0
  return jnp.where(is_zero, 0.0, numerator / jnp.where(is_zero, 1.0, denominator))


def loss_terms(
    losses: jax.Array,
    weights: jax.Array,
    reduction: LossReduction,
    present: jax.Array | None = None,
    screen: jax.Array | None = None,
) -> LossTerms:
  """The weighted sum of `losses` and the denominator its reduction divides by.

  Args:
    losses: unreduced losses, `[D0, ..., DN, k]`.
    weights: example weights broadcast to `losses`' shape (0 where absent).
    reduction: the head's loss reduction.
    present: bool, `losses`' shape: the elements that take part, or None for
      all. Absent elements add nothing, whatever their loss, and are not
      counted by `sum_over_batch_size`.
    screen: optionally, `Batch.screen`, handed on as `LossTerms.failed`.
  """
  failed = None
  if screen is not None:
    # Unreduced: a multi_head reduces all its groups' screens at once.
    failed = jnp.broadcast_to(screen, losses.shape)
  weighted = weights * losses
  if present is not None:
    weighted = jnp.where(present, weighted, 0.0)
  total = jnp.sum(weighted)
  if reduction == LossReduction.SUM:
    return LossTerms(total, None, failed=failed)
  if reduction == LossReduction.SUM_OVER_BATCH_SIZE:
    if present is None:
      denominator = jnp.asarray(losses.size, total.dtype)
    else:
      denominator = jnp.sum(jnp.broadcast_to(present, losses.shape).astype(total.dtype))
  elif reduction == LossReduction.MEAN:
    denominator = jnp.sum(weights)
  else:
    denominator = jnp.sum((weights != 0).astype(total.dtype))
  return LossTerms(total, denominator, failed=failed)


def shard_share(value: ArrayLike, axis_name: Any = None) -> jax.Array:
  """One shard's share of a value every shard holds: their sum over the axis is `value`."""
  value = jnp.asarray(value)
  if axis_name is None:
    return value
  return value / jax.lax.axis_size(axis_name)


def reduce_loss(terms: LossTerms, axis_name: Any = None) -> jax.Array:
  """Divides out a loss; with `axis_name`, by the denominator of the whole batch."""
  if terms.denominator is None:
    loss = terms.total
  else:
    denominator = jax.lax.stop_gradient(terms.denominator)
    if axis_name is not None:
      denominator = jax.lax.psum(denominator, axis_name)
    loss = safe_divide(terms.total, denominator)
  if terms.component_weights is not None:
    loss = jnp.sum(terms.component_weights * loss, axis=-1)
  return loss


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
    # Staged checks of a screened head ride on its loss: checked in full
    # only when the loss comes out non-finite.
    deferred = screened(kernel) and checks.deferrable(logits, labels, weights)
    if deferred:
      kernel.validate(logits, labels, weights)
    else:
      check_inputs(kernel, where, logits, labels, weights)
    batch = kernel.prepare(logits, labels, weights)._replace(features=features)
    terms = kernel.loss_terms(batch)
    loss = reduce_loss(terms, axis_name)
    if deferred:
      checks.enforce_screens(
          [([where], problems_of(kernel, logits, labels, weights), jnp.max(terms.failed)[None])]
      )
    checks.require_finite(where, "the loss", loss, hint=checks.OVERFLOW_HINT)
    return loss

  def metric_fn(logits, labels, features=None, *, axis_name=None):
    del axis_name  # A single head's statistics are already additive shares.
    weights = kernel.get_weights(features)
    check_inputs(kernel, where, logits, labels, weights)
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
    ok: `labels -> bool array` of the labels' shape, true where a label value
      is valid; None for any value. Only present labels are checked.
    message: what valid labels are, for the error.
    convert: `(labels, dtype) -> processed labels`.
  """

  integer: bool
  ok: Callable[[jax.Array], jax.Array] | None
  message: str
  convert: Callable[[jax.Array, Any], jax.Array]


def label_presence(labels: Any, missing_label: Any) -> Any:
  """Where labels are not `missing_label` (NaN matches NaN); None if nothing can be missing."""
  if missing_label is None:
    return None
  labels = jnp.asarray(labels)
  if isinstance(missing_label, float) and math.isnan(missing_label):
    if not jnp.issubdtype(labels.dtype, jnp.floating):
      return None
    return ~jnp.isnan(labels)
  return labels != jnp.asarray(missing_label).astype(labels.dtype)


def broadcast_mask(mask: Any, shape: tuple[int, ...]) -> jax.Array:
  """A row mask `[D0..DK]` broadcast over the trailing axes of `shape`."""
  mask = jnp.asarray(mask).astype(bool)
  mask = mask.reshape(mask.shape + (1,) * (len(shape) - mask.ndim))
  return jnp.broadcast_to(mask, shape)


def combine_presence(*masks: Any) -> Any:
  """The conjunction of the non-None masks (already broadcast alike), or None."""
  masks = [m for m in masks if m is not None]
  if not masks:
    return None
  out = masks[0]
  for m in masks[1:]:
    out = out & m
  return out


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
    logits_check: Callable[[Any], dict[str, checks.ValueCheck]] | None = None,
) -> HeadKernel:
  """The kernel of every built-in head: shared checks around family-specific math.

  It gives every head weights, the four reductions, masks and missing labels
  (an absent element is replaced by safe values before any arithmetic, so
  neither its value nor its gradient is ever read), and value checks that
  look only at the elements that take part.

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
    logits_check: optional family-specific value checks on logits,
      `logits -> {problem: ValueCheck}` (pure and vmappable).
  """
  where = config.description
  takes_features = checks.validate_loss_fn(where, custom_loss_fn)

  def get_weights(features):
    return RowWeights(
        checks.fetch_weights(where, features, config.weight_column),
        checks.fetch_mask(where, features, config.mask_column),
    )

  def check_logit_shape(logits):
    return checks.check_logits(where, logits, config.logits_dim)

  def validate_logits(logits):
    logits = check_logit_shape(logits)
    if checks.should_check(logits):
      results = {
          "logits must be finite (no NaN or infinity)": checks.ValueCheck(
              checks.all_finite(logits)
          )
      }
      if logits_check is not None:
        results.update(logits_check(jnp.asarray(logits)))
      checks.enforce(where, results)

  def presence(logits, labels, row_weights):
    """Presence of labels `[.., label_dim]` and of logits, or None where all are present."""
    labels = expand_labels(labels, len(np.shape(logits)))
    label_present = label_presence(labels, config.missing_label)
    if row_weights.mask is not None:
      label_present = combine_presence(
          label_present, broadcast_mask(row_weights.mask, tuple(labels.shape))
      )
    if label_present is None:
      return None, None
    logits_shape = tuple(np.shape(logits))
    if label_present.shape[-1] == logits_shape[-1]:
      logit_present = label_present
    else:
      logit_present = jnp.broadcast_to(
          jnp.any(label_present, axis=-1, keepdims=True), logits_shape
      )
    return label_present, logit_present

  def validate(logits, labels, row_weights):
    logits_shape = tuple(np.shape(check_logit_shape(logits)))
    checks.check_labels(
        where,
        labels,
        logits_shape,
        label_dim,
        integer=label_rule.integer,
        has_vocabulary=config.label_vocabulary is not None,
    )
    checks.check_weights(
        where, row_weights.weights, logits_shape, per_logit=per_logit_weights
    )
    checks.check_mask(where, row_weights.mask, logits_shape)

  def value_checks(logits, labels, row_weights):
    logits = jnp.asarray(logits)
    labels = expand_labels(labels, logits.ndim)
    label_present, logit_present = presence(logits, labels, row_weights)
    results = {
        "logits must be finite (no NaN or infinity)": checks.ValueCheck(
            checks.finite(logits, logit_present)
        )
    }
    if logits_check is not None:
      results.update(
          logits_check(logits if logit_present is None else jnp.where(logit_present, logits, 0))
      )
    if label_rule.ok is not None:
      valid = label_rule.ok(labels)
      if label_present is not None:
        valid = valid | ~label_present
      results[f"labels must be {label_rule.message}"] = checks.ValueCheck(
          valid, labels, label_present
      )
    weights = row_weights.weights
    if weights is not None:
      weights = jnp.asarray(weights)
      weight_present = None
      if label_present is not None:
        # Presence in the weights' own shape: per row, or per logit.
        if weights.ndim == logits.ndim and weights.shape[-1] != 1:
          weight_present = logit_present
        else:
          weight_present = jnp.any(label_present, axis=-1).reshape(
              tuple(logits.shape[:-1]) + (1,) * (weights.ndim - logits.ndim + 1)
          )
      results["weights must be finite (no NaN or infinity)"] = checks.ValueCheck(
          checks.finite(weights, weight_present)
      )
      nonnegative = weights >= 0
      if weight_present is not None:
        nonnegative = nonnegative | ~weight_present
      results["weights must be >= 0"] = checks.ValueCheck(nonnegative)
    mask = row_weights.mask
    if mask is not None and jnp.asarray(mask).dtype != bool:
      mask = jnp.asarray(mask)
      results["the mask must hold only 0 and 1 (or booleans)"] = checks.ValueCheck(
          jnp.all((mask == 0) | (mask == 1))
      )
    return results

  def prepare(logits, labels, row_weights):
    screen = None
    if checks.checks_enabled():
      screen = screen_of(value_checks(logits, labels, row_weights), logits, loss_dim)
    logits = jnp.asarray(logits)
    logits = logits.astype(compute_dtype(logits.dtype))
    labels = expand_labels(labels, logits.ndim)
    label_present, logit_present = presence(logits, labels, row_weights)
    loss_shape = tuple(logits.shape[:-1]) + (loss_dim,)
    weights = broadcast_weights(row_weights.weights, loss_shape, logits.dtype)
    present = None
    if label_present is not None:
      # Safe values first: an absent element's logits and labels are never read.
      logits = jnp.where(logit_present, logits, 0)
      labels = jnp.where(label_present, labels, jnp.zeros((), labels.dtype))
      present = (
          label_present
          if label_dim == loss_dim
          else jnp.any(label_present, axis=-1, keepdims=True)
      )
      present = jnp.broadcast_to(present, loss_shape)
      weights = jnp.where(present, weights, 0)
    labels = label_rule.convert(labels, logits.dtype)
    return Batch(
        logits, labels, weights, present=present, label_present=label_present, screen=screen
    )

  if custom_loss_fn is None:
    compute_loss = unreduced_loss
  else:
    compute_loss = functools.partial(
        call_loss_fn, where, custom_loss_fn, takes_features, loss_dim=loss_dim
    )

  def kernel_loss_terms(batch):
    return loss_terms(
        compute_loss(batch), batch.weights, config.loss_reduction, batch.present, batch.screen
    )

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
        _static_key(config.missing_label),
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
      value_checks=value_checks,
      screens=(value_checks, prepare, kernel_loss_terms),
  )


def problems_of(kernel: HeadKernel, logits: Any, labels: Any, row_weights: Any) -> list[str]:
  """The problems of a kernel's `value_checks` on these inputs, in its order (`Batch.screen`)."""
  problems = []

  def record(*args):
    problems[:] = list(kernel.value_checks(*args))

  jax.eval_shape(record, logits, labels, row_weights)
  return problems


def screen_of(results: dict[str, checks.ValueCheck], logits: Any, loss_dim: int) -> jax.Array:
  """`Batch.screen` from a head's value checks: 0 where every check holds, else `K - k`.

  `k` is the first of the K checks (in order) that fails on the element, so
  the largest screen value of a batch names its first failing problem.

  Each check's flags are brought to a shape that broadcasts against the
  unreduced loss `[D0..DN, loss_dim]`: flags over another last dimension
  (the logits of a multi-class head) are reduced over it, flags of rows get
  a last axis, flags of anything else are reduced to one. Only elementwise
  ops and last-axis reductions, so that under `vmap` the heads' axis stays
  where it is (a reshape or a scalar `where` would move it to the front,
  and the loss would then be summed in a transposed copy).
  """
  rows = tuple(np.shape(logits)[:-1])
  code = None
  for k, check in enumerate(reversed(list(results.values()))):
    flags = jnp.asarray(check.ok, bool)
    if flags.shape == rows:
      flags = flags[..., None]
    elif flags.shape[:-1] == rows and flags.shape[-1] not in (1, loss_dim):
      flags = jnp.all(flags, axis=-1, keepdims=True)
    elif flags.shape[:-1] != rows:
      flags = jnp.all(flags)
    # Last problem first, so that an earlier failing one overwrites it.
    value = jnp.int32(k + 1)
    code = jnp.where(flags, jnp.int32(0), value) if code is None else jnp.where(flags, code, value)
  return code


def _static_key(value: Any) -> Any:
  """A hashable key that tells NaN from other floats (NaN != NaN)."""
  if isinstance(value, float) and math.isnan(value):
    return ("nan",)
  return value
