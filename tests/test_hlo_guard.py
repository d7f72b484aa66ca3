"""CI guards for the many-heads fast path, on the problem `benchmarks/run.py` times.

Timings are too noisy for pass/fail, so these guard what makes the speed:
the size of the compiled T = 100 train step against hand-written vectorized
JAX, and that grouping changes no number.
"""

import jax
import numpy as np
import pytest

from benchmarks import problem

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
