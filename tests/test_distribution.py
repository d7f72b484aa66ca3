"""Heads on 8 simulated devices: sharded jit (Explicit and Auto axes), shard_map and pmap
give the single-device numbers."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

import jheads
from jheads import metrics
from tests.cases import CASES

N_DEVICES = 8
BATCH = 32


@pytest.fixture(scope="module", autouse=True)
def eight_devices():
  if jax.device_count() < N_DEVICES:
    pytest.skip("needs 8 devices (conftest.py sets --xla_force_host_platform_device_count=8)")


# One case of each head kind, with and without weights, keeps compiles short.
DISTRIBUTED_CASES = [
    case for case in CASES
    if case.id in (
        "binary_thresholds_weighted", "multi_class", "multi_label_class_metrics",
        "regression_3d_per_logit_weights", "poisson", "logistic",
    )
]


def make_problem(reduction):
  heads = [
      case.make_head(
          name=case.id,
          weight_column=f"w_{case.id}" if case.weights else None,
          loss_reduction=reduction,
      )
      for case in DISTRIBUTED_CASES
  ]
  head = jheads.multi_head(heads, head_weights=np.linspace(0.5, 1.5, len(heads)))
  rng = np.random.default_rng(0)
  logits, labels, features = [], {}, {}
  for case, h in zip(DISTRIBUTED_CASES, heads):
    lo, la, f = case.inputs(h, rng, (BATCH,))
    logits.append(lo)
    labels[h.name] = la
    if f is not None:
      weights = f["w"]
      weights[:BATCH // 4] = 0.0  # Whole shards of zero weight.
      features[f"w_{h.name}"] = weights
  return head, np.concatenate(logits, -1), labels, features


def single_device(head, logits, labels, features):
  @jax.jit
  def step(logits, labels, features):
    loss, grads = jax.value_and_grad(head.loss_fn)(logits, labels, features)
    return loss, grads, metrics.compute(head.metric_fn(logits, labels, features)), head.predict_fn(logits)

  with jax.default_device(jax.devices()[0]):
    return jax.tree.map(np.asarray, step(logits, labels, features))


def assert_same(expected, got):
  loss, grads, values, predictions = expected
  got_loss, got_grads, got_values, got_predictions = got
  np.testing.assert_allclose(got_loss, loss, rtol=1e-5)
  np.testing.assert_allclose(np.asarray(got_grads).reshape(grads.shape), grads, rtol=1e-5, atol=1e-7)
  assert got_values.keys() == values.keys()
  for key in values:
    np.testing.assert_allclose(got_values[key], values[key], rtol=1e-5, atol=1e-6, err_msg=key)
  chex.assert_trees_all_close(
      jax.tree.map(lambda x: np.asarray(x).reshape((BATCH,) + x.shape[-1:]), got_predictions),
      predictions,
      rtol=1e-6,
  )


REDUCTIONS = ["sum_over_batch_size", "sum", "mean", "sum_over_nonzero_weights"]


@pytest.mark.parametrize("axis_type", [AxisType.Explicit, AxisType.Auto], ids=["explicit", "auto"])
@pytest.mark.parametrize("reduction", ["sum_over_batch_size", "mean"])
def test_sharded_jit(axis_type, reduction):
  head, logits, labels, features = make_problem(reduction)
  expected = single_device(head, logits, labels, features)
  mesh = jax.make_mesh((N_DEVICES,), ("batch",), axis_types=(axis_type,))
  batch_sharded = lambda x: jax.device_put(x, NamedSharding(mesh, P("batch")))

  @jax.jit
  def step(logits, labels, features):
    loss, grads = jax.value_and_grad(head.loss_fn)(logits, labels, features)
    return loss, grads, metrics.compute(head.metric_fn(logits, labels, features)), head.predict_fn(logits)

  with jax.set_mesh(mesh):
    got = step(*jax.tree.map(batch_sharded, (logits, labels, features)))
  assert_same(expected, got)


def per_shard_step(head):
  """One shard's step: loss and gradient shares, statistics psum'd over the axis."""

  def step(logits, labels, features):
    loss, grads = jax.value_and_grad(
        lambda lo: head.loss_fn(lo, labels, features, axis_name="batch")
    )(logits)
    stats = jax.lax.psum(head.metric_fn(logits, labels, features, axis_name="batch"), "batch")
    return jax.lax.psum(loss, "batch"), grads, metrics.compute(stats), head.predict_fn(logits)

  return step


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_shard_map(reduction):
  head, logits, labels, features = make_problem(reduction)
  expected = single_device(head, logits, labels, features)
  mesh = jax.make_mesh((N_DEVICES,), ("batch",))

  step = jax.jit(
      jax.shard_map(
          per_shard_step(head), mesh=mesh, in_specs=P("batch"),
          out_specs=(P(), P("batch"), P(), P("batch")),
      )
  )

  sharded = jax.device_put((logits, labels, features), NamedSharding(mesh, P("batch")))
  assert_same(expected, step(*sharded))


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_pmap(reduction):
  head, logits, labels, features = make_problem(reduction)
  expected = single_device(head, logits, labels, features)
  per_device = lambda x: x.reshape((N_DEVICES, BATCH // N_DEVICES) + x.shape[1:])

  step = jax.pmap(per_shard_step(head), axis_name="batch")

  loss, grads, values, predictions = step(*jax.tree.map(per_device, (logits, labels, features)))
  assert_same(expected, (loss[0], grads, jax.tree.map(lambda v: v[0], values), predictions))


def test_psum_of_gradient_shares_is_the_global_gradient_for_uneven_weights():
  """The 'mean' reduction divides by the global weight sum, so shares add up exactly."""
  head = jheads.regression_head(weight_column="w", loss_reduction="mean")
  rng = np.random.default_rng(1)
  logits = rng.normal(size=(BATCH, 1)).astype(np.float32)
  labels = rng.normal(size=(BATCH, 1)).astype(np.float32)
  weights = np.where(np.arange(BATCH) < 4, 10.0, 0.1).astype(np.float32)  # One heavy shard.
  expected = jax.grad(head.loss_fn)(jnp.asarray(logits), labels, {"w": weights})
  grads = jax.pmap(
      jax.grad(lambda lo, la, w: head.loss_fn(lo, la, {"w": w}, axis_name="d")), axis_name="d"
  )(logits.reshape(8, 4, 1), labels.reshape(8, 4, 1), weights.reshape(8, 4))
  np.testing.assert_allclose(grads.reshape(BATCH, 1), expected, rtol=1e-5)
