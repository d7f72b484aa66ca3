"""Every head: shapes, transformations (jit, vmap, grad), reductions and numerics."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from absl.testing import parameterized

import jheads
from jheads import metrics
from tests.cases import CASE_IDS, CASES

CASE_BY_ID = {case.id: case for case in CASES}


def draw(case_id, seed=0, batch_shape=(16,), **head_kwargs):
  case = CASE_BY_ID[case_id]
  head = case.head(**head_kwargs)
  logits, labels, features = case.inputs(head, np.random.default_rng(seed), batch_shape)
  return head, logits, labels, features


class JitParityTest(chex.TestCase):
  """Loss, metrics and predictions are the same with and without jit."""

  @chex.variants(with_jit=True, without_jit=True)
  @parameterized.parameters(*CASE_IDS)
  def test_loss_metrics_predictions(self, case_id):
    head, logits, labels, features = draw(case_id)
    eager_loss = head.loss_fn(logits, labels, features)
    eager_values = metrics.compute(head.metric_fn(logits, labels, features))
    eager_predictions = head.predict_fn(logits)

    loss = self.variant(head.loss_fn)(logits, labels, features)
    values = self.variant(lambda *a: metrics.compute(head.metric_fn(*a)))(logits, labels, features)
    predictions = self.variant(head.predict_fn)(logits)

    chex.assert_shape(loss, ())
    assert np.isfinite(loss)
    np.testing.assert_allclose(loss, eager_loss, rtol=1e-6)
    assert values.keys() == eager_values.keys()
    for key in values:
      np.testing.assert_allclose(values[key], eager_values[key], rtol=1e-6, atol=1e-7, err_msg=key)
    chex.assert_trees_all_close(predictions, eager_predictions, rtol=1e-6)


@pytest.mark.parametrize("case_id", CASE_IDS)
@pytest.mark.parametrize("batch_shape", [(5,), (3, 4)], ids=["rank2", "rank3"])
def test_prediction_shapes(case_id, batch_shape):
  head, logits, _, _ = draw(case_id, batch_shape=batch_shape)
  predictions = head.predict_fn(logits)
  n = head.logits_dim
  kind = head.config.kind
  expected = {
      "binary_classification": {
          "logits": (1,), "logistic": (1,), "probabilities": (2,),
          "class_ids": (1,), "all_class_ids": (2,),
      },
      "multi_class": {"logits": (n,), "probabilities": (n,), "class_ids": (1,), "all_class_ids": (n,)},
      "multi_label": {"logits": (n,), "probabilities": (n,)},
      "regression": {"predictions": (n,)},
      "poisson_regression": {"predictions": (n,), "logits": (n,)},
      "logistic_regression": {"predictions": (1,), "logits": (1,)},
  }[kind]
  assert set(predictions) == set(expected)
  for key, tail in expected.items():
    assert predictions[key].shape == batch_shape + tail, key
  if "all_class_ids" in predictions:
    # TF tiled only over the first axis; every batch axis is broadcast here.
    np.testing.assert_array_equal(
        predictions["all_class_ids"], np.broadcast_to(np.arange(expected["all_class_ids"][0]), batch_shape + expected["all_class_ids"])
    )
  if "class_ids" in predictions:
    assert jnp.issubdtype(predictions["class_ids"].dtype, jnp.integer)


@pytest.mark.parametrize("case_id", CASE_IDS)
def test_grad_is_finite_and_matches_finite_differences(case_id):
  head, logits, labels, features = draw(case_id)
  loss = lambda x: head.loss_fn(x, labels, features)
  grads = jax.grad(loss)(jnp.asarray(logits))
  assert grads.shape == logits.shape
  assert np.all(np.isfinite(grads))
  direction = np.random.default_rng(1).normal(size=logits.shape).astype(np.float32)
  eps = 1e-2
  numeric = (loss(logits + eps * direction) - loss(logits - eps * direction)) / (2 * eps)
  np.testing.assert_allclose(np.sum(grads * direction), numeric, rtol=2e-2, atol=2e-3)


@pytest.mark.parametrize("case_id", CASE_IDS)
def test_vmap_over_a_leading_axis_equals_a_loop(case_id):
  head, logits, labels, features = draw(case_id, batch_shape=(3, 6))
  vmapped = jax.vmap(lambda lo, la, f: head.loss_fn(lo, la, f))(logits, labels, features)
  looped = [
      head.loss_fn(logits[i], labels[i], None if features is None else {"w": features["w"][i]})
      for i in range(3)
  ]
  np.testing.assert_allclose(vmapped, looped, rtol=1e-6)


@pytest.mark.parametrize("case_id", CASE_IDS)
@pytest.mark.parametrize("reduction", list(jheads.LossReduction))
def test_reductions(case_id, reduction):
  head, logits, labels, features = draw(case_id, loss_reduction=reduction)
  # The unreduced weighted loss, recomputed from the metric statistics:
  # average_loss = sum(w * l) / sum(w broadcast to l).
  stats = head.metric_fn(logits, labels, features)
  weighted_sum = float(stats["average_loss"].numerator)
  weight_sum = float(stats["average_loss"].denominator)
  loss_dim = head.logits_dim if head.config.kind in ("regression", "poisson_regression") else 1
  n_elements = int(np.prod(logits.shape[:-1])) * loss_dim
  weights = np.ones(logits.shape[:-1] + (loss_dim,))
  if features is not None:
    w = features["w"]
    weights = np.broadcast_to(w[..., None] if w.ndim == logits.ndim - 1 else w, weights.shape)
  expected = {
      "sum": weighted_sum,
      "sum_over_batch_size": weighted_sum / n_elements,
      "mean": weighted_sum / weight_sum,
      "sum_over_nonzero_weights": weighted_sum / np.count_nonzero(weights),
  }[reduction.value]
  np.testing.assert_allclose(head.loss_fn(logits, labels, features), expected, rtol=1e-5)


def test_reduction_accepts_enum_and_string_and_rejects_others():
  a = jheads.binary_classification_head(loss_reduction=jheads.LossReduction.SUM)
  b = jheads.binary_classification_head(loss_reduction="sum")
  assert a.config.loss_reduction is b.config.loss_reduction is jheads.LossReduction.SUM
  with pytest.raises(ValueError, match="invalid loss_reduction 'none'"):
    jheads.binary_classification_head(loss_reduction="none")


@pytest.mark.parametrize("case_id", CASE_IDS)
@pytest.mark.parametrize("reduction", list(jheads.LossReduction))
def test_all_zero_weights_give_zero_not_nan(case_id, reduction):
  case = CASE_BY_ID[case_id]
  head = case.head(loss_reduction=reduction, weight_column="w")
  logits, labels, _ = case.inputs(head, np.random.default_rng(0))
  features = {"w": np.zeros(logits.shape[:-1], np.float32)}
  assert float(head.loss_fn(logits, labels, features)) == 0.0
  grads = jax.grad(head.loss_fn)(jnp.asarray(logits), labels, features)
  np.testing.assert_array_equal(grads, 0.0)
  for key, value in metrics.compute(head.metric_fn(logits, labels, features)).items():
    assert np.isfinite(value), key


@pytest.mark.parametrize("case_id", [c for c in CASE_IDS if not c.startswith("poisson")])
@pytest.mark.parametrize("magnitude", [1e4, -1e4])
def test_huge_logits_give_finite_losses_and_gradients(case_id, magnitude):
  head, logits, labels, features = draw(case_id)
  logits = np.where(np.random.default_rng(2).random(logits.shape) < 0.5, magnitude, -magnitude).astype(np.float32)
  loss, grads = jax.value_and_grad(head.loss_fn)(jnp.asarray(logits), labels, features)
  assert np.isfinite(loss)
  assert np.all(np.isfinite(grads))
  for key, value in metrics.compute(head.metric_fn(logits, labels, features)).items():
    assert np.isfinite(value), key


def test_poisson_logits_that_overflow_are_rejected_not_infinite():
  head = jheads.poisson_regression_head(name="counts")
  with pytest.raises(ValueError, match=r"head 'counts': logits must be below 88.72"):
    head.loss_fn(np.array([[1e4]], np.float32), np.array([[1.0]], np.float32))
  loss, grads = jax.value_and_grad(head.loss_fn)(jnp.array([[-1e4], [80.0]]), jnp.array([[0.0], [3.0]]))
  assert np.isfinite(loss) and np.all(np.isfinite(grads))


@pytest.mark.parametrize("case_id", CASE_IDS)
@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
def test_low_precision_logits_are_reduced_in_float32(case_id, dtype):
  head, logits, labels, features = draw(case_id, batch_shape=(512,))
  low = jnp.asarray(logits, dtype)
  reference = head.loss_fn(low.astype(jnp.float32), labels, features)
  loss = head.loss_fn(low, labels, features)
  assert loss.dtype == jnp.float32
  np.testing.assert_allclose(loss, reference, rtol=1e-6)
  stats = head.metric_fn(low, labels, features)
  # Statistics accumulate in float32 on the device (compute finishes them in float64).
  assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(stats) if jnp.issubdtype(x.dtype, jnp.floating))
  values = metrics.compute(stats)
  reference_values = metrics.compute(head.metric_fn(low.astype(jnp.float32), labels, features))
  for key in values:
    np.testing.assert_allclose(values[key], reference_values[key], rtol=1e-6, err_msg=key)
  grads = jax.grad(head.loss_fn)(low, labels, features)
  assert grads.dtype == dtype
  assert np.all(np.isfinite(np.asarray(grads, np.float32)))


def test_float16_batch_large_enough_to_overflow_a_float16_sum():
  head = jheads.regression_head()
  logits = jnp.full((4096, 1), 100.0, jnp.float16)
  labels = jnp.zeros((4096, 1), jnp.float16)
  # sum((100 - 0)^2) = 4.1e7 overflows float16 (max 65504), not float32.
  np.testing.assert_allclose(jheads.regression_head(loss_reduction="sum").loss_fn(logits, labels), 4.096e7, rtol=1e-6)
  np.testing.assert_allclose(head.loss_fn(logits, labels), 1e4, rtol=1e-6)


def test_custom_loss_fn_is_weighted_and_reduced_by_the_head():
  def absolute_error(labels, logits):
    return jnp.abs(logits - labels)

  head = jheads.regression_head(loss_fn=absolute_error, weight_column="w", loss_reduction="mean")
  logits = np.array([[1.0], [4.0]], np.float32)
  labels = np.array([[0.0], [0.0]], np.float32)
  features = {"w": np.array([1.0, 3.0], np.float32)}
  np.testing.assert_allclose(head.loss_fn(logits, labels, features), (1 + 12) / 4)
  np.testing.assert_allclose(metrics.compute(head.metric_fn(logits, labels, features))["average_loss"], 13 / 4)


def test_custom_loss_fn_receives_processed_labels_and_features():
  seen = {}

  def loss_fn(labels, logits, features):
    seen["labels"] = labels
    seen["features"] = features
    return optax_like_ce(logits, labels)

  def optax_like_ce(logits, labels):
    return -jnp.take_along_axis(jax.nn.log_softmax(logits), labels, axis=-1)

  head = jheads.multi_class_head(3, label_vocabulary=["a", "b", "c"], loss_fn=loss_fn)
  labels = jheads.encode_labels(head, np.array(["c", "a"]))
  features = {"extra": np.ones(2)}
  logits = np.zeros((2, 3), np.float32)
  np.testing.assert_allclose(head.loss_fn(logits, labels, features), np.log(3.0), rtol=1e-6)
  assert seen["labels"].dtype == jnp.int32 and seen["labels"].shape == (2, 1)
  np.testing.assert_array_equal(seen["labels"], [[2], [0]])
  assert seen["features"] is features


def test_weight_column_may_be_a_callable():
  head = jheads.binary_classification_head(weight_column=lambda f: f["clicks"] * 2.0)
  by_name = jheads.binary_classification_head(weight_column="w")
  logits = np.array([[1.0], [-2.0], [0.5]], np.float32)
  labels = np.array([[1.0], [0.0], [0.0]], np.float32)
  clicks = np.array([1.0, 0.0, 3.0], np.float32)
  np.testing.assert_allclose(
      head.loss_fn(logits, labels, {"clicks": clicks}),
      by_name.loss_fn(logits, labels, {"w": 2.0 * clicks}),
  )


def test_weights_never_change_predictions():
  head = jheads.binary_classification_head(weight_column="w")
  logits = np.array([[0.2], [-3.0]], np.float32)
  assert head.predict_fn(logits).keys() == jheads.binary_classification_head().predict_fn(logits).keys()


def test_regression_inverse_link():
  head = jheads.regression_head(inverse_link_fn=jnp.tanh, label_dimension=2)
  logits = np.array([[0.5, -1.0]], np.float32)
  predictions = head.predict_fn(logits)
  np.testing.assert_allclose(predictions["predictions"], np.tanh(logits), rtol=1e-6)
  np.testing.assert_array_equal(predictions["logits"], logits)
  values = metrics.compute(head.metric_fn(logits, np.zeros((1, 2), np.float32)))
  np.testing.assert_allclose(values["prediction/mean"], np.tanh(logits).mean(), rtol=1e-6)
  # The loss stays on the logits, as in TF.
  np.testing.assert_allclose(values["average_loss"], np.mean(logits**2), rtol=1e-6)


def test_binary_class_ids_agree_with_logits_sign_even_where_sigmoid_rounds_to_half():
  head = jheads.binary_classification_head()
  logits = np.array([[1e-9], [0.0], [-1e-9]], np.float32)
  np.testing.assert_array_equal(head.predict_fn(logits)["class_ids"], [[1], [0], [0]])
  stats = metrics.compute(head.metric_fn(logits, np.array([[1.0], [0.0], [0.0]], np.float32)))
  assert float(stats["accuracy"]) == 1.0


def test_named_head_suffixes_every_metric_key():
  head = jheads.multi_class_head(3, name="species")
  logits, labels = np.zeros((2, 3), np.float32), np.array([0, 1], np.int32)
  assert set(metrics.compute(head.metric_fn(logits, labels))) == {
      "average_loss/species", "accuracy/species"
  }
