"""CI guards for the many-heads fast path, on the problem `benchmarks/run.py` times.

Timings are too noisy for pass/fail, so these guard what makes the speed:
the size of the compiled T = 100 train step against hand-written vectorized
JAX, that grouping changes no number, and at T = 1000 (issue 10's scale,
timed by `benchmarks/many_heads.py`) that the steps' outputs and compiled
ops do not grow with the number of heads and that a step compiles once.
"""

import collections
import re

import jax
import numpy as np
import optax
import pytest

import jheads
from benchmarks import problem
from jheads import metrics
from jheads import training

NUM_HEADS = 100
MAX_HLO_RATIO = 1.5


@pytest.fixture(scope="module")
def inputs():
  return problem.step_inputs(NUM_HEADS)


def _step(loss_fn):
  return problem.train_step(loss_fn, problem.make_optimizer())


def test_train_step_hlo_is_within_1_5x_of_hand_written(inputs):
  jheads_step = _step(problem.jheads_loss(problem.make_multi_head(NUM_HEADS)))
  hand_step = _step(problem.hand_loss(NUM_HEADS))
  jheads_ops = problem.hlo_op_counts(jheads_step, *inputs)["optimized_hlo"]
  hand_ops = problem.hlo_op_counts(hand_step, *inputs)["optimized_hlo"]
  assert jheads_ops <= MAX_HLO_RATIO * hand_ops, (jheads_ops, hand_ops)


def test_grouped_per_head_and_hand_written_agree(inputs):
  """Same loss and gradients, to 1e-6, whichever way the heads are evaluated."""
  params, _, batch = inputs
  results = [
      jax.jit(jax.value_and_grad(loss))(params, batch)
      for loss in (
          problem.jheads_loss(problem.make_multi_head(NUM_HEADS)),
          problem.jheads_loss(problem.make_multi_head(NUM_HEADS, vectorize=False)),
          problem.hand_loss(NUM_HEADS),
      )
  ]
  for other in results[1:]:
    for a, b in zip(jax.tree.leaves(results[0]), jax.tree.leaves(other)):
      np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6, atol=1e-6)


# ----------------------------------------------------------------------------
# Scale guards at T = 1000 (issue 10): what stays O(kinds), not O(heads).

BATCH = 256
_INSTRUCTION = re.compile(r"^\s*(?:ROOT\s+)?%[\w.\-]+\s*=\s*[^=]*?\s([a-z][a-z0-9\-]*)\(")
# One per input and free to run: a thousand labels are a thousand parameters.
_FREE_OPS = {"parameter", "bitcast", "constant", "tuple", "get-tuple-element"}
_COMPILE_EVENT = "/jax/core/compile/backend_compile_duration"


def _binary_head(num_heads):
  return jheads.multi_head(
      [jheads.binary_classification_head(name=f"h{i:04d}") for i in range(num_heads)]
  )


def _shapes(head):
  """Abstract logits and labels: lowering needs no data."""
  logits = jax.ShapeDtypeStruct((BATCH, head.logits_dim), np.float32)
  labels = {h.name: jax.ShapeDtypeStruct((BATCH,), np.float32) for h in head.heads}
  return logits, labels


def _hlo_ops(compiled_text):
  """Instructions of a compiled module, fusion bodies included, less the free ones."""
  ops = collections.Counter()
  for line in compiled_text.splitlines():
    match = _INSTRUCTION.match(line)
    if match and match.group(1) not in _FREE_OPS:
      ops[match.group(1)] += 1
  return ops


def _linear(params, features):
  return features["x"] @ params["w"]


def _train_step_outputs(num_heads):
  head = _binary_head(num_heads)
  optimizer = optax.sgd(0.1)
  params = {"w": jax.ShapeDtypeStruct((4, num_heads), np.float32)}
  step = training.make_train_step(head, _linear, optimizer)
  opt_state = jax.eval_shape(optimizer.init, params)
  features = {"x": jax.ShapeDtypeStruct((BATCH, 4), np.float32)}
  return jax.eval_shape(step, params, opt_state, features, _shapes(head)[1])


@pytest.fixture(scope="module")
def compiled_eval_1000():
  """The T = 1000 eval step, jitted and called on data, and the backend compiles it took."""
  compiles = []

  def listener(event, duration, **kwargs):
    del duration, kwargs
    if event == _COMPILE_EVENT:
      compiles.append(event)

  head = _binary_head(1000)
  step = jax.jit(head.metric_fn)
  rng = np.random.default_rng(0)
  data = [
      (
          rng.normal(size=(BATCH, 1000)).astype(np.float32),
          {h.name: rng.integers(0, 2, BATCH).astype(np.float32) for h in head.heads},
      )
      for _ in range(2)
  ]
  jax.monitoring.register_event_duration_secs_listener(listener)
  try:
    outputs = [step(*batch) for batch in data]
  finally:
    jax.monitoring.unregister_event_duration_listener(listener)
  return head, step, outputs, len(compiles)


def test_eval_and_train_step_outputs_do_not_grow_with_heads(compiled_eval_1000):
  """A step returns one leaf per statistic per group, and one `[T]` head_losses array."""
  head, _, outputs, _ = compiled_eval_1000
  small = _binary_head(10)
  eval_small = jax.eval_shape(small.metric_fn, *_shapes(small))
  assert len(jax.tree.leaves(outputs[0])) == len(jax.tree.leaves(eval_small)) == 20
  assert len(outputs[0]) == 10 * 1000  # the flat keys all read back
  train_small, train_large = _train_step_outputs(10), _train_step_outputs(1000)
  assert len(jax.tree.leaves(train_large)) == len(jax.tree.leaves(train_small))
  assert len(jax.tree.leaves(train_large)) <= 16
  # head_losses: one [T] leaf (read through the leaves: the output's
  # properties would check the step's value checks, which shapes cannot).
  assert [x.shape for x in jax.tree.leaves(train_large)].count((1000,)) == 1


def test_eval_step_hlo_is_o_kinds_not_o_heads():
  """The compiled T = 1000 eval step has about the ops of the T = 10 one.

  Per-head slices, gathers, histograms or checks that survived into the
  program would add ops per head; beyond the inputs' own parameters, only
  the stacking of the labels (a concatenate per hundred heads) grows.
  """
  small, large = _binary_head(10), _binary_head(1000)
  ops_small = _hlo_ops(jax.jit(small.metric_fn).lower(*_shapes(small)).compile().as_text())
  ops_large = _hlo_ops(jax.jit(large.metric_fn).lower(*_shapes(large)).compile().as_text())
  total_small, total_large = sum(ops_small.values()), sum(ops_large.values())
  assert total_large <= 1.25 * total_small, (ops_small, ops_large)
  assert ops_large["fusion"] <= 1.25 * ops_small["fusion"], (ops_small, ops_large)


def test_eval_step_compiles_once_per_shape(compiled_eval_1000):
  """Two calls with new arrays of the same shapes compile once; the statistics differ."""
  _, step, outputs, compiles = compiled_eval_1000
  assert compiles == 1
  assert step._cache_size() == 1
  first, second = (metrics.compute(o)["auc/h0000"] for o in outputs)
  assert float(first) != float(second)
