"""Metrics as additive statistics: streaming, merging, AUC bucketing and summation."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jheads
from jheads import metrics
from tests.cases import CASE_IDS, CASES

CASE_BY_ID = {case.id: case for case in CASES}


def split_features(features, sl):
  return None if features is None else {k: v[sl] for k, v in features.items()}


@pytest.mark.parametrize("case_id", CASE_IDS)
def test_streaming_equals_one_shot(case_id):
  case = CASE_BY_ID[case_id]
  head = case.head()
  logits, labels, features = case.inputs(head, np.random.default_rng(3), batch_shape=(40,))
  metric_fn = jax.jit(head.metric_fn)
  one_shot = metric_fn(logits, labels, features)
  streamed = None
  for sl in (slice(0, 7), slice(7, 8), slice(8, 31), slice(31, 40)):
    batch = metric_fn(logits[sl], labels[sl], split_features(features, sl))
    streamed = batch if streamed is None else metrics.merge(streamed, batch)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5), streamed, one_shot)
  expected = metrics.compute(one_shot)
  for key, value in metrics.compute(streamed).items():
    np.testing.assert_allclose(value, expected[key], rtol=1e-5, atol=1e-6, err_msg=key)


@pytest.mark.parametrize("case_id", ["binary_thresholds_weighted", "multi_label_class_metrics", "regression"])
def test_merge_is_associative_and_commutative(case_id):
  case = CASE_BY_ID[case_id]
  head = case.head()
  rng = np.random.default_rng(4)
  a, b, c = (head.metric_fn(*case.inputs(head, rng)) for _ in range(3))
  left = metrics.compute(metrics.merge(metrics.merge(a, b), c))
  right = metrics.compute(metrics.merge(a, metrics.merge(b, c)))
  swapped = metrics.compute(metrics.merge(c, metrics.merge(b, a)))
  for key in left:
    np.testing.assert_allclose(left[key], right[key], rtol=1e-6, err_msg=key)
    np.testing.assert_allclose(left[key], swapped[key], rtol=1e-6, err_msg=key)


def test_merge_is_what_psum_computes():
  head = jheads.binary_classification_head(thresholds=[0.5])
  rng = np.random.default_rng(5)
  logits = rng.normal(size=(8, 4, 1)).astype(np.float32)
  labels = rng.integers(0, 2, size=(8, 4, 1)).astype(np.float32)
  summed = jax.pmap(lambda lo, la: jax.lax.psum(head.metric_fn(lo, la), "d"), axis_name="d")(logits, labels)
  merged = head.metric_fn(logits[0], labels[0])
  for i in range(1, 8):
    merged = metrics.merge(merged, head.metric_fn(logits[i], labels[i]))
  jax.tree.map(lambda s, m: np.testing.assert_allclose(s[0], m, rtol=1e-6), summed, merged)


def test_compute_runs_under_jit():
  head = jheads.binary_classification_head()
  stats = head.metric_fn(np.array([[1.0], [-1.0]], np.float32), np.array([[1.0], [1.0]], np.float32))
  eager = metrics.compute(stats)
  jitted = jax.jit(metrics.compute)(stats)
  for key in eager:
    np.testing.assert_allclose(jitted[key], eager[key], rtol=1e-6)


# ---------------------------------------------------------------------------- AUC


def confusion_by_comparison(predictions, labels, weights, num_thresholds):
  """The O(N x T) reference: compare every prediction with every threshold."""
  t = num_thresholds
  # Keras' thresholds, and its bucketing rule: p is above threshold i iff p * (T - 1) > i.
  scaled = np.clip(predictions, 0, 1).astype(np.float32) * np.float32(t - 1)
  above = scaled[None, :] > np.arange(t, dtype=np.float32)[:, None]
  above[0] = True  # The first threshold is 0 - epsilon: everything in [0, 1] is above it.
  positive = labels != 0
  tp = (above * (weights * positive)[None]).sum(1)
  fp = (above * (weights * ~positive)[None]).sum(1)
  return tp, fp, fp[0] - fp, tp[0] - tp


@pytest.mark.parametrize("num_thresholds", [3, 200, 1000])
def test_histogram_confusion_equals_brute_force_comparison(num_thresholds):
  rng = np.random.default_rng(6)
  n = 3000
  predictions = rng.uniform(size=n).astype(np.float32)
  # Values on and around the thresholds, and the ends of [0, 1].
  grid = (np.arange(num_thresholds, dtype=np.float32) / np.float32(num_thresholds - 1))
  predictions[: len(grid)] = grid[: min(len(grid), n)]
  predictions[-2:] = [0.0, 1.0]
  labels = rng.integers(0, 2, size=n)
  weights = rng.uniform(0, 2, size=n).astype(np.float32)
  histogram = metrics.auc_histogram(
      jnp.asarray(predictions), jnp.asarray(labels), jnp.asarray(weights), num_thresholds=num_thresholds
  )
  auc, _ = metrics.auc_pair(histogram, "interpolation")
  got = [np.asarray(x) for x in auc.confusion()]
  expected = confusion_by_comparison(predictions, labels, weights, num_thresholds)
  for name, g, e in zip(("tp", "fp", "tn", "fn"), got, expected):
    np.testing.assert_allclose(g, e, rtol=1e-4, atol=1e-3, err_msg=name)


def test_prediction_exactly_on_a_threshold_is_not_above_it():
  # With 5 thresholds the interior ones, 0.25, 0.5 and 0.75, are exact in float32.
  predictions = jnp.array([0.25, 0.5, 0.75, 1.0, 0.0])
  histogram = metrics.auc_histogram(predictions, jnp.ones(5), jnp.ones(5), num_thresholds=5)
  tp, _, _, _ = metrics.auc_pair(histogram, "interpolation")[0].confusion()
  # Thresholds [-eps, .25, .5, .75, 1+eps]: all 5 above the first; above 0.25: 0.5, 0.75, 1.0.
  np.testing.assert_array_equal(tp, [5, 3, 2, 1, 0])


def test_decision_thresholds_use_strictly_greater():
  head = jheads.binary_classification_head(thresholds=[0.5])
  values = metrics.compute(head.metric_fn(np.zeros((2, 1), np.float32), np.array([[1.0], [0.0]], np.float32)))
  # sigmoid(0) = 0.5 is not above 0.5: predicted negative.
  assert float(values["recall/positive_threshold_0.5"]) == 0.0
  assert float(values["accuracy/positive_threshold_0.5"]) == 0.5


def exact_roc_auc(scores, labels, weights):
  """Weighted Mann-Whitney statistic: P(score of a positive > score of a negative)."""
  pos, neg = labels == 1, labels == 0
  s_pos, w_pos = scores[pos], weights[pos]
  s_neg, w_neg = scores[neg], weights[neg]
  greater = (s_pos[:, None] > s_neg[None, :]) + 0.5 * (s_pos[:, None] == s_neg[None, :])
  return float((w_pos[:, None] * w_neg[None, :] * greater).sum() / (w_pos.sum() * w_neg.sum()))


def test_roc_auc_approaches_the_exact_area_with_many_thresholds():
  rng = np.random.default_rng(7)
  labels = rng.integers(0, 2, size=2000)
  scores = np.clip(rng.normal(0.5 + 0.15 * (labels - 0.5), 0.2), 0, 1).astype(np.float32)
  weights = rng.uniform(0.5, 1.5, size=2000).astype(np.float32)
  histogram = metrics.auc_histogram(jnp.asarray(scores), jnp.asarray(labels), jnp.asarray(weights), num_thresholds=10_000)
  roc, _ = metrics.auc_pair(histogram, "interpolation")
  np.testing.assert_allclose(float(roc.result()), exact_roc_auc(scores, labels, weights), atol=2e-4)


def test_num_thresholds_is_configurable():
  rng = np.random.default_rng(8)
  logits = rng.normal(size=(500, 1)).astype(np.float32)
  labels = (rng.random((500, 1)) < 1 / (1 + np.exp(-logits))).astype(np.float32)
  coarse = jheads.binary_classification_head(num_thresholds=3)
  fine = jheads.binary_classification_head(num_thresholds=5000)
  coarse_stats, fine_stats = coarse.metric_fn(logits, labels), fine.metric_fn(logits, labels)
  assert coarse_stats["auc"].positives.shape == (3,)
  assert fine_stats["auc"].positives.shape == (5000,)
  exact = exact_roc_auc(1 / (1 + np.exp(-logits[:, 0])), labels[:, 0], np.ones(500))
  np.testing.assert_allclose(float(fine_stats["auc"].result()), exact, atol=1e-3)
  assert abs(float(coarse_stats["auc"].result()) - exact) > 0.05


def test_summation_method_changes_pr_auc():
  # Head1 of spec §7's F2 fixture, pooled into one binary curve.
  logits = np.array([[-10.0], [10.0], [-15.0], [10.0]], np.float32)
  labels = np.array([[1.0], [0.0], [1.0], [1.0]], np.float32)
  tf2 = metrics.compute(jheads.binary_classification_head().metric_fn(logits, labels))
  tf1 = metrics.compute(
      jheads.binary_classification_head(summation_method="trapezoidal").metric_fn(logits, labels)
  )
  np.testing.assert_allclose(float(tf2["auc"]), float(tf1["auc"]), atol=1e-6)
  np.testing.assert_allclose(float(tf2["auc_precision_recall"]), 0.60228, atol=1e-4)
  np.testing.assert_allclose(float(tf1["auc_precision_recall"]), 0.66667, atol=1e-4)


def test_trapezoidal_follows_tf1_without_positive_labels():
  # TF 1 smooths recall with an epsilon: with no positives it is 1 everywhere.
  logits, labels = np.array([[1.0], [-2.0]], np.float32), np.zeros((2, 1), np.float32)
  tf1 = metrics.compute(
      jheads.binary_classification_head(summation_method="trapezoidal").metric_fn(logits, labels)
  )
  tf2 = metrics.compute(jheads.binary_classification_head().metric_fn(logits, labels))
  np.testing.assert_allclose(float(tf1["auc"]), 1.0, atol=1e-6)
  assert float(tf2["auc"]) == 0.0


def test_auc_with_a_single_class_is_finite():
  head = jheads.binary_classification_head()
  values = metrics.compute(head.metric_fn(np.array([[2.0], [-1.0]], np.float32), np.ones((2, 1), np.float32)))
  for key, value in values.items():
    assert np.isfinite(value), key


def test_ratio_with_zero_denominator_is_zero():
  assert float(metrics.Ratio(jnp.array(0.0), jnp.array(0.0)).result()) == 0.0
  assert float(metrics.Baseline(jnp.array(0.0), jnp.array(0.0)).result()) == 0.0


def test_auc_histogram_is_linear_in_inputs_not_a_comparison_matrix():
  """The update never materializes an [N, T] array (checked on its jaxpr)."""
  n, t = 4096, 1000
  jaxpr = jax.make_jaxpr(
      lambda p, y, w: metrics.auc_histogram(p, y, w, num_thresholds=t)
  )(jnp.zeros(n), jnp.zeros(n), jnp.zeros(n))
  sizes = [np.prod(v.aval.shape) for eqn in jaxpr.eqns for v in eqn.outvars]
  assert max(sizes) <= 2 * n
