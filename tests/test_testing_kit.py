"""jheads.testing: the kit passes on every built-in head kind; each assertion fails on a broken head.

The built-in kinds run as one multi_head (one head per kind, from
`tests/cases.py`, plus a ranking head), so that every assertion covers every
kind with a few compilations; the broken heads are small single heads, so
the single-head path of every assertion runs too.
"""

import importlib.util
import itertools
import pathlib
import re
import unittest

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jheads
from jheads import base, checks, metrics, testing
from tests.cases import CASES

F32 = np.float32
BATCH = 8
NAN = float("nan")

# One case per built-in kind (the lighter variants: each compilation of the
# kit covers them all), with weights per example, per column and per logit.
ZOO_CASES = {
    "binary_soft": NAN,
    "multi_class_weighted": -1,
    "multi_label": -1,
    "regression_3d_per_logit_weights": NAN,
    "poisson": NAN,
    "logistic": NAN,
}


@pytest.fixture(scope="module")
def zoo():
  """Every built-in kind in one multi_head, each with a missing label; and a batch."""
  cases = [c for c in CASES if c.id in ZOO_CASES]
  rng = np.random.default_rng(0)
  heads, logits, labels, features = [], [], {}, {}
  for case in cases:
    head = case.make_head(
        name=case.id, weight_column=f"w_{case.id}" if case.weights else None,
        missing_label=ZOO_CASES[case.id],
    )
    lo, la, f = case.inputs(head, rng, (BATCH,))
    heads.append(head)
    logits.append(lo)
    labels[head.name] = la
    if f is not None:
      features[f"w_{head.name}"] = f["w"]
  ranking = jheads.ranking_head(name="ranking", list_size=4, weight_column="w_ranking",
                                metrics=("mrr",))
  lo, la, f = testing.random_inputs(ranking, rng, (BATCH,))
  heads.append(ranking)
  logits.append(lo)
  labels["ranking"] = la
  features.update(f)
  head = jheads.multi_head(heads, head_weights=np.linspace(0.5, 1.5, len(heads)))
  return head, np.concatenate(logits, axis=-1), labels, features


def test_zoo_covers_every_built_in_kind(zoo):
  head = zoo[0]
  assert {h.config.kind for h in head.heads} == {
      "binary_classification", "multi_class", "multi_label", "regression",
      "poisson_regression", "logistic_regression", "ranking",
  }


def test_eager_jit_vmap_on_every_kind(zoo):
  testing.assert_eager_jit_vmap_equal(*zoo)


def test_merge_on_every_kind(zoo):
  testing.assert_merge_equals_concatenation(*zoo, num_batches=3)


def test_grouped_on_every_kind(zoo):
  testing.assert_grouped_equals_per_head(*zoo, copies=2)


def test_finite_gradients_on_every_kind(zoo):
  # Poisson log-rates above 88.7 overflow float32; the head rejects them.
  testing.assert_finite_gradients(*zoo, magnitude={"poisson": 80.0})


def test_finite_gradients_fail_for_poisson_at_1e4(zoo):
  """exp(1e4) overflows: the check says so (the head rejects such logits eagerly)."""
  message = _failure(testing.assert_finite_gradients, *zoo)
  _expect(message, r"multi_head '.*' fails 'finite loss, gradient and metrics at large \|logits\|'",
          r"is (inf|nan) with every logit at \+-10000")


def test_sharded_on_every_kind(zoo):
  testing.assert_sharded_equals_one_device(*zoo, modes=("shard_map",))


def test_sharded_explicit_axes_on_every_kind(zoo):
  testing.assert_sharded_equals_one_device(*zoo, modes=("explicit",))


def test_absent_rows_on_every_kind(zoo):
  testing.assert_absent_rows_equal_dropped(*zoo)


def test_random_inputs_are_valid_for_every_kind():
  """Shapes, dtypes and value ranges; the kit runs on them in the example and doctests."""
  heads = {
      "binary": jheads.binary_classification_head(name="b", weight_column="w"),
      "multi_class": jheads.multi_class_head(5, name="m", mask_column="keep"),
      "multi_label": jheads.multi_label_head(3, name="l"),
      "regression": jheads.regression_head(name="r", label_dimension=2),
      "poisson": jheads.poisson_regression_head(name="p"),
      "logistic": jheads.logistic_regression_head(name="g"),
      "ranking": jheads.ranking_head(name="k"),
  }
  head = jheads.multi_head(list(heads.values()))
  logits, labels, features = testing.random_inputs(head, 3, (6,), list_size=4)
  assert isinstance(logits, dict) and logits["k"].shape == (6, 4)  # the ranking head is unsized
  assert set(features) == {"w", "keep"}
  assert features["keep"].dtype == bool and features["keep"][0]
  assert np.all(features["w"] >= 0) and features["w"].shape == (6,)
  assert set(np.unique(labels["b"])) <= {0.0, 1.0} and labels["b"].shape == (6, 1)
  assert labels["m"].dtype == np.int32 and labels["m"].min() >= 0 and labels["m"].max() < 5
  assert set(np.unique(labels["l"])) <= {0, 1} and labels["l"].shape == (6, 3)
  assert labels["r"].shape == (6, 2) and labels["p"].min() >= 0
  assert np.all((labels["g"] >= 0) & (labels["g"] <= 1))
  rank = labels["k"]
  assert set(np.unique(rank)) <= {-1.0, 0.0, 1.0, 2.0} and np.all((rank >= 0).any(axis=-1))
  for h in head.heads:  # The heads' own shape checks accept them.
    h.kernel.validate(logits[h.name], labels[h.name], h.kernel.get_weights(features))
  with pytest.raises(ValueError, match=r"random_inputs.*kind 'quantile'.*draw"):
    testing.random_inputs(
        jheads.define_head("quantile", logits_dim=1, loss=lambda lo, la: lo - la,
                           predictions=lambda lo: {"q": lo}))
  with pytest.raises(ValueError, match="callable weight_column"):
    testing.random_inputs(jheads.regression_head(weight_column=lambda f: f["x"]))


# ----------------------------------------------------------------------------
# Each assertion fails on a head broken in the way it guards against.


def _failure(assertion, *args, **kwargs):
  with pytest.raises(AssertionError) as info:
    assertion(*args, **kwargs)
  return str(info.value)


def _expect(message, *patterns):
  for pattern in patterns:
    assert re.search(pattern, message), f"{pattern!r} not in: {message}"


def _regression_inputs(rng=0, batch=BATCH, labels=None):
  rng = np.random.default_rng(rng)
  logits = rng.normal(size=(batch, 1)).astype(F32)
  if labels is None:
    labels = rng.normal(size=(batch, 1)).astype(F32)
  return logits, labels


def _with_kernel(head, **changes):
  """The head with parts of its kernel replaced (what a custom head author writes)."""
  return base.make_head(head.config, head.kernel._replace(**changes))


def test_python_state_fails_eager_jit_vmap():
  calls = itertools.count()

  def annealed(labels, logits):  # Python state: jit freezes it at trace time.
    return (1.0 + next(calls)) * jnp.square(logits - labels)

  head = jheads.regression_head(name="annealed", loss_fn=annealed)
  message = _failure(testing.assert_eager_jit_vmap_equal, head, *_regression_inputs())
  _expect(message, r"^head 'annealed' fails 'eager equals jit equals vmap': ",
          r"loss is [0-9.e+-]+ under jit but [0-9.e+-]+ eagerly")


def test_batch_mean_statistic_fails_merge():
  inner = jheads.regression_head(name="means")

  def statistics(batch):
    stats = inner.kernel.statistics(batch)
    # A batch mean as its own ratio: merged batches average means, unweighted by size.
    stats["label/mean"] = metrics.Ratio(jnp.mean(batch.labels), jnp.ones((), F32))
    return stats

  head = _with_kernel(inner, statistics=statistics)
  message = _failure(testing.assert_merge_equals_concatenation, head, *_regression_inputs())
  _expect(message, r"^head 'means' fails 'merged batches equal the concatenated batch': ",
          r"metrics\['label/mean/means'\] is [0-9.e+-]+ merged from 3 batches of \[3, 3, 2\] rows"
          r" but [0-9.e+-]+ on the concatenated batch")
  # The additive statistics next to it pass: the first difference is this one.
  testing.assert_merge_equals_concatenation(inner, *_regression_inputs())


def test_kernel_reading_features_fails_grouped():
  inner = jheads.regression_head(name="scaled")

  def loss_terms(batch):
    # Features reach a kernel only when its head is alone; a grouped head sees None.
    terms = inner.kernel.loss_terms(batch)
    scale = 1.0 if batch.features is None else jnp.mean(batch.features["scale"])
    return terms._replace(total=scale * terms.total)

  head = _with_kernel(inner, loss_terms=loss_terms)
  logits, labels = _regression_inputs()
  features = {"scale": np.full(BATCH, 2.0, F32)}
  message = _failure(testing.assert_grouped_equals_per_head, head, logits, labels, features)
  _expect(message, r"^head 'scaled' fails 'grouped equals per-head inside a multi_head': ",
          r"loss is [0-9.e+-]+ grouped \(vectorize=True\) but [0-9.e+-]+ per head"
          r" \(vectorize=False\)")
  testing.assert_grouped_equals_per_head(inner, logits, labels, features)


def test_naive_log_sigmoid_loss_fails_finite_gradients():
  def naive(labels, logits):  # log(sigmoid(x)) is log(0) = -inf at x = -1e4
    p = jax.nn.sigmoid(logits)
    return -(labels * jnp.log(p) + (1 - labels) * jnp.log(1 - p))

  head = jheads.regression_head(name="naive", loss_fn=naive)
  logits, _ = _regression_inputs()
  labels = np.random.default_rng(1).uniform(size=(BATCH, 1)).astype(F32)
  message = _failure(testing.assert_finite_gradients, head, logits, labels)
  _expect(message, r"^head 'naive' fails 'finite loss, gradient and metrics at large \|logits\|': ",
          r"(loss|gradient\[\d+, 0\]|metrics\['average_loss/naive'\]) is (inf|nan)")
  # The built-in logistic loss is the stable form of the same thing.
  testing.assert_finite_gradients(jheads.logistic_regression_head(name="stable"), logits, labels)


def test_loss_ignoring_axis_name_fails_sharded():
  inner = jheads.regression_head(name="forgetful")

  def loss_fn(logits, labels, features=None, *, axis_name=None):
    del axis_name  # Each shard divides by its own row count: the psum over-counts.
    return inner.loss_fn(logits, labels, features)

  head = inner._replace(loss_fn=loss_fn)
  message = _failure(testing.assert_sharded_equals_one_device, head, *_regression_inputs(),
                     modes=("shard_map",))
  _expect(message, r"^head 'forgetful' fails 'sharded equals one device': ",
          r"loss is [0-9.e+-]+ under shard_map with axis_name but [0-9.e+-]+ on one device",
          r"8 devices")
  testing.assert_sharded_equals_one_device(inner, *_regression_inputs())  # every mode


def test_one_device_skips_with_a_clear_message():
  head = jheads.regression_head(name="dwell")
  with pytest.raises(unittest.SkipTest, match=r"head 'dwell': 'sharded equals one device' skipped:"
                     r" needs at least 2 devices, found 1 .*xla_force_host_platform_device_count"):
    testing.assert_sharded_equals_one_device(head, *_regression_inputs(), devices=jax.devices()[:1])


def test_statistic_ignoring_weights_fails_absent_rows():
  inner = jheads.regression_head(name="careless", missing_label=NAN)

  def statistics(batch):
    stats = inner.kernel.statistics(batch)
    # Absent rows hold label 0 and weight 0; counting them skews the mean.
    stats["label/mean"] = metrics.Ratio(jnp.sum(batch.labels), jnp.full((), batch.labels.size, F32))
    return stats

  head = _with_kernel(inner, statistics=statistics)
  message = _failure(testing.assert_absent_rows_equal_dropped, head, *_regression_inputs())
  _expect(message, r"^head 'careless' fails 'masked rows and missing labels equal dropped rows': ",
          r"metrics\['label/mean/careless'\] is [0-9.e+-]+ with rows \[[0-9, ]+\] masked out,"
          r" under jit but [0-9.e+-]+ with those rows dropped")
  testing.assert_absent_rows_equal_dropped(inner, *_regression_inputs())


def test_value_check_reading_masked_rows_fails_absent_rows():
  inner = jheads.regression_head(name="nosy")

  def value_checks(logits, labels, row_weights):  # Looks at every row, masked or not.
    return {"logits must be finite": checks.ValueCheck(jnp.all(jnp.isfinite(logits)))}

  head = _with_kernel(inner, value_checks=value_checks)
  message = _failure(testing.assert_absent_rows_equal_dropped, head, *_regression_inputs())
  _expect(message, r"^head 'nosy' fails 'masked rows and missing labels equal dropped rows': ",
          r"a value check fired with rows \[[0-9, ]+\] masked out, under jit.*"
          r"logits must be finite")


def test_bad_inputs_are_rejected_early():
  head = jheads.regression_head(name="dwell")
  logits, labels = _regression_inputs()
  with pytest.raises(ValueError, match=r"labels has 7 rows but logits has 8"):
    testing.assert_merge_equals_concatenation(head, logits, labels[:7])
  with pytest.raises(ValueError, match=r"num_batches must be an int in \[1, 8\]"):
    testing.assert_merge_equals_concatenation(head, logits, labels, num_batches=9)
  with pytest.raises(ValueError, match=r"expected a jheads.Head or jheads.MultiHead"):
    testing.assert_finite_gradients(object(), logits, labels)
  with pytest.raises(ValueError, match=r"magnitude names no head \['click'\]"):
    testing.assert_finite_gradients(head, logits, labels, magnitude={"click": 1.0})
  with pytest.raises(ValueError, match=r"skip must list names"):
    testing.check_head(head, skip=["assert_everything"])


# ----------------------------------------------------------------------------
# The example test file a user copies.


def test_the_example_test_file_passes():
  """Runs the tests of "test_custom_head.py" in this process (its 8 devices included)."""
  path = pathlib.Path(__file__).resolve().parent.parent / "examples" / "test_custom_head.py"
  spec = importlib.util.spec_from_file_location("example_test_custom_head", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  tests = [getattr(module, name) for name in dir(module) if name.startswith("test_")]
  assert len(tests) >= 7
  for test in tests:
    test()
