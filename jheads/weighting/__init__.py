"""Loss-level multi-task methods: per-head losses in, one objective out.

Each factory returns a `LossWeighting(init, loss, update, needs_losses_after)`
of pure functions, in the manner of `optax.GradientTransformation`:

* `state = w.init(n_heads)`: a pytree of arrays, replicated on every device;
* `objective = w.loss(losses, state)`: the scalar the model minimises, from
  the `[T]` head losses. Its gradient with respect to them is the head
  weights applied, `head_weights(w, losses, state)`: the model's gradient is
  `sum_i (dS/dL_i) grad L_i` whether `S` is linear or not;
* `state = w.update(losses, state, *, losses_after=None)`: after the model's
  optimizer step, with the losses `loss` saw (and, when
  `needs_losses_after`, the same batch's losses under the new parameters).

Everything runs under `jax.jit`, `vmap`, `pmap` and `shard_map`: schedules
(DWA's epochs) advance inside `update`, randomness (RLW) comes from a key in
the state, and learned parameters (UW's log-variances, FAMO's logits) take a
step of their own optax optimizer, not the model's. Values and head weights
equal torchjd 0.18's `torchjd.scalarization`.

| factory | objective `S(L)` | torchjd |
|---|---|---|
| `equal()` | `sum L` | `Sum` |
| `fixed(weights)` | `sum w L` | `Constant`, `Mean` |
| `uncertainty(*, init_log_var=0.0, optimizer=None)` | `sum 0.5 exp(-s) L + 0.5 s` | `UW` |
| `dwa(*, steps_per_epoch, temperature=2.0)` | `sum T softmax(r / temp) L` | `DWA` |
| `random(*, key)` | `sum softmax(z) L`, `z ~ N(0, I)` | `Random` |
| `geometric()` | `exp(mean log L)` | `GeometricMean` |
| `stch(*, mu=1.0, pref_vector=None, reference=None)` | `mu lse(pref (L - ref) / mu)` | `STCH` |
| `famo(*, min_losses=None, optimizer=None)` | `sum z log D / sg(sum z / D)` | `FAMO` |

Example:
  >>> import jax, jax.numpy as jnp, optax
  >>> from jheads import weighting
  >>> w = weighting.uncertainty()
  >>> state = w.init(2)
  >>> losses = jnp.array([0.5, 2.0])
  >>> objective, weights = jax.value_and_grad(w.loss)(losses, state)
  >>> weights  # the head weights 0.5 exp(-s) applied this step
  Array([0.5, 0.5], dtype=float32)
  >>> state = jax.jit(w.update)(losses, state)
"""

from jheads.weighting._base import LossWeighting, head_weights
from jheads.weighting._dwa import DWAState, dwa
from jheads.weighting._famo import FAMOState, famo
from jheads.weighting._geometric import geometric
from jheads.weighting._linear import equal, fixed
from jheads.weighting._random import RandomState, random
from jheads.weighting._stch import stch
from jheads.weighting._uncertainty import UncertaintyState, uncertainty

__all__ = [
    "DWAState",
    "FAMOState",
    "LossWeighting",
    "RandomState",
    "UncertaintyState",
    "dwa",
    "equal",
    "famo",
    "fixed",
    "geometric",
    "head_weights",
    "random",
    "stch",
    "uncertainty",
]
