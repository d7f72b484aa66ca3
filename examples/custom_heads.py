"""Two head kinds defined from their math alone with `jheads.define_head`.

Each factory is the whole definition: weights, the four reductions, masks
and missing labels, value checks, grouping in a multi_head, `axis_name` and
export come with it. Run it to train both on synthetic data:

  python examples/custom_heads.py
"""

import jax
import jax.numpy as jnp
import optax

import jheads
from jheads import metrics


def quantile_head(quantiles=(0.1, 0.5, 0.9), **options):
  """Quantile regression: the pinball loss at each quantile, with coverage metrics."""

  def loss(logits, labels):  # logits [..., k], labels [..., 1]
    q, error = jnp.asarray(quantiles), labels - logits
    return jnp.mean(jnp.maximum(q * error, (q - 1) * error), axis=-1, keepdims=True)

  def statistics(batch, losses):
    covered = (batch.labels <= batch.logits).astype(batch.weights.dtype)
    coverage = {
        f"coverage@{q:g}": metrics.weighted_mean(covered[..., i : i + 1], batch.weights)
        for i, q in enumerate(quantiles)
    }
    return {"average_loss": metrics.weighted_mean(losses, batch.weights), **coverage}

  return jheads.define_head(
      "quantile_regression",
      logits_dim=len(quantiles),
      loss=loss,
      statistics=statistics,
      predictions=lambda logits: {"quantiles": logits},
      serving=lambda p: {"regression": {"value": p["quantiles"]}, "predict": dict(p)},
      options=tuple(quantiles),
      **options,
  )


def focal_binary_head(*, alpha=0.25, gamma=2.0, **options):
  """Binary classification with the focal loss (Lin et al. 2017), via optax."""

  def loss(logits, labels):
    return optax.losses.sigmoid_focal_loss(logits, labels, alpha=alpha, gamma=gamma)

  def statistics(batch, losses):
    probabilities = jheads.base.sigmoid(batch.logits)
    auc, auc_pr = metrics.auc_pair(
        metrics.auc_histogram(probabilities, batch.labels, batch.weights, num_thresholds=200),
        metrics.INTERPOLATION,
    )
    correct = ((batch.logits > 0) == (batch.labels > 0.5)).astype(batch.weights.dtype)
    return {"average_loss": metrics.weighted_mean(losses, batch.weights),
            "accuracy": metrics.weighted_mean(correct, batch.weights),
            "auc": auc, "auc_precision_recall": auc_pr}

  def predictions(logits):
    p = jheads.base.sigmoid(logits)
    return {"logits": logits, "logistic": p, "class_ids": (logits > 0).astype(jnp.int32),
            "probabilities": jnp.concatenate([1 - p, p], axis=-1)}

  in_unit_interval = jheads.base.LabelRule(
      integer=False, ok=lambda y: (y >= 0) & (y <= 1), message="in [0, 1]",
      convert=lambda y, dtype: y.astype(dtype))
  return jheads.define_head(
      "focal_binary_classification", logits_dim=1, loss=loss, statistics=statistics,
      predictions=predictions, labels=in_unit_interval, n_classes=2,
      serving=lambda p: {"classification": {"scores": p["probabilities"]}, "predict": dict(p)},
      options=(alpha, gamma), **options)


def main():
  head = jheads.multi_head([
      quantile_head(name="dwell", missing_label=float("nan")),
      focal_binary_head(name="click", mask_column="real"),
  ])
  key_x, key_w = jax.random.split(jax.random.PRNGKey(0))
  x = jax.random.normal(key_x, (512, 8))
  teacher = jax.random.normal(key_w, (8, 2))
  signal = x @ teacher
  labels = {
      "dwell": jnp.where(jnp.arange(512) % 7 == 0, jnp.nan, signal[:, 0] + 0.5 * x[:, 1] ** 2),
      "click": (signal[:, 1] > 0).astype(jnp.float32),
  }
  features = {"x": x, "real": jnp.arange(512) < 480}
  apply_fn = lambda params, features: features["x"] @ params["w"] + params["b"]
  params = {"w": jnp.zeros((8, head.logits_dim)), "b": jnp.zeros(head.logits_dim)}
  optimizer = optax.adam(0.05)
  step = jax.jit(jheads.training.make_train_step(head, apply_fn, optimizer))
  opt_state = optimizer.init(params)
  for _ in range(300):
    params, opt_state, out = step(params, opt_state, features, labels)
  values = metrics.compute(jheads.training.make_eval_step(head, apply_fn)(params, features, labels))
  for key in sorted(values):
    print(f"{key:28s} {float(values[key]):.4f}")
  return values


if __name__ == "__main__":
  main()
