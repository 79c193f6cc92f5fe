"""The training loop every tf.distribute strategy runs: one device, several GPUs, several hosts.

Three layers, each small (the shape of Model Garden's Orbit):
  * the replica step (`_replica_train_step`): forward, per-example binary cross-entropy weighted by
    the sample weights and divided by the GLOBAL batch, loss scaling under float16, gradients. With
    XLA the forward and backward pass is compiled by itself, per replica; the optimizer applies the
    gradients outside it, because the all-reduce that sums them across replicas cannot sit inside
    an XLA cluster under MirroredStrategy (TensorFlow would compile every replica into one function
    and fail on the second device's variables);
  * the host loop (`train_loop`, `eval_loop`): `steps_per_loop` steps per call, a `tf.range` loop
    inside one tf.function that runs the replica step with `strategy.run`;
  * the controller (train.py) owns epochs, validation, early stopping, learning rates, checkpoints
    and files.
Metrics are reduced, not averaged: each replica adds sums (loss, examples, correct answers, true and
false positives, and the histogram of predicted probabilities per class, from which ROC-AUC comes)
into sync-on-read variables, and reading one sums it over every replica of every worker.
Input batches are (images, labels, weights): class weights in training, and 0 for the padding that
makes every replica's last val batch whole.
"""

from __future__ import annotations

import dataclasses

import keras
import numpy as np
import tensorflow as tf

from cxr_tfdata.core import record_schema

# Probability histogram bins for ROC-AUC: the AUC of the binned scores, as Keras' AUC(200) computes it.
AUC_BINS = 200


@dataclasses.dataclass(frozen=True)
class StepSettings:
    """How the per-replica step is built: the global batch it divides by, XLA, loss scaling."""

    global_batch: int
    jit_compile: bool
    steps_per_loop: int = 1


class MetricSums:
    """Sums over every example seen since `reset`, kept per replica and summed when read."""

    _SCALARS = ("loss", "examples", "correct", "true_positives", "false_positives", "false_negatives")

    def __init__(self, name: str):
        def sum_variable(key: str, shape=()):
            return tf.Variable(tf.zeros(shape, tf.float32), trainable=False, name=f"{name}_{key}",
                               synchronization=tf.VariableSynchronization.ON_READ,
                               aggregation=tf.VariableAggregation.SUM)

        self.sums = {key: sum_variable(key) for key in self._SCALARS}
        self.positive_histogram = sum_variable("positive_histogram", [AUC_BINS])
        self.negative_histogram = sum_variable("negative_histogram", [AUC_BINS])

    def variables(self) -> list[tf.Variable]:
        return [*self.sums.values(), self.positive_histogram, self.negative_histogram]

    def update(self, labels: tf.Tensor, probabilities: tf.Tensor, per_example_loss: tf.Tensor,
               weights: tf.Tensor, present: tf.Tensor) -> None:
        """Adds one replica's batch (replica context). `present` is 0 for padding, 1 otherwise."""
        positive = tf.cast(labels > 0.5, tf.float32) * present
        negative = (1.0 - tf.cast(labels > 0.5, tf.float32)) * present
        predicted = tf.cast(probabilities >= record_schema.DEFAULT_THRESHOLD, tf.float32)
        updates = {
            "loss": tf.reduce_sum(per_example_loss * weights),
            "examples": tf.reduce_sum(present),
            "correct": tf.reduce_sum(positive * predicted + negative * (1.0 - predicted)),
            "true_positives": tf.reduce_sum(positive * predicted),
            "false_positives": tf.reduce_sum(negative * predicted),
            "false_negatives": tf.reduce_sum(positive * (1.0 - predicted)),
        }
        for key, value in updates.items():
            self.sums[key].assign_add(value)
        bins = tf.clip_by_value(tf.cast(probabilities * AUC_BINS, tf.int32), 0, AUC_BINS - 1)
        self.positive_histogram.assign_add(tf.math.unsorted_segment_sum(positive, bins, AUC_BINS))
        self.negative_histogram.assign_add(tf.math.unsorted_segment_sum(negative, bins, AUC_BINS))

    def reset(self) -> None:
        for variable in self.variables():
            variable.assign(tf.zeros_like(variable))

    def totals(self, carried: dict | None = None) -> dict:
        """The sums since `reset` (all replicas), plus `carried` (sums an earlier, preempted run of
        the same epoch saved): plain numbers, as the state file keeps them. Collective, like `result`."""
        totals = {key: float(variable.numpy()) for key, variable in self.sums.items()}
        totals["positive_histogram"] = self.positive_histogram.numpy().astype(float).tolist()
        totals["negative_histogram"] = self.negative_histogram.numpy().astype(float).tolist()
        for key, value in (carried or {}).items():
            totals[key] = (np.asarray(totals[key]) + np.asarray(value)).tolist()
        return totals

    def result(self, carried: dict | None = None) -> dict[str, float]:
        """loss, accuracy, precision, recall, auc of everything added since `reset` (all replicas),
        and of the `carried` sums (see `totals`).

        Under several workers this reads collectively: every worker must call it at the same point.
        """
        sums = self.totals(carried)
        examples = max(sums["examples"], 1.0)
        tp, fp, fn = sums["true_positives"], sums["false_positives"], sums["false_negatives"]
        return {
            "loss": sums["loss"] / examples,
            "accuracy": sums["correct"] / examples,
            "precision": tp / (tp + fp) if tp + fp else 0.0,
            "recall": tp / (tp + fn) if tp + fn else 0.0,
            "auc": binned_roc_auc(np.asarray(sums["positive_histogram"]), np.asarray(sums["negative_histogram"])),
        }


def binned_roc_auc(positive: np.ndarray, negative: np.ndarray) -> float:
    """ROC-AUC of scores given as per-bin class counts (trapezoids between bin edges; ties within a
    bin count half, as for tied scores). 0.0 when a class is missing."""
    positive, negative = np.asarray(positive, np.float64), np.asarray(negative, np.float64)
    if positive.sum() <= 0 or negative.sum() <= 0:
        return 0.0
    # Walk the thresholds from high to low: true and false positive rates at each bin edge.
    tpr = np.concatenate([[0.0], np.cumsum(positive[::-1]) / positive.sum()])
    fpr = np.concatenate([[0.0], np.cumsum(negative[::-1]) / negative.sum()])
    return float(np.sum((fpr[1:] - fpr[:-1]) * (tpr[1:] + tpr[:-1]) / 2.0))


def per_example_loss(labels: tf.Tensor, probabilities: tf.Tensor) -> tf.Tensor:
    """Binary cross-entropy of each example, [B], as keras.losses.BinaryCrossentropy computes it."""
    return keras.losses.binary_crossentropy(labels[:, None], probabilities[:, None])


class Loop:
    """The compiled train and eval loops of one stage's model and optimizer under a strategy."""

    def __init__(self, strategy: tf.distribute.Strategy, model: keras.Model, optimizer, settings: StepSettings):
        self.strategy = strategy
        self.model = model
        self.optimizer = optimizer
        self.settings = settings
        self.loss_scaled = isinstance(optimizer, keras.optimizers.LossScaleOptimizer)
        with strategy.scope():
            self.train_metrics = MetricSums("train")
            self.eval_metrics = MetricSums("eval")
        forward_backward = self._forward_backward
        forward = self._forward
        if settings.jit_compile:
            forward_backward = tf.function(forward_backward, jit_compile=True)
            forward = tf.function(forward, jit_compile=True)
        self._compiled_forward_backward, self._compiled_forward = forward_backward, forward
        self._train_loop = tf.function(self._train_loop_body)
        self._eval_loop = tf.function(self._eval_loop_body)

    def describe(self) -> str:
        """One line: what each step computes in, and how."""
        policy = keras.config.dtype_policy().name
        scale = "dynamic loss scaling" if self.loss_scaled else "no loss scaling"
        strategy = {"_DefaultDistributionStrategy": "one device", "CollectiveAllReduceStrategy":
                    "MultiWorkerMirroredStrategy"}.get(type(self.strategy).__name__, type(self.strategy).__name__)
        return (f"dtype policy {policy}, {scale}, XLA {'on' if self.settings.jit_compile else 'off'} "
                f"(per-replica step), {self.strategy.num_replicas_in_sync} replica(s) "
                f"({strategy}), global batch {self.settings.global_batch}, "
                f"{self.settings.steps_per_loop} step(s) per host call")

    # Replica context -------------------------------------------------------------------------

    def _forward_backward(self, images, labels, weights):
        variables = self.model.trainable_variables
        with tf.GradientTape() as tape:
            probabilities = tf.reshape(tf.cast(self.model(images, training=True), tf.float32), [-1])
            losses = per_example_loss(labels, probabilities)
            loss = tf.reduce_sum(losses * weights) / self.settings.global_batch
            if self.model.losses:
                loss += tf.nn.scale_regularization_loss(tf.add_n(self.model.losses))
            scaled = self.optimizer.scale_loss(loss)
        return probabilities, losses, tape.gradient(scaled, variables)

    def _forward(self, images):
        return tf.reshape(tf.cast(self.model(images, training=False), tf.float32), [-1])

    def _replica_train_step(self, images, labels, weights):
        probabilities, losses, gradients = self._compiled_forward_backward(images, labels, weights)
        if self.loss_scaled and self.strategy.num_replicas_in_sync > 1:
            # LossScaleOptimizer checks that the gradients are finite on replica 0's local values
            # only; averaging first lets it see every replica's. Keras then sums the identical
            # averages over the replicas, which gives the same total as summing the originals.
            gradients = tf.distribute.get_replica_context().all_reduce("mean", gradients)
        self.optimizer.apply(gradients, self.model.trainable_variables)
        self.train_metrics.update(labels, probabilities, losses, weights, tf.ones_like(labels))

    def _replica_eval_step(self, images, labels, weights):
        probabilities = self._compiled_forward(images)
        present = tf.cast(weights > 0, tf.float32)
        self.eval_metrics.update(labels, probabilities, per_example_loss(labels, probabilities), present, present)

    # Host calls ------------------------------------------------------------------------------

    def _train_loop_body(self, iterator, num_steps):
        for _ in tf.range(num_steps):
            self.strategy.run(self._replica_train_step, args=next(iterator))

    def _eval_loop_body(self, iterator, num_steps):
        for _ in tf.range(num_steps):
            self.strategy.run(self._replica_eval_step, args=next(iterator))

    def _run(self, host_loop, iterator, num_steps: int, on_progress=None, should_stop=None) -> int:
        """num_steps steps of a compiled host loop, steps_per_loop per call; fewer when should_stop()
        is true after a host call (a signal is seen only between host calls). Returns the steps run."""
        done = 0
        while done < num_steps:
            count = min(self.settings.steps_per_loop, num_steps - done)
            host_loop(iterator, tf.constant(count, tf.int32))
            done += count
            if on_progress is not None:
                on_progress(done)
            if should_stop is not None and should_stop():
                break
        return done

    def train(self, iterator, num_steps: int, on_progress=None) -> dict[str, float]:
        """Runs num_steps training steps, steps_per_loop per host call; returns their metrics.

        on_progress(steps_done) is called after each host call (for progress lines).
        """
        self.train_metrics.reset()
        self._run(self._train_loop, iterator, num_steps, on_progress)
        return self.train_metrics.result()

    def train_steps(self, iterator, num_steps: int, on_progress=None, should_stop=None) -> int:
        """Like `train` without resetting or reading the metrics, and stopping early after a host
        call at which should_stop() is true (every worker calls it at the same points); returns
        the steps run. The controller reads `train_metrics` itself."""
        return self._run(self._train_loop, iterator, num_steps, on_progress, should_stop)

    def evaluate(self, dataset, num_steps: int) -> dict[str, float]:
        """Metrics over a distributed dataset of exactly num_steps batches per replica."""
        self.eval_metrics.reset()
        self._run(self._eval_loop, iter(dataset), num_steps)
        return self.eval_metrics.result()


def make_optimizer(learning_rate: float, loss_scaling: bool):
    """Adam, wrapped for dynamic loss scaling under float16 (bfloat16 and float32 need none)."""
    optimizer = keras.optimizers.Adam(learning_rate=learning_rate)
    return keras.optimizers.LossScaleOptimizer(optimizer) if loss_scaling else optimizer


def set_learning_rate(optimizer, value: float) -> None:
    inner = getattr(optimizer, "inner_optimizer", optimizer)
    inner.learning_rate.assign(value)


def learning_rate(optimizer) -> float:
    inner = getattr(optimizer, "inner_optimizer", optimizer)
    return float(keras.ops.convert_to_numpy(inner.learning_rate))
