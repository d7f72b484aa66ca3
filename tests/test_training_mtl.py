"""Tests of the multi-task train steps: loss weighting and gradient aggregation."""

import contextlib
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import linen
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

import jheads
from jheads import _multitask_step, aggregation, training, weighting

HEAD = jheads.multi_head(
    [
        jheads.binary_classification_head(
            name="click", weight_column="click_weight", loss_reduction="mean"
        ),
        jheads.multi_class_head(3, name="topic"),
        jheads.regression_head(name="dwell"),
    ],
    head_weights=[1.0, 0.5, 2.0],
)
N_HEADS = 3
N_FEATURES = 6
HIDDEN = 16
BATCH = 64
TRUNK_ONLY = {"trunk": True, "heads": False}
JACOBIANS = ("layers", "vmap")


def init_params(key):
  k1, k2, k3 = jax.random.split(key, 3)
  return {
      "trunk": {
          "w1": jax.random.normal(k1, (N_FEATURES, HIDDEN)) / np.sqrt(N_FEATURES),
          "b1": jnp.full(HIDDEN, 0.1),
          "w2": jax.random.normal(k2, (HIDDEN, HIDDEN)) / 4.0,
          "b2": jnp.zeros(HIDDEN),
      },
      "heads": {
          "w": jax.random.normal(k3, (HIDDEN, HEAD.logits_dim)) / 4.0,
          "b": jnp.zeros(HEAD.logits_dim),
      },
  }


def trunk_fn(params, features):
  t = params["trunk"]
  hidden = jax.nn.relu(features["x"] @ t["w1"] + t["b1"])
  return jnp.tanh(hidden @ t["w2"] + t["b2"])


def heads_fn(params, representation):
  return representation @ params["heads"]["w"] + params["heads"]["b"]


def apply_fn(params, features):
  return heads_fn(params, trunk_fn(params, features))


def l2(params):
  return 1e-3 * sum(jnp.sum(leaf**2) for leaf in jax.tree.leaves(params))


def make_batch(rng, n=BATCH):
  x = rng.normal(size=(n, N_FEATURES)).astype(np.float32)
  click_weight = rng.uniform(0.0, 2.0, size=n).astype(np.float32)
  click_weight[rng.random(n) < 0.2] = 0.0
  features = {"x": x, "click_weight": click_weight}
  labels = {
      "click": (x[:, 0] + 0.5 * rng.normal(size=n) > 0).astype(np.float32),
      "topic": np.argmax(x[:, 1:4], axis=1).astype(np.int32),
      # Conflicting targets for the shared trunk.
      "dwell": (-x[:, 0] + x[:, 4] - x[:, 5]).astype(np.float32),
  }
  return features, labels


def _numeric(x):
  if jnp.issubdtype(jnp.result_type(x), jax.dtypes.prng_key):
    x = jax.random.key_data(x)
  return np.asarray(x, np.float64)


def max_abs_diff(a, b):
  assert jax.tree.structure(a) == jax.tree.structure(b)
  return max(
      (
          float(np.max(np.abs(_numeric(x) - _numeric(y)), initial=0.0))
          for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True)
      ),
      default=0.0,
  )


def loss_vector(params, features, labels, head_weights=None):
  """The unweighted per-head losses, computed independently of the step."""
  _, head_losses = HEAD.losses_fn(apply_fn(params, features), labels, features)
  return jnp.stack([head_losses[h.name] for h in HEAD.heads])


DEFAULT_WEIGHTS = np.asarray(HEAD.head_weights, np.float32)


# ----------------------------------------------------------------------------
# One device.


def run_steps(step, params, state, batches, schedule=None):
  outputs = []
  for i, (features, labels) in enumerate(batches):
    hw = None if schedule is None else schedule(i)
    params, state, out = step(params, state, features, labels, hw)
    outputs.append(out)
  return params, state, outputs


def schedule(i):
  return np.array([1.0, 0.5 + 0.05 * i, 2.0], np.float32)


@pytest.fixture(scope="module")
def batches():
  rng = np.random.default_rng(0)
  return [make_batch(rng) for _ in range(4)]


@pytest.mark.parametrize("jacobian", JACOBIANS)
def test_sum_aggregator_reproduces_the_plain_step(batches, jacobian):
  tx = optax.sgd(0.05, momentum=0.9)
  params = init_params(jax.random.key(0))
  plain = jax.jit(
      training.make_train_step(HEAD, apply_fn, tx, regularization_fn=l2, with_metrics=True)
  )
  summed = jax.jit(
      training.make_train_step(
          HEAD, apply_fn, tx, regularization_fn=l2, with_metrics=True,
          aggregator=aggregation.sum(), jacobian=jacobian,
      )
  )
  ref_params, _, ref_outputs = run_steps(plain, params, tx.init(params), batches, schedule)
  state = training.init_train_state(HEAD, tx, params, aggregator=aggregation.sum())
  new_params, new_state, outputs = run_steps(summed, params, state, batches, schedule)
  assert isinstance(new_state, training.TrainState)
  assert max_abs_diff(new_params, ref_params) < 1e-6
  for i, (out, ref) in enumerate(zip(outputs, ref_outputs)):
    np.testing.assert_allclose(out.loss, ref.loss, rtol=1e-6)
    np.testing.assert_allclose(out.regularization_loss, ref.regularization_loss, rtol=1e-6)
    assert max_abs_diff(out.head_losses, ref.head_losses) < 1e-6
    assert max_abs_diff(out.metrics, ref.metrics) < 1e-5
    np.testing.assert_allclose(out.head_weights, schedule(i), rtol=1e-6)
    assert ref.head_weights is None


class TiedModel(linen.Module):
  """Dense layers of every kind the layer-wise Jacobian must recognise or skip."""

  @linen.compact
  def __call__(self, x):
    x = linen.Dense(8)(x)  # dot(x, W) + b
    w_left = self.param("w_left", linen.initializers.normal(0.3), (8, 8))
    x = jax.nn.gelu(jnp.einsum("oi,bi->bo", w_left, x))  # dot(W, x): W on the left
    tied = self.param("tied", linen.initializers.normal(0.3), (8, 8))
    x = jnp.tanh(x @ tied) @ tied.T  # one parameter, two products
    scale = self.param("scale", linen.initializers.ones, (8,))
    x = x * scale  # not a product: differentiated directly
    carry_w = self.param("carry_w", linen.initializers.normal(0.3), (8, 8))
    x, _ = jax.lax.scan(lambda c, _: (jnp.tanh(c @ carry_w), None), x, None, length=2)
    jitted = self.param("jitted", linen.initializers.normal(0.3), (8, 8))
    x = jax.jit(lambda a, w: jnp.sin(a @ w))(x, jitted)  # inside a nested jit
    return linen.Dense(HEAD.logits_dim)(x)


@pytest.mark.parametrize("chunked", [False, True])
@pytest.mark.parametrize("jacobian", JACOBIANS)
def test_jacobian_rows_are_the_per_head_gradients(jacobian, chunked, monkeypatch):
  if chunked:  # one head's backward pass at a time, as large models get on CPU
    monkeypatch.setattr(_multitask_step, "CPU_CHUNK_BYTES", 1)
  features, labels = make_batch(np.random.default_rng(1), n=12)
  model = TiedModel()
  variables = model.init(jax.random.key(1), features["x"])
  leaves, treedef = jax.tree.flatten(variables)
  cotangents = jnp.array([[1.0, 0.0, 0.0], [0.0, -2.0, 0.0], [0.5, 0.0, 3.0], [1.0, 1.0, 1.0]])

  def fn(shared, other):
    logits = model.apply(jax.tree.unflatten(treedef, shared), features["x"])
    _, head_losses = HEAD.losses_fn(logits, labels, features)
    return jnp.stack([head_losses[h.name] for h in HEAD.heads]), logits

  def rows():
    lin = _multitask_step.linearize(fn, leaves, [], mode=jacobian)
    return lin.to_leaves(lin.jacobian(cotangents))

  rows = jax.jit(rows)()
  expected = jax.jacrev(lambda s: cotangents @ fn(s, [])[0])(leaves)
  assert max_abs_diff(rows, expected) < 1e-5
  if jacobian == "layers" and not chunked:
    # The products were found: every kernel but the scanned one is taken
    # layer-wise, the rest directly.
    closed = jax.make_jaxpr(fn)(leaves, [])
    bad = set()
    plan = _multitask_step._analyze(
        closed.jaxpr, {v: i for i, v in enumerate(closed.jaxpr.invars[: len(leaves)])}, bad
    )
    paths = jax.tree_util.tree_flatten_with_path(variables)[0]
    names = [jax.tree_util.keystr(path) for path, _ in paths]
    tapped = {names[u.leaf] for u in _multitask_step._tapped_uses(plan, bad)}
    products = ("w_left", "tied", "jitted")
    assert tapped == {n for n in names if "kernel" in n or n.split("'")[-2] in products}


def test_weighting_alone_is_one_backward_pass_of_its_objective(batches):
  tx = optax.sgd(0.1)
  uw = weighting.uncertainty()
  params = init_params(jax.random.key(2))
  state = training.init_train_state(HEAD, tx, params, weighting=uw)
  step = jax.jit(training.make_train_step(HEAD, apply_fn, tx, weighting=uw, regularization_fn=l2))
  features, labels = batches[0]
  new_params, new_state, out = step(params, state, features, labels)

  def objective(p):
    losses = DEFAULT_WEIGHTS * loss_vector(p, features, labels)
    return uw.loss(losses, state.weighting_state) + l2(p)

  grads = jax.grad(objective)(params)
  assert max_abs_diff(new_params, jax.tree.map(lambda p, g: p - 0.1 * g, params, grads)) < 1e-6
  losses = loss_vector(params, features, labels)
  np.testing.assert_allclose(out.loss, objective(params), rtol=1e-6)
  np.testing.assert_allclose(
      out.head_weights,
      DEFAULT_WEIGHTS * jax.grad(uw.loss)(DEFAULT_WEIGHTS * losses, state.weighting_state),
      rtol=1e-6,
  )
  expected_state = uw.update(DEFAULT_WEIGHTS * losses, state.weighting_state)
  assert max_abs_diff(new_state.weighting_state, expected_state) < 1e-6
  assert new_state.aggregator_state is None


def test_head_weights_argument_scales_the_losses_before_the_weighting(batches):
  tx = optax.sgd(0.1)
  gls = weighting.geometric()  # nonlinear: the scaling's place matters
  params = init_params(jax.random.key(3))
  state = training.init_train_state(HEAD, tx, params, weighting=gls)
  step = jax.jit(training.make_train_step(HEAD, apply_fn, tx, weighting=gls))
  features, labels = batches[1]
  hw = np.array([2.0, 0.25, 1.0], np.float32)
  _, _, out = step(params, state, features, labels, hw)
  losses = loss_vector(params, features, labels)
  np.testing.assert_allclose(out.loss, gls.loss(hw * losses, None), rtol=1e-6)
  np.testing.assert_allclose(
      out.head_weights, hw * jax.grad(gls.loss)(hw * losses, None), rtol=1e-6
  )


@pytest.mark.parametrize("jacobian", JACOBIANS)
def test_aggregator_and_weighting_compose(batches, jacobian):
  """UW + UPGrad: the rows are the uncertainty-weighted heads' gradients."""
  tx = optax.sgd(0.1)
  uw, agg = weighting.uncertainty(init_log_var=0.3), aggregation.upgrad()
  params = init_params(jax.random.key(4))
  state = training.init_train_state(HEAD, tx, params, weighting=uw, aggregator=agg)
  step = jax.jit(
      training.make_train_step(
          HEAD, apply_fn, tx, weighting=uw, aggregator=agg, shared=TRUNK_ONLY,
          regularization_fn=l2, jacobian=jacobian,
      )
  )
  features, labels = batches[2]
  new_params, new_state, out = step(params, state, features, labels)

  losses = loss_vector(params, features, labels)
  h = DEFAULT_WEIGHTS * jax.grad(uw.loss)(DEFAULT_WEIGHTS * losses, state.weighting_state)
  jac = jax.jacrev(lambda p: h * loss_vector(p, features, labels))(params)
  w, agg_state = agg.weights(aggregation.gramian(jac["trunk"]), state.aggregator_state)
  trunk_grads = aggregation.combine(w, jac["trunk"])
  heads_grads = jax.grad(lambda p: h @ loss_vector(p, features, labels))(params)["heads"]
  grads = jax.tree.map(jnp.add, {"trunk": trunk_grads, "heads": heads_grads}, jax.grad(l2)(params))
  assert max_abs_diff(new_params, jax.tree.map(lambda p, g: p - 0.1 * g, params, grads)) < 1e-6
  np.testing.assert_allclose(out.head_weights, h * w, rtol=1e-5)
  assert max_abs_diff(new_state.aggregator_state, agg_state) < 1e-6
  np.testing.assert_allclose(
      out.loss, uw.loss(DEFAULT_WEIGHTS * losses, state.weighting_state) + l2(params), rtol=1e-6
  )


def test_shared_masks_prefix_callable_and_full_tree_agree(batches):
  tx = optax.sgd(0.1)
  params = init_params(jax.random.key(5))
  features, labels = batches[3]
  full = jax.tree.map(lambda _: True, params)
  full["heads"] = jax.tree.map(lambda _: False, params["heads"])
  results = []
  for shared in (TRUNK_ONLY, lambda p: {"trunk": True, "heads": False}, full):
    state = training.init_train_state(HEAD, tx, params, aggregator=aggregation.upgrad())
    step = jax.jit(
        training.make_train_step(
            HEAD, apply_fn, tx, aggregator=aggregation.upgrad(), shared=shared
        )
    )
    results.append(step(params, state, features, labels)[0])
  assert max_abs_diff(results[0], results[1]) == 0.0
  assert max_abs_diff(results[0], results[2]) == 0.0
  # Everything shared: the heads' rows enter the Gramian, a different update.
  state = training.init_train_state(HEAD, tx, params, aggregator=aggregation.upgrad())
  step = jax.jit(training.make_train_step(HEAD, apply_fn, tx, aggregator=aggregation.upgrad()))
  all_shared = step(params, state, features, labels)[0]
  assert max_abs_diff(all_shared, results[0]) > 1e-4
  # The unshared heads got the plain gradient of the sum.
  heads_grads = jax.grad(lambda p: DEFAULT_WEIGHTS @ loss_vector(p, features, labels))(params)
  expected_heads = jax.tree.map(lambda p, g: p - 0.1 * g, params["heads"], heads_grads["heads"])
  assert max_abs_diff(results[0]["heads"], expected_heads) < 1e-6


def test_aggregator_without_gramian_weights(batches):
  tx = optax.sgd(0.1)
  agg = aggregation.graddrop(key=jax.random.key(0))
  params = init_params(jax.random.key(6))
  features, labels = batches[0]
  state = training.init_train_state(HEAD, tx, params, aggregator=agg)
  step = jax.jit(training.make_train_step(HEAD, apply_fn, tx, aggregator=agg, shared=TRUNK_ONLY))
  new_params, new_state, out = step(params, state, features, labels)
  assert out.head_weights is None
  jac = jax.jacrev(lambda p: DEFAULT_WEIGHTS * loss_vector(p, features, labels))(params)
  # The step hands the aggregator the shared leaves' rows in the parameters' order.
  trunk, expected_state = agg.update(jax.tree.leaves(jac["trunk"]), state.aggregator_state)
  expected = jax.tree.map(
      lambda p, g: p - 0.1 * g, params["trunk"],
      jax.tree.unflatten(jax.tree.structure(params["trunk"]), trunk),
  )
  assert max_abs_diff(new_params["trunk"], expected) < 1e-6
  assert max_abs_diff(new_state.aggregator_state, expected_state) == 0.0


def test_famo_sees_the_batch_again_under_the_new_parameters(batches):
  tx = optax.sgd(0.1)
  famo = weighting.famo()
  params = init_params(jax.random.key(7))
  features, labels = batches[1]
  calls = []

  def counting_apply_fn(params, features):
    calls.append(1)
    return apply_fn(params, features)

  agg = aggregation.upgrad()
  state = training.init_train_state(HEAD, tx, params, weighting=famo, aggregator=agg)
  step = jax.jit(
      training.make_train_step(
          HEAD, counting_apply_fn, tx, weighting=famo, aggregator=agg, shared=TRUNK_ONLY
      )
  )
  new_params, new_state, _ = step(params, state, features, labels)
  assert len(calls) == 2  # the forward pass, and the one after the update
  before = DEFAULT_WEIGHTS * loss_vector(params, features, labels)
  after = DEFAULT_WEIGHTS * loss_vector(new_params, features, labels)
  expected = famo.update(before, state.weighting_state, losses_after=after)
  assert max_abs_diff(new_state.weighting_state, expected) < 1e-6
  # Without FAMO, one forward pass.
  calls.clear()
  uw = weighting.uncertainty()
  step = training.make_train_step(HEAD, counting_apply_fn, tx, weighting=uw, aggregator=agg)
  state = training.init_train_state(HEAD, tx, params, weighting=uw, aggregator=agg)
  jax.jit(step)(params, state, features, labels)
  assert len(calls) == 1


def test_single_head_takes_a_weighting_but_not_an_aggregator():
  head = jheads.regression_head(name="y")
  fn = lambda params, features: features["x"] @ params
  tx = optax.sgd(0.1)
  params = jnp.ones((2, 1))
  uw = weighting.uncertainty()
  step = jax.jit(training.make_train_step(head, fn, tx, weighting=uw))
  state = training.init_train_state(head, tx, params, weighting=uw)
  _, _, out = step(params, state, {"x": jnp.ones((4, 2))}, jnp.zeros(4))
  np.testing.assert_allclose(out.head_losses["y"], 4.0)
  np.testing.assert_allclose(out.head_weights, [0.5])
  with pytest.raises(ValueError, match="single head"):
    training.make_train_step(head, fn, tx, aggregator=aggregation.upgrad())
  with pytest.raises(ValueError, match="single head"):
    training.init_train_state(head, tx, params, aggregator=aggregation.upgrad())


def test_configuration_errors(batches):
  tx = optax.sgd(0.1)
  params = init_params(jax.random.key(8))
  features, labels = batches[0]
  with pytest.raises(ValueError, match="shared .* needs an aggregator"):
    training.make_train_step(HEAD, apply_fn, tx, shared=TRUNK_ONLY)
  with pytest.raises(ValueError, match="jacobian must be one of"):
    training.make_train_step(HEAD, apply_fn, tx, aggregator=aggregation.upgrad(), jacobian="full")
  with pytest.raises(ValueError, match="LossWeighting"):
    training.make_train_step(HEAD, apply_fn, tx, weighting=weighting.uncertainty)
  with pytest.raises(ValueError, match="Aggregator"):
    training.make_train_step(HEAD, apply_fn, tx, aggregator=aggregation.upgrad)
  state = training.init_train_state(HEAD, tx, params, aggregator=aggregation.upgrad())
  for shared, match in [
      ({"trunk": 1, "heads": False}, "Python bools"),
      ({"trunk": True}, "prefix"),
      ({"trunk": False, "heads": False}, "selects no parameter"),
  ]:
    step = training.make_train_step(
        HEAD, apply_fn, tx, aggregator=aggregation.upgrad(), shared=shared
    )
    with pytest.raises(ValueError, match=match):
      step(params, state, features, labels)
  step = training.make_train_step(HEAD, apply_fn, tx, aggregator=aggregation.upgrad())
  with pytest.raises(ValueError, match="TrainState"):
    step(params, tx.init(params), features, labels)
  with pytest.raises(ValueError, match="needs an aggregator"):
    training.make_representation_train_step(HEAD, trunk_fn, heads_fn, tx, aggregator=None)


def test_step_vmaps_over_an_ensemble(batches):
  tx = optax.adam(1e-2)
  agg = aggregation.upgrad()
  # checkify's functionalized checks do not vmap over a whole step: build it without them.
  step = training.make_train_step(
      HEAD, apply_fn, tx, aggregator=agg, shared=TRUNK_ONLY, checks=False
  )
  members = [init_params(jax.random.key(k)) for k in (10, 11)]
  states = [training.init_train_state(HEAD, tx, p, aggregator=agg) for p in members]
  stack = lambda trees: jax.tree.map(lambda *x: jnp.stack(x), *trees)
  features, labels = batches[0]
  ensemble = jax.jit(jax.vmap(step, in_axes=(0, 0, None, None)))
  params, _, out = ensemble(stack(members), stack(states), features, labels)
  one = jax.jit(step)
  for k in range(2):
    expected, _, expected_out = one(members[k], states[k], features, labels)
    assert max_abs_diff(jax.tree.map(lambda x: x[k], params), expected) < 1e-6
    np.testing.assert_allclose(out.head_weights[k], expected_out.head_weights, rtol=1e-5)


# ----------------------------------------------------------------------------
# The representation-level step.


def test_representation_step_aggregates_at_the_trunk_output(batches):
  tx = optax.sgd(0.1)
  agg = aggregation.mgda()
  params = init_params(jax.random.key(12))
  features, labels = batches[2]
  state = training.init_train_state(HEAD, tx, params, aggregator=agg)
  step = jax.jit(
      training.make_representation_train_step(
          HEAD, trunk_fn, heads_fn, tx, aggregator=agg, regularization_fn=l2
      )
  )
  new_params, _, out = step(params, state, features, labels)

  z = trunk_fn(params, features)

  def losses_at(p, z):
    _, head_losses = HEAD.losses_fn(heads_fn(p, z), labels, features)
    return DEFAULT_WEIGHTS * jnp.stack([head_losses[h.name] for h in HEAD.heads])

  jac_z = jax.jacrev(losses_at, argnums=1)(params, z)
  w, _ = agg.weights(aggregation.gramian(jac_z), state.aggregator_state)
  _, trunk_vjp = jax.vjp(lambda p: trunk_fn(p, features), params)
  (trunk_grads,) = trunk_vjp(jnp.tensordot(w, jac_z, axes=1))
  heads_grads = jax.grad(lambda p: losses_at(p, z).sum())(params)
  grads = jax.tree.map(lambda a, b, c: a + b + c, trunk_grads, heads_grads, jax.grad(l2)(params))
  assert max_abs_diff(new_params, jax.tree.map(lambda p, g: p - 0.1 * g, params, grads)) < 1e-6
  np.testing.assert_allclose(out.head_weights, DEFAULT_WEIGHTS * w, rtol=1e-5)


# ----------------------------------------------------------------------------
# Eight devices against one.

TX = optax.sgd(0.05, momentum=0.9)
N_STEPS = 4
needs_eight_devices = pytest.mark.skipif(
    jax.device_count() < 8,
    reason="needs 8 devices (conftest.py sets --xla_force_host_platform_device_count=8)",
)
CONFIGS = {
    "upgrad": lambda: dict(aggregator=aggregation.upgrad()),
    "mgda": lambda: dict(aggregator=aggregation.mgda()),
    "nash+uncertainty": lambda: dict(
        aggregator=aggregation.nash_mtl(), weighting=weighting.uncertainty()
    ),
    "famo": lambda: dict(weighting=weighting.famo()),
}
DEVICE_MODES = ("explicit_mesh", "shard_map", "pmap")


@pytest.fixture(scope="module")
def device_batches():
  rng = np.random.default_rng(9)
  return [make_batch(rng) for _ in range(N_STEPS)]


def builder(representation):
  if representation:
    return lambda **kw: training.make_representation_train_step(
        HEAD, trunk_fn, heads_fn, TX, regularization_fn=l2, **kw
    )
  def build(**kw):
    shared = TRUNK_ONLY if "aggregator" in kw else None
    return training.make_train_step(HEAD, apply_fn, TX, regularization_fn=l2, shared=shared, **kw)

  return build


def distributed(mode, build, config):
  """The step of `mode`, with how it puts its inputs on devices."""
  if mode == "pmap":
    step = jax.pmap(
        build(axis_name="batch", **config),
        axis_name="batch",
        in_axes=(None, None, 0, 0, None),
        out_axes=(None, None, None),
    )
    split = lambda tree: jax.tree.map(lambda x: x.reshape((8, -1) + x.shape[1:]), tree)
    return step, lambda tree: tree, split, contextlib.nullcontext()
  mesh = jax.make_mesh((8,), ("batch",), axis_types=(AxisType.Explicit,))
  replicate = lambda tree: jax.device_put(tree, NamedSharding(mesh, P()))
  shard = lambda tree: jax.device_put(tree, NamedSharding(mesh, P("batch")))
  if mode == "shard_map":
    step = jax.jit(
        jax.shard_map(
            build(axis_name="batch", **config),
            mesh=mesh,
            in_specs=(P(), P(), P("batch"), P("batch"), P()),
            out_specs=P(),
        )
    )
  else:
    step = jax.jit(build(**config))
  return step, replicate, shard, jax.set_mesh(mesh)


def train_on(step, config, put_params, put_batch, batches):
  params = init_params(jax.random.key(13))
  state = training.init_train_state(HEAD, TX, params, **config)
  params, state = put_params(params), put_params(state)
  outputs = []
  for i, batch in enumerate(batches):
    params, state, out = step(params, state, *put_batch(batch), put_params(schedule(i)))
    outputs.append(out)
  return jax.device_get((params, state, outputs))


def check_equal(result, reference):
  (params, state, outputs), (ref_params, ref_state, ref_outputs) = result, reference
  assert max_abs_diff(params, ref_params) < 1e-5
  assert max_abs_diff(state, ref_state) < 1e-5
  for out, ref in zip(outputs, ref_outputs):
    fields = lambda o: (o.loss, o.head_losses, o.regularization_loss, o.head_weights)
    assert max_abs_diff(fields(out), fields(ref)) < 1e-5


@pytest.fixture(scope="module")
def one_device(device_batches):
  cache = {}

  def get(name, representation=False):
    if (name, representation) not in cache:
      config = CONFIGS[name]()
      step = jax.jit(builder(representation)(**config))
      same = lambda tree: tree
      cache[name, representation] = train_on(step, config, same, same, device_batches)
    return cache[name, representation]

  return get


@needs_eight_devices
@pytest.mark.parametrize("mode", DEVICE_MODES)
@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_eight_devices_equal_one(mode, name, device_batches, one_device):
  config = CONFIGS[name]()
  step, put_params, put_batch, context = distributed(mode, builder(False), config)
  with context:
    result = train_on(step, config, put_params, put_batch, device_batches)
  check_equal(result, one_device(name))


@needs_eight_devices
@pytest.mark.parametrize("mode", DEVICE_MODES)
def test_representation_step_on_eight_devices_equals_one(mode, device_batches, one_device):
  config = CONFIGS["nash+uncertainty"]()
  step, put_params, put_batch, context = distributed(mode, builder(True), config)
  with context:
    result = train_on(step, config, put_params, put_batch, device_batches)
  check_equal(result, one_device("nash+uncertainty", representation=True))


@needs_eight_devices
def test_shard_map_psums_the_jacobian_not_gramians(device_batches, monkeypatch):
  """Per-device Gramians summed would give other weights: check the step does not."""
  monkeypatch.setattr(_multitask_step, "CPU_CHUNK_BYTES", 1)  # and in chunks of one head
  mesh = jax.make_mesh((8,), ("batch",), axis_types=(AxisType.Explicit,))
  agg = aggregation.upgrad()
  step = jax.shard_map(
      training.make_train_step(
          HEAD, apply_fn, TX, aggregator=agg, shared=TRUNK_ONLY, axis_name="batch"
      ),
      mesh=mesh,
      in_specs=(P(), P(), P("batch"), P("batch"), P()),
      out_specs=P(),
  )
  params = init_params(jax.random.key(14))
  state = training.init_train_state(HEAD, TX, params, aggregator=agg)
  features, labels = device_batches[0]
  with jax.set_mesh(mesh):
    shard = lambda tree: jax.device_put(tree, NamedSharding(mesh, P("batch")))
    _, _, out = jax.jit(step)(params, state, shard(features), shard(labels), DEFAULT_WEIGHTS)
  jac = jax.jacrev(lambda p: DEFAULT_WEIGHTS * loss_vector(p, features, labels))(params)["trunk"]
  w, _ = agg.weights(aggregation.gramian(jac), state.aggregator_state)
  np.testing.assert_allclose(out.head_weights, DEFAULT_WEIGHTS * w, rtol=1e-5, atol=1e-7)
  shards = [
      jax.jacrev(lambda p: DEFAULT_WEIGHTS * jnp.stack(list(HEAD.losses_fn(
          apply_fn(p, f), l, f)[1].values())) / 8)(params)["trunk"]
      for f, l in [
          jax.tree.map(lambda x, k=k: x[k * 8 : (k + 1) * 8], (features, labels)) for k in range(8)
      ]
  ]
  summed_gramians = sum(aggregation.gramian(s) for s in shards)
  w_wrong, _ = agg.weights(summed_gramians, state.aggregator_state)
  assert np.max(np.abs(np.asarray(w_wrong) - np.asarray(w))) > 1e-3
