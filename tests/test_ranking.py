"""The ranking head: TF-Ranking's published vectors (spec R12), its numbers on random cases
(tests/data/tfr_ranking.json, made by tests/reference/make_tfr_ranking_vectors.py), and
the jheads contract (jit, vmap, grad, streaming, psum, padding never read, errors)."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import jheads
from jheads import metrics
from jheads.heads import ranking
from jheads.heads.ranking import ranking_head

F32 = np.float32
DATA = os.path.join(os.path.dirname(__file__), "data", "tfr_ranking.json")


def values(stats):
  return {key: float(value) for key, value in metrics.compute(stats).items()}


# One compiled call costs less than the hundreds of small compiles of an eager one.


def metric(head, logits, labels, features=None):
  stats = jax.jit(head.metric_fn)(np.asarray(logits, F32), np.asarray(labels, F32), features)
  return values(stats)


def loss(head, logits, labels, features=None):
  return float(jax.jit(head.loss_fn)(np.asarray(logits, F32), np.asarray(labels, F32), features))


# ---------------------------------------------------------------------------- R12 metrics
# tensorflow_ranking/python/metrics_test.py (MetricsTest); no score ties.

SCORES = [[1.0, 3.0, 2.0], [1.0, 2.0, 3.0]]
LABELS = [[0.0, 0.0, 1.0], [0.0, 1.0, 2.0]]
ITEM_WEIGHTS = [[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]]
ALL_METRICS = (
    "mrr", "mrr@1", "arp", "precision", "precision@1", "precision@2",
    "map", "map@1", "map@2", "ndcg", "ndcg@1", "recall", "recall@1", "recall@2",
)


def test_metrics_published_list_0_alone():
  got = metric(ranking_head(metrics=ALL_METRICS), SCORES[:1], LABELS[:1])
  expected = {
      "mrr": 0.5, "arp": 2.0, "precision": 1 / 3, "precision@1": 0.0, "precision@2": 0.5,
      "map": 0.5, "map@1": 0.0, "map@2": 0.5, "ndcg": 1 / np.log2(3),
  }
  for key, value in expected.items():
    np.testing.assert_allclose(got[key], value, rtol=1e-6, err_msg=key)


def test_metrics_published_both_lists():
  head = ranking_head(metrics=ALL_METRICS, weight_column="w")
  got = metric(head, SCORES, LABELS, {"w": np.ones((2, 3), F32)})
  expected = {
      "mrr": 0.75, "mrr@1": 0.5, "arp": 1.5, "precision": 0.5, "map": 0.75,
      "ndcg": (1 / np.log2(3) + 1) / 2,
  }
  for key, value in expected.items():
    np.testing.assert_allclose(got[key], value, rtol=1e-6, err_msg=key)
  np.testing.assert_allclose(got["ndcg"], 0.815465, rtol=1e-6)


def test_metrics_published_item_weights():
  head = ranking_head(metrics=("mrr", "arp"), weight_column="w")
  got = metric(head, SCORES, LABELS, {"w": np.asarray(ITEM_WEIGHTS, F32)})
  np.testing.assert_allclose(got["mrr"], (3 * 0.5 + 5.5 * 1) / (3 + 5.5), rtol=1e-6)
  np.testing.assert_allclose(got["mrr"], 0.823529, rtol=1e-6)
  np.testing.assert_allclose(got["arp"], (3 * 1 * 2 + 6 * 2 * 1 + 5 * 1 * 2) / (3 + 12 + 5), rtol=1e-6)
  head = ranking_head(metrics=("ndcg@1", "ndcg"), weight_column="w")
  got = metric(head, SCORES[:1], LABELS[:1], {"w": np.asarray(ITEM_WEIGHTS[:1], F32)})
  assert got["ndcg@1"] == 0.0
  np.testing.assert_allclose(got["ndcg"], (3 / np.log2(3)) / 3, rtol=1e-6)


@pytest.mark.parametrize("shape", [(2,), (2, 1)])
def test_metrics_published_list_weights(shape):
  head = ranking_head(metrics=("ndcg",), weight_column="w")
  got = metric(head, SCORES, LABELS, {"w": np.asarray([1.0, 0.0], F32).reshape(shape)})
  np.testing.assert_allclose(got["ndcg"], 0.630930, rtol=1e-6)


def test_recall_published():
  labels = [[1.0, 0.0, 1.0], [0.0, 1.0, 2.0]]
  head = ranking_head(metrics=("recall", "recall@1", "recall@2"))
  got = metric(head, SCORES[:1], labels[:1])
  assert (got["recall"], got["recall@1"], got["recall@2"]) == (1.0, 0.0, 0.5)
  np.testing.assert_allclose(metric(head, SCORES, labels)["recall@2"], 0.75, rtol=1e-6)


def test_labels_and_logits_means_published():
  got = metric(ranking_head(metrics=()), SCORES, [[0.0, 0.0, 1.0], [0.0, 0.0, 2.0]])
  assert got["labels_mean"] == 0.5 and got["logits_mean"] == 2.0


# ---------------------------------------------------------------------------- R12 losses
# tensorflow_ranking/python/losses_test.py (LossesTest).

LOSS_LABELS = [[0.0, 0.0, 1.0], [0.0, 0.0, 2.0]]
LIST_WEIGHTS = {"w": np.asarray([[2.0], [1.0]], F32)}


@pytest.mark.parametrize(
    "name, scores, labels, plain, weighted",
    [
        ("softmax", SCORES, LOSS_LABELS, 1.111409, 1.815212),
        ("softmax_loss", SCORES, LOSS_LABELS, 1.111409, 1.815212),
        ("pairwise_logistic", SCORES, LOSS_LABELS, 0.516678, 0.923309),
        ("pairwise_hinge", SCORES, LOSS_LABELS, 0.5, 1.0),
        ("sigmoid_cross_entropy", [[0.2, 0.5, 0.3], [0.2, 0.3, 0.5]],
         [[0.0, 0.0, 1.0], [0.0, 0.0, 1.0]], 0.742190, 1.129952),
        ("mean_squared", [[0.2, 0.5, 0.3], [0.2, 0.3, 0.5]],
         [[0.0, 0.0, 1.0], [0.0, 0.0, 1.0]], 0.193333, 0.323333),
    ],
)
def test_losses_published(name, scores, labels, plain, weighted):
  np.testing.assert_allclose(loss(ranking_head(loss=name), scores, labels), plain, rtol=1e-5)
  head = ranking_head(loss=name, weight_column="w")
  np.testing.assert_allclose(loss(head, scores, labels, LIST_WEIGHTS), weighted, rtol=1e-5)


@pytest.mark.parametrize("name, value", [("pairwise_logistic", 3.253047), ("pairwise_hinge", 4.0)])
def test_pairwise_item_weights_published(name, value):
  head = ranking_head(loss=name, weight_column="w")
  got = loss(head, SCORES[:1], LOSS_LABELS[:1], {"w": np.asarray([[2.0, 3.0, 4.0]], F32)})
  np.testing.assert_allclose(got, value, rtol=1e-5)


APPROX_SCORES = [[1.4, -2.8, -0.4], [0.0, 1.8, 10.2], [1.0, 1.2, -3.2]]
APPROX_LABELS = [[0.0, 2.0, 1.0], [1.0, 0.0, 3.0], [0.0, 0.0, 0.0]]


def test_approx_ndcg_published():
  expected = -(
      (3 / np.log(4) + 1 / np.log(3)) / (3 / np.log(2) + 1 / np.log(3))
      + (7 / np.log(2) + 1 / np.log(4)) / (7 / np.log(2) + 1 / np.log(3))
  )
  np.testing.assert_allclose(expected, -1.569725, rtol=1e-6)
  head = ranking_head(loss="approx_ndcg", loss_reduction="sum")
  np.testing.assert_allclose(loss(head, APPROX_SCORES, APPROX_LABELS), expected, rtol=1e-5)
  head = ranking_head(loss="approx_ndcg", loss_reduction="sum", weight_column="w")
  weights = {"w": np.asarray([[2.0], [1.0], [1.0]], F32)}
  np.testing.assert_allclose(loss(head, APPROX_SCORES, APPROX_LABELS, weights), -2.156608, rtol=1e-5)
  head = ranking_head(loss="approx_ndcg")
  np.testing.assert_allclose(loss(head, APPROX_SCORES, APPROX_LABELS), -0.784862, rtol=1e-5)


# ---------------------------------------------------------------------------- R10 bug vectors


def test_softmax_padding_is_exact_for_very_negative_logits():
  head = ranking_head()
  got = loss(head, [[-30.0, -31.0, 0.0, 0.0]], [[1.0, 0.0, -1.0, -1.0]])
  np.testing.assert_allclose(got, 0.313262, rtol=1e-5)  # TF-Ranking: 7.667937
  np.testing.assert_allclose(got, np.log1p(np.exp(-1.0)), rtol=1e-6)


def test_approx_ndcg_average_loss_uses_the_temperature():
  head = ranking_head(loss="approx_ndcg", metrics=())
  got = metric(head, APPROX_SCORES[:2], APPROX_LABELS[:2])["average_loss"]
  np.testing.assert_allclose(got, -0.784862, rtol=1e-5)  # TF-Ranking's metric: -0.791004


def test_list_without_relevance_keeps_its_weight():
  head = ranking_head(metrics=("mrr",), weight_column="w")
  got = metric(head, [[0.0, 1.0], [1.0, 0.0]], [[1.0, 0.0], [0.0, 0.0]], {"w": np.asarray([1.0, 9.0], F32)})
  np.testing.assert_allclose(got["mrr"], 0.05, rtol=1e-6)  # TF-Ranking: 0.25


def test_all_padding_list_weighs_nothing():
  head = ranking_head(metrics=("ndcg",))
  got = metric(head, [[1.0, 2.0, 0.0], [0.0, 0.0, 0.0]], [[1.0, 0.0, -1.0], [-1.0, -1.0, -1.0]])
  np.testing.assert_allclose(got["ndcg"], 0.630930, rtol=1e-6)  # TF-Ranking: 0.315465


# ---------------------------------------------------------------------------- TF-Ranking, random cases

with open(DATA) as f:
  REFERENCE = json.load(f)

FILLS = {"none": None, "nan": np.nan, "inf": np.inf, "-inf": -np.inf, "huge": 1e30}


def reference_reductions(columns):
  # Without weights the reductions differ only in their denominators, which the
  # weighted group checks in full; two keep that group's compile short.
  return REFERENCE["reductions"] if columns else ["sum_over_nonzero_weights", "sum_over_batch_size"]


def reference_heads(columns):
  """One head per (loss config, reduction), and two metric heads."""
  kwargs = dict(weight_column="w", mask_column="m") if columns else {}
  heads = {
      (name, reduction): ranking_head(
          loss=config["loss"], temperature=config["temperature"], metrics=(),
          loss_reduction=reduction, **kwargs,
      )
      for name, config in REFERENCE["loss_configs"].items()
      for reduction in reference_reductions(columns)
  }
  # A mapping of every loss reports every average_loss_<loss>.
  every_loss = {name: 1.0 for name in ranking.LOSSES}
  stats_heads = {
      "all": ranking_head(loss=every_loss, metrics=tuple(REFERENCE["metrics"]), **kwargs),
      "approx_ndcg_t0.5": ranking_head(loss="approx_ndcg", temperature=0.5, metrics=(), **kwargs),
  }
  return heads, stats_heads


def group_inputs(group):
  cases, shape = group["cases"], tuple(group["shape"])
  labels = np.asarray([c["labels"] for c in cases], F32)
  logits = np.asarray([c["logits"] for c in cases], F32)
  weights = np.asarray([c["weights"] if c["weights"] is not None else np.ones(shape) for c in cases], F32)
  masks = np.asarray([c["mask"] if c["mask"] is not None else np.ones(shape, bool) for c in cases])
  # Invalid items get the case's garbage (NaN, inf, ...): never read.
  garbage = logits.copy()
  for i, case in enumerate(cases):
    fill = FILLS[case["fill"]]
    if fill is not None:
      garbage[i] = np.where((labels[i] >= 0) & masks[i], logits[i], F32(fill))
  return labels, logits, garbage, weights, masks


@pytest.fixture(scope="module", params=[g["name"] for g in REFERENCE["groups"]])
def reference_group(request):
  group = next(g for g in REFERENCE["groups"] if g["name"] == request.param)
  heads, stats_heads = reference_heads(group["columns"])
  labels, logits, garbage, weights, masks = group_inputs(group)

  def evaluate(garbage, logits, labels, weights, masks):
    features = {"w": weights, "m": masks} if group["columns"] else None
    losses = {key: head.loss_fn(garbage, labels, features) for key, head in heads.items()}
    stats = {key: metrics.compute(h.metric_fn(garbage, labels, features)) for key, h in stats_heads.items()}
    ranks = stats_heads["all"].predict_fn(logits)["ranks"]
    return losses, stats, ranks

  got = jax.jit(jax.vmap(evaluate))(garbage, logits, labels, weights, masks)
  return group, jax.tree.map(np.asarray, got)


def close(got, want):
  return abs(got - want) <= 1e-4 + 1e-4 * abs(want)


def test_losses_equal_tf_ranking(reference_group):
  group, (losses, _, _) = reference_group
  compared = 0
  for i, case in enumerate(group["cases"]):
    for name, by_reduction in case["loss"].items():
      for reduction in reference_reductions(group["columns"]):
        got, want = float(losses[(name, reduction)][i]), by_reduction[reduction]
        assert close(got, want), (group["name"], i, name, reduction, got, want)
        compared += 1
  assert compared >= 16 * len(group["cases"])


def test_metrics_equal_tf_ranking(reference_group):
  group, (_, stats, _) = reference_group
  unchanged = 0
  for i, case in enumerate(group["cases"]):
    for key, want in case["metrics"].items():
      got = float(stats["all"][key][i])
      assert close(got, want), (group["name"], i, key, got, want)
      # Where the spec's list weights change nothing, TF-Ranking's own value holds too.
      if not case["weights_fixed"]:
        assert close(got, case["tf_metrics"][key]), (group["name"], i, key)
        unchanged += 1
    for key in ("labels_mean", "logits_mean"):
      assert close(float(stats["all"][key][i]), case[key]), (group["name"], i, key)
  assert unchanged > 0


def test_average_losses_equal_tf_ranking(reference_group):
  group, (_, stats, _) = reference_group
  for i, case in enumerate(group["cases"]):
    for name, want in case["average_loss"].items():
      if name == "approx_ndcg_t0.5":
        got = float(stats["approx_ndcg_t0.5"]["average_loss"][i])
      else:
        got = float(stats["all"][f"average_loss_{name}"][i])
      assert close(got, want), (group["name"], i, name, got, want)


def test_ranks_equal_tf_ranking(reference_group):
  group, (_, _, ranks) = reference_group
  np.testing.assert_array_equal(ranks, np.asarray([c["ranks"] for c in group["cases"]]))


def test_reference_covers_the_spec():
  cases = [c for g in REFERENCE["groups"] for c in g["cases"]]
  assert len(cases) >= 90
  assert {c["weight_kind"] for c in cases} == {"none", "ones", "list", "item"}
  assert {c["fill"] for c in cases} == set(FILLS)
  assert sum(c["mask"] is not None for c in cases) >= 10
  assert sum(c["weights_fixed"] for c in cases) >= 10
  labels = np.concatenate([np.asarray(c["labels"]).reshape(-1) for c in cases])
  assert (labels < 0).mean() > 0.1
  logits = [np.asarray(c["logits"]) for c in cases]
  assert sum(len(np.unique(x)) < x.size for x in logits) >= 10  # ties


# ---------------------------------------------------------------------------- multi_head


def ranking_problem(rng, lists=8, size=5):
  labels = rng.integers(0, 4, size=(lists, size)).astype(F32)
  labels[rng.random((lists, size)) < 0.25] = -1.0
  logits = rng.normal(size=(lists, size)).astype(F32)
  weights = rng.uniform(0.5, 2.0, size=(lists,)).astype(F32)
  return logits, labels, weights


def test_inside_multi_head_equals_alone():
  rng = np.random.default_rng(3)
  logits, labels, weights = ranking_problem(rng)
  rank = ranking_head(name="rank", list_size=5, weight_column="w", metrics=("ndcg@3", "mrr"))
  click = jheads.binary_classification_head(name="click")
  head = jheads.multi_head([rank, click], head_weights=[1.0, 0.5])
  click_logits = rng.normal(size=(8, 1)).astype(F32)
  click_labels = (rng.random((8, 1)) < 0.5).astype(F32)
  features = {"w": weights}
  all_labels = {"rank": labels, "click": click_labels}

  @jax.jit
  def run(split, logits, click_logits):
    as_dict = {"rank": logits, "click": click_logits}
    return (
        head.loss_fn(split, all_labels, features),
        head.loss_fn(as_dict, all_labels, features),
        metrics.compute(head.metric_fn(as_dict, all_labels, features)),
        head.predict_fn(split),
        rank.loss_fn(logits, labels, features),
        metrics.compute(rank.metric_fn(logits, labels, features)),
        click.loss_fn(click_logits, click_labels),
    )

  split_loss, dict_loss, stats, predictions, alone, alone_stats, click_loss = run(
      np.concatenate([logits, click_logits], -1), logits, click_logits
  )
  np.testing.assert_allclose(split_loss, alone + 0.5 * click_loss, rtol=1e-6)
  np.testing.assert_allclose(dict_loss, split_loss, rtol=1e-6)
  np.testing.assert_allclose(stats["loss/rank"], alone, rtol=1e-6)
  for key in alone_stats:  # the alone head's keys are suffixed already
    np.testing.assert_allclose(stats[key], alone_stats[key], rtol=1e-6, err_msg=key)
  np.testing.assert_array_equal(predictions[("rank", "ranks")], ranking.ranks(logits))


def test_like_ranking_heads_vectorize():
  rng = np.random.default_rng(4)
  (a, la, wa), (b, lb, wb) = ranking_problem(rng), ranking_problem(rng)
  make = lambda name, column: ranking_head(name=name, weight_column=column, mask_column="m")
  heads = [make("first", "wa"), make("second", "wb")]
  features = {"wa": wa, "wb": wb, "m": np.ones((8, 5), bool)}
  logits, labels = {"first": a, "second": b}, {"first": la, "second": lb}

  @jax.jit
  def run(logits):
    out = []
    for vectorize in (True, False):
      head = jheads.multi_head(heads, vectorize=vectorize)
      out.append((head.loss_fn(logits, labels, features), metrics.compute(head.metric_fn(logits, labels, features))))
    return out

  (grouped, grouped_stats), (alone, alone_stats) = run(logits)
  np.testing.assert_allclose(grouped, alone, rtol=1e-6)
  for key in alone_stats:
    np.testing.assert_allclose(grouped_stats[key], alone_stats[key], rtol=1e-6, err_msg=key)


def test_multi_head_row_mask_drops_whole_lists():
  rng = np.random.default_rng(10)
  logits, labels, weights = ranking_problem(rng)
  rows = np.arange(8) % 3 != 0
  rank = ranking_head(name="rank", weight_column="w", metrics=("ndcg", "mrr@2"))
  head = jheads.multi_head([rank, jheads.regression_head(name="dwell")], mask_column="rows")
  dwell = rng.normal(size=(8, 1)).astype(F32)
  features = {"w": weights, "rows": rows}

  @jax.jit
  def run(logits):
    masked = head.metric_fn({"rank": logits, "dwell": dwell}, {"rank": labels, "dwell": dwell}, features)
    dropped = np.where(rows[:, None], labels, -1.0)
    return metrics.compute(masked), rank.loss_fn(logits, dropped, features), metrics.compute(
        rank.metric_fn(logits, dropped, features)
    )

  masked, dropped_loss, dropped = run(logits)
  np.testing.assert_allclose(masked["loss/rank"], dropped_loss, rtol=1e-6)
  for key, value in dropped.items():
    np.testing.assert_allclose(masked[key], value, rtol=1e-6, err_msg=key)


def test_low_precision_logits_accumulate_in_float32():
  rng = np.random.default_rng(11)
  logits, labels, _ = ranking_problem(rng)
  head = ranking_head(loss={"softmax": 1.0, "approx_ndcg": 1.0}, metrics=("ndcg",))

  @jax.jit
  def run(logits):
    return head.loss_fn(logits, labels), metrics.compute(head.metric_fn(logits, labels))

  low = run(jnp.asarray(logits, jnp.bfloat16))
  full = run(jnp.asarray(logits, jnp.bfloat16).astype(F32))
  assert low[0].dtype == jnp.float32
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6), low, full)


def test_multi_head_needs_dict_logits_without_list_size():
  head = jheads.multi_head([ranking_head(name="rank"), jheads.regression_head(name="dwell")])
  assert head.heads[0].logits_dim is None
  with pytest.raises(ValueError, match="list_size"):
    head.loss_fn(np.zeros((2, 4), F32), {"rank": np.zeros((2, 3), F32), "dwell": np.zeros((2, 1), F32)})


# ---------------------------------------------------------------------------- the contract


def test_jit_vmap_grad_and_padding_never_read():
  rng = np.random.default_rng(5)
  logits, labels, weights = ranking_problem(rng)
  labels = np.minimum(labels, 1.0)  # sigmoid_cross_entropy takes labels in [0, 1]
  padded = labels < 0
  features = {"w": weights}
  heads = {name: ranking_head(loss=name, weight_column="w") for name in ranking.LOSSES}

  @jax.jit
  def run(nan_padded, seven_padded):
    out = {}
    for name, head in heads.items():
      f = lambda lo, head=head: head.loss_fn(lo, labels, features)
      batched = jax.vmap(lambda lo, la, head=head: head.loss_fn(lo, la, {"w": weights[:4]}))(
          nan_padded.reshape(2, 4, 5), labels.reshape(2, 4, 5)
      )
      out[name] = (
          jax.value_and_grad(f)(nan_padded), f(seven_padded), batched,
          head.loss_fn(nan_padded[:4], labels[:4], {"w": weights[:4]}),
      )
    return out

  results = run(np.where(padded, np.nan, logits), np.where(padded, 7.0, logits))
  for name, ((value, grad), other, batched, first) in results.items():
    assert np.isfinite(value), name
    assert np.all(np.isfinite(grad)), name
    assert np.all(grad[padded] == 0), name
    np.testing.assert_allclose(other, value, rtol=1e-6, err_msg=name)
    np.testing.assert_allclose(batched[0], first, rtol=1e-6, err_msg=name)


def test_huge_logits_keep_loss_and_gradient_finite():
  rng = np.random.default_rng(6)
  labels = rng.integers(0, 2, size=(4, 6)).astype(F32)
  labels[:, -1] = -1.0
  logits = (np.sign(rng.normal(size=(4, 6))) * 1e4).astype(F32)
  logits[0, :2] = [1e4, -1e4]
  heads = {name: ranking_head(loss=name, metrics=("ndcg", "map")) for name in ranking.LOSSES}

  @jax.jit
  def run(logits):
    return {
        name: (jax.value_and_grad(head.loss_fn)(logits, labels), metrics.compute(head.metric_fn(logits, labels)))
        for name, head in heads.items()
    }

  for name, ((value, grad), stats) in run(logits).items():
    assert np.isfinite(value) and np.all(np.isfinite(grad)), (name, value, grad)
    assert all(np.isfinite(v) for v in stats.values()), name


def test_streaming_and_psum_are_exact():
  rng = np.random.default_rng(7)
  lists, size = 16, 5
  labels = rng.integers(0, 3, size=(lists, size)).astype(F32)
  labels[rng.random((lists, size)) < 0.3] = -1.0
  labels[:3] = -1.0  # empty lists (whole shards of them)
  labels[5] = 0.0  # no relevance
  logits = rng.normal(size=(lists, size)).astype(F32)
  weights = rng.uniform(0.0, 2.0, size=(lists, size)).astype(F32)
  mask = rng.random((lists, size)) > 0.1
  features = {"w": weights, "m": mask}
  head = ranking_head(
      loss={"softmax": 1.0, "pairwise_hinge": 0.5},
      metrics=("ndcg@3", "map", "arp"),
      weight_column="w", mask_column="m", loss_reduction="sum_over_nonzero_weights",
  )

  def whole(logits, labels, features):
    value, grad = jax.value_and_grad(head.loss_fn)(logits, labels, features)
    return value, grad, metrics.compute(head.metric_fn(logits, labels, features))

  def shard(logits, labels, features):
    value, grad = jax.value_and_grad(lambda lo: head.loss_fn(lo, labels, features, axis_name="b"))(logits)
    stats = jax.lax.psum(head.metric_fn(logits, labels, features, axis_name="b"), "b")
    return jax.lax.psum(value, "b"), grad, metrics.compute(stats)

  expected_loss, expected_grad, expected = jax.jit(whole)(logits, labels, features)
  mesh = jax.make_mesh((8,), ("b",))
  step = jax.jit(jax.shard_map(shard, mesh=mesh, in_specs=P("b"), out_specs=(P(), P("b"), P())))
  got_loss, got_grad, got = step(*jax.device_put((logits, labels, features), NamedSharding(mesh, P("b"))))
  np.testing.assert_allclose(got_loss, expected_loss, rtol=1e-6)
  np.testing.assert_allclose(got_grad, expected_grad, rtol=1e-5, atol=1e-7)
  # Streaming: four batches' statistics, merged, are the whole batch's.
  batch_stats = jax.jit(head.metric_fn)
  chunk = lambda x, k: x[4 * k : 4 * (k + 1)]
  merged = batch_stats(chunk(logits, 0), chunk(labels, 0), jax.tree.map(lambda x: chunk(x, 0), features))
  for k in range(1, 4):
    merged = metrics.merge(
        merged, batch_stats(chunk(logits, k), chunk(labels, k), jax.tree.map(lambda x, k=k: chunk(x, k), features))
    )
  streamed = values(merged)
  assert streamed.keys() == expected.keys()
  for key in expected:
    np.testing.assert_allclose(got[key], expected[key], rtol=1e-6, err_msg=key)
    np.testing.assert_allclose(streamed[key], expected[key], rtol=1e-6, err_msg=key)


def test_list_weights_and_masks_in_every_form():
  rng = np.random.default_rng(8)
  logits, labels, weights = ranking_problem(rng)
  mask = rng.random(labels.shape) > 0.2
  head = ranking_head(loss="pairwise_logistic", metrics=("ndcg", "map"), weight_column="w", mask_column="m")
  plain = ranking_head(loss="pairwise_logistic", metrics=("ndcg", "map"), weight_column="w")

  @jax.jit
  def run(logits, labels):
    out = []
    forms = [(w, head, mask) for w in (weights[:, None], np.broadcast_to(weights[:, None], labels.shape))]
    forms += [(weights, head, mask.astype(F32)), (weights, plain, None)]
    out = [(weights, head, mask)] + forms
    for i, (w, h, m) in enumerate(out):
      y = labels if m is not None else jnp.where(mask, labels, -1.0)
      features = {"w": w, "m": m}
      out[i] = (h.loss_fn(logits, y, features), metrics.compute(h.metric_fn(logits, y, features)))
    return out

  results = run(logits, labels)
  for got in results[1:]:
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6), got, results[0])
  none = ranking_head(mask_column="m")
  one = ranking_head()
  np.testing.assert_allclose(
      loss(none, logits, labels, {"m": np.ones(labels.shape, bool)}), loss(one, logits, labels), rtol=1e-6
  )


def test_ranks_prediction():
  head = ranking_head(list_size=4)
  logits = np.asarray([[[0.5, 2.0, 0.5, -np.inf]], [[0.0, -0.0, 3.0, 0.0]]], F32)
  predictions = head.predict_fn(logits)
  assert predictions["ranks"].dtype == jnp.int32
  np.testing.assert_array_equal(predictions["ranks"], [[[2, 1, 3, 4]], [[2, 3, 1, 4]]])
  np.testing.assert_array_equal(predictions["logits"], logits)
  with pytest.raises(ValueError, match="NaN"):
    head.predict_fn(np.asarray([[0.0, np.nan, 1.0, 2.0]], F32))


def test_three_dimensional_lists_equal_flattened():
  rng = np.random.default_rng(9)
  logits, labels, _ = ranking_problem(rng)
  head = ranking_head(loss="approx_ndcg", metrics=("ndcg@2", "arp"))

  @jax.jit
  def run(logits, labels):
    return head.loss_fn(logits, labels), metrics.compute(head.metric_fn(logits, labels))

  flat = run(logits, labels)
  deep = run(logits.reshape(2, 4, 5), labels.reshape(2, 4, 5))
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6), deep, flat)


def test_custom_loss_fn():
  import optax

  def listwise(labels, logits, where, weights):
    return optax.losses.ranking_softmax_loss(logits, labels, where=where, weights=weights, reduce_fn=None)

  head = ranking_head(loss_fn=listwise, loss_reduction="sum")
  got = loss(head, SCORES, LOSS_LABELS)
  np.testing.assert_allclose(got, 2 * 1.111409, rtol=1e-5)  # Σ ω ℓ of the softmax loss
  assert head.kernel.group_key is None  # a custom loss never groups with another


def test_mapping_loss_is_the_sum_of_reduced_components():
  head = ranking_head(loss={"softmax": 1.0, "pairwise_hinge_loss": 0.25}, metrics=())
  got = loss(head, SCORES, LOSS_LABELS)
  np.testing.assert_allclose(got, 1.111409 + 0.25 * 0.5, rtol=1e-5)
  keys = set(metric(head, SCORES, LOSS_LABELS))
  assert keys == {"labels_mean", "logits_mean", "average_loss_softmax", "average_loss_pairwise_hinge"}


def test_named_head_keys_and_config():
  head = ranking_head(name="rank", metrics=("ndcg@5",), list_size=3)
  assert head.config.kind == "ranking" and head.config.n_classes is None
  assert head.logits_dim == 3
  assert set(metric(head, SCORES, LABELS)) == {
      "ndcg@5/rank", "labels_mean/rank", "logits_mean/rank", "average_loss/rank"
  }
  assert ranking_head().config.loss_reduction == jheads.LossReduction.SUM_OVER_NONZERO_WEIGHTS


# ---------------------------------------------------------------------------- errors (R9)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(loss="listnet"), "unknown loss 'listnet'.*softmax"),
        (dict(loss={}), "must not be empty"),
        (dict(loss={"softmax": float("inf")}), "finite"),
        (dict(loss={"softmax": 1.0, "softmax_loss": 1.0}), "twice"),
        (dict(metrics=("ndcg@5", "dcg")), "unknown metric 'dcg'"),
        (dict(metrics=("ndcg@0",)), "positive integer"),
        (dict(metrics=("mrr@x",)), "positive integer"),
        (dict(metrics=("arp@5",)), "arp has no cutoff"),
        (dict(metrics="ndcg"), "list or tuple"),
        (dict(metrics=("ndcg", "ndcg")), "twice"),
        (dict(temperature=0.5), "approx_ndcg"),
        (dict(loss="approx_ndcg", temperature=0.0), "positive"),
        (dict(list_size=0), "list_size"),
        (dict(loss="mean_squared", loss_fn=lambda labels, logits, where, weights: 0), "either loss or loss_fn"),
        (dict(loss_fn=lambda labels, logits: 0), "where"),
        (dict(loss_reduction="avg"), "loss_reduction"),
        (dict(name=""), "name"),
        (dict(mask_column=3), "mask_column"),
        (dict(weight_column=3), "weight_column"),
    ],
)
def test_construction_errors(kwargs, match):
  with pytest.raises((ValueError, TypeError), match=match):
    ranking_head(**kwargs)


def test_errors_name_the_head():
  head = ranking_head(name="rank", list_size=3, loss="sigmoid_cross_entropy", weight_column="w", mask_column="m")
  w, m = np.ones((2,), F32), np.ones((2, 3), bool)
  ok = np.asarray(SCORES, F32)

  def fails(match, logits=ok, labels=np.asarray(LOSS_LABELS, F32) / 2, features=None):
    with pytest.raises(ValueError, match=match):
      head.loss_fn(logits, labels, {"w": w, "m": m} if features is None else features)

  fails("head 'rank': logits must have shape.*3", logits=np.zeros((2, 4), F32))
  fails("rank >= 2", logits=np.zeros((3,), F32), labels=np.zeros((3,), F32))
  fails("labels shape", labels=np.zeros((2,), F32))
  fails("weights shape", features={"w": np.ones((2, 2), F32), "m": m})
  fails("mask shape", features={"w": w, "m": np.ones((2, 2), bool)})
  fails("only 0 and 1", features={"w": w, "m": np.full((2, 3), 2.0, F32)})
  fails("weight_column 'w' is missing", features={"m": m})
  fails("mask_column 'm' is missing", features={"w": w})
  fails("labels must be finite.*negative label", labels=np.asarray([[0, np.nan, 1], [0, 0, 1]], F32))
  fails("logits must be finite.*at valid items", logits=np.asarray([[0, np.inf, 1], [0, 0, 1]], F32))
  fails(r"\[0, 1\]", labels=np.asarray(LOSS_LABELS, F32))
  fails("weights must be finite", features={"w": np.asarray([1.0, np.nan], F32), "m": m})
  fails("weights must be >= 0", features={"w": np.asarray([1.0, -1.0], F32), "m": m})
  # Padding may hold anything: -inf logits and huge labels below 0.
  head.loss_fn(np.asarray([[0, -np.inf, 1], [0, 0, 1]], F32), np.asarray([[0, -5, 1], [0, 0, 1]], F32), {"w": w, "m": m})
  with pytest.raises(ValueError, match="below 128"):
    ranking_head(metrics=("ndcg",)).metric_fn(ok, np.asarray([[0, 200, 1], [0, 0, 1]], F32))


def test_value_checks_under_jit():
  head = ranking_head(name="rank")
  err, _ = jax.jit(jheads.checked(head.loss_fn))(
      jnp.asarray([[0.0, jnp.nan, 1.0]]), jnp.asarray([[1.0, 0.0, 0.0]])
  )
  assert err.get().startswith("head 'rank': logits must be finite (no NaN or infinity) at valid items")
  err, _ = jax.jit(jheads.checked(head.loss_fn))(
      jnp.asarray([[0.0, jnp.nan, 1.0]]), jnp.asarray([[1.0, -1.0, 0.0]])
  )
  assert err.get() is None
