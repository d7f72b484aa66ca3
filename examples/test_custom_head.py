"""Testing a head of your own with `jheads.testing`: copy this file next to your head.

The head here is a quantile (pinball loss) regression head, a kind jheads
does not ship: logits are one prediction per quantile, `[B, Q]`, labels one
target per row, `[B]`, and the metrics are the average loss and, per
quantile, the share of targets at or below the prediction (its coverage).
It is defined with `jheads.define_head`, so it gets weights, the four loss
reductions, masks, missing labels, value checks and grouping in
`multi_head` without code of its own.

`jheads.testing` checks what every head owes its users: the same numbers
eagerly, under jit and under vmap; metrics that stream over batches; the
same numbers grouped and one by one in a multi_head; finite gradients at
large logits; the same numbers on many devices; and absent rows that count
as dropped ones. It does not check that the numbers are right: the last
test does that, by hand, as your own tests should.

    pytest examples/test_custom_head.py
    # the sharded test needs several devices; on a CPU, simulate 8:
    XLA_FLAGS=--xla_force_host_platform_device_count=8 pytest examples/test_custom_head.py
"""

import jax.numpy as jnp
import numpy as np

import jheads
from jheads import metrics, testing


def quantile_head(quantiles=(0.1, 0.5, 0.9), **options):
  """Quantile regression: the pinball loss at each quantile, one logit each."""

  def loss(logits, labels):  # logits [B, k], labels [B, 1] -> [B, k]
    q, error = jnp.asarray(quantiles), labels - logits
    return jnp.maximum(q * error, (q - 1.0) * error)

  def statistics(batch, losses):
    covered = (batch.labels <= batch.logits).astype(losses.dtype)
    stats = {"average_loss": metrics.weighted_mean(losses, batch.weights)}
    for i, q in enumerate(quantiles):
      stats[f"coverage@{q:g}"] = metrics.weighted_mean(covered[..., i], batch.weights[..., i])
    return stats

  return jheads.define_head(
      "quantile_regression", logits_dim=len(quantiles), loss_dim=len(quantiles), loss=loss,
      statistics=statistics, predictions=lambda logits: {"quantiles": logits},
      options=tuple(quantiles), **options)


def draw(rng, batch_shape):
  """A valid random batch for the head: what `jheads.testing` runs it on."""
  logits = rng.normal(size=batch_shape + (3,)).astype(np.float32)
  labels = rng.normal(size=batch_shape).astype(np.float32)
  features = {"w": rng.uniform(0.0, 2.0, size=batch_shape).astype(np.float32)}
  return testing.Inputs(logits, labels, features)


HEAD = quantile_head(name="delivery_time", weight_column="w", missing_label=float("nan"))
INPUTS = draw(np.random.default_rng(0), (8,))


def test_eager_jit_and_vmap_agree():
  testing.assert_eager_jit_vmap_equal(HEAD, *INPUTS)


def test_metrics_stream_over_batches():
  testing.assert_merge_equals_concatenation(HEAD, *INPUTS, num_batches=3)


def test_like_heads_are_grouped_exactly_in_a_multi_head():
  testing.assert_grouped_equals_per_head(HEAD, *INPUTS, copies=2)


def test_gradients_are_finite_at_large_logits():
  testing.assert_finite_gradients(HEAD, *INPUTS, magnitude=1e4)


def test_sharded_equals_one_device():
  # Skips (unittest.SkipTest) with a single device.
  testing.assert_sharded_equals_one_device(HEAD, *INPUTS, modes=("explicit", "shard_map"))


def test_masked_rows_and_missing_labels_equal_dropped_rows():
  testing.assert_absent_rows_equal_dropped(HEAD, *INPUTS)


def test_pinball_loss_and_coverage_values():
  head = quantile_head((0.1, 0.9), name="t")
  logits = jnp.array([[0.0, 2.0], [1.0, 3.0]])
  labels = jnp.array([1.0, 0.0])
  # Label 1: 0.1 x 1 above logit 0, 0.1 x 1 below logit 2; label 0: 0.9 x 1, 0.1 x 3 below both.
  np.testing.assert_allclose(float(head.loss_fn(logits, labels)), (0.1 + 0.1 + 0.9 + 0.3) / 4,
                             rtol=1e-6)
  values = metrics.compute(head.metric_fn(logits, labels))
  np.testing.assert_allclose(float(values["coverage@0.1/t"]), 0.5)
  np.testing.assert_allclose(float(values["coverage@0.9/t"]), 1.0)
  assert jheads.multi_head([head]).logits_dim == 2
