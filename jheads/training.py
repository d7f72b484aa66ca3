"""Train, eval and predict steps: Estimator's three modes as pure functions.

`tf.estimator` built one graph per mode with `create_estimator_spec(mode)`.
Here each mode is a step builder taking the head, the model as
`apply_fn(params, features) -> logits` (a Flax Linen `apply`, a merged Flax
NNX module, or any function) and, for training, an optax optimizer:

* `make_train_step`: one forward pass, one backward pass, one optimizer
  update; returns the total loss, each head's loss, the regularization loss
  and, on request, metric statistics of the same logits.
* `make_eval_step`: additive metric statistics of a batch (merge batches
  with `jheads.metrics.merge`, finish with `jheads.metrics.compute`).
* `make_predict_step`: the head's predictions.

Multi-task optimisation plugs into the train step: with a loss `weighting`
(`jheads.weighting`) and/or a gradient `aggregator` (`jheads.aggregation`)
`make_train_step` weights the heads' losses, takes the Jacobian of the
per-head losses with respect to the `shared` parameters from the same
forward pass and combines its rows; its state is a `TrainState` from
`init_train_state`. `make_representation_train_step` takes that Jacobian
at the trunk's output instead, a cheaper approximation.

The steps are returned unjitted: wrap them in `jax.jit` (one device, or many
through sharded inputs), `jax.shard_map` or `jax.pmap`. Under the last two,
build them with `axis_name`: the batch is then split over that axis, and the
steps psum gradients and metric statistics, so every shard ends with the
whole batch's update and statistics. Only sums cross devices; predictions
are never gathered.

Multi-head weights are an argument of the train step, not a constant
folded into it: a schedule that changes them every step reuses one
compilation.

Flax NNX: `train_loss` is the differentiable objective the train step uses,
exposed so that a stateful `nnx.Module` + `nnx.Optimizer` step is a few
lines (see `train_loss`). There is deliberately no NNX step builder: its
body would be those same lines, while hiding choices that belong to the user
(`nnx.jit` or `jax.jit` over `nnx.split` state, which variables to
differentiate). To shard an NNX model with `shard_map` or `pmap`, split it
with `nnx.split` and use `make_train_step`, with `apply_fn` merging it back.

Example:
  >>> import jax, jax.numpy as jnp, optax, jheads
  >>> head = jheads.multi_head([
  ...     jheads.binary_classification_head(name="click"),
  ...     jheads.regression_head(name="dwell")])
  >>> apply_fn = lambda params, features: features["x"] @ params
  >>> optimizer = optax.sgd(0.1)
  >>> params = jnp.zeros((3, head.logits_dim))
  >>> opt_state = optimizer.init(params)
  >>> train_step = jax.jit(jheads.training.make_train_step(head, apply_fn, optimizer))
  >>> features = {"x": jnp.ones((4, 3))}
  >>> labels = {"click": jnp.ones(4), "dwell": jnp.full(4, 2.0)}
  >>> params, opt_state, out = train_step(params, opt_state, features, labels)
  >>> round(float(out.loss), 4)  # log(2) + 2 ** 2
  4.6931
  >>> {name: round(float(loss), 4) for name, loss in out.head_losses.items()}
  {'click': 0.6931, 'dwell': 4.0}
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from jheads import _multitask_step
from jheads import base
from jheads import checks as checks_lib
from jheads import stacked
from jheads import combinator
from jheads import metrics

ArrayLike = jax.typing.ArrayLike
AnyHead = base.Head | combinator.MultiHead
ApplyFn = Callable[[Any, base.Features], Any]
RegularizationFn = Callable[[Any], ArrayLike]

REGULARIZATION_LOSS = "regularization_loss"
"""The eval metric key of the regularization loss, as in TensorFlow."""


class _TrainOutputFields(NamedTuple):
  """What one train step reports, all from the step's one forward pass.

  Under `axis_name` every field is the whole batch's value, the same on every
  shard.

  Attributes:
    loss: the loss that was minimized: the head-weighted sum of the heads'
      losses, plus the regularization loss.
    head_losses: each head's unweighted loss, keyed by head name. A single
      head has one entry under its name (none if it is unnamed).
    regularization_loss: `regularization_fn(params)`, or None without one.
    metrics: the head's metric statistics of this batch, computed from the
      training logits, or None unless the step was built `with_metrics`.
    head_weights: with a `weighting` or an `aggregator`, the `[n_heads]`
      weights each head's unweighted loss gradient got this step, in head
      order: the `head_weights` argument (or the multi_head's weights) times
      `dS/dL` of the weighting, times the aggregator's weights when it has
      Gramian weights; None for an aggregator without them (GradDrop) and
      for the plain step.
    errors: the step's value checks (`jheads.checks.StepErrors`), or None
      for a step built with `checks=False`. Reading any other field on the
      host raises the first failed check.
  """

  loss: jax.Array
  head_losses: dict[str, jax.Array]
  regularization_loss: jax.Array | None = None
  metrics: base.Stats | None = None
  head_weights: jax.Array | None = None
  errors: Any = None


def _checked_field(index: int) -> property:
  def read(self):
    errors = tuple.__getitem__(self, _ERRORS)
    if errors is not None:
      errors.raise_if_failed()
    return tuple.__getitem__(self, index)

  return property(read)


_ERRORS = _TrainOutputFields._fields.index("errors")


class TrainOutput(_TrainOutputFields):
  __doc__ = _TrainOutputFields.__doc__
  __slots__ = ()

  loss = _checked_field(0)
  head_losses = _checked_field(1)
  regularization_loss = _checked_field(2)
  metrics = _checked_field(3)
  head_weights = _checked_field(4)


class TrainState(NamedTuple):
  """The state a multi-task train step threads: `init_train_state` makes it.

  A pytree, replicated on every device, checkpointed with the parameters.

  Attributes:
    opt_state: the model optimizer's state.
    weighting_state: the loss weighting's state, or None without one.
    aggregator_state: the aggregator's state, or None without one.
  """

  opt_state: Any
  weighting_state: Any = None
  aggregator_state: Any = None


def train_loss(
    head: AnyHead,
    logits: Any,
    labels: Any,
    features: base.Features = None,
    *,
    head_weights: ArrayLike | None = None,
    regularization_loss: ArrayLike | None = None,
    with_metrics: bool = False,
    axis_name: Any = None,
) -> tuple[jax.Array, TrainOutput]:
  """The training objective of one batch and what a train step reports of it.

  Shaped for `jax.value_and_grad(..., has_aux=True)`: differentiate the
  first output; the second is the `TrainOutput`. Each head's loss is
  computed once and the total is their weighted sum, so the per-head losses
  cost nothing extra; metric statistics reuse the same logits, with their
  gradient stopped.

  The regularization loss is added once, not multiplied by any head weight
  (TensorFlow 2's `MultiHead`).

  Args:
    head: a head or multi_head.
    logits: the model's output for the batch.
    labels: labels as the head takes them (a dict for a multi_head).
    features: the features dict, for weight columns.
    head_weights: a multi_head's weights, `[n_heads]`, overriding its
      defaults; may be traced. Must be None for a single head.
    regularization_loss: a scalar to add to the loss, e.g. an L2 penalty of
      the parameters; None for none.
    with_metrics: also compute metric statistics.
    axis_name: the named axis the batch is split over (`shard_map`, `pmap`).
      The first output is then this shard's share of the loss, so the sum of
      the shards' gradients is the whole batch's gradient; the
      `TrainOutput` holds the whole batch's values.

  Returns:
    `(loss to differentiate, TrainOutput)`.

  Example:
    The stateful Flax NNX form, with an `nnx.Optimizer`:

    >>> import jax.numpy as jnp, optax, jheads
    >>> from flax import nnx
    >>> head = jheads.multi_head([
    ...     jheads.binary_classification_head(name="click"),
    ...     jheads.regression_head(name="dwell")])
    >>> model = nnx.Linear(3, head.logits_dim, rngs=nnx.Rngs(0))
    >>> optimizer = nnx.Optimizer(model, optax.adam(1e-2), wrt=nnx.Param)
    >>> @nnx.jit
    ... def train_step(model, optimizer, features, labels):
    ...   def objective(model):
    ...     return jheads.training.train_loss(
    ...         head, model(features["x"]), labels, features)
    ...   (_, out), grads = nnx.value_and_grad(objective, has_aux=True)(model)
    ...   optimizer.update(model, grads)
    ...   return out
    >>> features = {"x": jnp.ones((4, 3))}
    >>> labels = {"click": jnp.ones(4), "dwell": jnp.full(4, 2.0)}
    >>> sorted(train_step(model, optimizer, features, labels).head_losses)
    ['click', 'dwell']
  """
  if isinstance(head, combinator.MultiHead):
    loss, head_losses = head.losses_fn(
        logits, labels, features, head_weights=head_weights, axis_name=axis_name
    )
  else:
    if head_weights is not None:
      raise ValueError(
          f"{head.config.description}: head_weights are for a multi_head; a"
          " single head has none."
      )
    loss = head.loss_fn(logits, labels, features, axis_name=axis_name)
    head_losses = {} if head.name is None else {head.name: loss}
  if regularization_loss is not None:
    # Parameters are the same on every shard: each adds its share so that the
    # sum over shards counts the penalty once.
    regularization_loss = base.shard_share(regularization_loss, axis_name)
    loss = loss + regularization_loss
  stats = None
  if with_metrics:
    stats = head.metric_fn(
        jax.lax.stop_gradient(logits), labels, features, axis_name=axis_name
    )
  output = TrainOutput(
      loss=loss,
      head_losses=head_losses,
      regularization_loss=regularization_loss,
      metrics=stats,
  )
  if axis_name is not None:
    output = jax.lax.psum(output, axis_name)
  return loss, output


def make_train_step(
    head: AnyHead,
    apply_fn: ApplyFn,
    optimizer: optax.GradientTransformation,
    *,
    regularization_fn: RegularizationFn | None = None,
    with_metrics: bool = False,
    axis_name: Any = None,
    weighting: Any = None,
    aggregator: Any = None,
    shared: Any = None,
    jacobian: str = "layers",
    checks: bool = True,
) -> Callable[..., tuple[Any, Any, TrainOutput]]:
  """Builds the train step (Estimator's TRAIN mode).

  The step is `(params, opt_state, features, labels, head_weights=None) ->
  (params, opt_state, TrainOutput)`. It runs the model once, differentiates
  `train_loss` and applies one optimizer update.

  With a `weighting` or an `aggregator` (multi-task optimisation), the step
  is `(params, state, features, labels, head_weights=None) -> (params,
  state, TrainOutput)` with `state` a `TrainState` from `init_train_state`.
  Still one forward pass, linearized as the vector `L` of the heads'
  losses:

  * the losses are scaled by the head weights (the `head_weights`
    argument, else the multi_head's), `Ls = head_weights * L`, and the
    objective is `S = weighting.loss(Ls, state)` (`sum(Ls)` without a
    weighting), reported as `TrainOutput.loss` (plus the regularization
    loss). Each head's loss gradient is weighted by `h = head_weights *
    dS/dLs`;
  * with an aggregator, the Jacobian of `h * L` with respect to the
    `shared` parameters (one row per head: T backward passes, vmapped) is
    combined by the aggregator, `combine(aggregator.weights(J J'), J)` or
    `aggregator.update(J)`; the other parameters get the gradient of `S`
    (one more backward pass, through the heads only). The regularization
    gradient is added once, never aggregated. `aggregator=aggregation.sum()`
    gives the plain step's update, to float rounding;
  * after the optimizer update, `weighting.update(Ls, state)` (a weighting
    that `needs_losses_after`, FAMO, first sees the batch's losses again
    under the new parameters: the one extra forward pass).

  Under `axis_name` the Jacobian is psum'd (never per-device Gramians, whose
  sum drops the cross terms between devices), so every device solves the
  same `[T, T]` problem and the states stay replicated.

  Args:
    head: a head or multi_head.
    apply_fn: `(params, features) -> logits`.
    optimizer: an optax optimizer; its state is `optimizer.init(params)`.
    regularization_fn: `params -> scalar`, a loss added once, unweighted by
      head weights, and reported as `regularization_loss`.
    with_metrics: also return the batch's metric statistics.
    axis_name: run inside `jax.shard_map` or `jax.pmap` over this axis, with
      the batch split over it and the parameters and optimizer state
      replicated. Gradients are psum'd, so every shard applies the update of
      the whole batch. Leave None under `jax.jit`, sharded or not.
    weighting: a `jheads.weighting.LossWeighting`, or None.
    aggregator: a `jheads.aggregation.Aggregator`, or None; needs a
      multi_head.
    shared: which parameters the aggregator's Jacobian is taken over, as an
      optax mask: a pytree of bools with the structure of the parameters or
      a prefix of it, or a callable `params -> mask`. Default: all. The
      others (the heads' own, typically: each sees only its head's loss, so
      their Jacobian rows would be wasted work) get the gradient of `S`, as
      torchjd's `mtl_backward` and LibMTL do.
    jacobian: how the Jacobian is computed: `"layers"` (default) takes the
      rows of every parameter used as a `dot_general` operand (dense and
      einsum layers, found in the traced program, any framework) as
      `x' dY_i` from the layer's input and the per-head cotangents of its
      output, one large matrix product each, and differentiates the others
      (biases, norms, parameters inside loops) directly; `"vmap"` vmaps the
      backward pass over the heads for all of them. Both give the same
      Jacobian to float rounding; "layers" is faster on dense models. On
      CPU the heads' backward passes run in cache-sized chunks.
    checks: trace the heads' value checks into the step (label ranges,
      finite logits, labels and weights, ...), functionalized with checkify:
      the outputs raise `jheads.checks.ValueCheckError` when read on the host
      (`out.loss`, `metrics.compute` of eval statistics, predictions'
      items). `False` leaves them out at no cost; a step to be `jax.vmap`-ed
      as a whole (an ensemble) must be built without them.

  Returns:
    The train step, unjitted. `head_weights` (`[n_heads]`) overrides a
    multi_head's weights for that step; passing an array every step lets a
    schedule change them without recompiling.

  Example:
    >>> import jax, jax.numpy as jnp, optax, jheads
    >>> head = jheads.regression_head(name="y")
    >>> apply_fn = lambda params, features: features["x"] @ params
    >>> l2 = lambda params: 0.5 * jnp.sum(params ** 2)
    >>> step = jax.jit(jheads.training.make_train_step(
    ...     head, apply_fn, optax.sgd(0.1), regularization_fn=l2))
    >>> params = jnp.ones((2, 1))
    >>> features, labels = {"x": jnp.ones((4, 2))}, jnp.zeros(4)
    >>> params, _, out = step(params, optax.sgd(0.1).init(params), features, labels)
    >>> float(out.loss), float(out.head_losses["y"]), float(out.regularization_loss)
    (5.0, 4.0, 1.0)

    With an aggregator, on two heads that pull a shared parameter opposite
    ways (gradients -4 and 2): UPGrad weights them so that the step conflicts
    with neither, and the shared parameter barely moves, where the plain sum
    would step along -2.

    >>> from jheads import aggregation
    >>> head = jheads.multi_head([jheads.regression_head(name="a"),
    ...                           jheads.regression_head(name="b")])
    >>> apply_fn = lambda params, features: (
    ...     features["x"] @ params["trunk"] @ params["heads"])
    >>> params = {"trunk": jnp.ones((1, 1)), "heads": jnp.ones((1, 2))}
    >>> tx, agg = optax.sgd(0.1), aggregation.upgrad()
    >>> step = jax.jit(jheads.training.make_train_step(
    ...     head, apply_fn, tx, aggregator=agg, shared={"trunk": True, "heads": False}))
    >>> state = jheads.training.init_train_state(head, tx, params, aggregator=agg)
    >>> features = {"x": jnp.ones((4, 1))}
    >>> labels = {"a": jnp.full(4, 3.0), "b": jnp.zeros(4)}
    >>> params, state, out = step(params, state, features, labels)
    >>> out.head_weights.round(2).tolist()
    [0.75, 1.5]
    >>> round(float(params["trunk"][0, 0]), 3)
    1.0
  """
  where = "make_train_step"
  _multitask_step.check_weighting(weighting, where)
  _multitask_step.check_aggregator(aggregator, head, where)
  _multitask_step.check_jacobian(jacobian, where)
  if weighting is not None or aggregator is not None:
    return _with_checks(checks, axis_name, _attach_to_train_output, _state_step(
        _multitask_step.make_step(
            head,
            apply_fn,
            optimizer,
            regularization_fn=regularization_fn,
            with_metrics=with_metrics,
            axis_name=axis_name,
            weighting=weighting,
            aggregator=aggregator,
            shared=shared,
            jacobian=jacobian,
            where=where,
        )
    ))
  if shared is not None:
    raise ValueError(
        f"{where}: shared selects the parameters of an aggregator's Jacobian;"
        " it needs an aggregator."
    )

  def train_step(params, opt_state, features, labels, head_weights=None):
    if isinstance(opt_state, TrainState):
      raise ValueError(
          f"{where}: this step (no weighting, no aggregator) takes the optimizer's"
          " state, optimizer.init(params), not a training.TrainState; pass"
          " state.opt_state, or build the step with a weighting or an aggregator."
      )

    def objective(differentiable_params):
      logits = apply_fn(differentiable_params, features)
      regularization = (
          None if regularization_fn is None else regularization_fn(differentiable_params)
      )
      return train_loss(
          head,
          logits,
          labels,
          features,
          head_weights=head_weights,
          regularization_loss=regularization,
          with_metrics=with_metrics,
          axis_name=axis_name,
      )

    if axis_name is None:
      (_, output), grads = jax.value_and_grad(objective, has_aux=True)(params)
    else:
      (_, output), grads = jax.value_and_grad(objective, has_aux=True)(
          _multitask_step.per_shard(params, axis_name)
      )
      grads = jax.lax.psum(grads, axis_name)
    updates, opt_state = optimizer.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, output

  return _with_checks(checks, axis_name, _attach_to_train_output, train_step)


def _with_checks(enabled: bool, axis_name: Any, attach: Callable[..., Any], step: Callable[..., Any]):
  """The step with value checks that raise when its outputs are read, or as it is."""
  if not enabled:
    return step
  return checks_lib.checked_step(step, axis_name=axis_name, attach=attach)


def _attach_to_train_output(out, errors):
  params, state, output = out
  return params, state, output._replace(errors=errors)


def _attach_to_stats(stats, errors):
  if isinstance(stats, stacked.GroupedStats):
    return stats.with_errors(errors)
  return checks_lib.CheckedDict(stats, errors)



def init_train_state(
    head: AnyHead,
    optimizer: optax.GradientTransformation,
    params: Any,
    *,
    weighting: Any = None,
    aggregator: Any = None,
) -> TrainState:
  """The initial `TrainState` of a multi-task train step.

  Args:
    head: the head the step trains (its number of heads sizes the states).
    optimizer: the model's optax optimizer.
    params: the model's parameters.
    weighting: the step's `jheads.weighting.LossWeighting`, or None.
    aggregator: the step's `jheads.aggregation.Aggregator`, or None.

  Returns:
    `TrainState(optimizer.init(params), weighting.init(T), aggregator.init(T))`,
    with None for an absent weighting or aggregator.

  Example:
    >>> import jax.numpy as jnp, optax, jheads
    >>> from jheads import weighting
    >>> head = jheads.multi_head([jheads.regression_head(name="a"),
    ...                           jheads.regression_head(name="b")])
    >>> state = jheads.training.init_train_state(
    ...     head, optax.sgd(0.1), jnp.zeros((1, 2)), weighting=weighting.uncertainty())
    >>> state.aggregator_state is None
    True
  """
  where = "init_train_state"
  _multitask_step.check_weighting(weighting, where)
  _multitask_step.check_aggregator(aggregator, head, where)
  n_heads = _multitask_step.n_heads_of(head)
  return TrainState(
      opt_state=optimizer.init(params),
      weighting_state=None if weighting is None else weighting.init(n_heads),
      aggregator_state=None if aggregator is None else aggregator.init(n_heads),
  )


def make_representation_train_step(
    head: AnyHead,
    trunk_fn: Callable[[Any, base.Features], Any],
    heads_fn: Callable[[Any, Any], Any],
    optimizer: optax.GradientTransformation,
    *,
    aggregator: Any,
    weighting: Any = None,
    regularization_fn: RegularizationFn | None = None,
    with_metrics: bool = False,
    axis_name: Any = None,
    checks: bool = True,
) -> Callable[..., tuple[Any, TrainState, TrainOutput]]:
  """Builds a train step that aggregates at the trunk's output (an approximation).

  The model is split in two: `trunk_fn(params, features) -> z`, the shared
  representation (an array or pytree of arrays, one row per example), and
  `heads_fn(params, z) -> logits`. The aggregator's weights come from the
  Gramian of the Jacobian of the losses with respect to `z` (`[T, batch,
  ...]`: T backward passes through the heads only), and the trunk gets one
  backward pass of `sum_i w_i dL_i/dz`. This is LibMTL's `rep_grad`, the
  MGDA-UB of Sener and Koltun (2018), torchjd's `mtl_backward(features=z)`
  Jacobian taken at `z`: near the plain step's cost, where the parameter
  Jacobian of `make_train_step` costs T backward passes through the trunk.

  It is an approximation: the weights balance the heads' gradients with
  respect to the representation, not to the trunk's parameters. Since
  `dL_i/dtheta = (dz/dtheta)' dL_i/dz`, the two Gramians agree only when
  `dz/dtheta` is an isometry; MGDA-UB minimises an upper bound of the
  parameter-level objective. Methods whose guarantees are about parameter
  gradients (UPGrad's non-conflict, Nash-MTL's bargaining) hold for the
  representation's gradients only. The heads' own parameters get the
  gradient of the weighting's objective, as in `make_train_step`.

  Under `axis_name`, each device's `z` holds its own examples, so the
  global Jacobian's columns are split over the devices and its Gramian is
  exactly the psum of theirs (unlike the parameter Jacobian's, which must
  be psum'd first); an aggregator without Gramian weights (GradDrop) is
  then refused.

  Args:
    head: a multi_head.
    trunk_fn: `(params, features) -> z`.
    heads_fn: `(params, z) -> logits`.
    optimizer: an optax optimizer.
    aggregator: a `jheads.aggregation.Aggregator`.
    weighting: a `jheads.weighting.LossWeighting`, or None for the sum.
    regularization_fn: as for `make_train_step`.
    with_metrics: as for `make_train_step`.
    axis_name: as for `make_train_step`.
    checks: as for `make_train_step`: value checks whose failures raise when
      the outputs are read; False removes them.

  Returns:
    The step `(params, state, features, labels, head_weights=None) ->
    (params, state, TrainOutput)`, unjitted, with `state` from
    `init_train_state`.

  Example:
    >>> import jax, jax.numpy as jnp, optax, jheads
    >>> from jheads import aggregation
    >>> head = jheads.multi_head([jheads.regression_head(name="a"),
    ...                           jheads.regression_head(name="b")])
    >>> trunk_fn = lambda params, features: jnp.tanh(features["x"] @ params["trunk"])
    >>> heads_fn = lambda params, z: z @ params["heads"]
    >>> params = {"trunk": jnp.ones((3, 4)) / 4, "heads": jnp.ones((4, 2)) / 4}
    >>> tx = optax.adam(1e-2)
    >>> step = jax.jit(jheads.training.make_representation_train_step(
    ...     head, trunk_fn, heads_fn, tx, aggregator=aggregation.upgrad()))
    >>> state = jheads.training.init_train_state(
    ...     head, tx, params, aggregator=aggregation.upgrad())
    >>> features = {"x": jnp.ones((8, 3))}
    >>> labels = {"a": jnp.ones(8), "b": -jnp.ones(8)}
    >>> params, state, out = step(params, state, features, labels)
    >>> out.head_weights.shape
    (2,)
  """
  where = "make_representation_train_step"
  _multitask_step.check_weighting(weighting, where)
  if aggregator is None:
    raise ValueError(f"{where}: needs an aggregator (e.g. aggregation.mgda()).")
  _multitask_step.check_aggregator(aggregator, head, where)
  return _with_checks(checks, axis_name, _attach_to_train_output, _state_step(
      _multitask_step.make_representation_step(
          head,
          trunk_fn,
          heads_fn,
          optimizer,
          regularization_fn=regularization_fn,
          with_metrics=with_metrics,
          axis_name=axis_name,
          weighting=weighting,
          aggregator=aggregator,
          where=where,
      )
  ))


def _state_step(inner: Callable[..., Any]) -> Callable[..., tuple[Any, TrainState, TrainOutput]]:
  """Wraps a multi-task step body in the public `TrainState` / `TrainOutput` types."""

  def train_step(params, state, features, labels, head_weights=None):
    if not isinstance(state, TrainState):
      raise ValueError(
          "make_train_step: with a weighting or an aggregator the step takes a"
          " training.TrainState (from training.init_train_state) where the plain"
          f" step takes the optimizer state; got {type(state).__name__}."
      )
    f = inner(
        params, state.opt_state, state.weighting_state, state.aggregator_state,
        features, labels, head_weights,
    )
    output = TrainOutput(
        loss=f.loss,
        head_losses=f.head_losses,
        regularization_loss=f.regularization_loss,
        metrics=f.metrics,
        head_weights=f.head_weights,
    )
    return f.params, TrainState(f.opt_state, f.weighting_state, f.aggregator_state), output

  return train_step


def make_eval_step(
    head: AnyHead,
    apply_fn: ApplyFn,
    *,
    regularization_fn: RegularizationFn | None = None,
    axis_name: Any = None,
    checks: bool = True,
) -> Callable[[Any, base.Features, Any], base.Stats]:
  """Builds the eval step (Estimator's EVAL mode).

  The step is `(params, features, labels) -> stats`: the head's additive
  metric statistics of the batch, plus `regularization_loss` (its mean over
  evaluated batches, as TensorFlow reports it) with a `regularization_fn`.

  Args:
    head: a head or multi_head.
    apply_fn: `(params, features) -> logits`.
    regularization_fn: `params -> scalar`, reported as `regularization_loss`.
    axis_name: run inside `jax.shard_map` or `jax.pmap` over this axis, with
      the batch split over it; the statistics are psum'd, so every shard
      returns those of the whole batch.

  Returns:
    The eval step, unjitted.

  Example:
    >>> import jax, jax.numpy as jnp, jheads
    >>> head = jheads.multi_class_head(3, name="species")
    >>> apply_fn = lambda params, features: features["x"] @ params
    >>> eval_step = jax.jit(jheads.training.make_eval_step(head, apply_fn))
    >>> params = jnp.eye(3)
    >>> stats = jheads.metrics.merge(
    ...     eval_step(params, {"x": jnp.eye(3)}, jnp.array([0, 1, 2])),
    ...     eval_step(params, {"x": jnp.eye(3)}, jnp.array([0, 0, 0])))
    >>> float(jheads.metrics.compute(stats)["accuracy/species"])
    0.6666...
  """

  def eval_step(params, features, labels):
    logits = apply_fn(params, features)
    stats = head.metric_fn(logits, labels, features, axis_name=axis_name)
    if regularization_fn is not None:
      regularization = jnp.asarray(regularization_fn(params))
      # One batch counts once in the mean, however many shards share it.
      count = base.shard_share(jnp.ones((), regularization.dtype), axis_name)
      extra = {REGULARIZATION_LOSS: metrics.Ratio(regularization * count, count)}
      if isinstance(stats, stacked.GroupedStats):
        stats = stats.with_extras(**extra)
      else:
        stats = {**stats, **extra}
    if axis_name is not None:
      stats = jax.lax.psum(stats, axis_name)
    return stats

  return _with_checks(checks, axis_name, _attach_to_stats, eval_step)


def make_predict_step(
    head: AnyHead, apply_fn: ApplyFn, *, checks: bool = True
) -> Callable[[Any, base.Features], dict[Any, jax.Array]]:
  """Builds the predict step (Estimator's PREDICT mode).

  The step is `(params, features) -> predictions`, the head's numeric
  predictions (keyed by `(head, key)` for a multi_head). Class names are
  added on the host by `jheads.decode_predictions`. Predictions are per
  example, so the step needs no `axis_name`: under `shard_map` or `pmap`
  each shard predicts its own part of the batch.

  Args:
    head: a head or multi_head.
    apply_fn: `(params, features) -> logits`.

  Returns:
    The predict step, unjitted.

  Example:
    >>> import jax, jax.numpy as jnp, jheads
    >>> head = jheads.binary_classification_head(label_vocabulary=["no", "yes"])
    >>> predict_step = jax.jit(jheads.training.make_predict_step(
    ...     head, lambda params, features: features["x"] @ params))
    >>> predictions = predict_step(jnp.ones((2, 1)), {"x": jnp.array([[1.0, 1.0], [-1.0, 0.0]])})
    >>> jheads.decode_predictions(head, predictions)["classes"].tolist()
    [['yes'], ['no']]
  """

  def predict_step(params, features):
    return head.predict_fn(apply_fn(params, features))

  return _with_checks(checks, None, _attach_to_stats, predict_step)



def scan_steps(step: Callable[..., Any], *, unroll: int | bool = 1) -> Callable[..., Any]:
  """Runs a train step over a block of k batches in one dispatch (Keras' `steps_per_execution`).

  `scan_steps(step)` is `(params, state, features, labels, *args) ->
  (params, state, outputs)` where `features` and `labels` hold k batches
  stacked on a leading axis (`[k, batch, ...]`), the k steps run in order
  inside one `lax.scan`, and `outputs` are the k steps' outputs stacked on a
  leading `[k]` axis: `outputs.loss` is `[k]`, `outputs.head_losses[name]`
  is `[k]`, metric statistics have a leading `[k]` (sum them over it to
  merge the k batches). Further arguments (`head_weights`) are the same for
  all k steps. A small step pays its dispatch once per block instead of once
  per step.

  `step` is any step of `make_train_step` or `make_representation_train_step`,
  built as it will run: with `axis_name` for `shard_map` or `pmap` (whose
  specs then split the batch axis, the second: `P(None, "batch")`), with or
  without checks. The value checks of all k steps come out with the
  outputs: reading them raises the first failure of the block.

  Args:
    step: an unjitted train step.
    unroll: `lax.scan`'s unroll: steps per loop iteration (True: all k).

  Returns:
    The block step, unjitted: wrap it in `jax.jit`, `shard_map` or `pmap`.

  Example:
    >>> import jax, jax.numpy as jnp, numpy as np, optax, jheads
    >>> head = jheads.regression_head(name="y")
    >>> apply_fn = lambda params, features: features["x"] @ params
    >>> optimizer = optax.sgd(0.1)
    >>> step = jheads.training.make_train_step(head, apply_fn, optimizer)
    >>> block_step = jax.jit(jheads.training.scan_steps(step))
    >>> params = jnp.zeros((2, 1))
    >>> x = np.ones((8, 4, 2), np.float32)  # 8 batches of 4 examples
    >>> params, opt_state, out = block_step(params, optimizer.init(params), {"x": x}, np.ones((8, 4)))
    >>> out.loss.shape, out.head_losses["y"].shape
    ((8,), (8,))
    >>> [round(float(v), 4) for v in out.loss[:3]]  # each step shrinks the error by 0.6
    [1.0, 0.36, 0.1296]
  """

  def block_step(params, state, features, labels, *args):
    def body(carry, batch):
      params, state = carry
      params, state, out = step(params, state, *batch, *args)
      return (params, state), out

    (params, state), outputs = jax.lax.scan(
        body, (params, state), (features, labels), unroll=unroll
    )
    return params, state, outputs

  return block_step
