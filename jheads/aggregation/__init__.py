"""Gradient-level multi-task methods: a per-head Jacobian in, one update out.

Each factory returns an `Aggregator(init, update, weights)` of pure functions,
in the manner of `optax.GradientTransformation`:

* `state = a.init(n_heads)`: a pytree of arrays, replicated on every device;
* `update, state = a.update(jacobian, state, *, losses=None)`: `jacobian` is
  a pytree shaped like the shared parameters with a leading `[T]` axis on
  every leaf (`jax.vmap` of a vjp over the heads), `update` is shaped like
  the parameters;
* `weights, state = a.weights(gramian, state, *, losses=None)`: the `[T]`
  weights from the `[T, T]` Gramian, for every method that sees the
  Jacobian only through `G = J J'` (all but GradDrop, whose `weights` is
  None), so that `update(J) = combine(weights(gramian(J)), J)`.

`gramian(jacobian)` sums per-leaf Gramians and `combine(weights, jacobian)`
takes one `tensordot` per leaf: nothing is concatenated into a `[T, P]`
matrix. `as_optax(aggregator, n_heads)` adapts any of them to
`optax.experimental.aggregating`. Everything runs under `jax.jit`, `vmap`,
`pmap` and `shard_map`; solvers are exact, inside jit, in float64 when x64
is enabled; randomness comes from a key in the state, so every device draws
the same.

| factory | scale | torchjd 0.18 |
|---|---|---|
| `mean()` | mean | `Mean` |
| `sum()` | sum | `Sum` |
| `upgrad(*, pref_vector=None, norm_eps=1e-4, reg_eps=1e-4)` | mean | `UPGrad` |
| `dualproj(*, pref_vector=None, norm_eps=1e-4, reg_eps=1e-4)` | mean | `DualProj` |
| `mgda(*, epsilon=1e-3, max_iters=100, exact=True)` | mean | `MGDA` (exact min-norm point) |
| `pcgrad(*, key)` | sum | `PCGrad` |
| `cagrad(*, c=0.5, norm_eps=1e-4)` | mean, no `1/(1+c^2)` | `CAGrad` |
| `imtl_g()` | mean | `IMTLG` |
| `aligned_mtl(*, pref_vector=None, scale_mode="min")` | mean | `AlignedMTL` |
| `nash_mtl(*, max_norm=1.0, update_weights_every=1, optim_niter=20)` | norm `min(max_norm, sqrt(T))` | `NashMTL` (exact solution) |
| `config(*, pref_vector=None)` | sum | `ConFIG` |
| `graddrop(*, key, leak=None)` | sum | `GradDrop` |
| `gradnorm(*, alpha=1.5, optimizer=None)` | weights sum to `T` | none (LibMTL `GradNorm`) |

Example:
  >>> import jax, jax.numpy as jnp
  >>> import jheads.aggregation as aggregation
  >>> jac = {"w": jnp.array([[[1.0, 0.0]], [[-1.0, 1.0]]]), "b": jnp.zeros((2, 3))}
  >>> a = aggregation.upgrad()
  >>> update, state = jax.jit(a.update)(jac, a.init(2))
  >>> update["w"].round(4), update["b"].shape
  (Array([[0.2499, 0.75  ]], dtype=float32), (3,))
"""

from jheads.aggregation._aligned_mtl import aligned_mtl
from jheads.aggregation._base import Aggregator, as_optax, combine, gramian
from jheads.aggregation._cagrad import cagrad
from jheads.aggregation._config import config
from jheads.aggregation._dualproj import dualproj
from jheads.aggregation._graddrop import GradDropState, graddrop
from jheads.aggregation._gradnorm import GradNormState, gradnorm
from jheads.aggregation._imtl_g import imtl_g
from jheads.aggregation._mean import mean
from jheads.aggregation._mgda import mgda
from jheads.aggregation._nash_mtl import NashMTLState, nash_mtl
from jheads.aggregation._pcgrad import PCGradState, pcgrad
from jheads.aggregation._sum import sum  # noqa: A004 - torchjd's name
from jheads.aggregation._upgrad import upgrad

__all__ = [
    "Aggregator",
    "GradDropState",
    "GradNormState",
    "NashMTLState",
    "PCGradState",
    "aligned_mtl",
    "as_optax",
    "cagrad",
    "combine",
    "config",
    "dualproj",
    "graddrop",
    "gradnorm",
    "gramian",
    "imtl_g",
    "mean",
    "mgda",
    "nash_mtl",
    "pcgrad",
    "sum",
    "upgrad",
]
