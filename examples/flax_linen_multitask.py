"""Flax Linen: `model.apply` as the apply_fn of jheads' step builders.

Shows an L2 regularization loss (added once, reported on its own, and as
the `regularization_loss` eval metric) and train-time metrics computed from
the training step's own logits.

    python examples/flax_linen_multitask.py
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import linen as nn

import jheads

HEAD = jheads.multi_head(
    [
        jheads.binary_classification_head(name="click"),
        jheads.multi_class_head(4, name="topic"),
        jheads.regression_head(name="dwell"),
    ],
    head_weights=[1.0, 1.0, 0.5],
)


class Model(nn.Module):

  @nn.compact
  def __call__(self, x):
    return nn.Dense(HEAD.logits_dim)(nn.relu(nn.Dense(64)(x)))


def make_data(rng: np.random.Generator, n: int):
  x = rng.normal(size=(n, 8)).astype(np.float32)
  labels = {
      "click": (x[:, 0] + 0.5 * x[:, 1] + 0.3 * rng.normal(size=n) > 0).astype(np.float32),
      "topic": np.argmax(x[:, 2:6], axis=1).astype(np.int32),
      "dwell": (2.0 * x[:, 6] - x[:, 7]).astype(np.float32),
  }
  return {"x": x}, labels


def l2(variables):
  return 1e-4 * sum(jnp.sum(w**2) for w in jax.tree.leaves(variables["params"]))


def main():
  rng = np.random.default_rng(0)
  train_features, train_labels = make_data(rng, 4096)
  eval_features, eval_labels = make_data(rng, 1024)

  model = Model()
  variables = model.init(jax.random.key(0), train_features["x"][:1])
  apply_fn = lambda variables, features: model.apply(variables, features["x"])
  optimizer = optax.adam(1e-2)
  opt_state = optimizer.init(variables)
  train_step = jax.jit(
      jheads.training.make_train_step(
          HEAD, apply_fn, optimizer, regularization_fn=l2, with_metrics=True
      )
  )
  eval_step = jax.jit(jheads.training.make_eval_step(HEAD, apply_fn, regularization_fn=l2))
  compute = jax.jit(jheads.metrics.compute)

  train_stats = []
  for step in range(300):
    batch = rng.integers(0, len(train_features["x"]), 128)
    variables, opt_state, out = train_step(
        variables,
        opt_state,
        jax.tree.map(lambda x: x[batch], train_features),
        jax.tree.map(lambda x: x[batch], train_labels),
    )
    train_stats.append(out.metrics)
    if step % 100 == 99:
      # Metric statistics merge across steps as across eval batches.
      window = compute(functools.reduce(jheads.metrics.merge, train_stats))
      train_stats = []
      print(
          f"step {step + 1}: loss {float(out.loss):.4f} (regularization"
          f" {float(out.regularization_loss):.4f}); last 100 steps' train accuracy"
          f" click {float(window['accuracy/click']):.3f},"
          f" topic {float(window['accuracy/topic']):.3f}"
      )

  stats = None
  for start in range(0, len(eval_features["x"]), 256):
    part = slice(start, start + 256)
    batch_stats = eval_step(
        variables,
        jax.tree.map(lambda x: x[part], eval_features),
        jax.tree.map(lambda x: x[part], eval_labels),
    )
    stats = batch_stats if stats is None else jheads.metrics.merge(stats, batch_stats)
  for key, value in sorted(compute(stats).items()):
    if key.split("/")[0] in ("accuracy", "average_loss", "regularization_loss"):
      print(f"{key:24s} {float(value):.4f}")


if __name__ == "__main__":
  main()
