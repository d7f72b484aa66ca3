"""Data parallel training with jax.pmap: per-device steps that psum.

Each device runs the train step on its slice of the batch. Built with
`axis_name`, the step psums the gradients, so every device applies the
update of the whole batch, and the eval step psums the additive metric
statistics (never the predictions). Parameters are passed once, unmapped
(`in_axes=None`), and come back unmapped (`out_axes=None`).

Run standalone it simulates 8 CPU devices (set XLA_FLAGS yourself to change
that); on a GPU or TPU host it uses the real devices.

    python examples/pmap_multitask.py
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

import jheads

HEAD = jheads.multi_head([
    jheads.binary_classification_head(name="click", weight_column="click_weight"),
    jheads.multi_class_head(4, name="topic"),
    jheads.regression_head(name="dwell"),
])
AXIS = "devices"
PER_DEVICE_BATCH = 32


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


def main():
  n = jax.local_device_count()
  optimizer = optax.adam(1e-2)
  train_step = jax.pmap(
      jheads.training.make_train_step(HEAD, apply_fn, optimizer, axis_name=AXIS),
      axis_name=AXIS,
      in_axes=(None, None, 0, 0),
      out_axes=(None, None, None),
  )
  eval_step = jax.pmap(
      jheads.training.make_eval_step(HEAD, apply_fn, axis_name=AXIS),
      axis_name=AXIS,
      in_axes=(None, 0, 0),
      out_axes=None,
  )

  def per_device(tree):
    # [global batch, ...] -> [devices, per-device batch, ...]
    return jax.tree.map(lambda x: x.reshape((n, -1) + x.shape[1:]), tree)

  rng = np.random.default_rng(0)
  params = init_params(jax.random.key(0))
  opt_state = optimizer.init(params)
  print(f"{n} devices, {PER_DEVICE_BATCH} examples per device and step")
  for step in range(100):
    features, labels = per_device(make_data(rng, n * PER_DEVICE_BATCH))
    params, opt_state, out = train_step(params, opt_state, features, labels)
    if step % 16 == 15:
      # Bound the steps in flight: XLA's CPU collectives can time out when
      # many simulated devices queue all-reduces on a busy 2-core machine.
      jax.block_until_ready(out)
    if step % 25 == 24:
      losses = "  ".join(f"{name} {float(loss):.3f}" for name, loss in out.head_losses.items())
      print(f"step {step + 1}: loss {float(out.loss):.4f}  {losses}")

  stats = eval_step(params, *per_device(make_data(rng, n * 128)))
  for key, value in sorted(jax.jit(jheads.metrics.compute)(stats).items()):
    if key.split("/")[0] in ("accuracy", "average_loss", "auc"):
      print(f"{key:24s} {float(value):.4f}")


if __name__ == "__main__":
  main()
