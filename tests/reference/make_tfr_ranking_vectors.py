"""Writes tests/data/tfr_ranking.json: TF-Ranking 0.5.5's numbers on random ranking cases.

Run it in a TensorFlow venv, not in jheads' own (spec Part R's table):

    python3 -m venv /work/venv-tf
    /work/venv-tf/bin/pip install tensorflow-cpu==2.15.1 tensorflow-estimator==2.15.0
    /work/venv-tf/bin/pip install --no-deps tensorflow-ranking==0.5.5 tensorflow-serving-api==2.15.1
    /work/venv-tf/bin/pip install grpcio absl-py six
    /work/venv-tf/bin/python tests/reference/make_tfr_ranking_vectors.py

`tests/test_ranking.py` checks jheads against the committed JSON without
TensorFlow. The numbers are TF-Ranking's, through the functions its Estimator
head calls (`tfr.losses.make_loss_fn`, `metrics_impl.*Metric.compute` as in
`tfr.metrics.make_ranking_metric_fn`, `_RankingHead._labels_and_logits_metrics`),
with the spec's documented deviations applied so that equality is meaningful:

* ties are broken by position (spec R5.1): `utils.sort_by_scores` is called
  with `shuffle_ties=False` (TF-Ranking's default shuffles ties at random);
* list weights (R5.3): TF's per-list metric values are kept; each list's weight
  is TF's, except that a list with no valid item weighs 0 (TF: its summed raw
  weights) and a list with no relevant item weighs its mean valid item weight
  (TF: the batch's mean weight). `tf_metrics` keeps TF's unfixed value, equal
  to `metrics` whenever no list is affected (`weights_fixed` false);
* softmax (R10.2): TF fills padded logits with log(1e-10), which is wrong for
  very negative logits; TF is given each list's logits shifted by the list's
  maximum valid logit, under which the softmax loss is invariant and the fill
  is negligible (other losses get the logits unshifted);
* `average_loss` (R5.5, R10.3): TF's loss metric is the MEAN-reduced loss
  (`tf.compat.v1.metrics.mean(losses, weights)`), but ApproxNDCG's forgets the
  temperature; the MEAN-reduced loss with the temperature is recorded (on the
  first six cases of each group this script checks, in graph mode, that it
  equals `make_loss_metric_fn` for the other losses, and that
  `make_ranking_metric_fn` and the head's `labels_mean`/`logits_mean` give the
  values computed here);
* a mask (jheads' `mask_column`, which TF-Ranking lacks) is given to TF as
  label -1 at masked-out items, its meaning by definition (R2).

Each group of cases shares one shape and one set of feature columns, so the
test can evaluate a group with one compiled function.
"""

from __future__ import annotations

import json
import os
import sys

import numpy as np
import tensorflow as tf
import tensorflow_ranking as tfr
from tensorflow_ranking.python import head as tfr_head
from tensorflow_ranking.python import losses as tfr_losses
from tensorflow_ranking.python import metrics_impl
from tensorflow_ranking.python import utils as tfr_utils

OUT = os.path.join(os.path.dirname(__file__), "..", "data", "tfr_ranking.json")
SEED = 20240917

_SORT_BY_SCORES = tfr_utils.sort_by_scores


def _sort_by_position(scores, features_list, topn=None, shuffle_ties=True, seed=None, mask=None):
  del shuffle_ties
  return _SORT_BY_SCORES(scores, features_list, topn=topn, shuffle_ties=False, seed=seed, mask=mask)


# metrics_impl, losses_impl and utils.sorted_ranks look the function up in the
# utils module at call time, so this reaches every sort.
tfr_utils.sort_by_scores = _sort_by_position

REDUCTIONS = {
    "sum": tf.compat.v1.losses.Reduction.SUM,
    "mean": tf.compat.v1.losses.Reduction.MEAN,
    "sum_over_batch_size": tf.compat.v1.losses.Reduction.SUM_OVER_BATCH_SIZE,
    "sum_over_nonzero_weights": tf.compat.v1.losses.Reduction.SUM_BY_NONZERO_WEIGHTS,
}

TF_KEYS = {
    "softmax": tfr.losses.RankingLossKey.SOFTMAX_LOSS,
    "pairwise_logistic": tfr.losses.RankingLossKey.PAIRWISE_LOGISTIC_LOSS,
    "pairwise_hinge": tfr.losses.RankingLossKey.PAIRWISE_HINGE_LOSS,
    "sigmoid_cross_entropy": tfr.losses.RankingLossKey.SIGMOID_CROSS_ENTROPY_LOSS,
    "mean_squared": tfr.losses.RankingLossKey.MEAN_SQUARED_LOSS,
    "approx_ndcg": tfr.losses.RankingLossKey.APPROX_NDCG_LOSS,
}

# name -> the jheads ranking_head arguments (loss, temperature).
LOSS_CONFIGS = {
    "softmax": {"loss": "softmax", "temperature": None},
    "pairwise_logistic": {"loss": "pairwise_logistic", "temperature": None},
    "pairwise_hinge": {"loss": "pairwise_hinge", "temperature": None},
    "sigmoid_cross_entropy": {"loss": "sigmoid_cross_entropy", "temperature": None},
    "mean_squared": {"loss": "mean_squared", "temperature": None},
    "approx_ndcg": {"loss": "approx_ndcg", "temperature": None},
    "approx_ndcg_t0.5": {"loss": "approx_ndcg", "temperature": 0.5},
    "softmax+mean_squared": {"loss": {"softmax": 1.0, "mean_squared": 0.25}, "temperature": None},
    "pairwise_logistic+approx_ndcg_t0.2": {
        "loss": {"pairwise_logistic": 0.7, "approx_ndcg": 0.3}, "temperature": 0.2,
    },
    "sigmoid_cross_entropy+pairwise_hinge": {
        "loss": {"sigmoid_cross_entropy_loss": 1.0, "pairwise_hinge_loss": 2.0},
        "temperature": None,
    },
}

METRICS = (
    "ndcg", "ndcg@1", "ndcg@3", "ndcg@10",
    "mrr", "mrr@1", "mrr@3",
    "precision", "precision@1", "precision@3", "precision@10",
    "recall", "recall@2",
    "map", "map@1", "map@3",
    "arp",
)

GROUPS = (
    # name, logits shape, weight and mask columns, number of cases. Logits of
    # rank > 2 are lists too (jheads' tests check [D0, D1, L] equals the
    # flattened [D0 * D1, L]), so every case here is 2-D.
    ("weighted", (8, 8), True, 64),
    ("plain", (6, 4), False, 32),
)


def _canonical(key):
  return key[: -len("_loss")] if key.endswith("_loss") else key


def components(config):
  loss = config["loss"]
  if isinstance(loss, str):
    return [(_canonical(loss), 1.0)]
  return [(_canonical(k), float(a)) for k, a in loss.items()]


# ----------------------------------------------------------------------------
# Random cases.


def random_case(rng, shape, weighted):
  """One batch: labels with padding, logits with ties, weights, a mask."""
  lists, size = int(np.prod(shape[:-1])), shape[-1]
  kind = rng.choice(["graded", "binary", "fractional", "high"], p=[0.4, 0.3, 0.2, 0.1])
  if kind == "graded":
    labels = rng.integers(0, 5, size=(lists, size)).astype(np.float32)
  elif kind == "binary":
    labels = (rng.random((lists, size)) < 0.35).astype(np.float32)
  elif kind == "fractional":
    labels = np.round(rng.random((lists, size)), 2).astype(np.float32)
    labels[rng.random((lists, size)) < 0.2] = 1.0
  else:
    labels = rng.integers(0, 12, size=(lists, size)).astype(np.float32)
  # Lists with no relevance at all.
  labels[rng.random(lists) < 0.15] = 0.0
  pad = rng.choice([0.0, 0.2, 0.5])
  labels[rng.random((lists, size)) < pad] = -1.0
  # Lists that are all padding.
  labels[rng.random(lists) < 0.1] = -1.0

  scale = rng.choice([0.3, 1.0, 3.0])
  logits = (rng.normal(size=(lists, size)) * scale).astype(np.float32)
  if rng.random() < 0.35:  # many ties, and -0.0 beside 0.0
    logits = np.round(logits).astype(np.float32)
    logits[(logits == 0) & (rng.random((lists, size)) < 0.5)] = -0.0

  weights = mask = None
  weight_kind = "none"
  if weighted:
    weight_kind = rng.choice(["ones", "list", "item"], p=[0.2, 0.35, 0.45])
    if weight_kind == "ones":
      weights = np.ones((lists, size), np.float32)
    elif weight_kind == "list":
      per_list = rng.uniform(0.1, 3.0, size=(lists, 1)).astype(np.float32)
      per_list[rng.random((lists, 1)) < 0.2] = 0.0
      weights = np.broadcast_to(per_list, (lists, size)).copy()
    else:
      weights = rng.uniform(0.0, 2.0, size=(lists, size)).astype(np.float32)
      weights = np.round(weights, 2)
      weights[rng.random((lists, size)) < 0.15] = 0.0
    if rng.random() < 0.35:
      mask = rng.random((lists, size)) >= 0.2
  fill = rng.choice(["none", "nan", "inf", "-inf", "huge"])
  return dict(
      kind=str(kind), weight_kind=str(weight_kind), fill=str(fill),
      labels=labels, logits=logits, weights=weights, mask=mask,
  )


# ----------------------------------------------------------------------------
# TF-Ranking's numbers.


def tf_loss(name, reduction, labels, logits, weights, temperature):
  """One component through make_loss_fn, as the Estimator head calls it."""
  features = {} if weights is None else {"w": tf.constant(weights)}
  params = {"temperature": temperature} if name == "approx_ndcg" and temperature else None
  loss_fn = tfr.losses.make_loss_fn(
      TF_KEYS[name], weights_feature_name=None if weights is None else "w",
      reduction=REDUCTIONS[reduction], params=params,
  )
  if name == "softmax":
    valid = labels >= 0
    shift = np.where(valid, logits, -np.inf).max(axis=-1, keepdims=True)
    shift = np.where(np.isfinite(shift), shift, 0.0).astype(np.float32)
    logits = logits - shift
  return float(loss_fn(tf.constant(labels), tf.constant(logits), features))


def tf_metric(key, labels, logits, weights):
  """TF's per-list values and weights of one metric."""
  kind, _, k = key.partition("@")
  topn = int(k) if k else None
  metric = {
      "ndcg": lambda: metrics_impl.NDCGMetric(key, topn),
      "mrr": lambda: metrics_impl.MRRMetric(key, topn),
      "precision": lambda: metrics_impl.PrecisionMetric(key, topn),
      "recall": lambda: metrics_impl.RecallMetric(key, topn),
      "map": lambda: metrics_impl.MeanAveragePrecisionMetric(key, topn),
      "arp": lambda: metrics_impl.ARPMetric(key),
  }[kind]()
  values, list_weights = metric.compute(
      tf.constant(labels), tf.constant(logits), None if weights is None else tf.constant(weights)
  )
  return np.asarray(values, np.float64)[:, 0], np.asarray(list_weights, np.float64)[:, 0]


def fixed_list_weights(kind, labels, weights, tf_weights):
  """Spec R5.3: TF's weight, except for empty lists (0) and lists without relevance."""
  w = np.ones_like(labels) if weights is None else weights
  valid = (labels >= 0) & (w > 0)
  ybar = np.where(valid, labels, 0.0).astype(np.float64)
  relevance = (2.0 ** ybar - 1.0) if kind == "ndcg" else (ybar >= 1).astype(np.float64)
  count = valid.sum(-1)
  mean_weight = np.where(count > 0, np.where(valid, w, 0).sum(-1) / np.maximum(count, 1), 0.0)
  fixed = np.where(count == 0, 0.0, np.where(relevance.sum(-1) > 0, tf_weights, mean_weight))
  return fixed, bool(np.any(np.abs(fixed - tf_weights) > 1e-7))


def weighted_mean(values, weights):
  total = weights.sum()
  return float((weights * values).sum() / total) if total != 0 else 0.0


def graph_checks(labels, logits, weights, metric_values, loss_means):
  """The head's own graph-mode functions agree with the numbers computed above."""
  with tf.Graph().as_default(), tf.compat.v1.Session() as session:
    features = {} if weights is None else {"w": tf.constant(weights)}
    name = None if weights is None else "w"
    y, s = tf.constant(labels), tf.constant(logits)
    ops = {}
    for key in METRICS:
      kind, _, k = key.partition("@")
      metric_key = {
          "ndcg": tfr.metrics.RankingMetricKey.NDCG,
          "mrr": tfr.metrics.RankingMetricKey.MRR,
          "precision": tfr.metrics.RankingMetricKey.PRECISION,
          "recall": tfr.metrics.RankingMetricKey.RECALL,
          "map": tfr.metrics.RankingMetricKey.MAP,
          "arp": tfr.metrics.RankingMetricKey.ARP,
      }[kind]
      fn = tfr.metrics.make_ranking_metric_fn(
          metric_key, weights_feature_name=name, topn=int(k) if k else None
      )
      ops[key] = fn(y, s, features)
    for loss in ("softmax", "pairwise_logistic", "pairwise_hinge", "mean_squared"):
      fn = tfr_losses.make_loss_metric_fn(TF_KEYS[loss], weights_feature_name=name)
      ops["loss:" + loss] = fn(y, s, features)
    head = tfr_head.create_ranking_head(loss_fn=tfr.losses.make_loss_fn("softmax_loss"))
    ops.update(head._labels_and_logits_metrics(y, s))  # pylint: disable=protected-access
    session.run(tf.compat.v1.local_variables_initializer())
    session.run({k: v[1] for k, v in ops.items()})
    got = session.run({k: v[0] for k, v in ops.items()})
  for key, value in metric_values.items():
    assert abs(got[key] - value) < 1e-5, (key, got[key], value)
  for loss in ("softmax", "pairwise_logistic", "pairwise_hinge", "mean_squared"):
    # Unshifted logits: the softmax fill is negligible unless logits are very negative.
    assert abs(got["loss:" + loss] - loss_means[loss]) < 1e-4 * max(1, abs(loss_means[loss])), loss
  return got["labels_mean"], got["logits_mean"]


def expected(case, graph_check):
  labels, logits, weights, mask = case["labels"], case["logits"], case["weights"], case["mask"]
  tf_labels = labels if mask is None else np.where(mask, labels, -1.0).astype(np.float32)
  binary = bool(np.all(tf_labels[tf_labels >= 0] <= 1))

  losses = {}
  for config_name, config in LOSS_CONFIGS.items():
    parts = components(config)
    if any(n == "sigmoid_cross_entropy" for n, _ in parts) and not binary:
      continue  # jheads rejects labels above 1 for this loss (R10.8).
    losses[config_name] = {
        reduction: sum(
            a * tf_loss(n, reduction, tf_labels, logits, weights, config["temperature"])
            for n, a in parts
        )
        for reduction in REDUCTIONS
    }
  # One make_loss_fn over several keys is the weighted sum of the components.
  if "sigmoid_cross_entropy+pairwise_hinge" in losses:
    fn = tfr.losses.make_loss_fn(
        ["sigmoid_cross_entropy_loss", "pairwise_hinge_loss"], [1.0, 2.0],
        weights_feature_name=None if weights is None else "w",
    )
    features = {} if weights is None else {"w": tf.constant(weights)}
    combined = float(fn(tf.constant(tf_labels), tf.constant(logits), features))
    want = losses["sigmoid_cross_entropy+pairwise_hinge"]["sum_over_nonzero_weights"]
    assert abs(combined - want) < 1e-5 * max(1, abs(want)), (combined, want)

  average_loss = {}
  for name in TF_KEYS:
    if name == "sigmoid_cross_entropy" and not binary:
      continue
    average_loss[name] = tf_loss(name, "mean", tf_labels, logits, weights, None)
  average_loss["approx_ndcg_t0.5"] = tf_loss("approx_ndcg", "mean", tf_labels, logits, weights, 0.5)

  metrics, tf_metrics, fixed_any = {}, {}, False
  for key in METRICS:
    kind = key.partition("@")[0]
    values, tf_weights = tf_metric(key, tf_labels, logits, weights)
    tf_metrics[key] = weighted_mean(values, tf_weights)
    if kind == "arp":
      metrics[key] = tf_metrics[key]
      continue
    fixed, changed = fixed_list_weights(kind, tf_labels, weights, tf_weights)
    fixed_any |= changed
    metrics[key] = weighted_mean(values, fixed)

  valid = tf_labels >= 0
  labels_mean = float(tf.reduce_mean(tf.boolean_mask(tf_labels, valid))) if valid.any() else 0.0
  logits_mean = float(tf.reduce_mean(tf.boolean_mask(logits, valid))) if valid.any() else 0.0
  if graph_check and valid.any():
    unshifted = {
        n: float(tfr.losses.make_loss_fn(
            TF_KEYS[n], weights_feature_name=None if weights is None else "w",
            reduction=REDUCTIONS["mean"])(
                tf.constant(tf_labels), tf.constant(logits),
                {} if weights is None else {"w": tf.constant(weights)}))
        for n in ("softmax", "pairwise_logistic", "pairwise_hinge", "mean_squared")
    }
    graph_labels_mean, graph_logits_mean = graph_checks(
        tf_labels, logits, weights, tf_metrics, unshifted
    )
    assert abs(graph_labels_mean - labels_mean) < 1e-6
    assert abs(graph_logits_mean - logits_mean) < 1e-5

  ranks = np.asarray(tfr_utils.sorted_ranks(tf.constant(logits), shuffle_ties=False))
  return dict(
      loss=losses,
      average_loss=average_loss,
      metrics=metrics,
      tf_metrics=tf_metrics,
      weights_fixed=fixed_any,
      labels_mean=labels_mean,
      logits_mean=logits_mean,
      ranks=ranks.tolist(),
  )


def tolist(x, shape):
  return None if x is None else np.asarray(x).reshape(shape).tolist()


def main():
  rng = np.random.default_rng(SEED)
  # The patch must be in force: tied scores rank by position.
  tied = np.asarray(tfr_utils.sorted_ranks(tf.constant([[1.0, 2.0, 1.0, 2.0]]), shuffle_ties=True))
  assert tied.tolist() == [[3, 1, 4, 2]], tied
  groups = []
  graph_checked = 0
  for name, shape, weighted, count in GROUPS:
    cases = []
    for i in range(count):
      case = random_case(rng, shape, weighted)
      graph_check = i < 6
      graph_checked += graph_check
      want = expected(case, graph_check)
      cases.append(dict(
          kind=case["kind"],
          weight_kind=case["weight_kind"],
          fill=case["fill"],
          labels=tolist(case["labels"], shape),
          logits=tolist(case["logits"], shape),
          weights=tolist(case["weights"], shape),
          mask=tolist(case["mask"], shape),
          **{k: v for k, v in want.items() if k != "ranks"},
          ranks=tolist(want["ranks"], shape),
      ))
      print(name, i, file=sys.stderr)
    groups.append(dict(name=name, shape=list(shape), columns=weighted, cases=cases))
  document = dict(
      about=(
          "TF-Ranking 0.5.5 numbers on random ranking cases, with the spec's documented"
          " deviations applied; written by tests/reference/make_tfr_ranking_vectors.py"
      ),
      versions=dict(tensorflow=tf.__version__, tensorflow_ranking="0.5.5"),
      seed=SEED,
      graph_checked_cases=graph_checked,
      metrics=list(METRICS),
      reductions=list(REDUCTIONS),
      loss_configs=LOSS_CONFIGS,
      groups=groups,
  )
  with open(OUT, "w") as f:
    json.dump(document, f, separators=(",", ":"))
    f.write("\n")
  print("wrote", os.path.abspath(OUT), file=sys.stderr)


if __name__ == "__main__":
  main()
