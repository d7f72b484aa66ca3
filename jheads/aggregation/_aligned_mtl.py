"""Aligned-MTL: the heads' Gramian whitened to its smallest singular value."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import optax

from jheads.aggregation import _base

_SCALE_MODES = ("min", "median", "rmse")


@jax.jit
def aligned_mtl_core(g, mask, pref, scale_mode):
  """Aligned-MTL's weights on a padded Gramian (`pref` 0 off the real heads).

  `scale_mode` is the index in `_SCALE_MODES`, traced: one compilation
  serves the three modes.
  """
  t = g.shape[0]
  lam, v = jnp.linalg.eigh(g)  # ascending; padding adds zero eigenvalues, never kept
  tol = jnp.max(lam) * jnp.sum(mask) * jnp.finfo(g.dtype).eps
  keep = lam > tol
  rank = jnp.sum(keep)
  inv_sqrt = jnp.where(keep, 1 / jnp.sqrt(jnp.where(keep, lam, 1)), 0)
  smallest = jnp.min(jnp.where(keep, lam, jnp.inf))
  # The kept eigenvalues are the top `rank` of the ascending order;
  # torch.median takes the lower of two middle values.
  median = lam[jnp.clip(t - rank + (rank - 1) // 2, 0, t - 1)]
  mean = jnp.sum(jnp.where(keep, lam, 0)) / jnp.maximum(rank, 1)
  scale = jnp.select([scale_mode == 0, scale_mode == 1], [smallest, median], mean)
  scale = jnp.where(rank > 0, scale, 1)
  b = jnp.sqrt(scale) * jnp.matmul(v * inv_sqrt, v.T, precision="highest")
  b = jnp.where(rank > 0, b, jnp.eye(t, dtype=g.dtype))
  return jnp.matmul(b, pref, precision="highest")


def aligned_mtl(
    *, pref_vector: jax.typing.ArrayLike | None = None, scale_mode: str = "min"
) -> _base.Aggregator:
  """Aligned-MTL (Senushkin et al., "Independent Component Alignment for
  Multi-Task Learning", CVPR 2023, Algorithm 1).

  With `G = V diag(lambda) V'` restricted to the eigenvalues `lambda >
  lambda_max T eps` (the rank `r`), the weights are `B pref` with
  `B = sqrt(s) V diag(lambda^-1/2) V'`: the combination of the heads'
  gradients after making them orthogonal with equal norms `sqrt(s)`. `s` is
  the smallest kept eigenvalue (`"min"`), their lower median (`"median"`,
  as `torch.median`) or their mean (`"rmse"`, the original code's). At rank
  0 (all zeros) `B` is the identity. Mean scale.

  Equals torchjd 0.18's `AlignedMTL` (`aggregation/_aligned_mtl.py`),
  including its eigenvalue cut in the Gramian's precision.

  Args:
    pref_vector: `[T]` preference weights; default `1/T` for every head.
    scale_mode: `"min"`, `"median"` or `"rmse"`.

  Returns:
    A stateless `Aggregator`.

  Example:
    >>> import jax.numpy as jnp
    >>> from jheads import aggregation
    >>> a = aggregation.aligned_mtl()
    >>> jac = jnp.array([[2.0, 0.0], [0.0, 1.0]])
    >>> update, _ = a.update(jac, a.init(2))
    >>> update  # both heads rescaled to the smaller norm, then averaged
    Array([0.5, 0.5], dtype=float32)
  """
  where = "aggregation.aligned_mtl"
  pref = None if pref_vector is None else _base.check_vector(pref_vector, "pref_vector", where)
  if scale_mode not in _SCALE_MODES:
    raise ValueError(f"{where}: scale_mode must be one of {_SCALE_MODES}, got {scale_mode!r}.")

  def init(n_heads):
    n_heads = _base.check_n_heads(n_heads, where)
    _base.check_length(pref, "pref_vector", n_heads, where)
    return optax.EmptyState()

  core = functools.partial(aligned_mtl_core, scale_mode=_SCALE_MODES.index(scale_mode))

  def weights(gramian, state, *, losses=None):
    del losses
    p = _base.mean_pref if pref is None else pref
    return _base.padded_weights(gramian, where, core, [p]), state

  return _base.Aggregator(init, _base.gramian_update(weights), weights)
