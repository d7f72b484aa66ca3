"""The `Aggregator` interface, the Gramian and combination helpers, the optax
adapter, and the checks and normalisations the methods share."""

from __future__ import annotations

import numbers
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax import lax
from optax.experimental import aggregating
from jheads.checks import check_length, check_vector  # noqa: F401  (re-exported)

ArrayLike = jax.typing.ArrayLike
State = Any
Jacobian = Any  # a pytree of arrays, each with a leading [T] axis
Updates = Any  # a pytree shaped like the parameters

_HI = lax.Precision.HIGHEST


class Aggregator(NamedTuple):
  """A gradient-level multi-task method: a per-head Jacobian in, one update out.

  Built by the factories of `jheads.aggregation`, in the manner of
  `optax.GradientTransformation`: pure functions and a state pytree that the
  caller threads through, replicated on every device.

  Attributes:
    init: `n_heads -> state`, the initial state (a pytree of arrays).
    update: `(jacobian, state, *, losses=None) -> (update, state)`.
      `jacobian` is a pytree shaped like the shared parameters with a
      leading `[T]` axis on every leaf (row `i` is head `i`'s gradient);
      `update` is shaped like the parameters.
    weights: `(gramian, state, *, losses=None) -> (weights, state)`, the
      `[T]` weights from the `[T, T]` Gramian `J J'`, for methods that see
      the Jacobian only through it (`update(J)` is then
      `combine(weights(gramian(J)), J)`); None for GradDrop, which reads
      the entries' signs.
  """

  init: Callable[[int], State]
  update: Callable[..., tuple[Updates, State]]
  weights: Callable[..., tuple[jax.Array, State]] | None


def _leaves(jacobian: Jacobian, where: str) -> tuple[list[jax.Array], int]:
  leaves = [jnp.asarray(leaf) for leaf in jax.tree.leaves(jacobian)]
  if not leaves:
    raise ValueError(f"{where}: the Jacobian has no leaves.")
  for leaf in leaves:
    if leaf.ndim < 1 or not jnp.issubdtype(leaf.dtype, jnp.floating):
      raise ValueError(
          f"{where}: every Jacobian leaf must be a floating array with a leading [T] "
          f"axis, got {leaf.dtype}{list(leaf.shape)}."
      )
  sizes = {leaf.shape[0] for leaf in leaves}
  if len(sizes) != 1:
    raise ValueError(
        f"{where}: every Jacobian leaf must have the same leading number of heads, "
        f"got {sorted(sizes)}."
    )
  (t,) = sizes
  if t == 0:
    raise ValueError(f"{where}: the Jacobian has 0 heads.")
  return leaves, t


def accumulation_dtype(dtype: Any) -> Any:
  """float32, or the dtype when wider: bf16/fp16 gradients accumulate in float32."""
  return jnp.promote_types(dtype, jnp.float32)


def gramian(jacobian: Jacobian) -> jax.Array:
  """The `[T, T]` Gramian `G = J J'` of a pytree Jacobian.

  The sum over leaves of each leaf's Gramian (contracting every axis but the
  leading one), so that nothing is concatenated into a `[T, P]` matrix.
  Computed with `precision=HIGHEST` and accumulated in float32 or wider.

  Args:
    jacobian: a pytree of arrays `[T, ...]` (one row per head).

  Returns:
    `[T, T]` symmetric positive semi-definite, float32 (or the widest leaf
    dtype when wider).

  Example:
    >>> import jax.numpy as jnp
    >>> from jheads import aggregation
    >>> jac = {"w": jnp.array([[[1.0, 0.0]], [[1.0, 1.0]]]), "b": jnp.array([[2.0], [0.0]])}
    >>> aggregation.gramian(jac)
    Array([[5., 1.],
           [1., 2.]], dtype=float32)
  """
  leaves, _ = _leaves(jacobian, "aggregation.gramian")
  total = None
  for leaf in leaves:
    acc = accumulation_dtype(leaf.dtype)
    axes = tuple(range(1, leaf.ndim))
    g = lax.dot_general(
        leaf, leaf, ((axes, axes), ((), ())), precision=_HI, preferred_element_type=acc
    )
    total = g if total is None else total.astype(jnp.promote_types(total.dtype, acc)) + g
  return total


def combine(weights: ArrayLike, jacobian: Jacobian) -> Updates:
  """`sum_i weights_i J_i`: the update of a weighted combination of the rows.

  One `tensordot` per leaf, accumulated in float32 or wider, returned in each
  leaf's dtype.

  Args:
    weights: `[T]`.
    jacobian: a pytree of arrays `[T, ...]`.

  Returns:
    A pytree of arrays `[...]`, shaped like one row of the Jacobian.

  Example:
    >>> import jax.numpy as jnp
    >>> from jheads import aggregation
    >>> jac = {"w": jnp.array([[1.0, 0.0], [1.0, 1.0]])}
    >>> aggregation.combine(jnp.array([0.5, 2.0]), jac)
    {'w': Array([2.5, 2. ], dtype=float32)}
  """
  where = "aggregation.combine"
  _, t = _leaves(jacobian, where)
  weights = jnp.asarray(weights)
  if weights.shape != (t,):
    raise ValueError(f"{where}: weights must have shape ({t},), one per head, got {weights.shape}.")

  def one(leaf):
    leaf = jnp.asarray(leaf)
    acc = jnp.promote_types(accumulation_dtype(leaf.dtype), weights.dtype)
    out = jnp.tensordot(
        weights.astype(acc), leaf, axes=1, precision=_HI, preferred_element_type=acc
    )
    return out.astype(leaf.dtype)

  return jax.tree.map(one, jacobian)


def gramian_update(weights_fn: Callable[..., tuple[jax.Array, State]]) -> Callable[..., Any]:
  """`update` of a Gramian method: weights from `gramian(J)`, then `combine`."""

  def update(jacobian, state, *, losses=None):
    w, state = weights_fn(gramian(jacobian), state, losses=losses)
    return combine(w, jacobian), state

  return update


def as_optax(aggregator: Aggregator, n_heads: int) -> aggregating.Aggregator:
  """The aggregator as an `optax.experimental.aggregating.Aggregator`.

  optax's aggregators take stacked per-element gradients (a leading axis on
  every leaf) and return one update, which is what a per-head Jacobian is,
  so the multi-task methods compose with `aggregating.process(preprocessor,
  aggregator, postprocessor)`. optax's `init(params)` cannot tell the number
  of heads, hence `n_heads`. Extra keyword arguments of `update` are
  accepted (optax passes them to every stage); `losses` goes to the method.

  Args:
    aggregator: an `Aggregator`.
    n_heads: the number of heads `T` (rows of the Jacobian).

  Returns:
    An optax `Aggregator(init, update)`: `init(params) -> state`,
    `update(jacobian, state, params=None, **extra_args) -> (update, state)`.

  Example:
    >>> import jax.numpy as jnp, optax
    >>> from optax.experimental import aggregating
    >>> from jheads import aggregation
    >>> opt = aggregating.process(
    ...     optax.identity(), aggregation.as_optax(aggregation.upgrad(), 2), optax.sgd(1.0))
    >>> params = jnp.zeros(2)
    >>> state = opt.init(params)
    >>> jac = jnp.array([[1.0, 0.0], [-1.0, 1.0]])
    >>> updates, state = opt.update(jac, state, params)
    >>> [round(float(u), 4) for u in -updates]
    [0.2499, 0.75]
  """
  where = "aggregation.as_optax"
  if not isinstance(aggregator, Aggregator):
    raise ValueError(f"{where}: aggregator must be an aggregation.Aggregator, got {aggregator!r}.")
  n_heads = check_n_heads(n_heads, where)

  def init(params):
    del params
    return aggregator.init(n_heads)

  def update(per_elt_updates, state, params=None, **extra_args):
    del params
    _, t = _leaves(per_elt_updates, where)
    if t != n_heads:
      raise ValueError(f"{where}: the Jacobian has {t} rows but the aggregator has {n_heads} heads.")
    return aggregator.update(per_elt_updates, state, losses=extra_args.get("losses"))

  return aggregating.Aggregator(init, update)


# ----------------------------------------------------------------------------
# Shared numerics.


def bucket(t: int) -> int:
  """The padded number of heads the Gramian methods run at: T up to 4, then 16 or a multiple of 8.

  Padding heads are zero rows of the Gramian, marked absent by a mask; each
  method keeps them out (they never enter a support and get weight 0), so
  the weights of the real heads are unchanged, while every number of heads
  from 5 to 16 shares one compiled program (a second or two to compile on a
  CPU) and larger numbers cost at most 7 padding rows. Up to 4 heads run at
  their own size: those programs are small to compile, and a solve at 16
  costs several times one at 2, which a long run of small steps (a toy
  problem, thousands of steps in a scan) pays every step.
  """
  if t <= 4:
    return t
  return 16 if t <= 16 else 8 * -(-t // 8)


def pad(g: jax.Array, vectors=()) -> tuple[jax.Array, jax.Array, list[jax.Array]]:
  """`g` padded to `bucket(T)` with zeros, the `[T_pad]` mask of real heads,
  and each `[T]` vector padded with zeros."""
  t = g.shape[0]
  tp = bucket(t)
  gp = jnp.zeros((tp, tp), g.dtype).at[:t, :t].set(g)
  mask = jnp.arange(tp) < t
  vecs = [jnp.zeros((tp,), g.dtype).at[:t].set(jnp.asarray(v, g.dtype)) for v in vectors]
  return gp, mask, vecs


def mean_pref(mask: jax.Array, dtype: Any) -> jax.Array:
  """`1/T` on the real heads, 0 on the padding."""
  m = mask.astype(dtype)
  return m / jnp.sum(m)


def padded_weights(gramian, where, core, prefs=(), n_heads=None):
  """Checks `gramian`, runs `core(g_pad, mask, *prefs_pad)`, slices the real heads.

  `prefs` are `[T]` vectors or callables `(mask, dtype) -> [T_pad]` for the
  defaults (which depend on the number of real heads). The cores are jitted
  at module level: inside a caller's jit they are inlined, and called
  eagerly they compile once per bucket, dtype and hyper-parameters.
  """
  g = check_gramian(gramian, where, n_heads)
  t = g.shape[0]
  gp, mask, _ = pad(g)
  vecs = []
  for p in prefs:
    if callable(p):
      vecs.append(p(mask, g.dtype))
    else:
      check_length(p, "pref_vector", t, where)
      vecs.append(pad(g, [p])[2][0])
  return core(gp, mask, *vecs)[:t].astype(out_dtype(gramian))


def solve_dtype() -> Any:
  """The solvers' dtype: float64 when x64 is enabled, float32 otherwise."""
  return jnp.float64 if jax.config.jax_enable_x64 else jnp.float32


def normalize(g: jax.Array, norm_eps: float) -> jax.Array:
  """`G / tr(G)`, or zeros when `tr(G) < norm_eps` (torchjd's `normalize`)."""
  tr = jnp.trace(g)
  small = tr < norm_eps
  return jnp.where(small, jnp.zeros_like(g), g / jnp.where(small, 1, tr))


def pinv_psd(g: jax.Array, n_real: jax.Array) -> jax.Array:
  """The pseudo-inverse of a PSD matrix, eigenvalues `|lambda| <= T eps lambda_max` cut.

  The cut is torch.linalg.pinv's default relative tolerance (`max(m, n)
  eps`, `T = n_real` the number of real heads) applied to the eigenvalues of
  the Gramian, which are the rounding floor of a Gramian computed in the
  same precision. Zero padding rows and columns stay zero.
  """
  lam, v = jnp.linalg.eigh(g)
  cut = jnp.max(jnp.abs(lam)) * n_real * jnp.finfo(g.dtype).eps
  # |lambda|, as torch's SVD-based pinv sees a rounding-negative eigenvalue.
  keep = jnp.abs(lam) > cut
  inv = jnp.where(keep, 1 / jnp.where(keep, lam, 1), 0)
  return jnp.matmul(v * inv, v.T, precision=_HI)


def pinv_gramian(g: jax.Array, mask: jax.Array) -> jax.Array:
  """`pinv(G)` as torch computes it, accurately for heads of very different norms.

  When the unit-diagonal `C = D G D` (`D = diag(1/|g_i|)`) of the real heads
  is nonsingular, `pinv(G) = G^-1 = D C^-1 D`: the eigenvalues of `C` carry
  the heads' geometry without their norms, where a float32 `eigh(G)` of
  heads 1e2 apart in norm loses the small ones (condition 1e4 from the
  norms alone). Otherwise (dependent or zero heads) it is `pinv_psd(G)`,
  torch's cut on `G` itself.
  """
  n_real = jnp.sum(mask)
  d = jnp.diagonal(g)
  live = d > 0
  s = jnp.where(live, 1 / jnp.sqrt(jnp.where(live, d, 1)), 0)
  c = g * s[:, None] * s[None, :]
  lam, v = jnp.linalg.eigh(jnp.where(mask[:, None] & mask[None, :], c, jnp.eye(g.shape[0], dtype=g.dtype)))
  full = (jnp.sum(live) == n_real) & (jnp.min(lam) > jnp.max(lam) * n_real * jnp.finfo(g.dtype).eps)
  inv_c = jnp.matmul(v / jnp.where(full, lam, 1), v.T, precision=_HI)
  scaled = jnp.where(mask[:, None] & mask[None, :], inv_c * s[:, None] * s[None, :], 0)
  return jnp.where(full, scaled, pinv_psd(g, n_real))


# ----------------------------------------------------------------------------
# Shared checks: each names the method (`where`) and the problem.


def check_n_heads(n_heads: Any, where: str) -> int:
  """`n_heads` as a positive Python int."""
  if isinstance(n_heads, bool) or not isinstance(n_heads, numbers.Integral):
    raise ValueError(f"{where}: n_heads must be a positive int, got {n_heads!r}.")
  if n_heads < 1:
    raise ValueError(f"{where}: n_heads must be a positive int, got {n_heads}.")
  return int(n_heads)


def check_gramian(g: ArrayLike, where: str, n_heads: int | None = None) -> jax.Array:
  """`g` as a square `[T, T]` float array in the solvers' dtype."""
  g = jnp.asarray(g)
  if g.ndim != 2 or g.shape[0] != g.shape[1] or g.shape[0] == 0:
    raise ValueError(f"{where}: the Gramian must be a square [T, T] matrix, got shape {g.shape}.")
  if not jnp.issubdtype(g.dtype, jnp.floating):
    raise ValueError(f"{where}: the Gramian must be floating, got dtype {g.dtype}.")
  if n_heads is not None and g.shape[0] != n_heads:
    raise ValueError(
        f"{where}: the Gramian is {g.shape[0]} x {g.shape[0]} but the state has {n_heads} heads."
    )
  return g.astype(solve_dtype())


def out_dtype(g: jax.Array) -> Any:
  """The weights' dtype: the Gramian's, at least float32."""
  return accumulation_dtype(jnp.asarray(g).dtype)


def check_losses(losses: Any, where: str, n_heads: int) -> jax.Array:
  """`losses` as a `[T]` float array."""
  if losses is None:
    raise ValueError(f"{where}: needs the per-head losses: pass losses=[T] array.")
  losses = jnp.asarray(losses)
  if losses.shape != (n_heads,) or not jnp.issubdtype(losses.dtype, jnp.number):
    raise ValueError(
        f"{where}: losses must be a numeric ({n_heads},) vector, one per head, "
        f"got {losses.dtype}{list(losses.shape)}."
    )
  return losses.astype(solve_dtype())


def check_real(value: Any, name: str, where: str, *, minimum: float = 0.0, strict: bool = False) -> float:
  """A finite float hyper-parameter `>= minimum` (or `>` when `strict`)."""
  if isinstance(value, bool) or not isinstance(value, numbers.Real) or not np.isfinite(value):
    raise ValueError(f"{where}: {name} must be a finite number, got {value!r}.")
  if value < minimum or (strict and value == minimum):
    rel = ">" if strict else ">="
    raise ValueError(f"{where}: {name} must be {rel} {minimum}, got {value}.")
  return float(value)


def check_int(value: Any, name: str, where: str, *, minimum: int = 1) -> int:
  """An int hyper-parameter `>= minimum`."""
  if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < minimum:
    raise ValueError(f"{where}: {name} must be an int >= {minimum}, got {value!r}.")
  return int(value)


def check_key(key: Any, where: str) -> jax.Array:
  """A `jax.random.key` or a legacy uint32[2] `PRNGKey`."""
  ok = False
  if isinstance(key, jax.Array) or isinstance(key, np.ndarray):
    arr = key
    if jnp.issubdtype(arr.dtype, jax.dtypes.prng_key):
      ok = arr.ndim == 0
    else:
      ok = arr.dtype == np.uint32 and arr.shape == (2,)
  if not ok:
    raise ValueError(f"{where}: key must be a jax.random.key (or PRNGKey), got {key!r}.")
  return jnp.asarray(key)


def check_optimizer(optimizer: Any, where: str) -> optax.GradientTransformation:
  """An optax transformation (anything with `init` and `update`)."""
  if not (callable(getattr(optimizer, "init", None)) and callable(getattr(optimizer, "update", None))):
    raise ValueError(f"{where}: optimizer must be an optax GradientTransformation, got {optimizer!r}.")
  return optimizer


