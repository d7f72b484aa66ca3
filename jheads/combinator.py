"""The combinator: several named heads trained as one, on one set of logits.

`multi_head` talks to its heads through their `HeadKernel` only. Heads whose
kernels share a `group_key` (same kind and static configuration) and whose
inputs share shapes and dtypes are evaluated as one vectorized computation:
their logits, labels and weights are stacked on a new leading axis and the
kernel is `jax.vmap`-ed over it. A model with a hundred binary heads thus
computes one `[100, batch, 1]` loss instead of a hundred small ones, which XLA
does not merge by itself.

When logits come as one array, they are never cut into one slice per head:
the gradient of a slice is a pad of the whole array, and a hundred of those
cost more than the losses. One static gather puts the columns of all grouped
heads in group order (nothing to gather when like heads are already
adjacent), and each group takes one slice of that.
"""

from __future__ import annotations

import collections
import math
from collections.abc import Mapping, Sequence
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jheads import base
from jheads import checks
from jheads import metrics
from jheads import stacked

_WHERE = "multi_head"


class _Inputs(NamedTuple):
  """Checked inputs of every head.

  Attributes:
    per_head: `(logits, labels, weights)` of each head, in head order.
    groups: head indices of each group of like heads, in head order.
    group_logits: `a group's indices -> their logits stacked on a leading axis`.
    deferred: the groups whose value checks ride on their losses
      (`HeadKernel.screens`): enforced by `enforce_screened` from the
      reduced screens their losses carry, with no pass of their own.
    stacked: each group's stacked inputs, once built (`_group_inputs`): the
      value checks, the losses and the statistics of a call share them, so
      a thousand labels are stacked once.
  """

  per_head: list[tuple[Any, Any, Any]]
  groups: list[list[int]]
  group_logits: Callable[[list[int]], Any]
  deferred: tuple[int, ...] = ()
  stacked: dict[tuple[int, ...], Any] | None = None


class MultiHead(NamedTuple):
  """A head spec combining named heads; built by `multi_head`.

  Attributes:
    name: the heads' names joined with `_`.
    logits_dim: the sum of the heads' logits dims.
    loss_fn: `(logits, labels, features=None, *, head_weights=None,
      axis_name=None) -> scalar`: `sum_i head_weight_i * loss_i`.
      `head_weights` overrides the weights given at construction; it may be
      a traced array, so weights can change between steps without
      recompiling. `axis_name` as for `Head.loss_fn`.
    metric_fn: `(logits, labels, features=None, *, axis_name=None) -> stats`;
      each head's statistics under `<metric>/<head>` keys, plus
      `loss/<head>`, the mean over batches of each head's reduced loss. The
      statistics come as a `jheads.stacked.GroupedStats`: a read-only
      mapping with those keys, holding one stacked array per statistic per
      group of like heads.
    predict_fn: `logits -> dict` keyed by `(head_name, prediction_key)`.
    heads: the component heads (nested multi_heads flattened).
    head_weights: the default head weights.
    head_losses_fn: `(logits, labels, features=None, *, axis_name=None) ->
      {head_name: scalar}`, each head's unweighted reduced loss, as a
      `jheads.stacked.HeadValues` (a read-only mapping over one `[n_heads]`
      array; `.stacked` is the array).
    losses_fn: `(logits, labels, features=None, *, head_weights=None,
      axis_name=None) -> (loss, head_losses)`: both of the above from one
      computation, as a train step reports them.
  """

  name: str
  logits_dim: int
  loss_fn: Callable[..., jax.Array]
  metric_fn: Callable[..., base.Stats]
  predict_fn: Callable[[Any], dict[tuple[str, str], jax.Array]]
  heads: tuple[base.Head, ...]
  head_weights: tuple[float, ...]
  head_losses_fn: Callable[..., dict[str, jax.Array]]
  losses_fn: Callable[..., tuple[jax.Array, dict[str, jax.Array]]]


def multi_head(
    heads: Sequence[base.Head | MultiHead],
    head_weights: Sequence[float] | None = None,
    *,
    mask_column: str | Callable[[Any], Any] | None = None,
    vectorize: bool = True,
) -> MultiHead:
  """Combines named heads into one head spec (TF's `MultiHead`).

  Logits come either as a dict keyed by head name, or as one array whose
  last axis is split, in head order, into slices of each head's `logits_dim`.
  Labels always come as a dict keyed by head name; `features` is shared.

  The training loss is `sum_i head_weights[i] * loss_i` (weights default
  to 1). Metrics are each head's, with keys `<metric>/<head>`, plus
  `loss/<head>`: the mean over evaluated batches of each head's reduced
  training loss, not multiplied by its head weight.

  A multi_head may contain multi_heads: they are flattened into their heads,
  their head weights multiplied by the outer weight. Predictions, labels and
  dict logits are then keyed by the inner heads' names.

  Differences from TensorFlow: duplicate head names are rejected (TF silently
  let one head's metrics overwrite the other's); every metric streams over
  batches (TF 2's `MultiHead.update_metrics` re-created each head's metrics
  per call, so only `loss/<head>` accumulated); and the logits split error
  states the expected and actual sizes the right way round.

  Args:
    heads: named heads (or multi_heads).
    head_weights: one float per head, or None for all ones.
    mask_column: a features key (or a callable `features -> mask`) of a
      boolean `[D0, ..., DN]` mask of the rows that take part: masked-out
      rows are absent from every head, combined with each head's own mask.
    vectorize: evaluate like heads as one vectorized computation. Results
      are identical either way; turn it off only to compare or debug.

  Returns:
    A `MultiHead`.

  Example:
    >>> import jax.numpy as jnp, jheads
    >>> head = jheads.multi_head(
    ...     [jheads.binary_classification_head(name="click"),
    ...      jheads.regression_head(name="dwell")],
    ...     head_weights=[1.0, 0.5])
    >>> logits = jnp.array([[0.0, 1.0], [0.0, 3.0]])  # click | dwell
    >>> labels = {"click": jnp.array([1, 0]), "dwell": jnp.array([1.0, 1.0])}
    >>> round(float(head.loss_fn(logits, labels)), 4)  # 0.6931 + 0.5 * 2
    1.6931
    >>> sorted(head.predict_fn(logits))[:2]
    [('click', 'all_class_ids'), ('click', 'class_ids')]
  """
  heads, head_weights = _flatten(heads, head_weights)
  mask_column = checks.check_mask_column(_WHERE, mask_column)
  names = tuple(head.name for head in heads)
  dims = tuple(head.logits_dim for head in heads)
  unsized = [n for n, d in zip(names, dims) if d is None]
  offsets = tuple(int(x) for x in np.cumsum((0,) + tuple(d or 0 for d in dims)))
  total_dim = None if unsized else offsets[-1]

  def split_logits(logits: Any) -> list[Any]:
    """Each head's logits: a dict's entries, or the slices of one array."""
    logits = checked_logits(logits)
    if isinstance(logits, Mapping):
      return [logits[n] for n in names]
    return [head_slice(logits, i) for i in range(len(names))]

  def head_slice(logits: Any, i: int) -> Any:
    return logits[..., offsets[i] : offsets[i + 1]]

  def split_for_checks(logits: Any) -> tuple[list[Any], list[bool]]:
    """Each head's logits, or under a trace a stand-in of its shape; and which are its own.

    Shape checks and grouping read only shapes and dtypes, and a traced
    step's computations read each group's logits as one block
    (`grouping`): a thousand per-head slices would only be traced (and,
    under `jax.grad`, linearized) to be thrown away, for seconds. So under
    a trace one slice per logits dim stands in for every head of that dim;
    `own_logits` puts in the real slices where a head's own are read.
    """
    logits = checked_logits(logits)
    if isinstance(logits, Mapping) or not isinstance(logits, jax.core.Tracer):
      per_head = split_logits(logits)
      return per_head, [True] * len(per_head)
    first: dict[int, int] = {}
    for i, d in enumerate(dims):
      first.setdefault(d, i)
    stand_ins = {d: head_slice(logits, i) for d, i in first.items()}
    return [stand_ins[d] for d in dims], [first[d] == i for i, d in enumerate(dims)]

  def own_logits(logits: Any, per_head: list[Any], own: list[bool], groups: list[list[int]]) -> None:
    """Real slices, in place, for the heads whose own logits are read (see `split_for_checks`).

    Those of a group of one, and of a head whose kernel has no vectorized
    value checks (`base.check_inputs` reads its values).
    """
    for indices in groups:
      if len(indices) == 1 or heads[indices[0]].kernel.value_checks is None:
        for i in indices:
          if not own[i]:
            per_head[i] = (head_slice(logits, i),) + tuple(per_head[i][1:])
            own[i] = True

  def checked_logits(logits: Any) -> Any:
    if isinstance(logits, Mapping):
      missing = [n for n in names if n not in logits]
      if missing:
        raise ValueError(
            f"{_WHERE}: logits dict has no entry for head(s) {missing}; it has"
            f" {sorted(logits)}."
        )
      return logits
    if unsized:
      raise ValueError(
          f"{_WHERE}: head {unsized[0]!r} has no fixed logits_dim (set its"
          " list_size); pass logits as a dict keyed by head name."
      )
    logits = checks.as_array(logits)
    if logits.ndim < 2 or logits.shape[-1] != total_dim:
      raise ValueError(
          f"{_WHERE}: cannot split logits of shape {tuple(logits.shape)} among"
          f" heads {list(names)} with logits dims {list(dims)}: the last"
          f" dimension must be {total_dim} (their sum), got"
          f" {logits.shape[-1] if logits.ndim else 'a scalar'}."
      )
    return logits

  def split_labels(labels: Any) -> list[Any]:
    if not isinstance(labels, Mapping):
      raise ValueError(
          f"{_WHERE}: labels must be a dict keyed by head name, got"
          f" {type(labels).__name__}."
      )
    missing = [n for n in names if n not in labels]
    if missing:
      raise ValueError(
          f"{_WHERE}: labels dict has no entry for head(s) {missing}; it has"
          f" {sorted(labels)}."
      )
    return [labels[n] for n in names]

  def grouping(logits: Any, per_head: list[tuple[Any, Any, Any]]):
    """The groups, and `indices -> the group's logits stacked on a leading axis`."""
    groups = _groups(heads, per_head, vectorize)
    stacked = [g for g in groups if len(g) > 1]
    if isinstance(logits, Mapping) or not stacked:
      return groups, lambda indices: _stack([per_head[i][0] for i in indices])
    columns = [np.stack([np.arange(offsets[i], offsets[i + 1]) for i in g]) for g in stacked]
    order = np.concatenate([c.ravel() for c in columns])
    logits = jnp.asarray(logits)
    if np.array_equal(order, np.arange(order[0], order[0] + order.size)):
      permuted = logits[..., order[0] : order[0] + order.size]
    else:
      permuted = logits[..., order]
    starts = np.cumsum([0] + [c.size for c in columns])
    blocks = {tuple(g): (int(s), c.shape) for g, s, c in zip(stacked, starts, columns)}

    def group_logits(indices):
      start, shape = blocks[tuple(indices)]
      block = permuted[..., start : start + shape[0] * shape[1]]
      return _heads_last(block, shape)

    return groups, group_logits

  def checked_inputs(logits, labels, features) -> _Inputs:
    per_head_logits, own = split_for_checks(logits)
    per_head_labels = split_labels(labels)
    per_head_weights = [h.kernel.get_weights(features) for h in heads]
    if mask_column is not None:
      outer = checks.fetch_mask(_WHERE, features, mask_column)
      per_head_weights = [_with_outer_mask(w, outer) for w in per_head_weights]
    for head, lo, la, w in zip(heads, per_head_logits, per_head_labels, per_head_weights):
      head.kernel.validate(lo, la, w)
    per_head = list(zip(per_head_logits, per_head_labels, per_head_weights))
    inputs = _Inputs(per_head, *grouping(logits, per_head), stacked={})
    own_logits(logits, per_head, own, inputs.groups)
    if checks.should_check(logits, labels, per_head_weights):
      if checks.deferrable(logits, labels, per_head_weights):
        # Staged checks: a group that screens its loss is checked from the
        # screen its loss carries (`enforce_screened`).
        deferred = tuple(
            g
            for g, indices in enumerate(inputs.groups)
            if base.screened(heads[indices[0]].kernel)
        )
        inputs = inputs._replace(deferred=deferred)
      value_checks(inputs, [g for g in range(len(inputs.groups)) if g not in inputs.deferred])
    else:
      for head, (lo, la, w) in zip(heads, per_head):
        base.check_inputs(head.kernel, head.config.description, lo, la, w)
    return inputs

  def value_checks(inputs: _Inputs, group_numbers: Sequence[int]) -> None:
    """Each head's value checks; one vectorized computation per group of like heads."""
    for indices in (inputs.groups[g] for g in group_numbers):
      kernel = heads[indices[0]].kernel
      if kernel.value_checks is None:
        for i in indices:
          base.check_inputs(kernel, heads[i].config.description, *inputs.per_head[i])
        continue
      # Pytree maps sort dict keys; the head's own order of problems is kept aside.
      order = []

      def value_checks(*raw, kernel=kernel, order=order):
        results = kernel.value_checks(*raw)
        order[:] = list(results)
        return results

      if len(indices) == 1:
        results = jax.tree.map(lambda x: x[None], value_checks(*inputs.per_head[indices[0]]))
      else:
        args, axes = _group_inputs(inputs, indices)
        results = jax.vmap(value_checks, in_axes=axes)(*args)
      checks.enforce_all(
          [heads[i].config.description for i in indices], {p: results[p] for p in order}
      )

  def enforce_screened(inputs: _Inputs, evaluated: Sequence[tuple[Any, ...]]) -> None:
    """The screened groups' value checks, from the `LossTerms.failed` of their losses."""
    segments, screens = [], []
    for g, (indices, terms) in enumerate(evaluated):
      if g in inputs.deferred:
        problems = base.problems_of(heads[indices[0]].kernel, *inputs.per_head[indices[0]])
        segments.append(([heads[i].config.description for i in indices], problems))
        screens.append(jnp.reshape(terms.failed, (len(indices), -1)))
    # Screens of one size are reduced together: one reduction for all groups, not one each.
    failed = [None] * len(screens)
    for size in dict.fromkeys(x.shape[1] for x in screens):
      same = [i for i, x in enumerate(screens) if x.shape[1] == size]
      reduced = jnp.max(jnp.concatenate([screens[i] for i in same]), axis=1)
      bounds = np.cumsum([0] + [screens[i].shape[0] for i in same])
      for i, start, stop in zip(same, bounds[:-1], bounds[1:]):
        failed[i] = reduced[start:stop]
    checks.enforce_screens([(*segment, f) for segment, f in zip(segments, failed)])

  def enforce_finite(what: str, indices: Any, ok: Any) -> None:
    """`<head>: <what> must be finite` for the heads at `indices`, from per-head flags."""
    checks.enforce_all(
        [heads[i].config.description for i in indices],
        {f"{what} must be finite (no NaN or infinity){checks.OVERFLOW_HINT}": checks.ValueCheck(ok)},
    )

  def evaluate(
      inputs: _Inputs,
      features: Any,
      kernel_fn: Callable[[base.HeadKernel, base.Batch], Any],
  ) -> list[tuple[np.ndarray, Any]]:
    """Runs `kernel_fn` on every head; returns (head indices, stacked outputs) per group."""
    results = []
    for indices in inputs.groups:
      kernel = heads[indices[0]].kernel
      if len(indices) == 1:
        batch = kernel.prepare(*inputs.per_head[indices[0]])._replace(features=features)
        out = jax.tree.map(lambda x: x[None], kernel_fn(kernel, batch))
      else:
        args, axes = _group_inputs(inputs, indices)
        out = jax.vmap(lambda *raw: kernel_fn(kernel, kernel.prepare(*raw)), in_axes=axes)(*args)
      results.append((np.asarray(indices), out))
    return results

  def grouped_losses(logits, labels, features, axis_name):
    inputs = checked_inputs(logits, labels, features)
    evaluated = evaluate(inputs, features, lambda kernel, batch: kernel.loss_terms(batch))
    enforce_screened(inputs, evaluated)
    return [(indices, base.reduce_loss(terms, axis_name)) for indices, terms in evaluated]

  def losses_fn(logits, labels, features=None, *, head_weights=None, axis_name=None):
    weights = _weights_vector(head_weights, default_weights, len(heads))
    groups = grouped_losses(logits, labels, features, axis_name)
    order = np.concatenate([indices for indices, _ in groups])
    losses = jnp.concatenate([group_losses for _, group_losses in groups])
    weights = weights[order]
    if checks.should_check(losses, weights):
      enforce_finite("the loss", order, jnp.isfinite(losses) | (weights == 0))
    # A head weighted 0 adds nothing, even when its loss is infinite (0 * inf).
    weighted = jnp.where(weights == 0, 0.0, losses)
    # HIGHEST: a float32 loss must not go through a bf16 matmul pass on TPU.
    total = jnp.dot(weights, weighted, precision=jax.lax.Precision.HIGHEST)
    if not np.array_equal(order, np.arange(len(heads))):
      losses = losses[np.argsort(order)]
    return total, stacked.HeadValues(names, losses)

  def loss_fn(logits, labels, features=None, *, head_weights=None, axis_name=None):
    return losses_fn(
        logits, labels, features, head_weights=head_weights, axis_name=axis_name
    )[0]

  def head_losses_fn(logits, labels, features=None, *, axis_name=None):
    return losses_fn(logits, labels, features, axis_name=axis_name)[1]

  def metric_fn(logits, labels, features=None, *, axis_name=None):
    inputs = checked_inputs(logits, labels, features)

    def losses_and_statistics(kernel, batch):
      return kernel.loss_terms(batch), kernel.statistics(batch)

    # One batch counts once however many shards it is split over.
    count = base.shard_share(1.0, axis_name)
    groups = []
    results = evaluate(inputs, features, losses_and_statistics)
    enforce_screened(inputs, [(indices, terms) for indices, (terms, _) in results])
    evaluated = [
        (indices, base.reduce_loss(terms, axis_name), stats)
        for indices, (terms, stats) in results
    ]
    for indices, group_losses, stats in evaluated:
      if checks.should_check(group_losses, stats):
        finite = [
            jnp.all(jnp.isfinite(x).reshape(x.shape[0], -1), axis=1)
            for x in jax.tree.leaves(stats)
        ]
        enforce_finite("the metric statistics", indices, jnp.all(jnp.stack(finite), axis=0))
      loss = metrics.Ratio(
          group_losses, jnp.broadcast_to(count, group_losses.shape).astype(group_losses.dtype)
      )
      groups.append(stacked.Group([names[i] for i in indices], {"loss": loss, **stats}))
    return stacked.GroupedStats(groups, order=names)

  def predict_fn(logits):
    per_head_logits = split_logits(logits)
    for head, lo in zip(heads, per_head_logits):
      head.kernel.validate_logits(lo)
    per_head: list[dict[str, jax.Array]] = [{} for _ in heads]
    groups, group_logits = grouping(logits, [(lo, None, None) for lo in per_head_logits])
    for indices in groups:
      kernel = heads[indices[0]].kernel
      if len(indices) == 1:
        per_head[indices[0]] = kernel.predictions(per_head_logits[indices[0]])
        continue
      out = jax.vmap(kernel.predictions, in_axes=-1)(group_logits(indices))
      for j, i in enumerate(indices):
        per_head[i] = {key: value[j] for key, value in out.items()}
    return {
        (names[i], key): value
        for i in range(len(heads))
        for key, value in per_head[i].items()
    }

  default_weights = head_weights
  return MultiHead(
      name="_".join(names),
      logits_dim=total_dim,
      loss_fn=loss_fn,
      metric_fn=metric_fn,
      predict_fn=predict_fn,
      heads=heads,
      head_weights=head_weights,
      head_losses_fn=head_losses_fn,
      losses_fn=losses_fn,
  )


def _flatten(
    heads: Any, head_weights: Any
) -> tuple[tuple[base.Head, ...], tuple[float, ...]]:
  """Validates heads and weights; flattens nested multi_heads."""
  if isinstance(heads, (base.Head, MultiHead)) or not isinstance(heads, Sequence):
    raise ValueError(f"{_WHERE}: heads must be a list or tuple of heads, got {type(heads).__name__}.")
  if not heads:
    raise ValueError(f"{_WHERE}: heads must not be empty.")
  if head_weights is None:
    head_weights = [1.0] * len(heads)
  else:
    if isinstance(head_weights, (str, bytes)) or not hasattr(head_weights, "__len__"):
      raise ValueError(f"{_WHERE}: head_weights must be a list of floats, got {head_weights!r}.")
    if len(head_weights) != len(heads):
      raise ValueError(
          f"{_WHERE}: heads and head_weights must have the same length; got"
          f" {len(heads)} heads and {len(head_weights)} head_weights."
      )
    try:
      head_weights = [float(w) for w in head_weights]
    except (TypeError, ValueError):
      raise ValueError(f"{_WHERE}: head_weights must be numbers, got {head_weights!r}.") from None
    if not all(math.isfinite(w) for w in head_weights):
      raise ValueError(f"{_WHERE}: head_weights must be finite, got {head_weights}.")
  flat_heads, flat_weights = [], []
  for position, (head, weight) in enumerate(zip(heads, head_weights)):
    if isinstance(head, MultiHead):
      flat_heads.extend(head.heads)
      flat_weights.extend(weight * w for w in head.head_weights)
    elif isinstance(head, base.Head):
      if head.name is None:
        raise ValueError(
            f"{_WHERE}: every head needs a name; the {head.config.kind} head at"
            f" position {position} has none (pass name=...)."
        )
      flat_heads.append(head)
      flat_weights.append(weight)
    else:
      raise ValueError(
          f"{_WHERE}: heads must be jheads heads; got {type(head).__name__} at"
          f" position {position}."
      )
  counts = collections.Counter(h.name for h in flat_heads)
  duplicates = sorted(n for n, c in counts.items() if c > 1)
  if duplicates:
    raise ValueError(f"{_WHERE}: head names must be unique; duplicated: {duplicates}.")
  return tuple(flat_heads), tuple(flat_weights)


def _weights_vector(head_weights: Any, default: tuple[float, ...], n: int) -> Any:
  if head_weights is None:
    return np.asarray(default, np.float32)
  weights = jnp.asarray(head_weights)
  if weights.shape != (n,):
    raise ValueError(
        f"{_WHERE}: head_weights must have shape ({n},), one per head; got"
        f" shape {weights.shape}."
    )
  checks.require_finite(_WHERE, "head_weights", weights)
  return weights


def _with_outer_mask(row_weights: base.RowWeights, outer: Any) -> base.RowWeights:
  """A head's row weights with the multi_head's mask combined into its own."""
  own = row_weights.mask
  if own is None:
    return row_weights._replace(mask=outer)
  shape = max(np.shape(own), np.shape(outer), key=len)
  return row_weights._replace(
      mask=base.broadcast_mask(own, shape) & base.broadcast_mask(outer, shape)
  )


def _signature(value: Any) -> Any:
  leaves, treedef = jax.tree.flatten(value)
  return treedef, tuple((tuple(np.shape(x)), jnp.result_type(x)) for x in leaves)


def _groups(
    heads: tuple[base.Head, ...], inputs: list[tuple[Any, ...]], vectorize: bool
) -> list[list[int]]:
  """Head indices grouped by kernel group key and input shapes, in head order."""
  groups: dict[Any, list[int]] = {}
  for i, (head, head_inputs) in enumerate(zip(heads, inputs)):
    key = head.kernel.group_key
    if not vectorize or key is None:
      key = ("alone", i)
    else:
      key = (key, tuple(_signature(x) for x in head_inputs))
    groups.setdefault(key, []).append(i)
  return list(groups.values())


def _group_inputs(inputs: _Inputs, indices: list[int]) -> tuple[tuple[Any, Any, Any], Any]:
  """A group's `(logits, labels, row weights)` stacked on a last axis, and their `in_axes`.

  Labels, weights and masks that leave out trailing axes of 1 get them
  while stacked, as every kernel would add them itself (a head's labels
  may drop a last axis of 1, its weights and masks cover a prefix of the
  batch axes): added inside `vmap`, those axes would move the heads' axis
  to the front, and every op mixing them with the logits would transpose.
  Values all heads share (the same array) are passed once, unstacked.
  """
  key = tuple(indices)
  if inputs.stacked is not None and key in inputs.stacked:
    return inputs.stacked[key]
  logits = inputs.group_logits(indices)
  rank = np.ndim(logits) - 1
  labels, labels_axes = _stack_or_share(
      [inputs.per_head[i][1] for i in indices], _label_rank(rank)
  )
  weights, weights_axes = _stack_or_share([inputs.per_head[i][2] for i in indices], rank)
  out = (logits, labels, weights), (-1, labels_axes, weights_axes)
  if inputs.stacked is not None:
    inputs.stacked[key] = out
  return out


def _label_rank(rank: int) -> Callable[[Any], int]:
  """The rank a label or weight array takes: one more when it drops a last axis of 1."""
  return lambda shape: rank if len(shape) == rank - 1 else len(shape)


def _stack(values: list[Any]) -> Any:
  """Per-head pytrees stacked leaf by leaf on a new last axis (see `_stack_last`)."""
  if values[0] is None:
    return None
  return jax.tree.map(lambda *leaves: _stack_last(leaves, len), *values)


_STACK_CHUNK = 100


def _stack_last(arrays: Sequence[Any], target_rank: Callable[[tuple[int, ...]], int]) -> jax.Array:
  """Arrays of one shape as one array with the heads on a new last axis.

  Each array first takes trailing axes of 1 up to `target_rank(its shape)`.
  The heads are stacked on a leading axis, a hundred at a time, each
  stack behind an optimization barrier, then moved last: XLA compiles a
  concatenate of a thousand operands along the minor axis, or fused into
  its consumers, for seconds; along the major axis and kept apart, it
  costs a memcpy per head, and in chunks it compiles in a third less.
  """
  arrays = [jnp.asarray(x) for x in arrays]
  shape = tuple(arrays[0].shape)
  if len(arrays) == 1:
    stacked = arrays[0][None]
  else:
    parts = [
        jax.lax.optimization_barrier(jnp.stack(arrays[i : i + _STACK_CHUNK]))
        for i in range(0, len(arrays), _STACK_CHUNK)
    ]
    while len(parts) > 1:
      parts = [
          jax.lax.optimization_barrier(jnp.concatenate(parts[i : i + _STACK_CHUNK]))
          for i in range(0, len(parts), _STACK_CHUNK)
      ]
    stacked = parts[0]
  stacked = stacked.reshape(stacked.shape + (1,) * (target_rank(shape) - len(shape)))
  return jnp.moveaxis(stacked, 0, -1)


def _stack_or_share(values: list[Any], rank: Any = None) -> tuple[Any, Any]:
  """Stacks per-head values on a last axis for `vmap`, unless every head got the very same one.

  Heads that share a weight column get the same array; passing it once
  (`in_axes=None`) avoids materializing one copy per head. Values may be
  pytrees (a head's `RowWeights`): each leaf is stacked or shared on its
  own. With `rank` (the logits' rank less one), stacked labels and the
  weights and masks of `RowWeights` take the trailing axes of 1 that the
  kernels would give them (see `_group_inputs`); `rank` may also be a
  function of a leaf's shape giving the rank it takes.
  """
  if isinstance(rank, int) and all(isinstance(v, base.RowWeights) for v in values):
    fields = [
        _stack_or_share_leaves([getattr(v, field) for v in values], target_rank)
        for field, target_rank in (("weights", _label_rank(rank)), ("mask", lambda shape: rank))
    ]
    return base.RowWeights(*(f[0] for f in fields)), base.RowWeights(*(f[1] for f in fields))
  return _stack_or_share_leaves(values, rank if callable(rank) else len)


def _stack_or_share_leaves(
    values: list[Any], target_rank: Callable[[tuple[int, ...]], int]
) -> tuple[Any, Any]:
  if values[0] is None:
    return None, None
  leaves = [jax.tree.leaves(v) for v in values]
  treedef = jax.tree.structure(values[0])
  stacked, axes = [], []
  for column in zip(*leaves):
    if all(x is column[0] for x in column):
      stacked.append(column[0])
      axes.append(None)
    else:
      stacked.append(_stack_last(column, target_rank))
      axes.append(-1)
  return jax.tree.unflatten(treedef, stacked), jax.tree.unflatten(treedef, axes)


def _heads_last(block: Any, shape: tuple[int, int]) -> Any:
  """`[D0..DN, G * d]` logits of G heads of `d` logits each, as `[D0..DN, d, G]`.

  The heads' axis goes last (vmapped with `in_axes=-1`), not first: then
  a group of binary heads needs no transpose at all (`[B, G]` is `[B, 1, G]`),
  and every vectorized array keeps a long innermost axis. With the heads
  first, each array of a `d = 1` group ends in a degenerate axis of 1,
  which XLA's CPU backend (its YNNPACK fusions) runs an element at a time:
  a thousand binary heads evaluated ten times slower than hand-written
  JAX on `[B, G]` arrays.
  """
  heads, dim = shape
  block = block.reshape(block.shape[:-1] + (heads, dim))
  return jnp.swapaxes(block, -1, -2)
