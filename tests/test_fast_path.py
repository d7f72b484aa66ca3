"""The grouped (vectorized) multi_head path computes what the per-head path does.

Every test builds the same heads twice, `vectorize=True` and `vectorize=False`,
and compares loss, gradients, per-head losses, every metric and every
prediction to 1e-6. Each head family appears at least twice so that it forms
a group, with and without weight columns, with dict and with array logits.
"""

import jax
import jax.extend
import jax.numpy as jnp
import numpy as np
import pytest

import jheads
from jheads import metrics

TOLERANCE = dict(rtol=1e-6, atol=1e-6)


def _weights(key):
  return lambda features: features[key]


def make_heads():
  """Two or more heads of every family and option, interleaved on purpose."""
  return [
      jheads.binary_classification_head(name="bin0", thresholds=[0.25, 0.7]),
      jheads.multi_class_head(4, name="mc0"),
      jheads.binary_classification_head(name="bin1", thresholds=[0.25, 0.7]),
      jheads.regression_head(name="reg0", label_dimension=3, weight_column="wd3a"),
      jheads.multi_label_head(
          3, name="ml0", thresholds=[0.5], classes_for_class_based_metrics=[0, 2]
      ),
      jheads.binary_classification_head(
          name="bin2", thresholds=[0.25, 0.7], weight_column="w_bin2"
      ),
      jheads.multi_class_head(4, name="mc1"),
      jheads.regression_head(name="reg1", label_dimension=3, weight_column="wd3b"),
      jheads.multi_label_head(
          3, name="ml1", thresholds=[0.5], classes_for_class_based_metrics=[0, 2]
      ),
      jheads.poisson_regression_head(name="poi0", weight_column="w_shared"),
      jheads.poisson_regression_head(name="poi1", weight_column="w_shared"),
      jheads.logistic_regression_head(name="lr0"),
      jheads.logistic_regression_head(name="lr1", weight_column=_weights("w_lr1")),
      jheads.regression_head(name="reg2"),
      jheads.regression_head(name="reg3"),
      jheads.binary_classification_head(
          name="bin3", thresholds=[0.25, 0.7], weight_column="w_bin3"
      ),
      jheads.multi_class_head(4, name="mc2", weight_column="w_shared"),
      jheads.multi_class_head(4, name="mc3", weight_column="w_shared"),
  ]


def make_data(heads, batch_shape=(6,), seed=0):
  """Logits (array and dict), labels and features for `heads`."""
  rng = np.random.default_rng(seed)
  dims = [h.logits_dim for h in heads]
  logits = rng.normal(size=batch_shape + (sum(dims),)).astype(np.float32) * 2
  labels = {}
  for head in heads:
    kind, dim = head.config.kind, head.logits_dim
    if kind == "binary_classification":
      labels[head.name] = rng.integers(0, 2, batch_shape).astype(np.float32)
    elif kind == "multi_class":
      labels[head.name] = rng.integers(0, dim, batch_shape + (1,)).astype(np.int32)
    elif kind == "multi_label":
      labels[head.name] = rng.integers(0, 2, batch_shape + (dim,)).astype(np.int32)
    elif kind == "poisson_regression":
      labels[head.name] = rng.poisson(2.0, batch_shape + (dim,)).astype(np.float32)
    elif kind == "logistic_regression":
      labels[head.name] = rng.uniform(size=batch_shape + (dim,)).astype(np.float32)
    else:
      labels[head.name] = rng.normal(size=batch_shape + (dim,)).astype(np.float32)
  features = {
      "wd3a": rng.uniform(size=batch_shape + (3,)).astype(np.float32),
      "wd3b": rng.uniform(size=batch_shape + (3,)).astype(np.float32),
      "w_bin2": rng.uniform(size=batch_shape).astype(np.float32),
      "w_bin3": rng.uniform(size=batch_shape + (1,)).astype(np.float32),
      "w_lr1": rng.uniform(size=batch_shape).astype(np.float32),
      # Zero weights exercise the safe divisions of the loss reductions.
      "w_shared": np.where(rng.uniform(size=batch_shape) < 0.3, 0.0, 1.5).astype(
          np.float32
      ),
  }
  offsets = np.cumsum([0] + dims)
  logits_dict = {
      h.name: logits[..., offsets[i] : offsets[i + 1]] for i, h in enumerate(heads)
  }
  return logits, logits_dict, labels, features


def both_paths(heads=None, head_weights=None):
  heads = make_heads() if heads is None else heads
  return (
      jheads.multi_head(heads, head_weights),
      jheads.multi_head(heads, head_weights, vectorize=False),
  )


def assert_trees_close(actual, expected):
  assert jax.tree.structure(actual) == jax.tree.structure(expected)
  for a, e in zip(jax.tree.leaves(actual), jax.tree.leaves(expected)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(e), **TOLERANCE)


def evaluate(head, logits, labels, features, *, jit=True, finalize=False):
  """Loss, gradients, per-head losses, metric statistics and predictions.

  Equal statistics give equal metrics; `finalize` also computes the metrics
  (a large graph to compile, so only some tests do).
  """

  def run(logits, labels, features):
    loss, grads = jax.value_and_grad(head.loss_fn)(logits, labels, features)
    stats = head.metric_fn(logits, labels, features)
    return {
        "loss": loss,
        "grads": grads,
        "head_losses": dict(head.head_losses_fn(logits, labels, features)),
        "stats": dict(stats),
        "metrics": metrics.compute(stats) if finalize else {},
        "predictions": head.predict_fn(logits),
    }

  return (jax.jit(run) if jit else run)(logits, labels, features)


@pytest.mark.parametrize(
    "logits_form, batch_shape", [("array", (6,)), ("dict", (3, 4))]
)
def test_grouped_path_matches_per_head_path(logits_form, batch_shape):
  heads = make_heads()
  grouped, per_head = both_paths(heads, head_weights=np.linspace(0.5, 2.0, len(heads)))
  logits, logits_dict, labels, features = make_data(heads, batch_shape)
  inputs = logits if logits_form == "array" else logits_dict
  finalize = logits_form == "array"
  actual = evaluate(grouped, inputs, labels, features, finalize=finalize)
  expected = evaluate(per_head, inputs, labels, features, finalize=finalize)
  assert_trees_close(actual, expected)
  if finalize:  # Every metric of every head is there.
    assert "auc/class2/ml1" in actual["metrics"]
    assert "recall/positive_threshold_0.7/bin3" in actual["metrics"]
    assert "loss/poi1" in actual["metrics"]


def test_grouped_path_matches_eagerly():
  """Concrete inputs take the same grouped path, outside jit."""
  heads = [
      jheads.binary_classification_head(name="b0", weight_column="w"),
      jheads.regression_head(name="r0", label_dimension=2, weight_column="wr0"),
      jheads.binary_classification_head(name="b1", weight_column="w"),
      jheads.regression_head(name="r1", label_dimension=2, weight_column="wr1"),
  ]
  grouped, per_head = both_paths(heads)
  logits, _, labels, _ = make_data(heads)
  rng = np.random.default_rng(3)
  features = {
      "w": rng.uniform(size=logits.shape[:1]).astype(np.float32),
      "wr0": rng.uniform(size=logits.shape[:1] + (2,)).astype(np.float32),
      "wr1": rng.uniform(size=logits.shape[:1] + (2,)).astype(np.float32),
  }
  assert_trees_close(
      evaluate(grouped, logits, labels, features, jit=False, finalize=True),
      evaluate(per_head, logits, labels, features, jit=False, finalize=True),
  )


def test_traced_head_weights_match():
  heads = make_heads()
  grouped, per_head = both_paths(heads)
  logits, _, labels, features = make_data(heads, seed=2)
  head_weights = jnp.arange(len(heads), dtype=jnp.float32) / 7

  @jax.jit
  def losses(logits, labels, features, head_weights):
    return [
        jax.value_and_grad(h.loss_fn, argnums=(0,))(
            logits, labels, features, head_weights=head_weights
        )
        for h in (grouped, per_head)
    ]

  actual, expected = losses(logits, labels, features, head_weights)
  assert_trees_close(actual, expected)


def _ops_writing(shape, fn, *args):
  """Names of the primitives in `fn`'s jaxpr whose output has `shape`."""
  names = []

  def walk(jaxpr):
    for eqn in jaxpr.eqns:
      if any(getattr(v.aval, "shape", None) == shape for v in eqn.outvars):
        names.append(eqn.primitive.name)
      for sub in jax.extend.core.jaxprs_in_params(eqn.params):
        walk(sub)

  walk(jax.make_jaxpr(fn)(*args).jaxpr)
  return names


@pytest.mark.parametrize("interleaved", [True, False], ids=["gather", "slice"])
def test_array_logits_are_read_once(interleaved):
  """No per-head slices of the logits survive in the gradient.

  The gradient of a per-head slice is a pad of the whole logits array, one
  per head. Grouped heads read their columns with one gather for all groups
  (none when like heads are adjacent), then one slice per group.
  """
  n = 6
  kinds = [
      lambda i: jheads.binary_classification_head(name=f"b{i}"),
      lambda i: jheads.multi_class_head(3, name=f"m{i}"),
  ]
  if interleaved:
    heads = [kinds[i % 2](i) for i in range(n)]
  else:
    heads = [kinds[i * 2 // n](i) for i in range(n)]
  grouped, per_head = both_paths(heads)
  logits, _, labels, _ = make_data(heads)

  def grad(head):
    return lambda logits, labels: jax.grad(head.loss_fn)(logits, labels)

  fast = _ops_writing(logits.shape, grad(grouped), logits, labels)
  slow = _ops_writing(logits.shape, grad(per_head), logits, labels)
  assert slow.count("pad") == n
  assert fast.count("pad") == 2  # one per group
  assert fast.count("scatter-add") == (1 if interleaved else 0)  # the gather's gradient
  np.testing.assert_allclose(
      grad(grouped)(logits, labels), grad(per_head)(logits, labels), **TOLERANCE
  )


def test_shared_weight_column_is_not_copied_per_head():
  """Heads sharing a weight column get it once, not stacked per head."""
  n = 8
  heads = [
      jheads.binary_classification_head(name=f"b{i}", weight_column="w")
      for i in range(n)
  ]
  grouped, per_head = both_paths(heads)
  logits, _, labels, _ = make_data(heads)
  features = {"w": np.linspace(0.0, 2.0, logits.shape[0]).astype(np.float32)}
  jaxpr = jax.make_jaxpr(grouped.loss_fn)(logits, labels, features)
  stacked_shapes = [
      tuple(v.aval.shape) for e in jaxpr.eqns for v in e.outvars
      if e.primitive.name in ("concatenate", "stack")
  ]
  assert (n, logits.shape[0]) in stacked_shapes  # the labels are stacked...
  assert stacked_shapes.count((n, logits.shape[0])) == 1  # ...the weights are not.
  assert_trees_close(
      evaluate(grouped, logits, labels, features),
      evaluate(per_head, logits, labels, features),
  )


def test_grouped_path_under_explicit_sharding():
  """Batch-sharded inputs with explicit mesh axes give the unsharded numbers."""
  mesh = jax.make_mesh(
      (len(jax.devices()),), ("data",), axis_types=(jax.sharding.AxisType.Explicit,)
  )
  heads = make_heads()
  grouped, _ = both_paths(heads)
  logits, _, labels, features = make_data(heads, batch_shape=(2 * len(jax.devices()),))
  expected = evaluate(grouped, logits, labels, features)
  with jax.set_mesh(mesh):
    sharding = jax.sharding.NamedSharding(mesh, jax.P("data"))
    args = jax.device_put((logits, labels, features), sharding)
    actual = evaluate(grouped, *args)
  assert_trees_close(actual, expected)
