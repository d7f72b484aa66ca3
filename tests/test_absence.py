"""Missing labels and masks: an absent element is as if it were not in the batch.

Every test compares a batch with absent elements (NaN or -1 labels, masked
rows holding garbage) against the same batch with those elements removed:
the loss under every reduction, its gradient, and every metric.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jheads
from jheads import metrics
from tests.cases import CASES

F32 = np.float32
REDUCTIONS = ["sum", "sum_over_batch_size", "mean", "sum_over_nonzero_weights"]
BATCH = 12
# Every reduction on three cases that cover per-row, per-class and per-logit weights;
# the full cross product of cases and reductions is `-m slow`.
_EVERY_REDUCTION = ("binary_thresholds_weighted", "multi_label_class_metrics", "regression_3d_per_logit_weights")
CASE_REDUCTIONS = [
    pytest.param(case, reduction, id=f"{case.id}-{reduction}",
                 marks=() if case.id in _EVERY_REDUCTION or reduction == "mean" else pytest.mark.slow)
    for case in CASES for reduction in REDUCTIONS
]


def _missing_value(case):
  return -1 if case.id.startswith("multi_class") else float("nan")


def _drop(rng, n=BATCH):
  dropped = rng.random(n) < 0.4
  dropped[0] = True
  dropped[1] = False
  return dropped


def _evaluate(head, logits, labels, features):
  loss, grads = jax.value_and_grad(head.loss_fn)(logits, labels, features)
  values = metrics.compute(head.metric_fn(logits, labels, features))
  return float(loss), np.asarray(grads), {k: float(v) for k, v in values.items()}


def _assert_values_equal(got, expected):
  assert got.keys() == expected.keys()
  for key in expected:
    np.testing.assert_allclose(got[key], expected[key], rtol=1e-5, atol=1e-6, err_msg=key)


def _row_inputs(case, reduction, rng):
  head_kwargs = dict(loss_reduction=reduction)
  plain = case.head(**head_kwargs)
  logits, labels, features = case.inputs(plain, rng, (BATCH,))
  return logits, labels, features


@pytest.mark.parametrize("case, reduction", CASE_REDUCTIONS)
def test_missing_labels_equal_dropped_rows(case, reduction):
  rng = np.random.default_rng(abs(hash((case.id, reduction))) % 2**32)
  logits, labels, features = _row_inputs(case, reduction, rng)
  dropped = _drop(rng)
  missing = _missing_value(case)
  head = case.head(loss_reduction=reduction, missing_label=missing)
  reference = case.head(loss_reduction=reduction)

  bad_labels = np.array(labels, dtype=np.int32 if missing == -1 else F32)
  bad_labels[dropped] = missing
  expected_loss, expected_grads, expected_values = _evaluate(
      reference,
      logits[~dropped],
      labels[~dropped],
      None if features is None else {"w": features["w"][~dropped]},
  )
  jitted = jax.jit(jax.value_and_grad(head.loss_fn))
  for fn in (lambda *a: _evaluate(head, *a)[:2], jitted):
    loss, grads = fn(logits, bad_labels, features)
    grads = np.asarray(grads)
    np.testing.assert_allclose(float(loss), expected_loss, rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(grads[~dropped], expected_grads, rtol=1e-5, atol=1e-7)
    assert np.all(grads[dropped] == 0)
  _assert_values_equal(_evaluate(head, logits, bad_labels, features)[2], expected_values)


@pytest.mark.parametrize("case, reduction", CASE_REDUCTIONS)
def test_masked_rows_equal_dropped_rows_whatever_they_hold(case, reduction):
  rng = np.random.default_rng(abs(hash((case.id, reduction, "mask"))) % 2**32)
  logits, labels, features = _row_inputs(case, reduction, rng)
  dropped = _drop(rng)
  head = case.head(loss_reduction=reduction, mask_column="keep")
  reference = case.head(loss_reduction=reduction)
  garbage_logits = logits.copy()
  garbage_logits[dropped] = np.nan
  garbage_labels = np.array(labels)
  garbage_labels[dropped] = 7 if labels.dtype.kind in "iu" else np.nan
  masked_features = {"keep": ~dropped}
  if features is not None:
    weights = features["w"].copy()
    weights[dropped] = np.nan
    masked_features["w"] = weights
  expected = _evaluate(
      reference,
      logits[~dropped],
      labels[~dropped],
      None if features is None else {"w": features["w"][~dropped]},
  )
  loss, grads, values = _evaluate(head, garbage_logits, garbage_labels, masked_features)
  np.testing.assert_allclose(loss, expected[0], rtol=1e-6, atol=1e-7)
  np.testing.assert_allclose(grads[~dropped], expected[1], rtol=1e-5, atol=1e-7)
  assert np.all(grads[dropped] == 0)
  _assert_values_equal(values, expected[2])


def test_all_labels_missing_gives_zero_loss_and_empty_statistics():
  head = jheads.binary_classification_head(missing_label=float("nan"))
  labels = np.full((4, 1), np.nan, F32)
  logits = np.ones((4, 1), F32)
  loss, grads = jax.jit(jax.value_and_grad(head.loss_fn))(logits, labels)
  assert float(loss) == 0.0 and np.all(np.asarray(grads) == 0)
  values = metrics.compute(head.metric_fn(logits, labels))
  assert all(np.isfinite(float(v)) for v in values.values())
  assert float(values["average_loss"]) == 0.0


def test_nan_labels_without_missing_label_still_raise():
  head = jheads.binary_classification_head(name="click", weight_column="w")
  with pytest.raises(ValueError, match=r"head 'click': labels must be in \[0, 1\]"):
    head.loss_fn(np.zeros((2, 1), F32), np.array([[np.nan], [1.0]], F32), {"w": np.array([0.0, 1.0], F32)})


def test_multi_label_missing_classes_are_dropped_per_element():
  head = jheads.multi_label_head(3, missing_label=-1, loss_reduction="sum")
  rng = np.random.default_rng(0)
  logits = rng.normal(size=(5, 3)).astype(F32)
  labels = rng.integers(0, 2, size=(5, 3))
  labels[0, 1] = labels[2, 0] = labels[2, 2] = -1
  present = labels != -1
  z = np.where(present, labels, 0).astype(np.float64)
  x = logits.astype(np.float64)
  cell = np.maximum(x, 0) - x * z + np.log1p(np.exp(-np.abs(x)))
  expected = np.sum(np.sum(cell * present, 1) / present.sum(1))
  np.testing.assert_allclose(float(head.loss_fn(logits, labels)), expected, rtol=1e-6)
  # The AUC over (row, class) cells equals the AUC of the present cells only.
  values = metrics.compute(head.metric_fn(logits, labels))
  cells = jheads.binary_classification_head()
  reference = metrics.compute(
      cells.metric_fn(logits[present][:, None], labels[present][:, None].astype(F32))
  )
  np.testing.assert_allclose(float(values["auc"]), float(reference["auc"]), rtol=1e-6)


def test_regression_missing_dimensions_drop_per_element():
  head = jheads.regression_head(label_dimension=2, missing_label=float("nan"))
  logits = np.array([[1.0, 2.0], [3.0, 4.0], [0.0, 1.0]], F32)
  labels = np.array([[1.5, np.nan], [2.0, 5.0], [np.nan, np.nan]], F32)
  # Present: 0.25, 1, 1 over 3 present elements.
  np.testing.assert_allclose(float(head.loss_fn(logits, labels)), 2.25 / 3, rtol=1e-6)
  grads = np.asarray(jax.grad(head.loss_fn)(logits, labels))
  assert np.all(grads[~np.isfinite(labels)] == 0) and np.all(np.isfinite(grads))


def test_multi_head_mask_combines_with_each_heads_own_mask():
  click = jheads.binary_classification_head(name="click")
  conversion = jheads.binary_classification_head(name="conversion", mask_column="clicked")
  head = jheads.multi_head([click, conversion], mask_column="real")
  rng = np.random.default_rng(1)
  logits = rng.normal(size=(8, 2)).astype(F32)
  labels = {"click": rng.integers(0, 2, 8).astype(F32), "conversion": rng.integers(0, 2, 8).astype(F32)}
  real = np.array([1, 1, 1, 1, 1, 1, 0, 0], bool)
  clicked = np.array([1, 0, 1, 1, 0, 1, 1, 0], bool)
  features = {"real": real, "clicked": clicked}
  _, losses = head.losses_fn(logits, labels, features)
  np.testing.assert_allclose(
      float(losses["click"]), float(click.loss_fn(logits[real, :1], labels["click"][real])), rtol=1e-6
  )
  both = real & clicked
  np.testing.assert_allclose(
      float(losses["conversion"]),
      float(click.loss_fn(logits[both, 1:], labels["conversion"][both])),
      rtol=1e-6,
  )


def test_mask_values_other_than_zero_and_one_raise():
  head = jheads.regression_head(name="dwell", mask_column="m")
  with pytest.raises(ValueError, match=r"head 'dwell': the mask must hold only 0 and 1"):
    head.loss_fn(np.zeros((2, 1), F32), np.zeros(2, F32), {"m": np.array([1, 2])})
  with pytest.raises(ValueError, match=r"head 'dwell': mask_column 'm' is missing from features"):
    head.loss_fn(np.zeros((2, 1), F32), np.zeros(2, F32), {})


def test_negative_weights_are_rejected():
  head = jheads.binary_classification_head(name="click", weight_column="w")
  with pytest.raises(ValueError, match=r"head 'click': weights must be >= 0"):
    head.loss_fn(np.zeros((2, 1), F32), np.ones(2, F32), {"w": np.array([1.0, -1.0], F32)})


def test_encode_labels_maps_none_and_nan_to_missing_label():
  head = jheads.multi_class_head(3, label_vocabulary=["a", "b", "c"], missing_label=-1)
  np.testing.assert_array_equal(
      jheads.encode_labels(head, np.array(["c", None, "a"], object)), [2, -1, 0]
  )
  numeric = jheads.multi_class_head(3, missing_label=-1)
  np.testing.assert_array_equal(jheads.encode_labels(numeric, np.array([1.0, np.nan])), [1, -1])
  tags = jheads.multi_label_head(2, label_vocabulary=["x", "y"], missing_label=-1)
  np.testing.assert_array_equal(jheads.encode_labels(tags, [["y"], None]), [[0, 1], [-1, -1]])
  with pytest.raises(ValueError, match="has no missing_label"):
    jheads.encode_labels(jheads.multi_class_head(3, label_vocabulary=["a", "b", "c"]), np.array(["a", None], object))


def test_padded_remainder_batch_on_eight_devices_equals_the_unpadded_batch():
  if jax.device_count() < 8:
    pytest.skip("needs 8 devices")
  from jax.sharding import AxisType, NamedSharding, PartitionSpec as P

  heads = [
      jheads.binary_classification_head(name=f"click_{r}", loss_reduction=r) for r in REDUCTIONS
  ] + [jheads.multi_class_head(3, name="topic"), jheads.regression_head(name="dwell", weight_column="w")]
  head = jheads.multi_head(heads, mask_column="real")
  rng = np.random.default_rng(3)
  n, padded = 27, 32
  logits = rng.normal(size=(padded, head.logits_dim)).astype(F32)
  labels = {h.name: rng.integers(0, 2, padded).astype(F32) for h in head.heads[:4]}
  labels["topic"] = rng.integers(0, 3, padded).astype(np.int32)
  labels["dwell"] = rng.normal(size=padded).astype(F32)
  features = {"w": rng.uniform(0, 2, padded).astype(F32), "real": np.arange(padded) < n}
  unmasked = jheads.multi_head(list(head.heads))

  def objective(head, logits, labels, features, axis_name=None):
    loss, losses = head.losses_fn(logits, labels, features, axis_name=axis_name)
    return loss, losses

  def reference():
    cut = lambda tree: jax.tree.map(lambda x: x[:n], tree)
    (loss, losses), grads = jax.value_and_grad(
        functools.partial(objective, unmasked), has_aux=True
    )(logits[:n], cut(labels), cut(features))
    stats = unmasked.metric_fn(logits[:n], cut(labels), cut(features))
    return loss, losses, np.asarray(grads), metrics.compute(stats)

  expected = reference()

  def check(loss, losses, grads, values):
    np.testing.assert_allclose(float(loss), float(expected[0]), rtol=1e-5)
    for name in expected[1]:
      np.testing.assert_allclose(float(losses[name]), float(expected[1][name]), rtol=1e-5, err_msg=name)
    grads = np.asarray(grads).reshape(padded, -1)
    np.testing.assert_allclose(grads[:n], expected[2], rtol=1e-5, atol=1e-7)
    assert np.all(grads[n:] == 0)
    for key in expected[3]:
      np.testing.assert_allclose(float(values[key]), float(expected[3][key]), rtol=1e-5, atol=1e-6, err_msg=key)

  # Sharded jit.
  mesh = jax.make_mesh((8,), ("batch",), axis_types=(AxisType.Explicit,))
  with jax.set_mesh(mesh):
    sharded = jax.device_put((logits, labels, features), NamedSharding(mesh, P("batch")))

    @jax.jit
    def step(logits, labels, features):
      (loss, losses), grads = jax.value_and_grad(
          functools.partial(objective, head), has_aux=True
      )(logits, labels, features)
      return loss, losses, grads, head.metric_fn(logits, labels, features)

    loss, losses, grads, stats = step(*sharded)
    check(loss, losses, grads, metrics.compute(jax.device_get(stats)))

  # shard_map and pmap: each shard's share, psum'd.
  def per_shard(logits, labels, features):
    (loss, losses), grads = jax.value_and_grad(
        functools.partial(objective, head, axis_name="batch"), has_aux=True
    )(logits, labels, features)
    stats = head.metric_fn(logits, labels, features, axis_name="batch")
    return jax.lax.psum((loss, losses, stats), "batch"), grads

  auto = jax.make_mesh((8,), ("batch",), axis_types=(AxisType.Auto,))
  shard_mapped = jax.jit(jax.shard_map(
      per_shard, mesh=auto, in_specs=P("batch"), out_specs=(P(), P("batch"))))
  (loss, losses, stats), grads = shard_mapped(logits, labels, features)
  check(loss, losses, grads, metrics.compute(jax.device_get(stats)))

  shards = jax.tree.map(lambda x: x.reshape((8, padded // 8) + x.shape[1:]), (logits, labels, features))
  (loss, losses, stats), grads = jax.pmap(per_shard, axis_name="batch")(*shards)
  first = lambda tree: jax.tree.map(lambda x: np.asarray(x)[0], tree)
  check(first(loss), first(losses), grads, metrics.compute(first(stats)))


# ---------------------------------------------------------------------------- numerics at scale


def test_one_call_with_2_to_the_25_predictions_in_one_bucket_gives_the_right_auc():
  n, high = 2**25, 2**21
  rng = np.random.default_rng(0)
  labels = (rng.random(n) < 0.5).astype(F32)
  labels[:high] = 1.0
  logits = np.zeros((n, 1), F32)  # probability 0.5: one bucket holds most of them
  logits[:high] = 3.0
  values = metrics.compute(jax.jit(jheads.binary_classification_head().metric_fn)(logits, labels))
  positives = labels.sum(dtype=np.float64)
  # High positives beat every negative; the rest tie with the negatives (half credit).
  expected = (high + 0.5 * (positives - high)) / positives
  np.testing.assert_allclose(float(values["auc"]), expected, rtol=1e-5)
  np.testing.assert_allclose(float(values["label/mean"]), positives / n, rtol=1e-6)


def test_streamed_counts_stay_exact_beyond_float32():
  # 2**40 examples in 2**16 batches of 2**24 rows each (the statistics, not the rows).
  batch = {"label/mean": metrics.Ratio(np.float32(2**23 + 1), np.float32(2**24))}
  total = batch
  for _ in range(16):  # doubling: 2**16 batches
    total = metrics.merge(total, total)
  assert float(total["label/mean"].denominator) == 2.0**40
  assert float(total["label/mean"].numerator) == 2.0**16 * (2**23 + 1)


def test_sigmoid_cross_entropy_is_exact_for_confident_predictions():
  x = np.arange(4.0, 20.5, 0.5)
  for z in (1.0, 0.0):
    logits = jnp.asarray(x if z == 1.0 else -x, jnp.float32)
    loss, grad = jax.value_and_grad(lambda lo: jnp.sum(jheads.base.sigmoid_cross_entropy(lo, z)))(logits)
    exact_loss = np.log1p(np.exp(-x))
    np.testing.assert_allclose(np.asarray(jheads.base.sigmoid_cross_entropy(logits, z)), exact_loss, rtol=1e-6)
    exact_grad = -np.exp(-x) / (1 + np.exp(-x)) * (1 if z == 1.0 else -1)
    np.testing.assert_allclose(np.asarray(grad), exact_grad, rtol=1e-6)


def test_a_head_weighted_zero_adds_nothing_even_with_an_infinite_loss():
  head = jheads.multi_head(
      [jheads.regression_head(name="a"), jheads.regression_head(name="b")], head_weights=[1.0, 0.0]
  )
  logits = np.zeros((2, 2), F32)
  labels = {"a": np.ones(2, F32), "b": np.full(2, 1e30, F32)}
  assert float(head.loss_fn(logits, labels)) == 1.0
  assert float(jax.jit(head.loss_fn)(logits, labels)) == 1.0


def test_thresholds_that_print_alike_or_repeat_are_rejected():
  with pytest.raises(ValueError, match=r"print alike"):
    jheads.binary_classification_head(name="c", thresholds=[0.5, 0.5000001])
  with pytest.raises(ValueError, match=r"duplicates"):
    jheads.multi_label_head(2, thresholds=[0.3, 0.3])


def test_numpy_integers_are_accepted_wherever_ints_are():
  assert jheads.multi_class_head(np.int64(3)).logits_dim == 3
  assert jheads.multi_label_head(np.int32(4), num_thresholds=np.int64(50)).logits_dim == 4
  assert jheads.regression_head(label_dimension=np.int16(2)).logits_dim == 2


def test_int64_labels_that_would_wrap_are_rejected():
  head = jheads.multi_class_head(3, name="topic")
  with pytest.raises(ValueError, match=r"head 'topic': labels must fit int32"):
    head.loss_fn(np.zeros((1, 3), F32), np.array([2**32 + 1], np.int64))


def test_float64_probabilities_are_not_capped_at_float32():
  with jax.enable_x64(True):
    head = jheads.binary_classification_head()
    logistic = head.predict_fn(jnp.array([[20.0]], jnp.float64))["logistic"]
    assert logistic.dtype == jnp.float64
    np.testing.assert_allclose(1.0 - float(logistic[0, 0]), np.exp(-20.0) / (1 + np.exp(-20.0)), rtol=1e-6)
