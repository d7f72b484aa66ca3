"""The public head API: heads defined from their math get what built-in heads get."""

import importlib.util
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jheads
from jheads import metrics

F32 = np.float32
_spec = importlib.util.spec_from_file_location(
    "custom_heads", pathlib.Path(__file__).parent.parent / "examples" / "custom_heads.py"
)
custom_heads = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(custom_heads)


def _pinball(logits, labels, quantiles):
  q = np.asarray(quantiles)
  error = labels[:, None] - logits
  return np.mean(np.maximum(q * error, (q - 1) * error), axis=1)


@pytest.mark.parametrize("reduction", ["sum", "sum_over_batch_size", "mean", "sum_over_nonzero_weights"])
def test_quantile_head_reductions_weights_and_missing_labels(reduction):
  rng = np.random.default_rng(0)
  head = custom_heads.quantile_head(
      name="dwell", weight_column="w", missing_label=float("nan"), loss_reduction=reduction
  )
  logits = rng.normal(size=(10, 3)).astype(F32)
  labels = rng.normal(size=10).astype(F32)
  weights = rng.uniform(0, 2, 10).astype(F32)
  weights[3] = 0.0
  labels[[1, 5]] = np.nan
  present = ~np.isnan(labels)
  losses = _pinball(logits[present], labels[present], (0.1, 0.5, 0.9))
  w = weights[present]
  total = np.sum(w * losses)
  expected = {
      "sum": total,
      "sum_over_batch_size": total / present.sum(),
      "mean": total / w.sum(),
      "sum_over_nonzero_weights": total / np.count_nonzero(w),
  }[reduction]
  features = {"w": weights}
  np.testing.assert_allclose(float(head.loss_fn(logits, labels, features)), expected, rtol=1e-6)
  np.testing.assert_allclose(float(jax.jit(head.loss_fn)(logits, labels, features)), expected, rtol=1e-6)
  grads = np.asarray(jax.grad(head.loss_fn)(logits, labels, features))
  assert np.all(grads[~present] == 0) and np.all(np.isfinite(grads))
  values = metrics.compute(head.metric_fn(logits, labels, features))
  covered = (labels[present][:, None] <= logits[present]).astype(np.float64)
  np.testing.assert_allclose(
      [float(values[f"coverage@{q:g}/dwell"]) for q in (0.1, 0.5, 0.9)],
      (w[:, None] * covered).sum(0) / w.sum(),
      rtol=1e-6,
  )


def test_custom_heads_check_their_labels_and_name_themselves():
  head = custom_heads.focal_binary_head(name="click")
  with pytest.raises(ValueError, match=r"head 'click': labels must be in \[0, 1\]"):
    head.loss_fn(np.zeros((2, 1), F32), np.array([2.0, 0.0], F32))
  with pytest.raises(ValueError, match=r"head 'dwell': labels must be finite numbers"):
    custom_heads.quantile_head(name="dwell").loss_fn(np.zeros((2, 3), F32), np.array([np.nan, 0.0], F32))
  with pytest.raises(ValueError, match=r"head 'click': logits must have shape \[D0, ..., DN, 1\]"):
    head.loss_fn(np.zeros((2, 2), F32), np.zeros(2, F32))


def test_focal_head_equals_optax_and_masks_rows():
  head = custom_heads.focal_binary_head(mask_column="m", loss_reduction="sum")
  rng = np.random.default_rng(1)
  logits = rng.normal(size=(6, 1)).astype(F32) * 3
  labels = rng.integers(0, 2, 6).astype(F32)
  mask = np.array([1, 1, 0, 1, 0, 1], bool)
  import optax

  expected = np.sum(np.asarray(optax.losses.sigmoid_focal_loss(logits[mask, 0], labels[mask], alpha=0.25, gamma=2.0)))
  np.testing.assert_allclose(float(head.loss_fn(logits, labels, {"m": mask})), expected, rtol=1e-6)


def test_like_custom_heads_group_and_unlike_ones_do_not():
  a = custom_heads.quantile_head(name="a")
  b = custom_heads.quantile_head(name="b")
  c = custom_heads.quantile_head((0.2, 0.5, 0.8), name="c")
  assert a.kernel.group_key == b.kernel.group_key
  assert a.kernel.group_key != c.kernel.group_key
  heads = [a, b, c, custom_heads.focal_binary_head(name="f"), custom_heads.focal_binary_head(name="g")]
  grouped, alone = jheads.multi_head(heads), jheads.multi_head(heads, vectorize=False)
  rng = np.random.default_rng(2)
  logits = rng.normal(size=(8, grouped.logits_dim)).astype(F32)
  labels = {h.name: rng.normal(size=8).astype(F32) for h in heads[:3]}
  labels.update({h.name: rng.integers(0, 2, 8).astype(F32) for h in heads[3:]})
  np.testing.assert_allclose(float(grouped.loss_fn(logits, labels)), float(alone.loss_fn(logits, labels)), rtol=1e-6)
  got, want = metrics.compute(grouped.metric_fn(logits, labels)), metrics.compute(alone.metric_fn(logits, labels))
  assert got.keys() == want.keys()
  for key in want:
    np.testing.assert_allclose(float(got[key]), float(want[key]), rtol=1e-6, err_msg=key)


def test_custom_heads_split_over_devices_with_axis_name():
  if jax.device_count() < 8:
    pytest.skip("needs 8 devices")
  head = custom_heads.quantile_head(name="dwell", loss_reduction="sum_over_batch_size")
  rng = np.random.default_rng(3)
  logits = rng.normal(size=(16, 3)).astype(F32)
  labels = rng.normal(size=16).astype(F32)
  shares = jax.pmap(lambda lo, la: jax.lax.psum(head.loss_fn(lo, la, axis_name="b"), "b"), axis_name="b")(
      logits.reshape(8, 2, 3), labels.reshape(8, 2)
  )
  np.testing.assert_allclose(float(shares[0]), float(head.loss_fn(logits, labels)), rtol=1e-6)


def test_the_example_trains_both_heads():
  values = custom_heads.main()
  assert float(values["auc/click"]) > 0.95
  assert abs(float(values["coverage@0.9/dwell"]) - 0.9) < 0.05


def test_define_head_rejects_bad_definitions():
  with pytest.raises(ValueError, match="kind must be a non-empty string"):
    jheads.define_head("", logits_dim=1, loss=lambda lo, la: lo, predictions=dict)
  with pytest.raises(ValueError, match=r"my_head: logits_dim must be an int >= 1"):
    jheads.define_head("my", logits_dim=0, loss=lambda lo, la: lo, predictions=dict)
  with pytest.raises(TypeError, match=r"my_head: loss must be callable"):
    jheads.define_head("my", logits_dim=1, loss=3, predictions=dict)


def test_custom_and_ranking_heads_export_and_serve(tmp_path):
  import jheads.export

  head = jheads.multi_head([
      custom_heads.quantile_head(name="dwell"),
      custom_heads.focal_binary_head(name="click"),
      jheads.ranking_head(name="rank", list_size=4),
  ])
  weights = jnp.asarray(np.random.default_rng(4).normal(size=(3, head.logits_dim)), jnp.float32)
  predict_logits = lambda features: features["x"] @ weights
  jheads.export.save(tmp_path / "m", head, predict_logits, {"x": np.zeros((2, 3), F32)}, platforms=("cpu",))
  signatures = jheads.export.load(tmp_path / "m")
  assert {"dwell/regression", "click/classification", "rank/regression", "predict"} <= set(signatures)
  x = np.random.default_rng(5).normal(size=(5, 3)).astype(F32)
  served = signatures["predict"]({"x": x})
  expected = head.predict_fn(predict_logits({"x": x}))
  for (name, key), value in expected.items():
    np.testing.assert_allclose(served[f"{name}/{key}"], np.asarray(value), rtol=1e-6, atol=1e-7)
  np.testing.assert_allclose(
      signatures["dwell"]({"x": x})["value"], np.asarray(expected[("dwell", "quantiles")]), rtol=1e-6
  )
