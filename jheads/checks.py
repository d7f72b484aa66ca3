"""Input checks: clear, early errors that name the head and the problem.

Three kinds of checks, all raising `ValueError` (or `TypeError` for a wrong
Python type) with messages like `head 'species': labels must be ...`:

* configuration, when a factory builds a head;
* shapes and dtypes of logits, labels and weights, at trace time (so under
  `jit` too);
* values (label ranges, finite inputs, non-negative weights): they raise at
  once where values are known (eager calls, un-jitted autodiff); under `jit`
  the step builders of `jheads.training` (and `checked`) functionalize them
  with `jax.experimental.checkify` and raise them as `ValueCheckError` when
  the step's outputs are read on the host.
"""

from __future__ import annotations

import functools
import hashlib
import inspect
import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import checkify

ArrayLike = jax.typing.ArrayLike


# ----------------------------------------------------------------------------
# Value checks: eager when inputs are concrete, functionalized under jit.


class ValueCheckError(ValueError):
  """A value check failed: a bad label, a non-finite input, a negative weight."""


def _checks_state():
  """Whether value checks are traced into the computation, as jax state.

  It must be part of jit's cache key: a function traced once without checks
  and cached must be traced again when checks are on, and the other way
  round. A plain context variable is invisible to jax's caches, which is how
  `jax.jit(checked(f))` used to check nothing after `f` had run once. jax
  keeps such state in its config; `bool_state` is how jax itself declares
  options that enter the jit key.
  """
  from jax._src import config as jax_config  # pylint: disable=g-import-not-at-top

  return jax_config.bool_state(
      name="jheads_value_checks",
      default=False,
      help="Trace jheads' value checks into computations (set by jheads).",
      include_in_jit_key=True,
      include_in_trace_context=True,
  )


_VALUE_CHECKS = _checks_state()


def checks_enabled() -> bool:
  return bool(_VALUE_CHECKS.value)


def with_value_checks(fn: Callable[..., Any]) -> Callable[..., Any]:
  """`fn`, traced with value checks on (as `checkify.check`s to functionalize)."""

  def fn_with_checks(*args, **kwargs):
    with _VALUE_CHECKS(True):
      return fn(*args, **kwargs)

  return fn_with_checks


def checked(fn: Callable[..., Any]) -> Callable[..., tuple[Any, Any]]:
  """Makes jheads' value checks (label ranges, finite inputs) report under jit.

  The step builders of `jheads.training` check values by themselves; this is
  for functions you write around head functions. Outside `checked` and the
  step builders, value checks run only where values are concrete (eager
  calls, also under an un-jitted `jax.grad`). `checked(fn)` traces `fn` with
  the checks on and functionalizes them with `jax.experimental.checkify`, so
  the result can be jitted and still report them. Whether checks are on is
  part of jax's trace cache key, so a jitted function traced before without
  checks is traced again, and a later plain call is unaffected.

  Args:
    fn: any function that calls head functions, e.g. `head.loss_fn`.

  Returns:
    A function with `fn`'s arguments returning `(errors, fn's output)`:
    `errors` is a `StepErrors` (a pytree); `errors.get()` is the first failed
    check's message or None, `errors.throw()` raises it.

  Example:
    >>> import jax, jax.numpy as jnp, jheads
    >>> head = jheads.binary_classification_head()
    >>> err, loss = jax.jit(jheads.checked(head.loss_fn))(
    ...     jnp.zeros((2, 1)), jnp.array([[0.0], [2.0]]))
    >>> err.get()  # doctest: +ELLIPSIS
    'binary_classification_head: labels must be in [0, 1]...
  """
  checked_fn = checkify.checkify(with_value_checks(fn), errors=checkify.user_checks)

  def run(*args, **kwargs):
    error, out = checked_fn(*args, **kwargs)
    return StepErrors(error), out

  return run


def is_concrete(*values: Any) -> bool:
  """Whether none of `values` is a tracer, so their values can be read now."""
  return not any(
      isinstance(leaf, jax.core.Tracer)
      for leaf in jax.tree.leaves(values)
  )


def _known_value(value: Any) -> Any:
  """The concrete value behind an eager autodiff tracer, or None under jit."""
  from jax._src import core  # pylint: disable=g-import-not-at-top

  to_concrete = getattr(core, "to_concrete_value", None)
  return None if to_concrete is None else to_concrete(value)


def require(
    ok: Callable[[], ArrayLike],
    message: str,
    *operands: Any,
    detail: Callable[[], str] | None = None,
) -> None:
  """Checks a value condition wherever its values can be known.

  Raises now if the values are concrete, or known behind an eager
  `jax.grad` / `jax.vjp`; under a jit trace with checks on (the step
  builders, `checked`), stages a `checkify.check`; otherwise does nothing.

  Args:
    ok: computes a boolean scalar, true when the values are valid.
    message: the error message.
    *operands: the arrays `ok` reads.
    detail: optionally, eager-only text with the offending values.
  """
  if is_concrete(*operands):
    # Inside a jit trace, jnp ops on constants would be staged, not evaluated.
    with jax.ensure_compile_time_eval():
      valid = bool(ok())
    if not valid:
      raise ValueCheckError(f"{message} (got {detail()})" if detail else message)
    return
  enabled = checks_enabled()
  tracers = [x for x in jax.tree.leaves(operands) if isinstance(x, jax.core.Tracer)]
  if not enabled and any(_known_value(x) is None for x in tracers):
    return
  valid = ok()
  known = _known_value(valid)
  if known is not None:
    if not bool(known):
      raise ValueCheckError(message)
  elif enabled:
    # checkify treats the message as a format string.
    checkify.check(valid, message.replace("{", "{{").replace("}", "}}"))


class ValueCheck(NamedTuple):
  """One value condition of a head's inputs, computed, not yet enforced.

  Pure and vmappable: `multi_head` computes the checks of a group of like
  heads as one vectorized computation and enforces them head by head.

  Attributes:
    ok: booleans, elementwise or already reduced; the condition holds when
      all are true. Leaving them unreduced lets `enforce_all` reduce every
      condition of a group in one pass.
    values: optionally, the values to describe in an eager error.
    present: optionally, which of `values` take part.
  """

  ok: Any
  values: Any = None
  present: Any = None


def deferrable(*operands: Any) -> bool:
  """Whether value checks on traced `operands` may ride on a screened loss (`enforce_screens`).

  A screened head computes its screen whenever checks are on (a superset,
  so that a deferred head never lacks it), also inside `shard_map`: each
  shard reduces its own screens, and `functionalize` shares the first
  failing shard's error.
  """
  return checks_enabled() and not is_concrete(*operands)


def enforce_screens(segments: Sequence[tuple[Sequence[str], Sequence[str], Any]]) -> None:
  """Enforces screened heads' value checks from their reduced screens (`LossTerms.failed`).

  Each segment is `(head descriptions, problems, failed)`: heads computed
  alike, their K problems in order, and `failed`, `[n_heads]` ints, 0 where
  a head's checks passed, else `K - k` for its first failing problem k.
  Stages one `checkify.check` for all segments, whose payload indexes the
  first failure's `"<head>: <problem>"` (decoded by `StepErrors`). Only for
  staged checks (`deferrable`); eager ones are enforced where they are
  computed, with the offending values.
  """
  messages, indices = [], []
  for descriptions, problems, failed in segments:
    n_problems = len(problems)
    failed = jnp.asarray(failed, jnp.int32)
    head = jnp.arange(len(descriptions), dtype=jnp.int32)
    indices.append(
        jnp.where(failed > 0, len(messages) + head * n_problems + n_problems - failed, -1)
    )
    messages += [f"{where}: {problem}" for where in descriptions for problem in problems]
  if not messages:
    return
  index = jnp.concatenate(indices)
  # The first failure in order: the smallest index that is not -1.
  first = jnp.min(jnp.where(index < 0, len(messages), index))
  checkify.check(first == len(messages), _encode(tuple(messages)), first)


def should_check(*operands: Any) -> bool:
  """Whether value checks on `operands` can have an effect here (eager, or checks on)."""
  if checks_enabled() or is_concrete(*operands):
    return True
  return all(
      _known_value(x) is not None
      for x in jax.tree.leaves(operands)
      if isinstance(x, jax.core.Tracer)
  )


def enforce(where: str, results: Mapping[str, ValueCheck]) -> None:
  """Enforces one head's computed value checks: `"<where>: <problem>"` for the first that fails."""
  # Problem by problem: a tree map over the dict would sort its keys, and the
  # first problem in the head's own order is the one to report.
  enforce_all(
      [where],
      {problem: jax.tree.map(lambda x: jnp.asarray(x)[None], check) for problem, check in results.items()},
  )


def enforce_all(descriptions: Sequence[str], results: Mapping[str, ValueCheck]) -> None:
  """Enforces the value checks of several heads, computed stacked (`[n_heads]` each).

  Eagerly, raises `"<head>: <problem>"` for the first head (in order) that
  fails. Under a trace with checks on, stages one `checkify.check` for all
  of them: its payload is the index of the first failure, which
  `StepErrors` turns back into the head's message on the host. One check
  instead of one per head and problem keeps a step with many heads cheap.
  """
  problems = list(results)
  if not problems:
    return
  n_heads = len(descriptions)
  oks = [results[p].ok for p in problems]
  known = [_known_value(x) if isinstance(x, jax.core.Tracer) else x for x in oks]
  if all(k is not None for k in known):
    known = [np.asarray(k).reshape(n_heads, -1).all(axis=1) for k in known]
    for h, where in enumerate(descriptions):
      for p, problem in enumerate(problems):
        if not known[p][h]:
          check = results[problem]
          message = f"{where}: {problem}"
          if check.values is not None and is_concrete(check.values, check.present):
            values = np.asarray(check.values)[h]
            present = None if check.present is None else np.asarray(check.present)[h]
            message += f" (got {describe_values(values, present)})"
          raise ValueCheckError(message)
    return
  if not checks_enabled():
    return
  # Each condition reduced per head (over a batch that may be sharded),
  # then one check for all: its payload is the first failure's index.
  flags = jnp.stack(
      [jnp.all(jnp.reshape(jnp.asarray(ok, bool), (n_heads, -1)), axis=1) for ok in oks], axis=1
  ).reshape(-1)
  messages = tuple(f"{where}: {problem}" for where in descriptions for problem in problems)
  checkify.check(jnp.all(flags), _encode(messages), jnp.argmin(flags))


_MESSAGES: dict[str, tuple[str, ...]] = {}
_ENCODED = re.compile(r"jheads-check:([0-9a-f]{16}):(\d+)")


def _encode(messages: tuple[str, ...]) -> str:
  """A checkify message standing for `messages[payload]`, decoded by `decode_message`."""
  key = hashlib.sha256("\n".join(messages).encode()).hexdigest()[:16]
  _MESSAGES.setdefault(key, messages)
  return f"jheads-check:{key}:{{}}"


def decode_message(message: str) -> str:
  """The head's message behind a checkify message (see `enforce_all`)."""
  message = message.removesuffix(" (`check` failed)")
  match = _ENCODED.fullmatch(message)
  if match is None:
    return message
  return _MESSAGES[match.group(1)][int(match.group(2))]


def all_finite(values: Any, present: Any = None) -> jax.Array:
  """Whether every (present) entry of `values` is finite."""
  return jnp.all(finite(values, present))


def finite(values: Any, present: Any = None) -> jax.Array:
  """Elementwise: the entry is finite, or not present."""
  ok = jnp.isfinite(jnp.asarray(values))
  return ok if present is None else ok | ~present


def _packable(leaves: Sequence[Any]) -> bool:
  return bool(leaves) and all(
      np.ndim(x) == 0 and np.dtype(x.dtype).itemsize <= 4 and np.dtype(x.dtype).kind in "biuf"
      for x in leaves
  )


def _pack(leaves: Sequence[Any]) -> jax.Array:
  """Scalars of at most 32 bits as one int32 vector, each bit for bit (floats bitcast)."""

  def as_int32(x):
    x = jnp.asarray(x)
    if x.dtype == bool or (x.dtype.kind in "iu" and x.dtype.itemsize < 4):
      return x.astype(jnp.int32)
    if x.dtype.kind == "f" and x.dtype.itemsize < 4:
      x = x.astype(jnp.float32)
    return jax.lax.bitcast_convert_type(x, jnp.int32)

  return jnp.stack([as_int32(x) for x in leaves])


def _unpack(packed: Any, dtypes: Sequence[np.dtype]) -> list[Any]:
  """`_pack`'s leaves back from its vector (the last axis), numpy or traced."""
  host = isinstance(packed, np.ndarray)
  leaves = []
  for i, dtype in enumerate(dtypes):
    x = packed[..., i]
    if dtype == bool:
      leaves.append(x != 0)
    elif dtype.kind in "iu" and dtype.itemsize < 4:
      leaves.append(x.astype(dtype))
    else:
      wide = np.dtype(np.float32) if dtype.kind == "f" else dtype
      x = x.view(wide) if host else jax.lax.bitcast_convert_type(x, wide)
      leaves.append(x.astype(dtype))
  return leaves


class StepErrors:
  """The value checks of a traced computation, carried out with its outputs.

  A pytree (checkify's error: flags, codes and payloads), so it travels
  through `jit`, `pmap` and `shard_map` outputs. `get` gives the first
  failed check's message (None if all passed), `throw` and
  `raise_if_failed` raise it as a `ValueCheckError`; the step builders'
  outputs call `raise_if_failed` whenever they are read on the host, and
  `jax.device_get` of them raises too.

  The error's scalars travel packed in one int32 vector: every output of a
  jitted step costs its dispatch a buffer and an array (three scalars made
  a 10-head step about 9% slower on a CPU than one vector did), and a leaf
  that checkify leaves constant would be worse still (jit returns a constant
  output from Python on every call).
  """

  __slots__ = ("_leaves", "_treedef")

  def __init__(self, error: Any):
    leaves, treedef = jax.tree.flatten(error)
    if _packable(leaves):
      self._leaves = [_pack(leaves)]
      self._treedef = (treedef, tuple(np.dtype(x.dtype) for x in leaves))
    else:
      self._leaves, self._treedef = leaves, (treedef, None)

  def _error_leaves(self) -> list[Any]:
    treedef, dtypes = self._treedef
    if dtypes is None:
      return list(self._leaves)
    packed = self._leaves[0]
    if is_concrete(packed):
      packed = np.asarray(packed)
    return _unpack(packed, dtypes)

  @property
  def error(self) -> Any:
    return jax.tree.unflatten(self._treedef[0], self._error_leaves())

  def get(self) -> str | None:
    if not self._leaves or not is_concrete(self._leaves):
      return None
    if any(isinstance(x, jax.ShapeDtypeStruct) for x in self._leaves):
      return None  # `jax.eval_shape` of a step: shapes only, nothing to read.
    treedef = self._treedef[0]
    leaves = [np.asarray(x) for x in self._error_leaves()]
    # Stacked over devices (pmap with mapped outputs): the first failure.
    for i in range(np.shape(leaves[0])[0]) if np.ndim(leaves[0]) else [None]:
      shard = leaves if i is None else [x[i] for x in leaves]
      message = jax.tree.unflatten(treedef, shard).get()
      if message is not None:
        return decode_message(message)
    return None

  def raise_if_failed(self) -> None:
    message = self.get()
    if message is not None:
      raise ValueCheckError(message)

  throw = raise_if_failed


def _unflatten_step_errors(aux, leaves):
  # Rebuilt in C++ on every step's dispatch: no checkify objects here.
  errors = StepErrors.__new__(StepErrors)
  errors._leaves, errors._treedef = list(leaves), aux
  if leaves and type(leaves[0]) in (np.ndarray, np.bool_, np.int32):
    # Rebuilt from host copies: `jax.device_get` (or a tree map to numpy) of
    # the step's outputs, which is a read. jax's own dispatch rebuilds
    # outputs from device arrays, and traces from tracers; neither raises.
    errors.raise_if_failed()
  return errors


jax.tree_util.register_pytree_node(
    StepErrors, lambda e: (e._leaves, e._treedef), _unflatten_step_errors
)


def functionalize(
    fn: Callable[..., Any], *, axis_name: Any = None
) -> Callable[..., tuple[StepErrors, Any]]:
  """`fn` with value checks on, returning `(StepErrors, fn's output)`.

  Under `axis_name` (pmap, shard_map) the errors are made the same on every
  shard: each shard gets those of the first shard that failed.
  """
  checked_fn = checkify.checkify(with_value_checks(fn), errors=checkify.user_checks)

  def run(*args, **kwargs):
    error, out = checked_fn(*args, **kwargs)
    if axis_name is not None:
      error = _first_failure(error, axis_name)
    errors = StepErrors(error)
    # An un-jitted step knows at once.
    errors.raise_if_failed()
    return errors, out

  return run


def _first_failure(error: Any, axis_name: Any) -> Any:
  leaves, treedef = jax.tree.flatten(error)
  if not leaves:
    return error
  failed = jnp.any(jnp.stack([jnp.any(x) for x in leaves if x.dtype == bool]))
  index = jax.lax.axis_index(axis_name)
  first = jax.lax.pmin(jnp.where(failed, index, jnp.iinfo(jnp.int32).max), axis_name)
  mine = index == first
  shared = [
      jax.lax.psum(jnp.where(mine, x, jnp.zeros_like(x)).astype(jnp.int32), axis_name).astype(
          x.dtype
      )
      for x in leaves
  ]
  return jax.tree.unflatten(treedef, shared)


def checked_step(
    step: Callable[..., Any], *, axis_name: Any = None, attach: Callable[[Any, StepErrors], Any]
) -> Callable[..., Any]:
  """`step` with its value checks on; `attach(outputs, errors)` makes outputs that raise when read.

  The step builders of `jheads.training` use it: under `jit`, `pmap` or
  `shard_map` the checks come out of the step as a few scalars beside its
  outputs (`checkify` outputs, no host callback), and the outputs raise
  them when read on the host; an un-jitted step raises at once.
  """

  def run(*args, **kwargs):
    errors, out = functionalize(step, axis_name=axis_name)(*args, **kwargs)
    return attach(out, errors)

  return run


class CheckedDict(dict):
  """A dict of step outputs (statistics, predictions) that raises failed value checks when read.

  Reading means indexing it, iterating its items or values, or passing it
  to `jheads.metrics.merge` / `compute` or `jheads.decode_predictions`.
  Inside a trace it is a plain dict of tracers. As a pytree it carries the
  errors as extra leaves (flattening never raises: jax flattens step
  outputs inside its own dispatch).
  """

  def __init__(self, values: Mapping[Any, Any], errors: StepErrors | None = None):
    super().__init__(values)
    self.errors = errors

  def check(self) -> "CheckedDict":
    if self.errors is not None:
      self.errors.raise_if_failed()
    return self

  def __getitem__(self, key):
    self.check()
    return super().__getitem__(key)

  def items(self):
    self.check()
    return super().items()

  def values(self):
    self.check()
    return super().values()


def _flatten_checked_dict(d: CheckedDict):
  # Never raise, never read values here: jax flattens step outputs inside its dispatch.
  keys = tuple(sorted(dict.keys(d)))
  return [dict.__getitem__(d, k) for k in keys] + [d.errors], keys


def _unflatten_checked_dict(keys, children):
  return CheckedDict(dict(zip(keys, children[:-1])), children[-1])


jax.tree_util.register_pytree_node(CheckedDict, _flatten_checked_dict, _unflatten_checked_dict)


# ----------------------------------------------------------------------------
# Shape and dtype checks, at construction or trace time.


def as_array(value: Any) -> Any:
  """Leaves jax arrays and tracers alone; turns anything else into numpy."""
  if isinstance(value, (jax.Array, jax.core.Tracer)):
    return value
  return np.asarray(value)


def _is_string(array: Any) -> bool:
  return isinstance(array, np.ndarray) and array.dtype.kind in "USO"


def _is_numeric(array: Any) -> bool:
  return jnp.issubdtype(array.dtype, jnp.number) or array.dtype == bool


def check_logits(where: str, logits: Any, logits_dim: int) -> Any:
  """Checks logits are `[D0, ..., DN, logits_dim]` and numeric; returns them as an array."""
  if logits is None:
    raise ValueError(f"{where}: logits are required, got None.")
  logits = as_array(logits)
  if not _is_numeric(logits):
    raise ValueError(f"{where}: logits must be numeric, got dtype {logits.dtype}.")
  if logits.ndim < 2 or logits.shape[-1] != logits_dim:
    raise ValueError(
        f"{where}: logits must have shape [D0, ..., DN, {logits_dim}] (rank >= 2,"
        f" last dimension {logits_dim}), got shape {tuple(logits.shape)}."
    )
  return logits


def check_labels(
    where: str,
    labels: Any,
    logits_shape: tuple[int, ...],
    label_dim: int,
    *,
    integer: bool = False,
    has_vocabulary: bool = False,
) -> Any:
  """Checks labels match logits; a last axis of 1 may be dropped."""
  if labels is None:
    raise ValueError(f"{where}: labels are required, got None.")
  if isinstance(labels, Mapping):
    raise ValueError(f"{where}: labels must be an array, got a dict.")
  labels = as_array(labels)
  if _is_string(labels):
    hint = (
        "map them to ids on the host first with jheads.encode_labels(head, labels)"
        if has_vocabulary
        else "string labels need a label_vocabulary"
    )
    raise ValueError(f"{where}: labels are strings; {hint}.")
  if not _is_numeric(labels):
    raise ValueError(f"{where}: labels must be numeric, got dtype {labels.dtype}.")
  if integer and not (
      jnp.issubdtype(labels.dtype, jnp.integer) or labels.dtype == bool
  ):
    raise ValueError(
        f"{where}: labels must be integer class ids, got dtype {labels.dtype}."
    )
  if isinstance(labels, np.ndarray) and labels.dtype.kind in "iu" and labels.size:
    # Without x64, jax would silently wrap int64 ids into int32.
    target = jnp.dtype(jax.dtypes.canonicalize_dtype(labels.dtype))
    info = np.iinfo(target)
    if labels.min() < info.min or labels.max() > info.max:
      raise ValueError(
          f"{where}: labels must fit {target} (jax would wrap them), got values"
          f" in [{labels.min()}, {labels.max()}]."
      )
  expected = tuple(logits_shape[:-1]) + (label_dim,)
  allowed = [expected, expected[:-1]] if label_dim == 1 else [expected]
  if tuple(labels.shape) not in allowed:
    raise ValueError(
        f"{where}: labels shape {tuple(labels.shape)} does not match logits shape"
        f" {tuple(logits_shape)}; expected {' or '.join(str(s) for s in allowed)}."
    )
  return labels


def fetch_weights(where: str, features: Mapping[str, Any] | None, weight_column: Any) -> Any:
  """Looks up the example weights named by `weight_column` in `features`."""
  if weight_column is None:
    return None
  if features is not None and not isinstance(features, Mapping):
    raise ValueError(
        f"{where}: features must be a dict holding the weight column"
        f" {weight_column!r}, got {type(features).__name__}."
    )
  if callable(weight_column):
    weights = weight_column(features)
  else:
    if features is None or weight_column not in features:
      present = sorted(features) if features is not None else []
      raise ValueError(
          f"{where}: weight_column {weight_column!r} is missing from features"
          f" (keys: {present})."
      )
    weights = features[weight_column]
  if weights is None:
    raise ValueError(f"{where}: weights from {weight_column!r} are None.")
  return weights


def check_weights(
    where: str, weights: Any, logits_shape: tuple[int, ...], *, per_logit: bool
) -> Any:
  """Checks weights are `[D0..DN]`, `[D0..DN, 1]` (or `[D0..DN, d]` per logit)."""
  if weights is None:
    return None
  weights = as_array(weights)
  if not _is_numeric(weights):
    raise ValueError(f"{where}: weights must be numeric, got dtype {weights.dtype}.")
  batch = tuple(logits_shape[:-1])
  allowed = [batch, batch + (1,)]
  if per_logit and logits_shape[-1] != 1:
    allowed.append(tuple(logits_shape))
  if tuple(weights.shape) not in allowed:
    raise ValueError(
        f"{where}: weights shape {tuple(weights.shape)} does not match logits"
        f" shape {tuple(logits_shape)}; expected "
        + " or ".join(str(s) for s in allowed)
        + "."
    )
  return weights


def fetch_mask(where: str, features: Mapping[str, Any] | None, mask_column: Any) -> Any:
  """Looks up the row mask named by `mask_column` (a features key or a callable)."""
  if mask_column is None:
    return None
  if callable(mask_column):
    mask = mask_column(features)
  else:
    if not isinstance(features, Mapping) or mask_column not in features:
      present = sorted(features) if isinstance(features, Mapping) else []
      raise ValueError(
          f"{where}: mask_column {mask_column!r} is missing from features"
          f" (keys: {present})."
      )
    mask = features[mask_column]
  if mask is None:
    raise ValueError(f"{where}: the mask from {mask_column!r} is None.")
  return mask


def check_mask_column(where: str, mask_column: Any) -> Any:
  """Validates a `mask_column` argument: None, a features key or a callable."""
  if mask_column is None or callable(mask_column) or (
      isinstance(mask_column, str) and mask_column
  ):
    return mask_column
  raise ValueError(
      f"{where}: mask_column must be a features key (a string) or a callable"
      f" features -> mask, got {mask_column!r}."
  )


def check_missing_label(where: str, missing_label: Any, *, integer: bool = False) -> Any:
  """Validates `missing_label`: None, a number (NaN allowed for float labels), or an int."""
  if missing_label is None:
    return None
  if isinstance(missing_label, (bool, np.bool_)) or not isinstance(
      missing_label, (int, float, np.integer, np.floating)
  ):
    raise ValueError(
        f"{where}: missing_label must be a number (e.g. float('nan') or -1) or"
        f" None, got {missing_label!r}."
    )
  if integer:
    if isinstance(missing_label, (float, np.floating)):
      if not float(missing_label).is_integer():
        raise ValueError(
            f"{where}: labels are integer class ids, so missing_label must be an"
            f" int (e.g. -1), got {missing_label!r}."
        )
    return int(missing_label)
  if isinstance(missing_label, (int, np.integer)):
    return int(missing_label)
  return float(missing_label)


def check_mask(where: str, mask: Any, logits_shape: tuple[int, ...]) -> Any:
  """Checks a row mask: bool or 0/1 numbers, its shape a prefix of the batch shape."""
  if mask is None:
    return None
  mask = as_array(mask)
  if not _is_numeric(mask):
    raise ValueError(f"{where}: the mask must be bool or 0/1 numbers, got dtype {mask.dtype}.")
  batch = tuple(logits_shape[:-1])
  if tuple(mask.shape) != batch[: mask.ndim] or mask.ndim == 0:
    raise ValueError(
        f"{where}: mask shape {tuple(mask.shape)} does not match logits shape"
        f" {tuple(logits_shape)}; expected {batch} (or a prefix of it)."
    )
  if mask.dtype != bool:
    require(
        lambda: jnp.all((mask == 0) | (mask == 1)),
        f"{where}: the mask must hold only 0 and 1 (or booleans)",
        mask,
    )
  return mask


def require_finite(
    where: str, what: str, values: Any, *, hint: str = "", where_present: Any = None
) -> None:
  """Raises (eagerly, or under `checked`) if any array in `values` holds NaN or infinity.

  With `where_present` (a bool array of `values`' shape), only those entries count.
  """
  leaves = jax.tree.leaves(values)
  if not leaves:
    return

  def finite():
    if where_present is not None:
      return jnp.all(jnp.isfinite(jnp.asarray(leaves[0])) | ~where_present)
    return jnp.all(jnp.stack([jnp.all(jnp.isfinite(jnp.asarray(x))) for x in leaves]))

  operands = leaves if where_present is None else [*leaves, where_present]
  require(finite, f"{where}: {what} must be finite (no NaN or infinity){hint}", *operands)


def require_nonnegative(where: str, what: str, values: Any, *, where_present: Any = None) -> None:
  """Raises (eagerly, or under `checked`) if `values` holds a negative entry (where present)."""
  if values is None:
    return

  def nonnegative():
    ok = jnp.asarray(values) >= 0
    return jnp.all(ok if where_present is None else ok | ~where_present)

  operands = [values] if where_present is None else [values, where_present]
  require(nonnegative, f"{where}: {what} must be >= 0", *operands)


OVERFLOW_HINT = "; do the logits or labels overflow float32?"
"""Why a loss computed from finite inputs can still be infinite."""


# ----------------------------------------------------------------------------
# Configuration checks, when a factory builds a head.


def validate_loss_fn(where: str, loss_fn: Callable[..., Any] | None) -> bool:
  """Checks a custom `loss_fn(labels, logits[, features])`; returns whether it takes features."""
  if loss_fn is None:
    return False
  if not callable(loss_fn):
    raise TypeError(f"{where}: loss_fn must be callable, got {type(loss_fn).__name__}.")
  parameters = inspect.signature(loss_fn).parameters
  takes_kwargs = any(p.kind is p.VAR_KEYWORD for p in parameters.values())
  names = {
      n for n, p in parameters.items() if p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL)
  }
  for required_name in ("labels", "logits"):
    if required_name not in names and not takes_kwargs:
      raise ValueError(
          f"{where}: loss_fn must take an argument named {required_name!r};"
          f" it takes {sorted(names)}."
      )
  unexpected = names - {"labels", "logits", "features"}
  if unexpected:
    raise ValueError(
        f"{where}: loss_fn has unexpected arguments {sorted(unexpected)};"
        " allowed are labels, logits and features."
    )
  return "features" in names or takes_kwargs


def check_name(name: Any, kind: str) -> str | None:
  if name is None:
    return None
  if not isinstance(name, str) or not name:
    raise ValueError(f"{kind}_head: name must be a non-empty string or None, got {name!r}.")
  return name


def check_vocabulary(
    where: str, label_vocabulary: Any, n_classes: int
) -> tuple[str, ...] | None:
  """Validates a label vocabulary: a list or tuple of n_classes distinct strings."""
  if label_vocabulary is None:
    return None
  if not isinstance(label_vocabulary, (list, tuple)):
    raise ValueError(
        f"{where}: label_vocabulary must be a list or tuple of strings, got"
        f" {type(label_vocabulary).__name__}."
    )
  if len(label_vocabulary) != n_classes:
    raise ValueError(
        f"{where}: label_vocabulary has {len(label_vocabulary)} entries but"
        f" n_classes is {n_classes}."
    )
  if not all(isinstance(v, str) for v in label_vocabulary):
    raise ValueError(f"{where}: label_vocabulary entries must be strings.")
  if len(set(label_vocabulary)) != len(label_vocabulary):
    raise ValueError(f"{where}: label_vocabulary has duplicate entries.")
  return tuple(label_vocabulary)


def check_thresholds(where: str, thresholds: Any) -> tuple[float, ...]:
  """Validates extra decision thresholds: floats strictly inside (0, 1)."""
  if thresholds is None:
    return ()
  if isinstance(thresholds, (int, float)):
    thresholds = (thresholds,)
  try:
    values = tuple(float(t) for t in thresholds)
  except (TypeError, ValueError):
    raise ValueError(
        f"{where}: thresholds must be floats in (0, 1), got {thresholds!r}."
    ) from None
  for t in values:
    if not 0.0 < t < 1.0:
      raise ValueError(f"{where}: thresholds must be in (0, 1), got {t}.")
  keys = [f"{t:g}" for t in values]
  clashes = sorted({k for k in keys if keys.count(k) > 1})
  if clashes:
    same = [t for t in values if f"{t:g}" in clashes]
    raise ValueError(
        f"{where}: thresholds {same} are duplicates or print alike in their metric"
        f" keys (positive_threshold_{clashes[0]}); give distinct thresholds."
    )
  return values


def is_integer(value: Any) -> bool:
  """An int or numpy integer, not a bool."""
  return isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_))


# ----------------------------------------------------------------------------
# Arguments of the multi-task factories (jheads.weighting, jheads.aggregation).


def check_vector(value: ArrayLike, name: str, where: str) -> np.ndarray:
  """A concrete, finite, non-empty `[T]` vector argument of a factory, as float64 numpy."""
  if isinstance(value, jax.core.Tracer):
    raise ValueError(f"{where}: {name} must be concrete (not traced).")
  try:
    array = np.asarray(value, dtype=np.float64)
  except (TypeError, ValueError):
    raise ValueError(f"{where}: {name} must be a vector of numbers, got {value!r}.") from None
  if array.ndim != 1 or array.size == 0:
    raise ValueError(f"{where}: {name} must be a non-empty 1-D vector, got shape {array.shape}.")
  if not np.all(np.isfinite(array)):
    raise ValueError(f"{where}: {name} must be finite, got {array.tolist()}.")
  return array


def check_length(array: np.ndarray | None, name: str, n_heads: int, where: str) -> None:
  """Raises unless a factory's `[T]` vector argument has one entry per head."""
  if array is not None and array.shape[0] != n_heads:
    raise ValueError(f"{where}: {name} has {array.shape[0]} entries but there are {n_heads} heads.")


def check_num_thresholds(where: str, num_thresholds: Any) -> int:
  if not is_integer(num_thresholds) or num_thresholds < 2:
    raise ValueError(f"{where}: num_thresholds must be an int >= 2, got {num_thresholds!r}.")
  return int(num_thresholds)


def describe_values(labels: Any, present: Any = None) -> str:
  values = np.asarray(labels)
  if present is not None:
    values = values[np.broadcast_to(np.asarray(present), values.shape)]
  values = np.unique(values)
  shown = ", ".join(f"{v:g}" if np.issubdtype(values.dtype, np.number) else str(v)
                    for v in values[:8])
  more = ", ..." if values.size > 8 else ""
  return f"values {{{shown}{more}}}"
