"""Runs every example as a user would, in a subprocess, and checks its output."""

import json
import os
import pathlib
import re
import subprocess
import sys
import time

import numpy as np
import pytest

EXAMPLES = pathlib.Path(__file__).resolve().parent.parent / "examples"


def run_example(name, *args, env=None):
  """Runs `examples/<name>`; returns its stdout, stderr and wall time."""
  environment = dict(os.environ)
  # As if run standalone: without the test suite's 8 simulated devices.
  environment.pop("XLA_FLAGS", None)
  environment.update(env or {})
  start = time.perf_counter()
  result = subprocess.run(
      [sys.executable, str(EXAMPLES / name), *args],
      capture_output=True,
      text=True,
      env=environment,
      timeout=300,
  )
  wall = time.perf_counter() - start
  assert result.returncode == 0, f"{name} failed:\n{result.stdout}\n{result.stderr}"
  return result.stdout, result.stderr, wall


def printed_metrics(stdout):
  """The `<metric key> <value>` lines an example prints."""
  return {
      match[1]: float(match[2])
      for match in re.finditer(r"^(\S+/\S+|regularization_loss)\s+(-?\d+\.\d+)$", stdout, re.M)
  }


def test_every_example_is_run_by_a_test():
  tests = "".join(path.read_text() for path in pathlib.Path(__file__).parent.glob("test_*.py"))
  untested = [path.name for path in EXAMPLES.glob("*.py") if f'"{path.name}"' not in tests]
  assert not untested


def test_penguins_meets_its_accuracy_bounds(tmp_path):
  stdout, stderr, wall = run_example("penguins.py", "--out", str(tmp_path))
  metrics = json.loads((tmp_path / "metrics.json").read_text())
  assert metrics["accuracy/species"] >= 0.95
  assert metrics["accuracy/sex"] >= 0.80
  assert metrics["average_loss/body_mass"] <= 0.35
  assert all(isinstance(value, float) for value in metrics.values())
  assert (tmp_path / "loss_curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
  # The printed table agrees with the file.
  table_header = re.search(r"^metric\s+species\s+sex\s+body_mass$", stdout, re.M)
  assert table_header, stdout
  accuracy_row = re.search(r"^accuracy\s+(\d\.\d+)\s+(\d\.\d+)\s*$", stdout, re.M)
  assert float(accuracy_row[1]) == pytest.approx(metrics["accuracy/species"], abs=1e-4)
  assert float(accuracy_row[2]) == pytest.approx(metrics["accuracy/sex"], abs=1e-4)
  assert "342 measured penguins (9 of unknown sex)" in stdout
  # The progress bar showed every head's loss.
  assert re.search(r"species=[\d.]+, sex=[\d.]+, body_mass=[\d.]+", stderr)
  assert wall < 60


def test_quickstart():
  stdout, _, _ = run_example("quickstart.py")
  metrics = printed_metrics(stdout)
  assert metrics["accuracy/topic"] > 0.9
  assert metrics["accuracy/click"] > 0.85


def test_flax_nnx_example_compiles_its_step_once():
  stdout, stderr, _ = run_example("flax_nnx_multitask.py", env={"JAX_LOG_COMPILES": "1"})
  # The head weight schedule ran from 0 to 1 ...
  assert "dwell weight 0.00" in stdout and "dwell weight 1.00" in stdout
  # ... through one compilation of the train step.
  assert len(re.findall(r"Compiling jit\(train_step\)", stderr)) == 1
  metrics = printed_metrics(stdout)
  assert metrics["accuracy/topic"] > 0.9
  assert metrics["average_loss/dwell"] < 0.1


def test_flax_linen_example():
  stdout, _, _ = run_example("flax_linen_multitask.py")
  metrics = printed_metrics(stdout)
  assert metrics["accuracy/topic"] > 0.9
  assert 0 < metrics["regularization_loss"] < 0.1
  assert re.search(r"regularization 0\.\d+\); last 100 steps' train accuracy click 0\.\d+", stdout)


def test_sharded_example_matches_one_device():
  stdout, _, _ = run_example("sharded_multitask.py")
  assert "8 devices" in stdout
  assert "float32[1024@batch,8]" in stdout
  difference = re.search(r"from training on one device: (\S+)$", stdout, re.M)
  assert float(difference[1]) < 1e-5
  assert printed_metrics(stdout)["accuracy/topic"] > 0.9


def test_pmap_example():
  stdout, _, _ = run_example("pmap_multitask.py")
  assert "8 devices, 32 examples per device" in stdout
  assert printed_metrics(stdout)["accuracy/topic"] > 0.9


def test_penguins_mtl_trains_every_method_to_the_same_bounds(tmp_path):
  # The default run (seed 0, 60 epochs), whose table the docstring describes.
  results_file = tmp_path / "results.json"
  stdout, _, _ = run_example("penguins_mtl.py", "--json", str(results_file))
  results = json.loads(results_file.read_text())
  assert list(results) == ["equal weights", "uncertainty", "UPGrad (trunk)"]
  for method, result in results.items():
    # Measured at seeds 0 to 3: species 0.9855, sex 0.85 to 0.88, sex AUC
    # 0.93 to 0.96, mass RMSE 320 to 345 g (a constant guess: about 814 g).
    assert result["species accuracy"] > 0.95, method
    assert result["sex accuracy"] > 0.8, method
    assert result["sex AUC"] > 0.9, method
    assert 100 < result["mass RMSE (g)"] < 420, method
    weights = np.array(list(result["head weights"].values()))
    assert list(result["head weights"]) == ["species", "sex", "body_mass"]
    assert np.all(np.isfinite(weights)) and np.all(weights > 0), method
  # The plain step: each head's gradient has the multi_head's weight, 1.
  np.testing.assert_array_equal(list(results["equal weights"]["head weights"].values()), 1.0)
  # Uncertainty weights 0.5 exp(-s) left their start of 0.5, towards 1 / (2 L):
  # the species head, whose training loss nears 0, weighs the most by far.
  uw = results["uncertainty"]["head weights"]
  assert uw["species"] > 20 * max(uw["sex"], uw["body_mass"])
  assert all(1.0 < uw[name] < 10.0 for name in ("sex", "body_mass"))
  # UPGrad averages projections onto the dual cone, each with a weight of at
  # least 1 on its own head: every weight is at least 1/3 (up to its
  # regularization), and above it where a projection happened.
  upgrad = np.array(list(results["UPGrad (trunk)"]["head weights"].values()))
  assert np.all(upgrad > 1 / 3 - 1e-2)
  assert upgrad.max() > 0.4
  # The printed table shows the same numbers, one row per method.
  for method, result in results.items():
    numbers = r"\s+(\d\.\d+)\s+(\d\.\d+)\s+(\d\.\d+)\s+(\d+\.\d)\s"
    row = re.search(rf"^{re.escape(method)}{numbers}", stdout, re.M)
    assert row, stdout
    assert float(row[1]) == pytest.approx(result["species accuracy"], abs=1e-4)
    assert float(row[4]) == pytest.approx(result["mass RMSE (g)"], abs=0.05)
