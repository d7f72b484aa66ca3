"""Metrics chosen by name (`metrics=`): values against scikit-learn, streaming, psum, masks,
errors, the default set unchanged, cost only for what is chosen, and grouping in a multi_head."""

import functools

import jax
import jax.extend
import jax.numpy as jnp
import numpy as np
import pytest

import jheads
from jheads import metrics

skm = pytest.importorskip("sklearn.metrics")
from sklearn.calibration import calibration_curve  # noqa: E402

EXACT = dict(rtol=1e-6, atol=1e-7)

BINARY_NEW = ["normalized_entropy", "calibration", "ece", "ece@15"]
N_CLASSES = 6
MULTI_CLASS_NEW = (
    ["accuracy@1", "accuracy@3", "accuracy@5", "f1_macro", "f1_weighted"]
    + [f"precision/class{c}" for c in range(N_CLASSES)]
    + [f"recall/class{c}" for c in range(N_CLASSES)]
)
N_LABELS = 5
MULTI_LABEL_NEW = (
    ["f1_macro", "f1_weighted"]
    + [f"precision/class{c}" for c in range(N_LABELS)]
    + [f"recall/class{c}" for c in range(N_LABELS)]
)
REGRESSION_NEW = ["mae", "rmse", "r2", "mape"]


def compute(head, logits, labels, features=None):
  return metrics.compute(_jitted(head)(logits, labels, features))


@functools.lru_cache(maxsize=None)
def _jitted(head):
  return jax.jit(head.metric_fn)


def sigmoid64(logits):
  return 1.0 / (1.0 + np.exp(-np.asarray(logits, np.float64)))


def binary_entropy(p):
  return -(p * np.log(p) + (1 - p) * np.log(1 - p))


def binary_data(rng, n=1000):
  logits = (1.5 * rng.normal(size=(n, 1))).astype(np.float32)
  labels = (rng.random((n, 1)) < sigmoid64(logits + 0.3)).astype(np.float32)
  weights = rng.uniform(0.1, 2.0, size=n).astype(np.float32)
  return logits, labels, weights


def multi_class_data(rng, n=1500, n_classes=N_CLASSES):
  logits = (1.5 * rng.normal(size=(n, n_classes))).astype(np.float32)
  labels = rng.integers(0, n_classes, size=n).astype(np.int32)
  logits[np.arange(n), labels] += 1.0  # better than chance
  weights = rng.uniform(0.1, 2.0, size=n).astype(np.float32)
  return logits, labels, weights


def multi_label_data(rng, n=1200, n_classes=N_LABELS):
  logits = (1.5 * rng.normal(size=(n, n_classes))).astype(np.float32)
  labels = (rng.random((n, n_classes)) < sigmoid64(logits)).astype(np.int32)
  weights = rng.uniform(0.1, 2.0, size=n).astype(np.float32)
  return logits, labels, weights


def regression_data(rng, n=1000, d=1):
  labels = (rng.normal(size=(n, d)) * [1.0, 3.0, 0.5][:d] + [2.0, -1.0, 0.0][:d]).astype(np.float32)
  logits = (labels + rng.normal(size=(n, d))).astype(np.float32)
  weights = rng.uniform(0.1, 2.0, size=n).astype(np.float32)
  return logits, labels, weights


def reference_ece(p, y, w, bins):
  """ECE with scikit-learn's calibration_curve bins: b holds (b/B, (b+1)/B]."""
  ids = np.searchsorted(np.linspace(0.0, 1.0, bins + 1)[1:-1], p)
  gap = 0.0
  for b in range(bins):
    sel = ids == b
    gap += abs(np.sum(w[sel] * p[sel]) - np.sum(w[sel] * y[sel]))
  return gap / np.sum(w)


# ----------------------------------------------------------------------------
# Against scikit-learn.


def test_binary_metrics_match_sklearn():
  logits, labels, weights = binary_data(np.random.default_rng(0))
  head = jheads.binary_classification_head(
      weight_column="w", metrics=BINARY_NEW + ["accuracy", "precision", "recall"]
  )
  got = compute(head, logits, labels, {"w": weights})
  assert sorted(got) == sorted(BINARY_NEW + ["accuracy", "precision", "recall"])
  y, w = labels[:, 0].astype(np.float64), weights.astype(np.float64)
  p64 = sigmoid64(logits[:, 0])
  p32 = np.asarray(head.predict_fn(logits)["logistic"][:, 0], np.float64)
  mean_label = np.average(y, weights=w)
  np.testing.assert_allclose(
      got["normalized_entropy"],
      skm.log_loss(y, p64, sample_weight=w) / binary_entropy(mean_label),
      rtol=2e-6,
  )
  np.testing.assert_allclose(got["calibration"], np.average(p64, weights=w) / mean_label, rtol=2e-6)
  np.testing.assert_allclose(got["ece"], reference_ece(p32, y, w, 10), **EXACT)
  np.testing.assert_allclose(got["ece@15"], reference_ece(p32, y, w, 15), **EXACT)
  decided = (logits[:, 0] > 0).astype(np.float64)
  np.testing.assert_allclose(got["accuracy"], skm.accuracy_score(y, decided, sample_weight=w), **EXACT)
  np.testing.assert_allclose(got["precision"], skm.precision_score(y, decided, sample_weight=w), **EXACT)
  np.testing.assert_allclose(got["recall"], skm.recall_score(y, decided, sample_weight=w), **EXACT)
  assert 0.5 < got["normalized_entropy"] < 1.0  # informative logits beat the base rate


@pytest.mark.parametrize("bins", [10, 15])
def test_unweighted_ece_matches_sklearn_calibration_curve(bins):
  logits, labels, _ = binary_data(np.random.default_rng(1))
  key = "ece" if bins == 10 else f"ece@{bins}"
  head = jheads.binary_classification_head(metrics=[key])
  got = compute(head, logits, labels)[key]
  y = labels[:, 0]
  p = np.asarray(head.predict_fn(logits)["logistic"][:, 0], np.float64)
  prob_true, prob_pred = calibration_curve(y, p, n_bins=bins, strategy="uniform")
  counts = np.bincount(np.searchsorted(np.linspace(0, 1, bins + 1)[1:-1], p), minlength=bins)
  counts = counts[counts > 0]
  np.testing.assert_allclose(got, np.sum(counts / y.size * np.abs(prob_true - prob_pred)), **EXACT)


def test_multi_class_metrics_match_sklearn():
  logits, labels, weights = multi_class_data(np.random.default_rng(2))
  head = jheads.multi_class_head(N_CLASSES, weight_column="w", metrics=["accuracy"] + MULTI_CLASS_NEW)
  got = compute(head, logits, labels, {"w": weights})
  w = weights.astype(np.float64)
  predicted = np.argmax(logits, axis=-1)
  for k in (1, 3, 5):
    np.testing.assert_allclose(
        got[f"accuracy@{k}"],
        skm.top_k_accuracy_score(labels, logits, k=k, sample_weight=w, labels=range(N_CLASSES)),
        **EXACT,
    )
  np.testing.assert_allclose(got["accuracy@1"], got["accuracy"], **EXACT)
  precision = skm.precision_score(labels, predicted, labels=range(N_CLASSES), average=None, sample_weight=w, zero_division=0)
  recall = skm.recall_score(labels, predicted, labels=range(N_CLASSES), average=None, sample_weight=w, zero_division=0)
  for c in range(N_CLASSES):
    np.testing.assert_allclose(got[f"precision/class{c}"], precision[c], **EXACT)
    np.testing.assert_allclose(got[f"recall/class{c}"], recall[c], **EXACT)
  for average in ("macro", "weighted"):
    np.testing.assert_allclose(
        got[f"f1_{average}"], skm.f1_score(labels, predicted, average=average, sample_weight=w), **EXACT
    )


def test_multi_class_f1_leaves_out_classes_that_never_occur_as_sklearn():
  rng = np.random.default_rng(3)
  logits, labels, weights = multi_class_data(rng, n=400)
  labels = np.minimum(labels, N_CLASSES - 3)  # the last two classes never labeled ...
  logits[:, -2:] -= 100.0  # ... nor predicted
  head = jheads.multi_class_head(N_CLASSES, weight_column="w", metrics=["f1_macro", "f1_weighted", "precision/class5"])
  got = compute(head, logits, labels, {"w": weights})
  predicted = np.argmax(logits, -1)
  assert set(np.unique(np.concatenate([labels, predicted]))) == set(range(N_CLASSES - 2))
  for average in ("macro", "weighted"):
    np.testing.assert_allclose(
        got[f"f1_{average}"], skm.f1_score(labels, predicted, average=average, sample_weight=weights), **EXACT
    )
  assert got["precision/class5"] == 0.0


def test_multi_class_vocabulary_names_the_per_class_keys():
  logits, labels, _ = multi_class_data(np.random.default_rng(4), n=200, n_classes=3)
  vocab = ["cat", "dog", "eel"]
  named = jheads.multi_class_head(3, label_vocabulary=vocab, metrics=["precision/dog", "recall/eel"])
  plain = jheads.multi_class_head(3, metrics=["precision/class1", "recall/class2"])
  got, expected = compute(named, logits, labels), compute(plain, logits, labels)
  assert sorted(got) == ["precision/dog", "recall/eel"]
  np.testing.assert_allclose(got["precision/dog"], expected["precision/class1"], **EXACT)
  np.testing.assert_allclose(got["recall/eel"], expected["recall/class2"], **EXACT)


def test_multi_label_metrics_match_sklearn():
  logits, labels, weights = multi_label_data(np.random.default_rng(5))
  head = jheads.multi_label_head(N_LABELS, weight_column="w", metrics=MULTI_LABEL_NEW)
  got = compute(head, logits, labels, {"w": weights})
  decided = (np.asarray(head.predict_fn(logits)["probabilities"]) > 0.5).astype(np.int32)
  w = weights.astype(np.float64)
  precision = skm.precision_score(labels, decided, average=None, sample_weight=w, zero_division=0)
  recall = skm.recall_score(labels, decided, average=None, sample_weight=w, zero_division=0)
  for c in range(N_LABELS):
    np.testing.assert_allclose(got[f"precision/class{c}"], precision[c], **EXACT)
    np.testing.assert_allclose(got[f"recall/class{c}"], recall[c], **EXACT)
  for average in ("macro", "weighted"):
    np.testing.assert_allclose(
        got[f"f1_{average}"], skm.f1_score(labels, decided, average=average, sample_weight=w), **EXACT
    )


def test_multi_label_macro_f1_leaves_out_classes_that_never_occur():
  logits, labels, weights = multi_label_data(np.random.default_rng(6), n=300)
  labels[:, 1] = 0
  logits[:, 1] = -50.0  # class 1: no positive label, no positive decision
  head = jheads.multi_label_head(N_LABELS, weight_column="w", metrics=["f1_macro", "f1_weighted"])
  got = compute(head, logits, labels, {"w": weights})
  decided = (np.asarray(head.predict_fn(logits)["probabilities"]) > 0.5).astype(np.int32)
  occurring = [0, 2, 3, 4]
  for average in ("macro", "weighted"):
    np.testing.assert_allclose(
        got[f"f1_{average}"],
        skm.f1_score(labels, decided, average=average, sample_weight=weights, labels=occurring),
        **EXACT,
    )


@pytest.mark.parametrize("d", [1, 3])
def test_regression_metrics_match_sklearn(d):
  logits, labels, weights = regression_data(np.random.default_rng(7 + d), d=d)
  labels[:3] = 0.0  # MAPE divides these by 2.2e-16, as scikit-learn does
  head = jheads.regression_head(label_dimension=d, weight_column="w", metrics=REGRESSION_NEW)
  got = compute(head, logits, labels, {"w": weights})
  assert sorted(got) == sorted(REGRESSION_NEW)
  y, p, w = (np.asarray(x, np.float64) for x in (labels, logits, weights))
  np.testing.assert_allclose(got["mae"], skm.mean_absolute_error(y, p, sample_weight=w), **EXACT)
  np.testing.assert_allclose(got["rmse"], skm.root_mean_squared_error(y, p, sample_weight=w), **EXACT)
  np.testing.assert_allclose(got["r2"], skm.r2_score(y, p, sample_weight=w), rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(
      got["mape"], skm.mean_absolute_percentage_error(y, p, sample_weight=w), rtol=1e-5
  )
  assert got["mape"] > 1e12  # the zero labels dominate, as in scikit-learn


def test_poisson_metrics_are_of_the_predicted_rates():
  rng = np.random.default_rng(9)
  logits = rng.normal(size=(500, 1)).astype(np.float32)
  labels = rng.poisson(np.exp(logits)).astype(np.float32)
  head = jheads.poisson_regression_head(metrics=["mae", "rmse", "r2"])
  got = compute(head, logits, labels)
  rate = np.exp(logits.astype(np.float64))
  np.testing.assert_allclose(got["mae"], skm.mean_absolute_error(labels, rate), rtol=1e-5)
  np.testing.assert_allclose(got["rmse"], skm.root_mean_squared_error(labels, rate), rtol=1e-5)
  np.testing.assert_allclose(got["r2"], skm.r2_score(labels, rate), rtol=1e-5)


def test_regression_per_logit_weights_and_constant_labels():
  rng = np.random.default_rng(10)
  logits, labels, _ = regression_data(rng, n=300, d=3)
  cell_weights = rng.uniform(0.0, 2.0, size=(300, 3)).astype(np.float32)
  labels[:, 2] = 2.0  # constant: R^2 is 0 with errors (scikit-learn's force_finite)
  head = jheads.regression_head(label_dimension=3, weight_column="w", metrics=REGRESSION_NEW)
  got = compute(head, logits, labels, {"w": cell_weights})
  columns = [
      {
          "mae": skm.mean_absolute_error(labels[:, j], logits[:, j], sample_weight=cell_weights[:, j]),
          "rmse": skm.root_mean_squared_error(labels[:, j], logits[:, j], sample_weight=cell_weights[:, j]),
          "r2": skm.r2_score(labels[:, j], logits[:, j], sample_weight=cell_weights[:, j]),
          "mape": skm.mean_absolute_percentage_error(labels[:, j], logits[:, j], sample_weight=cell_weights[:, j]),
      }
      for j in range(3)
  ]
  assert columns[2]["r2"] == 0.0
  for key in REGRESSION_NEW:
    np.testing.assert_allclose(got[key], np.mean([c[key] for c in columns]), rtol=1e-5, err_msg=key)
  exact = jheads.regression_head(metrics=["r2"])
  assert compute(exact, np.full((4, 1), 2.0, np.float32), np.full((4, 1), 2.0, np.float32))["r2"] == 1.0


# ----------------------------------------------------------------------------
# Streaming, psum, jit, masks.


def all_new_heads():
  """(head, logits, labels, features) with every new metric, weighted."""
  rng = np.random.default_rng(11)
  n = 64
  logits, labels, w = binary_data(rng, n)
  yield jheads.binary_classification_head(weight_column="w", metrics=BINARY_NEW), logits, labels, {"w": w}
  logits, labels, w = multi_class_data(rng, n)
  yield jheads.multi_class_head(N_CLASSES, weight_column="w", metrics=MULTI_CLASS_NEW), logits, labels, {"w": w}
  logits, labels, w = multi_label_data(rng, n)
  yield jheads.multi_label_head(N_LABELS, weight_column="w", metrics=MULTI_LABEL_NEW), logits, labels, {"w": w}
  logits, labels, w = regression_data(rng, n, d=3)
  yield jheads.regression_head(label_dimension=3, weight_column="w", metrics=REGRESSION_NEW), logits, labels, {"w": w}


HEADS = list(all_new_heads())
HEAD_IDS = ["binary", "multi_class", "multi_label", "regression"]


def assert_same_values(got, expected, rtol=1e-6):
  assert sorted(got) == sorted(expected)
  for key in expected:
    np.testing.assert_allclose(got[key], expected[key], rtol=rtol, atol=1e-6, err_msg=key)


@pytest.mark.parametrize("index", range(4), ids=HEAD_IDS)
def test_streaming_equals_one_shot(index):
  head, logits, labels, features = HEADS[index]
  fn = _jitted(head)
  one_shot = fn(logits, labels, features)
  streamed = None
  for sl in (slice(0, 16), slice(16, 48), slice(48, 64)):
    part = fn(logits[sl], labels[sl], {"w": features["w"][sl]})
    streamed = part if streamed is None else metrics.merge(streamed, part)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5), streamed, one_shot)
  assert_same_values(metrics.compute(streamed), metrics.compute(one_shot))
  # result() works on the device too, under jit.
  on_device = jax.jit(metrics.compute)(one_shot)
  assert_same_values({k: np.asarray(v) for k, v in on_device.items()}, metrics.compute(one_shot), rtol=1e-5)


@pytest.mark.parametrize("index", range(4), ids=HEAD_IDS)
def test_psum_over_eight_devices_equals_one_device(index):
  head, logits, labels, features = HEADS[index]
  shard = lambda x: x.reshape((8, -1) + x.shape[1:])
  summed = jax.pmap(
      lambda lo, la, w: jax.lax.psum(head.metric_fn(lo, la, {"w": w}), "d"), axis_name="d"
  )(shard(logits), shard(labels), shard(features["w"]))
  first = jax.tree.map(lambda x: x[0], summed)
  assert_same_values(metrics.compute(first), compute(head, logits, labels, features), rtol=1e-5)


def test_masks_and_missing_labels_equal_dropped_rows():
  rng = np.random.default_rng(12)
  n = 60
  keep = rng.random(n) < 0.6
  masked = rng.random(n) < 0.2
  missing = ~keep & ~masked
  keep &= ~masked
  mask = ~masked
  cases = []
  logits, labels, w = binary_data(rng, n)
  cases.append((lambda **kw: jheads.binary_classification_head(missing_label=float("nan"), metrics=BINARY_NEW + ["auc"], **kw), logits, labels, np.nan))
  logits, labels, w = multi_class_data(rng, n)
  cases.append((lambda **kw: jheads.multi_class_head(N_CLASSES, missing_label=-1, metrics=MULTI_CLASS_NEW, **kw), logits, labels, -1))
  logits, labels, w = regression_data(rng, n, d=1)
  cases.append((lambda **kw: jheads.regression_head(missing_label=float("nan"), metrics=REGRESSION_NEW, **kw), logits, labels, np.nan))
  for make, logits, labels, missing_value in cases:
    labels = labels.astype(labels.dtype).copy()
    labels[missing] = missing_value
    logits = logits.copy()
    logits[masked] = np.nan  # never read
    head = make(weight_column="w", mask_column="m")
    got = compute(head, logits, labels, {"w": w, "m": mask})
    dropped = compute(make(weight_column="w"), logits[keep], labels[keep], {"w": w[keep]})
    assert_same_values(got, dropped, rtol=1e-5)


def test_multi_label_missing_cells_are_left_out():
  rng = np.random.default_rng(13)
  logits, labels, w = multi_label_data(rng, n=200)
  missing = rng.random(labels.shape) < 0.2
  with_missing = np.where(missing, -1, labels).astype(np.int32)
  head = jheads.multi_label_head(N_LABELS, weight_column="w", missing_label=-1, metrics=MULTI_LABEL_NEW)
  got = compute(head, logits, with_missing, {"w": w})
  decided = np.asarray(head.predict_fn(logits)["probabilities"]) > 0.5
  cell_w = np.where(missing, 0.0, w[:, None])
  tp = np.sum(cell_w * decided * labels, 0)
  predicted, actual = np.sum(cell_w * decided, 0), np.sum(cell_w * labels, 0)
  f1 = 2 * tp / (predicted + actual)
  for c in range(N_LABELS):
    np.testing.assert_allclose(got[f"precision/class{c}"], tp[c] / predicted[c], **EXACT)
    np.testing.assert_allclose(got[f"recall/class{c}"], tp[c] / actual[c], **EXACT)
  np.testing.assert_allclose(got["f1_macro"], np.mean(f1), **EXACT)
  np.testing.assert_allclose(got["f1_weighted"], np.sum(actual * f1) / np.sum(actual), **EXACT)


# ----------------------------------------------------------------------------
# Names.


@pytest.mark.parametrize(
    "make, match",
    [
        (lambda: jheads.binary_classification_head(name="ctr", metrics=["auc", "logloss"]),
         r"head 'ctr': unknown metric 'logloss'; expected one of 'average_loss', .*'normalized_entropy', 'calibration', 'ece', ece@<bins>, accuracy/positive_threshold_<t>"),
        (lambda: jheads.binary_classification_head(metrics=["ece@0"]), r"binary_classification_head: metric 'ece@0': the bins after '@' must be a positive integer"),
        (lambda: jheads.binary_classification_head(metrics=["ece@x"]), r"the bins after '@' must be a positive integer"),
        (lambda: jheads.binary_classification_head(metrics=["accuracy@2"]), r"unknown metric 'accuracy@2'"),
        (lambda: jheads.binary_classification_head(metrics=["auc", "auc"]), r"metric 'auc' is listed twice"),
        (lambda: jheads.binary_classification_head(metrics="auc"), r"metrics must be a list or tuple of metric names"),
        (lambda: jheads.binary_classification_head(metrics=[3]), r"metrics must be strings, got 3"),
        (lambda: jheads.binary_classification_head(metrics=["precision/positive_threshold_1.5"]), r"the threshold must be a number in \(0, 1\)"),
        (lambda: jheads.binary_classification_head(metrics=["precision/positive_threshold_0.50"]), r"write the threshold as %g prints it, 'precision/positive_threshold_0.5'"),
        (lambda: jheads.binary_classification_head(thresholds=[0.7], metrics=["auc"]), r"thresholds sets keys of the default metrics; with metrics=, name them in metrics instead \(e.g. 'precision/positive_threshold_0.7'\)"),
        (lambda: jheads.multi_class_head(6, name="topic", metrics=["accuracy@6"]), r"head 'topic': metric 'accuracy@6': k must be below 6 \(the number of classes\)"),
        (lambda: jheads.multi_class_head(6, metrics=["precision/class6"]), r"per-class metrics are written 'precision/class<c>' with c in \[0, 6\)"),
        (lambda: jheads.multi_class_head(3, label_vocabulary=["a", "b", "c"], metrics=["recall/class0"]), r"'class0' is not in label_vocabulary \['a', 'b', 'c'\]"),
        (lambda: jheads.multi_class_head(3, metrics=["auc"]), r"multi_class_head: unknown metric 'auc'; expected one of 'average_loss', 'accuracy', 'f1_macro', 'f1_weighted', accuracy@<k>, precision/class<c> \(c < 3\), recall/class<c> \(c < 3\)\."),
        (lambda: jheads.multi_label_head(3, metrics=["normalized_entropy"]), r"multi_label_head: unknown metric 'normalized_entropy'; expected one of .*'f1_macro'.*probability_mean/class<c> \(c < 3\)"),
        (lambda: jheads.multi_label_head(3, classes_for_class_based_metrics=[1], metrics=["auc"]), r"classes_for_class_based_metrics sets keys of the default metrics; .*\(e.g. 'auc/class0'\)"),
        (lambda: jheads.regression_head(name="price", metrics=["mse"]), r"head 'price': unknown metric 'mse'; expected one of 'average_loss', 'prediction/mean', 'label/mean', 'mae', 'rmse', 'r2', 'mape'\."),
        (lambda: jheads.poisson_regression_head(metrics=["auc"]), r"poisson_regression_head: unknown metric 'auc'"),
        (lambda: jheads.logistic_regression_head(metrics=["auc"]), r"logistic_regression_head: unknown metric 'auc'"),
    ],
)
def test_bad_metric_names_are_errors(make, match):
  with pytest.raises(ValueError, match=match):
    make()


def test_threshold_and_per_class_names_parse_any_threshold_and_class():
  rng = np.random.default_rng(14)
  logits, labels, _ = multi_label_data(rng, n=100, n_classes=3)
  chosen = jheads.multi_label_head(
      3, metrics=["recall/positive_threshold_0.3", "auc/class2", "probability_mean/class0", "auc_precision_recall/class2"]
  )
  default = jheads.multi_label_head(3, thresholds=[0.3], classes_for_class_based_metrics=[2, 0])
  assert chosen.config.thresholds == (0.3,)
  got, expected = compute(chosen, logits, labels), compute(default, logits, labels)
  assert sorted(got) == sorted(
      ["recall/positive_threshold_0.3", "auc/class2", "probability_mean/class0", "auc_precision_recall/class2"]
  )
  for key in got:
    np.testing.assert_allclose(got[key], expected[key], **EXACT, err_msg=key)


# ----------------------------------------------------------------------------
# The default set, and what a selection costs.

DEFAULT_KEYS = {
    "binary": ["average_loss", "accuracy", "precision", "recall", "prediction/mean", "label/mean",
               "accuracy_baseline", "auc", "auc_precision_recall",
               "accuracy/positive_threshold_0.3", "precision/positive_threshold_0.3", "recall/positive_threshold_0.3"],
    "multi_class": ["average_loss", "accuracy"],
    "multi_label": ["average_loss", "auc", "auc_precision_recall",
                    "accuracy/positive_threshold_0.3", "precision/positive_threshold_0.3", "recall/positive_threshold_0.3",
                    "probability_mean/class2", "auc/class2", "auc_precision_recall/class2"],
    "regression": ["average_loss", "prediction/mean", "label/mean"],
}


def default_heads():
  return {
      "binary": (lambda **kw: jheads.binary_classification_head(**kw), dict(thresholds=[0.3]), binary_data),
      "multi_class": (lambda **kw: jheads.multi_class_head(N_CLASSES, **kw), {}, multi_class_data),
      "multi_label": (lambda **kw: jheads.multi_label_head(N_LABELS, **kw),
                      dict(thresholds=[0.3], classes_for_class_based_metrics=[2]), multi_label_data),
      "regression": (lambda **kw: jheads.regression_head(**kw), {}, regression_data),
  }


@pytest.mark.parametrize("kind", list(DEFAULT_KEYS))
def test_metrics_none_is_tf_set_and_equals_naming_it(kind):
  make, options, data = default_heads()[kind]
  logits, labels, _ = data(np.random.default_rng(15), 80)
  default = make(**options)
  named = make(metrics=DEFAULT_KEYS[kind])
  assert sorted(jax.eval_shape(default.metric_fn, logits, labels)) == sorted(DEFAULT_KEYS[kind])
  # Equal selections are one computation: the same group key, the same values.
  assert default.kernel.group_key == named.kernel.group_key
  expected = compute(default, logits, labels)
  for key, value in compute(named, logits, labels).items():
    np.testing.assert_array_equal(value, expected[key], err_msg=key)


def _primitives(jaxpr):
  for eqn in jaxpr.eqns:
    yield eqn.primitive.name
    for sub in _sub_jaxprs(eqn.params):
      yield from _primitives(sub)


def _sub_jaxprs(params):
  for value in params.values():
    for item in value if isinstance(value, (tuple, list)) else (value,):
      if isinstance(item, jax.extend.core.ClosedJaxpr):
        yield item.jaxpr
      elif isinstance(item, jax.extend.core.Jaxpr):
        yield item


def primitive_counts(head, logits, labels):
  jaxpr = jax.make_jaxpr(head.metric_fn)(jnp.asarray(logits), jnp.asarray(labels))
  names = list(_primitives(jaxpr.jaxpr))
  return {name: names.count(name) for name in set(names)}, len(names)


def test_only_chosen_metrics_are_computed():
  logits, labels, _ = binary_data(np.random.default_rng(16), 32)
  binary = lambda chosen: primitive_counts(jheads.binary_classification_head(metrics=chosen), logits, labels)
  assert binary(None)[0].get("scatter-add") == 1  # the AUC histogram: the test can see it
  counts, accuracy_size = binary(["accuracy"])
  assert "scatter-add" not in counts and "ceil" not in counts
  assert binary(["auc", "auc_precision_recall"])[0]["scatter-add"] == 1  # one shared histogram
  assert binary(["ece"])[0]["scatter-add"] == 1
  assert "scatter-add" not in binary(["normalized_entropy", "calibration", "label/mean"])[0]
  assert accuracy_size < binary(None)[1] / 3

  logits, labels, _ = multi_label_data(np.random.default_rng(17), 32)
  multi_label = lambda chosen: primitive_counts(jheads.multi_label_head(N_LABELS, metrics=chosen), logits, labels)[0]
  assert "scatter-add" not in multi_label(["precision/class0", "recall/class3", "f1_macro"])
  assert multi_label(["auc/class1", "auc_precision_recall/class1", "auc/class3"])["scatter-add"] == 1

  logits, labels, _ = multi_class_data(np.random.default_rng(18), 32)
  multi_class = lambda chosen: primitive_counts(jheads.multi_class_head(N_CLASSES, metrics=chosen), logits, labels)[0]
  assert "argmax" not in multi_class(["average_loss", "accuracy@3"])
  assert "argmax" in multi_class(["f1_macro"])


@pytest.mark.parametrize("kind", list(DEFAULT_KEYS))
def test_exactly_the_chosen_keys(kind):
  make, _, data = default_heads()[kind]
  logits, labels, _ = data(np.random.default_rng(19), 16)
  chosen = {
      "binary": ["ece@7", "auc"], "multi_class": ["recall/class1"],
      "multi_label": ["f1_weighted"], "regression": ["r2", "average_loss"],
  }[kind]
  keys = lambda **kw: sorted(jax.eval_shape(make(**kw).metric_fn, logits, labels))
  assert keys(metrics=chosen) == sorted(chosen)
  assert keys(metrics=[]) == []
  assert keys(name="h", metrics=chosen) == sorted(f"{key}/h" for key in chosen)


# ----------------------------------------------------------------------------
# In a multi_head.


def test_chosen_metrics_inside_a_multi_head_group_by_selection():
  heads = [
      jheads.binary_classification_head(name="a", metrics=["ece", "normalized_entropy"]),
      jheads.binary_classification_head(name="b", metrics=["ece", "normalized_entropy"]),
      jheads.binary_classification_head(name="c", metrics=["auc"]),
      jheads.binary_classification_head(name="d"),
      jheads.multi_class_head(N_CLASSES, name="e", metrics=["f1_macro", "accuracy@2"]),
      jheads.multi_class_head(N_CLASSES, name="f", metrics=["f1_macro", "accuracy@2"]),
      jheads.regression_head(name="g", metrics=["r2"]),
      jheads.regression_head(name="h", metrics=["mae"]),
  ]
  keys = [h.kernel.group_key for h in heads]
  assert keys[0] == keys[1] and keys[4] == keys[5]
  assert len({keys[0], keys[2], keys[3]}) == 3 and keys[6] != keys[7]
  rng = np.random.default_rng(20)
  n = 40
  logits = {h.name: rng.normal(size=(n, h.logits_dim)).astype(np.float32) for h in heads}
  labels = {}
  for h in heads:
    if h.config.kind == "binary_classification":
      labels[h.name] = rng.integers(0, 2, (n, 1)).astype(np.float32)
    elif h.config.kind == "multi_class":
      labels[h.name] = rng.integers(0, N_CLASSES, n).astype(np.int32)
    else:
      labels[h.name] = rng.normal(size=(n, 1)).astype(np.float32)
  grouped = jheads.multi_head(heads)
  alone = jheads.multi_head(heads, vectorize=False)
  got = metrics.compute(jax.jit(grouped.metric_fn)(logits, labels))
  expected = metrics.compute(jax.jit(alone.metric_fn)(logits, labels))
  assert_same_values(got, expected)
  assert sorted(k for k in got if k.endswith("/a")) == ["ece/a", "loss/a", "normalized_entropy/a"]
  assert sorted(k for k in got if k.endswith("/e")) == ["accuracy@2/e", "f1_macro/e", "loss/e"]
  assert sorted(k for k in got if k.endswith("/g")) == ["loss/g", "r2/g"]
