"""Serving latency of a loaded jheads artifact (issue 10, part 4).

    python -m benchmarks.serving [--quick] [--json PATH] [--tf-python PYTHON]

The model is `benchmarks/problem.py`'s MLP (32 -> 64 -> 64) with three heads
(binary, 5-way, regression), trained for 50 Adam steps and saved with
`jheads.export.save`; every contender serves its `predict` signature (all
three heads' predictions, class names included) on float32 `[n, 32]` numpy
requests and returns numpy arrays. Contenders:

* `bare jax.export`: `jax.jit(Exported.call)` with the outputs copied to
  numpy; no input checks, no class names: the floor under `load`;
* `jheads exact`: `jheads.export.load(path, batch_buckets=None)`, one
  compilation per request size;
* `jheads buckets`: `jheads.export.load(path)`, requests padded to the default
  batch buckets (powers of two up to 1024), each compiled on first use;
* `TF SavedModel`: the same model through `jheads.export.save_saved_model`,
  `tf.saved_model.load` and its `predict` signature, in a worker process
  under `--tf-python` (default: this Python if it has TensorFlow, else
  `$JHEADS_TF_PYTHON`); skipped when there is none.

Figures:

* cold start, each time in a fresh process after the framework's own
  start-up (median over repeats, the contenders in turn): the load, the
  first call at batch 1, the first at batch 256, then the first at batch 200,
  a new size (compiled anew at exact sizes; inside the 256 bucket with
  buckets); and `jheads buckets + warmup`, whose load compiles every bucket
  of `predict` (`warmup=["predict"]`);
* steady state: p50 and p99 latency of single calls at batch 1 and 256, the
  contenders interleaved block by block (the TF worker's blocks too, through
  its pipe), which cancels load that drifts while the benchmark runs;
* parity: the largest difference between each contender's outputs and
  `jheads exact`'s at batch 256 and at batch 200 (padded with buckets).
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import json
import os
import pathlib
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from typing import Any

import numpy as np

SIGNATURE = "predict"
NUM_HEADS = 3
TRAIN_STEPS = 50
BATCH_SIZES = (1, 256)
NEW_SIZE = 200  # a size first seen after 256: inside the 256 bucket
INPUT = "x"


@dataclasses.dataclass(frozen=True)
class Settings:
  """How long to measure; `--quick` trades precision for time."""

  cold_repeats: int  # fresh loads per contender
  rounds: int  # interleaved rounds of steady-state blocks
  calls: dict[int, int]  # calls per block, by batch size


QUICK = Settings(2, 6, {1: 60, 256: 15})
FULL = Settings(3, 20, {1: 150, 256: 40})


def request(batch_size: int, seed: int = 0) -> np.ndarray:
  """The request every contender gets: the same `[batch_size, 32]` float32 rows."""
  rng = np.random.default_rng(seed)
  return rng.normal(size=(batch_size, 32)).astype(np.float32)


def percentiles(seconds: list[float]) -> dict[str, float]:
  ms = 1e3 * np.asarray(seconds)
  return {"p50_ms": float(np.percentile(ms, 50)), "p99_ms": float(np.percentile(ms, 99)),
          "calls": len(seconds)}


def timed(fn: Callable[[], Any]) -> float:
  start = time.perf_counter()
  fn()
  return time.perf_counter() - start


def numeric_difference(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> float:
  """The largest |a - b| over numeric outputs; inf if keys, shapes or classes differ."""
  if sorted(a) != sorted(b):
    return float("inf")
  worst = 0.0
  for key in a:
    x, y = np.asarray(a[key]), np.asarray(b[key])
    if x.shape != y.shape:
      return float("inf")
    if x.dtype.kind in "USO" or y.dtype.kind in "USO":
      if not np.array_equal(x.astype(str), y.astype(str)):
        return float("inf")
    else:
      worst = max(worst, float(np.max(np.abs(x.astype(np.float64) - y.astype(np.float64)))))
  return worst


# ----------------------------------------------------------------------------
# The model and its artifacts.


def build_model(params_path: pathlib.Path | None = None):
  """The 3-head model, trained here (and saved to `params_path`) or read from it."""
  import jax

  from benchmarks import problem

  head = problem.make_multi_head(NUM_HEADS)
  if params_path is not None and params_path.exists():
    with np.load(params_path) as stored:
      params = [(stored[f"w{i}"], stored[f"b{i}"]) for i in range(len(stored.files) // 2)]
  else:
    params, opt_state, batch = problem.step_inputs(NUM_HEADS)
    step = jax.jit(problem.train_step(problem.jheads_loss(head), problem.make_optimizer()))
    for _ in range(TRAIN_STEPS):
      params, opt_state, _ = step(params, opt_state, batch)
    params = [(np.asarray(w), np.asarray(b)) for w, b in params]
    if params_path is not None:
      np.savez(params_path, **{f"{k}{i}": v for i, p in enumerate(params) for k, v in zip("wb", p)})

  def predict_logits(features):
    return problem.apply(params, features[INPUT])

  return head, predict_logits


# ----------------------------------------------------------------------------
# The TF worker: serves the SavedModel's blocks to the parent over a pipe.


def tf_worker(workdir: str) -> None:
  # Responses go to the original stdout; anything TF prints goes to stderr.
  out = os.fdopen(os.dup(1), "w")
  os.dup2(2, 1)
  import tensorflow as tf

  import jheads.export

  workdir = pathlib.Path(workdir)
  head, model = build_model(workdir / "params.npz")
  saved = workdir / "saved_model"
  save_s = timed(lambda: jheads.export.save_saved_model(
      saved, head, model, {INPUT: request(1)}
  ))

  serving = tf.saved_model.load(str(saved)).signatures[SIGNATURE]
  inputs = {size: request(size) for size in (*BATCH_SIZES, NEW_SIZE)}
  for x in inputs.values():
    tf_call(serving, x)
  out.write(json.dumps({"ready": True, "save_s": save_s, "tensorflow": tf.__version__}) + "\n")
  out.flush()
  for line in sys.stdin:
    command = json.loads(line)
    if command["op"] == "block":
      x = inputs[command["batch"]]
      reply = [timed(lambda: tf_call(serving, x)) for _ in range(command["calls"])]
    elif command["op"] == "outputs":
      reply = {k: v.tolist() if v.dtype != object else v.astype(str).tolist()
               for k, v in tf_call(serving, inputs[command["batch"]]).items()}
    else:
      break
    out.write(json.dumps(reply) + "\n")
    out.flush()


def tf_call(fn: Any, x: np.ndarray) -> dict[str, np.ndarray]:
  import tensorflow as tf

  return {k: v.numpy() for k, v in fn(**{INPUT: tf.constant(x)}).items()}


class TFWorker:
  """The parent's end of the pipe to `tf_worker`."""

  def __init__(self, python: str, workdir: pathlib.Path):
    root = pathlib.Path(__file__).resolve().parent.parent
    self.process = subprocess.Popen(
        [python, "-m", "benchmarks.serving", "--tf-worker", str(workdir)],
        cwd=root, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
        env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2", "JAX_PLATFORMS": "cpu"},
    )
    self.info = self._read()

  def _read(self) -> Any:
    line = self.process.stdout.readline()
    if not line:
      raise RuntimeError(f"the TF worker exited ({self.process.wait()}); see its stderr above")
    return json.loads(line)

  def ask(self, **command: Any) -> Any:
    self.process.stdin.write(json.dumps(command) + "\n")
    self.process.stdin.flush()
    return self._read()

  def close(self) -> None:
    if self.process.poll() is None:
      self.process.stdin.write(json.dumps({"op": "quit"}) + "\n")
      self.process.stdin.flush()
      try:
        self.process.wait(timeout=60)
      except subprocess.TimeoutExpired:
        self.process.kill()


def find_tf_python(requested: str | None) -> str | None:
  if requested:
    return requested
  if importlib.util.find_spec("tensorflow") is not None:
    return sys.executable
  return os.environ.get("JHEADS_TF_PYTHON") or None


# ----------------------------------------------------------------------------
# The jax contenders.


def bare(path: pathlib.Path) -> Callable[[np.ndarray], dict[str, np.ndarray]]:
  import jax

  manifest = json.loads((path / "manifest.json").read_text())
  module = (path / manifest["signatures"][SIGNATURE]["file"]).read_bytes()
  call = jax.jit(jax.export.deserialize(bytearray(module)).call)
  return lambda x: {k: np.asarray(v) for k, v in call({INPUT: x}).items()}


def jheads_loader(**options: Any) -> Callable[[pathlib.Path], Callable]:
  def load(path: pathlib.Path) -> Callable[[np.ndarray], dict[str, np.ndarray]]:
    import jheads.export

    signature = jheads.export.load(path, **options)[SIGNATURE]
    return lambda x: signature({INPUT: x})

  return load


LOADERS = {
    "bare jax.export": bare,
    "jheads exact": jheads_loader(batch_buckets=None),
    "jheads buckets": jheads_loader(),
    "jheads buckets + warmup": jheads_loader(warmup=[SIGNATURE]),
}
STEADY = ("bare jax.export", "jheads exact", "jheads buckets")  # warmup serves as buckets


# ----------------------------------------------------------------------------
# Measuring and reporting.


def main(argv: list[str] | None = None) -> dict[str, Any]:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--quick", action="store_true", help="fewer repeats and rounds")
  parser.add_argument("--json", metavar="PATH", help="write the figures to PATH")
  parser.add_argument("--tf-python", metavar="PYTHON", help="a Python with TensorFlow >= 2.21")
  parser.add_argument("--tf-worker", metavar="DIR", help=argparse.SUPPRESS)
  parser.add_argument("--cold", metavar="CONTENDER", help=argparse.SUPPRESS)
  parser.add_argument("--workdir", help=argparse.SUPPRESS)
  args = parser.parse_args(argv)
  if args.tf_worker:
    tf_worker(args.tf_worker)
    return {}
  if args.cold:
    print(json.dumps(cold_start(args.cold, pathlib.Path(args.workdir))))
    return {}

  os.environ.setdefault("JAX_PLATFORMS", "cpu")
  import jax

  import jheads.export
  from benchmarks.run import machine, print_table

  settings = QUICK if args.quick else FULL
  report: dict[str, Any] = {
      "command": " ".join(["python -m benchmarks.serving"] + (argv if argv is not None else sys.argv[1:])),
      "machine": machine(),
      "settings": dataclasses.asdict(settings),
      "signature": SIGNATURE,
  }
  print(json.dumps(report["machine"]))
  start = time.perf_counter()
  with tempfile.TemporaryDirectory() as scratch:
    workdir = pathlib.Path(scratch)
    head, model = build_model(workdir / "params.npz")
    artifact = workdir / "artifact"
    report["save_s"] = timed(lambda: jheads.export.save(artifact, head, model, {INPUT: request(1)}))
    jax.jit(lambda x: x + 1)(np.zeros(3))  # jax's own start-up is no contender's

    tf_python = find_tf_python(args.tf_python)
    worker = None
    if tf_python is None:
      print("TF SavedModel: skipped (no TensorFlow here; pass --tf-python or set JHEADS_TF_PYTHON)")
      report["tf"] = "skipped: no TensorFlow"
    else:
      worker = TFWorker(tf_python, workdir)
      report["tf"] = worker.info
    try:
      report["cold"] = cold(workdir, settings, tf_python)
      served = {name: LOADERS[name](artifact) for name in STEADY}
      contenders: dict[str, Callable[[int, int], list[float]]] = {
          name: steady_block(fn) for name, fn in served.items()
      }
      if worker is not None:
        contenders["TF SavedModel"] = lambda batch, calls: worker.ask(op="block", batch=batch, calls=calls)
      report["parity"] = parity(served, worker)
      report["steady"] = steady(contenders, settings)
    finally:
      if worker is not None:
        worker.close()
  report["seconds"] = time.perf_counter() - start
  # Other processes' load inflates cold starts and p99s: say how busy the machine was.
  report["load_average_1_5_15_min"] = list(os.getloadavg())

  cold_rows = [
      [name, f"{r['load_s']:.3f}", *(f"{r[f'first_call_{s}_s'] * 1e3:.1f}" for s in (*BATCH_SIZES, NEW_SIZE))]
      for name, r in report["cold"].items()
  ]
  print_table(
      "cold start, in a fresh process: s to load, then ms for the first call at each size, in turn",
      ["contender", "load s", "first b=1 ms", "first b=256 ms", f"first b={NEW_SIZE} (new) ms"],
      cold_rows,
  )
  steady_rows = [
      [name, *(f"{r[str(b)][q]:.3f}" for b in BATCH_SIZES for q in ("p50_ms", "p99_ms"))]
      for name, r in report["steady"].items()
  ]
  print_table(
      "steady state: ms per call",
      ["contender", "b=1 p50", "b=1 p99", "b=256 p50", "b=256 p99"],
      steady_rows,
  )
  print_table(
      "parity: largest |difference| from jheads exact (inf: keys, shapes or classes differ)",
      ["contender", "b=256", f"b={NEW_SIZE}"],
      [[name, *(f"{r[str(b)]:.2g}" for b in (256, NEW_SIZE))] for name, r in report["parity"].items()],
  )
  print(f"\ntook {report['seconds']:.0f} s; load average at the end"
        f" {', '.join(f'{x:.1f}' for x in report['load_average_1_5_15_min'])}"
        f" on {os.cpu_count()} cores")
  if args.json:
    with open(args.json, "w") as f:
      json.dump(report, f, indent=1)
  return report


def cold(workdir: pathlib.Path, settings: Settings, tf_python: str | None) -> dict[str, dict[str, float]]:
  """Each contender's cold start, each time in a fresh process (median of repeats)."""
  pythons = {name: sys.executable for name in LOADERS}
  if tf_python is not None:
    pythons["TF SavedModel"] = tf_python
  root = pathlib.Path(__file__).resolve().parent.parent
  runs: dict[str, list[dict[str, float]]] = {name: [] for name in pythons}
  names = list(pythons)
  for repeat in range(settings.cold_repeats):
    for name in names if repeat % 2 == 0 else names[::-1]:
      result = subprocess.run(
          [pythons[name], "-m", "benchmarks.serving", "--cold", name, "--workdir", str(workdir)],
          cwd=root, capture_output=True, text=True, timeout=600, check=True,
          env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2", "JAX_PLATFORMS": "cpu"},
      )
      runs[name].append(json.loads(result.stdout.strip().splitlines()[-1]))
  return {name: {k: float(np.median([r[k] for r in rs])) for k in rs[0]} for name, rs in runs.items()}


def cold_start(name: str, workdir: pathlib.Path) -> dict[str, float]:
  """In a fresh process: the load, then the first call at each size in turn."""
  if name == "TF SavedModel":
    import tensorflow as tf

    tf_call(lambda x: {"y": x + 1}, np.zeros(3))  # TF's own start-up is no contender's
    served = {}
    load_s = timed(lambda: served.setdefault(
        "fn", tf.saved_model.load(str(workdir / "saved_model")).signatures[SIGNATURE]
    ))
    fn = lambda x: tf_call(served["fn"], x)
  else:
    import jax

    import jheads.export  # noqa: F401  (imported before the clock starts, as jax is)

    jax.jit(lambda x: x + 1)(np.zeros(3))  # jax's own start-up is no contender's
    served = {}
    load_s = timed(lambda: served.setdefault("fn", LOADERS[name](workdir / "artifact")))
    fn = served["fn"]
  result = {"load_s": load_s}
  for size in (*BATCH_SIZES, NEW_SIZE):
    result[f"first_call_{size}_s"] = timed(lambda: fn(request(size)))
  return result


def steady_block(fn: Callable[[np.ndarray], Any]) -> Callable[[int, int], list[float]]:
  inputs = {size: request(size) for size in BATCH_SIZES}
  for x in inputs.values():
    fn(x)  # compiled before any timing

  def block(batch: int, calls: int) -> list[float]:
    x = inputs[batch]
    return [timed(lambda: fn(x)) for _ in range(calls)]

  return block


def steady(contenders: dict[str, Callable[[int, int], list[float]]], settings: Settings) -> dict[str, Any]:
  samples = {name: {b: [] for b in BATCH_SIZES} for name in contenders}
  names = list(contenders)
  for round_ in range(settings.rounds):
    for name in names if round_ % 2 == 0 else names[::-1]:
      for batch in BATCH_SIZES:
        samples[name][batch] += contenders[name](batch, settings.calls[batch])
  return {name: {str(b): percentiles(s) for b, s in by_batch.items()} for name, by_batch in samples.items()}


def parity(served: dict[str, Callable], worker: TFWorker | None) -> dict[str, dict[str, float]]:
  result = {}
  for batch in (256, NEW_SIZE):
    reference = served["jheads exact"](request(batch))
    for name, fn in served.items():
      if name != "jheads exact":
        outputs = fn(request(batch))
        if name == "bare jax.export":  # no class names: compare what it has
          reference_part = {k: v for k, v in reference.items() if k in outputs}
          difference = numeric_difference(outputs, reference_part)
        else:
          difference = numeric_difference(outputs, reference)
        result.setdefault(name, {})[str(batch)] = difference
    if worker is not None:
      outputs = {k: np.asarray(v) for k, v in worker.ask(op="outputs", batch=batch).items()}
      result.setdefault("TF SavedModel", {})[str(batch)] = numeric_difference(outputs, reference)
  return result


if __name__ == "__main__":
  main()
