"""Data parallel training with sharded jit: one train step, a mesh of devices.

The batch is split over the devices of a mesh (`NamedSharding` on its
"batch" axis); parameters and optimizer state are replicated. The train step
is the same `jax.jit` function as on one device: XLA inserts the all-reduces
of gradients and metric statistics. The script checks that the result equals
training on one device.

Run standalone it simulates 8 CPU devices (set XLA_FLAGS yourself to change
that); on a GPU or TPU host it uses the real devices.

    python examples/sharded_multitask.py
"""

import os

# jax reads XLA_FLAGS when it starts, so they are set before importing it.
if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
  os.environ["XLA_FLAGS"] = (
      os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
  )

import jax
import numpy as np
import optax
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

import jheads

HEAD = jheads.multi_head([
    jheads.binary_classification_head(name="click", weight_column="click_weight"),
    jheads.multi_class_head(4, name="topic"),
    jheads.regression_head(name="dwell"),
])
BATCH = 256
STEPS = 100


def make_data(rng: np.random.Generator, n: int):
  x = rng.normal(size=(n, 8)).astype(np.float32)
  features = {"x": x, "click_weight": rng.uniform(0.5, 1.5, n).astype(np.float32)}
  labels = {
      "click": (x[:, 0] + 0.5 * x[:, 1] + 0.3 * rng.normal(size=n) > 0).astype(np.float32),
      "topic": np.argmax(x[:, 2:6], axis=1).astype(np.int32),
      "dwell": (2.0 * x[:, 6] - x[:, 7]).astype(np.float32),
  }
  return features, labels


def init_params(key):
  k1, k2 = jax.random.split(key)
  return {
      "hidden": jax.random.normal(k1, (8, 64)) / np.sqrt(8),
      "logits": jax.random.normal(k2, (64, HEAD.logits_dim)) / 8.0,
  }


def apply_fn(params, features):
  return jax.nn.relu(features["x"] @ params["hidden"]) @ params["logits"]


def train(batches, put_params, put_batch):
  optimizer = optax.adam(1e-2)
  train_step = jax.jit(jheads.training.make_train_step(HEAD, apply_fn, optimizer))
  params = put_params(init_params(jax.random.key(0)))
  opt_state = put_params(optimizer.init(params))
  for step, (features, labels) in enumerate(batches):
    params, opt_state, out = train_step(params, opt_state, *put_batch((features, labels)))
    if step % 16 == 15:
      # XLA's CPU client can deadlock with ~33 multi-device computations left
      # unread behind an all-reduce; reading a value now and then bounds them.
      jax.block_until_ready(out.loss)
  return params, out


def main():
  n = jax.device_count()
  mesh = jax.make_mesh((n,), ("batch",), axis_types=(AxisType.Explicit,))
  replicated = NamedSharding(mesh, P())
  batch_sharded = NamedSharding(mesh, P("batch"))
  print(f"{n} devices, mesh {dict(mesh.shape)}")

  rng = np.random.default_rng(0)
  batches = [make_data(rng, BATCH) for _ in range(STEPS)]
  eval_features, eval_labels = make_data(rng, 1024)

  def put_batch(tree):
    # Each process passes its own part of the global batch; with one process,
    # that is all of it. The same line serves a multi-host run.
    return jax.tree.map(
        lambda x: jax.make_array_from_process_local_data(batch_sharded, x), tree
    )

  with jax.set_mesh(mesh):
    params, out = train(batches, lambda tree: jax.device_put(tree, replicated), put_batch)
    features, labels = put_batch((eval_features, eval_labels))
    print(f"a sharded batch: {jax.typeof(features['x'])}")
    eval_step = jax.jit(jheads.training.make_eval_step(HEAD, apply_fn))
    metrics = jax.jit(jheads.metrics.compute)(eval_step(params, features, labels))
  print(f"final train loss {float(out.loss):.4f}")
  for key, value in sorted(metrics.items()):
    if key.split("/")[0] in ("accuracy", "average_loss", "auc"):
      print(f"{key:24s} {float(value):.4f}")

  single_params, _ = train(batches, lambda tree: tree, lambda tree: tree)
  difference = max(
      float(np.max(np.abs(np.asarray(a) - np.asarray(b))))
      for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(single_params))
  )
  print(f"max |parameter difference| from training on one device: {difference:.2g}")


if __name__ == "__main__":
  main()
