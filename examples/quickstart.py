"""Quickstart: one trunk, three heads, trained through a multi_head with optax.

Pure JAX (no Flax): a two-layer MLP on synthetic data feeds a binary head, a
4-way classification head and a regression head. Prints per-head eval metrics.

    python examples/quickstart.py
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax

import jheads


def make_data(rng: np.random.Generator, n: int):
  x = rng.normal(size=(n, 8)).astype(np.float32)
  score = x[:, 0] + 0.5 * x[:, 1]
  labels = {
      "click": (score + 0.3 * rng.normal(size=n) > 0).astype(np.float32),
      "topic": np.argmax(x[:, 2:6], axis=1).astype(np.int32),
      "dwell": (2.0 * x[:, 6] - x[:, 7]).astype(np.float32),
  }
  return x, labels


def init_params(key, sizes):
  params = []
  for k, (fan_in, fan_out) in zip(jax.random.split(key, len(sizes) - 1), zip(sizes, sizes[1:])):
    params.append((jax.random.normal(k, (fan_in, fan_out)) * fan_in**-0.5, jnp.zeros(fan_out)))
  return params


def apply(params, x):
  for w, b in params[:-1]:
    x = jax.nn.relu(x @ w + b)
  w, b = params[-1]
  return x @ w + b


def main():
  head = jheads.multi_head(
      [
          jheads.binary_classification_head(name="click"),
          jheads.multi_class_head(4, name="topic"),
          jheads.regression_head(name="dwell"),
      ],
      head_weights=[1.0, 1.0, 0.5],
  )
  rng = np.random.default_rng(0)
  x_train, y_train = make_data(rng, 2048)
  x_eval, y_eval = make_data(rng, 512)

  params = init_params(jax.random.key(0), [8, 64, head.logits_dim])
  optimizer = optax.adam(1e-2)
  opt_state = optimizer.init(params)

  @jax.jit
  def train_step(params, opt_state, x, labels):
    loss, grads = jax.value_and_grad(lambda p: head.loss_fn(apply(p, x), labels))(params)
    updates, opt_state = optimizer.update(grads, opt_state)
    return optax.apply_updates(params, updates), opt_state, loss

  @jax.jit
  def eval_stats(params, x, labels):
    return head.metric_fn(apply(params, x), labels)

  for _ in range(300):
    batch = rng.integers(0, len(x_train), 128)
    params, opt_state, loss = train_step(
        params, opt_state, x_train[batch], {k: v[batch] for k, v in y_train.items()}
    )
  print(f"final train loss {float(loss):.4f}")

  stats = None
  for start in range(0, len(x_eval), 128):
    sl = slice(start, start + 128)
    batch_stats = eval_stats(params, x_eval[sl], {k: v[sl] for k, v in y_eval.items()})
    stats = batch_stats if stats is None else jheads.metrics.merge(stats, batch_stats)
  for key, value in sorted(jheads.metrics.compute(stats).items()):
    print(f"{key:32s} {float(value):.4f}")


if __name__ == "__main__":
  main()
