"""The JAX primitives of the backend contract (keras_dbmtl/gradients/__init__.py): `jax.vjp` inside the (jitted)
stateless train step.

The model's train step runs inside a `keras.StatelessScope` holding the whole training state. Here the forward
pass runs again inside an inner scope in which the differentiated variables map to the `jax.vjp` primals; any
other state the forward pass updates (batch-norm statistics, dropout seeds) is carried out as auxiliary output
and written back into the outer scope. One forward pass; the backward passes reuse its residuals.
"""

import jax
from keras.src.backend.common.stateless_scope import StatelessScope, get_stateless_scope

from keras import ops

DEFAULT_VECTORIZE = False   # looped vjp: faster than jax.vmap on every CPU model measured (benchmarks/RESULTS.md)
# The looped Jacobian as one `jax.lax.map` over the T one-hot cotangents (a while loop): XLA keeps the T backward
# passes of an unrolled Python loop alive together (QM9 paper model: ~4.5 GB of temporaries instead of ~0.6 GB for
# EW); the map holds one pass at a time (benchmarks/RESULTS.md, peak memory).
SEQUENTIAL_ROWS = True
# ... except where the backward pass holds a convolution and runs on the CPU: XLA:CPU runs a convolution inside a
# while-loop body ~30x slower than the same convolution outside one (conv model, 3 tasks: 58x EW's step with the map,
# 1.8x unrolled; benchmarks/RESULTS.md), so there the rows are unrolled and memory is traded for that time.
_CONVOLUTIONS = frozenset({"conv_general_dilated"})


def on_gpu():
    return jax.default_backend() == "gpu"      # vectorised there (benchmarks/RESULTS_gpu.md)


def _functional(forward, variables):
    """forward(*inputs) as a pure function of the variables' values and the inputs; returns
    (outputs, (aux, state_updates))."""
    outer = get_stateless_scope()
    base = dict(outer.state_mapping) if outer is not None else {}
    variable_ids = [id(v) for v in variables]

    def pure(values, inputs):
        scope = StatelessScope(collect_losses=True)
        scope.state_mapping = dict(base)
        scope.state_mapping.update(zip(variable_ids, values))
        with scope:
            outputs, aux = forward(*inputs)
        updates = {
            key: value
            for key, value in scope.state_mapping.items()
            if key not in variable_ids and (key not in base or value is not base[key])
        }
        return outputs, (aux, updates)

    def write_back(updates):
        if outer is not None:
            outer.state_mapping.update(updates)

    def current_values():
        return [base[i] if i in base else v.value for i, v in zip(variable_ids, variables)]

    return pure, write_back, current_values


def pullback(forward, variables, inputs=()):
    """One forward pass as a pure function of the variables and inputs (`jax.vjp`); state it updated is written
    back. Index len(variables) + j of a pull is the gradient of inputs[j]."""
    pure, write_back, current_values = _functional(forward, variables)
    outputs, vjp_fn, (aux, updates) = jax.vjp(pure, current_values(), list(inputs), has_aux=True)
    write_back(updates)

    def all_gradients(cotangents):
        values, input_grads = vjp_fn(tuple(cotangents))
        return list(values) + list(input_grads)

    def pull(cotangents, indices, batched=False):
        indices = list(indices)

        def chosen(rows):
            grads = all_gradients(rows)
            return [grads[i] for i in indices]

        if batched == "sequential" and _convolutions_loop_slowly(chosen, cotangents):
            rows = [chosen(tuple(c[b] for c in cotangents)) for b in range(int(cotangents[0].shape[0]))]
            return [ops.stack(row) for row in zip(*rows)]
        if batched == "sequential":   # one backward pass at a time: only one pass's temporaries are alive
            return list(jax.lax.map(chosen, tuple(cotangents)))
        if batched:
            return jax.vmap(chosen)(tuple(cotangents))
        return chosen(cotangents)

    return tuple(outputs), aux, pull


def _convolutions_loop_slowly(pull_row, cotangents):
    """Whether one backward pass (`pull_row` of one row of the cotangents) holds a convolution and runs on XLA:CPU,
    where a loop body slows convolutions down (SEQUENTIAL_ROWS above). Traces the pass once, at trace time."""
    if jax.default_backend() != "cpu":
        return False
    closed = jax.make_jaxpr(pull_row)(tuple(c[0] for c in cotangents))
    return _holds(closed.jaxpr, _CONVOLUTIONS)


def _holds(jaxpr, primitives):
    """Whether `jaxpr` or any jaxpr nested in its equations (loops, conditionals, calls) uses one of `primitives`."""
    for eqn in jaxpr.eqns:
        if eqn.primitive.name in primitives:
            return True
        for value in eqn.params.values():
            for sub in value if isinstance(value, (tuple, list)) else (value,):
                inner = getattr(sub, "jaxpr", sub)       # ClosedJaxpr -> Jaxpr
                if hasattr(inner, "eqns") and _holds(inner, primitives):
                    return True
    return False


def run_step(step, args, state_groups):
    """The Keras JAX trainer calls `train_step(state, data)` and expects `(logs, new_state)`: run `step` in a
    `StatelessScope` holding the state, and read the new values back."""
    state, data = args
    groups = state_groups()
    mapping = []
    for variables, values in zip(groups, state):
        mapping.extend(zip(variables, values))
    with StatelessScope(state_mapping=mapping) as scope:
        logs = step(data)
    new_state = tuple(
        [scope.get_current_value(v) if scope.get_current_value(v) is not None else value
         for v, value in zip(variables, values)]
        for variables, values in zip(groups, state)
    )
    return logs, new_state


def branches_in_python():
    return False


def skips_by_branch():
    return False      # a select on the step's output state: free under jit


def init_process_group(backend="gloo", **kwargs):
    raise ValueError(
        "keras_dbmtl.distributed.initialize runs torch.distributed: set KERAS_BACKEND=torch. On JAX use "
        "keras.distribution.DataParallel (see the README)."
    )


# ---------------------------------------------------------------- data parallelism
# With `keras.distribution.DataParallel` the jitted train step is written on global arrays: the batch is one
# array sharded over the mesh's batch axis and GSPMD partitions the computation, inserting the all-reduces of the
# batch means itself. The task losses, the Jacobian and the balancer therefore already see the global batch and
# the replicated balancer state is updated once (tests/test_multi_device.py checks it against one device).


def num_replicas():
    return 1


def replica_mean(values):
    return values


def global_losses(task_losses):
    return task_losses


def optimizer_gradients(grads):
    return grads


def replica_rank():
    return 0


def broadcast_from_root(tensors, root=0):
    return list(tensors)   # replicated arrays: one value


def snapshot(variables):
    return [v.value for v in variables]             # immutable values: nothing to copy


def keep_where(flag, variables, previous):
    for v, old in zip(variables, previous):
        v.assign(ops.where(flag, v.value, old))
