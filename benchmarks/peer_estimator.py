"""The TF 2.15 Estimator peer: `tf.estimator.MultiHead` on the benchmark problem.

Run by `benchmarks/run.py --peers` in a Python that has `tensorflow` and
`tensorflow_estimator` (2.15), usually another virtual environment than
jheads'. It imports neither jax nor jheads: run.py passes the problem
(sizes, head kinds and names, learning rate) and the batch in an `.npz`
file, so both sides train the same model on the same data.

    python benchmarks/peer_estimator.py PROBLEM.npz STEPS

Prints one JSON object: `first_step_s` (from `Estimator.train` to the end of
the first step: graph building, session start and the step itself) and
`ms_per_step` (median of the steps after the first ten), both timed by a
`SessionRunHook` around each `session.run`.
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


def make_head(kind, name, n_classes):
  if kind == "binary":
    return tf.estimator.BinaryClassHead(name=name)
  if kind == "multi_class":
    return tf.estimator.MultiClassHead(n_classes, name=name)
  return tf.estimator.RegressionHead(name=name)


class StepTimer(tf.estimator.SessionRunHook):
  """Wall time of every training step, and of the first since `start`."""

  def __init__(self, start):
    self.start = start
    self.step_times = []
    self.first_step_s = None

  def before_run(self, run_context):
    self._begin = time.perf_counter()

  def after_run(self, run_context, run_values):
    end = time.perf_counter()
    if self.first_step_s is None:
      self.first_step_s = end - self.start
    self.step_times.append(end - self._begin)


def main(problem_path, steps):
  problem = np.load(problem_path)
  kinds = [str(k) for k in problem["kinds"]]
  names = [str(n) for n in problem["names"]]
  trunk = [int(u) for u in problem["trunk"]]
  n_classes = int(problem["n_classes"])
  learning_rate = float(problem["learning_rate"])
  logits_dim = sum(n_classes if k == "multi_class" else 1 for k in kinds)
  features = {"x": problem["x"]}
  labels = {n: problem[f"label_{n}"].reshape(-1, 1) for n in names}

  def model_fn(features, labels, mode):
    hidden = features["x"]
    for units in trunk[1:]:
      hidden = tf.compat.v1.layers.dense(hidden, units, activation=tf.nn.relu)
    logits = tf.compat.v1.layers.dense(hidden, logits_dim)
    head = tf.estimator.MultiHead([make_head(k, n, n_classes) for k, n in zip(kinds, names)])
    optimizer = tf.keras.optimizers.legacy.Adam(learning_rate)
    # As TF's canned estimators do: the step counter that ends training.
    optimizer.iterations = tf.compat.v1.train.get_or_create_global_step()
    return head.create_estimator_spec(
        features=features,
        mode=mode,
        logits=logits,
        labels=labels,
        optimizer=optimizer,
        trainable_variables=tf.compat.v1.trainable_variables(),
    )

  def input_fn():
    # The same batch every step, as the JAX contenders get.
    return tf.data.Dataset.from_tensors((features, labels)).repeat()

  with tempfile.TemporaryDirectory() as model_dir:
    config = tf.estimator.RunConfig(
        model_dir=model_dir,
        save_summary_steps=None,
        save_checkpoints_steps=None,
        save_checkpoints_secs=None,
        log_step_count_steps=None,
    )
    estimator = tf.estimator.Estimator(model_fn, config=config)
    timer = StepTimer(time.perf_counter())
    estimator.train(input_fn, steps=steps, hooks=[timer])
  print(
      json.dumps({
          "first_step_s": timer.first_step_s,
          "ms_per_step": 1e3 * statistics.median(timer.step_times[WARMUP_STEPS:]),
          "steps": len(timer.step_times),
          "tensorflow": tf.__version__,
      })
  )


if __name__ == "__main__":
  main(sys.argv[1], int(sys.argv[2]))
