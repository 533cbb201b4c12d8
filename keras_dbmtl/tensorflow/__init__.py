"""Any keras-dbmtl balancer in a plain `tf.GradientTape` loop (no Keras model, no Keras layer): the TensorFlow
equivalent of `keras_dbmtl.torch`.

```python
import os; os.environ["KERAS_BACKEND"] = "tensorflow"     # the default backend
import tensorflow as tf, keras, keras_dbmtl

balancer = keras_dbmtl.tensorflow.Balancer("dbmtl", beta=0.9)
optimizer = keras.optimizers.SGD(1e-2)                     # or any optimizer with apply_gradients(pairs)
for x, y in batches:
    with tf.GradientTape(persistent=True) as tape:
        z = trunk(x)
        losses = {task: loss_fn(y[task], heads[task](z)) for task in heads}
    pairs = balancer.gradients(tape, losses, trunk.trainable_variables)
    if balancer.applied:                                   # False on an unusable step: skip the optimizer too
        optimizer.apply_gradients(pairs)
```

`Balancer.gradients` re-enters the tape to stack the losses and apply the method's loss transform
($\\tilde\\ell_t$ = `task_losses(raw).transformed`, float32), takes the task Jacobian of $\\tilde\\ell$ on the shared
variables (`tape.jacobian`, vectorised with `pfor`, or one `tape.gradient` per task), calls
`keras_dbmtl.balancing.balance` (or `combine` for a loss-level method: one `tape.gradient`), and returns
`(gradient, variable)` pairs: the balanced direction for each shared variable, $\\sum_t h_t\\,\\partial\\tilde\\ell_t /
\\partial\\psi$ for every other variable (its own task's gradient times the method's head weight $h_t$), and the
gradient of $\\sum_t \\tilde\\ell_t$ (loss level: of the combined loss) for the balancer's learned variables (UW,
IMTL, IMTL-L, GradNorm: `balancer.trainable_variables`, which the same optimizer then updates).

The tape must be persistent at gradient level (several pulls). Works eagerly and inside `tf.function` (the
balancer's state lives in its Keras variables).

An unusable step, as `fit` skips it: a raw loss that is not finite (or not positive under the log transform) or a
gradient that is not finite. `gradients` then returns the same pairs with every gradient zero, leaves the
balancer's state as it was before the call (a select, eagerly and inside `tf.function` alike) and sets
`Balancer.applied` (a bool tensor) to False; eagerly it also warns (RuntimeWarning) naming the tasks at fault.
Skip the optimizer on it (`if balancer.applied: optimizer.apply_gradients(pairs)`, a `tf.cond` under AutoGraph):
a zero gradient still moves momentum and Adam's moments and counts an iteration.

A task without labels in the batch (its raw loss exactly 0 and its rows of the shared Jacobian exactly 0: no
labelled sample, or a sample weight of 0 over the batch) takes no part in a gradient-level step, as in `fit`:
`keras_dbmtl.balancing.balance` gets the `labelled` mask (DB-MTL keeps that task's EMA and leaves it out of
$\\alpha_k$ and the sum), and the step is usable although its loss is 0 under the log transform.

Not supported: `tf.distribute` strategies (use `MultiTaskModel.fit` with `MirroredStrategy` there) and a
representation-level `features=` argument (the torch door has it).
"""

import collections
import collections.abc
import warnings

from keras_dbmtl import balancing

__all__ = ["Balancer"]


def _require_tensorflow_backend():
    import keras

    if keras.backend.backend() != "tensorflow":
        raise RuntimeError(
            f"keras_dbmtl.tensorflow needs the tensorflow Keras backend, but Keras runs on "
            f"{keras.backend.backend()!r}: set KERAS_BACKEND=tensorflow in the environment before keras (or "
            "keras_dbmtl) is first imported.")


class Balancer:
    """A keras-dbmtl balancer for a `tf.GradientTape` loop: `gradients(tape, losses, shared_variables)` returns
    `(gradient, variable)` pairs for `optimizer.apply_gradients`.

    Args:
        balancer: a registered name ("dbmtl", "mgda", "upgrad", "ew", ...) or a `keras_dbmtl.balancers.Balancer`.
        vectorize: True: the Jacobian with `tape.jacobian` (`pfor`, one vectorised pull); False (default): one
            `tape.gradient` per task.
        **hyperparameters: the balancer's hyperparameters when `balancer` is a name.

    The balancer's state is sized at the first call (task names and shared variables' shapes fixed from then on).
    Create it outside `tf.function` (it holds one `tf.Variable`, `applied`).
    """

    def __init__(self, balancer="dbmtl", vectorize=False, **hyperparameters):
        _require_tensorflow_backend()
        self.balancer = balancing.resolve(balancer, **hyperparameters)
        self.vectorize = bool(vectorize)
        self.task_names = None
        self._keyed = None
        self._shapes = None
        #: The last step's (T,) task weights and head weights (None: all ones); zeros after an unusable step.
        self.last_task_weights = None
        self.last_head_weights = None
        import tensorflow as tf

        self._applied = tf.Variable(True, trainable=False, name="applied")

    @property
    def applied(self):
        """Whether the last `gradients` call's step was usable and applied to the balancer's state: a bool scalar
        tensor (a `tf.Variable` read, so eagerly and inside `tf.function` alike). False: the gradients that call
        returned are zeros and the balancer's state is as before it; skip the optimizer."""
        return self._applied.read_value()

    @property
    def trainable_variables(self):
        """The balancer's learned variables (empty for most methods; UW, IMTL, IMTL-L, GradNorm), created at the
        first call; `gradients` returns pairs for them."""
        return list(self.balancer.trainable_variables) if self.balancer.built else []

    def _losses(self, losses):
        import tensorflow as tf

        names, values, keyed = balancing.named_losses(losses, "gradients")
        for name, value in zip(names, values):
            if not tf.is_tensor(value):
                raise TypeError(f"The loss of task {name!r} is a {type(value).__name__}, not a tensor computed "
                                "inside the tape.")
            if value.shape.rank != 0:
                raise ValueError(f"The loss of task {name!r} has shape {tuple(value.shape)}, not a scalar: reduce "
                                 "it to one value per task (e.g. tf.reduce_mean).")
        balancing.check_same_tasks(names, keyed, self.task_names, self._keyed, "gradients")
        if self._keyed is None:
            self._keyed = keyed
        return names, values

    def gradients(self, tape, losses, shared_variables, task_variables=None):
        """The balanced step as `(gradient, variable)` pairs, ready for `optimizer.apply_gradients`.

        Args:
            tape: the `tf.GradientTape` (persistent at gradient level) that recorded the forward pass.
            losses: a dict {task: scalar} (names fixed at the first call) or a list of scalars, computed inside
                the tape.
            shared_variables: the variables every task shares (e.g. `trunk.trainable_variables`).
            task_variables: the other variables to update (a flat list, or one list per task); default: every
                trainable variable the tape watched that is not shared (`tape.watched_variables()`).

        Returns:
            A list of `(gradient, variable)` pairs: shared variables first, then the task variables the losses
            reach, then the balancer's learned variables. On an unusable step (a loss not finite, or not positive
            under the log transform, a task without labels excepted; or a gradient not finite) the same pairs with
            zero gradients, the balancer's state unchanged and `applied` False (eagerly with a RuntimeWarning).
        """
        import tensorflow as tf

        names, values = self._losses(losses)
        shared = list(shared_variables)
        if not shared:
            raise ValueError("No shared variables: pass the variables every task shares (e.g. "
                             "trunk.trainable_variables). If the tasks share nothing there is nothing to balance.")
        shared_ids = {id(v) for v in shared}
        if task_variables is None:
            own = [v for v in tape.watched_variables() if id(v) not in shared_ids and v.trainable]
        else:
            flat = []
            for item in task_variables:
                flat.extend(item if isinstance(item, (list, tuple)) else [item])
            own = [v for v in flat if id(v) not in shared_ids]
        if not self.balancer.built:
            balancing.build(self.balancer, names, [tuple(v.shape) for v in shared])
            self.task_names, self._shapes = names, [tuple(v.shape) for v in shared]
        elif self._shapes is not None and self.balancer.uses_task_gradients and \
                [tuple(v.shape) for v in shared] != self._shapes:
            raise ValueError(f"The shared variables' shapes changed from {self._shapes}: pass the same "
                             "shared_variables at every call.")
        self.task_names = names
        learned_ids = {id(v) for v in self.balancer.trainable_variables}
        own = [v for v in own if id(v) not in learned_ids]
        learned = list(self.balancer.trainable_variables)
        # The state before the call (a loss-level combine writes it inside the tape): put back on an unusable step.
        previous = [tf.identity(v.value) for v in self.balancer.variables]
        with tape:                                  # re-entered: the transform is recorded with the losses
            raw = tf.stack([tf.cast(v, "float32") for v in values])
            task_losses = self.balancer.task_losses(raw)
            transformed = task_losses.transformed
            # Eagerly, only what runs inside the tape is differentiable: the per-task rows and the sum too.
            rows_of = tf.unstack(transformed) if self.balancer.uses_task_gradients else None
            total = tf.reduce_sum(transformed)
            if not self.balancer.uses_task_gradients:
                combined, weights = balancing.combine(self.balancer, task_losses)
        invalid = tf.convert_to_tensor(self.balancer.invalid_losses(raw))
        if not self.balancer.uses_task_gradients:
            variables = shared + own + learned
            grads = tape.gradient(combined, variables)
            self._check_reached(shared, grads[: len(shared)])
            pairs = [(g, v) for g, v in zip(grads, variables) if g is not None]
            usable = tf.logical_not(tf.reduce_any(invalid))
            return self._finish(pairs, usable, invalid, names, previous, weights, None)
        if not tape._persistent:
            raise ValueError("A gradient-level balancer pulls the tape several times: create it with "
                             "tf.GradientTape(persistent=True).")
        if self.vectorize:
            blocks = tape.jacobian(transformed, shared, experimental_use_pfor=True)
        else:
            rows = [tape.gradient(row, shared) for row in rows_of]
            blocks = []
            for i, v in enumerate(shared):
                column = [row[i] for row in rows]
                blocks.append(None if all(g is None for g in column) else
                              tf.stack([tf.zeros_like(v) if g is None else tf.convert_to_tensor(g)
                                        for g in column]))
        self._check_reached(shared, blocks)
        blocks = [tf.cast(b, "float32") for b in blocks]
        # As `fit`: a task without labels (raw loss exactly 0, its Jacobian rows exactly 0) takes no part, and its
        # loss does not make the step unusable unless no task has labels; NaN or inf kept out of the balancer.
        # One pass over the Jacobian: sum_j |J_tj| is exactly 0 for a zero row, not finite for a NaN or inf in it.
        num_tasks = len(names)
        magnitude = tf.add_n([tf.reduce_sum(tf.abs(tf.reshape(b, (num_tasks, -1))), axis=1) for b in blocks])
        labelled = tf.logical_or(tf.not_equal(raw, 0.0), tf.not_equal(magnitude, 0.0))
        invalid = tf.logical_and(invalid, tf.logical_or(labelled, tf.logical_not(tf.reduce_any(labelled))))
        usable = tf.logical_and(tf.logical_not(tf.reduce_any(invalid)), tf.reduce_all(tf.math.is_finite(magnitude)))
        blocks = [tf.where(usable, b, tf.zeros_like(b)) for b in blocks]
        balanced = balancing.balance(self.balancer, task_losses.where(usable), blocks, labelled=labelled)
        pairs = [(tf.cast(d, v.dtype), v) for d, v in zip(balanced.shared, shared)]
        if own:
            h = tf.ones_like(transformed) if balanced.head_weights is None else tf.cast(balanced.head_weights,
                                                                                          transformed.dtype)
            pairs += [(g, v) for g, v in zip(tape.gradient(transformed, own, output_gradients=h), own)
                      if g is not None]
        if learned:
            pairs += [(g, v) for g, v in zip(tape.gradient(total, learned), learned)
                      if g is not None]
        return self._finish(pairs, usable, invalid, names, previous, balanced.task_weights, balanced.head_weights)

    def _finish(self, pairs, usable, invalid, names, previous, task_weights, head_weights):
        """The step's pairs, or on an unusable step (or one whose gradients are not finite) zero gradients and the
        balancer's state put back; sets `applied` and the last weights, and warns eagerly."""
        import tensorflow as tf

        gradients = [g.values if isinstance(g, tf.IndexedSlices) else g for g, _ in pairs]
        applied = tf.logical_and(usable, _all_finite(gradients))

        def kept(value):
            return tf.where(applied, value, tf.zeros_like(value))

        pairs = [(tf.IndexedSlices(kept(g.values), g.indices, g.dense_shape) if isinstance(g, tf.IndexedSlices)
                  else kept(g), v) for g, v in pairs]
        for variable, old in zip(self.balancer.variables, previous):
            variable.assign(tf.where(applied, variable.value, old))
        self._applied.assign(applied)
        self.last_task_weights = kept(tf.convert_to_tensor(task_weights))
        self.last_head_weights = None if head_weights is None else kept(tf.convert_to_tensor(head_weights))
        if tf.executing_eagerly() and not bool(applied):
            bad = [name for name, flag in zip(names, invalid.numpy()) if flag]
            cause = (f"the losses of tasks {bad} are not finite (or not positive under a log transform)" if bad
                     else "a gradient is not finite")
            warnings.warn(f"Unusable step: {cause}. The gradients returned are zeros and the balancer's state is "
                          "unchanged (balancer.applied is False): skip optimizer.apply_gradients for this step.",
                          RuntimeWarning, stacklevel=3)
        return pairs

    @staticmethod
    def _check_reached(shared, gradients):
        unreached = [i for i, g in enumerate(gradients) if g is None]
        if unreached:
            raise ValueError(f"shared_variables {unreached} ({[shared[i].name for i in unreached]}) are not reached "
                             "by any loss: pass only variables the losses depend on.")


def _all_finite(tensors):
    """Whether every entry of every floating-point tensor is finite (a bool scalar tensor)."""
    import tensorflow as tf

    checks = [tf.reduce_all(tf.math.is_finite(t)) for t in tensors if t.dtype.is_floating]
    return tf.reduce_all(tf.stack(checks)) if checks else tf.constant(True)
