"""One process of a real multi-process training run, launched by test_multiprocess.py.

    python tests/multiprocess_worker.py PROCESS_ID NUM_PROCESSES PORT DEVICES OUT.npz

Each process joins `jax.distributed` on 127.0.0.1:PORT with DEVICES CPU devices
of its own (gloo collectives) and loads only its rows of every global batch.
It trains the problem below over all processes' devices twice, with sharded
`jit` on a global mesh and with `pmap`, runs a streamed eval after each, and
writes the parameters, per-step losses and metric values to OUT.npz, which
the test compares with training on one device.

Importing this module creates no JAX array and starts no backend (which
`jax.distributed.initialize` must precede), so the test builds its
one-device reference from the same definitions (`reference`).

A deadlock of the XLA:CPU client (jaxlib 0.10) shapes the loops. With more
than one local device, its source shows, every computation spanning them is
launched from a pool of max(CPU cores, local devices) threads; a launch
blocks its thread while 32 computations of that device are in flight, and
an all-reduce holds one pool thread per local device until all of them join.
Leave about 33 multi-device computations unread behind an all-reduce and
blocked launches can fill the pool, so that the all-reduce never completes.
Measured on a 2-core machine, 2 processes x 2 devices: 40 chained jitted
steps with an all-reduce each hung in 5 runs of 5 (20 and 31 steps did
not); jheads train steps, 100 without reading the loss, in 4 of 5, and none
of 3 reading it every step; the README's eval loop over 40 batches in 4 of 6
with `merge` jitted and 1 of 5 as it is; fetching each batch's statistics,
none of 5. (In one process, 2 or 8 devices, 300 unread steps abort after
XLA's 40 s rendezvous timeout.) So this worker reads every train step's loss,
and its evals keep at most a few computations in flight.
"""

from __future__ import annotations

import faulthandler
import functools
import os
import resource
import signal
import sys
import time
import traceback

import numpy as np

N_FEATURES = 6
HIDDEN = 16
GLOBAL_BATCH = 32  # 8 examples per device on 2 processes x 2 devices.
N_TRAIN_STEPS = 5
N_EVAL_BATCHES = 4
HEAD_WEIGHTS = (1.0, 0.5, 2.0)
LEARNING_RATE = 1e-2

# A lost peer fails the others within these; WATCHDOG_S dumps every thread's
# stack and exits if the process is still running (jax.distributed catches
# SIGTERM, so only SIGKILL or this stops a process stuck in a collective).
# The test's own timeout is longer.
INITIALIZATION_TIMEOUT_S = 30
HEARTBEAT_TIMEOUT_S = 10
SHUTDOWN_TIMEOUT_S = 10
WATCHDOG_S = 110


def make_head():
  import jheads

  # The mean reduction over a weight column is where a per-shard denominator
  # would differ from the global one.
  return jheads.multi_head(
      [
          jheads.binary_classification_head(
              name="click", weight_column="click_weight", loss_reduction="mean"
          ),
          jheads.multi_class_head(3, name="topic"),
          jheads.regression_head(name="dwell"),
      ],
      head_weights=HEAD_WEIGHTS,
  )


def make_batch(rng: np.random.Generator, n: int = GLOBAL_BATCH):
  x = rng.normal(size=(n, N_FEATURES)).astype(np.float32)
  click_weight = rng.uniform(0.0, 2.0, size=n).astype(np.float32)
  click_weight[rng.random(n) < 0.2] = 0.0
  features = {"x": x, "click_weight": click_weight}
  labels = {
      "click": (x[:, 0] + 0.5 * rng.normal(size=n) > 0).astype(np.float32),
      "topic": np.argmax(x[:, 1:4] + 0.3 * rng.normal(size=(n, 3)), axis=1).astype(np.int32),
      "dwell": (x[:, 4] - 0.5 * x[:, 5]).astype(np.float32),
  }
  return features, labels


def make_data():
  """The global batches, the same in every process: (train, eval)."""
  rng = np.random.default_rng(0)
  train = [make_batch(rng) for _ in range(N_TRAIN_STEPS)]
  evaluation = [make_batch(rng) for _ in range(N_EVAL_BATCHES)]
  return train, evaluation


def init_params(logits_dim: int) -> dict[str, np.ndarray]:
  """Fixed-seed parameters as numpy, the same in every process."""
  rng = np.random.default_rng(1)
  return {
      "w1": (rng.normal(size=(N_FEATURES, HIDDEN)) / np.sqrt(N_FEATURES)).astype(np.float32),
      "b1": np.zeros(HIDDEN, np.float32),
      "w2": (rng.normal(size=(HIDDEN, logits_dim)) / 4.0).astype(np.float32),
      "b2": np.zeros(logits_dim, np.float32),
  }


def apply_fn(params, features):
  import jax

  hidden = jax.nn.relu(features["x"] @ params["w1"] + params["b1"])
  return hidden @ params["w2"] + params["b2"]


def make_optimizer():
  import optax

  return optax.adam(LEARNING_RATE)


def host_eval(eval_step, params, batches, put):
  """The streamed eval, statistics merged on the host as each batch comes.

  `jax.device_get` of each batch's statistics (replicated, so readable in
  every process) waits for that batch, which keeps one eval step in flight,
  and merges numpy arrays: no device computation at all.

  Args:
    eval_step: `(params, features, labels) -> stats`.
    params: the parameters, as `eval_step` takes them.
    batches: global `(features, labels)` numpy batches.
    put: a global batch -> this process's part of it, as `eval_step` takes it.
  """
  import jax

  import jheads

  stats = (jax.device_get(eval_step(params, *put(batch))) for batch in batches)
  return functools.reduce(jheads.metrics.merge, stats)


@functools.cache
def _compute():
  import jax

  import jheads

  return jax.jit(jheads.metrics.compute)


def metric_values(stats) -> dict[str, np.ndarray]:
  import jax

  return {key: np.asarray(value) for key, value in jax.device_get(_compute()(stats)).items()}


def reference():
  """Training and eval on one device (this process's first): `(params, losses, metrics)`."""
  import jax

  from jheads import training

  head = make_head()
  optimizer = make_optimizer()
  train, evaluation = make_data()
  device = jax.devices()[0]
  with jax.default_device(device):
    params = jax.device_put(init_params(head.logits_dim), device)
    opt_state = optimizer.init(params)
    train_step = jax.jit(training.make_train_step(head, apply_fn, optimizer))
    losses = []
    for features, labels in train:
      params, opt_state, out = train_step(params, opt_state, features, labels)
      losses.append(float(out.loss))
    eval_step = jax.jit(training.make_eval_step(head, apply_fn))
    stats = host_eval(eval_step, params, evaluation, lambda batch: batch)
    return jax.device_get(params), np.asarray(losses), metric_values(stats)


def _flat(prefix: str, tree: dict) -> dict[str, np.ndarray]:
  return {f"{prefix}/{key}": np.asarray(value) for key, value in tree.items()}


def main(argv: list[str]) -> None:
  started = time.monotonic()
  faulthandler.dump_traceback_later(WATCHDOG_S, exit=True)
  process_id, num_processes, port, devices = (int(arg) for arg in argv[1:5])
  out_path = argv[5]

  def log(message: str) -> None:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    print(
        f"[process {process_id}: {time.monotonic() - started:.1f} s,"
        f" cpu {usage.ru_utime + usage.ru_stime:.1f} s] {message}",
        file=sys.stderr,
        flush=True,
    )

  import jax

  jax.config.update("jax_platforms", "cpu")
  jax.config.update("jax_num_cpu_devices", devices)
  address = f"127.0.0.1:{port}"
  jax.distributed.initialize(
      coordinator_address=address,
      num_processes=num_processes,
      process_id=process_id,
      coordinator_bind_address=address,
      initialization_timeout=INITIALIZATION_TIMEOUT_S,
      heartbeat_timeout_seconds=HEARTBEAT_TIMEOUT_S,
      shutdown_timeout_seconds=SHUTDOWN_TIMEOUT_S,
  )

  from jax.sharding import AxisType, NamedSharding
  from jax.sharding import PartitionSpec as P

  import jheads
  from jheads import training

  collectives = jax.config.jax_cpu_collectives_implementation
  if (jax.process_count(), jax.local_device_count(), collectives) != (num_processes, devices, "gloo"):
    raise RuntimeError(
        f"expected {num_processes} processes of {devices} devices with gloo collectives,"
        f" got {jax.process_count()} of {jax.local_device_count()} with {collectives}"
    )
  log(f"joined: {jax.devices()}")

  head = make_head()
  optimizer = make_optimizer()
  train, evaluation = make_data()
  rows = GLOBAL_BATCH // num_processes
  local = lambda tree: jax.tree.map(lambda x: x[process_id * rows:(process_id + 1) * rows], tree)
  results = {}

  # Sharded jit over a global mesh of every process's devices.
  mesh = jax.make_mesh((jax.device_count(),), ("batch",), axis_types=(AxisType.Explicit,))
  replicated = NamedSharding(mesh, P())
  batch_sharded = NamedSharding(mesh, P("batch"))

  def put_global(batch):
    return jax.tree.map(
        lambda x: jax.make_array_from_process_local_data(batch_sharded, x), local(batch)
    )

  with jax.set_mesh(mesh):
    params = jax.tree.map(
        lambda x: jax.make_array_from_process_local_data(replicated, x),
        init_params(head.logits_dim),
    )
    opt_state = jax.jit(optimizer.init, out_shardings=replicated)(params)
    train_step = jax.jit(training.make_train_step(head, apply_fn, optimizer))
    losses = []
    for batch in train:
      params, opt_state, out = train_step(params, opt_state, *put_global(batch))
      losses.append(float(out.loss))  # Reading it also paces the loop.
    log("sharded jit: trained")
    eval_step = jax.jit(training.make_eval_step(head, apply_fn))
    host_stats = host_eval(eval_step, params, evaluation, put_global)

    # The README's loop, its merge one compiled call: with 4 batches, 7
    # computations in flight, far from the ~33 that can deadlock. The
    # statistics stay global (replicated) arrays; `compute` takes them
    # eagerly, once they are ready, so that its many small computations never
    # queue behind an all-reduce.
    device_stats = jax.block_until_ready(functools.reduce(
        jax.jit(jheads.metrics.merge),
        [eval_step(params, *put_global(batch)) for batch in evaluation],
    ))
    if not all(leaf.is_fully_replicated for leaf in jax.tree.leaves(device_stats)):
      raise RuntimeError("sharded jit: the eval statistics are not replicated")
    results.update(_flat("jit/device_metrics", jax.device_get(jheads.metrics.compute(device_stats))))
    log("sharded jit: evaluated")
  results.update(_flat("jit/params", jax.device_get(params)))
  results["jit/losses"] = np.asarray(losses)
  results.update(_flat("jit/metrics", metric_values(host_stats)))

  # pmap over the local devices; its psums span every process's devices.
  put_local = lambda batch: jax.tree.map(
      lambda x: x.reshape((devices, -1) + x.shape[1:]), local(batch)
  )
  params = init_params(head.logits_dim)
  opt_state = optimizer.init(params)
  train_step = jax.pmap(
      training.make_train_step(head, apply_fn, optimizer, axis_name="batch"),
      axis_name="batch", in_axes=(None, None, 0, 0), out_axes=(None, None, None),
  )
  losses = []
  for batch in train:
    params, opt_state, out = train_step(params, opt_state, *put_local(batch))
    losses.append(float(out.loss))
  log("pmap: trained")
  eval_step = jax.pmap(
      training.make_eval_step(head, apply_fn, axis_name="batch"),
      axis_name="batch", in_axes=(None, 0, 0), out_axes=None,
  )
  results.update(_flat("pmap/params", jax.device_get(params)))
  results["pmap/losses"] = np.asarray(losses)
  results.update(_flat("pmap/metrics", metric_values(host_eval(eval_step, params, evaluation, put_local))))
  log("pmap: evaluated")

  np.savez(out_path, **results)
  jax.distributed.shutdown()
  log(f"wrote {len(results)} arrays to {out_path}")


if __name__ == "__main__":
  # The test sends SIGUSR1 before it kills a worker that ran out of time.
  faulthandler.register(signal.SIGUSR1, all_threads=True)
  try:
    main(sys.argv)
  except BaseException:
    traceback.print_exc()
    sys.stderr.flush()
    # Skip jax.distributed's exit-time shutdown barrier, which would wait for
    # the peers: the test sees the failure now and stops them.
    os._exit(1)
