"""Smoke test: examples/serve.py trains, exports, and serves from a fresh process."""

import os
import pathlib
import re
import subprocess
import sys

EXAMPLE = pathlib.Path(__file__).parent.parent / "examples" / "serve.py"


def test_serve_example(tmp_path):
  result = subprocess.run(
      [sys.executable, str(EXAMPLE), "--out", str(tmp_path / "penguins")],
      capture_output=True, text=True, timeout=300,
      env={**os.environ, "JAX_PLATFORMS": "cpu"},
  )
  assert result.returncode == 0, result.stderr
  out = result.stdout
  heads = {"species": "classification", "sex": "classification", "body_mass": "regression"}
  expected = {"serving_default", "predict", "sex/regression"}
  for name, kind in heads.items():
    expected |= {name, f"{name}/{kind}", f"{name}/predict"}
  served = re.search(r"^served signatures: (.*)$", out, re.M).group(1).split(", ")
  assert set(served) == expected
  assert {p.name for p in (tmp_path / "penguins").iterdir()} == {
      "manifest.json", *(s.replace("/", "%2F") + ".jaxexport" for s in expected)
  }
  # Each printed row: species, p, sex, p, mass, then the truth.
  rows = re.findall(r"^\s*(Adelie|Chinstrap|Gentoo)\s+[\d.]+\s+(female|male)\s+[\d.]+\s+[\d.]+\s", out, re.M)
  assert len(rows) == 8
  assert "serving_default outputs: ['classes', 'scores'] classes: ['Adelie', 'Chinstrap', 'Gentoo']" in out
  # 67 test rows and requests of 1 to 128 rows compile the three buckets only.
  assert "predict compiled batch sizes: [1, 16, 128]" in out

  def accuracy(source, head):
    return float(re.search(rf"^{source} accuracy/{head} ([\d.]+)$", out, re.M).group(1))

  # Served class names agree with in-process metrics, and the model learned.
  for head in ("species", "sex"):
    assert accuracy("served", head) == accuracy("in-process", head)
  assert accuracy("served", "species") > 0.9
  assert accuracy("served", "sex") > 0.7
