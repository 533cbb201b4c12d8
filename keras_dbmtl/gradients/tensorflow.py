"""The TensorFlow primitives of the backend contract (keras_dbmtl/gradients/__init__.py): a persistent
`tf.GradientTape`.

Under `tf.distribute` (MirroredStrategy, MultiWorkerMirroredStrategy) the train step runs once per replica on its
share of the global batch. Keras scales each mean-reduced loss by 1/num_replicas (so that the sum over replicas is
the global loss) and the optimizer sums the gradients over the replicas in `apply`. Here:

- `global_losses` gives every replica the global task losses as values (all-reduced), with the gradient of its
  own share `local = num_replicas * keras_loss` (its batch mean, or num_replicas * its sum for sum-reduced losses,
  so that the replica mean of `local` is the global loss for every reduction);
- `replica_mean` all-reduces (mean) the per-replica gradients of those losses: `keras_dbmtl.gradients` hands it
  the Jacobian blocks, head, extra and regularisation gradients together, one collective per step;
- `optimizer_gradients` divides by num_replicas, because the optimizer sums over the replicas in `apply`.

The balancer then runs on identical inputs on every replica and its state stays identical. With one replica (no
strategy) every function is the identity.
"""

import tensorflow as tf

from keras import ops

DEFAULT_VECTORIZE = False
# The looped Jacobian as one sequential tf.map_fn over the T one-hot cotangents: T tape.gradient calls in one graph
# (or one XLA computation) keep the T backward passes' temporaries alive together (benchmarks/RESULTS.md, peak
# memory).
SEQUENTIAL_ROWS = True
# ... except where the graph holds a convolution: under XLA (jit_compile) a convolution in a while-loop body runs
# ~30x slower on the CPU (conv model, 3 tasks: 60x EW's step with the map, 1.8x unrolled; benchmarks/RESULTS.md),
# and without XLA the unrolled rows cost the same; there the rows are unrolled.
_CONVOLUTIONS = frozenset({"Conv2D", "Conv3D", "Conv", "DepthwiseConv2dNative", "Conv2DBackpropInput",
                           "Conv3DBackpropInputV2"})


def _replica_context():
    """The replica context when the step runs on more than one replica, else None."""
    context = tf.distribute.get_replica_context()
    if context is None or context.num_replicas_in_sync == 1:
        return None
    return context


def num_replicas():
    context = tf.distribute.get_replica_context()
    return 1 if context is None else context.num_replicas_in_sync


def replica_rank():
    context = tf.distribute.get_replica_context()
    if context is None:
        return 0
    return int(tf.get_static_value(context.replica_id_in_sync_group) or 0)


def broadcast_from_root(tensors, root=0):
    # MirroredStrategy creates every replica's copy of a variable from the same initial value: nothing to copy.
    return list(tensors)


def replica_mean(values):
    """The mean over the replicas of a tensor or a (nested) list of tensors, in one all-reduce."""
    context = _replica_context()
    if context is None:
        return values
    return context.all_reduce(tf.distribute.ReduceOp.MEAN, values)


def global_losses(task_losses):
    context = _replica_context()
    if context is None:
        return task_losses
    local = task_losses * tf.cast(context.num_replicas_in_sync, task_losses.dtype)
    global_value = context.all_reduce(tf.distribute.ReduceOp.MEAN, tf.stop_gradient(local))
    return local + tf.stop_gradient(global_value - local)


def optimizer_gradients(grads):
    # Copies: inside tf.cond the optimizer's all-reduce needs tensors of the branch's own graph.
    grads = [None if g is None else tf.identity(g) for g in grads]
    context = _replica_context()
    if context is None:
        return grads
    scale = 1.0 / context.num_replicas_in_sync
    return [None if g is None else g * tf.cast(scale, g.dtype) for g in grads]


def pullback(forward, variables, inputs=()):
    """One forward pass under a persistent tape; each pull is a `tape.gradient` with output gradients. Index
    len(variables) + j of a pull is the gradient of inputs[j] (watched)."""
    inputs = [tf.convert_to_tensor(x) for x in inputs]
    with tf.GradientTape(persistent=True) as tape:
        tape.watch(inputs)
        outputs, aux = forward(*inputs)
    outputs = tuple(outputs)
    sources = list(variables) + inputs

    def pull(cotangents, indices, batched=False):
        chosen = [sources[i] for i in indices]
        if not chosen:
            return []
        if batched == "sequential":
            return _sequential_rows(tape, outputs, chosen, cotangents)
        if not batched:
            grads = tape.gradient(outputs, chosen, output_gradients=list(cotangents))
            return [_zeros(v) if g is None else g for g, v in zip(grads, chosen)]
        with tape:             # the rows B of sum_i C_i outputs_i, recorded on the same tape
            rows = tf.add_n([tf.reshape(c, (c.shape[0], -1)) @ tf.reshape(o, (-1, 1)) for c, o in
                             zip(cotangents, outputs)])[:, 0]
        return tape.jacobian(rows, chosen, unconnected_gradients=tf.UnconnectedGradients.ZERO,
                             experimental_use_pfor=True)

    return outputs, aux, pull


def _sequential_rows(tape, outputs, chosen, cotangents):
    """The B rows of `pull(..., batched=True)`, one `tape.gradient` per iteration of a `tf.map_fn` that runs one
    iteration at a time (a while loop in the graph, an XLA while loop under jit_compile): only one backward pass's
    temporaries are alive at once."""
    signature = [tf.TensorSpec(v.shape, v.dtype) for v in chosen]

    def row(row_cotangents):
        grads = tape.gradient(outputs, chosen, output_gradients=list(row_cotangents),
                              unconnected_gradients=tf.UnconnectedGradients.ZERO)
        return [tf.convert_to_tensor(g) for g in grads]    # (IndexedSlices of a gather, dense)

    if _holds_convolution(outputs):
        rows = [row(tuple(c[b] for c in cotangents)) for b in range(int(cotangents[0].shape[0]))]
        return [tf.stack(block) for block in zip(*rows)]
    return list(tf.map_fn(row, tuple(cotangents), fn_output_signature=signature, parallel_iterations=1))


def _holds_convolution(outputs):
    """Whether the graph that computed `outputs` holds a convolution (SEQUENTIAL_ROWS above); False eagerly."""
    graph = getattr(outputs[0], "graph", None) if outputs else None
    if tf.executing_eagerly() or graph is None:
        return False
    return any(op.type in _CONVOLUTIONS for op in graph.get_operations())


def _zeros(source):
    return tf.zeros_like(source) if tf.is_tensor(source) else tf.zeros(source.shape, dtype=source.dtype)


def branches_in_python():
    return False


def skips_by_branch():
    # One replica: tf.cond, copying only what the forward changes. Under tf.distribute the optimizer's
    # cross-replica step cannot run inside tf.cond (`merge_call` in control flow): a select there too.
    return num_replicas() == 1


def run_step(step, args, state_groups):
    return step(args[0])


def init_process_group(backend="gloo", **kwargs):
    raise ValueError(
        "keras_dbmtl.distributed.initialize runs torch.distributed: set KERAS_BACKEND=torch. On TensorFlow use "
        "tf.distribute.MirroredStrategy (see the README)."
    )


def snapshot(variables):
    return [tf.identity(v.value) for v in variables]   # (the train step branches with tf.cond on one replica)


def keep_where(flag, variables, previous):
    for v, old in zip(variables, previous):
        v.assign(ops.where(flag, v.value, old))
