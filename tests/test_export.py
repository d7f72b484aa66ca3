"""Serving outputs (spec §5) and jax.export artifacts: save, load, round trip."""

import dataclasses
import functools
import hashlib
import json
import os
import pathlib
import shutil
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
    # The default batch buckets: batch 7 is served padded to 8.
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
  assert manifest["format"] == 2
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
  for entry in signatures.values():
    digest = hashlib.sha256((tmp_path / entry["file"]).read_bytes()).hexdigest()
    assert entry.pop("sha256") == digest
  body = {k: v for k, v in json.loads((tmp_path / "manifest.json").read_text()).items()
          if k != "manifest_sha256"}
  canonical = json.dumps(body, sort_keys=True, separators=(",", ":")).encode()
  assert manifest["manifest_sha256"] == hashlib.sha256(canonical).hexdigest()
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


@pytest.mark.parametrize("version", [1, 3])
def test_load_rejects_other_formats(tmp_path, version):
  # Format 1 artifacts have no digests to verify: they must be saved again.
  export.save(tmp_path, jheads.regression_head(), make_model(1), make_features(2), platforms=("cpu",))
  manifest = json.loads((tmp_path / "manifest.json").read_text())
  manifest["format"] = version
  (tmp_path / "manifest.json").write_text(json.dumps(manifest))
  with pytest.raises(export.ArtifactError, match=f"artifact format {version}; this jheads reads format 2"):
    export.load(tmp_path)


# ----------------------------------------------------------------------------
# Hardened loading: manifests, paths, digests, module contents.
#
# One small artifact (a regression head: three signatures, CPU only) is saved
# once; each test tampers with its own copy.


@pytest.fixture(scope="module")
def artifact(tmp_path_factory):
  directory = tmp_path_factory.mktemp("artifact")
  export.save(directory, jheads.regression_head(), make_model(1), make_features(2), platforms=("cpu",))
  return directory


@pytest.fixture
def copy(artifact, tmp_path):
  directory = tmp_path / "copy"
  shutil.copytree(artifact, directory)
  return directory


def read_manifest(directory):
  return json.loads((directory / "manifest.json").read_text())


def write_manifest(directory, manifest, *, reseal=True):
  """Writes `manifest`, with a fresh digest of itself unless `reseal=False`."""
  if reseal:
    body = {k: v for k, v in manifest.items() if k != "manifest_sha256"}
    canonical = json.dumps(body, sort_keys=True, separators=(",", ":")).encode()
    manifest = dict(manifest, manifest_sha256=hashlib.sha256(canonical).hexdigest())
  (directory / "manifest.json").write_text(json.dumps(manifest))


def replace_module(directory, signature, data):
  """Replaces a signature's module by `data` and reseals the manifest around it."""
  manifest = read_manifest(directory)
  entry = manifest["signatures"][signature]
  (directory / entry["file"]).write_bytes(data)
  entry["sha256"] = hashlib.sha256(data).hexdigest()
  write_manifest(directory, manifest)


def test_loads_what_save_wrote(copy):
  loaded = export.load(copy)
  assert sorted(loaded) == ["predict", "regression", "serving_default"]
  features = make_features(3)
  expected = make_model(1)(features)
  np.testing.assert_allclose(loaded["regression"](features)["value"], expected, rtol=1e-6, atol=1e-6)


MALFORMED = {
    "a list": (lambda m: [m], "the manifest must be a JSON object, got a list"),
    "no format": (lambda m: {k: v for k, v in m.items() if k != "format"}, "has no 'format' entry"),
    "format true": (lambda m: dict(m, format=True), "'format' must be an integer, got true"),
    "format string": (lambda m: dict(m, format="2"), "'format' must be an integer, got \"2\""),
    "missing keys": (
        lambda m: {k: v for k, v in m.items() if k not in ("signatures", "inputs")},
        r"missing the entries \['inputs', 'signatures'\]",
    ),
    "signatures list": (lambda m: dict(m, signatures=[]), "'signatures' must be a non-empty object, got a list"),
    "inputs empty": (lambda m: dict(m, inputs={}), "'inputs' must be a non-empty object"),
    "bad dtype": (
        lambda m: dict(m, inputs=dict(m["inputs"], x={"shape": ["b", 5], "dtype": "object"})),
        "input 'x': dtype \"object\" is not one of",
    ),
    "no batch dim": (
        lambda m: dict(m, inputs=dict(m["inputs"], x={"shape": [5], "dtype": "float32"})),
        "input 'x': shape must be a list starting with 'b'",
    ),
    "bad size": (
        lambda m: dict(m, inputs=dict(m["inputs"], x={"shape": ["b", -5], "dtype": "float32"})),
        "input 'x': shape .* holds -5, not a size",
    ),
    "entry keys": (
        lambda m: dict(m, signatures=dict(m["signatures"], predict={"file": "predict.jaxexport"})),
        "signature 'predict' must be an object with 'file', 'sha256', 'outputs' and 'class_outputs'",
    ),
    "bad digest": (
        lambda m: _with_entry(m, "predict", sha256="abc"),
        "signature 'predict': 'sha256' must be 64 lowercase hex digits",
    ),
    "file not a string": (
        lambda m: _with_entry(m, "predict", file=["predict.jaxexport"]),
        "signature 'predict': 'file' must be a string, got a list",
    ),
    "class output of nothing": (
        lambda m: _with_entry(m, "predict", class_outputs={"classes": {"head": None, "mode": "all", "from": "nope"}}),
        "class output 'classes' reads 'nope', not an output",
    ),
    "output without a batch": (
        lambda m: _with_entry(m, "predict", outputs={"predictions": {"shape": [1], "dtype": "float32"}}),
        "signature 'predict': output 'predictions': shape must be a list starting with 'b'",
    ),
    "heads not a list": (lambda m: dict(m, heads={}), "'heads' must be a non-empty list, got an object"),
    "platforms": (lambda m: dict(m, platforms="cpu"), "'platforms' must be a non-empty list of strings"),
}


def _with_entry(manifest, signature, **changes):
  signatures = dict(manifest["signatures"])
  signatures[signature] = dict(signatures[signature], **changes)
  return dict(manifest, signatures=signatures)


@pytest.mark.parametrize("problem", sorted(MALFORMED))
def test_malformed_manifests_name_the_problem(copy, problem):
  edit, message = MALFORMED[problem]
  (copy / "manifest.json").write_text(json.dumps(edit(read_manifest(copy))))
  with pytest.raises(export.ArtifactError, match=message) as raised:
    export.load(copy)
  assert isinstance(raised.value, ValueError)
  assert "manifest.json" in str(raised.value)


def test_manifest_that_is_not_json(copy):
  (copy / "manifest.json").write_text('{"format": 2,')
  with pytest.raises(export.ArtifactError, match="manifest.json' is not valid JSON"):
    export.load(copy)


def test_edited_manifest_fails_its_digest(copy):
  manifest = read_manifest(copy)
  manifest["jheads_version"] = "0.0.0"
  write_manifest(copy, manifest, reseal=False)
  with pytest.raises(export.ArtifactError, match="corrupted or edited after it was saved"):
    export.load(copy)
  write_manifest(copy, manifest)
  export.load(copy)


def test_missing_directory_and_manifest(tmp_path):
  with pytest.raises(export.ArtifactError, match="no artifact at"):
    export.load(tmp_path / "absent")
  with pytest.raises(export.ArtifactError, match="manifest.json' cannot be read"):
    export.load(tmp_path)


@pytest.mark.parametrize("name", ["../outside.jaxexport", "sub/predict.jaxexport", "..", ""])
def test_files_outside_the_artifact_are_refused(copy, name):
  # The file exists outside, with the right bytes and digest: only its place is wrong.
  outside = copy.parent / "outside.jaxexport"
  outside.write_bytes((copy / "predict.jaxexport").read_bytes())
  manifest = read_manifest(copy)
  manifest["signatures"]["predict"]["file"] = name
  write_manifest(copy, manifest)
  with pytest.raises(export.ArtifactError, match="must be plain file names inside the artifact directory"):
    export.load(copy)


def test_absolute_paths_are_refused(copy):
  manifest = read_manifest(copy)
  manifest["signatures"]["predict"]["file"] = str(copy / "predict.jaxexport")
  write_manifest(copy, manifest)
  with pytest.raises(export.ArtifactError, match="no absolute paths"):
    export.load(copy)


def test_symlinks_out_are_refused_and_in_are_followed(copy):
  module = copy / "predict.jaxexport"
  outside = copy.parent / "elsewhere.jaxexport"
  outside.write_bytes(module.read_bytes())
  module.unlink()
  module.symlink_to(outside)
  with pytest.raises(export.ArtifactError, match="is a symbolic link to .*elsewhere.jaxexport.*not a file inside the artifact directory"):
    export.load(copy)
  # Links within the directory, as Kubernetes mounts files, are its own files.
  module.unlink()
  (copy / "..data").mkdir()
  (copy / "..data" / "predict.jaxexport").write_bytes(outside.read_bytes())
  module.symlink_to(pathlib.Path("..data") / "predict.jaxexport")
  export.load(copy)["predict"](make_features(2))
  module.unlink()
  module.symlink_to(copy)
  with pytest.raises(export.ArtifactError, match="not a file inside the artifact directory"):
    export.load(copy)


def test_manifest_symlinked_out_is_refused(copy):
  outside = copy.parent / "manifest.json"
  outside.write_text((copy / "manifest.json").read_text())
  (copy / "manifest.json").unlink()
  (copy / "manifest.json").symlink_to(outside)
  with pytest.raises(export.ArtifactError, match="the manifest: .* not a file inside the artifact directory"):
    export.load(copy)


def test_non_regular_files_are_refused(copy):
  (copy / "predict.jaxexport").unlink()
  os.mkfifo(copy / "predict.jaxexport")  # Opening must not wait for a writer.
  with pytest.raises(export.ArtifactError, match="predict.jaxexport' is not a regular file"):
    export.load(copy)
  (copy / "predict.jaxexport").unlink()
  (copy / "predict.jaxexport").mkdir()
  with pytest.raises(export.ArtifactError, match="predict.jaxexport' .*(not a regular file|cannot be opened)"):
    export.load(copy)


def test_bit_flips_are_rejected_before_deserialization(copy, monkeypatch):
  # Without the digest, some random flips crashed the serving process; now no
  # flipped byte reaches jax.export.deserialize.
  def deserialize(_):
    raise AssertionError("a corrupted module reached jax.export.deserialize")

  monkeypatch.setattr(jax.export, "deserialize", deserialize)
  path = copy / "predict.jaxexport"
  original = path.read_bytes()
  rng = np.random.default_rng(0)
  for bit in rng.choice(8 * len(original), size=30, replace=False):
    flipped = bytearray(original)
    flipped[bit // 8] ^= 1 << (bit % 8)
    path.write_bytes(bytes(flipped))
    with pytest.raises(export.ArtifactError, match="predict.jaxexport' .* has SHA-256 .* corrupted or replaced"):
      export.load(copy)
  path.write_bytes(original[:-1])
  with pytest.raises(export.ArtifactError, match="corrupted or replaced"):
    export.load(copy)


def test_a_pinned_digest_admits_only_that_artifact(copy, monkeypatch):
  digest = read_manifest(copy)["manifest_sha256"]
  export.load(copy, expected_sha256=digest)
  # A crafted module with its digests recomputed: refused before any parsing.
  replace_module(copy, "predict", (copy / "regression.jaxexport").read_bytes())
  monkeypatch.setattr(jax.export, "deserialize", lambda _: pytest.fail("deserialized"))
  with pytest.raises(export.ArtifactError, match=f"manifest.json' is the artifact [0-9a-f]{{64}}, not the expected {digest}"):
    export.load(copy, expected_sha256=digest)
  with pytest.raises(ValueError, match="expected_sha256 must be 64 lowercase hex digits"):
    export.load(copy, expected_sha256=digest.upper())


def test_garbage_with_a_matching_digest_is_an_artifact_error(copy):
  replace_module(copy, "predict", b"not a flatbuffer at all")
  with pytest.raises(export.ArtifactError, match="is not a serialized jax.export module"):
    export.load(copy)


def test_another_signatures_module_is_refused(copy):
  # A valid module in the wrong place: its outputs are not the manifest's.
  replace_module(copy, "predict", (copy / "regression.jaxexport").read_bytes())
  with pytest.raises(export.ArtifactError, match=r"'predict'\): its outputs are .*'value'.*, not the manifest's \['predictions'\]"):
    export.load(copy)


def _exported(copy, signature="regression"):
  return jax.export.deserialize((copy / f"{signature}.jaxexport").read_bytes())


def test_module_shapes_and_dtypes_must_match_the_manifest(copy):
  manifest = read_manifest(copy)
  manifest["inputs"]["x"]["shape"] = ["b", 6]
  manifest["signatures"]["regression"]["outputs"]["value"]["dtype"] = "float64"
  write_manifest(copy, manifest)
  with pytest.raises(export.ArtifactError, match=r"its input 'x' is \{'shape': \['b', 5\], 'dtype': 'float32'\}; the manifest says"):
    export.load(copy)
  manifest["inputs"]["x"]["shape"] = ["b", 5]
  write_manifest(copy, manifest)
  with pytest.raises(export.ArtifactError, match=r"'regression'\): its output 'value' is .*float32.*; the manifest says .*float64"):
    export.load(copy)


def test_metadata_that_lies_about_the_stablehlo_is_refused(copy):
  # The flatbuffer says int32, the StableHLO takes float32: jax would splice
  # the module in trusting the metadata.
  exported = _exported(copy)
  (b,) = jax.export.symbolic_shape("b")
  kind, x = exported.in_avals
  assert x.shape[1:] == (5,) and x.dtype == jnp.float32 and kind.dtype == jnp.int32
  lying = dataclasses.replace(exported, in_avals=(kind, jax.core.ShapedArray((b, 5), jnp.int32)))
  manifest = read_manifest(copy)
  manifest["inputs"]["x"]["dtype"] = "int32"
  for entry in manifest["signatures"].values():
    (copy / entry["file"]).write_bytes(lying.serialize())
    entry["sha256"] = hashlib.sha256((copy / entry["file"]).read_bytes()).hexdigest()
    entry["outputs"] = {"value": {"shape": ["b", 1], "dtype": "float32"}}
  write_manifest(copy, manifest)
  with pytest.raises(export.ArtifactError, match=r"main function takes \['tensor<\?xi32>', 'tensor<\?x5xf32>'\] .* not the \['tensor<\?xi32>', 'tensor<\?x5xi32>'\]"):
    export.load(copy)


def test_disabled_safety_checks_are_refused(copy):
  exported = dataclasses.replace(
      _exported(copy), disabled_safety_checks=(jax.export.DisabledSafetyCheck.platform(),)
  )
  replace_module(copy, "regression", exported.serialize())
  with pytest.raises(export.ArtifactError, match=r"'regression'\): it was exported with jax.export safety checks disabled \(platform\)"):
    export.load(copy)


def test_unstable_custom_calls_are_refused(copy):
  # jax.export refuses this custom call unless its check is disabled; a crafted
  # module can drop the record of that, but not the call itself.
  target = "jheads_test_unregistered_target"

  def regression(features):
    value = jax.ffi.ffi_call(target, jax.ShapeDtypeStruct((features["x"].shape[0], 1), jnp.float32))
    return {"value": value(features["x"])}

  (b,) = jax.export.symbolic_shape("b")
  specs = {"x": jax.ShapeDtypeStruct((b, 5), jnp.float32), "kind": jax.ShapeDtypeStruct((b,), jnp.int32)}
  with pytest.raises(ValueError, match="custom calls whose targets have no compatibility guarantees"):
    jax.export.export(jax.jit(regression), platforms=("cpu",))(specs)
  exported = jax.export.export(
      jax.jit(regression), platforms=("cpu",),
      disabled_checks=[jax.export.DisabledSafetyCheck.custom_call(target)],
  )(specs)
  replace_module(copy, "regression", exported.serialize())
  with pytest.raises(export.ArtifactError, match="safety checks disabled"):
    export.load(copy)
  replace_module(copy, "regression", dataclasses.replace(exported, disabled_safety_checks=()).serialize())
  with pytest.raises(export.ArtifactError, match=rf"custom-call targets outside jax.export's stable set: \['{target}'\]"):
    export.load(copy)


def test_multi_device_modules_are_refused(copy):
  replace_module(copy, "regression", dataclasses.replace(_exported(copy), nr_devices=8).serialize())
  with pytest.raises(export.ArtifactError, match="a program for 8 devices; a served module runs on one"):
    export.load(copy)


# ----------------------------------------------------------------------------
# Call-time input checks: casts that would change values raise.


def test_inputs_that_do_not_fit_the_exported_dtype_raise(artifact):
  serve = export.load(artifact, batch_buckets=None)["regression"]
  features = make_features(3)
  expected = serve(features)["value"]
  fits = {"x": features["x"].astype(np.float64), "kind": features["kind"].astype(np.int64)}
  np.testing.assert_array_equal(serve(fits)["value"], expected)
  np.testing.assert_array_equal(serve(dict(fits, kind=fits["kind"].astype(np.uint64)))["value"], expected)
  for kind in (np.array([0, 3_000_000_000, 1]), [0, 3_000_000_000, 1], np.array([0, -2**31 - 1, 1])):
    with pytest.raises(ValueError, match=r"input 'kind' holds int64 values in \[.*\], outside int32's .* would wrap"):
      serve(dict(features, kind=kind))
  with pytest.raises(ValueError, match="holds uint64 values"):
    serve(dict(features, kind=np.array([0, 2**63, 1], np.uint64)))
  big = features["x"].astype(np.float64)
  big[1, 2] = -1e39
  with pytest.raises(ValueError, match=r"input 'x' holds finite float64 values beyond float32's range \(e.g. -1e\+39"):
    serve(dict(features, x=big))
  # Values float32 rounds, or that are already infinite or NaN, pass as they are.
  edge = features["x"].astype(np.float64)
  edge[0, :3] = [1e38, np.inf, np.nan]
  served = serve(dict(features, x=edge))["value"]
  assert np.isfinite(served[1:]).all()


def test_input_shapes_are_checked(artifact):
  serve = export.load(artifact)["predict"]
  features = make_features(3)
  with pytest.raises(ValueError, match=r"signature 'predict': input 'x' must have shape \[batch, 5\], got \(3, 4\)"):
    serve(dict(features, x=features["x"][:, :4]))
  with pytest.raises(ValueError, match="input 'kind' must have shape \\[batch\\], got \\(\\)"):
    serve(dict(features, kind=np.int32(1)))
  with pytest.raises(ValueError, match=r"share one batch size, got \{'x': 3, 'kind': 2\}"):
    serve(dict(features, kind=features["kind"][:2]))
  with pytest.raises(ValueError, match="at least one row"):
    serve(make_features(0))


# ----------------------------------------------------------------------------
# Saved from many devices, served on one.


def _mesh_cases():
  from jax.sharding import AxisType, NamedSharding, PartitionSpec as P

  def explicit():
    mesh = jax.make_mesh((8,), ("batch",), axis_types=(AxisType.Explicit,))
    return mesh, NamedSharding(mesh, P()), NamedSharding(mesh, P(None, "batch")), None

  def auto():
    mesh = jax.make_mesh((8,), ("batch",), axis_types=(AxisType.Auto,))
    constrain = lambda x: jax.lax.with_sharding_constraint(x, P("batch"))
    return mesh, NamedSharding(mesh, P()), NamedSharding(mesh, P(None, "batch")), constrain

  return {"explicit": explicit, "auto": auto}


@pytest.mark.parametrize("mesh_kind", ["explicit", "auto"])
@pytest.mark.parametrize("inside_set_mesh", [True, False])
def test_saved_from_many_devices_serves_on_one(tmp_path, mesh_kind, inside_set_mesh):
  # Replicated and sharded parameters; under Auto, a bare-PartitionSpec
  # sharding constraint too (which needs a mesh in context to trace).
  mesh, replicated, sharded, constrain = _mesh_cases()[mesh_kind]()
  rng = np.random.default_rng(0)
  w1, w2 = rng.normal(size=(5, 16)).astype(np.float32), rng.normal(size=(16, 1)).astype(np.float32)
  d_w1, d_w2 = jax.device_put(w1, sharded), jax.device_put(w2, replicated)
  if not inside_set_mesh:
    constrain = None

  def model(features):
    x = features["x"] if constrain is None else constrain(features["x"])
    return jnp.tanh(x @ d_w1) @ d_w2

  head = jheads.regression_head()
  example = make_features(2)
  if inside_set_mesh:
    with jax.set_mesh(mesh):
      export.save(tmp_path, head, model, example, platforms=("cpu",))
  else:
    export.save(tmp_path, head, model, example, platforms=("cpu",))
  for entry in read_manifest(tmp_path)["signatures"].values():
    assert jax.export.deserialize((tmp_path / entry["file"]).read_bytes()).nr_devices == 1
  features = make_features(5)
  served = export.load(tmp_path)["regression"](features)["value"]
  np.testing.assert_allclose(served, np.tanh(features["x"] @ w1) @ w2, rtol=1e-6, atol=1e-6)


# ----------------------------------------------------------------------------
# Batch buckets: a few compiled batch sizes serve every request size.


@pytest.fixture
def compilations():
  """Counts XLA compilations while a test runs."""
  events = []

  def listener(event, duration, **kwargs):
    if event == "/jax/core/compile/backend_compile_duration":
      events.append(duration)

  jax.monitoring.register_event_duration_secs_listener(listener)
  yield events
  jax.monitoring.unregister_event_duration_listener(listener)


@pytest.fixture(scope="module")
def classifier_artifact(tmp_path_factory):
  head = jheads.multi_class_head(3, label_vocabulary=["a", "b", "c"])
  directory = tmp_path_factory.mktemp("classifier")
  export.save(directory, head, make_model(3), make_features(2), platforms=("cpu",))
  return directory


def test_buckets_match_exact_sizes(classifier_artifact):
  exact = export.load(classifier_artifact, batch_buckets=None)["predict"]
  bucketed = export.load(classifier_artifact, batch_buckets=(8, 1, 4))["predict"]
  assert bucketed.batch_buckets == (1, 4, 8) and exact.batch_buckets is None
  for batch_size in (1, 3, 8, 21):  # 21 rows run as 8 + 8 + 5 (padded to 8).
    features = make_features(batch_size, seed=batch_size)
    expected, served = exact(features), bucketed(features)
    assert sorted(served) == sorted(expected) == [
        "all_class_ids", "all_classes", "class_ids", "classes", "logits", "probabilities"
    ]
    for key, value in expected.items():
      assert served[key].shape == value.shape and served[key].dtype == value.dtype, key
      if value.dtype.kind == "U":
        np.testing.assert_array_equal(served[key], value)
      else:
        np.testing.assert_allclose(served[key], value, rtol=1e-6, atol=1e-6, err_msg=key)
  assert bucketed.compiled_batch_sizes == (1, 4, 8)


def test_a_new_batch_size_within_a_bucket_compiles_nothing(classifier_artifact, compilations):
  serve = export.load(classifier_artifact, batch_buckets=(4, 16))["serving_default"]
  serve(make_features(3))
  assert len(compilations) == 1 and serve.compiled_batch_sizes == (4,)
  for batch_size in (1, 2, 4):
    serve(make_features(batch_size))
  assert len(compilations) == 1
  serve(make_features(9))
  serve(make_features(16))
  serve(make_features(40))  # 16 + 16 + 8 (padded to 16)
  assert len(compilations) == 2 and serve.compiled_batch_sizes == (4, 16)
  # Exact sizes compile once per new size: the counter sees those.
  exact = export.load(classifier_artifact, batch_buckets=None)["serving_default"]
  for batch_size in (2, 3, 3):
    exact(make_features(batch_size))
  assert len(compilations) == 4


def test_warmup_compiles_every_bucket_at_load(classifier_artifact, compilations):
  loaded = export.load(classifier_artifact, batch_buckets=(2, 8), warmup=True)
  assert len(compilations) == 2 * len(loaded)
  assert all(s.compiled_batch_sizes == (2, 8) for s in loaded.values())
  for batch_size in (1, 5, 8, 11):
    loaded["classification"](make_features(batch_size))
  assert len(compilations) == 2 * len(loaded)
  # Only the signatures a server answers.
  loaded = export.load(classifier_artifact, batch_buckets=(2, 8), warmup=["predict"])
  assert len(compilations) == 2 * len(loaded) + 2
  assert loaded["predict"].compiled_batch_sizes == (2, 8)
  assert loaded["classification"].compiled_batch_sizes == ()


@pytest.mark.parametrize("buckets", [(), (0, 4), (2.0,), (True,), "8", 8])
def test_bad_buckets_raise(classifier_artifact, buckets):
  with pytest.raises(ValueError, match="batch_buckets must be a non-empty sequence of positive ints"):
    export.load(classifier_artifact, batch_buckets=buckets)


def test_warmup_checks_its_arguments(classifier_artifact):
  with pytest.raises(ValueError, match="warmup compiles the batch buckets, but batch_buckets=None has none"):
    export.load(classifier_artifact, batch_buckets=None, warmup=True)
  with pytest.raises(ValueError, match=r"warmup names signatures \['nope'\] that the artifact does not have"):
    export.load(classifier_artifact, warmup=["predict", "nope"])
  with pytest.raises(ValueError, match="warmup must be True, False or a list of signature names"):
    export.load(classifier_artifact, warmup="predict")


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
