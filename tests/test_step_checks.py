"""Value checks in the jitted step builders (issue 8): bad data raises when the outputs are read.

The steps are built as the README builds them, `jax.jit(training.make_*_step(...))`.
Screened heads (every built-in but ranking) compute their checks inside the
loss' own pass (`Batch.screen`): each reduces to the first failing problem's
code beside its loss, and one check names the head and the problem from
those codes. These tests pin the messages
for every kind of bad value, on one device, under sharded jit and under
shard_map (each shard its own screens), and that passing data gives exactly
the numbers of `checks=False`.
"""

import re

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


def compiled_kernels(step, args):
  """The operations a compiled step runs: its entry computation's fusions and other kernels."""
  text = step.lower(*args).compile().as_text()
  ops = re.findall(r"= \S+ (\w[\w-]*)\(", text[text.index("ENTRY"):])
  return sum(op not in ("parameter", "constant", "tuple", "get-tuple-element", "bitcast") for op in ops)


def test_checks_add_almost_nothing_to_the_compiled_step(steps):
  """The screened checks ride on the losses' own pass: a few small kernels, no pass per check.

  The 5 heads' 12 conditions fuse into the kernels that compute the
  losses; what is left is one reduction of all groups' screens and a few
  scalars (measured: 25 kernels unchecked, 29 checked).
  """
  features, labels = make_batch()
  args = (init_params(), steps["opt_state"], features, labels)
  checked = compiled_kernels(steps["train"], args)
  unchecked = compiled_kernels(steps["train_unchecked"], args)
  assert checked <= unchecked + 6, (checked, unchecked)


def test_without_deferral_the_checks_would_cost_a_pass_each(monkeypatch, steps):
  """The contrast that makes the test above meaningful: checks staged one by one (44 kernels)."""
  monkeypatch.setattr(jheads.checks, "deferrable", lambda *operands: False)
  step = jax.jit(training.make_train_step(HEAD, apply_fn, optax.sgd(0.1)))
  features, labels = make_batch()
  args = (init_params(), steps["opt_state"], features, labels)
  eager = compiled_kernels(step, args)
  unchecked = compiled_kernels(steps["train_unchecked"], args)
  assert eager >= unchecked + 15, (eager, unchecked)
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


@pytest.mark.skipif(jax.device_count() < 8, reason="needs 8 devices")
def test_pmap_names_the_problem_from_any_shard():
  optimizer = optax.sgd(0.1)
  step = jax.pmap(
      training.make_train_step(HEAD, apply_fn, optimizer, axis_name="batch"), axis_name="batch"
  )
  params = init_params()
  replicate = lambda tree: jax.tree.map(lambda x: np.stack([np.asarray(x)] * 8), tree)
  split = lambda tree: jax.tree.map(lambda x: np.asarray(x).reshape(8, -1, *np.shape(x)[1:]), tree)
  for what in ("class id too large", "NaN regression label"):
    features, labels, message = corrupt(*make_batch(), what)
    _, _, out = step(
        replicate(params), replicate(optimizer.init(params)), split(features), split(labels)
    )
    with pytest.raises(ValueCheckError, match=message[:25]):
      out.loss
  _, _, out = step(
      replicate(params), replicate(optimizer.init(params)), *map(split, make_batch())
  )
  assert np.all(np.isfinite(np.asarray(out.loss)))


def test_step_errors_leave_the_step_as_one_vector(steps):
  """Every output costs dispatch a buffer: checkify's flag, code and payload travel packed."""
  _, _, out = steps["train"](init_params(), steps["opt_state"], *make_batch())
  leaves = jax.tree.leaves(tuple.__getitem__(out, len(out) - 1))
  assert len(leaves) == 1 and leaves[0].dtype == jnp.int32 and leaves[0].ndim == 1


@pytest.mark.parametrize("dtype", [np.bool_, np.int8, np.uint8, np.int32, np.uint32, np.float16, np.float32])
def test_step_errors_pack_scalars_bit_for_bit(dtype):
  from jheads.checks import _pack, _unpack

  values = {
      np.bool_: [True, False], np.int8: [-128, 127], np.uint8: [0, 255],
      np.int32: [-(2**31), 2**31 - 1], np.uint32: [0, 2**32 - 1],
      np.float16: [-65504.0, np.inf], np.float32: [np.nan, -0.0],
  }[dtype]
  leaves = [np.asarray(v, dtype) for v in values]
  packed = _pack(leaves)
  for unpacked in (_unpack(np.asarray(packed), [np.dtype(dtype)] * 2),
                   jax.jit(lambda p: _unpack(p, [np.dtype(dtype)] * 2))(packed)):
    for got, want in zip(unpacked, leaves):
      assert np.asarray(got).dtype == want.dtype
      assert np.asarray(got).tobytes() == want.tobytes()


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
