"""Value checks in the jitted step builders (issue 8): bad data raises when the outputs are read.

The steps are built as the README builds them, `jax.jit(training.make_*_step(...))`.
Screened heads (every built-in but ranking) defer their checks behind the
loss: a failed check makes the head's loss NaN, and only then are the checks
run in full to name the head and the problem. These tests pin the messages
for every kind of bad value, on one device, under sharded jit and under
shard_map (where nothing is deferred), and that passing data gives exactly
the numbers of `checks=False`.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import jheads
from jheads import training
from jheads.checks import ValueCheckError

N_FEATURES = 4
BATCH = 16

HEADS = [
    jheads.binary_classification_head(name="click", weight_column="w"),
    jheads.binary_classification_head(name="like"),
    jheads.multi_class_head(5, name="category"),
    jheads.regression_head(name="dwell", mask_column="clicked"),
    jheads.multi_label_head(3, name="tags"),
]
HEAD = jheads.multi_head(HEADS, head_weights=[1.0, 1.0, 0.5, 2.0, 0.0])


def apply_fn(params, features):
  return features["x"] @ params["w"] + params["b"]


def init_params():
  rng = np.random.default_rng(0)
  return {
      "w": jnp.asarray(rng.normal(size=(N_FEATURES, HEAD.logits_dim)), jnp.float32) / 2,
      "b": jnp.zeros(HEAD.logits_dim),
  }


def make_batch(seed=1):
  rng = np.random.default_rng(seed)
  features = {
      "x": rng.normal(size=(BATCH, N_FEATURES)).astype(np.float32),
      "w": rng.uniform(0.5, 2.0, BATCH).astype(np.float32),
      "clicked": rng.random(BATCH) < 0.5,
  }
  labels = {
      "click": (rng.random(BATCH) < 0.5).astype(np.float32),
      "like": (rng.random(BATCH) < 0.3).astype(np.float32),
      "category": rng.integers(0, 5, BATCH).astype(np.int32),
      "dwell": rng.normal(size=BATCH).astype(np.float32),
      "tags": (rng.random((BATCH, 3)) < 0.4).astype(np.int32),
  }
  return features, labels


def corrupt(features, labels, what):
  """A copy of the batch with one bad value; returns (features, labels, expected message)."""
  features = {k: np.array(v) for k, v in features.items()}
  labels = {k: np.array(v) for k, v in labels.items()}
  if what == "class id too large":
    labels["category"][3] = 5
    return features, labels, "head 'category': labels must be class ids in [0, 5)"
  if what == "negative class id":
    labels["category"][0] = -1
    return features, labels, "head 'category': labels must be class ids in [0, 5)"
  if what == "binary label 2":
    labels["like"][5] = 2.0
    return features, labels, "head 'like': labels must be"
  if what == "NaN regression label":
    labels["dwell"][np.flatnonzero(features["clicked"])[0]] = np.nan
    return features, labels, "head 'dwell': labels must be"
  if what == "NaN feature":
    features["x"][2, 1] = np.nan
    return features, labels, "head 'click': logits must be finite"
  if what == "negative weight":
    features["w"][7] = -1.0
    return features, labels, "head 'click': weights must be >= 0"
  if what == "NaN weight":
    features["w"][7] = np.nan
    return features, labels, "head 'click': weights must be finite"
  if what == "mask not 0/1":
    features["clicked"] = features["clicked"].astype(np.float32)
    features["clicked"][1] = 0.5
    return features, labels, "head 'dwell': the mask must hold only 0 and 1"
  if what == "multi-label indicator 2, weight-0 head":
    labels["tags"][4, 1] = 2
    return features, labels, "head 'tags': labels must be"
  raise AssertionError(what)


PROBLEMS = [
    "class id too large",
    "negative class id",
    "binary label 2",
    "NaN regression label",
    "NaN feature",
    "negative weight",
    "NaN weight",
    "mask not 0/1",
    "multi-label indicator 2, weight-0 head",
]


@pytest.fixture(scope="module")
def steps():
  optimizer = optax.sgd(0.1)
  return {
      "train": jax.jit(training.make_train_step(HEAD, apply_fn, optimizer)),
      "train_unchecked": jax.jit(training.make_train_step(HEAD, apply_fn, optimizer, checks=False)),
      "eval": jax.jit(training.make_eval_step(HEAD, apply_fn)),
      "opt_state": optimizer.init(init_params()),
  }


@pytest.mark.parametrize("what", PROBLEMS)
def test_train_step_names_the_head_and_the_problem(steps, what):
  features, labels, message = corrupt(*make_batch(), what)
  params = init_params()
  _, _, out = steps["train"](params, steps["opt_state"], features, labels)
  with pytest.raises(ValueCheckError, match="^" + message.replace("(", r"\(").replace(")", r"\)")
                     .replace("[", r"\[").replace("]", r"\]")):
    float(out.loss)


@pytest.mark.parametrize("what", ["class id too large", "NaN feature", "mask not 0/1"])
def test_eval_step_raises_on_merge_and_compute(steps, what):
  features, labels, message = corrupt(*make_batch(), what)
  stats = steps["eval"](init_params(), features, labels)
  with pytest.raises(ValueCheckError, match=message[:20]):
    jheads.metrics.compute(stats)
  with pytest.raises(ValueCheckError, match=message[:20]):
    jheads.metrics.merge(stats, stats)


def test_passing_data_gives_the_unchecked_numbers_exactly(steps):
  features, labels = make_batch()
  params = init_params()
  p1, _, out1 = steps["train"](params, steps["opt_state"], features, labels)
  p0, _, out0 = steps["train_unchecked"](params, steps["opt_state"], features, labels)
  assert float(out1.loss) == float(out0.loss)
  np.testing.assert_array_equal(np.asarray(out1.head_losses), np.asarray(out0.head_losses))
  for a, b in zip(jax.tree.leaves(p1), jax.tree.leaves(p0)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_single_head_step_defers_and_names_the_problem():
  head = jheads.multi_class_head(3, name="topic")
  optimizer = optax.sgd(0.1)
  params = {"w": jnp.ones((N_FEATURES, 3)) / 4, "b": jnp.zeros(3)}
  step = jax.jit(training.make_train_step(head, apply_fn, optimizer))
  features, _ = make_batch()
  good = np.arange(BATCH, dtype=np.int32) % 3
  _, _, out = step(params, optimizer.init(params), features, good)
  assert np.isfinite(float(out.loss))
  bad = good.copy()
  bad[2] = 3
  _, _, out = step(params, optimizer.init(params), features, bad)
  with pytest.raises(ValueCheckError, match=r"^head 'topic': labels must be class ids in \[0, 3\)"):
    float(out.loss)


def reductions_outside_conditionals(jaxpr):
  """Reductions a step always runs: those of `jaxpr` and its sub-jaxprs, but not of `cond` branches."""
  count = 0
  for eqn in jaxpr.eqns:
    if eqn.primitive.name.startswith(("reduce_", "argmin", "argmax")):
      count += 1
    if eqn.primitive.name == "cond":
      continue
    for param in eqn.params.values():
      for sub in param if isinstance(param, (list, tuple)) else [param]:
        inner = getattr(sub, "jaxpr", sub)
        if hasattr(inner, "eqns"):
          count += reductions_outside_conditionals(inner)
  return count


def test_checks_add_almost_nothing_to_the_compiled_step(steps):
  """The deferred checks: one reduction over the losses (plus the multi-class logits' rows).

  Checked one by one, the 5 heads' 12 conditions would reduce over the
  batch once each, and once more each to find the first failure.
  """
  features, labels = make_batch()
  args = (init_params(), steps["opt_state"], features, labels)
  counts = {
      name: reductions_outside_conditionals(jax.make_jaxpr(steps[name])(*args).jaxpr)
      for name in ("train", "train_unchecked")
  }
  assert counts["train"] <= counts["train_unchecked"] + 4, counts


def test_without_deferral_the_checks_would_cost_a_pass_each(monkeypatch, steps):
  """The contrast that makes the test above meaningful: checks staged one by one."""
  monkeypatch.setattr(jheads.checks, "deferrable", lambda *operands: False)
  step = jax.jit(training.make_train_step(HEAD, apply_fn, optax.sgd(0.1)))
  features, labels = make_batch()
  args = (init_params(), steps["opt_state"], features, labels)
  eager = reductions_outside_conditionals(jax.make_jaxpr(step)(*args).jaxpr)
  unchecked = reductions_outside_conditionals(jax.make_jaxpr(steps["train_unchecked"])(*args).jaxpr)
  assert eager >= unchecked + 20, (eager, unchecked)
  # And they still name the problem.
  features, labels, message = corrupt(features, labels, "class id too large")
  _, _, out = step(init_params(), steps["opt_state"], features, labels)
  with pytest.raises(ValueCheckError, match=message[:25]):
    float(out.loss)


@pytest.mark.skipif(jax.device_count() < 8, reason="needs 8 devices")
@pytest.mark.parametrize("mode", ["sharded_jit", "shard_map"])
def test_eight_devices_name_the_problem(mode):
  mesh = jax.make_mesh((8,), ("batch",))
  optimizer = optax.sgd(0.1)
  if mode == "sharded_jit":
    step = jax.jit(training.make_train_step(HEAD, apply_fn, optimizer))
  else:
    step = jax.jit(
        jax.shard_map(
            training.make_train_step(HEAD, apply_fn, optimizer, axis_name="batch"),
            mesh=mesh,
            in_specs=(P(), P(), P("batch"), P("batch")),
            out_specs=P(),
        )
    )
  params = init_params()
  for what in ("class id too large", "NaN regression label"):
    features, labels, message = corrupt(*make_batch(), what)
    with jax.set_mesh(mesh):
      shard = lambda tree: jax.device_put(tree, NamedSharding(mesh, P("batch")))
      replicate = lambda tree: jax.device_put(tree, NamedSharding(mesh, P()))
      _, _, out = step(
          replicate(params), replicate(optimizer.init(params)), shard(features), shard(labels)
      )
    with pytest.raises(ValueCheckError, match=message[:25]):
      float(out.loss)


def test_device_get_of_the_outputs_raises(steps):
  features, labels, message = corrupt(*make_batch(), "class id too large")
  params = init_params()
  _, _, out = steps["train"](params, steps["opt_state"], features, labels)
  with pytest.raises(ValueCheckError, match=message[:25]):
    jax.device_get(out)
  with pytest.raises(ValueCheckError, match=message[:25]):
    jax.device_get(steps["eval"](params, features, labels))
  # Passing outputs come back as host values.
  _, _, out = steps["train"](params, steps["opt_state"], *make_batch())
  host = jax.device_get(out)
  assert isinstance(host.loss, np.ndarray) and np.isfinite(host.loss)


def test_representation_step_checks_values():
  from jheads import aggregation

  head = jheads.multi_head([jheads.regression_head(name="a"), jheads.multi_class_head(3, name="b")])
  trunk_fn = lambda params, features: jnp.tanh(features["x"] @ params["trunk"])
  heads_fn = lambda params, z: z @ params["heads"]
  params = {"trunk": jnp.ones((N_FEATURES, 4)) / 4, "heads": jnp.ones((4, 4)) / 4}
  optimizer = optax.sgd(0.1)
  state = training.init_train_state(head, optimizer, params, aggregator=aggregation.upgrad())
  features = {"x": np.ones((BATCH, N_FEATURES), np.float32)}
  labels = {"a": np.zeros(BATCH, np.float32), "b": np.full(BATCH, 3, np.int32)}
  for checks in (True, False):
    step = jax.jit(training.make_representation_train_step(
        head, trunk_fn, heads_fn, optimizer, aggregator=aggregation.upgrad(), checks=checks))
    _, _, out = step(params, state, features, labels)
    if checks:
      with pytest.raises(ValueCheckError, match=r"^head 'b': labels must be class ids in \[0, 3\)"):
        float(out.loss)
    else:
      float(out.loss)  # unchecked: a number, whatever the labels


def test_plain_step_given_a_train_state_says_what_it_takes():
  optimizer = optax.sgd(0.1)
  params = init_params()
  state = training.init_train_state(HEAD, optimizer, params)
  step = jax.jit(training.make_train_step(HEAD, apply_fn, optimizer))
  with pytest.raises(ValueError, match="takes the optimizer's state, optimizer.init"):
    step(params, state, *make_batch())


def test_eval_shape_of_a_checked_step_reads_shapes():
  step = training.make_train_step(HEAD, apply_fn, optax.sgd(0.1))
  params = init_params()
  _, _, out = jax.eval_shape(step, params, optax.sgd(0.1).init(params), *make_batch())
  assert out.loss.shape == () and out.head_losses.stacked.shape == (len(HEADS),)
