"""The TF 2.15 Estimator on the workload of `benchmarks/workload.py`.

Run by `workload.py` in a Python that has `tensorflow` and
`tensorflow_estimator` 2.15, usually another virtual environment than
jheads'. It imports neither jax nor jheads: `workload.py` writes the problem
(sizes, heads, head weights, learning rate), both splits and the shared
initial weights to an `.npz` file, so both sides train the same model from
the same start on the same batches in the same order.

    python benchmarks/workload_estimator.py PROBLEM.npz EPOCHS LOGITS.npy [--evaluate]

Trains `EPOCHS` epochs with `tf.estimator.MultiHead` over BinaryClassHead
(click), BinaryClassHead (conversion, weighted by the `conversion_weight`
feature), RegressionHead (dwell), MultiClassHead (category) and
MultiLabelHead (tags); writes the held-out logits (computed in numpy from
the trained variables) to `LOGITS.npy`; prints one JSON object:
`first_step_s` (from `Estimator.train` to the end of the first step: graph
building, session start and the step), `first_loss` (the first batch's
loss, before any update), `ms_per_step` (wall time from the end of the
tenth step to the end of the last, per step: `session.run` and everything
the training loop does between runs, as an epoch of the other contenders is
timed), `cpu_ms_per_step` (the same in process CPU time, all threads),
`session_run_ms_median` (the median `session.run` alone) and, with
`--evaluate`, `evaluation`: `Estimator.evaluate` on the held-out split.
"""

import json
import os
import statistics
import sys
import tempfile
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

WARMUP_STEPS = 10
LAYERS = ("hidden_0", "hidden_1", "logits")


def make_head(name, kind, dim):
  if kind == "binary":
    weight_column = "conversion_weight" if name == "conversion" else None
    return tf.estimator.BinaryClassHead(name=name, weight_column=weight_column)
  if kind == "regression":
    return tf.estimator.RegressionHead(name=name)
  if kind == "multi_class":
    return tf.estimator.MultiClassHead(int(dim), name=name)
  return tf.estimator.MultiLabelHead(int(dim), name=name)


class StepTimer(tf.estimator.SessionRunHook):
  """Wall time of every training step, of the first since `start`, and the first loss.

  At the end it reads the trained variables and, with `save_to`, writes the
  one checkpoint `Estimator.evaluate` needs: the run saves none while it
  trains, so that no step pays for checkpoints.
  """

  def __init__(self, start, loss_holder, save_to=None):
    self.start = start
    self.loss_holder = loss_holder
    self.save_to = save_to
    self.step_times = []
    self.step_cpu_times = []
    self.first_step_s = None
    self.first_loss = None
    self.trained = None

  def begin(self):
    by_name = {v.op.name: v for v in tf.compat.v1.global_variables()}
    self._variables = [(by_name[f"{layer}/kernel"], by_name[f"{layer}/bias"]) for layer in LAYERS]
    self._saver = tf.compat.v1.train.Saver() if self.save_to else None

  def end(self, session):
    self.trained = session.run(self._variables)
    if self._saver is not None:
      self._saver.save(session, os.path.join(self.save_to, "model.ckpt"))

  def before_run(self, run_context):
    self._begin = time.perf_counter()
    self._begin_cpu = time.process_time()
    if self.first_loss is None:
      return tf.estimator.SessionRunArgs(self.loss_holder["loss"])
    return None

  def after_run(self, run_context, run_values):
    end, end_cpu = time.perf_counter(), time.process_time()
    self.step_cpu_times.append(end_cpu - self._begin_cpu)
    if len(self.step_times) == WARMUP_STEPS:
      self.loop_start = (end, end_cpu)
    self.loop_end = (end, end_cpu)
    if self.first_step_s is None:
      self.first_step_s = end - self.start
      self.first_loss = float(run_values.results)
    self.step_times.append(end - self._begin)


def main(problem_path, epochs, logits_path, evaluate):
  p = np.load(problem_path)
  names = [str(n) for n in p["names"]]
  kinds = [str(k) for k in p["kinds"]]
  dims = [int(d) for d in p["dims"]]
  head_weights = [float(w) for w in p["head_weights"]]
  batch = int(p["batch"])
  learning_rate = float(p["learning_rate"])
  weights = [(p[f"kernel_{i}"], p[f"bias_{i}"]) for i in range(len(LAYERS))]

  def split(prefix):
    features = {
        "x": p[f"{prefix}_x"],
        "conversion_weight": p[f"{prefix}_conversion_weight"].reshape(-1, 1),
    }
    labels = {}
    for name, kind in zip(names, kinds):
      value = p[f"{prefix}_label_{name}"]
      if kind == "multi_class":
        value = value.astype(np.int64).reshape(-1, 1)
      elif kind == "multi_label":
        value = value.astype(np.int64)
      else:
        value = value.reshape(-1, 1)
      labels[name] = value
    return features, labels

  loss_holder = {}

  def model_fn(features, labels, mode):
    hidden = features["x"]
    for layer, (w, b) in zip(LAYERS, weights):
      hidden = tf.compat.v1.layers.dense(
          hidden,
          w.shape[1],
          activation=None if layer == "logits" else tf.nn.relu,
          kernel_initializer=tf.compat.v1.constant_initializer(w),
          bias_initializer=tf.compat.v1.constant_initializer(b),
          name=layer,
      )
    head = tf.estimator.MultiHead(
        [make_head(n, k, d) for n, k, d in zip(names, kinds, dims)], head_weights=head_weights
    )
    optimizer = tf.keras.optimizers.legacy.Adam(learning_rate)
    # As TF's canned estimators do: the step counter that ends training.
    optimizer.iterations = tf.compat.v1.train.get_or_create_global_step()
    spec = head.create_estimator_spec(
        features=features,
        mode=mode,
        logits=hidden,
        labels=labels,
        optimizer=optimizer,
        trainable_variables=tf.compat.v1.trainable_variables(),
    )
    loss_holder["loss"] = spec.loss
    return spec

  def input_fn(prefix, repeat):
    def make():
      features, labels = split(prefix)
      return tf.data.Dataset.from_tensor_slices((features, labels)).batch(batch).repeat(repeat)

    return make

  with tempfile.TemporaryDirectory() as model_dir:
    config = tf.estimator.RunConfig(
        model_dir=model_dir,
        save_summary_steps=None,
        save_checkpoints_steps=None,
        save_checkpoints_secs=None,
        log_step_count_steps=None,
    )
    estimator = tf.estimator.Estimator(model_fn, config=config)
    timer = StepTimer(time.perf_counter(), loss_holder, model_dir if evaluate else None)
    estimator.train(input_fn("train", epochs), hooks=[timer])
    trained = timer.trained
    evaluation = None
    if evaluate:
      evaluation = {
          k: float(v)
          for k, v in estimator.evaluate(input_fn("eval", 1)).items()
          if np.ndim(v) == 0
      }
  loop_steps = len(timer.step_times) - WARMUP_STEPS - 1
  hidden = p["eval_x"].astype(np.float32)
  for i, (w, b) in enumerate(trained):
    hidden = hidden @ w + b
    if i < len(trained) - 1:
      hidden = np.maximum(hidden, 0)
  np.save(logits_path, hidden)
  print(
      json.dumps({
          "first_step_s": timer.first_step_s,
          "first_loss": timer.first_loss,
          "ms_per_step": 1e3 * (timer.loop_end[0] - timer.loop_start[0]) / loop_steps,
          "cpu_ms_per_step": 1e3 * (timer.loop_end[1] - timer.loop_start[1]) / loop_steps,
          "session_run_ms_median": 1e3 * statistics.median(timer.step_times[WARMUP_STEPS:]),
          "steps": len(timer.step_times),
          "evaluation": evaluation,
          "tensorflow": tf.__version__,
      })
  )


if __name__ == "__main__":
  main(sys.argv[1], int(sys.argv[2]), sys.argv[3], "--evaluate" in sys.argv[4:])
