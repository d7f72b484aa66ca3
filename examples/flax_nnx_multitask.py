"""Flax NNX: a stateful nnx.Module and nnx.Optimizer trained through jheads.

The train step differentiates `jheads.training.train_loss`, which computes
the weighted multi_head loss and reports each head's loss from the same
logits. The head weights are an argument of the jitted step: here a schedule
brings in the regression head gradually, with one compilation throughout.

    python examples/flax_nnx_multitask.py
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

import jheads

HEAD = jheads.multi_head([
    jheads.binary_classification_head(name="click"),
    jheads.multi_class_head(4, name="topic"),
    jheads.regression_head(name="dwell"),
])
STEPS = 300


class Model(nnx.Module):

  def __init__(self, n_features: int, *, rngs: nnx.Rngs):
    self.hidden = nnx.Linear(n_features, 64, rngs=rngs)
    self.logits = nnx.Linear(64, HEAD.logits_dim, rngs=rngs)

  def __call__(self, x):
    return self.logits(nnx.relu(self.hidden(x)))


def make_data(rng: np.random.Generator, n: int):
  x = rng.normal(size=(n, 8)).astype(np.float32)
  labels = {
      "click": (x[:, 0] + 0.5 * x[:, 1] + 0.3 * rng.normal(size=n) > 0).astype(np.float32),
      "topic": np.argmax(x[:, 2:6], axis=1).astype(np.int32),
      "dwell": (2.0 * x[:, 6] - x[:, 7]).astype(np.float32),
  }
  return {"x": x}, labels


@nnx.jit
def train_step(model, optimizer, features, labels, head_weights):
  def objective(model):
    return jheads.training.train_loss(
        HEAD, model(features["x"]), labels, features, head_weights=head_weights
    )

  (_, out), grads = nnx.value_and_grad(objective, has_aux=True)(model)
  optimizer.update(model, grads)
  return out


# The eval step only calls apply_fn(params, features): an NNX module can
# stand in for the params.
eval_step = nnx.jit(
    jheads.training.make_eval_step(HEAD, lambda model, features: model(features["x"]))
)


def main():
  rng = np.random.default_rng(0)
  train_features, train_labels = make_data(rng, 4096)
  eval_features, eval_labels = make_data(rng, 1024)

  model = Model(8, rngs=nnx.Rngs(0))
  optimizer = nnx.Optimizer(model, optax.adam(1e-2), wrt=nnx.Param)
  dwell_weight = optax.linear_schedule(0.0, 1.0, transition_steps=STEPS // 2)

  for step in range(STEPS):
    batch = rng.integers(0, len(train_features["x"]), 128)
    head_weights = jnp.array([1.0, 1.0, dwell_weight(step)])
    out = train_step(
        model,
        optimizer,
        jax.tree.map(lambda x: x[batch], train_features),
        jax.tree.map(lambda x: x[batch], train_labels),
        head_weights,
    )
    if step % 100 == 0 or step == STEPS - 1:
      losses = "  ".join(f"{name} {float(loss):.3f}" for name, loss in out.head_losses.items())
      print(f"step {step:3d}  dwell weight {float(head_weights[2]):.2f}  {losses}")

  stats = None
  for start in range(0, len(eval_features["x"]), 256):
    part = slice(start, start + 256)
    batch_stats = eval_step(
        model,
        jax.tree.map(lambda x: x[part], eval_features),
        jax.tree.map(lambda x: x[part], eval_labels),
    )
    stats = batch_stats if stats is None else jheads.metrics.merge(stats, batch_stats)
  for key, value in sorted(jax.jit(jheads.metrics.compute)(stats).items()):
    if key.split("/")[0] in ("accuracy", "average_loss", "auc"):
      print(f"{key:24s} {float(value):.4f}")


if __name__ == "__main__":
  main()
