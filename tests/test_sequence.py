"""sequence_head: TF's SequentialHeadWrapper vectors, masking, composition, errors."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jheads
from jheads import metrics

F32 = np.float32
MASK = "sequence_length_mask"


def test_published_loss_reduction_vector_s1():
  # sequential_head_test.py test_loss_reduction: (0.5*2.4076 + 0.2*5.5108 + 0.3*1.7413) / 3.
  head = jheads.sequence_head(jheads.multi_class_head(3, weight_column="weights"))
  logits = np.array([[[2, 3, 4], [5, -0.5, 0]], [[-1, 2, 0.5], [np.nan, np.nan, np.nan]]], F32)
  labels = np.array([[0, 1], [2, -7]])
  features = {MASK: np.array([[1, 1], [1, 0]]), "weights": np.array([[0.5, 0.2], [0.3, np.nan]], F32)}
  np.testing.assert_allclose(float(head.loss_fn(logits, labels, features)), 0.942783, rtol=1e-5)
  np.testing.assert_allclose(float(jax.jit(head.loss_fn)(logits, labels, features)), 0.942783, rtol=1e-5)


def test_published_metrics_vector_s2():
  head = jheads.sequence_head(jheads.binary_classification_head(weight_column="weights"))
  logits = np.array([[[-101], [102], [-103]], [[104], [100], [100]]], F32)
  labels = np.array([[1, 1, 1], [1, -1, -1]], F32)
  features = {
      MASK: np.array([[1, 1, 1], [1, 0, 0]]),
      "weights": np.array([[2, 5, 1], [2, 100, 100]], F32),
  }
  np.testing.assert_allclose(float(head.loss_fn(logits, labels, features)), 76.25, rtol=1e-6)
  values = metrics.compute(head.metric_fn(logits, labels, features))
  expected = {
      "average_loss": 30.5, "accuracy": 0.7, "prediction/mean": 0.7, "label/mean": 1.0,
      "precision": 1.0, "recall": 0.7, "accuracy_baseline": 1.0, "auc": 0.0,
      "auc_precision_recall": 1.0,
  }
  for key, value in expected.items():
    np.testing.assert_allclose(float(values[key]), value, rtol=1e-5, atol=1e-6, err_msg=key)


def test_published_predictions():
  head = jheads.sequence_head(jheads.binary_classification_head())
  logits = np.array([[[0.3], [-0.4]], [[0.2], [0.2]]], F32)
  np.testing.assert_allclose(
      np.asarray(head.predict_fn(logits)["logistic"]),
      [[[0.574443], [0.401312]], [[0.549834], [0.549834]]],
      rtol=1e-5,
  )


@pytest.mark.parametrize("reduction", ["sum", "sum_over_batch_size", "mean", "sum_over_nonzero_weights"])
def test_masked_steps_equal_the_flattened_real_steps(reduction):
  rng = np.random.default_rng(0)
  inner = jheads.regression_head(label_dimension=2, weight_column="w", loss_reduction=reduction)
  head = jheads.sequence_head(inner)
  logits = rng.normal(size=(3, 4, 2)).astype(F32)
  labels = rng.normal(size=(3, 4, 2)).astype(F32)
  weights = rng.uniform(0, 2, size=(3, 4)).astype(F32)
  mask = rng.random((3, 4)) < 0.6
  mask[0, 0] = True
  garbage = logits.copy()
  garbage[~mask] = np.inf
  features = {MASK: mask, "w": np.where(mask, weights, np.nan).astype(F32)}
  loss, grads = jax.value_and_grad(head.loss_fn)(garbage, np.where(mask[..., None], labels, np.nan), features)
  expected, expected_grads = jax.value_and_grad(inner.loss_fn)(logits[mask], labels[mask], {"w": weights[mask]})
  np.testing.assert_allclose(float(loss), float(expected), rtol=1e-6)
  np.testing.assert_allclose(np.asarray(grads)[mask], np.asarray(expected_grads), rtol=1e-5, atol=1e-7)
  assert np.all(np.asarray(grads)[~mask] == 0)


def test_all_steps_masked_gives_zero_loss():
  head = jheads.sequence_head(jheads.binary_classification_head())
  features = {MASK: np.zeros((2, 3), bool)}
  assert float(head.loss_fn(np.zeros((2, 3, 1), F32), np.zeros((2, 3), F32), features)) == 0.0
  values = metrics.compute(head.metric_fn(np.zeros((2, 3, 1), F32), np.zeros((2, 3), F32), features))
  assert all(np.isfinite(float(v)) for v in values.values())


def test_in_a_multi_head_with_a_ranking_head_and_split_logits():
  click = jheads.sequence_head(jheads.binary_classification_head(name="click"), mask_column="items")
  dwell = jheads.sequence_head(jheads.regression_head(name="dwell"), mask_column="items")
  head = jheads.multi_head([click, dwell], head_weights=[1.0, 0.5])
  rng = np.random.default_rng(1)
  logits = rng.normal(size=(2, 3, 2)).astype(F32)
  labels = {"click": rng.integers(0, 2, (2, 3)).astype(F32), "dwell": rng.normal(size=(2, 3)).astype(F32)}
  items = np.array([[1, 1, 0], [1, 0, 0]], bool)
  features = {"items": items}
  total, losses = head.losses_fn(logits, labels, features)
  np.testing.assert_allclose(
      float(losses["click"]),
      float(jheads.binary_classification_head().loss_fn(logits[items][:, :1], labels["click"][items])),
      rtol=1e-6,
  )
  np.testing.assert_allclose(float(total), float(losses["click"] + 0.5 * losses["dwell"]), rtol=1e-6)
  # Dict logits agree with the split array.
  dict_total = head.loss_fn({"click": logits[..., :1], "dwell": logits[..., 1:]}, labels, features)
  np.testing.assert_allclose(float(dict_total), float(total), rtol=1e-6)
  ranked = jheads.multi_head([jheads.ranking_head(name="rank"), click])
  out = ranked.loss_fn(
      {"rank": logits[..., 0], "click": logits[..., :1]},
      {"rank": np.where(items, labels["click"], -1), "click": labels["click"]},
      features,
  )
  assert np.isfinite(float(out))


def test_a_multi_head_wraps_each_head():
  inner = jheads.multi_head([jheads.binary_classification_head(name="a"), jheads.regression_head(name="b")], [1.0, 2.0])
  head = jheads.sequence_head(inner)
  assert isinstance(head, jheads.MultiHead) and head.head_weights == (1.0, 2.0)
  assert all(h.config.mask_column == MASK for h in head.heads)


def test_errors_name_the_head():
  head = jheads.sequence_head(jheads.binary_classification_head(name="click"))
  with pytest.raises(ValueError, match=r"head 'click': mask_column 'sequence_length_mask' is missing from features \(keys: \['x'\]\)"):
    head.loss_fn(np.zeros((2, 3, 1), F32), np.zeros((2, 3), F32), {"x": 1})
  with pytest.raises(ValueError, match=r"head 'click': sequence logits must be \[B, T, ..., d\]"):
    head.loss_fn(np.zeros((2, 1), F32), np.zeros(2, F32), {MASK: np.ones(2, bool)})
  with pytest.raises(ValueError, match=r"head 'click': the sequence mask must be \[B, T\]"):
    head.loss_fn(np.zeros((2, 3, 1), F32), np.zeros((2, 3), F32), {MASK: np.ones(2, bool)})
  with pytest.raises(ValueError, match=r"head 'click': the mask must hold only 0 and 1"):
    head.loss_fn(np.zeros((2, 3, 1), F32), np.zeros((2, 3), F32), {MASK: np.full((2, 3), 2)})
  with pytest.raises(ValueError, match=r"head 'click': labels must be in \[0, 1\]"):
    head.loss_fn(np.zeros((1, 2, 1), F32), np.array([[2.0, 0.0]], F32), {MASK: np.array([[1, 1]])})
  with pytest.raises(ValueError, match=r"must be a jheads head"):
    jheads.sequence_head("click")
  with pytest.raises(ValueError, match=r"mask_column must be a features key"):
    jheads.sequence_head(jheads.regression_head(), mask_column=3)
