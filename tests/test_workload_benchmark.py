"""The workload benchmark's jheads model builds, trains and learns (no timings).

`benchmarks/workload.py` times jheads against Keras and the Estimator on a
five-head model; these checks keep its problem honest on CI: the jheads step
trains, the hand-written reference minimizes the very same objective, and
the scorer that compares contenders is right.
"""

import itertools

import jax
import numpy as np
import pytest

import jheads

from benchmarks import workload


@pytest.fixture(scope="module")
def split():
  return workload.make_split(4 * workload.BATCH, seed=1)


@pytest.fixture(scope="module")
def head():
  return workload.make_head()


def test_teacher_labels_have_signal_and_the_conversion_mask(split):
  clicked = split.clicked
  assert 0.3 < clicked.mean() < 0.6
  # No conversion without a click; the mask is exactly the click label.
  assert not split.labels["conversion"][~clicked].any()
  np.testing.assert_array_equal(split.labels["click"], clicked.astype(np.float32))
  teacher = workload.teacher_score(split)
  assert teacher["click_auc"] > 0.7 and teacher["tags_auc"] > 0.7
  assert teacher["category_accuracy"] > 3 / workload.N_CATEGORIES
  assert abs(teacher["dwell_mse"] - workload.DWELL_NOISE**2) < 0.03


def test_jheads_step_trains_and_the_loss_decreases(split, head):
  assert head.logits_dim == workload.LOGITS_DIM == 33
  step = jax.jit(workload.jheads_train_step(head))
  params = workload.init_params()
  opt_state = workload.make_optimizer().init(params)
  batches = jax.device_put([split.batch(i) for i in range(4)])

  loss_fn = jax.jit(lambda p, f, l: head.loss_fn(workload.apply_fn(p, f), l, f))

  def loss_on(params, i):
    return float(loss_fn(params, *batches[i]))

  before = [loss_on(params, i) for i in range(4)]
  losses = []
  for features, labels in itertools.islice(itertools.cycle(batches), 16):
    params, opt_state, loss = step(params, opt_state, features, labels)
    losses.append(float(loss))
  after = [loss_on(params, i) for i in range(4)]
  assert np.all(np.isfinite(losses))
  # The step reports the loss before its update: the first is batch 0's.
  np.testing.assert_allclose(losses[0], before[0], rtol=1e-6)
  assert np.mean(after) < np.mean(before) - 0.3
  assert np.mean(losses[-4:]) < np.mean(losses[:4])


def test_hand_written_step_minimizes_the_same_objective(split, head):
  """jheads' masked mean over clicked rows is the hand-written loss, to float rounding."""
  features, labels = jax.device_put(split.batch(0))
  logits = jax.random.normal(jax.random.key(0), (workload.BATCH, workload.LOGITS_DIM)) * 2

  @jax.jit
  def both(z):
    jheads_loss = lambda z: head.losses_fn(z, labels, features)
    hand_loss = lambda z: workload.hand_losses(z, features, labels)
    return (jheads_loss(z), hand_loss(z), jax.grad(lambda z: jheads_loss(z)[0])(z),
            jax.grad(lambda z: hand_loss(z)[0])(z))

  (total, head_losses), (hand_total, hand_per_head), grad, hand_grad = both(logits)
  np.testing.assert_allclose(float(total), float(hand_total), rtol=1e-6)
  np.testing.assert_allclose(
      [float(head_losses[n]) for n in workload.HEAD_NAMES], np.asarray(hand_per_head), rtol=1e-6
  )
  np.testing.assert_allclose(np.asarray(grad), np.asarray(hand_grad), atol=1e-8)
  # Unclicked rows get no conversion gradient.
  conversion = np.asarray(grad)[:, workload.COLUMNS["conversion"]][:, 0]
  assert not conversion[~split.clicked[: workload.BATCH]].any()


def test_exact_auc_counts_pairs_and_ties():
  scores = np.array([0.1, 0.4, 0.4, 0.8, 0.3, 0.9])
  labels = np.array([0, 1, 0, 1, 0, 1])
  pairs = [
      1.0 if scores[i] > scores[j] else 0.5 if scores[i] == scores[j] else 0.0
      for i in np.flatnonzero(labels) for j in np.flatnonzero(labels == 0)
  ]
  assert workload.exact_auc(scores, labels) == pytest.approx(np.mean(pairs), abs=1e-12)


def test_eval_step_metrics_agree_with_the_exact_scorer(split):
  params = workload.init_params()
  own = workload.jheads_evaluate(params, split)
  exact = workload.score(workload.held_out_logits(params, split), split)
  # 200-threshold AUCs against exact rank AUCs.
  for key, own_key in (("click_auc", "auc/click"), ("conversion_auc", "auc/conversion"),
                       ("tags_auc", "auc/tags")):
    assert own[own_key] == pytest.approx(exact[key], abs=5e-3)
  assert own["accuracy/category"] == pytest.approx(exact["category_accuracy"], abs=1e-6)
  assert own["average_loss/dwell"] == pytest.approx(exact["dwell_mse"], rel=1e-5)


def test_flat_running_statistics_are_the_batches_statistics(split, head):
  """The benchmark's flat train metrics unpack to the sum of each batch's statistics."""
  batches = jax.device_put([split.batch(i) for i in range(2)])
  params = workload.init_params()
  flat, unravel = workload.flat_statistics(head, *batches[0])
  state = (workload.make_optimizer().init(params), flat)
  step = jax.jit(workload.jheads_flat_metrics_train_step(head))
  statistics = jax.jit(lambda p, f, l: head.metric_fn(workload.apply_fn(p, f), l, f))
  expected = []
  for features, labels in batches:
    # The step's statistics are of the logits before its update.
    expected.append(statistics(params, features, labels))
    params, state, _ = step(params, state, features, labels)
  want = jheads.metrics.compute(jheads.metrics.merge(*expected))
  got = jheads.metrics.compute(unravel(state[1]))
  assert sorted(got) == sorted(want)
  for key in want:
    np.testing.assert_allclose(got[key], want[key], rtol=1e-6, atol=1e-7, err_msg=key)
  assert 0.4 < float(got["auc/click"]) < 1.0
