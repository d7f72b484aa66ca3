"""Assertions that a head keeps jheads' promises: run them on any head, built-in or your own.

Every head, however it was built, owes its users the same guarantees, and
each assertion here checks one of them on inputs you give:

* `assert_eager_jit_vmap_equal`: eager, `jax.jit` and `jax.vmap` agree;
* `assert_merge_equals_concatenation`: k batches merged with
  `jheads.metrics.merge` give the metrics of the concatenated batch;
* `assert_grouped_equals_per_head`: copies of the head inside a
  `multi_head` give the same numbers vectorized (grouped) and one by one;
* `assert_finite_gradients`: loss, gradient and metrics stay finite at
  |logits| = 1e4;
* `assert_sharded_equals_one_device`: sharded `jit` over a mesh of the
  devices, and `shard_map` with `axis_name`, give the one-device numbers;
* `assert_absent_rows_equal_dropped`: rows masked out (through a
  multi_head's `mask_column`, which works for any head) and rows whose labels
  are missing count exactly as if they had been dropped from the batch.

`check_head` runs them all. Each takes a `jheads.Head` or `jheads.MultiHead`
and a batch `(logits, labels, features)` whose arrays all have the batch on
their first axis; `random_inputs` draws a valid batch for the built-in head
kinds, and `check_head` also takes your own `draw(rng, batch_shape)`.

A failure raises `AssertionError` naming the head, the check and the first
value that differs, with both values, so the assertions work in pytest,
absltest and unittest alike. They need only jax and numpy (not chex), and
compare loss, per-head losses, metrics (after `jheads.metrics.compute`),
predictions and the gradient of the loss with respect to the logits.

Example:
  >>> import jheads
  >>> from jheads import testing
  >>> head = jheads.regression_head(name="dwell", weight_column="w")
  >>> logits, labels, features = testing.random_inputs(head, 0, (8,))
  >>> sorted(features), logits.shape, labels.shape
  (['w'], (8, 1), (8, 1))
  >>> testing.assert_merge_equals_concatenation(head, logits, labels, features)
"""

from __future__ import annotations

import dataclasses
import functools
import math
import unittest
from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple

import jax
import numpy as np
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

from jheads import base
from jheads import checks
from jheads import metrics
from jheads.combinator import MultiHead, multi_head

__all__ = [
    "Inputs",
    "assert_absent_rows_equal_dropped",
    "assert_eager_jit_vmap_equal",
    "assert_finite_gradients",
    "assert_grouped_equals_per_head",
    "assert_merge_equals_concatenation",
    "assert_sharded_equals_one_device",
    "check_head",
    "random_inputs",
]

AnyHead = base.Head | MultiHead
Draw = Callable[[np.random.Generator, tuple[int, ...]], Any]

_AXIS = "batch"

_MASK_KEY = "__jheads_testing_keep__"

DEFAULT_MAGNITUDE = 1e4
"""|logits| at which `assert_finite_gradients` checks a head."""

TRANSFORMS = "eager equals jit equals vmap"
MERGE = "merged batches equal the concatenated batch"
GROUPED = "grouped equals per-head inside a multi_head"
FINITE = "finite loss, gradient and metrics at large |logits|"
SHARDED = "sharded equals one device"
ABSENT = "masked rows and missing labels equal dropped rows"


class Inputs(NamedTuple):
  """One batch for a head; unpack it into any assertion with `*inputs`.

  Attributes:
    logits: `[B, ..., logits_dim]`, or for a multi_head a dict keyed by head name.
    labels: the head's labels (for a multi_head, a dict keyed by head name).
    features: a dict of arrays (weight columns, masks), or None.
  """

  logits: Any
  labels: Any
  features: Any = None


# ----------------------------------------------------------------------------
# Random inputs for the built-in head kinds.


def random_inputs(
    head: AnyHead,
    rng: int | np.random.Generator = 0,
    batch_shape: int | Sequence[int] = (8,),
    *,
    scale: float = 3.0,
    list_size: int = 5,
) -> Inputs:
  """Draws a valid random batch for a built-in head (or a multi_head of them).

  Logits are normal with standard deviation `scale`. Labels: binary 0/1
  floats, class ids, 0/1 indicators, normal regression targets, Poisson
  counts, values in [0, 1] for logistic regression, and for ranking graded
  relevance in {0, 1, 2} with some items padded with -1 (every list keeps at
  least one item). A weight column named by a string gets weights in
  [0.25, 2) with about one in five set to 0; a mask column named by a string
  gets a mask keeping about four rows in five. No label is missing. Heads of
  any other kind, or callable weight or mask columns, need inputs of your
  own: pass them, or a `draw` callable to `check_head`.

  Args:
    head: a `jheads.Head` or `jheads.MultiHead` of built-in heads.
    rng: a seed or a `numpy.random.Generator`.
    batch_shape: the batch dimensions `[D0, ..., DN]`, or one int.
    scale: standard deviation of the logits.
    list_size: the list size of a ranking head without a fixed `list_size`.

  Returns:
    `Inputs(logits, labels, features)`: for a multi_head, labels keyed by
    head name and logits one array (a dict if some head has no fixed
    `logits_dim`); features None when no head reads any.

  Example:
    >>> import jheads
    >>> from jheads import testing
    >>> head = jheads.multi_head([jheads.multi_class_head(3, name="topic"),
    ...                           jheads.ranking_head(name="rank", list_size=4)])
    >>> logits, labels, features = testing.random_inputs(head, 0, (6,))
    >>> logits.shape, labels["topic"].shape, labels["rank"].shape, features
    ((6, 7), (6,), (6, 4), None)
  """
  heads = _members(head)
  where = f"jheads.testing.random_inputs({_describe(head)})"
  if not isinstance(rng, np.random.Generator):
    rng = np.random.default_rng(rng)
  batch_shape = (batch_shape,) if isinstance(batch_shape, int) else tuple(batch_shape)
  if not batch_shape or any(d < 1 for d in batch_shape):
    raise ValueError(f"{where}: batch_shape must be one or more sizes >= 1, got {batch_shape}.")
  logits, labels, features = {}, {}, {}
  for h in heads:
    logits[h.name], labels[h.name] = _draw_head(h, rng, batch_shape, scale, list_size, where)
    for option in ("weight_column", "mask_column"):
      column = getattr(h.config, option)
      if column is None:
        continue
      if not isinstance(column, str):
        raise ValueError(
            f"{where}: {_describe(h)} has a callable {option}, so what it reads from the"
            " features is unknown; pass inputs of your own."
        )
      if column not in features:
        features[column] = _draw_column(option, rng, batch_shape)
  features = features or None
  if not isinstance(head, MultiHead):
    return Inputs(logits[head.name], labels[head.name], features)
  if any(h.logits_dim is None for h in heads):
    return Inputs(logits, labels, features)
  return Inputs(np.concatenate([logits[h.name] for h in heads], axis=-1), labels, features)


def _draw_head(head, rng, batch_shape, scale, list_size, where):
  config = head.config
  dim = config.logits_dim
  kind = config.kind
  if kind == "ranking":
    dim = list_size if dim is None else dim
  logits = (scale * rng.normal(size=batch_shape + (dim or 1,))).astype(np.float32)
  if kind == "binary_classification":
    labels = rng.integers(0, 2, size=batch_shape + (1,))
    labels = labels.astype(np.int32 if config.label_vocabulary else np.float32)
  elif kind == "multi_class":
    labels = rng.integers(0, dim, size=batch_shape).astype(np.int32)
  elif kind == "multi_label":
    labels = rng.integers(0, 2, size=batch_shape + (dim,)).astype(np.int32)
  elif kind == "regression":
    labels = rng.normal(size=batch_shape + (dim,)).astype(np.float32)
  elif kind == "poisson_regression":
    labels = rng.poisson(2.0, size=batch_shape + (dim,)).astype(np.float32)
    # Log-rates: keep exp(logits) far from overflowing whatever the scale.
    logits = np.clip(logits, -20.0, 20.0)
  elif kind == "logistic_regression":
    labels = rng.uniform(0.0, 1.0, size=batch_shape + (1,)).astype(np.float32)
  elif kind == "ranking":
    labels = rng.integers(0, 3, size=batch_shape + (dim,)).astype(np.float32)
    padded = rng.random(labels.shape) < 0.25
    padded[..., 0] = False
    labels[padded] = -1.0
    # Padding at random positions, not only at the end of the list.
    labels = rng.permuted(labels, axis=-1)
  else:
    raise ValueError(
        f"{where}: cannot draw labels for {_describe(head)} of kind {kind!r}; random_inputs"
        " knows binary_classification, multi_class, multi_label, regression,"
        " poisson_regression, logistic_regression and ranking. Pass inputs of your own,"
        " or a draw(rng, batch_shape) callable to check_head."
    )
  return logits, labels


def _draw_column(option, rng, batch_shape):
  if option == "weight_column":
    weights = rng.uniform(0.25, 2.0, size=batch_shape)
    return np.where(rng.random(batch_shape) < 0.2, 0.0, weights).astype(np.float32)
  mask = rng.random(batch_shape) < 0.8
  mask.reshape(-1)[0] = True
  return mask


# ----------------------------------------------------------------------------
# The assertions.


def assert_eager_jit_vmap_equal(
    head: AnyHead,
    logits: Any,
    labels: Any,
    features: Any = None,
    *,
    vmap_size: int = 2,
    eager_gradient: bool = False,
    rtol: float = 1e-6,
    atol: float = 1e-6,
) -> None:
  """Asserts that the head computes the same numbers eagerly, under `jax.jit` and under `jax.vmap`.

  The loss, per-head losses, metrics (`metrics.compute` of the statistics)
  and predictions are computed eagerly and under `jax.jit`; with
  `eager_gradient`, so is the gradient of the loss with respect to the
  logits (off by default: eagerly, every operation compiles on its own,
  which for a large multi_head takes long). For `jax.vmap`, `vmap_size`
  variants of the batch are stacked on a new leading axis and mapped over:
  variant `i` has its rows rolled by `i` (logits, labels and features alike)
  and its logits scaled by `1 + i / 8`, so that variants differ; each must
  give under vmap what it gives on its own under jit, gradient included. A
  head with Python state, or one whose numbers depend on whether its inputs
  are concrete, fails here.

  Args:
    head: a `jheads.Head` or `jheads.MultiHead`.
    logits: the batch's logits (the batch on the first axis).
    labels: its labels.
    features: its features dict, or None.
    vmap_size: how many variants of the batch `jax.vmap` maps over.
    eager_gradient: also compare the gradient computed eagerly.
    rtol: relative tolerance.
    atol: absolute tolerance.

  Raises:
    AssertionError: naming the head, the transformation and the first value
      that differs, with both values.

  Example:
    >>> import jheads
    >>> from jheads import testing
    >>> head = jheads.regression_head(name="dwell")
    >>> testing.assert_eager_jit_vmap_equal(head, *testing.random_inputs(head, 0, (8,)))
  """
  _batch_size(head, TRANSFORMS, logits, labels, features)
  if not isinstance(vmap_size, int) or vmap_size < 1:
    raise ValueError(
        f"{_prefix(head, TRANSFORMS)}: vmap_size must be an int >= 1, got {vmap_size!r}."
    )
  tolerance = dict(rtol=rtol, atol=atol)
  eager = _outputs(head, logits, labels, features, gradient=eager_gradient)
  jitted = _jit_outputs(head)
  got = _attempt(head, TRANSFORMS, "under jax.jit", jitted, logits, labels, features)
  if not eager_gradient:
    got.pop("gradient")
  _assert_close(head, TRANSFORMS, got, eager, got="under jit", expected="eagerly", **tolerance)

  # The reference for each variant is the head under jit, which was just
  # checked against eager: the variants' shapes are the batch's, so its
  # compilation serves them all.
  variants = [_variant((logits, labels, features), i) for i in range(vmap_size)]
  expected = _stack([jitted(*variant) for variant in variants])
  mapped = _attempt(
      head, TRANSFORMS, "under jax.vmap", jax.jit(jax.vmap(functools.partial(_outputs, head))),
      *_stack(variants),
  )
  _assert_close(
      head, TRANSFORMS, mapped, expected, got="under vmap", expected="on its own",
      note="the first index is the variant of the batch vmap maps over", **tolerance,
  )


def assert_merge_equals_concatenation(
    head: AnyHead,
    logits: Any,
    labels: Any,
    features: Any = None,
    *,
    num_batches: int = 3,
    jit: bool = True,
    rtol: float = 1e-6,
    atol: float = 1e-6,
) -> None:
  """Asserts that the merged statistics of k batches equal those of their concatenation.

  The batch is cut into `num_batches` consecutive parts of unequal sizes
  where possible (`numpy.array_split`); each part's `metric_fn` statistics
  are merged with `jheads.metrics.merge`, and `metrics.compute` of the
  result must equal `metrics.compute` of the whole batch's statistics. A
  statistic that is not additive (a batch mean, a median, a maximum) fails.
  A multi_head's `loss/<head>` keys are the mean over batches of each
  batch's reduced loss (as in TensorFlow), not a statistic of the
  concatenated batch, so they are left out of the comparison.

  Args:
    head: a `jheads.Head` or `jheads.MultiHead`.
    logits: the batch's logits (the batch on the first axis).
    labels: its labels.
    features: its features dict, or None.
    num_batches: k, the number of parts; at most the batch size.
    jit: compute the statistics under `jax.jit` (one compilation per part
      size), else eagerly.
    rtol: relative tolerance.
    atol: absolute tolerance.

  Raises:
    AssertionError: naming the head and the first metric that differs,
      with its merged and its concatenated value.

  Example:
    >>> import jheads
    >>> from jheads import testing
    >>> head = jheads.binary_classification_head(name="click")
    >>> testing.assert_merge_equals_concatenation(
    ...     head, *testing.random_inputs(head, 0, (8,)), num_batches=3)
  """
  batch = _batch_size(head, MERGE, logits, labels, features)
  if not isinstance(num_batches, int) or num_batches < 1 or num_batches > batch:
    raise ValueError(
        f"{_prefix(head, MERGE)}: num_batches must be an int in [1, {batch}] (the batch"
        f" size), got {num_batches!r}."
    )
  metric_fn = _jit_metric_fn(head) if jit else head.metric_fn
  parts = np.array_split(np.arange(batch), num_batches)
  stats = [
      _attempt(head, MERGE, f"metric_fn on part {i} of {num_batches}", metric_fn,
               *_take((logits, labels, features), rows))
      for i, rows in enumerate(parts)
  ]
  merged = metrics.compute(functools.reduce(metrics.merge, stats))
  if jit:  # The head's jitted outputs, which other checks share.
    whole = _jit_outputs(head)(logits, labels, features)["metrics"]
  else:
    whole = metrics.compute(metric_fn(logits, labels, features))
  if isinstance(head, MultiHead):
    per_batch = {f"loss/{h.name}" for h in head.heads}
    merged = {k: v for k, v in merged.items() if k not in per_batch}
    whole = {k: v for k, v in whole.items() if k not in per_batch}
  _assert_close(
      head, MERGE, {"metrics": merged}, {"metrics": whole},
      got=f"merged from {num_batches} batches of {[len(r) for r in parts]} rows",
      expected="on the concatenated batch", rtol=rtol, atol=atol,
  )


def assert_grouped_equals_per_head(
    head: AnyHead,
    logits: Any,
    labels: Any,
    features: Any = None,
    *,
    copies: int = 3,
    jit: bool = True,
    rtol: float = 1e-6,
    atol: float = 1e-6,
) -> None:
  """Asserts that like heads in a multi_head give the same numbers grouped as one by one.

  Builds a multi_head of `copies` copies of the head (of every head of a
  multi_head), named `<name>_0`, `<name>_1`, ..., with head weights 1, 1.5,
  2, ..., twice: `vectorize=True`, where copies that share a
  `HeadKernel.group_key` are stacked and evaluated as one `jax.vmap`-ed
  computation, and `vectorize=False`, one head at a time. Copy `i` gets the
  logits scaled by `1 + i / 8`, so copies see different inputs and a group
  that mixes its members up fails; labels and features are shared. Logits go
  in as one array when every head has a fixed `logits_dim` (the gather
  path), else as a dict. A head whose kernel has no `group_key` is never
  grouped, so it passes trivially.

  Args:
    head: a `jheads.Head` or `jheads.MultiHead`.
    logits: the batch's logits (the batch on the first axis).
    labels: its labels.
    features: its features dict, or None.
    copies: number of copies, >= 2.
    jit: evaluate both multi_heads under `jax.jit` (else eagerly, which also
      runs the grouped value checks).
    rtol: relative tolerance.
    atol: absolute tolerance.

  Raises:
    AssertionError: naming the head and the first value that differs between
      the grouped and the per-head multi_head, with both values.

  Example:
    >>> import jheads
    >>> from jheads import testing
    >>> head = jheads.regression_head(name="dwell")
    >>> testing.assert_grouped_equals_per_head(head, *testing.random_inputs(head, 0, (8,)))
  """
  _batch_size(head, GROUPED, logits, labels, features)
  if not isinstance(copies, int) or copies < 2:
    raise ValueError(f"{_prefix(head, GROUPED)}: copies must be an int >= 2, got {copies!r}.")
  members = _members(head)
  weights = head.head_weights if isinstance(head, MultiHead) else (1.0,)
  per_member = _per_member(head, logits, labels)
  heads, head_weights, copy_logits, copy_labels = [], [], {}, {}
  for i in range(copies):
    for member, weight, (lo, la) in zip(members, weights, per_member):
      name = f"{_name(member)}_{i}"
      heads.append(_renamed(member, name))
      head_weights.append(weight * (1.0 + 0.5 * i))
      copy_logits[name] = jax.tree.map(lambda x, i=i: np.asarray(x) * (1.0 + i / 8), lo)
      copy_labels[name] = la
  if not isinstance(logits, Mapping) and all(h.logits_dim is not None for h in heads):
    copy_logits = np.concatenate([copy_logits[h.name] for h in heads], axis=-1)
  grouped = multi_head(heads, head_weights, vectorize=True)
  one_by_one = multi_head(heads, head_weights, vectorize=False)

  def evaluate(h, variant):
    fn = functools.partial(_outputs, h)
    fn = jax.jit(fn) if jit else fn
    return _attempt(head, GROUPED, variant, fn, copy_logits, copy_labels, features)

  expected = evaluate(one_by_one, "the per-head multi_head (vectorize=False)")
  got = evaluate(grouped, "the grouped multi_head (vectorize=True)")
  _assert_close(
      head, GROUPED, got, expected,
      got="grouped (vectorize=True)", expected="per head (vectorize=False)",
      note=f"copies named <name>_0 .. <name>_{copies - 1}", rtol=rtol, atol=atol,
  )


def assert_finite_gradients(
    head: AnyHead,
    logits: Any,
    labels: Any,
    features: Any = None,
    *,
    magnitude: float | Mapping[str, float] = DEFAULT_MAGNITUDE,
    seed: int = 0,
) -> None:
  """Asserts that loss, gradient and metrics are finite when every logit is +-`magnitude`.

  Every logit is set to `+magnitude` or `-magnitude` at random (seeded), and
  the loss, its gradient with respect to the logits and the metrics are
  computed under `jax.jit` (so that the head's own eager value checks do not
  stand in for the numbers), then again with every sign flipped, so each
  logit meets its label at both extremes. Predictions are not checked: an
  inverse link such as `exp` may rightly overflow. Heads whose logits have a
  bounded valid range need a smaller magnitude: Poisson log-rates above 88.7
  overflow float32 and are rejected, so pass e.g. `magnitude=80.0`, or for a
  multi_head `magnitude={"count": 80.0}`.

  Args:
    head: a `jheads.Head` or `jheads.MultiHead`.
    logits: the batch's logits; only their shapes (and dtypes) are used.
    labels: its labels.
    features: its features dict, or None.
    magnitude: |logits|; for a multi_head also a dict from head names to
      magnitudes, 1e4 for the heads it does not name.
    seed: seeds the signs.

  Raises:
    AssertionError: naming the head and the first non-finite value.

  Example:
    >>> import jheads
    >>> from jheads import testing
    >>> head = jheads.binary_classification_head(name="click")
    >>> testing.assert_finite_gradients(head, *testing.random_inputs(head, 0, (8,)))
  """
  _batch_size(head, FINITE, logits, labels, features)
  members = _members(head)
  if isinstance(magnitude, Mapping):
    unknown = sorted(set(magnitude) - {m.name for m in members})
    if unknown:
      raise ValueError(f"{_prefix(head, FINITE)}: magnitude names no head {unknown}.")
    sizes = [float(magnitude.get(m.name, DEFAULT_MAGNITUDE)) for m in members]
  else:
    sizes = [float(magnitude)] * len(members)
  described = (
      f"{sizes[0]:g}" if len(set(sizes)) == 1
      else ", ".join(f"{m.name}: {v:g}" for m, v in zip(members, sizes))
  )
  rng = np.random.default_rng(seed)

  def extreme(x, size):
    x = np.asarray(x)
    return (size * np.where(rng.random(x.shape) < 0.5, 1.0, -1.0)).astype(x.dtype)

  per_member = _per_member(head, logits, labels)
  if isinstance(logits, Mapping):
    large = {m.name: extreme(lo, v) for m, (lo, _), v in zip(members, per_member, sizes)}
  elif isinstance(head, MultiHead):
    large = np.concatenate([extreme(lo, v) for (lo, _), v in zip(per_member, sizes)], axis=-1)
  else:
    large = extreme(logits, sizes[0])
  for sign in (1.0, -1.0):
    at = jax.tree.map(lambda x: sign * x, large)
    out = _attempt(
        head, FINITE, f"the head at |logits| = {described}", _jit_outputs(head),
        at, labels, features,
    )
    out.pop("predictions")
    flat = _flatten(out)
    for key, value in flat.items():
      if value.dtype.kind not in "fc":
        continue
      bad = ~np.isfinite(value)
      if bad.any():
        index = tuple(int(i) for i in np.argwhere(bad)[0])
        loss = "" if key == "loss" else f"; the loss is {_format(flat['loss'])}"
        raise AssertionError(
            f"{_prefix(head, FINITE)}: {_at(key, index)} is {_format(value[index])} with every"
            f" logit at +-{described} (signs drawn with seed {seed}"
            f"{', then flipped' if sign < 0 else ''}){loss}."
        )


def assert_sharded_equals_one_device(
    head: AnyHead,
    logits: Any,
    labels: Any,
    features: Any = None,
    *,
    devices: Sequence[Any] | None = None,
    modes: Sequence[str] = ("explicit", "auto", "shard_map"),
    rtol: float = 1e-5,
    atol: float = 1e-6,
) -> None:
  """Asserts that the head gives the one-device numbers with its batch split over several devices.

  The reference is `jax.jit` on one device. Then, over a 1-d mesh of
  `devices` (default `jax.devices()`) whose axis is named ``"batch"``, with
  every input sharded along its first axis:

  * ``"explicit"``: sharded `jax.jit` on a mesh with Explicit axes;
  * ``"auto"``: the same with Auto axes (the compiler propagates shardings);
  * ``"shard_map"``: `jax.shard_map` of the head's functions called with
    `axis_name="batch"`; the loss and metric statistics are each shard's
    share, `psum`-ed, and the gradient is each shard's part.

  The loss, per-head losses, metrics, predictions and gradient must match.
  The batch is repeated until its size is a multiple of the number of
  devices (the same repeated batch is the reference). With one device there
  is nothing to compare: it raises `unittest.SkipTest`, which pytest,
  absltest and unittest report as a skip. To simulate devices on a CPU, set
  `XLA_FLAGS=--xla_force_host_platform_device_count=8` (or call
  `chex.set_n_cpu_devices(8)`) before jax starts.

  Args:
    head: a `jheads.Head` or `jheads.MultiHead`.
    logits: the batch's logits (the batch on the first axis).
    labels: its labels.
    features: its features dict, or None.
    devices: the devices of the mesh; default all of `jax.devices()`.
    modes: which of ``"explicit"``, ``"auto"`` and ``"shard_map"`` to run.
    rtol: relative tolerance (sums over shards add in another order).
    atol: absolute tolerance.

  Raises:
    AssertionError: naming the head, the mode and the first value that
      differs, with both values.
    unittest.SkipTest: with fewer than two devices.

  Example:
    >>> import jax, jheads
    >>> from jheads import testing
    >>> head = jheads.regression_head(name="dwell")
    >>> if jax.device_count() > 1:
    ...   testing.assert_sharded_equals_one_device(
    ...       head, *testing.random_inputs(head, 0, (8,)), modes=("shard_map",))
  """
  batch = _batch_size(head, SHARDED, logits, labels, features)
  devices = list(jax.devices() if devices is None else devices)
  unknown = [m for m in modes if m not in ("explicit", "auto", "shard_map")]
  if isinstance(modes, str) or unknown or not modes:
    raise ValueError(
        f"{_prefix(head, SHARDED)}: modes must be a non-empty sequence of 'explicit',"
        f" 'auto' and 'shard_map', got {modes!r}."
    )
  if len(devices) < 2:
    raise unittest.SkipTest(
        f"{_describe(head)}: {SHARDED!r} skipped: needs at least 2 devices, found {len(devices)}"
        f" ({', '.join(str(d) for d in devices) or 'none'}). On a CPU, set"
        " XLA_FLAGS=--xla_force_host_platform_device_count=8 (or call"
        " chex.set_n_cpu_devices(8)) before jax starts."
    )
  n = len(devices)
  repeats = n // math.gcd(batch, n)
  inputs = (logits, labels, features)
  if repeats > 1:
    inputs = jax.tree.map(lambda x: np.concatenate([np.asarray(x)] * repeats), inputs)
  if devices[0] == jax.devices()[0]:
    expected = _jit_outputs(head)(*inputs)
  else:
    with jax.default_device(devices[0]):
      expected = _jit_outputs(head)(*inputs)
  outputs = functools.partial(_outputs, head)
  tolerance = dict(rtol=rtol, atol=atol)
  note = f"{n} devices" + (f"; the batch repeated {repeats} times" if repeats > 1 else "")

  for mode in modes:
    if mode == "shard_map":
      mesh = jax.make_mesh((n,), (_AXIS,), devices=devices)
      fn = jax.jit(jax.shard_map(
          functools.partial(_shard_outputs, head), mesh=mesh, in_specs=P(_AXIS),
          out_specs=_shard_out_specs(head),
      ))
      sharded = jax.device_put(inputs, NamedSharding(mesh, P(_AXIS)))
      got = _attempt(head, SHARDED, "under shard_map", fn, *sharded)
      label = "under shard_map with axis_name"
    else:
      axis_type = AxisType.Explicit if mode == "explicit" else AxisType.Auto
      mesh = jax.make_mesh((n,), (_AXIS,), axis_types=(axis_type,), devices=devices)
      with jax.set_mesh(mesh):
        sharded = jax.device_put(inputs, NamedSharding(mesh, P(_AXIS)))
        label = f"under sharded jit ({mode} axes)"
        got = _attempt(head, SHARDED, label, jax.jit(outputs), *sharded)
    _assert_close(head, SHARDED, got, expected, got=label, expected="on one device",
                  note=note, **tolerance)


def assert_absent_rows_equal_dropped(
    head: AnyHead,
    logits: Any,
    labels: Any,
    features: Any = None,
    *,
    missing_label: Any = None,
    garbage_labels: Any = None,
    eager: bool = False,
    seed: int = 0,
    rtol: float = 1e-6,
    atol: float = 1e-6,
) -> None:
  """Asserts that masked rows and rows with missing labels count exactly as if they were dropped.

  About 40% of the rows are chosen (seeded; never all of them).

  * Masks: the head goes inside a `multi_head(..., mask_column=...)` that
    masks those rows out, which works for any head, built-in or custom.
    Their logits are set to NaN (and their labels to `garbage_labels` when
    given): a masked row must never be read.
  * Missing labels: every head with a missing-label value (its
    `HeadConfig.missing_label`, -1 for a ranking head, whose padding it is,
    or `missing_label`) gets it as the label of the chosen rows, inside the
    same multi_head with every row kept.

  Either way the loss, per-head losses, metrics and the gradient of the kept
  rows must equal those of the batch with the chosen rows dropped, the
  gradient of the chosen rows must be exactly 0, and no value check may fire
  (they run under `jax.jit` through `jheads.checked`).

  Args:
    head: a `jheads.Head` or `jheads.MultiHead`.
    logits: the batch's logits (the batch on the first axis, 2 rows or more).
    labels: its labels.
    features: its features dict, or None.
    missing_label: the missing-label value for a head whose config declares
      none (a custom head, say); for a multi_head, a dict by head name.
    garbage_labels: a value written into the masked rows' labels (e.g.
      `float("nan")`), or None to leave them as they are.
    eager: also compare eagerly (slow for large multi_heads: eagerly, every
      operation compiles on its own).
    seed: seeds the choice of rows.
    rtol: relative tolerance.
    atol: absolute tolerance.

  Raises:
    AssertionError: naming the head, the case (masked rows or missing
      labels) and the first value that differs, with both values, or the
      value check that fired.

  Example:
    >>> import jheads
    >>> from jheads import testing
    >>> head = jheads.regression_head(name="dwell", missing_label=float("nan"))
    >>> testing.assert_absent_rows_equal_dropped(head, *testing.random_inputs(head, 0, (8,)))
  """
  batch = _batch_size(head, ABSENT, logits, labels, features)
  if batch < 2:
    raise ValueError(f"{_prefix(head, ABSENT)}: needs a batch of 2 rows or more, got {batch}.")
  rng = np.random.default_rng(seed)
  dropped = rng.random(batch) < 0.4
  dropped[0], dropped[1] = True, False
  keep = ~dropped
  absent_rows = np.flatnonzero(dropped).tolist()

  def check(case, run, inputs, expected):
    errors, got = _attempt(head, ABSENT, f"with {case}", run, *inputs)
    message = None if errors is None else errors.get()
    if message is not None:
      raise AssertionError(
          f"{_prefix(head, ABSENT)}: a value check fired with {case}, though it must"
          f" not read those rows: {message}"
      )
    gradient = got.pop("gradient")
    got["gradient"] = _take(gradient, keep)
    _assert_close(
        head, ABSENT, got, expected, got=f"with {case}", expected="with those rows dropped",
        rtol=rtol, atol=atol,
    )
    for key, value in _flatten({"gradient": _take(gradient, dropped)}).items():
      nonzero = np.argwhere(value != 0)
      if nonzero.size:
        index = tuple(int(i) for i in nonzero[0])
        raise AssertionError(
            f"{_prefix(head, ABSENT)}: {_at(key, (absent_rows[index[0]],) + index[1:])} is"
            f" {_format(value[index])} with {case}, not 0: an absent row must get no gradient."
        )

  def runs(subject):
    """The subject under jit with value checks on, and eagerly if asked."""
    jitted = jax.jit(checks.checked(functools.partial(_outputs, subject, predictions=False)))
    out = [("under jit", jitted)]
    if eager:
      out.append(("eagerly", lambda *a: (None, _outputs(subject, *a, predictions=False))))
    return out

  def dropped_outputs(subject, inputs):
    out = _jit_outputs(subject)(*_take(inputs, keep))
    out.pop("predictions")
    return out

  # Masks, through a multi_head's mask_column, so that any head can be tested.
  # The mask is an input (a features entry), so that the same compiled
  # computation, with every row kept, also serves the missing labels below.
  if isinstance(head, MultiHead):
    reference, plain_logits, plain_labels = head, logits, labels
  else:
    reference = multi_head([_renamed(head, _name(head))])
    plain_logits, plain_labels = {_name(head): logits}, {_name(head): labels}
  if features is None or isinstance(features, Mapping):
    if features is not None and _MASK_KEY in features:
      raise ValueError(f"{_prefix(head, ABSENT)}: features must not use the key {_MASK_KEY!r}.")
    masked = multi_head([reference], mask_column=_MASK_KEY)
    all_kept = masked
    with_mask = lambda mask: {**(features or {}), _MASK_KEY: mask}
  else:  # Features of another type: the mask cannot be one of them.
    masked = multi_head([reference], mask_column=lambda _: keep)
    all_kept = multi_head([reference], mask_column=lambda _: np.ones(batch, bool))
    with_mask = lambda mask: features
  masked_runs = runs(masked)
  garbage_logits = jax.tree.map(lambda x: _fill(x, dropped, np.nan), plain_logits)
  garbage = plain_labels
  if garbage_labels is not None:
    garbage = jax.tree.map(lambda x: _fill(x, dropped, garbage_labels), plain_labels)
  expected = dropped_outputs(reference, (plain_logits, plain_labels, features))
  for variant, run in masked_runs:
    check(f"rows {absent_rows} masked out, {variant}", run,
          (garbage_logits, garbage, with_mask(keep)), expected)

  # Missing labels: every head that has a missing-label value, together.
  members = _members(head)
  values = [_missing_value(m, missing_label) for m in members]
  if all(v is None for v in values):  # Nothing can be missing: the mask says it all.
    return
  names = [_name(m) for m in members]
  per_member = dict(zip(names, _per_member(head, logits, labels)))
  missing = {
      n: jax.tree.map(lambda x, v=v: _fill(x, dropped, v), per_member[n][1])
      for n, v in zip(names, values) if v is not None
  }
  described = ", ".join(f"{_describe(m)}: {v!r}" for m, v in zip(members, values) if v is not None)
  case = f"the labels of rows {absent_rows} missing ({described})"
  if len(missing) == len(members):
    # Every row of every head is absent: the masked multi_head with every row
    # kept is the head, and the dropped batch is the one above.
    subject_runs = runs(all_kept) if all_kept is not masked else masked_runs
    inputs = (plain_logits, missing, with_mask(np.ones(batch, bool)))
  else:
    subject = multi_head(
        [_renamed(m, n) for m, n, v in zip(members, names, values) if v is not None]
    )
    sub_logits = {n: per_member[n][0] for n in missing}
    sub_labels = {n: per_member[n][1] for n in missing}
    expected = dropped_outputs(subject, (sub_logits, sub_labels, features))
    subject_runs = runs(subject)
    inputs = (sub_logits, missing, features)
  for variant, run in subject_runs:
    check(f"{case}, {variant}", run, inputs, expected)


def check_head(
    head: AnyHead,
    draw: Draw | None = None,
    *,
    batch_size: int = 8,
    seed: int = 0,
    magnitude: float | Mapping[str, float] = DEFAULT_MAGNITUDE,
    skip: Sequence[str] = (),
) -> tuple[str, ...]:
  """Runs every assertion of this module on one batch drawn for the head.

  Args:
    head: a `jheads.Head` or `jheads.MultiHead`.
    draw: `draw(rng, batch_shape) -> (logits, labels, features)` for heads
      `random_inputs` does not know; default `random_inputs`.
    batch_size: rows of the batch.
    seed: seeds the batch and the checks.
    magnitude: |logits| of `assert_finite_gradients`.
    skip: checks not to run, by function name (e.g.
      ``"assert_finite_gradients"``).

  Returns:
    The names of the checks that ran; `assert_sharded_equals_one_device` is
    left out, not run, with fewer than two devices.

  Raises:
    AssertionError: from the first check that fails.

  Example:
    >>> import jheads
    >>> from jheads import testing
    >>> head = jheads.regression_head(name="dwell")
    >>> ran = testing.check_head(head, skip=["assert_sharded_equals_one_device"])
    >>> len(ran)
    5
  """
  assertions = {
      "assert_eager_jit_vmap_equal": assert_eager_jit_vmap_equal,
      "assert_merge_equals_concatenation": assert_merge_equals_concatenation,
      "assert_grouped_equals_per_head": assert_grouped_equals_per_head,
      "assert_finite_gradients": assert_finite_gradients,
      "assert_sharded_equals_one_device": assert_sharded_equals_one_device,
      "assert_absent_rows_equal_dropped": assert_absent_rows_equal_dropped,
  }
  names = list(assertions)
  unknown = [s for s in skip if s not in names]
  if isinstance(skip, str) or unknown:
    raise ValueError(
        f"jheads.testing.check_head: skip must list names among {names}, got {skip!r}."
    )
  rng = np.random.default_rng(seed)
  inputs = random_inputs(head, rng, (batch_size,)) if draw is None else draw(rng, (batch_size,))
  inputs = Inputs(*inputs)
  ran = []
  for name in names:
    if name in skip:
      continue
    kwargs = {}
    if name == "assert_finite_gradients":
      kwargs = dict(magnitude=magnitude, seed=seed)
    elif name == "assert_absent_rows_equal_dropped":
      kwargs = dict(seed=seed)
    elif name == "assert_sharded_equals_one_device" and jax.device_count() < 2:
      continue
    assertions[name](head, *inputs, **kwargs)
    ran.append(name)
  return tuple(ran)


# ----------------------------------------------------------------------------
# Evaluation.


def _jit_outputs(head):
  """`jax.jit` of `_outputs` for the head, one per head, so checks share compilations."""
  try:
    return _cached_jit(head, _outputs)
  except Exception:  # An unhashable head (a config holding a list, say).
    return jax.jit(functools.partial(_outputs, head))


def _jit_metric_fn(head):
  try:
    return _cached_jit(head, None)
  except Exception:  # As above.
    return jax.jit(head.metric_fn)


@functools.lru_cache(maxsize=16)
def _cached_jit(head, fn):
  return jax.jit(head.metric_fn if fn is None else functools.partial(fn, head))


def _evaluate(head, logits, labels, features, *, axis_name=None, predictions=True, gradient=True):
  """Loss, per-head losses, statistics, predictions and the loss' gradient."""
  multi = isinstance(head, MultiHead)

  def objective(logits):
    if multi:
      return head.losses_fn(logits, labels, features, axis_name=axis_name)
    return head.loss_fn(logits, labels, features, axis_name=axis_name), None

  if gradient:
    (loss, head_losses), grad = jax.value_and_grad(objective, has_aux=True)(logits)
  else:
    loss, head_losses = objective(logits)
  out = {"loss": loss}
  if multi:  # By name: a grouped and a per-head multi_head may stack them in other orders.
    out["head_losses"] = {name: head_losses[name] for name in head_losses}
  out["stats"] = head.metric_fn(logits, labels, features, axis_name=axis_name)
  if predictions:
    out["predictions"] = head.predict_fn(logits)
  if gradient:
    out["gradient"] = grad
  return out


def _finalize(out):
  out = dict(out)
  stats = out.pop("stats")
  finished = {k: out[k] for k in ("loss", "head_losses") if k in out}
  finished["metrics"] = metrics.compute(stats)
  for key in ("predictions", "gradient"):
    if key in out:
      finished[key] = out[key]
  return finished


def _outputs(head, logits, labels, features, *, predictions=True, gradient=True):
  return _finalize(
      _evaluate(head, logits, labels, features, predictions=predictions, gradient=gradient)
  )


def _shard_outputs(head, logits, labels, features):
  out = _evaluate(head, logits, labels, features, axis_name=_AXIS)
  shares = {k: v for k, v in out.items() if k in ("loss", "head_losses", "stats")}
  summed = jax.lax.psum(shares, _AXIS)
  return _finalize({**out, **summed})


def _shard_out_specs(head):
  specs = {"loss": P()}
  if isinstance(head, MultiHead):
    specs["head_losses"] = P()
  specs.update(metrics=P(), predictions=P(_AXIS), gradient=P(_AXIS))
  return specs


def _attempt(head, check, variant, fn, *args):
  """Runs a transformed computation; an error there is the head failing the check."""
  try:
    return fn(*args)
  except (AssertionError, unittest.SkipTest):
    raise
  except Exception as error:  # The untransformed reference already ran.
    raise AssertionError(
        f"{_prefix(head, check)}: {variant} raised {type(error).__name__}: {error}"
    ) from error


# ----------------------------------------------------------------------------
# Heads.


def _describe(head):
  if isinstance(head, MultiHead):
    return f"multi_head {head.name!r}"
  if isinstance(head, base.Head):
    return head.config.description
  return type(head).__name__


def _prefix(head, check):
  return f"{_describe(head)} fails {check!r}"


def _members(head):
  if isinstance(head, MultiHead):
    return tuple(head.heads)
  if isinstance(head, base.Head):
    return (head,)
  raise ValueError(
      f"jheads.testing: expected a jheads.Head or jheads.MultiHead, got {type(head).__name__}."
  )


def _name(head):
  return head.name if head.name is not None else head.config.kind


def _renamed(head, name):
  """The head under another name, as `multi_head` reads it (its kernel is shared)."""
  return head._replace(name=name, config=dataclasses.replace(head.config, name=name))


def _per_member(head, logits, labels):
  """Each member head's `(logits, labels)`."""
  if not isinstance(head, MultiHead):
    return [(logits, labels)]
  if isinstance(logits, Mapping):
    return [(logits[h.name], labels[h.name]) for h in head.heads]
  logits = np.asarray(logits)
  out, start = [], 0
  for h in head.heads:
    out.append((logits[..., start : start + h.logits_dim], labels[h.name]))
    start += h.logits_dim
  return out


def _missing_value(head, override):
  if isinstance(override, Mapping):
    override = override.get(head.name)
  if override is not None:
    return override
  if head.config.missing_label is not None:
    return head.config.missing_label
  if head.config.kind == "ranking":
    return -1.0
  return None


# ----------------------------------------------------------------------------
# Batches.


def _batch_size(head, check, logits, labels, features):
  """The rows of the batch; every input must have them on its first axis."""
  _members(head)
  sizes = {}
  for part, tree in (("logits", logits), ("labels", labels), ("features", features)):
    for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
      shape = np.shape(leaf)
      key = part + jax.tree_util.keystr(path)
      if not shape:
        raise ValueError(
            f"{_prefix(head, check)}: {key} is a scalar; jheads.testing cuts every input"
            " along its first axis, the batch."
        )
      sizes[key] = shape[0]
  if not sizes:
    raise ValueError(f"{_prefix(head, check)}: logits are required.")
  first = next(iter(sizes))
  wrong = {k: s for k, s in sizes.items() if s != sizes[first]}
  if wrong:
    key = next(iter(wrong))
    raise ValueError(
        f"{_prefix(head, check)}: {key} has {wrong[key]} rows but {first} has"
        f" {sizes[first]}; every input must have the batch on its first axis."
    )
  return sizes[first]


def _variant(inputs, i):
  """The batch with its rows rolled by `i` and its logits scaled by `1 + i / 8`."""
  logits, labels, features = jax.tree.map(lambda x: np.roll(np.asarray(x), i, axis=0), inputs)
  return jax.tree.map(lambda x: x * np.asarray(1.0 + i / 8, x.dtype), logits), labels, features


def _take(tree, rows):
  return jax.tree.map(lambda x: np.asarray(x)[rows], tree)


def _stack(trees):
  return jax.tree.map(lambda *xs: np.stack([np.asarray(x) for x in xs]), *trees)


def _fill(x, rows, value):
  x = np.array(x)
  if x.dtype.kind in "iub" and isinstance(value, float) and not float(value).is_integer():
    x = x.astype(np.float32)
  x[rows] = value
  return x


# ----------------------------------------------------------------------------
# Comparison.


_ORDER = ("loss", "head_losses", "metrics", "predictions", "gradient")


def _flatten(out):
  """`{"metrics['auc']": array, ...}`: the loss first, the gradient last.

  Output dicts come back from jit with sorted keys, so the order is set here.
  """
  flat = {}
  for top in sorted(out, key=lambda k: (_ORDER.index(k) if k in _ORDER else len(_ORDER), k)):
    tree = out[top]
    for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
      flat[top + jax.tree_util.keystr(path)] = np.asarray(leaf)
  return flat


def _at(key, index):
  return key + (f"[{', '.join(str(i) for i in index)}]" if index else "")


def _format(value):
  value = np.asarray(value)
  if value.dtype.kind in "fc":
    return f"{value.item():.9g}"
  return repr(value.item())


def _assert_close(head, check, actual, reference, *, got, expected, rtol, atol, note=None):
  """Raises AssertionError at the first key whose values differ beyond the tolerance."""
  actual, reference = _flatten(actual), _flatten(reference)
  context = f" ({note})" if note else ""
  for key in reference:
    if key not in actual:
      raise AssertionError(
          f"{_prefix(head, check)}: {key} is there {expected} but missing {got}{context}."
      )
  for key in actual:
    if key not in reference:
      raise AssertionError(
          f"{_prefix(head, check)}: {key} is there {got} but missing {expected}{context}."
      )
  for key, want in reference.items():
    have = actual[key]
    if have.shape != want.shape:
      raise AssertionError(
          f"{_prefix(head, check)}: {key} has shape {have.shape} {got} but {want.shape}"
          f" {expected}{context}."
      )
    if have.dtype.kind in "biu" and want.dtype.kind in "biu":
      close = have == want
    else:
      close = np.isclose(have, want, rtol=rtol, atol=atol, equal_nan=True)
    if not np.all(close):
      index = tuple(int(i) for i in np.argwhere(~close)[0])
      a, e = have[index], want[index]
      count = "" if have.ndim == 0 else f"; {int(np.sum(~close))} of {close.size} elements differ"
      difference = abs(float(a) - float(e)) if np.isfinite(a) and np.isfinite(e) else math.inf
      raise AssertionError(
          f"{_prefix(head, check)}: {_at(key, index)} is {_format(a)} {got} but"
          f" {_format(e)} {expected} (|difference| {difference:.3g}, tolerance"
          f" atol {atol:g} + rtol {rtol:g} x |expected|{count}){context}."
      )
