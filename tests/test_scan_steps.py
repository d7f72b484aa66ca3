"""`training.scan_steps`: k train steps per dispatch equal k dispatched steps (issue 10)."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import jheads
from jheads import aggregation, metrics, training, weighting
from jheads.checks import ValueCheckError

K = 5
BATCH = 16
N_FEATURES = 4
HEAD = jheads.multi_head(
    [
        jheads.binary_classification_head(name="click"),
        jheads.multi_class_head(3, name="topic"),
        jheads.regression_head(name="dwell"),
    ],
    head_weights=[1.0, 0.5, 2.0],
)


def apply_fn(params, features):
  hidden = jnp.tanh(features["x"] @ params["w1"])
  return hidden @ params["w2"]


def init_params():
  rng = np.random.default_rng(0)
  return {
      "w1": jnp.asarray(rng.normal(size=(N_FEATURES, 8)), jnp.float32) / 2,
      "w2": jnp.asarray(rng.normal(size=(8, HEAD.logits_dim)), jnp.float32) / 4,
  }


def make_batches(k=K, seed=1):
  rng = np.random.default_rng(seed)
  x = rng.normal(size=(k, BATCH, N_FEATURES)).astype(np.float32)
  labels = {
      "click": (x[..., 0] > 0).astype(np.float32),
      "topic": np.argmax(x[..., 1:4], axis=-1).astype(np.int32),
      "dwell": (x[..., 2] - x[..., 3]).astype(np.float32),
  }
  return {"x": x}, labels


def nth(tree, i):
  return jax.tree.map(lambda x: x[i], tree)


def assert_close(a, b, tol=1e-6):
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
    np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=tol, atol=tol)


@pytest.mark.parametrize("options", ["plain", "uncertainty+upgrad"])
def test_block_equals_k_steps(options):
  optimizer = optax.adam(1e-2)
  params = init_params()
  kwargs = {}
  if options == "plain":
    state = optimizer.init(params)
  else:
    kwargs = dict(weighting=weighting.uncertainty(), aggregator=aggregation.upgrad())
    state = training.init_train_state(HEAD, optimizer, params, **kwargs)
  step = training.make_train_step(HEAD, apply_fn, optimizer, with_metrics=True, **kwargs)
  features, labels = make_batches()

  one = jax.jit(step)
  p, s, outs = params, state, []
  for i in range(K):
    p, s, out = one(p, s, nth(features, i), nth(labels, i))
    outs.append(out)

  block = jax.jit(training.scan_steps(step))
  bp, bs, bout = block(params, state, features, labels)
  assert_close(bp, p)
  assert_close(bs, s)
  assert bout.loss.shape == (K,)
  for i, out in enumerate(outs):
    np.testing.assert_allclose(float(bout.loss[i]), float(out.loss), rtol=1e-6)
    for name in ("click", "topic", "dwell"):
      np.testing.assert_allclose(
          float(bout.head_losses[name][i]), float(out.head_losses[name]), rtol=1e-6
      )
  if options != "plain":
    np.testing.assert_allclose(
        np.asarray(bout.head_weights), np.stack([np.asarray(o.head_weights) for o in outs]),
        rtol=1e-5,
    )
  # The block's statistics summed over its steps are the k batches merged.
  summed = jax.tree.map(lambda x: x.sum(0), bout.metrics)
  merged = outs[0].metrics
  for out in outs[1:]:
    merged = metrics.merge(merged, out.metrics)
  computed, expected = metrics.compute(summed), metrics.compute(merged)
  assert computed.keys() == expected.keys()
  for key in expected:
    np.testing.assert_allclose(computed[key], expected[key], rtol=1e-5, err_msg=key)


def test_a_bad_batch_inside_the_block_raises_when_read():
  optimizer = optax.sgd(0.1)
  params = init_params()
  block = jax.jit(training.scan_steps(training.make_train_step(HEAD, apply_fn, optimizer)))
  features, labels = make_batches()
  labels["topic"][3, 7] = 3
  _, _, out = block(params, optimizer.init(params), features, labels)
  with pytest.raises(ValueCheckError, match=r"^head 'topic': labels must be class ids in \[0, 3\)"):
    float(out.loss[0])
  with pytest.raises(ValueCheckError, match="head 'topic'"):
    jax.device_get(out)
  # Good blocks reuse the compilation and read fine.
  _, _, out = block(params, optimizer.init(params), *make_batches(seed=2))
  assert np.all(np.isfinite(np.asarray(out.loss)))
  assert block._cache_size() == 1


@pytest.mark.skipif(jax.device_count() < 8, reason="needs 8 devices")
@pytest.mark.parametrize("mode", ["shard_map", "pmap", "sharded_jit"])
def test_eight_devices_equal_one(mode):
  optimizer = optax.sgd(0.1)
  params = init_params()
  opt_state = optimizer.init(params)
  features, labels = make_batches()
  reference = jax.jit(training.scan_steps(training.make_train_step(HEAD, apply_fn, optimizer)))
  ref_params, _, ref_out = reference(params, opt_state, features, labels)

  if mode == "pmap":
    step = jax.pmap(
        training.scan_steps(training.make_train_step(HEAD, apply_fn, optimizer, axis_name="b")),
        axis_name="b",
        in_axes=(None, None, 0, 0),
    )
    # [devices, k, batch / devices, ...]
    split = lambda tree: jax.tree.map(
        lambda x: np.moveaxis(x.reshape((K, 8, BATCH // 8) + x.shape[2:]), 1, 0), tree
    )
    new_params, _, out = step(params, opt_state, split(features), split(labels))
    new_params, loss = nth(new_params, 0), np.asarray(out.loss)[0]
  else:
    mesh = jax.make_mesh((8,), ("b",))
    if mode == "shard_map":
      step = jax.jit(
          jax.shard_map(
              training.scan_steps(
                  training.make_train_step(HEAD, apply_fn, optimizer, axis_name="b")
              ),
              mesh=mesh,
              in_specs=(P(), P(), P(None, "b"), P(None, "b")),
              out_specs=P(),
          )
      )
    else:
      step = reference
    with jax.set_mesh(mesh):
      shard = lambda tree: jax.device_put(tree, NamedSharding(mesh, P(None, "b")))
      new_params, _, out = step(params, opt_state, shard(features), shard(labels))
    loss = np.asarray(out.loss)
  assert_close(new_params, ref_params, tol=1e-5)
  np.testing.assert_allclose(loss, np.asarray(ref_out.loss), rtol=1e-5)
