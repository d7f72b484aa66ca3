"""The published test vectors of spec §7 (TF 2 values from TensorFlow's own head tests)."""

import jax.numpy as jnp
import numpy as np
import pytest

import jheads
from jheads import metrics

F32 = np.float32


def computed(stats):
  return {key: float(value) for key, value in metrics.compute(stats).items()}


def assert_metrics(stats, expected, rtol=1e-5, atol=1e-5):
  values = computed(stats)
  for key, value in expected.items():
    np.testing.assert_allclose(values[key], value, rtol=rtol, atol=atol, err_msg=key)


# ---------------------------------------------------------------------------- F2


F2_LOGITS = {
    "head1": np.array([[-10.0, 10.0], [-15.0, 10.0]], np.float32),
    "head2": np.array([[20.0, -20.0, 20.0], [-30.0, 20.0, -20.0]], np.float32),
}
F2_LABELS = {
    "head1": np.array([[1, 0], [1, 1]], np.int32),
    "head2": np.array([[0, 1, 0], [1, 1, 0]], np.int32),
}
F2_SPLIT = np.array([[-10.0, 10.0, 20.0, -20.0, 20.0], [-15.0, 10.0, -30.0, 20.0, -20.0]], np.float32)


def f2_head(summation_method="interpolation", weighted=False):
  kwargs = dict(summation_method=summation_method)
  return jheads.multi_head(
      [
          jheads.multi_label_head(
              2, name="head1", weight_column="weights1" if weighted else None, **kwargs
          ),
          jheads.multi_label_head(
              3, name="head2", weight_column="weights2" if weighted else None, **kwargs
          ),
      ],
      head_weights=[1.0, 2.0],
  )


def test_f2_loss_and_metrics():
  head = f2_head()
  np.testing.assert_allclose(head.loss_fn(F2_LOGITS, F2_LABELS), 38.75, rtol=1e-5)
  assert_metrics(
      head.metric_fn(F2_LOGITS, F2_LABELS),
      {
          "loss/head1": 8.75,
          "loss/head2": 15.0,
          "average_loss/head1": 8.75,
          "average_loss/head2": 15.0,
          "auc/head1": 0.1667,
          "auc/head2": 0.3333,
          "auc_precision_recall/head1": 0.60228,
          "auc_precision_recall/head2": 0.40152,
      },
      rtol=1e-4,
      atol=1e-4,
  )


def test_f2_tf1_trapezoidal_pr_auc():
  assert_metrics(
      f2_head("trapezoidal").metric_fn(F2_LOGITS, F2_LABELS),
      {"auc_precision_recall/head1": 0.6667, "auc_precision_recall/head2": 0.5},
      atol=1e-4,
  )


@pytest.mark.parametrize("logits", [F2_LOGITS, F2_SPLIT], ids=["dict", "split"])
def test_f2_weighted(logits):
  head = f2_head(weighted=True)
  features = {
      "weights1": np.array([[1.0], [2.0]], np.float32),
      "weights2": np.array([[2.0], [3.0]], np.float32),
  }
  np.testing.assert_allclose(head.loss_fn(logits, F2_LABELS, features), 82.5, rtol=1e-5)
  losses = head.head_losses_fn(logits, F2_LABELS, features)
  np.testing.assert_allclose(losses["head1"], 12.5, rtol=1e-5)
  np.testing.assert_allclose(losses["head2"], 35.0, rtol=1e-5)


def test_f2_array_of_wrong_width_fails_to_split():
  with pytest.raises(ValueError, match=r"must be 5 \(their sum\), got 6"):
    f2_head().loss_fn(np.zeros((2, 6), np.float32), F2_LABELS)


def test_multi_head_rank3_regression():
  head = jheads.multi_head(
      [
          jheads.regression_head(label_dimension=2, name="head1"),
          jheads.regression_head(label_dimension=3, name="head2"),
      ]
  )
  logits = np.array(
      [
          [[-1.0, 1.0, 2.0, -2.0, 2.0], [-1.0, 1.0, 2.0, -2.0, 2.0]],
          [[-1.5, 1.5, -2.0, 2.0, -2.0], [-1.5, 1.5, -2.0, 2.0, -2.0]],
      ],
      np.float32,
  )
  labels = {
      "head1": np.array([[[1.0, 0.0], [1.0, 0.0]], [[1.5, 1.5], [1.5, 1.5]]], np.float32),
      "head2": np.array([[[0.0, 1.0, 0.0], [0.0, 1.0, 0.0]], [[2.0, 2.0, 0.0], [2.0, 2.0, 0.0]]], np.float32),
  }
  np.testing.assert_allclose(head.loss_fn(logits, labels), 3.5 + 6.1666667, rtol=1e-5)
  losses = head.head_losses_fn(logits, labels)
  np.testing.assert_allclose(losses["head1"], 3.5, rtol=1e-6)
  np.testing.assert_allclose(losses["head2"], 6.1666667, rtol=1e-6)


# ---------------------------------------------------------------------------- binary


BINARY_LOGITS = np.array([[45.0], [-41.0], [44.0]], np.float32)
BINARY_LABELS = np.array([[1.0], [1.0], [0.0]], np.float32)
BINARY_FEATURES = {"w": np.array([[1.0], [0.1], [1.5]], np.float32)}


def test_binary_weighted():
  head = jheads.binary_classification_head(weight_column="w")
  np.testing.assert_allclose(
      head.loss_fn(BINARY_LOGITS, BINARY_LABELS, BINARY_FEATURES), 23.366667, rtol=1e-6
  )
  assert_metrics(
      head.metric_fn(BINARY_LOGITS, BINARY_LABELS, BINARY_FEATURES),
      {
          "average_loss": 26.961538,
          "accuracy": 0.3846154,
          "precision": 0.4,
          "recall": 0.9090909,
          "prediction/mean": 0.9615385,
          "label/mean": 0.4230769,
          "accuracy_baseline": 0.5769231,
          "auc": 0.4545457,
          "auc_precision_recall": 0.4010627,
      },
  )
  summed = jheads.binary_classification_head(weight_column="w", loss_reduction="sum")
  np.testing.assert_allclose(
      summed.loss_fn(BINARY_LOGITS, BINARY_LABELS, BINARY_FEATURES), 70.1, rtol=1e-6
  )


def test_binary_thresholds():
  head = jheads.binary_classification_head(thresholds=[0.25, 0.5, 0.75])
  logits, labels = np.array([[-1.0], [1.0]], np.float32), np.array([[1], [1]], np.int32)
  np.testing.assert_allclose(head.loss_fn(logits, labels), 0.8132617, rtol=1e-6)
  expected = {"0.25": (1.0, 1.0, 1.0), "0.5": (0.5, 1.0, 0.5), "0.75": (0.0, 0.0, 0.0)}
  values = computed(head.metric_fn(logits, labels))
  for threshold, (accuracy, precision, recall) in expected.items():
    assert values[f"accuracy/positive_threshold_{threshold}"] == pytest.approx(accuracy)
    assert values[f"precision/positive_threshold_{threshold}"] == pytest.approx(precision)
    assert values[f"recall/positive_threshold_{threshold}"] == pytest.approx(recall)


def test_binary_soft_labels():
  head = jheads.binary_classification_head()
  loss = head.loss_fn(np.array([[0.5], [-0.3]], np.float32), np.array([[0.8], [0.4]], np.float32))
  np.testing.assert_allclose(loss, 0.62421611, rtol=1e-6)


def test_binary_rank3():
  head = jheads.binary_classification_head(weight_column="w")
  logits = np.array([[[10.0], [-10.0]], [[12.0], [-12.0]]], np.float32)
  labels = np.array([[[0], [0]], [[1], [1]]], np.int32)
  features = {"w": np.array([[1.0, 1.5], [2.0, 2.5]], np.float32)}
  np.testing.assert_allclose(head.loss_fn(logits, labels, features), 10.0, rtol=1e-5)
  assert_metrics(
      head.metric_fn(logits, labels, features),
      {"average_loss": 5.7142857, "accuracy": 0.5, "auc": 0.5222, "auc_precision_recall": 0.6582},
      atol=1e-4,
  )


def test_binary_predictions():
  head = jheads.binary_classification_head()
  predictions = head.predict_fn(np.array([[0.3], [-0.4]], np.float32))
  np.testing.assert_allclose(predictions["logistic"], [[0.574443], [0.401312]], rtol=1e-5)
  np.testing.assert_array_equal(predictions["class_ids"], [[1], [0]])
  vocabulary_head = jheads.binary_classification_head(label_vocabulary=["aang", "iroh"])
  decoded = jheads.decode_predictions(
      vocabulary_head, vocabulary_head.predict_fn(np.array([[1.0], [0.0]], np.float32))
  )
  np.testing.assert_array_equal(decoded["classes"], [["iroh"], ["aang"]])


# ---------------------------------------------------------------------------- multi-class


def test_multi_class_weighted():
  features = {"w": np.array([[1.0], [2.0], [3.0]], np.float32)}
  logits = np.array([[10.0, 0.0, 0.0], [0.0, 10.0, 0.0], [0.0, 0.0, 10.0]], np.float32)
  labels = np.array([[1], [2], [2]], np.int32)
  head = jheads.multi_class_head(3, weight_column="w")
  np.testing.assert_allclose(head.loss_fn(logits, labels, features), 10.0, rtol=1e-4)
  assert_metrics(head.metric_fn(logits, labels, features), {"average_loss": 5.0, "accuracy": 0.5}, rtol=1e-4)
  summed = jheads.multi_class_head(3, weight_column="w", loss_reduction="sum")
  np.testing.assert_allclose(summed.loss_fn(logits, labels, features), 30.0, rtol=1e-4)


def test_multi_class_rank3():
  head = jheads.multi_class_head(3, weight_column="w")
  logits = np.array([[[10.0, 0, 0], [12.0, 0, 0]], [[0, 10.0, 0], [0, 15.0, 0]]], np.float32)
  labels = np.array([[[0], [1]], [[1], [2]]], np.int32)
  features = {"w": np.array([[1.0, 1.5], [2.0, 2.5]], np.float32)}
  np.testing.assert_allclose(head.loss_fn(logits, labels, features), 13.875, rtol=1e-4)
  assert_metrics(
      head.metric_fn(logits, labels, features),
      {"average_loss": 7.9285714, "accuracy": 0.4285714},
      rtol=1e-4,
  )


# ---------------------------------------------------------------------------- multi-label


ML_LOGITS = np.array([[-1.0, 1.0], [-1.5, 1.5]], np.float32)
ML_LABELS = np.array([[1, 0], [1, 1]], np.int32)


def test_multi_label():
  head = jheads.multi_label_head(
      2, thresholds=[0.25, 0.5, 0.75], classes_for_class_based_metrics=[0, 1]
  )
  np.testing.assert_allclose(head.loss_fn(ML_LOGITS, ML_LABELS), 1.13233748, rtol=1e-6)
  assert_metrics(
      head.metric_fn(ML_LOGITS, ML_LABELS),
      {
          "auc": 0.3333,
          "auc_precision_recall": 0.7689,
          "accuracy/positive_threshold_0.25": 2 / 4,
          "accuracy/positive_threshold_0.5": 1 / 4,
          "accuracy/positive_threshold_0.75": 2 / 4,
          "precision/positive_threshold_0.25": 2 / 3,
          "precision/positive_threshold_0.5": 1 / 2,
          "precision/positive_threshold_0.75": 1.0,
          "recall/positive_threshold_0.25": 2 / 3,
          "recall/positive_threshold_0.5": 1 / 3,
          "recall/positive_threshold_0.75": 1 / 3,
          "probability_mean/class0": 0.22568347,
          "auc/class0": 0.0,
          "auc_precision_recall/class0": 1.0,
          "probability_mean/class1": 0.77431653,
          "auc/class1": 1.0,
          "auc_precision_recall/class1": 1.0,
      },
      atol=1e-4,
  )


def test_multi_label_class_metrics_by_name():
  head = jheads.multi_label_head(
      2, label_vocabulary=["cat", "dog"], classes_for_class_based_metrics=["dog"]
  )
  values = computed(head.metric_fn(ML_LOGITS, ML_LABELS))
  assert values["probability_mean/dog"] == pytest.approx(0.77431653, rel=1e-5)
  assert values["auc/dog"] == pytest.approx(1.0)
  assert "auc/class1" not in values


def test_multi_label_weighted():
  head = jheads.multi_label_head(2, weight_column="w")
  logits = np.array([[-10.0, 10.0], [-15.0, 10.0]], np.float32)
  features = {"w": np.array([[1.0], [2.0]], np.float32)}
  np.testing.assert_allclose(head.loss_fn(logits, ML_LABELS, features), 12.5, rtol=1e-5)
  assert_metrics(
      head.metric_fn(logits, ML_LABELS, features),
      {"average_loss": 8.3333, "auc": 0.2, "auc_precision_recall": 0.7280},
      atol=1e-4,
  )
  summed = jheads.multi_label_head(2, weight_column="w", loss_reduction="sum")
  np.testing.assert_allclose(summed.loss_fn(logits, ML_LABELS, features), 25.0, rtol=1e-5)


# ---------------------------------------------------------------------------- regression


REG_LOGITS = np.array([[45.0], [41.0], [44.0]], np.float32)
REG_LABELS = np.array([[35.0], [42.0], [45.0]], np.float32)
REG_WEIGHTS = np.array([[1.0], [0.1], [1.5]], np.float32)


def test_regression_weighted():
  head = jheads.regression_head(weight_column="w")
  features = {"w": REG_WEIGHTS}
  np.testing.assert_allclose(head.loss_fn(REG_LOGITS, REG_LABELS, features), 33.866667, rtol=1e-6)
  assert_metrics(head.metric_fn(REG_LOGITS, REG_LABELS, features), {"average_loss": 39.076923})
  summed = jheads.regression_head(weight_column="w", loss_reduction="sum")
  np.testing.assert_allclose(summed.loss_fn(REG_LOGITS, REG_LABELS, features), 101.6, rtol=1e-6)


def test_regression_streamed_one_example_per_batch():
  head = jheads.regression_head(weight_column="w")
  stats = None
  for i in range(3):
    batch = head.metric_fn(REG_LOGITS[i : i + 1], REG_LABELS[i : i + 1], {"w": REG_WEIGHTS[i : i + 1]})
    stats = batch if stats is None else metrics.merge(stats, batch)
  assert_metrics(
      stats,
      {"average_loss": 39.076923, "prediction/mean": 44.26923, "label/mean": 41.03846},
  )


def test_regression_per_logit_weights():
  head = jheads.regression_head(label_dimension=3, weight_column="w")
  features = {"w": np.array([[1.0, 0.1, 1.5]], np.float32)}
  logits, labels = np.array([[45.0, 41.0, 44.0]], np.float32), np.array([[35.0, 42.0, 45.0]], np.float32)
  np.testing.assert_allclose(head.loss_fn(logits, labels, features), 33.866667, rtol=1e-6)
  assert_metrics(head.metric_fn(logits, labels, features), {"average_loss": 39.076923})


def test_regression_rank3():
  head = jheads.regression_head(label_dimension=3, weight_column="w")
  logits = np.array([[[0.0, 1, 2], [10, 11, 12]], [[20, 21, 22], [30, 31, 32]]], np.float32)
  labels = np.array([[[1.0, 2, 3], [12, 13, 14]], [[23, 24, 25], [34, 35, 36]]], np.float32)
  features = {"w": np.array([[1.0, 1.5], [2.0, 2.5]], np.float32)}
  np.testing.assert_allclose(head.loss_fn(logits, labels, features), 16.25, rtol=1e-6)


def test_poisson():
  head = jheads.poisson_regression_head()
  logits = np.array([[0.0], [-1.0], [1.0]], np.float32)
  np.testing.assert_allclose(
      head.loss_fn(logits, np.array([[1.0], [2.0], [3.0]], np.float32)), 1.8340164, rtol=1e-6
  )
  np.testing.assert_allclose(head.predict_fn(logits)["predictions"], np.exp(logits), rtol=1e-6)


def test_logistic_regression():
  head = jheads.logistic_regression_head()
  logits = np.array([[0.0], [-1.0], [1.0]], np.float32)
  labels = np.array([[0.4], [0.6], [0.8]], np.float32)
  np.testing.assert_allclose(head.loss_fn(logits, labels), 0.70655685, rtol=1e-6)
  for bad in (1.2, -0.2):
    with pytest.raises(ValueError, match=r"labels must be in \[0, 1\]"):
      head.loss_fn(logits, np.array([[0.4], [bad], [0.8]], np.float32))
  np.testing.assert_allclose(
      head.predict_fn(logits)["predictions"], 1 / (1 + np.exp(-logits)), rtol=1e-6
  )


def test_vectors_hold_under_jit():
  head = jheads.binary_classification_head(weight_column="w")
  import jax  # Local: the rest of this file is deliberately eager.

  stats = jax.jit(head.metric_fn)(jnp.asarray(BINARY_LOGITS), jnp.asarray(BINARY_LABELS), BINARY_FEATURES)
  assert_metrics(stats, {"auc": 0.4545457, "auc_precision_recall": 0.4010627, "precision": 0.4})


def test_probabilities_round_as_tensorflow_does_on_thresholds_and_bucket_edges():
  """Probabilities exactly on a threshold or an AUC bucket edge land where TF puts them."""
  head = jheads.binary_classification_head(thresholds=[0.75])
  on_threshold = np.array([[1.0986123]], F32)  # float32 log(3): TF's sigmoid gives exactly 0.75.
  np.testing.assert_array_equal(head.predict_fn(on_threshold)["logistic"], [[0.75]])
  values = computed(head.metric_fn(on_threshold, np.ones((1, 1), F32)))
  assert values["recall/positive_threshold_0.75"] == 0.0
  # -3.8867052 gives exactly 4/199 in TF, an AUC bucket edge (TF 2.15: auc 0.25, PR 0.35860).
  logits = np.array([[-3.0], [-3.8867052], [-3.8867052], [-3.9]], F32)
  labels = np.array([[0.0], [1.0], [0.0], [1.0]], F32)
  assert_metrics(head.metric_fn(logits, labels), {"auc": 0.25, "auc_precision_recall": 0.35860})
