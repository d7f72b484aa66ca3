"""jheads' benchmark suite (issue 5): is a head library free?

    python -m benchmarks.run [--quick] [--peers] [--json PATH] [--sections ...]

Sections (the problem is `benchmarks/problem.py`):

* overhead: the jheads `multi_head` train step against hand-written
  vectorized JAX, the naive per-head loop and `multi_head(vectorize=False)`,
  for T = 1, 10, 100 heads: ms per step and first-step (trace, compile and
  run) seconds.
* peers (with `--peers`): Keras 3 on JAX (`fit`) and the TF 2.15 Estimator
  with `tf.estimator.MultiHead`, T = 10 and 100. The Estimator runs in a
  subprocess under `--tf-python` (default `$JHEADS_TF_PYTHON`, else this
  Python if it has tensorflow and tensorflow_estimator).
* auc: streaming ROC and PR AUC statistics over N = 1,000,000 weighted
  predictions in batches of 65,536 at T = 200 and 10,000 thresholds:
  `jheads.metrics.auc_histogram` (one update gives both curves) against the
  [N x T] broadcast compare of TF 1 metrics and metrax, and one
  `keras.metrics.AUC` (jitted, stateless).
* hlo: op counts of the jitted T = 100 train steps.
* multistep: `training.scan_steps` (k train steps per dispatch, one
  `lax.scan` over a `[k, batch, ...]` block) at k = 1 (one dispatch per
  step), 8 and 32, for T = 1, 10, 100: ms per step and the speed-up over
  k = 1.
* scale, serving, workload: `benchmarks.many_heads` (T = 1000 binary and
  cycling heads: compile seconds, peak RSS, step time against the stacked
  floor, merge and compute), `benchmarks.serving` (p50/p99 latency of a
  loaded 3-head artifact at batch 1 and 256, first calls) and
  `benchmarks.workload` (the 5-head recommender against Keras 3), each in a
  fresh subprocess (`--quick` passed on), their JSON kept in the report.

Every comparison runs its contenders interleaved, A B, B A, A B ..., for
several rounds, and reports medians; a ratio is the median over rounds of
the paired per-round ratio, which cancels load that drifts between rounds.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from typing import Any

os.environ.setdefault("KERAS_BACKEND", "jax")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from benchmarks import problem  # noqa: E402
from jheads import metrics  # noqa: E402
from jheads import training  # noqa: E402

SECTIONS = ("overhead", "checks", "multistep", "peers", "auc", "hlo", "scale", "serving", "workload")
# Sections that run another benchmark module in a subprocess (peak RSS and
# compile times of a fresh process), reporting its JSON.
SUBPROCESS_SECTIONS = {
    "scale": [
        ["benchmarks.many_heads", "1000", "binary"],
        ["benchmarks.many_heads", "1000", "cycling"],
    ],
    "serving": [["benchmarks.serving"]],
    "workload": [["benchmarks.workload"]],
}
BLOCK_SIZES = (1, 8, 32)
HEAD_COUNTS = (1, 10, 100)
PEER_HEAD_COUNTS = (10, 100)
AUC_THRESHOLDS = (200, 10_000)
AUC_PREDICTIONS = 1_000_000
AUC_BATCH = 65_536


@dataclasses.dataclass(frozen=True)
class Settings:
  """How long to measure; `--quick` trades precision for time."""

  first_step_repeats: int  # fresh jit per repeat, interleaved
  rounds: int  # steady-state rounds, interleaved
  steps: int  # train steps per contender per round
  peer_repeats: int  # Estimator subprocesses per T
  auc_rounds: int
  baseline_batches: dict[int, int]  # batches the [N x T] baseline streams, by T


QUICK = Settings(3, 11, 50, 2, 7, {200: 4, 10_000: 1})
FULL = Settings(5, 31, 100, 3, 15, {200: 16, 10_000: 2})


# ----------------------------------------------------------------------------
# Measuring.


def interleave(blocks: dict[str, Callable[[], float]], rounds: int) -> dict[str, list[float]]:
  """Runs each block once per round, in turn; collects what each returns.

  Odd rounds run the blocks in reverse (A B, B A, A B, ...), so that no
  contender always runs first, or always right after the same one.
  """
  results = {name: [] for name in blocks}
  names = list(blocks)
  for round_ in range(rounds):
    for name in names if round_ % 2 == 0 else names[::-1]:
      results[name].append(blocks[name]())
  return results


def median(values: list[float]) -> float:
  return float(statistics.median(values))


def paired_ratio(numerator: list[float], denominator: list[float]) -> float:
  return median([a / b for a, b in zip(numerator, denominator)])


class Stepper:
  """A jitted train step that keeps its own params and optimizer state."""

  def __init__(self, loss_fn: problem.LossFn, num_heads: int):
    self.step = jax.jit(problem.train_step(loss_fn, problem.make_optimizer()))
    params, self.opt_state, self.batch = problem.step_inputs(num_heads)
    self.params = params
    self.loss = None

  def run(self, steps: int) -> float:
    """Runs `steps` steps; returns milliseconds per step."""
    start = time.perf_counter()
    for _ in range(steps):
      self.params, self.opt_state, self.loss = self.step(
          self.params, self.opt_state, self.batch
      )
    jax.block_until_ready(self.loss)
    return 1e3 * (time.perf_counter() - start) / steps


def first_step_seconds(contender: str, num_heads: int) -> float:
  """Trace, compile and run one step of a freshly built contender."""
  loss_fn = problem.make_loss(contender, num_heads)
  step = jax.jit(problem.train_step(loss_fn, problem.make_optimizer()))
  inputs = jax.block_until_ready(problem.step_inputs(num_heads))
  start = time.perf_counter()
  jax.block_until_ready(step(*inputs))
  return time.perf_counter() - start


# ----------------------------------------------------------------------------
# Sections.


def overhead(settings: Settings, report: dict[str, Any]) -> None:
  section, ratios, compile_ratios, speedups = {}, {}, {}, {}
  for num_heads in HEAD_COUNTS:
    key = f"T{num_heads}"
    first = interleave(
        {c: lambda c=c: first_step_seconds(c, num_heads) for c in problem.CONTENDERS},
        settings.first_step_repeats,
    )
    steppers = {c: Stepper(problem.make_loss(c, num_heads), num_heads) for c in problem.CONTENDERS}
    for stepper in steppers.values():
      stepper.run(1)  # compile outside the timed rounds
    losses = {c: float(s.loss) for c, s in steppers.items()}
    times = interleave(
        {c: lambda s=s: s.run(settings.steps) for c, s in steppers.items()}, settings.rounds
    )
    section[key] = {
        c: {
            "ms_per_step": median(times[c]),
            "ms_per_step_min": min(times[c]),
            "first_step_s": median(first[c]),
            "first_loss": losses[c],
        }
        for c in problem.CONTENDERS
    }
    ratios[key] = paired_ratio(times["jheads"], times["hand"])
    compile_ratios[key] = paired_ratio(first["jheads"], first["hand"])
    speedups[key] = {
        "loop": paired_ratio(times["loop"], times["jheads"]),
        "jheads_unvectorized": paired_ratio(times["jheads_unvectorized"], times["jheads"]),
    }
    print_table(
        f"overhead, T = {num_heads} heads ({settings.rounds} rounds of {settings.steps} steps)",
        ["contender", "ms/step", "min", "first step s", "vs jheads"],
        [
            [
                c,
                f"{median(times[c]):.3f}",
                f"{min(times[c]):.3f}",
                f"{median(first[c]):.2f}",
                f"{paired_ratio(times[c], times['jheads']):.2f}x",
            ]
            for c in problem.CONTENDERS
        ],
    )
    print(
        f"overhead_ratio (jheads/hand) {ratios[key]:.3f},"
        f" compile_ratio {compile_ratios[key]:.3f}"
    )
  report["overhead"] = section
  report["overhead_ratio"] = ratios
  report["compile_ratio"] = compile_ratios
  report["speedup_over"] = speedups


class BuilderStepper:
  """`jheads.training.make_train_step` as the README builds it, with or without checks."""

  def __init__(self, num_heads: int, *, checks: bool):
    head = problem.make_multi_head(num_heads)
    self.step = jax.jit(training.make_train_step(
        head, lambda params, features: problem.apply(params, features["x"]),
        problem.make_optimizer(), checks=checks))
    self.params, self.opt_state, (x, self.labels) = problem.step_inputs(num_heads)
    self.features = {"x": x}
    self.out = None

  def run(self, steps: int) -> float:
    start = time.perf_counter()
    for _ in range(steps):
      self.params, self.opt_state, self.out = self.step(
          self.params, self.opt_state, self.features, self.labels
      )
    jax.block_until_ready(self.params)
    return 1e3 * (time.perf_counter() - start) / steps


def value_checks(settings: Settings, report: dict[str, Any]) -> None:
  """The cost of the step builders' value checks (checkify outputs, no host callback)."""
  section, ratios = {}, {}
  for num_heads in HEAD_COUNTS:
    key = f"T{num_heads}"
    steppers = {
        "checks": BuilderStepper(num_heads, checks=True),
        "no_checks": BuilderStepper(num_heads, checks=False),
    }
    for stepper in steppers.values():
      stepper.run(1)
    float(steppers["checks"].out.loss)  # the checks pass on the benchmark's data
    times = interleave(
        {c: lambda s=s: s.run(settings.steps) for c, s in steppers.items()}, settings.rounds
    )
    ratios[key] = paired_ratio(times["checks"], times["no_checks"])
    section[key] = {c: median(times[c]) for c in times}
    print(
        f"value checks, T = {num_heads}: {section[key]['checks']:.3f} ms with,"
        f" {section[key]['no_checks']:.3f} ms without; checks_ratio {ratios[key]:.3f}"
    )
  report["checks"] = section
  report["checks_ratio"] = ratios


class BlockStepper:
  """`training.scan_steps` of the README's train step over blocks of k batches."""

  def __init__(self, num_heads: int, block: int):
    step = training.make_train_step(
        problem.make_multi_head(num_heads),
        lambda params, features: problem.apply(params, features["x"]),
        problem.make_optimizer(),
    )
    self.block = block
    self.step = jax.jit(step if block == 1 else training.scan_steps(step))
    self.params, self.opt_state, (x, labels) = problem.step_inputs(num_heads)
    stack = lambda tree: jax.tree.map(lambda v: jnp.stack([v] * block), tree)
    self.features, self.labels = ({"x": x}, labels) if block == 1 else (stack({"x": x}), stack(labels))
    self.out = None

  def run(self, steps: int) -> float:
    """Runs `steps` train steps (steps / k dispatches); milliseconds per step."""
    dispatches = max(steps // self.block, 1)
    start = time.perf_counter()
    for _ in range(dispatches):
      self.params, self.opt_state, self.out = self.step(
          self.params, self.opt_state, self.features, self.labels
      )
    jax.block_until_ready(self.params)
    return 1e3 * (time.perf_counter() - start) / (dispatches * self.block)


def multistep(settings: Settings, report: dict[str, Any]) -> None:
  """Per-step time of k train steps per dispatch (`training.scan_steps`)."""
  section, speedups = {}, {}
  steps = max(settings.steps, max(BLOCK_SIZES))
  steps -= steps % max(BLOCK_SIZES)
  for num_heads in HEAD_COUNTS:
    key = f"T{num_heads}"
    steppers = {f"k{k}": BlockStepper(num_heads, k) for k in BLOCK_SIZES}
    for stepper in steppers.values():
      stepper.run(stepper.block)
    times = interleave(
        {name: lambda s=s: s.run(steps) for name, s in steppers.items()}, settings.rounds
    )
    section[key] = {name: median(times[name]) for name in times}
    speedups[key] = {
        name: paired_ratio(times["k1"], times[name]) for name in times if name != "k1"
    }
  rows = [
      [key]
      + [f"{section[key][f'k{k}']:.3f}" for k in BLOCK_SIZES]
      + [f"{speedups[key][f'k{k}']:.2f}x" for k in BLOCK_SIZES[1:]]
      for key in section
  ]
  print_table(
      "multi-step dispatch (training.scan_steps): ms per train step",
      ["T"] + [f"k={k}" for k in BLOCK_SIZES] + [f"k={k} speed-up" for k in BLOCK_SIZES[1:]],
      rows,
  )
  report["multistep"] = section
  report["multistep_speedup"] = speedups


def run_module(section: str, quick: bool, report: dict[str, Any], extra: list[str]) -> None:
  """Runs a benchmark module in a fresh Python; keeps its JSON figures."""
  results = []
  for argv in SUBPROCESS_SECTIONS[section]:
    with tempfile.TemporaryDirectory() as tmp:
      out = os.path.join(tmp, "out.json")
      flag = "--out" if argv[0] == "benchmarks.many_heads" else "--json"
      command = [sys.executable, "-m", *argv, flag, out]
      if quick and argv[0] != "benchmarks.many_heads":
        command.append("--quick")
      if section == "workload" and not importlib.util.find_spec("keras"):
        command.append("--no-keras")
      command += extra if section != "scale" else []
      print(f"\n$ {' '.join(command[2:])}")
      sys.stdout.flush()
      completed = subprocess.run(command, cwd=os.path.dirname(os.path.dirname(__file__)))
      if completed.returncode != 0 or not os.path.exists(out):
        results.append({"command": argv, "failed": completed.returncode})
        continue
      with open(out) as f:
        results.append({"command": argv, "figures": json.load(f)})
  report[section] = results


def keras_block(model: Any, x: np.ndarray, ys: list[np.ndarray], steps: int) -> Callable[[], float]:
  """`model.fit` over `steps` copies of the batch; milliseconds per step."""
  xs = np.tile(x, (steps, 1))
  yss = [np.tile(y, (steps, 1)) for y in ys]

  def block():
    start = time.perf_counter()
    model.fit(xs, yss, batch_size=problem.BATCH, epochs=1, verbose=0, shuffle=False)
    return 1e3 * (time.perf_counter() - start) / steps

  return block


def find_tf_python(requested: str | None) -> tuple[str | None, str]:
  """A Python with TF 2.15 and tensorflow_estimator, or None and why not."""
  candidate = requested or os.environ.get("JHEADS_TF_PYTHON")
  if candidate:
    if shutil.which(candidate) is None and not os.path.exists(candidate):
      return None, f"{candidate} does not exist"
    check = subprocess.run(
        [candidate, "-c", "import tensorflow, tensorflow_estimator"],
        capture_output=True,
        text=True,
        check=False,
    )
    if check.returncode != 0:
      return None, f"{candidate} cannot import tensorflow and tensorflow_estimator"
    return candidate, ""
  if importlib.util.find_spec("tensorflow") and importlib.util.find_spec("tensorflow_estimator"):
    return sys.executable, ""
  return None, (
      "no Python with tensorflow and tensorflow_estimator: pass --tf-python or"
      " set JHEADS_TF_PYTHON"
  )


def estimator_run(
    tf_python: str, num_heads: int, batch: problem.Batch, steps: int
) -> dict[str, Any]:
  script = os.path.join(os.path.dirname(os.path.abspath(__file__)), "peer_estimator.py")
  with tempfile.TemporaryDirectory() as tmp:
    path = os.path.join(tmp, "problem.npz")
    problem.save_for_estimator(num_heads, batch, path)
    done = subprocess.run(
        [tf_python, script, path, str(steps)], capture_output=True, text=True, check=False
    )
  if done.returncode != 0:
    raise RuntimeError(f"peer_estimator.py failed:\n{done.stderr[-3000:]}")
  return json.loads(done.stdout.strip().splitlines()[-1])


def peers(settings: Settings, report: dict[str, Any], tf_python_arg: str | None) -> None:
  import keras  # pylint: disable=g-import-not-at-top

  if keras.backend.backend() != "jax":
    raise RuntimeError(f"Keras runs on {keras.backend.backend()}; set KERAS_BACKEND=jax.")
  tf_python, why_not = find_tf_python(tf_python_arg)
  section: dict[str, Any] = {"keras": keras.__version__}
  speedup: dict[str, dict[str, float]] = {"keras": {}, "tf_estimator": {}}
  for num_heads in PEER_HEAD_COUNTS:
    key = f"T{num_heads}"
    jheads = Stepper(problem.make_loss("jheads", num_heads), num_heads)
    jheads.run(1)
    model = problem.keras_model(num_heads)
    x, ys = problem.keras_batch(jheads.batch)
    start = time.perf_counter()
    model.fit(x, ys, batch_size=problem.BATCH, epochs=1, verbose=0)
    keras_first = time.perf_counter() - start
    times = interleave(
        {
            "jheads": lambda: jheads.run(settings.steps),
            "keras": keras_block(model, x, ys, settings.steps),
        },
        settings.rounds,
    )
    speedup["keras"][key] = paired_ratio(times["keras"], times["jheads"])
    rows = [
        ["jheads", f"{median(times['jheads']):.3f}", "", "1.00x"],
        [
            "keras",
            f"{median(times['keras']):.3f}",
            f"{keras_first:.2f}",
            f"{speedup['keras'][key]:.2f}x",
        ],
    ]
    section[key] = {
        "jheads_ms_per_step": median(times["jheads"]),
        "keras_ms_per_step": median(times["keras"]),
        "keras_first_step_s": keras_first,
    }
    if tf_python is not None:
      # A subprocess cannot interleave step by step: alternate jheads rounds
      # with whole Estimator runs, each timed per step by a hook.
      tf_runs, jheads_near = [], []
      for _ in range(settings.peer_repeats):
        jheads_near.append(median([jheads.run(settings.steps) for _ in range(3)]))
        tf_runs.append(estimator_run(tf_python, num_heads, jheads.batch, 10 * settings.steps))
      tf_ms = [r["ms_per_step"] for r in tf_runs]
      speedup["tf_estimator"][key] = paired_ratio(tf_ms, jheads_near)
      section[key].update(
          tf_estimator_ms_per_step=median(tf_ms),
          tf_estimator_first_step_s=median([r["first_step_s"] for r in tf_runs]),
          jheads_ms_per_step_beside_tf=median(jheads_near),
      )
      section["tensorflow"] = tf_runs[0]["tensorflow"]
      rows.append([
          "tf_estimator",
          f"{median(tf_ms):.3f}",
          f"{section[key]['tf_estimator_first_step_s']:.2f}",
          f"{speedup['tf_estimator'][key]:.2f}x",
      ])
    print_table(
        f"peers, T = {num_heads} heads", ["contender", "ms/step", "first step s", "vs jheads"], rows
    )
  if tf_python is None:
    section["tf_estimator_skipped"] = why_not
    print(f"TF Estimator skipped: {why_not}")
  report["peers"] = section
  report["peer_speedup"] = speedup


def auc_data(seed: int = 0) -> list[tuple[jax.Array, jax.Array, jax.Array]]:
  """N weighted predictions of a fair classifier, as device batches."""
  rng = np.random.default_rng(seed)
  labels = (rng.random(AUC_PREDICTIONS) < 0.3).astype(np.float32)
  scores = rng.normal(size=AUC_PREDICTIONS) + 1.5 * labels
  predictions = (1 / (1 + np.exp(-scores))).astype(np.float32)
  weights = rng.uniform(0.0, 2.0, AUC_PREDICTIONS).astype(np.float32)
  return [
      jax.device_put(tuple(a[i : i + AUC_BATCH] for a in (predictions, labels, weights)))
      for i in range(0, AUC_PREDICTIONS, AUC_BATCH)
  ]


def tf_thresholds(num_thresholds: int) -> jax.Array:
  """`[0 - eps, 1/(T-1), ..., (T-2)/(T-1), 1 + eps]`, TF's and Keras' thresholds."""
  inner = np.arange(1, num_thresholds - 1, dtype=np.float32) / (num_thresholds - 1)
  return jnp.asarray(np.concatenate([[-1e-7], inner, [1 + 1e-7]]).astype(np.float32))


def broadcast_update(num_thresholds: int) -> Callable:
  """The [N x T] update of TF 1's tf.metrics.auc and metrax: compare every
  prediction with every threshold. True and false positives only (the
  negatives follow from label totals), which favours it."""
  thresholds = tf_thresholds(num_thresholds)

  def update(state, predictions, labels, weights):
    above = (predictions[None, :] > thresholds[:, None]).astype(weights.dtype)  # [T, N]
    positive = (labels != 0).astype(weights.dtype)
    tp = jnp.sum(above * (weights * positive), axis=-1)
    fp = jnp.sum(above * (weights * (1 - positive)), axis=-1)
    return state + jnp.stack([tp, fp])

  return jax.jit(update)


def auc(settings: Settings, report: dict[str, Any]) -> None:
  try:
    import keras  # pylint: disable=g-import-not-at-top
  except ImportError:
    keras = None
    print("keras is not installed (pip install -e '.[bench]'): AUC without it")
  batches = auc_data()
  section, speedup, vs_keras = {}, {}, {}
  for num_thresholds in AUC_THRESHOLDS:
    key = f"T{num_thresholds}"

    @jax.jit
    def jheads_update(histogram, predictions, labels, weights):
      return histogram + metrics.auc_histogram(
          predictions, labels, weights, num_thresholds=num_thresholds
      )

    baseline_update = broadcast_update(num_thresholds)
    baseline_batches = batches[: settings.baseline_batches[num_thresholds]]

    def stream(update, state, batches):
      def block():
        start = time.perf_counter()
        out = state
        for predictions, labels, weights in batches:
          out = update(out, predictions, labels, weights)
        jax.block_until_ready(out)
        seconds = time.perf_counter() - start
        block.result = out
        return 1e9 * seconds / sum(b[0].shape[0] for b in batches)

      return block

    zeros = jnp.zeros((2, num_thresholds))
    blocks = {
        "jheads": stream(jheads_update, zeros, batches),
        "broadcast_NxT": stream(baseline_update, zeros, baseline_batches),
    }
    if keras is not None:
      # One Keras AUC: its confusion counts give both curves, and XLA merges
      # the identical updates of a second (PR) metric anyway.
      keras_auc = keras.metrics.AUC(num_thresholds=num_thresholds)

      @jax.jit
      def keras_update(variables, predictions, labels, weights, keras_auc=keras_auc):
        return keras_auc.stateless_update_state(
            variables, labels, predictions, sample_weight=weights
        )

      blocks["keras"] = stream(keras_update, [v.value for v in keras_auc.variables], batches)
    for block in blocks.values():
      block()  # compile, and keep the first pass' result for the checks
    agreement = auc_agreement(blocks, num_thresholds, len(baseline_batches) == len(batches))
    # Each comparison is its own A B A B run: the [N x T] baseline churns
    # through gigabytes, which would slow whatever runs after it.
    rivals = [name for name in blocks if name != "jheads"]
    times, rows = {}, []
    section[key] = {"agreement": agreement}
    for rival in rivals:
      pair = interleave({"jheads": blocks["jheads"], rival: blocks[rival]}, settings.auc_rounds)
      times[rival] = pair
      ratio = paired_ratio(pair[rival], pair["jheads"])
      section[key][rival] = {
          "ns_per_prediction": median(pair[rival]),
          "jheads_ns_per_prediction": median(pair["jheads"]),
          "ratio": ratio,
      }
      for name, label, vs in (("jheads", f"jheads (beside {rival})", 1.0), (rival, rival, ratio)):
        rows.append([label, f"{median(pair[name]):.2f}", f"{median(pair[name]):.1f}", f"{vs:.1f}x"])
    speedup[key] = section[key]["broadcast_NxT"]["ratio"]
    if "keras" in times:
      vs_keras[key] = section[key]["keras"]["ratio"]
    section[key]["broadcast_NxT"]["predictions_streamed"] = sum(
        b[0].shape[0] for b in baseline_batches
    )
    print_table(
        f"AUC update, T = {num_thresholds} thresholds, N = {AUC_PREDICTIONS:,} in batches"
        f" of {AUC_BATCH:,}",
        ["update", "ns/prediction", "ms per 1e6", "vs jheads"],
        rows,
    )
    print(f"agreement: {agreement}")
  report["auc"] = section
  report["auc_speedup"] = speedup
  report["auc_vs_keras"] = vs_keras


def auc_agreement(blocks, num_thresholds: int, baseline_full: bool) -> dict[str, float]:
  """Max relative differences of the true and false positives per threshold.

  All three updates count the same thing; jheads' histogram gives the counts
  at every threshold by a reverse cumulative sum.
  """
  histogram = blocks["jheads"].result
  tp_fp = jnp.stack([jnp.cumsum(histogram[i, ::-1])[::-1] for i in range(2)])

  def relative(a, b):
    return float(jnp.max(jnp.abs(a - b)) / jnp.max(jnp.abs(b)))

  out = {}
  if "keras" in blocks:
    keras_tp, keras_fp = blocks["keras"].result[:2]
    out["keras"] = relative(tp_fp, jnp.stack([keras_tp, keras_fp]))
  if baseline_full:
    out["broadcast_NxT"] = relative(tp_fp, blocks["broadcast_NxT"].result)
  return out


def hlo(report: dict[str, Any]) -> None:
  num_heads = 100
  inputs = problem.step_inputs(num_heads)
  counts = {
      c: problem.hlo_op_counts(
          problem.train_step(problem.make_loss(c, num_heads), problem.make_optimizer()), *inputs
      )
      for c in problem.CONTENDERS
  }
  report["hlo"] = {
      "T100": counts,
      "ratio_optimized_hlo": counts["jheads"]["optimized_hlo"] / counts["hand"]["optimized_hlo"],
      "ratio_stablehlo": counts["jheads"]["stablehlo"] / counts["hand"]["stablehlo"],
  }
  print_table(
      "HLO size of the jitted T = 100 train step",
      ["contender", "optimized HLO instructions", "StableHLO ops", "vs hand"],
      [
          [
              c,
              str(n["optimized_hlo"]),
              str(n["stablehlo"]),
              f"{n['optimized_hlo'] / counts['hand']['optimized_hlo']:.2f}x",
          ]
          for c, n in counts.items()
      ],
  )


# ----------------------------------------------------------------------------
# Output.


def print_table(title: str, header: list[str], rows: list[list[str]]) -> None:
  widths = [max(len(str(r[i])) for r in [header] + rows) for i in range(len(header))]
  print(f"\n{title}")
  for row in [header, ["-" * w for w in widths]] + rows:
    print("  ".join(str(cell).ljust(w) for cell, w in zip(row, widths)))
  sys.stdout.flush()


def machine() -> dict[str, Any]:
  model = platform.processor()
  try:
    lscpu = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
    model = next(
        line.split(":", 1)[1].strip()
        for line in lscpu.splitlines()
        if line.startswith("Model name")
    )
  except (OSError, subprocess.CalledProcessError, StopIteration):
    pass
  return {
      "cpu": model,
      "cores": os.cpu_count(),
      "platform": platform.platform(),
      "python": platform.python_version(),
      "jax": jax.__version__,
      "device": str(jax.devices()[0]),
  }


def main(argv: list[str] | None = None) -> dict[str, Any]:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--quick", action="store_true", help="fewer rounds (under 10 minutes)")
  parser.add_argument("--peers", action="store_true", help="also time Keras 3 and TF Estimator")
  parser.add_argument("--json", metavar="PATH", help="write the figures to PATH")
  parser.add_argument("--sections", nargs="+", choices=SECTIONS, help="run only these")
  parser.add_argument("--tf-python", metavar="PYTHON", help="a Python with TF 2.15 Estimator")
  args = parser.parse_args(argv)
  settings = QUICK if args.quick else FULL
  sections = args.sections or [s for s in SECTIONS if s != "peers" or args.peers]
  report: dict[str, Any] = {
      "command": " ".join(
          ["python -m benchmarks.run"] + (argv if argv is not None else sys.argv[1:])
      ),
      "machine": machine(),
      "settings": dataclasses.asdict(settings),
  }
  print(json.dumps(report["machine"]))
  start = time.perf_counter()
  for section in sections:
    if section == "overhead":
      overhead(settings, report)
    elif section == "checks":
      value_checks(settings, report)
    elif section == "peers":
      peers(settings, report, args.tf_python)
    elif section == "auc":
      auc(settings, report)
    elif section == "hlo":
      hlo(report)
    elif section == "multistep":
      multistep(settings, report)
    elif section in SUBPROCESS_SECTIONS:
      extra = ["--tf-python", args.tf_python] if args.tf_python else []
      run_module(section, args.quick, report, extra)
  report["seconds"] = time.perf_counter() - start
  print(f"\ntook {report['seconds']:.0f} s")
  summary = {
      k: report[k]
      for k in report
      if k.endswith(("_ratio", "_speedup")) or k.startswith(("auc_vs", "speedup_over"))
  }
  print(json.dumps(summary, indent=1))
  if args.json:
    with open(args.json, "w") as f:
      json.dump(report, f, indent=1)
  return report


if __name__ == "__main__":
  main()
