"""Real multi-process training: 2 processes x 2 CPU devices under `jax.distributed`.

The test starts two copies of `multiprocess_worker.py` on 127.0.0.1, each with
two CPU devices of its own and gloo collectives, which train a three-head
multi_head over the four global devices with sharded `jit` and with `pmap`
and run a streamed eval. Meanwhile this process trains the same problem on
one device. Parameters must agree to 1e-5, per-step losses and metrics to
1e-6, and the two processes' replicated results exactly.

The children get an explicit environment (not conftest.py's eight forced
devices), run in their own process group and are killed with it, SIGKILL,
when they outlive `TIMEOUT_S` or when one of them fails; their stderr is
part of the failure message.
"""

from __future__ import annotations

import os
import pathlib
import signal
import socket
import subprocess
import sys
import time
from typing import NamedTuple

import numpy as np
import pytest

from tests import multiprocess_worker as worker

N_PROCESSES = 2
DEVICES_PER_PROCESS = 2
# A normal run takes 10-45 s on a 2-core machine, depending on its load; the
# workers' own watchdog (worker.WATCHDOG_S) fires first.
TIMEOUT_S = 120
WORKER = pathlib.Path(worker.__file__).resolve()
REPO_ROOT = WORKER.parents[1]

pytestmark = pytest.mark.skipif(
    sys.platform == "win32", reason="jax.distributed's CPU collectives (gloo) need Linux or macOS"
)


class Child(NamedTuple):
  process: subprocess.Popen
  stderr: pathlib.Path
  output: pathlib.Path


def free_port() -> int:
  with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def child_environment() -> dict[str, str]:
  """Only what the workers need: above all, no XLA_FLAGS forcing eight devices."""
  env = {
      "PATH": os.environ.get("PATH", os.defpath),
      "PYTHONPATH": str(REPO_ROOT),
      "PYTHONUNBUFFERED": "1",
      "JAX_PLATFORMS": "cpu",
      "XLA_FLAGS": "",
  }
  for name in ("HOME", "TMPDIR", "LANG"):
    if name in os.environ:
      env[name] = os.environ[name]
  return env


def launch(directory: pathlib.Path) -> list[Child]:
  directory.mkdir(parents=True)
  port = free_port()
  children = []
  for process_id in range(N_PROCESSES):
    stderr = directory / f"stderr{process_id}.txt"
    output = directory / f"result{process_id}.npz"
    with open(stderr, "wb") as stderr_file:
      process = subprocess.Popen(
          [sys.executable, str(WORKER), str(process_id), str(N_PROCESSES), str(port),
           str(DEVICES_PER_PROCESS), str(output)],
          cwd=REPO_ROOT,
          env=child_environment(),
          stdin=subprocess.DEVNULL,
          stdout=stderr_file,
          stderr=subprocess.STDOUT,
          start_new_session=True,
      )
    children.append(Child(process, stderr, output))
  return children


def signal_group(child: Child, signal_number: int) -> None:
  try:
    os.killpg(child.process.pid, signal_number)
  except ProcessLookupError:
    pass


def kill(children: list[Child], *, dump_stacks: bool = False) -> None:
  running = [child for child in children if child.process.poll() is None]
  if dump_stacks and running:
    for child in running:
      signal_group(child, signal.SIGUSR1)  # The worker prints every thread's stack.
    time.sleep(1.0)
  for child in running:
    signal_group(child, signal.SIGKILL)
  for child in children:
    child.process.wait()


def report(children: list[Child]) -> str:
  parts = []
  for i, child in enumerate(children):
    text = child.stderr.read_text(errors="replace") if child.stderr.exists() else ""
    # gloo prints one line per connected rank; leave them out.
    text = "\n".join(line for line in text.splitlines() if not line.startswith("[Gloo]"))
    parts.append(f"--- process {i} (exit code {child.process.returncode}) ---\n{text[-6000:]}")
  return "\n".join(parts)


def wait(children: list[Child], deadline: float) -> str | None:
  """Waits for every child; the reason for failing, or None when all exited 0."""
  while True:
    codes = [child.process.poll() for child in children]
    if any(code not in (None, 0) for code in codes):
      return "a worker failed"
    if all(code == 0 for code in codes):
      return None
    if time.monotonic() > deadline:
      return f"the workers ran past {TIMEOUT_S} s"
    time.sleep(0.1)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
  """`(one-device reference, [each process's results])`; prints the wall time and logs."""
  directory = tmp_path_factory.mktemp("multiprocess")
  expected = None
  for attempt in range(2):
    started = time.monotonic()
    deadline = started + TIMEOUT_S
    children = launch(directory / f"attempt{attempt}")
    try:
      if expected is None:
        expected = worker.reference()  # While the workers start.
      failure = wait(children, deadline)
    finally:
      kill(children, dump_stacks=time.monotonic() > deadline)
    details = report(children)
    if failure is None:
      break
    # The free port can be taken between choosing and binding it; try once more.
    if attempt == 0 and "Failed to start RPC server" in details:
      continue
    pytest.fail(f"{failure}:\n{details}", pytrace=False)
  results = [dict(np.load(child.output)) for child in children]
  print(f"multi-process run: {time.monotonic() - started:.1f} s wall\n{details}")
  return expected, results


def max_difference(a, b) -> float:
  return float(np.max(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64))))


@pytest.mark.parametrize("mode", ["jit", "pmap"])
def test_parameters_and_losses_match_one_device(runs, mode):
  (params, losses, _), results = runs
  for result in results:
    for name, value in params.items():
      np.testing.assert_allclose(
          result[f"{mode}/params/{name}"], value, rtol=0, atol=1e-5, err_msg=f"{mode} {name}"
      )
    np.testing.assert_allclose(result[f"{mode}/losses"], losses, rtol=1e-6, err_msg=mode)
  print(mode, "max |parameter difference|", max(
      max_difference(result[f"{mode}/params/{name}"], value)
      for result in results for name, value in params.items()
  ), "max |loss difference|", max(max_difference(result[f"{mode}/losses"], losses) for result in results))


@pytest.mark.parametrize("mode", ["jit/metrics", "jit/device_metrics", "pmap/metrics"])
def test_streamed_eval_metrics_match_one_device(runs, mode):
  (_, _, metrics), results = runs
  assert {"accuracy/click", "auc/click", "accuracy/topic", "average_loss/dwell", "loss/topic"} <= metrics.keys()
  for result in results:
    got = {key[len(mode) + 1:]: value for key, value in result.items() if key.startswith(mode + "/")}
    assert got.keys() == metrics.keys()
    for key, value in metrics.items():
      np.testing.assert_allclose(got[key], value, rtol=1e-6, atol=1e-6, err_msg=f"{mode} {key}")
  print(mode, "max |metric difference|", max(
      max_difference(result[f"{mode}/{key}"], value)
      for result in results for key, value in metrics.items()
  ))


def test_processes_hold_identical_replicas(runs):
  _, (first, *others) = runs
  for other in others:
    assert other.keys() == first.keys()
    for key, value in first.items():
      np.testing.assert_array_equal(other[key], value, err_msg=key)
