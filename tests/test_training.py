"""Tests of jheads.training: the three step builders, on one device and eight."""

import contextlib
import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import linen, nnx
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

import jheads
from jheads import training

# The mean reduction over a weight column is the case a per-shard mean gets
# wrong: each shard's denominator differs, so the shards must agree on one.
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
N_FEATURES = 6
BATCH = 64
N_STEPS = 20


def init_params(key):
  k1, k2 = jax.random.split(key)
  return {
      "w1": jax.random.normal(k1, (N_FEATURES, 16)) / np.sqrt(N_FEATURES),
      "b1": jnp.zeros(16),
      "w2": jax.random.normal(k2, (16, HEAD.logits_dim)) / 4.0,
      "b2": jnp.zeros(HEAD.logits_dim),
  }


def apply_fn(params, features):
  hidden = jax.nn.relu(features["x"] @ params["w1"] + params["b1"])
  return hidden @ params["w2"] + params["b2"]


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
      "dwell": (x[:, 4] - x[:, 5]).astype(np.float32),
  }
  return features, labels


def max_abs_diff(a, b):
  return max(
      float(np.max(np.abs(np.asarray(x, np.float64) - np.asarray(y, np.float64))))
      for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True)
  )


@jax.jit
def compute_metrics(stats):
  return jheads.metrics.compute(stats)


def computed(stats):
  return {key: float(value) for key, value in compute_metrics(stats).items()}


# ----------------------------------------------------------------------------
# One device.


def test_train_step_reports_everything_from_one_forward_pass():
  features, labels = make_batch(np.random.default_rng(0))
  params = init_params(jax.random.key(0))
  optimizer = optax.sgd(0.1)
  calls = []

  def counting_apply_fn(params, features):
    calls.append(1)
    return apply_fn(params, features)

  step = jax.jit(
      training.make_train_step(
          HEAD, counting_apply_fn, optimizer, regularization_fn=l2, with_metrics=True
      )
  )
  new_params, _, out = step(params, optimizer.init(params), features, labels)
  assert len(calls) == 1

  @jax.jit
  def expected(params, features, labels):
    logits = apply_fn(params, features)
    grads = jax.grad(
        lambda p: HEAD.loss_fn(apply_fn(p, features), labels, features) + l2(p)
    )(params)
    return (
        HEAD.loss_fn(logits, labels, features) + l2(params),
        HEAD.head_losses_fn(logits, labels, features),
        HEAD.metric_fn(logits, labels, features),
        jax.tree.map(lambda p, g: p - 0.1 * g, params, grads),
    )

  expected_loss, expected_head_losses, expected_stats, expected_params = expected(
      params, features, labels
  )
  np.testing.assert_allclose(out.loss, expected_loss, rtol=1e-6)
  np.testing.assert_allclose(out.regularization_loss, l2(params), rtol=1e-6)
  assert out.head_losses.keys() == expected_head_losses.keys()
  for name, loss in expected_head_losses.items():
    np.testing.assert_allclose(out.head_losses[name], loss, rtol=1e-6)
  assert computed(out.metrics) == pytest.approx(computed(expected_stats), rel=1e-6, abs=1e-7)
  assert max_abs_diff(new_params, expected_params) < 1e-6


def test_train_output_fields_are_absent_unless_asked_for():
  features, labels = make_batch(np.random.default_rng(0))
  params = init_params(jax.random.key(0))
  optimizer = optax.sgd(0.1)
  step = jax.jit(training.make_train_step(HEAD, apply_fn, optimizer))
  _, _, out = step(params, optimizer.init(params), features, labels)
  assert out.regularization_loss is None and out.metrics is None


def test_regularization_is_added_once_and_not_head_weighted():
  features, labels = make_batch(np.random.default_rng(1))
  params = init_params(jax.random.key(1))
  logits = apply_fn(params, features)
  head_losses = HEAD.head_losses_fn(logits, labels, features)
  for weights in ([1.0, 1.0, 1.0], [0.0, 3.0, 0.5]):
    loss, out = training.train_loss(
        HEAD,
        logits,
        labels,
        features,
        head_weights=jnp.array(weights),
        regularization_loss=0.25,
    )
    expected = sum(w * head_losses[h.name] for w, h in zip(weights, HEAD.heads)) + 0.25
    np.testing.assert_allclose(loss, expected, rtol=1e-6)
    np.testing.assert_allclose(out.loss, expected, rtol=1e-6)
    assert float(out.regularization_loss) == 0.25


def test_head_weight_schedule_does_not_recompile():
  rng = np.random.default_rng(2)
  params = init_params(jax.random.key(2))
  optimizer = optax.adam(1e-2)
  opt_state = optimizer.init(params)
  chex.clear_trace_counter()
  step = jax.jit(
      chex.assert_max_traces(training.make_train_step(HEAD, apply_fn, optimizer), n=1)
  )
  schedule = optax.linear_schedule(init_value=0.0, end_value=2.0, transition_steps=5)
  for i in range(6):
    features, labels = make_batch(rng)
    head_weights = jnp.array([1.0, 1.0, schedule(i)])
    logits = apply_fn(params, features)
    params, opt_state, out = step(params, opt_state, features, labels, head_weights)
    # The weights of this step, not of the first, made the loss.
    expected = jax.jit(HEAD.loss_fn)(logits, labels, features, head_weights=head_weights)
    np.testing.assert_allclose(out.loss, expected, rtol=1e-6)


def test_head_weights_are_checked():
  features, labels = make_batch(np.random.default_rng(0))
  logits = apply_fn(init_params(jax.random.key(0)), features)
  with pytest.raises(ValueError, match=r"head_weights must have shape \(3,\)"):
    training.train_loss(HEAD, logits, labels, features, head_weights=jnp.ones(2))
  single = jheads.regression_head(name="dwell")
  with pytest.raises(ValueError, match="head_weights are for a multi_head"):
    training.train_loss(single, logits[:, -1:], labels["dwell"], head_weights=jnp.ones(1))


def test_single_head_steps():
  head = jheads.multi_class_head(3, name="topic", label_vocabulary=["a", "b", "c"])
  features, labels = make_batch(np.random.default_rng(3))
  params = {"w": jnp.zeros((N_FEATURES, 3))}
  single_apply = lambda params, features: features["x"] @ params["w"]
  optimizer = optax.sgd(0.5)
  step = jax.jit(training.make_train_step(head, single_apply, optimizer))
  _, _, out = step(params, optimizer.init(params), features, labels["topic"])
  np.testing.assert_allclose(out.loss, np.log(3.0), rtol=1e-6)
  assert list(out.head_losses) == ["topic"]

  unnamed = jheads.multi_class_head(3)
  loss, out = training.train_loss(unnamed, jnp.zeros((4, 3)), jnp.zeros(4, jnp.int32))
  assert out.head_losses == {} and float(out.loss) == float(loss)

  predictions = jax.jit(training.make_predict_step(head, single_apply))(params, features)
  decoded = jheads.decode_predictions(head, predictions)
  assert decoded["classes"].shape == (BATCH, 1)


def test_eval_step_merges_batches_and_averages_regularization():
  rng = np.random.default_rng(4)
  params = init_params(jax.random.key(4))
  batches = [make_batch(rng, 32), make_batch(rng, 32)]
  eval_step = jax.jit(training.make_eval_step(HEAD, apply_fn, regularization_fn=l2))
  stats = functools.reduce(
      jheads.metrics.merge, [eval_step(params, f, l) for f, l in batches]
  )
  # The same batches as one: every metric but loss/<head> (a mean of per-batch
  # losses, as in TF) is a statistic of all examples.
  features, labels = jax.tree.map(lambda *x: np.concatenate(x), *batches)
  whole = computed(jax.jit(HEAD.metric_fn)(apply_fn(params, features), labels, features))
  values = computed(stats)
  assert values.pop("regularization_loss") == pytest.approx(float(l2(params)), rel=1e-6)
  for key in whole:
    if not key.startswith("loss/"):
      assert values[key] == pytest.approx(whole[key], rel=1e-5, abs=1e-6), key
  per_batch = [
      jax.jit(HEAD.head_losses_fn)(apply_fn(params, f), l, f)["topic"] for f, l in batches
  ]
  assert values["loss/topic"] == pytest.approx(float(np.mean(per_batch)), rel=1e-6)


def test_predict_step():
  features, _ = make_batch(np.random.default_rng(5))
  params = init_params(jax.random.key(5))
  predictions = jax.jit(training.make_predict_step(HEAD, apply_fn))(params, features)
  expected = jax.jit(HEAD.predict_fn)(apply_fn(params, features))
  assert predictions.keys() == expected.keys()
  # The step's predictions also carry its value checks: compare the values a user reads.
  assert max_abs_diff(dict(predictions), expected) < 1e-6


# ----------------------------------------------------------------------------
# Flax.


class NnxMlp(nnx.Module):

  def __init__(self, rngs):
    self.hidden = nnx.Linear(N_FEATURES, 16, rngs=rngs)
    self.out = nnx.Linear(16, HEAD.logits_dim, rngs=rngs)

  def __call__(self, x):
    return self.out(jax.nn.relu(self.hidden(x)))


def test_nnx_optimizer_recipe_equals_functional_step():
  rng = np.random.default_rng(6)
  batches = [make_batch(rng) for _ in range(5)]
  tx = optax.adam(1e-2)

  # The stateful recipe of train_loss's docstring.
  model = NnxMlp(nnx.Rngs(0))
  optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)

  @nnx.jit
  def nnx_step(model, optimizer, features, labels):
    def objective(model):
      regularization = l2(nnx.state(model, nnx.Param))
      return training.train_loss(
          HEAD, model(features["x"]), labels, features, regularization_loss=regularization
      )

    (_, out), grads = nnx.value_and_grad(objective, has_aux=True)(model)
    optimizer.update(model, grads)
    return out

  # The functional form, on the split module.
  graphdef, params = nnx.split(NnxMlp(nnx.Rngs(0)), nnx.Param)
  merged_apply = lambda params, features: nnx.merge(graphdef, params)(features["x"])
  step = jax.jit(training.make_train_step(HEAD, merged_apply, tx, regularization_fn=l2))
  opt_state = tx.init(params)

  for features, labels in batches:
    nnx_out = nnx_step(model, optimizer, features, labels)
    params, opt_state, out = step(params, opt_state, features, labels)
    np.testing.assert_allclose(nnx_out.loss, out.loss, rtol=1e-6)
  assert max_abs_diff(nnx.state(model, nnx.Param), params) < 1e-6


def test_linen_apply_fn():
  class LinenMlp(linen.Module):
    @linen.compact
    def __call__(self, x):
      return linen.Dense(HEAD.logits_dim)(jax.nn.relu(linen.Dense(16)(x)))

  features, labels = make_batch(np.random.default_rng(7))
  model = LinenMlp()
  variables = model.init(jax.random.key(0), features["x"])
  linen_apply = lambda variables, features: model.apply(variables, features["x"])
  tx = optax.adam(1e-2)
  step = jax.jit(training.make_train_step(HEAD, linen_apply, tx))
  opt_state = tx.init(variables)
  losses = []
  for _ in range(30):
    variables, opt_state, out = step(variables, opt_state, features, labels)
    losses.append(float(out.loss))
  assert losses[-1] < 0.5 * losses[0]


# ----------------------------------------------------------------------------
# Eight devices against one.

# Plain SGD: Adam would hide a gradient off by a constant factor.
TX = optax.sgd(0.05, momentum=0.9)
MODES = ("explicit_mesh", "auto_mesh", "shard_map", "pmap")
needs_eight_devices = pytest.mark.skipif(
    jax.device_count() < 8,
    reason="needs 8 devices (conftest.py sets --xla_force_host_platform_device_count=8)",
)


def schedule(i):
  return np.array([1.0, 0.5 + 0.05 * i, 2.0], np.float32)


@pytest.fixture(scope="module")
def data():
  rng = np.random.default_rng(8)
  return {
      "train": [make_batch(rng) for _ in range(N_STEPS)],
      "eval": [make_batch(rng) for _ in range(2)],
  }


def train(data, step, put_params, put_batch, put_weights):
  params = init_params(jax.random.key(8))
  params, opt_state = put_params(params), put_params(TX.init(params))
  outputs = []
  for i, batch in enumerate(data["train"]):
    params, opt_state, out = step(
        params, opt_state, *put_batch(batch), put_weights(schedule(i))
    )
    # One step in flight: many queued all-reduces over 8 simulated devices can
    # time out in XLA's CPU runtime on a loaded 2-core machine.
    jax.block_until_ready(params)
    outputs.append(out)
  return jax.device_get(params), jax.device_get(outputs)


def evaluate(data, step, params, put_batch):
  stats = [step(params, *put_batch(batch)) for batch in data["eval"]]
  return computed(functools.reduce(jheads.metrics.merge, stats))


@pytest.fixture(scope="module")
def single_device(data):
  train_step = training.make_train_step(
      HEAD, apply_fn, TX, regularization_fn=l2, with_metrics=True
  )
  eval_step = training.make_eval_step(HEAD, apply_fn, regularization_fn=l2)
  same = lambda tree: tree
  params, outputs = train(data, jax.jit(train_step), same, same, same)
  return params, outputs, evaluate(data, jax.jit(eval_step), params, same)


def distributed_steps(mode):
  """Train and eval steps of `mode`, with how each puts its inputs on devices."""
  if mode == "pmap":
    axis = "batch"
    train_step = jax.pmap(
        training.make_train_step(
            HEAD, apply_fn, TX, regularization_fn=l2, with_metrics=True, axis_name=axis
        ),
        axis_name=axis,
        in_axes=(None, None, 0, 0, None),
        out_axes=(None, None, None),
    )
    eval_step = jax.pmap(
        training.make_eval_step(HEAD, apply_fn, regularization_fn=l2, axis_name=axis),
        axis_name=axis,
        in_axes=(None, 0, 0),
        out_axes=None,
    )
    split = lambda tree: jax.tree.map(lambda x: x.reshape((8, -1) + x.shape[1:]), tree)
    return train_step, eval_step, lambda tree: tree, split, contextlib.nullcontext()

  axis_type = AxisType.Auto if mode == "auto_mesh" else AxisType.Explicit
  mesh = jax.make_mesh((8,), ("batch",), axis_types=(axis_type,))
  replicate = lambda tree: jax.device_put(tree, NamedSharding(mesh, P()))
  shard = lambda tree: jax.device_put(tree, NamedSharding(mesh, P("batch")))
  if mode == "shard_map":
    train_step = jax.jit(
        jax.shard_map(
            training.make_train_step(
                HEAD, apply_fn, TX, regularization_fn=l2, with_metrics=True,
                axis_name="batch",
            ),
            mesh=mesh,
            in_specs=(P(), P(), P("batch"), P("batch"), P()),
            out_specs=P(),
        )
    )
    eval_step = jax.jit(
        jax.shard_map(
            training.make_eval_step(
                HEAD, apply_fn, regularization_fn=l2, axis_name="batch"
            ),
            mesh=mesh,
            in_specs=(P(), P("batch"), P("batch")),
            out_specs=P(),
        )
    )
  else:
    # Plain jit: the batch's sharding is all it takes.
    train_step = jax.jit(
        training.make_train_step(
            HEAD, apply_fn, TX, regularization_fn=l2, with_metrics=True
        )
    )
    eval_step = jax.jit(training.make_eval_step(HEAD, apply_fn, regularization_fn=l2))
  return train_step, eval_step, replicate, shard, jax.set_mesh(mesh)


@needs_eight_devices
@pytest.mark.parametrize("mode", MODES)
def test_eight_devices_equal_one(mode, data, single_device):
  ref_params, ref_outputs, ref_metrics = single_device
  train_step, eval_step, replicate, shard, context = distributed_steps(mode)
  with context:
    params, outputs = train(data, train_step, replicate, shard, replicate)
    # Evaluated at the single-device parameters, so that only the eval step's
    # own distribution is compared.
    metrics = evaluate(data, eval_step, replicate(ref_params), shard)

  param_diff = max_abs_diff(params, ref_params)
  metric_diff = max(abs(metrics[k] - ref_metrics[k]) for k in ref_metrics)
  print(f"{mode}: max |param diff| {param_diff:.3g}, max |metric diff| {metric_diff:.3g}")
  assert metrics.keys() == ref_metrics.keys()
  assert param_diff < 1e-5
  assert metric_diff < 1e-6
  # What each train step reported is the whole batch's, as on one device.
  for out, ref_out in zip(outputs, ref_outputs):
    assert max_abs_diff(
        (out.loss, out.head_losses, out.regularization_loss),
        (ref_out.loss, ref_out.head_losses, ref_out.regularization_loss),
    ) < 1e-5
    train_metrics, ref_train_metrics = computed(out.metrics), computed(ref_out.metrics)
    assert max(abs(train_metrics[k] - ref_train_metrics[k]) for k in ref_train_metrics) < 1e-5


@needs_eight_devices
def test_shard_map_sums_statistics_and_gathers_nothing():
  mesh = jax.make_mesh((8,), ("batch",))
  eval_step = jax.shard_map(
      training.make_eval_step(HEAD, apply_fn, axis_name="batch"),
      mesh=mesh,
      in_specs=(P(), P("batch"), P("batch")),
      out_specs=P(),
  )
  features, labels = make_batch(np.random.default_rng(9))
  params = init_params(jax.random.key(9))
  with jax.set_mesh(mesh):
    shard = lambda tree: jax.device_put(tree, NamedSharding(mesh, P("batch")))
    jaxpr = str(jax.make_jaxpr(eval_step)(params, shard(features), shard(labels)))
  assert "psum" in jaxpr
  assert "all_gather" not in jaxpr and "all_to_all" not in jaxpr


@needs_eight_devices
@pytest.mark.parametrize("axis_type", [AxisType.Explicit, AxisType.Auto])
def test_sharded_jit_sums_statistics_and_gathers_nothing(axis_type):
  mesh = jax.make_mesh((8,), ("batch",), axis_types=(axis_type,))
  features, labels = make_batch(np.random.default_rng(9))
  params = init_params(jax.random.key(9))
  eval_step = jax.jit(training.make_eval_step(HEAD, apply_fn))
  with jax.set_mesh(mesh):
    shard = lambda tree: jax.device_put(tree, NamedSharding(mesh, P("batch")))
    replicate = lambda tree: jax.device_put(tree, NamedSharding(mesh, P()))
    hlo = eval_step.lower(replicate(params), shard(features), shard(labels)).compile().as_text()
  assert "all-reduce" in hlo
  assert "all-gather" not in hlo and "all-to-all" not in hlo
