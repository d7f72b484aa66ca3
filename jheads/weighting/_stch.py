"""Smooth Tchebycheff scalarization (STCH)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

from jheads.weighting import _base


def stch(
    *,
    mu: float = 1.0,
    pref_vector: jax.typing.ArrayLike | None = None,
    reference: jax.typing.ArrayLike | None = None,
) -> _base.LossWeighting:
  """Smooth Tchebycheff scalarization (Lin et al., ICML 2024).

  `S(L) = mu log sum_i exp(y_i / mu)` with `y = pref (L - reference)`, a
  smooth upper bound of `max_i y_i` that tightens as `mu` falls; head
  weights `pref * softmax(y / mu)`. Computed as
  `max(y) + mu logsumexp((y - max(y)) / mu)` (the paper's Appendix B.1), so
  it neither overflows for large losses nor loses precision for small `mu`.
  This is torchjd's `scalarization.STCH` (`scalarization/_stch.py`), the
  stateless paper form; LibMTL's `STCH.py` adds a warm-up that estimates
  the nadir point, which `reference` takes here as a fixed argument.

  Args:
    mu: the smoothing parameter, strictly positive. torchjd has no default;
      1.0 is LibMTL's `STCH_mu`. The paper evaluates 0.01 to 1.
    pref_vector: `[T]` preference weights (on the simplex in the paper);
      default `1/T` each.
    reference: `[T]` ideal point subtracted from the losses; default 0.

  Returns:
    A `LossWeighting` with `optax.EmptyState()` state.

  Example:
    >>> import jax.numpy as jnp
    >>> from jheads import weighting
    >>> w = weighting.stch(mu=0.1)
    >>> state = w.init(2)
    >>> losses = jnp.array([1.0, 3.0])
    >>> round(float(w.loss(losses, state)), 4)  # close to max(L) / T
    1.5
    >>> h = weighting.head_weights(w, losses, state)  # pref * softmax(y / mu)
    >>> [round(float(x), 5) for x in h]  # nearly all on the worst head
    [2e-05, 0.49998]
  """
  where = "stch"
  mu = _base.check_positive(mu, "mu", where)
  pref = None if pref_vector is None else _base.check_vector(pref_vector, "pref_vector", where)
  ref = None if reference is None else _base.check_vector(reference, "reference", where)
  if pref is not None and ref is not None and pref.shape != ref.shape:
    raise ValueError(
        f"{where}: pref_vector has {pref.shape[0]} entries but reference has {ref.shape[0]}."
    )
  n_fixed = next((v.shape[0] for v in (pref, ref) if v is not None), None)

  def init(n_heads):
    n_heads = _base.check_n_heads(n_heads, where)
    _base.check_length(pref, "pref_vector", n_heads, where)
    _base.check_length(ref, "reference", n_heads, where)
    return optax.EmptyState()

  def loss(losses, state):
    del state
    losses = _base.check_losses(losses, where, n_fixed)
    n_heads = losses.shape[0]
    weights = (
        jnp.full(n_heads, 1.0 / n_heads, losses.dtype) if pref is None
        else jnp.asarray(pref, losses.dtype)
    )
    shifted = losses if ref is None else losses - jnp.asarray(ref, losses.dtype)
    y = weights * shifted
    # The shift is constant for the gradient: d/dy of max + mu lse((y - max) / mu) is the softmax.
    top = jax.lax.stop_gradient(jnp.max(y))
    return top + mu * jax.nn.logsumexp((y - top) / mu)

  def update(losses, state, *, losses_after=None):
    del losses_after
    _base.check_losses(losses, where, n_fixed)
    return state

  return _base.LossWeighting(init, loss, update)
