"""multi_head: splitting, weighting, key merging, nesting and grouped evaluation."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jheads
from jheads import metrics
from tests.cases import CASES


def named_heads():
  """One head of every case, named after it, each with its weight column."""
  heads, draws = [], []
  for case in CASES:
    head = case.make_head(name=case.id, weight_column=f"w_{case.id}" if case.weights else None)
    heads.append(head)
    draws.append(case)
  return heads, draws


def draw_all(heads, cases, rng, batch_shape=(12,)):
  logits, labels, features = {}, {}, {}
  for head, case in zip(heads, cases):
    lo, la, f = case.inputs(head, rng, batch_shape)
    logits[head.name], labels[head.name] = lo, la
    if f is not None:
      features[f"w_{head.name}"] = f["w"]
  return logits, labels, features


def concatenated(logits, heads):
  return np.concatenate([logits[h.name] for h in heads], axis=-1)


def test_loss_is_weighted_sum_of_head_losses():
  heads, cases = named_heads()
  weights = np.linspace(0.5, 2.0, len(heads))
  head = jheads.multi_head(heads, head_weights=weights)
  logits, labels, features = draw_all(heads, cases, np.random.default_rng(0))
  expected = sum(
      w * h.loss_fn(logits[h.name], labels[h.name], features) for w, h in zip(weights, heads)
  )
  np.testing.assert_allclose(head.loss_fn(logits, labels, features), expected, rtol=1e-5)
  losses = head.head_losses_fn(logits, labels, features)
  assert list(losses) == [h.name for h in heads]
  for h in heads:
    np.testing.assert_allclose(losses[h.name], h.loss_fn(logits[h.name], labels[h.name], features), rtol=1e-6)


def test_dict_logits_equal_split_logits():
  heads, cases = named_heads()
  head = jheads.multi_head(heads)
  logits, labels, features = draw_all(heads, cases, np.random.default_rng(1), batch_shape=(3, 5))
  split = concatenated(logits, heads)
  np.testing.assert_allclose(head.loss_fn(split, labels, features), head.loss_fn(logits, labels, features), rtol=1e-6)
  chex.assert_trees_all_close(
      dict(head.metric_fn(split, labels, features)), dict(head.metric_fn(logits, labels, features)), rtol=1e-6
  )
  chex.assert_trees_all_close(head.predict_fn(split), head.predict_fn(logits), rtol=1e-6)


def test_metric_keys_are_each_heads_suffixed_plus_head_losses():
  heads, cases = named_heads()
  head = jheads.multi_head(heads)
  logits, labels, features = draw_all(heads, cases, np.random.default_rng(2))
  keys = set(metrics.compute(head.metric_fn(logits, labels, features)))
  expected = set()
  for h in heads:
    own = jheads.multi_head([h]).metric_fn(logits[h.name], {h.name: labels[h.name]}, features)
    single = h.kernel.statistics(h.kernel.prepare(logits[h.name], labels[h.name], h.kernel.get_weights(features)))
    expected |= {f"{k}/{h.name}" for k in single} | {f"loss/{h.name}"}
    assert set(own) == {f"{k}/{h.name}" for k in single} | {f"loss/{h.name}"}
  assert keys == expected


def test_metrics_equal_each_heads_own_metrics():
  heads, cases = named_heads()
  head = jheads.multi_head(heads, head_weights=[3.0] * len(heads))
  logits, labels, features = draw_all(heads, cases, np.random.default_rng(3))
  values = metrics.compute(head.metric_fn(logits, labels, features))
  for h in heads:
    own = metrics.compute(h.metric_fn(logits[h.name], labels[h.name], features))
    for key, value in own.items():
      np.testing.assert_allclose(values[key], value, rtol=1e-6, atol=1e-7, err_msg=key)
    # loss/<head> is the head's reduced loss, not multiplied by its head weight.
    np.testing.assert_allclose(
        values[f"loss/{h.name}"], h.loss_fn(logits[h.name], labels[h.name], features), rtol=1e-6
    )


def test_head_loss_metric_is_the_mean_over_batches():
  head = jheads.multi_head([jheads.regression_head(name="r"), jheads.binary_classification_head(name="b")])
  rng = np.random.default_rng(4)
  stats, losses = None, []
  for size in (3, 10, 4):
    logits = rng.normal(size=(size, 2)).astype(np.float32)
    labels = {"r": rng.normal(size=(size, 1)).astype(np.float32), "b": rng.integers(0, 2, (size, 1)).astype(np.float32)}
    batch = head.metric_fn(logits, labels)
    stats = batch if stats is None else metrics.merge(stats, batch)
    losses.append(head.head_losses_fn(logits, labels)["r"])
  np.testing.assert_allclose(metrics.compute(stats)["loss/r"], np.mean(losses), rtol=1e-6)


def test_predictions_are_keyed_by_head_and_key():
  head = jheads.multi_head(
      [jheads.binary_classification_head(name="a"), jheads.regression_head(label_dimension=2, name="b")]
  )
  predictions = head.predict_fn(np.zeros((4, 3), np.float32))
  assert list(predictions) == [
      ("a", "logits"), ("a", "logistic"), ("a", "probabilities"), ("a", "class_ids"),
      ("a", "all_class_ids"), ("b", "predictions"),
  ]
  assert predictions[("b", "predictions")].shape == (4, 2)


def test_head_weights_can_be_traced_and_change_without_recompiling():
  heads = [jheads.binary_classification_head(name="a"), jheads.regression_head(name="b")]
  head = jheads.multi_head(heads)
  logits = np.array([[0.5, 1.0], [-1.0, 2.0]], np.float32)
  labels = {"a": np.array([1.0, 0.0], np.float32), "b": np.array([0.0, 1.0], np.float32)}
  losses = head.head_losses_fn(logits, labels)

  @jax.jit
  @chex.assert_max_traces(n=1)
  def weighted_loss(head_weights):
    return head.loss_fn(logits, labels, head_weights=head_weights)

  for w in ([1.0, 1.0], [0.2, 3.0], [0.0, 1.0]):
    np.testing.assert_allclose(
        weighted_loss(jnp.asarray(w)), w[0] * losses["a"] + w[1] * losses["b"], rtol=1e-6
    )
  with pytest.raises(ValueError, match=r"head_weights must have shape \(2,\)"):
    head.loss_fn(logits, labels, head_weights=jnp.ones(3))


def test_nested_multi_heads_are_flattened_with_multiplied_weights():
  a = jheads.binary_classification_head(name="a")
  b = jheads.regression_head(name="b")
  c = jheads.multi_class_head(3, name="c")
  inner = jheads.multi_head([a, b], head_weights=[1.0, 2.0])
  outer = jheads.multi_head([inner, c], head_weights=[0.5, 3.0])
  flat = jheads.multi_head([a, b, c], head_weights=[0.5, 1.0, 3.0])
  assert [h.name for h in outer.heads] == ["a", "b", "c"]
  assert outer.head_weights == (0.5, 1.0, 3.0)
  logits = np.random.default_rng(5).normal(size=(6, 5)).astype(np.float32)
  labels = {"a": np.ones((6, 1), np.float32), "b": np.zeros((6, 1), np.float32), "c": np.arange(6) % 3}
  np.testing.assert_allclose(outer.loss_fn(logits, labels), flat.loss_fn(logits, labels), rtol=1e-6)


def test_grouped_and_per_head_paths_agree():
  # Two heads of each kind, so that every kind forms a group.
  heads, per_head_cases = [], []
  for copy in range(2):
    for case in CASES:
      weight_column = f"w_{case.id}_{copy}" if case.weights else None
      heads.append(case.make_head(name=f"{case.id}_{copy}", weight_column=weight_column))
      per_head_cases.append(case)
  head_weights = np.linspace(0.1, 1.0, len(heads))
  grouped = jheads.multi_head(heads, head_weights=head_weights)
  per_head = jheads.multi_head(heads, head_weights=head_weights, vectorize=False)
  logits, labels, features = draw_all(heads, per_head_cases, np.random.default_rng(6))
  split = concatenated(logits, heads)
  for fn in ("head_losses_fn", "metric_fn"):
    # Stacked per group either way: compare what a user reads, key by key.
    chex.assert_trees_all_close(
        dict(jax.jit(getattr(grouped, fn))(split, labels, features)),
        dict(jax.jit(getattr(per_head, fn))(split, labels, features)),
        rtol=1e-6, atol=1e-6,
    )
  chex.assert_trees_all_close(jax.jit(grouped.predict_fn)(split), jax.jit(per_head.predict_fn)(split), rtol=1e-6)
  grads = jax.jit(jax.grad(grouped.loss_fn))(jnp.asarray(split), labels, features)
  per_head_grads = jax.jit(jax.grad(per_head.loss_fn))(jnp.asarray(split), labels, features)
  np.testing.assert_allclose(grads, per_head_grads, rtol=1e-6, atol=1e-7)


def test_grouping_vectorizes_like_heads():
  heads = [jheads.binary_classification_head(name=f"h{i}") for i in range(20)]
  logits = jnp.zeros((8, 20))
  labels = {f"h{i}": jnp.zeros((8, 1)) for i in range(20)}

  def operations(vectorize):
    lowered = jax.jit(jheads.multi_head(heads, vectorize=vectorize).loss_fn).lower(logits, labels)
    return lowered.as_text().count("stablehlo.")

  # One vectorized loss for the twenty heads, not twenty loss computations.
  assert 5 * operations(True) < operations(False)


def test_single_head_multi_head_matches_the_head():
  head = jheads.multi_class_head(3, name="m")
  logits = np.random.default_rng(7).normal(size=(5, 3)).astype(np.float32)
  labels = np.array([0, 1, 2, 1, 0])
  wrapped = jheads.multi_head([head])
  np.testing.assert_allclose(wrapped.loss_fn(logits, {"m": labels}), head.loss_fn(logits, labels), rtol=1e-6)
  values = metrics.compute(wrapped.metric_fn(logits, {"m": labels}))
  assert set(values) == {"loss/m", "average_loss/m", "accuracy/m"}


def test_extra_label_entries_are_ignored():
  head = jheads.multi_head([jheads.regression_head(name="r")])
  logits = np.ones((2, 1), np.float32)
  assert float(head.loss_fn(logits, {"r": np.zeros(2, np.float32), "other": np.ones(2)})) == 1.0
