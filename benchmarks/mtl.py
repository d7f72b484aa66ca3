"""Multi-task train steps against torchjd 0.18 (issue 11.5).

    python -m benchmarks.mtl [--quick] [--torchjd-python PATH] [--json PATH]

The problem: a shared ReLU trunk 64 -> 256 -> 256, T linear binary heads
(one [256, T] matrix), batch 256, Adam(1e-3), T = 2, 10 and 40. Contenders:

* jheads: `training.make_train_step` plain, and with `aggregator=` UPGrad,
  MGDA and Nash-MTL over the trunk (`shared=`), the Jacobian taken
  layer-wise (the default) and, for UPGrad, by vmap of the backward pass
  (`jacobian="vmap"`, the straightforward way); and
  `make_representation_train_step` (the Jacobian at the trunk's output);
* torchjd: the same model and data in torch on CPU, `loss.backward()` for
  the plain step and `mtl_backward` + `jac_to_grad` with `UPGrad()`,
  `MGDA()` and `NashMTL(n_tasks=T)`, run in a subprocess of the Python given
  by `--torchjd-python` (default `$JHEADS_TORCHJD_PYTHON`, else
  /work/venv-torchjd-bench/bin/python), so this venv needs no torch.

Every comparison runs interleaved: each round times every contender in turn
(reversed on odd rounds), a contender's time in a round is the median of
its steps, and a ratio is the median over rounds of the per-round ratio,
which cancels load that drifts between rounds. Both wall time and the
process's CPU time are reported (the CPU time, summed over its threads, is
what a contender consumes, and moves less with other processes' load);
torch runs with `OMP_WAIT_POLICY=PASSIVE` so that its idle threads neither
spin nor take the cores from the next contender. Also reported: the Gramian
solve alone (jitted `aggregator.weights` on this problem's Gramian), and the
first step (trace, compile and run) at T = 40.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import subprocess
import sys
import tempfile
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

import jheads
from benchmarks import run
from jheads import aggregation, training

HEAD_COUNTS = (2, 10, 40)
TRUNK = (64, 256, 256)
BATCH = 256
LEARNING_RATE = 1e-3
METHODS = ("upgrad", "mgda", "nash_mtl")
TORCH_METHODS = ("plain", *METHODS)
DEFAULT_TORCHJD_PYTHON = "/work/venv-torchjd-bench/bin/python"


@dataclasses.dataclass(frozen=True)
class Settings:
  rounds: int
  steps: int  # per contender per round
  solve_repeats: int
  first_step_repeats: int


QUICK = Settings(rounds=5, steps=10, solve_repeats=50, first_step_repeats=1)
FULL = Settings(rounds=11, steps=20, solve_repeats=200, first_step_repeats=2)


def aggregator(method: str) -> aggregation.Aggregator:
  return getattr(aggregation, method)()


# ----------------------------------------------------------------------------
# The problem, in JAX.


def make_head(n_heads: int) -> jheads.MultiHead:
  return jheads.multi_head(
      [jheads.binary_classification_head(name=f"task{i}") for i in range(n_heads)]
  )


def init_params(n_heads: int, seed: int = 0) -> dict[str, Any]:
  """PyTorch's default `nn.Linear` initialisation, so both sides start alike."""
  rng = np.random.default_rng(seed)

  def linear(fan_in, fan_out):
    bound = 1.0 / np.sqrt(fan_in)
    return (
        rng.uniform(-bound, bound, (fan_in, fan_out)).astype(np.float32),
        rng.uniform(-bound, bound, (fan_out,)).astype(np.float32),
    )

  w1, b1 = linear(TRUNK[0], TRUNK[1])
  w2, b2 = linear(TRUNK[1], TRUNK[2])
  w, b = linear(TRUNK[2], n_heads)
  return {"trunk": {"w1": w1, "b1": b1, "w2": w2, "b2": b2}, "heads": {"w": w, "b": b}}


def make_data(n_heads: int, seed: int = 1) -> tuple[np.ndarray, np.ndarray]:
  """Inputs and `[batch, T]` 0/1 labels from random linear rules (conflicting heads)."""
  rng = np.random.default_rng(seed)
  x = rng.normal(size=(BATCH, TRUNK[0])).astype(np.float32)
  rules = rng.normal(size=(TRUNK[0], n_heads))
  y = (x @ rules + 0.5 * rng.normal(size=(BATCH, n_heads)) > 0).astype(np.float32)
  return x, y


def trunk_fn(params, features):
  t = params["trunk"]
  h = jax.nn.relu(features["x"] @ t["w1"] + t["b1"])
  return jax.nn.relu(h @ t["w2"] + t["b2"])


def heads_fn(params, z):
  return z @ params["heads"]["w"] + params["heads"]["b"]


def apply_fn(params, features):
  return heads_fn(params, trunk_fn(params, features))


SHARED = {"trunk": True, "heads": False}


def build_step(contender: str, n_heads: int):
  """`(step, state)` of a jheads contender, unjitted."""
  head, tx = make_head(n_heads), optax.adam(LEARNING_RATE)
  params = init_params(n_heads)
  if contender == "plain":
    return training.make_train_step(head, apply_fn, tx), tx.init(params)
  method, _, variant = contender.partition(":")
  agg = aggregator(method)
  state = training.init_train_state(head, tx, params, aggregator=agg)
  if variant == "rep":
    step = training.make_representation_train_step(head, trunk_fn, heads_fn, tx, aggregator=agg)
  else:
    step = training.make_train_step(
        head, apply_fn, tx, aggregator=agg, shared=SHARED, jacobian=variant or "layers"
    )
  return step, state


class JaxStepper:
  """A jitted jheads step that keeps its own params and state."""

  def __init__(self, contender: str, n_heads: int):
    step, self.state = build_step(contender, n_heads)
    self.step = jax.jit(step)
    self.params = init_params(n_heads)
    x, y = make_data(n_heads)
    self.features = {"x": jnp.asarray(x)}
    self.labels = {f"task{i}": jnp.asarray(y[:, i]) for i in range(n_heads)}
    self.out = None

  def run(self, steps: int) -> tuple[float, float]:
    """Runs `steps` steps; returns the median wall and CPU milliseconds per step."""
    wall, cpu = [], []
    for _ in range(steps):
      start, start_cpu = time.perf_counter(), time.process_time()
      self.params, self.state, self.out = self.step(
          self.params, self.state, self.features, self.labels
      )
      jax.block_until_ready(self.params)
      wall.append(1e3 * (time.perf_counter() - start))
      cpu.append(1e3 * (time.process_time() - start_cpu))
    return run.median(wall), run.median(cpu)


def first_step_seconds(contender: str, n_heads: int) -> float:
  """Trace, compile and run one step of a freshly built contender."""
  stepper = JaxStepper(contender, n_heads)
  start = time.perf_counter()
  stepper.run(1)
  return time.perf_counter() - start


def gramian_of(n_heads: int) -> jax.Array:
  """The Gramian of the trunk's Jacobian at the initial parameters."""
  head = make_head(n_heads)
  params = init_params(n_heads)
  x, y = make_data(n_heads)
  features = {"x": jnp.asarray(x)}
  labels = {f"task{i}": jnp.asarray(y[:, i]) for i in range(n_heads)}

  def losses(trunk):
    p = {"trunk": trunk, "heads": params["heads"]}
    _, per_head = head.losses_fn(apply_fn(p, features), labels, features)
    return jnp.stack([per_head[f"task{i}"] for i in range(n_heads)])

  jac = jax.jit(jax.jacrev(losses))(params["trunk"])
  return aggregation.gramian(jac)


def solve_ms(method: str, gramian: jax.Array, repeats: int) -> float:
  agg = aggregator(method)
  state = agg.init(gramian.shape[0])
  weights = jax.jit(lambda g, s: agg.weights(g, s)[0])
  jax.block_until_ready(weights(gramian, state))
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(weights(gramian, state))
    times.append(1e3 * (time.perf_counter() - start))
  return run.median(times)


# ----------------------------------------------------------------------------
# The same problem in torch, in a subprocess.

TORCH_WORKER = r'''
import json, sys, time, warnings
import numpy as np, torch
from torchjd.aggregation import MGDA, NashMTL, UPGrad
from torchjd.autojac import jac_to_grad, mtl_backward
warnings.filterwarnings("ignore")
torch.set_num_threads(int(sys.argv[1]))
steppers = {}

class Stepper:
  def __init__(self, data, method):
    p = {k: torch.tensor(v) for k, v in data.items()}
    t = p["y"].shape[1]
    self.x, self.y = p["x"], p["y"]
    self.w1, self.b1 = [torch.nn.Parameter(p[k]) for k in ("w1", "b1")]
    self.w2, self.b2 = [torch.nn.Parameter(p[k]) for k in ("w2", "b2")]
    # One [T, 256] matrix as in JAX; each head's logit its own graph node,
    # as mtl_backward needs.
    self.w, self.b = torch.nn.Parameter(p["w"].T.contiguous()), torch.nn.Parameter(p["b"])
    self.shared = [self.w1, self.b1, self.w2, self.b2]
    self.opt = torch.optim.Adam(self.shared + [self.w, self.b], lr=float(p["lr"]))
    self.method, self.t = method, t
    self.agg = {"upgrad": UPGrad, "mgda": MGDA, "nash_mtl": lambda: NashMTL(n_tasks=t),
                "plain": lambda: None}[method]()
    self.bce = torch.nn.BCEWithLogitsLoss()

  def step(self):
    self.opt.zero_grad()
    h = torch.relu(self.x @ self.w1 + self.b1)
    z = torch.relu(h @ self.w2 + self.b2)
    losses = [self.bce(z @ self.w[i] + self.b[i], self.y[:, i]) for i in range(self.t)]
    if self.agg is None:
      sum(losses).backward()
    else:
      mtl_backward(losses, features=z)
      jac_to_grad(self.shared, self.agg)
    self.opt.step()
    return float(sum(l.detach() for l in losses))

for line in sys.stdin:
  cmd = json.loads(line)
  if cmd["cmd"] == "setup":
    data = dict(np.load(cmd["npz"]))
    steppers[cmd["key"]] = Stepper(data, cmd["method"])
    loss = steppers[cmd["key"]].step()
    print(json.dumps({"loss": loss}), flush=True)
  elif cmd["cmd"] == "run":
    s = steppers[cmd["key"]]
    wall, cpu = [], []
    for _ in range(cmd["steps"]):
      start, start_cpu = time.perf_counter(), time.process_time()
      s.step()
      wall.append(1e3 * (time.perf_counter() - start))
      cpu.append(1e3 * (time.process_time() - start_cpu))
    print(json.dumps({"ms": float(np.median(wall)), "cpu_ms": float(np.median(cpu))}), flush=True)
  elif cmd["cmd"] == "versions":
    from importlib.metadata import version
    print(json.dumps({"torch": torch.__version__, "torchjd": version("torchjd")}), flush=True)
'''


class TorchWorker:
  """A torch process that keeps one stepper per (method, T)."""

  def __init__(self, python: str, threads: int, workdir: str):
    script = os.path.join(workdir, "torch_worker.py")
    with open(script, "w") as f:
      f.write(TORCH_WORKER)
    # Passive OpenMP waits: torch's default spin-waiting threads keep
    # spinning after each step, which on a shared machine made torch itself
    # up to 20x slower (median of its T = 2 plain step: 171 ms spinning,
    # 7.6 ms passive) and took the cores from the JAX contender timed next.
    env = {**os.environ, "OMP_WAIT_POLICY": os.environ.get("OMP_WAIT_POLICY", "PASSIVE")}
    self.proc = subprocess.Popen(
        [python, script, str(threads)],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env,
    )
    self.workdir = workdir

  def ask(self, **cmd) -> dict[str, Any]:
    self.proc.stdin.write(json.dumps(cmd) + "\n")
    self.proc.stdin.flush()
    line = self.proc.stdout.readline()
    if not line:
      raise RuntimeError("the torch worker died; see its stderr above")
    return json.loads(line)

  def setup(self, method: str, n_heads: int) -> str:
    key = f"{method}/T{n_heads}"
    params = init_params(n_heads)
    x, y = make_data(n_heads)
    path = os.path.join(self.workdir, f"T{n_heads}.npz")
    np.savez(
        path, x=x, y=y, lr=np.float32(LEARNING_RATE),
        **params["trunk"], w=params["heads"]["w"], b=params["heads"]["b"],
    )
    self.ask(cmd="setup", key=key, method=method, npz=path)
    return key

  def block(self, key: str, steps: int):
    def timed():
      answer = self.ask(cmd="run", key=key, steps=steps)
      return answer["ms"], answer["cpu_ms"]

    return timed

  def close(self) -> None:
    self.proc.stdin.close()
    self.proc.wait(timeout=60)


def find_torchjd_python(requested: str | None) -> str | None:
  python = requested or os.environ.get("JHEADS_TORCHJD_PYTHON") or DEFAULT_TORCHJD_PYTHON
  if not os.path.exists(python):
    return None
  check = subprocess.run(
      [python, "-c", "import torch, torchjd"], capture_output=True, text=True
  )
  return python if check.returncode == 0 else None


# ----------------------------------------------------------------------------
# The run.


def load() -> str:
  with open("/proc/loadavg") as f:
    return " ".join(f.read().split()[:3])


def main(argv: list[str] | None = None) -> dict[str, Any]:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--quick", action="store_true", help="fewer rounds")
  parser.add_argument("--torchjd-python", metavar="PYTHON", help="a Python with torchjd 0.18")
  parser.add_argument("--json", metavar="PATH", help="write the figures to PATH")
  parser.add_argument("--heads", type=int, nargs="+", default=list(HEAD_COUNTS))
  args = parser.parse_args(argv)
  settings = QUICK if args.quick else FULL
  python = find_torchjd_python(args.torchjd_python)
  report: dict[str, Any] = {
      "command": " ".join(
          ["python -m benchmarks.mtl"] + (argv if argv is not None else sys.argv[1:])
      ),
      "machine": run.machine(),
      "settings": dataclasses.asdict(settings),
      "load_average_start": load(),
      "problem": {"trunk": TRUNK, "batch": BATCH, "heads": "linear binary", "optimizer": "adam"},
  }
  print(json.dumps(report["machine"]), "load", report["load_average_start"])
  start = time.perf_counter()
  with tempfile.TemporaryDirectory() as workdir:
    worker = None
    if python is None:
      print("torchjd: no Python with torch and torchjd found; timing jheads alone")
    else:
      worker = TorchWorker(python, threads=os.cpu_count() or 1, workdir=workdir)
      report["torch"] = worker.ask(cmd="versions")
    report["results"] = {}
    for n_heads in args.heads:
      report["results"][f"T{n_heads}"] = one_head_count(n_heads, settings, worker)
    if worker is not None:
      worker.close()
  report["first_step_s_T40"] = {
      contender: run.median(
          [first_step_seconds(contender, 40) for _ in range(settings.first_step_repeats)]
      )
      for contender in ("plain", *METHODS)
  }
  print_first_steps(report["first_step_s_T40"])
  report["load_average_end"] = load()
  report["seconds"] = time.perf_counter() - start
  print(
      f"\ntook {report['seconds']:.0f} s; load average {report['load_average_start']}"
      f" at the start, {report['load_average_end']} at the end"
  )
  if args.json:
    with open(args.json, "w") as f:
      json.dump(report, f, indent=1)
  return report


def one_head_count(n_heads: int, settings: Settings, worker: TorchWorker | None) -> dict[str, Any]:
  contenders = ["plain", *METHODS, "upgrad:vmap", "upgrad:rep", "mgda:rep"]
  blocks, losses = {}, {}
  for contender in contenders:
    stepper = JaxStepper(contender, n_heads)
    stepper.run(2)  # compile outside the timed rounds
    losses[contender] = float(stepper.out.loss)
    blocks[f"jheads {contender}"] = lambda s=stepper: s.run(settings.steps)
  if worker is not None:
    for method in TORCH_METHODS:
      key = worker.setup(method, n_heads)
      worker.ask(cmd="run", key=key, steps=2)  # warm up
      blocks[f"torchjd {method}"] = worker.block(key, settings.steps)
  load_before = load()
  both = run.interleave(blocks, settings.rounds)
  times = {name: [w for w, _ in t] for name, t in both.items()}
  cpu = {name: [c for _, c in t] for name, t in both.items()}
  gramian = gramian_of(n_heads)
  solves = {m: solve_ms(m, gramian, settings.solve_repeats) for m in METHODS}
  result = {
      "load_average": [load_before, load()],
      "ms_per_step": {name: run.median(t) for name, t in times.items()},
      "ms_per_step_min": {name: min(t) for name, t in times.items()},
      "cpu_ms_per_step": {name: run.median(t) for name, t in cpu.items()},
      "first_loss": losses,
      "vs_plain": {
          c: run.paired_ratio(times[f"jheads {c}"], times["jheads plain"]) for c in contenders
      },
      "solve_ms": solves,
  }
  if worker is not None:
    result["speedup_over_torchjd"] = {
        m: run.paired_ratio(times[f"torchjd {m}"], times[f"jheads {m}"]) for m in TORCH_METHODS
    }
    result["cpu_speedup_over_torchjd"] = {
        m: run.paired_ratio(cpu[f"torchjd {m}"], cpu[f"jheads {m}"]) for m in TORCH_METHODS
    }
    result["torchjd_vs_plain"] = {
        m: run.paired_ratio(times[f"torchjd {m}"], times["torchjd plain"]) for m in TORCH_METHODS
    }
  result["rep_speedup"] = {
      m: run.paired_ratio(times[f"jheads {m}"], times[f"jheads {m}:rep"])
      for m in ("upgrad", "mgda")
  }
  result["layers_speedup_over_vmap"] = run.paired_ratio(
      times["jheads upgrad:vmap"], times["jheads upgrad"]
  )
  rows = []
  for name in blocks:
    side, contender = name.split(" ", 1)
    method = contender.split(":")[0]
    against_torch = worker is not None and side == "jheads" and ":" not in contender
    rows.append([
        name,
        f"{result['ms_per_step'][name]:.2f}",
        f"{result['ms_per_step_min'][name]:.2f}",
        f"{result['cpu_ms_per_step'][name]:.2f}",
        f"{run.paired_ratio(times[name], times[f'{side} plain']):.2f}x",
        f"{result['speedup_over_torchjd'][method]:.2f}x" if against_torch else "",
        f"{result['cpu_speedup_over_torchjd'][method]:.2f}x" if against_torch else "",
        f"{solves[method]:.3f}" if side == "jheads" and contender in solves else "",
    ])
  run.print_table(
      f"T = {n_heads} heads ({settings.rounds} rounds of {settings.steps} steps;"
      f" load {load_before})",
      ["contender", "ms/step", "min", "CPU ms/step", "vs own plain", "speed-up over torchjd",
       "CPU-time ratio", "solve ms"],
      rows,
  )
  print(
      f"representation-level speed-up: {result['rep_speedup']};"
      f" layer-wise Jacobian over vmap (UPGrad): {result['layers_speedup_over_vmap']:.2f}x"
  )
  return result


def print_first_steps(first: dict[str, float]) -> None:
  run.print_table(
      "first step at T = 40 (trace, compile, run)",
      ["contender", "seconds"],
      [[c, f"{s:.2f}"] for c, s in first.items()],
  )


if __name__ == "__main__":
  main()
