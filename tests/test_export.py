"""Serving outputs (spec §5) and jax.export artifacts: save, load, round trip."""

import functools
import json
import os
import subprocess
import sys
import urllib.parse

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jheads
from jheads import export

BATCH_SIZES = (1, 7, 128)
N_KINDS = 4


def make_model(logits_dim, *, as_dict_for=None, seed=0):
  """A fixed two-input model: `x` [b, 5] float32 and `kind` [b] int32 ids."""
  rng = np.random.default_rng(seed)
  w1 = jnp.asarray(rng.normal(size=(5, 16)), jnp.float32)
  embedding = jnp.asarray(rng.normal(size=(N_KINDS, 16)), jnp.float32)
  w2 = jnp.asarray(rng.normal(size=(16, logits_dim)), jnp.float32)

  def predict_logits(features):
    hidden = jnp.tanh(features["x"] @ w1 + embedding[features["kind"]])
    logits = hidden @ w2
    if as_dict_for is None:
      return logits
    # A multi_head also takes logits as a dict keyed by head name.
    offsets = np.cumsum([0] + [h.logits_dim for h in as_dict_for.heads])
    return {
        h.name: logits[:, offsets[i] : offsets[i + 1]]
        for i, h in enumerate(as_dict_for.heads)
    }

  return predict_logits


def make_features(batch_size, seed=1):
  rng = np.random.default_rng(seed)
  return {
      "x": rng.normal(size=(batch_size, 5)).astype(np.float32),
      "kind": rng.integers(0, N_KINDS, size=batch_size).astype(np.int32),
  }


CLASSIFIER = {"serving_default", "classification", "predict"}
REGRESSOR = {"serving_default", "regression", "predict"}


def _per_head(name, classifier, binary=False):
  own = {name, f"{name}/predict"}
  if classifier:
    own.add(f"{name}/classification")
  if binary or not classifier:
    own.add(f"{name}/regression")
  return own


def _six_heads():
  return jheads.multi_head([
      jheads.binary_classification_head(name="click", label_vocabulary=["no", "yes"]),
      jheads.multi_class_head(4, name="topic"),
      jheads.multi_label_head(3, name="tags", label_vocabulary=["x", "y", "z"]),
      jheads.regression_head(name="dwell", label_dimension=2),
      jheads.poisson_regression_head(name="count"),
      jheads.logistic_regression_head(name="ctr"),
  ])


def _like_heads():
  # Two heads of one configuration: multi_head predicts them vectorized.
  return jheads.multi_head([
      jheads.binary_classification_head(name="left"),
      jheads.binary_classification_head(name="right"),
      jheads.regression_head(name="size"),
  ])


# name -> (head factory, whether the model returns dict logits, spec §5's signature names)
CASES = {
    "binary": (lambda: jheads.binary_classification_head(), False, CLASSIFIER | {"regression"}),
    "multi_class": (
        lambda: jheads.multi_class_head(3, label_vocabulary=["a", "b", "c"]),
        False,
        CLASSIFIER,
    ),
    "multi_label": (lambda: jheads.multi_label_head(4), False, CLASSIFIER),
    "regression": (lambda: jheads.regression_head(label_dimension=3), False, REGRESSOR),
    "poisson": (lambda: jheads.poisson_regression_head(), False, REGRESSOR),
    "logistic": (lambda: jheads.logistic_regression_head(), False, REGRESSOR),
    "multi_head": (
        _six_heads,
        False,
        {"serving_default", "predict"}
        | _per_head("click", True, binary=True)
        | _per_head("topic", True)
        | _per_head("tags", True)
        | _per_head("dwell", False)
        | _per_head("count", False)
        | _per_head("ctr", False),
    ),
    "multi_head_dict_logits": (
        _like_heads,
        True,
        {"serving_default", "predict"}
        | _per_head("left", True, binary=True)
        | _per_head("right", True, binary=True)
        | _per_head("size", False),
    ),
}


class Exported:
  def __init__(self, head, predict_logits, directory, manifest):
    self.head = head
    self.predict_logits = predict_logits
    self.directory = directory
    self.manifest = manifest
    self.loaded = export.load(directory)


@pytest.fixture(scope="module", params=sorted(CASES))
def case(request, tmp_path_factory):
  make_head, dict_logits, expected_names = CASES[request.param]
  head = make_head()
  predict_logits = make_model(
      head.logits_dim, as_dict_for=head if dict_logits else None
  )
  directory = tmp_path_factory.mktemp(request.param)
  manifest = export.save(directory, head, predict_logits, make_features(3))
  return Exported(head, predict_logits, directory, manifest), expected_names


# ----------------------------------------------------------------------------
# An oracle written from spec §4-§5 directly: what each loaded signature returns.


def _single_head_expected(head, logits):
  """Every signature of one head, with the class-name outputs load adds."""
  predictions = jax.jit(head.predict_fn)(logits)
  decoded = jheads.decode_predictions(head, predictions)
  names = jheads.class_names(head)
  if names is None:
    default = {"value": np.asarray(predictions["predictions"])}
    expected = {"regression": default}
  else:
    scores = np.asarray(predictions["probabilities"])
    default = {"scores": scores, "classes": np.broadcast_to(np.asarray(names), scores.shape)}
    expected = {"classification": default}
    if head.config.kind == "binary_classification":
      expected["regression"] = {"value": np.asarray(predictions["logistic"])}
  expected["serving_default"] = default
  expected["predict"] = decoded
  return expected


def expected_signatures(head, logits):
  if not isinstance(head, jheads.MultiHead):
    return _single_head_expected(head, logits)
  if isinstance(logits, dict):
    per_head_logits = [logits[h.name] for h in head.heads]
  else:
    offsets = np.cumsum([0] + [h.logits_dim for h in head.heads])
    per_head_logits = [logits[:, offsets[i] : offsets[i + 1]] for i in range(len(head.heads))]
  expected = {}
  for i, (h, lo) in enumerate(zip(head.heads, per_head_logits)):
    own = _single_head_expected(h, lo)
    if i == 0:
      expected["serving_default"] = own["serving_default"]
    for key, value in own.items():
      expected[h.name if key == "serving_default" else f"{h.name}/{key}"] = value
  decoded = jheads.decode_predictions(head, jax.jit(head.predict_fn)(logits))
  expected["predict"] = {f"{name}/{key}": value for (name, key), value in decoded.items()}
  return expected


def assert_outputs_equal(actual, expected, where):
  assert sorted(actual) == sorted(expected), where
  for key in expected:
    a, e = np.asarray(actual[key]), np.asarray(expected[key])
    assert a.shape == e.shape, (where, key)
    if e.dtype.kind in "US":
      np.testing.assert_array_equal(a, e, err_msg=f"{where}: {key}")
    else:
      assert a.dtype == e.dtype, (where, key)
      np.testing.assert_allclose(a, e, rtol=1e-6, atol=1e-6, err_msg=f"{where}: {key}")


# ----------------------------------------------------------------------------
# Round trips.


def test_signature_names_follow_spec(case):
  exported, expected_names = case
  logits = exported.predict_logits(make_features(2))
  assert set(export.serving_outputs(exported.head, logits)) == expected_names
  assert set(exported.manifest["signatures"]) == expected_names
  assert set(exported.loaded) == expected_names
  files = {entry["file"] for entry in exported.manifest["signatures"].values()}
  assert set(os.listdir(exported.directory)) == files | {"manifest.json"}


# The second multi_head differs from the first only in its dict logits and
# like heads: one batch size keeps the suite's compile time down.
ROUND_TRIPS = [
    (name, batch_size)
    for name in sorted(CASES)
    for batch_size in ((7,) if name == "multi_head_dict_logits" else BATCH_SIZES)
]


@pytest.mark.parametrize("case, batch_size", ROUND_TRIPS, indirect=["case"])
def test_loaded_signatures_match_in_process(case, batch_size):
  exported, _ = case
  features = make_features(batch_size, seed=batch_size)
  # Jitted, since eager jax would compile each op anew for every batch size.
  logits = jax.jit(exported.predict_logits)(features)
  expected = expected_signatures(exported.head, logits)
  outputs = jax.jit(functools.partial(export.serving_outputs, exported.head))(logits)
  assert set(exported.loaded) == set(expected)
  for signature, serve in exported.loaded.items():
    served = serve(features)
    assert_outputs_equal(served, expected[signature], signature)
    # The numeric outputs are serving_outputs' own.
    numeric = {k: v for k, v in served.items() if v.dtype.kind not in "US"}
    assert_outputs_equal(numeric, outputs[signature], signature)
    assert next(iter(served.values())).shape[0] == batch_size


def test_exported_for_cpu_and_cuda_with_a_symbolic_batch(case):
  exported, _ = case
  for signature, entry in exported.manifest["signatures"].items():
    module = jax.export.deserialize((exported.directory / entry["file"]).read_bytes())
    assert module.platforms == ("cpu", "cuda"), signature
    (features,), _ = jax.tree.unflatten(module.in_tree, module.in_avals)
    x, kind = features["x"], features["kind"]
    assert [str(d) for d in x.shape] == ["b", "5"] and [str(d) for d in kind.shape] == ["b"]
    assert urllib.parse.unquote(entry["file"]) == signature + ".jaxexport"


# ----------------------------------------------------------------------------
# serving_outputs itself.


def test_multi_head_merge_by_name():
  head = jheads.multi_head([
      jheads.multi_class_head(3, name="species", label_vocabulary=["a", "b", "c"]),
      jheads.binary_classification_head(name="sex"),
      jheads.regression_head(name="mass"),
  ])
  logits = jnp.array([[1.0, 2.0, 0.5, -1.0, 4.2], [0.0, -1.0, 3.0, 2.0, 3.9]])
  outputs = export.serving_outputs(head, logits)
  assert {k: sorted(v) for k, v in outputs.items()} == {
      "serving_default": ["scores"],
      "species": ["scores"],
      "species/classification": ["scores"],
      "species/predict": ["all_class_ids", "class_ids", "logits", "probabilities"],
      "sex": ["scores"],
      "sex/classification": ["scores"],
      "sex/regression": ["value"],
      "sex/predict": ["all_class_ids", "class_ids", "logistic", "logits", "probabilities"],
      "mass": ["value"],
      "mass/regression": ["value"],
      "mass/predict": ["predictions"],
      "predict": sorted(
          [f"species/{k}" for k in ("all_class_ids", "class_ids", "logits", "probabilities")]
          + [f"sex/{k}" for k in ("all_class_ids", "class_ids", "logistic", "logits", "probabilities")]
          + ["mass/predictions"]
      ),
  }
  softmax = jax.nn.softmax(logits[:, :3])
  np.testing.assert_allclose(outputs["serving_default"]["scores"], softmax, rtol=1e-6)
  np.testing.assert_allclose(outputs["sex/regression"]["value"], jax.nn.sigmoid(logits[:, 3:4]), rtol=1e-6)
  np.testing.assert_allclose(outputs["mass"]["value"], logits[:, 4:], rtol=1e-6)
  np.testing.assert_array_equal(outputs["predict"]["sex/class_ids"], [[0], [1]])


def test_multi_head_default_is_the_first_heads():
  regression_first = jheads.multi_head(
      [jheads.regression_head(name="r"), jheads.binary_classification_head(name="b")]
  )
  outputs = export.serving_outputs(regression_first, jnp.array([[3.0, 0.0]]))
  assert list(outputs["serving_default"]) == ["value"]
  np.testing.assert_array_equal(outputs["serving_default"]["value"], [[3.0]])


@pytest.mark.parametrize("name", sorted(CASES))
def test_serving_outputs_jit(name):
  head = CASES[name][0]()
  logits = jax.random.normal(jax.random.key(0), (6, head.logits_dim))
  jitted = jax.jit(functools.partial(export.serving_outputs, head))(logits)
  eager = export.serving_outputs(head, logits)
  assert jax.tree.structure(jitted) == jax.tree.structure(eager)
  for a, e in zip(jax.tree.leaves(jitted), jax.tree.leaves(eager)):
    np.testing.assert_allclose(a, e, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("bad_name", ["predict", "serving_default"])
def test_signature_name_collisions_raise(bad_name):
  head = jheads.multi_head(
      [jheads.regression_head(name="a"), jheads.regression_head(name=bad_name)]
  )
  with pytest.raises(ValueError, match=f"two serving signatures are named '{bad_name}'"):
    export.serving_outputs(head, jnp.zeros((1, 2)))
  slash = jheads.multi_head(
      [jheads.regression_head(name="a"), jheads.regression_head(name="a/regression")]
  )
  with pytest.raises(ValueError, match="named 'a/regression'"):
    export.serving_outputs(slash, jnp.zeros((1, 2)))


def test_class_names():
  head = _six_heads()
  assert export.class_names(head) == {
      "click": ("no", "yes"),
      "topic": ("0", "1", "2", "3"),
      "tags": ("x", "y", "z"),
      "dwell": None,
      "count": None,
      "ctr": None,
  }
  assert export.class_names(jheads.multi_class_head(3)) == ("0", "1", "2")
  assert export.class_names(jheads.poisson_regression_head()) is None


# ----------------------------------------------------------------------------
# The manifest, portability and errors.


def test_manifest(tmp_path):
  head = jheads.multi_head([
      jheads.multi_class_head(3, name="species", label_vocabulary=["a", "b", "c"]),
      jheads.regression_head(name="mass"),
  ])
  manifest = export.save(tmp_path, head, make_model(head.logits_dim), make_features(4))
  assert json.loads((tmp_path / "manifest.json").read_text()) == manifest
  assert manifest["format"] == 1
  assert manifest["jheads_version"] == jheads.__version__
  assert manifest["jax_version"] == jax.__version__
  assert manifest["platforms"] == ["cpu", "cuda"]
  assert manifest["inputs"] == {
      "x": {"shape": ["b", 5], "dtype": "float32"},
      "kind": {"shape": ["b"], "dtype": "int32"},
  }
  assert manifest["class_names"] == {"species": ["a", "b", "c"], "mass": None}
  assert manifest["heads"] == [
      {"name": "species", "kind": "multi_class", "class_names": ["a", "b", "c"]},
      {"name": "mass", "kind": "regression", "class_names": None},
  ]
  signatures = manifest["signatures"]
  assert signatures["species/classification"] == {
      "file": "species%2Fclassification.jaxexport",
      "outputs": {"scores": {"shape": ["b", 3], "dtype": "float32"}},
      "class_outputs": {"classes": {"head": "species", "mode": "all", "from": "scores"}},
  }
  assert signatures["serving_default"]["outputs"] == signatures["species"]["outputs"]
  assert signatures["mass"] == {
      "file": "mass.jaxexport",
      "outputs": {"value": {"shape": ["b", 1], "dtype": "float32"}},
      "class_outputs": {},
  }
  assert signatures["predict"]["outputs"]["species/class_ids"] == {
      "shape": ["b", 1], "dtype": "int32"
  }
  assert signatures["predict"]["class_outputs"] == {
      "species/classes": {"head": "species", "mode": "lookup", "from": "species/class_ids"},
      "species/all_classes": {"head": "species", "mode": "all", "from": "species/probabilities"},
  }


_BARE_LOADER = """
import json, pathlib, sys
import jax, numpy as np
directory = pathlib.Path(sys.argv[1])
manifest = json.loads((directory / "manifest.json").read_text())
entry = manifest["signatures"]["predict"]
module = jax.export.deserialize((directory / entry["file"]).read_bytes())
features = {k: np.asarray(v, manifest["inputs"][k]["dtype"]) for k, v in json.load(sys.stdin).items()}
outputs = module.call(features)
assert not any(m == "jheads" or m.startswith("jheads.") for m in sys.modules)
print(json.dumps({k: np.asarray(v).tolist() for k, v in outputs.items()}))
"""


def test_artifact_runs_in_a_process_without_jheads(tmp_path):
  head = _like_heads()
  predict_logits = make_model(head.logits_dim)
  export.save(tmp_path, head, predict_logits, make_features(2))
  features = make_features(5)
  result = subprocess.run(
      [sys.executable, "-c", _BARE_LOADER, str(tmp_path)],
      input=json.dumps({k: v.tolist() for k, v in features.items()}),
      capture_output=True, text=True, check=True, timeout=120,
      env={**os.environ, "JAX_PLATFORMS": "cpu"},
  )
  served = json.loads(result.stdout)
  expected = export.serving_outputs(head, predict_logits(features))["predict"]
  assert sorted(served) == sorted(expected)
  for key, value in expected.items():
    np.testing.assert_allclose(served[key], value, rtol=1e-6, atol=1e-6)


def test_load_casts_same_kind_and_checks_inputs(tmp_path):
  head = jheads.binary_classification_head()
  predict_logits = make_model(1)
  export.save(tmp_path, head, predict_logits, make_features(2), platforms=("cpu",))
  serve = export.load(tmp_path)["regression"]
  features = make_features(3)
  expected = serve(features)["value"]
  as_float64 = {"x": features["x"].astype(np.float64), "kind": features["kind"].tolist()}
  np.testing.assert_array_equal(serve(as_float64)["value"], expected)
  with pytest.raises(ValueError, match=r"missing \['kind'\], unexpected \['y'\]"):
    serve({"x": features["x"], "y": features["kind"]})
  with pytest.raises(ValueError, match="input 'kind' must be int32"):
    serve({"x": features["x"], "kind": features["kind"] + 0.5})
  with pytest.raises(ValueError, match="must be a dict"):
    serve(features["x"])


def test_save_checks_its_inputs(tmp_path):
  head = jheads.regression_head()
  model = make_model(1)
  with pytest.raises(ValueError, match="leading sizes differ"):
    export.save(tmp_path / "a", head, model, {"x": np.zeros((2, 5)), "kind": np.zeros(3, np.int32)})
  with pytest.raises(ValueError, match="needs a leading batch axis"):
    export.save(tmp_path / "b", head, lambda f: f["x"] * jnp.ones((1, 1)), {"x": np.float32(1)})
  with pytest.raises(ValueError, match="non-empty dict of arrays"):
    export.save(tmp_path / "c", head, model, np.zeros((2, 5)))
  (tmp_path / "d").mkdir()
  (tmp_path / "d" / "old.txt").write_text("")
  with pytest.raises(ValueError, match="is not empty"):
    export.save(tmp_path / "d", head, model, make_features(2))


def test_load_rejects_other_formats(tmp_path):
  export.save(tmp_path, jheads.regression_head(), make_model(1), make_features(2), platforms=("cpu",))
  manifest = json.loads((tmp_path / "manifest.json").read_text())
  manifest["format"] = 2
  (tmp_path / "manifest.json").write_text(json.dumps(manifest))
  with pytest.raises(ValueError, match="format 2"):
    export.load(tmp_path)


# ----------------------------------------------------------------------------
# The optional TensorFlow SavedModel route.


def test_saved_model_matches_the_jax_artifact(tmp_path):
  tf = pytest.importorskip("tensorflow")
  head = jheads.multi_head([
      jheads.multi_class_head(3, name="species", label_vocabulary=["a", "b", "c"]),
      jheads.binary_classification_head(name="sex", label_vocabulary=["f", "m"]),
      jheads.multi_label_head(2, name="tags"),
      jheads.regression_head(name="mass"),
  ])
  predict_logits = make_model(head.logits_dim)
  export.save_saved_model(tmp_path / "saved_model", head, predict_logits, make_features(2))
  export.save(tmp_path / "jax", head, predict_logits, make_features(2))
  saved_model = tf.saved_model.load(str(tmp_path / "saved_model"))
  loaded = export.load(tmp_path / "jax")
  assert set(saved_model.signatures) == set(loaded)
  for batch_size in (1, 7):
    features = make_features(batch_size)
    for signature, serve in loaded.items():
      expected = serve(features)
      served = {
          key: value.numpy() for key, value in saved_model.signatures[signature](**features).items()
      }
      served = {
          key: np.char.decode(value.astype(bytes), "utf-8") if value.dtype == object else value
          for key, value in served.items()
      }
      assert_outputs_equal(served, expected, signature)
