"""The multi-task train steps: loss weighting and gradient aggregation.

Private to `jheads.training`, which builds these steps when
`make_train_step` is given a `weighting` or an `aggregator`, and for
`make_representation_train_step`. The steps here return plain tuples; the
public `TrainState` and `TrainOutput` are made in `training`.

One step, on one device or one shard of many:

1. One forward pass, linearized (`jax.vjp`) as the per-head loss vector `L`
   (each shard's share under `axis_name`; psum'd to the whole batch's).
2. `S = weighting.loss(head_weights * L)`; its gradient times the head
   weights is `h`, the weight each head's loss gradient gets.
3. The Jacobian of `h * L` with respect to the shared parameters, one row
   per head, from the same linearization (psum'd under `axis_name`: the
   Jacobian, never per-device Gramians, whose sum drops the cross terms);
   the other parameters get `vjp(h)`, the gradient of `S`.
4. `w = aggregator.weights(J J')` and `combine(w, J)`, or
   `aggregator.update(J)` for an aggregator without weights.
5. The optimizer update; FAMO-like weightings see the batch's losses again
   under the new parameters.

The Jacobian is taken one of two ways (`jacobian=`):

* `"layers"` (the default): the parameters used as an operand of a
  `dot_general` (dense and einsum layers, any framework) get their rows as
  `x' dY_i`, from each layer's input `x` and the per-head cotangents `dY_i`
  of its output, which one vmapped backward pass through the activations
  gives without forming any weight gradient; each such product is one large
  matrix product, in the layout the Gramian wants. The idea is that of
  torchjd's autogram engine (per-layer work from activations and output
  cotangents), found in the traced program rather than in module hooks;
  the rows are kept, since the update combines them anyway and psums of
  them (never of Gramians) are what many devices need.
  Every other parameter (biases, norms, embeddings, anything inside a loop
  or a custom derivative) is differentiated directly in the same backward
  pass. The result is the same Jacobian, to float rounding.
* `"vmap"`: `jax.vmap` of the backward pass over the heads, for everything.
"""

from __future__ import annotations

import string
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.extend import core as jex_core

from jheads import combinator
from jheads import stacked

HIGHEST = jax.lax.Precision.HIGHEST
JACOBIAN_MODES = ("layers", "vmap")
# On CPU the heads' backward passes run in chunks whose cotangents and rows
# take about this much memory: a vmap over all T heads at once streams
# T-times-larger arrays through every elementwise pass and matrix product,
# and measured 1.6x slower at T = 40 (benchmarks/mtl.py's trunk) than
# chunks of 4 to 8 heads, which stay in cache. Accelerators take all heads
# at once.
CPU_CHUNK_BYTES = 4 * 2**20


# ----------------------------------------------------------------------------
# Devices.


def per_shard(tree: Any, axis_name: Any) -> Any:
  """Marks replicated leaves as varying over `axis_name` (identity without one).

  Inside `shard_map`, the gradient of a replicated (invariant) input is
  summed over the axis implicitly, while under `pmap` it is not. Casting the
  parameters to varying first makes both give this shard's gradient, which
  the train step then psums explicitly, the same way everywhere. Cotangents
  computed from psum'd (invariant) values are cast the same way before they
  enter a shard's backward pass.
  """
  if axis_name is None:
    return tree
  axes = axis_name if isinstance(axis_name, tuple) else (axis_name,)

  def cast(leaf):
    varying = jax.typeof(leaf).mat.varying
    invariant = tuple(axis for axis in axes if axis not in varying)
    return jax.lax.pcast(leaf, invariant, to="varying") if invariant else leaf

  return jax.tree.map(cast, tree)


def _psum(tree: Any, axis_name: Any) -> Any:
  return tree if axis_name is None else jax.lax.psum(tree, axis_name)


# ----------------------------------------------------------------------------
# Checks of the step's configuration.


def n_heads_of(head: Any) -> int:
  return len(head.heads) if isinstance(head, combinator.MultiHead) else 1


def check_weighting(weighting: Any, where: str) -> None:
  if weighting is None:
    return
  fields = ("init", "loss", "update", "needs_losses_after")
  missing = [f for f in fields if not hasattr(weighting, f)]
  if missing or not callable(weighting.loss):
    raise ValueError(
        f"{where}: weighting must be a jheads.weighting.LossWeighting (e.g."
        f" weighting.uncertainty()), got {type(weighting).__name__}"
        + (f" without {missing}." if missing else ".")
    )


def check_aggregator(aggregator: Any, head: Any, where: str) -> None:
  if aggregator is None:
    return
  missing = [f for f in ("init", "update", "weights") if not hasattr(aggregator, f)]
  if missing or not callable(aggregator.update):
    raise ValueError(
        f"{where}: aggregator must be a jheads.aggregation.Aggregator (e.g."
        f" aggregation.upgrad()), got {type(aggregator).__name__}"
        + (f" without {missing}." if missing else ".")
    )
  if not isinstance(head, combinator.MultiHead):
    raise ValueError(
        f"{where}: an aggregator combines the gradients of several heads, but"
        f" {head.config.description} is a single head; use a multi_head, or"
        " leave aggregator=None."
    )


def check_jacobian(jacobian: Any, where: str) -> None:
  if jacobian not in JACOBIAN_MODES:
    raise ValueError(f"{where}: jacobian must be one of {JACOBIAN_MODES}, got {jacobian!r}.")


# ----------------------------------------------------------------------------
# Shared and other parameters.


class Partition(NamedTuple):
  """Which leaves of the parameters the Jacobian is taken over."""

  treedef: Any
  is_shared: tuple[bool, ...]

  def split(self, params: Any) -> tuple[list[Any], list[Any]]:
    leaves = self.treedef.flatten_up_to(params)
    shared = [leaf for leaf, s in zip(leaves, self.is_shared) if s]
    other = [leaf for leaf, s in zip(leaves, self.is_shared) if not s]
    return shared, other

  def merge(self, shared: Sequence[Any], other: Sequence[Any]) -> Any:
    shared, other = iter(shared), iter(other)
    leaves = [next(shared) if s else next(other) for s in self.is_shared]
    return jax.tree.unflatten(self.treedef, leaves)


def partition(params: Any, shared: Any, where: str) -> Partition:
  """The partition of `params` by an optax-style mask (tree, prefix or callable)."""
  leaves, treedef = jax.tree.flatten(params)
  if shared is None:
    return Partition(treedef, (True,) * len(leaves))
  mask = shared(params) if callable(shared) else shared
  try:
    full = jax.tree.map(lambda m, sub: jax.tree.map(lambda _: m, sub), mask, params)
    flags = treedef.flatten_up_to(full)
  except (ValueError, TypeError) as e:
    raise ValueError(
        f"{where}: shared must be a pytree of bools with the structure of the"
        f" parameters or a prefix of it (or a callable returning one); got"
        f" {jax.tree.structure(mask)} for parameters {treedef}."
    ) from e
  bad = [m for m in flags if not isinstance(m, (bool, np.bool_))]
  if bad:
    raise ValueError(
        f"{where}: shared must hold Python bools (which parameters are shared"
        f" is static), got {type(bad[0]).__name__} {bad[0]!r}."
    )
  return Partition(treedef, tuple(bool(m) for m in flags))


# ----------------------------------------------------------------------------
# Gramian and combination, leaf by leaf: never one [T, P] matrix.


def gramian(jacobian: Sequence[jax.Array]) -> jax.Array:
  """`J J'` as the sum of the leaves' Gramians, accumulated in float32 or wider."""
  total = None
  for leaf in jacobian:
    rows = leaf.reshape(leaf.shape[0], -1)
    g = jnp.einsum(
        "tn,sn->ts", rows, rows, precision=HIGHEST,
        preferred_element_type=_accumulator(rows.dtype), out_sharding=replicated_out(rows),
    )
    total = g if total is None else total + g
  return total


def replicated_out(*arrays: jax.Array) -> Any:
  """`P()` when a contraction sums over an axis sharded on an Explicit mesh, else None.

  Under sharded jit with Explicit axes, a contraction over a sharded batch
  axis must say how its output is sharded; a Gramian or a weight gradient
  is the whole batch's, replicated (XLA inserts the all-reduce).
  """
  for a in arrays:
    sharding = getattr(jax.typeof(a), "sharding", None)
    explicit = set(getattr(getattr(sharding, "mesh", None), "explicit_axes", ()) or ())
    if not explicit:
      continue
    for entry in sharding.spec:
      names = {entry} if isinstance(entry, str) else set(entry or ())
      if names & explicit:
        return jax.sharding.PartitionSpec()
  return None


def combine(weights: jax.Array, jacobian: Sequence[jax.Array]) -> list[jax.Array]:
  """`J' w` leaf by leaf, in each leaf's dtype."""
  return [
      jnp.tensordot(
          weights.astype(_accumulator(leaf.dtype)), leaf, axes=1, precision=HIGHEST,
          preferred_element_type=_accumulator(leaf.dtype),
      ).astype(leaf.dtype)
      for leaf in jacobian
  ]


def _accumulator(dtype: Any) -> Any:
  return jnp.promote_types(dtype, jnp.float32)


# ----------------------------------------------------------------------------
# The per-head Jacobian, from one linearization.


class Linearized(NamedTuple):
  """The forward pass of the loss vector and its backward passes.

  Attributes:
    losses: the `[T]` loss vector (this shard's shares under an axis).
    aux: the forward pass's auxiliary output (the logits).
    jacobian: `[T, T] cotangents -> list of [T, ...] rows` of the shared
      leaves, one row per cotangent, each in the layout `layouts` says.
    other: `[T] cotangent -> gradients of the other leaves`.
    layouts: per shared leaf, None when its rows are `[T, *leaf.shape]`,
      else a function taking `[n, ...]` rows to `[n, *leaf.shape]` (filled
      in when `jacobian` is traced).
  """

  losses: jax.Array
  aux: Any
  jacobian: Callable[[jax.Array], list[jax.Array]]
  other: Callable[[jax.Array], list[jax.Array]]
  layouts: list[Any] | None = None

  def to_leaves(self, rows: Sequence[jax.Array]) -> list[jax.Array]:
    """`[n, ...]` rows (or updates with a leading axis) in the leaves' own layouts."""
    layouts = self.layouts or [None] * len(rows)
    return [r if f is None else f(r) for r, f in zip(rows, layouts)]


def linearize(
    fn: Callable[..., tuple[jax.Array, Any]],
    shared: list[Any],
    other: list[Any],
    *,
    mode: str,
    axis_name: Any = None,
) -> Linearized:
  """Linearizes `fn(shared, other) -> (losses [T], aux)` once."""
  if mode == "vmap" or not shared:
    return _linearize_vmap(fn, shared, other)
  return _linearize_layers(fn, shared, other, axis_name)


def _linearize_vmap(fn, shared, other) -> Linearized:
  losses, vjp, aux = jax.vjp(fn, shared, other, has_aux=True)

  row_bytes = 2 * sum(_nbytes(leaf) for leaf in jax.tree.leaves(shared))
  jacobian = _chunked(lambda cotangents: jax.vmap(lambda c: vjp(c)[0])(cotangents), row_bytes)

  return Linearized(
      losses=losses,
      aux=aux,
      jacobian=jacobian,
      other=lambda cotangent: vjp(cotangent)[1],
  )


def _nbytes(leaf: Any) -> int:
  return int(np.prod(np.shape(leaf))) * jnp.dtype(jnp.result_type(leaf)).itemsize


def _chunked(rows_fn: Callable[[jax.Array], list[Any]], row_bytes: int):
  """`rows_fn` over `[T, T]` cotangents, in cache-sized chunks of rows on CPU."""

  def jacobian(cotangents):
    chunk = None
    if jax.default_backend() == "cpu":
      chunk = max(1, CPU_CHUNK_BYTES // max(int(row_bytes), 1))
    if chunk is None or cotangents.shape[0] <= chunk:
      return rows_fn(cotangents)
    return jax.lax.map(lambda c: [r[0] for r in rows_fn(c[None])], cotangents, batch_size=chunk)

  return jacobian


class _DenseUse(NamedTuple):
  """A shared leaf used as one operand of a dot_general: `y = dot(x, W)` or `dot(W, x)`.

  `W` is the leaf seen through `views` (transposes, reshapes, casts), whose
  inverses bring the rows back to the leaf's shape and dtype.
  """

  leaf: int
  param_operand: int  # 0: dot(W, x); 1: dot(x, W)
  dimension_numbers: Any
  precision: Any
  preferred_element_type: Any
  out_aval: Any
  operand_shape: tuple[int, ...]
  views: tuple[tuple[str, Any], ...]


# Equations that only look at a parameter differently: a dot_general of
# their output is still a dot_general of the parameter.
_VIEWS = ("transpose", "reshape", "convert_element_type")


_CALL_PRIMITIVES = ("pjit", "jit", "closed_call", "core_call")


def _sub_jaxpr(eqn: Any) -> Any:
  """The closed jaxpr of a call-like equation whose body can be inlined, or None."""
  if eqn.primitive.name not in _CALL_PRIMITIVES:
    return None
  sub = eqn.params.get("jaxpr", eqn.params.get("call_jaxpr"))
  if isinstance(sub, jex_core.ClosedJaxpr):
    return sub
  if isinstance(sub, jex_core.Jaxpr):
    return jex_core.ClosedJaxpr(sub, ())
  return None


class _Plan(NamedTuple):
  """What the interpreter does with a jaxpr: where to tap, what to inline."""

  dense: dict[int, _DenseUse]  # eqn index -> use
  inline: dict[int, "_Plan"]  # eqn index -> plan of its body


def _analyze(
    jaxpr: Any, leaf_of: dict[Any, int], bad: set[int], views: dict[Any, tuple] | None = None
) -> _Plan:
  """Finds the dense uses of shared leaves; adds every other kind of use to `bad`.

  `leaf_of` maps a variable to the shared leaf it is (or views), `views` to
  the view equations between the two.
  """
  leaf_of, views = dict(leaf_of), dict(views or {})
  dense, inline, viewing = {}, {}, {}
  for index, eqn in enumerate(jaxpr.eqns):
    uses = [(pos, leaf_of[v]) for pos, v in enumerate(eqn.invars) if _is_var(v) and v in leaf_of]
    if not uses:
      continue
    name = eqn.primitive.name
    if name in _VIEWS and len(eqn.invars) == 1:
      (v,) = eqn.invars
      out = eqn.outvars[0]
      leaf_of[out] = leaf_of[v]
      views[out] = views.get(v, ()) + ((name, eqn.params, v.aval),)
      viewing[out] = index
      continue
    if name == "dot_general" and len(uses) == 1 and eqn.invars[0] is not eqn.invars[1]:
      ((pos, leaf),) = uses
      (_, _), (lhs_batch, rhs_batch) = eqn.params["dimension_numbers"]
      if not lhs_batch and not rhs_batch:
        dense[index] = _DenseUse(
            leaf=leaf,
            param_operand=pos,
            dimension_numbers=eqn.params["dimension_numbers"],
            precision=eqn.params.get("precision"),
            preferred_element_type=eqn.params.get("preferred_element_type"),
            out_aval=eqn.outvars[0].aval,
            operand_shape=tuple(eqn.invars[pos].aval.shape),
            views=views.get(eqn.invars[pos], ()),
        )
        continue
    sub = _sub_jaxpr(eqn)
    if sub is not None:
      inner = {sub.jaxpr.invars[pos]: leaf for pos, leaf in uses}
      inner_views = {sub.jaxpr.invars[pos]: views.get(eqn.invars[pos], ()) for pos, _ in uses}
      plan = _analyze(sub.jaxpr, inner, bad, inner_views)
      if plan.dense or plan.inline:
        inline[index] = plan
        continue
    bad.update(leaf for _, leaf in uses)
  for v in jaxpr.outvars:
    if _is_var(v) and v in leaf_of:
      bad.add(leaf_of[v])
  return _Plan(dense, inline)


def _is_var(v: Any) -> bool:
  return not isinstance(v, jex_core.Literal)


def _tapped_uses(plan: _Plan, bad: set[int]) -> list[_DenseUse]:
  """The dense uses to tap, in the interpreter's order."""
  uses = []
  for index in sorted(set(plan.dense) | set(plan.inline)):
    if index in plan.dense:
      if plan.dense[index].leaf not in bad:
        uses.append(plan.dense[index])
    else:
      uses.extend(_tapped_uses(plan.inline[index], bad))
  return uses


def _interpret(jaxpr, consts, args, plan: _Plan, bad: set[int], taps: list, inputs: list):
  """Evaluates `jaxpr`, adding `taps` to the tapped dot outputs and recording their inputs."""
  env = {}

  def read(v):
    return v.val if isinstance(v, jex_core.Literal) else env[v]

  for v, val in zip(jaxpr.constvars, consts):
    env[v] = val
  for v, val in zip(jaxpr.invars, args):
    env[v] = val
  for index, eqn in enumerate(jaxpr.eqns):
    invals = [read(v) for v in eqn.invars]
    if index in plan.inline:
      sub = _sub_jaxpr(eqn)
      outs = _interpret(sub.jaxpr, sub.consts, invals, plan.inline[index], bad, taps, inputs)
    else:
      with eqn.ctx.manager:
        outs = eqn.primitive.bind(*invals, **eqn.primitive.get_bind_params(eqn.params))
      if not eqn.primitive.multiple_results:
        outs = [outs]
      use = plan.dense.get(index)
      if use is not None and use.leaf not in bad:
        inputs.append(invals[1 - use.param_operand])
        outs = [outs[0] + taps[len(inputs) - 1]]
    for v, val in zip(eqn.outvars, outs):
      env[v] = val
  return [read(v) for v in jaxpr.outvars]


def _linearize_layers(fn, shared, other, axis_name) -> Linearized:
  closed, out_shape = jax.make_jaxpr(fn, return_shape=True)(shared, other)
  out_tree = jax.tree.structure(out_shape)
  jaxpr = closed.jaxpr
  n_shared = len(jax.tree.leaves(shared))
  leaf_of = {v: i for i, v in enumerate(jaxpr.invars[:n_shared])}
  bad: set[int] = set()
  plan = _analyze(jaxpr, leaf_of, bad)
  uses = _tapped_uses(plan, bad)
  if not uses:
    return _linearize_vmap(fn, shared, other)
  tapped = sorted({use.leaf for use in uses})
  direct = [i for i in range(len(shared)) if i not in tapped]

  def tapped_fn(taps, direct_leaves, other_leaves):
    leaves = list(shared)
    for i, leaf in zip(direct, direct_leaves):
      leaves[i] = leaf
    inputs = []
    outs = _interpret(jaxpr, closed.consts, [*leaves, *other_leaves], plan, bad, taps, inputs)
    losses, aux = jax.tree.unflatten(out_tree, outs)
    return losses, (aux, inputs)

  taps = per_shard(
      [jnp.zeros(use.out_aval.shape, use.out_aval.dtype) for use in uses], axis_name
  )
  losses, vjp, (aux, inputs) = jax.vjp(
      tapped_fn, taps, [shared[i] for i in direct], other, has_aux=True
  )

  counts = {leaf: sum(u.leaf == leaf for u in uses) for leaf in tapped}
  layouts: list[Any] = [None] * len(shared)

  def rows_of(cotangents):
    # The taps' cotangents with the row axis second ([B, n, ...] for a dense
    # layer's [B, ...] output): the row product contracts the leading batch
    # axis, and XLA's CPU backend otherwise copied a transpose of them for
    # every chunk (2-5% of the step at T = 2, 10 and 40).
    tap_axes = [1 if use.out_aval.shape else 0 for use in uses]
    d_taps, d_direct, _ = jax.vmap(vjp, out_axes=(tap_axes, 0, 0))(cotangents)
    rows: list[Any] = [None] * len(shared)
    for i, row in zip(direct, d_direct):
      rows[i] = row
    for use, x, d_out in zip(uses, inputs, d_taps):
      dtype = jnp.result_type(shared[use.leaf])
      contribution, to_leaf = _dense_rows(use, x, d_out, dtype, row_axis=min(1, d_out.ndim - 1))
      if counts[use.leaf] == 1:
        rows[use.leaf], layouts[use.leaf] = contribution, to_leaf
      else:  # a tied parameter: its uses' rows add up in its own layout
        contribution = to_leaf(contribution)
        rows[use.leaf] = contribution if rows[use.leaf] is None else rows[use.leaf] + contribution
    return rows

  row_bytes = sum(_nbytes(leaf) for leaf in shared) + sum(
      np.prod(use.out_aval.shape) * np.dtype(use.out_aval.dtype).itemsize for use in uses
  )
  return Linearized(
      losses=losses,
      aux=aux,
      jacobian=_chunked(rows_of, row_bytes),
      other=lambda cotangent: vjp(cotangent)[2],
      layouts=layouts,
  )


def _dense_rows(use: _DenseUse, x: jax.Array, d_out: jax.Array, dtype: Any, row_axis: int = 0):
  """Per-row gradients of the parameter of `y = dot_general(x, W)`, and how to lay them out.

  `d_out` is `[*y.shape]` with the `[T]` row axis inserted at `row_axis`.
  The parameter's gradient contracts `x` and each
  row of `d_out` over `x`'s free dimensions, which lead (`dot(x, W)`) or
  trail (`dot(W, x)`) in `y`: one matrix product for all rows, written in
  the operand `W`'s own axis order. (Written in `y`'s order instead, `W`'s
  free dimensions first, XLA's CPU backend transposed the masked output
  cotangents into a copy for every chunk of rows; the operand's order
  measured about 3% faster over the whole step at T = 10 and 40 heads.) The
  returned `to_leaf` undoes only the views between `W` and the leaf.

  Returns:
    `(rows, to_leaf)`: rows `[T, *W.shape]` (the dot's operand) in
    `dtype`, and `to_leaf`, mapping `[n, *W.shape]` to `[n, *leaf.shape]`.
  """
  (lhs_contract, rhs_contract), _ = use.dimension_numbers
  if use.param_operand == 1:
    x_contract, w_contract = lhs_contract, rhs_contract
  else:
    x_contract, w_contract = rhs_contract, lhs_contract
  x_free = [d for d in range(x.ndim) if d not in x_contract]
  w_ndim = len(use.operand_shape)
  w_free = [d for d in range(w_ndim) if d not in w_contract]
  # Positions in y (after the leading row axis of d_out) of x's free dimensions.
  offset = 0 if use.param_operand == 1 else len(w_free)
  y_of_x_free = [1 + offset + k for k in range(len(x_free))]
  letters = iter(string.ascii_letters)
  x_letters = [next(letters) for _ in range(x.ndim)]
  w_letters = [None] * w_ndim
  for xd, wd in zip(x_contract, w_contract):
    w_letters[wd] = x_letters[xd]
  for wd in w_free:
    w_letters[wd] = next(letters)
  row = next(letters)
  y_letters = [row] + [None] * (d_out.ndim - 1)
  for k, xd in zip(y_of_x_free, x_free):
    y_letters[k] = x_letters[xd]
  w_free_positions = [
      1 + (len(x_free) + k if use.param_operand == 1 else k) for k in range(len(w_free))
  ]
  for pos, wd in zip(w_free_positions, w_free):
    y_letters[pos] = w_letters[wd]
  y_letters.insert(row_axis, y_letters.pop(0))
  spec = f"{''.join(y_letters)},{''.join(x_letters)}->{row}{''.join(w_letters)}"
  rows = jnp.einsum(
      spec, d_out, x, precision=use.precision,
      preferred_element_type=use.preferred_element_type, out_sharding=replicated_out(d_out, x),
  ).astype(dtype)
  views = use.views

  def to_leaf(r):
    for name, params, in_aval in reversed(views):
      if name == "transpose":
        r = jnp.transpose(r, (0, *(1 + np.argsort(params["permutation"]))))
      elif name == "reshape":
        r = r.reshape((r.shape[0], *in_aval.shape))
      else:
        r = r.astype(in_aval.dtype)
    return r.astype(dtype)

  return rows, to_leaf


# ----------------------------------------------------------------------------
# The steps.


def _loss_vector_fn(head, names):
  """`(logits, labels, features, head_weights, axis_name) -> [T]` unweighted losses."""
  if isinstance(head, combinator.MultiHead):

    def losses_of(logits, labels, features, head_weights, axis_name):
      _, head_losses = head.losses_fn(
          logits, labels, features, head_weights=head_weights, axis_name=axis_name
      )
      if isinstance(head_losses, stacked.HeadValues):
        return head_losses.stacked
      return jnp.stack([head_losses[name] for name in names])

  else:

    def losses_of(logits, labels, features, head_weights, axis_name):
      if head_weights is not None:
        raise ValueError(
            f"{head.config.description}: head_weights are for a multi_head; a"
            " single head has none."
        )
      return head.loss_fn(logits, labels, features, axis_name=axis_name)[None]

  return losses_of


def _head_names(head) -> list[Any]:
  if isinstance(head, combinator.MultiHead):
    return [h.name for h in head.heads]
  return [head.name]


def _head_weights_vector(head, head_weights, dtype):
  if head_weights is not None:
    return jnp.asarray(head_weights, dtype)
  if isinstance(head, combinator.MultiHead):
    return jnp.asarray(head.head_weights, dtype)
  return jnp.ones((1,), dtype)


def _objective(weighting, scaled, weighting_state):
  """`S` and `dS/dL` at the scaled losses; the plain sum without a weighting."""
  if weighting is None:
    return jnp.sum(scaled), jnp.ones_like(scaled)
  return jax.value_and_grad(weighting.loss)(scaled, weighting_state)


class Fields(NamedTuple):
  """What `training` turns into a `TrainState` and a `TrainOutput`."""

  params: Any
  opt_state: Any
  weighting_state: Any
  aggregator_state: Any
  loss: jax.Array
  head_losses: dict[Any, jax.Array]
  regularization_loss: jax.Array | None
  metrics: Any
  head_weights: jax.Array | None


class _Weighed(NamedTuple):
  """The loss level of a step, from the whole batch's per-head losses."""

  hw: jax.Array  # the head weights: the argument, or the multi_head's
  scaled: jax.Array  # hw * losses, what the weighting sees
  objective: jax.Array  # S(scaled)
  applied: jax.Array  # hw * dS/dscaled: each head's loss gradient's weight


def _weigh(head, weighting, losses, head_weights, weighting_state, dtype) -> _Weighed:
  hw = _head_weights_vector(head, head_weights, losses.dtype)
  scaled = _scaled(hw, losses)
  objective, d_objective = _objective(weighting, scaled, weighting_state)
  return _Weighed(hw, scaled, objective, (hw * d_objective).astype(dtype))


def _scaled(hw, losses):
  # A head weighted 0 adds nothing, even when its loss is infinite (0 * inf).
  return jnp.where(hw == 0, jnp.zeros_like(losses), hw * losses)


def _aggregate(
    aggregator, rows, aggregator_state, losses, applied, *, to_leaves=list, gramian_fn=gramian
):
  """`(combined rows, aggregator state, head weights reported)`.

  `to_leaves` lays rows (or one combined row, with a leading axis) out as
  the leaves are: the Gramian and the combination do not need it.
  """
  if aggregator.weights is not None:
    weights, aggregator_state = aggregator.weights(
        gramian_fn(rows), aggregator_state, losses=losses
    )
    combined = [c[0] for c in to_leaves([c[None] for c in combine(weights, rows)])]
    return combined, aggregator_state, applied * weights.astype(applied.dtype)
  # The rows as a list of leaves: aggregators work leaf by leaf.
  combined, aggregator_state = aggregator.update(
      list(to_leaves(rows)), aggregator_state, losses=losses
  )
  return list(combined), aggregator_state, None


def _finish(
    head, names, optimizer, regularization_fn, with_metrics, axis_name, weighting,
    params, grads, opt_state, weighting_state, aggregator_state, weighed: _Weighed,
    losses, reported, logits, labels, features, losses_after_fn,
) -> Fields:
  """Regularization, the optimizer update, the weighting's update and the report."""
  regularization = None
  total = weighed.objective
  if regularization_fn is not None:
    # Added once, never aggregated; the parameters are replicated, so its
    # gradient needs no psum.
    regularization, reg_grads = jax.value_and_grad(regularization_fn)(params)
    grads = jax.tree.map(jnp.add, grads, reg_grads)
    total = total + regularization
  updates, opt_state = optimizer.update(grads, opt_state, params)
  new_params = optax.apply_updates(params, updates)
  if weighting is not None:
    losses_after = None
    if weighting.needs_losses_after:
      after = _psum(losses_after_fn(per_shard(new_params, axis_name)), axis_name)
      losses_after = jax.lax.stop_gradient(_scaled(weighed.hw, after))
    weighting_state = weighting.update(
        jax.lax.stop_gradient(weighed.scaled), weighting_state, losses_after=losses_after
    )
  stats = None
  if with_metrics:
    stats = _psum(
        head.metric_fn(jax.lax.stop_gradient(logits), labels, features, axis_name=axis_name),
        axis_name,
    )
  return Fields(
      params=new_params,
      opt_state=opt_state,
      weighting_state=weighting_state,
      aggregator_state=aggregator_state,
      loss=total,
      head_losses=_named(head, names, losses),
      regularization_loss=regularization,
      metrics=stats,
      head_weights=reported,
  )


def _named(head, names, losses):
  """The losses keyed by head name, as the plain step reports them."""
  if isinstance(head, combinator.MultiHead):
    return stacked.HeadValues(names, losses)
  return {} if head.name is None else {head.name: losses[0]}


def make_step(
    head,
    apply_fn,
    optimizer: optax.GradientTransformation,
    *,
    regularization_fn,
    with_metrics: bool,
    axis_name: Any,
    weighting,
    aggregator,
    shared,
    jacobian: str,
    where: str,
) -> Callable[..., Fields]:
  """The parameter-level step (see the module docstring)."""
  names = _head_names(head)
  losses_of = _loss_vector_fn(head, names)

  def step(params, opt_state, weighting_state, aggregator_state, features, labels, head_weights):
    if aggregator is None:
      # No Jacobian: every leaf is "other", one backward pass.
      parts = Partition(jax.tree.structure(params), (False,) * len(jax.tree.leaves(params)))
    else:
      parts = partition(params, shared, where)
      if not any(parts.is_shared):
        raise ValueError(
            f"{where}: shared selects no parameter; the aggregator has nothing to combine."
        )

    def fn(shared_leaves, other_leaves):
      logits = apply_fn(parts.merge(shared_leaves, other_leaves), features)
      return losses_of(logits, labels, features, head_weights, axis_name), logits

    lin = linearize(
        fn, *parts.split(per_shard(params, axis_name)), mode=jacobian, axis_name=axis_name
    )
    losses = _psum(lin.losses, axis_name)
    weighed = _weigh(head, weighting, losses, head_weights, weighting_state, lin.losses.dtype)
    other_grads = _psum(lin.other(per_shard(weighed.applied, axis_name)), axis_name)
    shared_grads, reported = [], weighed.applied
    if aggregator is not None:
      rows = _psum(lin.jacobian(per_shard(jnp.diag(weighed.applied), axis_name)), axis_name)
      shared_grads, aggregator_state, reported = _aggregate(
          aggregator, rows, aggregator_state, losses, weighed.applied, to_leaves=lin.to_leaves
      )
    return _finish(
        head, names, optimizer, regularization_fn, with_metrics, axis_name, weighting,
        params, parts.merge(shared_grads, other_grads), opt_state, weighting_state,
        aggregator_state, weighed, losses, reported, lin.aux, labels, features,
        lambda new_params: fn(*parts.split(new_params))[0],
    )

  return step


def make_representation_step(
    head,
    trunk_fn,
    heads_fn,
    optimizer: optax.GradientTransformation,
    *,
    regularization_fn,
    with_metrics: bool,
    axis_name: Any,
    weighting,
    aggregator,
    where: str,
) -> Callable[..., Fields]:
  """The representation-level step: the Jacobian with respect to the trunk's output."""
  names = _head_names(head)
  losses_of = _loss_vector_fn(head, names)
  if aggregator.weights is None and axis_name is not None:
    raise ValueError(
        f"{where}: under axis_name the representation-level step needs an"
        " aggregator with Gramian weights (every method but GradDrop): the"
        " representation's Jacobian is split over the devices by example."
    )

  def step(params, opt_state, weighting_state, aggregator_state, features, labels, head_weights):
    local = per_shard(params, axis_name)
    representation, trunk_vjp = jax.vjp(lambda p: trunk_fn(p, features), local)

    def fn(p, z):
      logits = heads_fn(p, z)
      return losses_of(logits, labels, features, head_weights, axis_name), logits

    shares, heads_vjp, logits = jax.vjp(fn, local, representation, has_aux=True)
    losses = _psum(shares, axis_name)
    weighed = _weigh(head, weighting, losses, head_weights, weighting_state, shares.dtype)
    head_grads = heads_vjp(per_shard(weighed.applied, axis_name))[0]
    rows_tree = jax.vmap(lambda c: heads_vjp(c)[1])(per_shard(jnp.diag(weighed.applied), axis_name))
    rows, rep_def = jax.tree.flatten(rows_tree)
    # The representation is split over the devices by example, so its
    # Jacobian's columns are too: the global Gramian is the sum of the
    # shards' Gramians, with no cross terms to lose.
    d_rep, aggregator_state, reported = _aggregate(
        aggregator, rows, aggregator_state, losses, weighed.applied,
        gramian_fn=lambda r: _psum(gramian(r), axis_name),
    )
    (trunk_grads,) = trunk_vjp(jax.tree.unflatten(rep_def, d_rep))
    grads = _psum(jax.tree.map(jnp.add, trunk_grads, head_grads), axis_name)
    return _finish(
        head, names, optimizer, regularization_fn, with_metrics, axis_name, weighting,
        params, grads, opt_state, weighting_state, aggregator_state, weighed, losses,
        reported, logits, labels, features,
        lambda new_params: fn(new_params, trunk_fn(new_params, features))[0],
    )

  return step
