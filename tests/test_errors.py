"""Every error case of spec §6: a clear error naming the head and the problem."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jheads

F32 = np.float32


def binary(**kw):
  return jheads.binary_classification_head(name="clicks", **kw)


# ---------------------------------------------------------------------------- construction


@pytest.mark.parametrize(
    "build, message",
    [
        (lambda: jheads.multi_class_head(None), r"multi_class_head: n_classes must be an int > 2, got None"),
        (lambda: jheads.multi_class_head(2), r"n_classes must be > 2, got 2; use binary_classification_head"),
        (lambda: jheads.multi_class_head(1), r"n_classes must be > 2, got 1"),
        (lambda: jheads.multi_label_head(1), r"multi_label_head: n_classes must be >= 2, got 1"),
        (lambda: jheads.multi_label_head(None), r"multi_label_head: n_classes must be an int >= 2, got None"),
        (lambda: binary(thresholds=[0.5, 1.0]), r"head 'clicks': thresholds must be in \(0, 1\), got 1.0"),
        (lambda: binary(thresholds=[0.0]), r"thresholds must be in \(0, 1\), got 0.0"),
        (lambda: jheads.multi_label_head(3, thresholds=[1.5]), r"multi_label_head: thresholds must be in \(0, 1\), got 1.5"),
        (lambda: binary(label_vocabulary="ab"), r"head 'clicks': label_vocabulary must be a list or tuple of strings, got str"),
        (lambda: binary(label_vocabulary=["a", "b", "c"]), r"label_vocabulary has 3 entries but n_classes is 2"),
        (lambda: jheads.multi_class_head(3, label_vocabulary=["a", "b"]), r"label_vocabulary has 2 entries but n_classes is 3"),
        (lambda: jheads.multi_label_head(2, label_vocabulary={"a", "b"}), r"label_vocabulary must be a list or tuple"),
        (lambda: binary(label_vocabulary=["a", "a"]), r"label_vocabulary has duplicate entries"),
        (lambda: binary(loss_reduction="avg"), r"head 'clicks': invalid loss_reduction 'avg'; expected one of 'sum'"),
        (lambda: jheads.regression_head(label_dimension=0), r"regression_head: label_dimension must be an int >= 1, got 0"),
        (lambda: jheads.poisson_regression_head(label_dimension=-1), r"poisson_regression_head: label_dimension must be an int >= 1"),
        (lambda: jheads.multi_label_head(3, classes_for_class_based_metrics=[3]), r"classes_for_class_based_metrics must be in \[0, 3\), got 3"),
        (lambda: jheads.multi_label_head(3, classes_for_class_based_metrics=[-1]), r"must be in \[0, 3\), got -1"),
        (lambda: jheads.multi_label_head(3, classes_for_class_based_metrics=["a"]), r"has class name 'a' but the head has no label_vocabulary"),
        (lambda: jheads.multi_label_head(2, label_vocabulary=["a", "b"], classes_for_class_based_metrics=["c"]), r"'c', which is not in label_vocabulary"),
        (lambda: binary(loss_fn=lambda labels: labels), r"head 'clicks': loss_fn must take an argument named 'logits'"),
        (lambda: binary(loss_fn=lambda logits: logits), r"loss_fn must take an argument named 'labels'"),
        (lambda: binary(loss_fn=lambda labels, logits, mode: labels), r"loss_fn has unexpected arguments \['mode'\]"),
        (lambda: binary(loss_fn="sigmoid"), r"loss_fn must be callable"),
        (lambda: jheads.binary_classification_head(name=""), r"name must be a non-empty string"),
        (lambda: binary(num_thresholds=1), r"num_thresholds must be an int >= 2"),
        (lambda: binary(summation_method="riemann"), r"summation_method must be one of"),
    ],
)
def test_bad_construction_raises(build, message):
  with pytest.raises((ValueError, TypeError), match=message):
    build()


@pytest.mark.parametrize(
    "build, message",
    [
        (lambda: jheads.multi_head([]), r"multi_head: heads must not be empty"),
        (lambda: jheads.multi_head([jheads.regression_head()]), r"every head needs a name; the regression head at position 0 has none"),
        (
            lambda: jheads.multi_head([binary(), jheads.regression_head(name="r")], head_weights=[1.0]),
            r"same length; got 2 heads and 1 head_weights",
        ),
        (
            lambda: jheads.multi_head([binary(), jheads.regression_head(name="clicks")]),
            r"head names must be unique; duplicated: \['clicks'\]",
        ),
        (lambda: jheads.multi_head(binary()), r"heads must be a list or tuple of heads"),
        (lambda: jheads.multi_head([binary(), "regression"]), r"heads must be jheads heads; got str at position 1"),
    ],
)
def test_bad_multi_head_raises(build, message):
  with pytest.raises(ValueError, match=message):
    build()


# ---------------------------------------------------------------------------- inputs


LOGITS = np.array([[0.5], [-1.0]], F32)
LABELS = np.array([[1.0], [0.0]], F32)


UNWEIGHTED_INPUT_CASES = [
    (lambda h: h.loss_fn(np.array([0.5, -1.0], F32), LABELS), r"head 'clicks': logits must have shape \[D0, ..., DN, 1\] \(rank >= 2, last dimension 1\), got shape \(2,\)"),
    (lambda h: h.loss_fn(np.zeros((2, 2), F32), LABELS), r"got shape \(2, 2\)"),
    (lambda h: h.predict_fn(np.zeros((2, 3), F32)), r"head 'clicks': logits must have shape"),
    (lambda h: h.loss_fn(LOGITS, np.zeros((3, 1), F32)), r"head 'clicks': labels shape \(3, 1\) does not match logits shape \(2, 1\); expected \(2, 1\) or \(2,\)"),
    (lambda h: h.loss_fn(LOGITS, np.zeros((2, 2), F32)), r"labels shape \(2, 2\) does not match"),
    (lambda h: h.loss_fn(LOGITS, None), r"head 'clicks': labels are required, got None"),
    (lambda h: h.loss_fn(None, LABELS), r"head 'clicks': logits are required, got None"),
    (lambda h: h.loss_fn(LOGITS, np.array(["a", "b"])), r"head 'clicks': labels are strings; string labels need a label_vocabulary"),
    (lambda h: h.loss_fn(LOGITS, np.array([[2.0], [0.0]], F32)), r"head 'clicks': labels must be in \[0, 1\] \(got values \{0, 2\}\)"),
    (lambda h: h.loss_fn(LOGITS, np.array([[-1.0], [0.0]], F32)), r"labels must be in \[0, 1\]"),
    (lambda h: h.loss_fn(LOGITS, np.array([[np.nan], [0.0]], F32)), r"labels must be in \[0, 1\]"),
    (lambda h: h.loss_fn(np.array([[np.nan], [0.0]], F32), LABELS), r"head 'clicks': logits must be finite \(no NaN or infinity\)"),
    (lambda h: h.loss_fn(np.array([[np.inf], [0.0]], F32), LABELS), r"logits must be finite"),
    (lambda h: h.metric_fn(np.array([[np.inf], [0.0]], F32), LABELS), r"logits must be finite"),
    (lambda h: h.predict_fn(np.array([[np.nan], [0.0]], F32)), r"logits must be finite"),
    (lambda h: h.loss_fn(np.array([["a"], ["b"]]), LABELS, {"w": np.ones(2, F32)}), r"head 'clicks': logits must be numeric"),
    (lambda h: h.loss_fn(LOGITS, {"clicks": LABELS}, {"w": np.ones(2, F32)}), r"head 'clicks': labels must be an array, got a dict"),
]

WEIGHTED_INPUT_CASES = [
    (lambda h: h.loss_fn(LOGITS, np.array([[True], [False]]), {}), r"head 'clicks': weight_column 'w' is missing from features \(keys: \[\]\)"),
    (lambda h: h.loss_fn(LOGITS, LABELS), r"weight_column 'w' is missing from features"),
    (lambda h: h.loss_fn(LOGITS, LABELS, {"w": np.ones(3, F32)}), r"head 'clicks': weights shape \(3,\) does not match logits shape \(2, 1\); expected \(2,\) or \(2, 1\)"),
    (lambda h: h.loss_fn(LOGITS, LABELS, {"w": np.ones((2, 2), F32)}), r"weights shape \(2, 2\) does not match"),
    (lambda h: h.loss_fn(LOGITS, LABELS, {"w": np.array(["a", "b"])}), r"head 'clicks': weights must be numeric"),
    (lambda h: h.loss_fn(LOGITS, LABELS, {"w": np.array([np.nan, 1.0], F32)}), r"head 'clicks': weights must be finite"),
]


@pytest.mark.parametrize("call, message", UNWEIGHTED_INPUT_CASES)
def test_bad_binary_inputs_raise(call, message):
  with pytest.raises(ValueError, match=message):
    call(binary())


@pytest.mark.parametrize("call, message", WEIGHTED_INPUT_CASES)
def test_bad_weighted_binary_inputs_raise(call, message):
  with pytest.raises(ValueError, match=message):
    call(binary(weight_column="w"))


def test_binary_labels_of_rank_one_less_are_expanded():
  head = binary()
  np.testing.assert_allclose(head.loss_fn(LOGITS, np.array([1.0, 0.0], F32)), head.loss_fn(LOGITS, LABELS))


def test_multi_class_input_errors():
  head = jheads.multi_class_head(3, name="species")
  logits = np.zeros((2, 3), F32)
  with pytest.raises(ValueError, match=r"head 'species': labels must be integer class ids, got dtype float32"):
    head.loss_fn(logits, np.array([0.0, 1.0], F32))
  with pytest.raises(ValueError, match=r"head 'species': labels must be class ids in \[0, 3\) \(got values \{1, 3\}\)"):
    head.loss_fn(logits, np.array([3, 1]))
  with pytest.raises(ValueError, match=r"labels must be class ids in \[0, 3\)"):
    head.metric_fn(logits, np.array([[-1], [1]]))
  with pytest.raises(ValueError, match=r"labels shape \(2, 3\) does not match logits shape \(2, 3\); expected \(2, 1\) or \(2,\)"):
    head.loss_fn(logits, np.zeros((2, 3), np.int32))
  vocabulary_head = jheads.multi_class_head(3, name="species", label_vocabulary=["a", "b", "c"])
  with pytest.raises(ValueError, match=r"labels are strings; map them to ids on the host first with jheads.encode_labels"):
    vocabulary_head.loss_fn(logits, np.array(["a", "c"]))


def test_multi_label_input_errors():
  head = jheads.multi_label_head(3, name="tags")
  logits = np.zeros((2, 3), F32)
  with pytest.raises(ValueError, match=r"head 'tags': labels must be a 0/1 indicator of shape \[D0, ..., DN, n_classes\] \(got values \{0, 1, 2\}\)"):
    head.loss_fn(logits, np.array([[0, 1, 2], [1, 1, 0]]))
  with pytest.raises(ValueError, match=r"labels must be a 0/1 indicator"):
    head.loss_fn(logits, np.array([[0, 0.5, 1], [1, 1, 0]], F32))
  with pytest.raises(ValueError, match=r"labels shape \(2,\) does not match logits shape \(2, 3\); expected \(2, 3\)\."):
    head.loss_fn(logits, np.array([0, 2]))
  with pytest.raises(ValueError, match=r"head 'tags': weights shape \(2, 3\) does not match logits shape \(2, 3\); expected \(2,\) or \(2, 1\)"):
    jheads.multi_label_head(3, name="tags", weight_column="w").loss_fn(
        logits, np.zeros((2, 3), np.int32), {"w": np.ones((2, 3), F32)}
    )


def test_regression_input_errors():
  head = jheads.regression_head(label_dimension=2, name="mass")
  logits = np.zeros((2, 2), F32)
  with pytest.raises(ValueError, match=r"head 'mass': labels must be finite numbers"):
    head.loss_fn(logits, np.array([[np.inf, 0.0], [0.0, 0.0]], F32))
  with pytest.raises(ValueError, match=r"labels shape \(2,\) does not match logits shape \(2, 2\); expected \(2, 2\)\."):
    head.loss_fn(logits, np.zeros(2, F32))
  poisson = jheads.poisson_regression_head(name="counts")
  with pytest.raises(ValueError, match=r"head 'counts': labels must be finite and non-negative \(counts\)"):
    poisson.loss_fn(np.zeros((2, 1), F32), np.array([[-1.0], [2.0]], F32))


def test_custom_loss_fn_of_wrong_shape_raises():
  head = jheads.binary_classification_head(name="clicks", loss_fn=lambda labels, logits: jnp.sum(logits))
  with pytest.raises(ValueError, match=r"head 'clicks': loss_fn must return the unreduced loss of shape \(2, 1\) \(\[D0, ..., DN, 1\]\), got shape \(\)"):
    head.loss_fn(LOGITS, LABELS)


def test_multi_head_input_errors():
  head = jheads.multi_head(
      [jheads.multi_label_head(2, name="head1"), jheads.multi_label_head(3, name="head2")]
  )
  logits = {"head1": np.zeros((2, 2), F32), "head2": np.zeros((2, 3), F32)}
  labels = {"head1": np.zeros((2, 2), np.int32), "head2": np.zeros((2, 3), np.int32)}
  with pytest.raises(ValueError, match=r"multi_head: logits dict has no entry for head\(s\) \['head2'\]"):
    head.loss_fn({"head1": logits["head1"]}, labels)
  with pytest.raises(
      ValueError,
      match=r"cannot split logits of shape \(2, 6\) among heads \['head1', 'head2'\] with logits dims \[2, 3\]: the last dimension must be 5 \(their sum\), got 6",
  ):
    head.loss_fn(np.zeros((2, 6), F32), labels)
  with pytest.raises(ValueError, match=r"multi_head: labels must be a dict keyed by head name, got ndarray"):
    head.loss_fn(logits, np.zeros((2, 5)))
  with pytest.raises(ValueError, match=r"multi_head: labels dict has no entry for head\(s\) \['head1'\]"):
    head.metric_fn(logits, {"head2": labels["head2"]})
  with pytest.raises(ValueError, match=r"head 'head2': labels must be a 0/1 indicator"):
    head.loss_fn(logits, {**labels, "head2": np.full((2, 3), 3)})
  with pytest.raises(ValueError, match=r"multi_head: cannot split logits"):
    head.predict_fn(np.zeros((2, 4), F32))


# ---------------------------------------------------------------------------- checkify


def test_value_checks_under_jit_through_checkify():
  head = jheads.multi_class_head(3, name="species")
  logits = jnp.zeros((2, 3))
  checked_loss = jax.jit(jheads.checked(head.loss_fn))
  error, loss = checked_loss(logits, jnp.array([0, 2]))
  assert error.get() is None
  np.testing.assert_allclose(loss, np.log(3.0), rtol=1e-6)
  error, _ = checked_loss(logits, jnp.array([0, 5]))
  assert "head 'species': labels must be class ids in [0, 3)" in error.get()
  with pytest.raises(Exception, match=r"labels must be class ids in \[0, 3\)"):
    error.throw()
  error, _ = checked_loss(jnp.array([[jnp.nan, 0.0, 0.0], [0.0, 0.0, 0.0]]), jnp.array([0, 1]))
  assert "head 'species': logits must be finite" in error.get()


def test_checkify_covers_weights_and_multi_heads_and_metrics():
  head = jheads.multi_head(
      [jheads.binary_classification_head(name="a", weight_column="w"), jheads.poisson_regression_head(name="p")]
  )
  logits = jnp.zeros((2, 2))
  labels = {"a": jnp.array([1.0, 0.0]), "p": jnp.array([1.0, 2.0])}
  checked_metrics = jax.jit(jheads.checked(head.metric_fn))
  error, _ = checked_metrics(logits, labels, {"w": jnp.array([1.0, 2.0])})
  assert error.get() is None
  error, _ = checked_metrics(logits, labels, {"w": jnp.array([1.0, jnp.inf])})
  assert "head 'a': weights must be finite" in error.get()
  error, _ = checked_metrics(logits, {**labels, "p": jnp.array([-1.0, 2.0])}, {"w": jnp.ones(2)})
  assert "head 'p': labels must be finite and non-negative" in error.get()
  error, _ = checked_metrics(jnp.array([[0.0, 100.0], [0.0, 0.0]]), labels, {"w": jnp.ones(2)})
  assert "head 'p': logits must be below 88.72" in error.get()


def test_without_checkify_jit_skips_value_checks_but_keeps_shape_checks():
  head = jheads.binary_classification_head(name="clicks")
  # A value check cannot raise inside jit; shape checks still do, at trace time.
  jax.jit(head.loss_fn)(jnp.zeros((2, 1)), jnp.array([[2.0], [0.0]]))
  with pytest.raises(ValueError, match=r"head 'clicks': labels shape \(3, 1\) does not match"):
    jax.jit(head.loss_fn)(jnp.zeros((2, 1)), jnp.zeros((3, 1)))


def test_closed_over_concrete_labels_are_still_checked_inside_jit():
  head = jheads.binary_classification_head(name="clicks")
  bad = np.array([[2.0], [0.0]], F32)
  with pytest.raises(ValueError, match=r"head 'clicks': labels must be in \[0, 1\]"):
    jax.jit(lambda logits: head.loss_fn(logits, bad))(jnp.zeros((2, 1)))


# ---------------------------------------------------------------------------- extreme inputs


def test_losses_that_overflow_float32_raise_instead_of_returning_infinity():
  head = jheads.regression_head(name="mass")
  logits, labels = np.zeros((2, 1), F32), np.full((2, 1), 1e30, F32)
  message = r"head 'mass': the loss must be finite \(no NaN or infinity\); do the logits or labels overflow float32\?"
  with pytest.raises(ValueError, match=message):
    head.loss_fn(logits, labels)
  with pytest.raises(ValueError, match=message):
    jheads.multi_head([head]).loss_fn(logits, {"mass": labels})
  with pytest.raises(ValueError, match=r"head 'mass': the metric statistics must be finite"):
    head.metric_fn(logits, labels)
  with pytest.raises(ValueError, match=r"head 'mass': the metric statistics must be finite"):
    jheads.multi_head([head]).metric_fn(logits, {"mass": labels})
  error, _ = jax.jit(jheads.checked(head.loss_fn))(logits, labels)
  assert "head 'mass': the loss must be finite" in error.get()


def test_head_weights_must_be_finite():
  head = jheads.regression_head(name="r")
  with pytest.raises(ValueError, match=r"multi_head: head_weights must be finite, got \[nan\]"):
    jheads.multi_head([head], head_weights=[float("nan")])
  with pytest.raises(ValueError, match=r"multi_head: head_weights must be finite"):
    jheads.multi_head([head]).loss_fn(np.zeros((2, 1), F32), {"r": np.zeros(2, F32)}, head_weights=np.array([np.inf]))


def test_thresholds_accept_one_float_and_reject_non_numbers():
  assert binary(thresholds=0.5).config.thresholds == (0.5,)
  with pytest.raises(ValueError, match=r"head 'clicks': thresholds must be floats in \(0, 1\), got 'high'"):
    binary(thresholds="high")


def test_features_must_be_a_dict_when_a_weight_column_is_read():
  with pytest.raises(ValueError, match=r"head 'clicks': features must be a dict holding the weight column 'w', got ndarray"):
    binary(weight_column="w").loss_fn(LOGITS, LABELS, np.ones(2, F32))


@pytest.mark.parametrize("reduction", list(jheads.LossReduction))
def test_an_empty_batch_gives_zeros(reduction):
  head = jheads.multi_head(
      [
          jheads.binary_classification_head(name="a", loss_reduction=reduction, thresholds=[0.5]),
          jheads.multi_class_head(3, name="b", loss_reduction=reduction),
          jheads.regression_head(name="c", loss_reduction=reduction),
      ]
  )
  logits = np.zeros((0, 5), F32)
  labels = {"a": np.zeros(0, F32), "b": np.zeros(0, np.int32), "c": np.zeros(0, F32)}
  assert float(head.loss_fn(logits, labels)) == 0.0
  for key, value in jheads.metrics.compute(head.metric_fn(logits, labels)).items():
    assert float(value) == 0.0, key
  assert head.predict_fn(logits)[("b", "probabilities")].shape == (0, 3)


def test_plain_python_lists_and_other_dtypes_are_accepted():
  head = jheads.multi_class_head(3)
  np.testing.assert_allclose(head.loss_fn([[0, 0, 0], [0, 0, 0]], [0, 2]), np.log(3.0), rtol=1e-6)
  np.testing.assert_allclose(
      head.loss_fn(np.zeros((2, 3), np.int32), np.array([0, 2], np.int64)), np.log(3.0), rtol=1e-6
  )
  np.testing.assert_allclose(
      binary().loss_fn(np.zeros((2, 1), np.float64), np.array([[True], [False]])), np.log(2.0), rtol=1e-6
  )
