"""Door 2: every balancer as a pure JAX transformation, for your own `jax.jit` step and optax.

No Keras model is involved: you write the network and the loss function in JAX; the door runs the library's one
balancing core (`keras_dbmtl.balancing`, the same code `MultiTaskModel.fit` calls) on your task Jacobian, with
the balancer's state passed in and out explicitly, so the step is pure and can be jitted, scanned or vmapped.

```python
import jax, optax, keras_dbmtl

tx = keras_dbmtl.jax.balancer("dbmtl", beta=0.9)
state = tx.init(params["shared"], task_names=["ctr", "cvr"])     # outside jit, once
optimizer = optax.adam(1e-3)
opt_state = optimizer.init(params)

@jax.jit
def step(params, opt_state, state, batch):
    # raw (T,) losses, the Jacobian of the transformed losses on the shared parameters (a leading task axis on
    # every leaf), and each task's own gradients (of its transformed loss, on its own parameters)
    raw, jacobian, own = tx.task_jacobian(loss_fn, state, params["shared"], params["heads"], batch)
    update = tx.update_with_info(jacobian, state, raw)               # or: direction, state = tx.update(...)
    grads = {"shared": update.direction,
             "heads": keras_dbmtl.jax.scale_task_gradients(own, update.head_weights)}
    updates, opt_state = optimizer.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, update.state
```

The contract, for any pytree of shared parameters $\\theta$ and $T$ tasks:

- `state = tx.init(shared_params, task_names=... | num_tasks=...)`: the balancer's state (a `BalancerState`:
  its Keras variables' values, random-seed states included), of a fixed structure. Call it once, outside `jit`.
- `tx.transform_losses(losses, state)`: the method's loss transform $\\tilde\\ell_t$ of the raw losses (DB-MTL:
  $\\log(\\ell_t + \\epsilon)$; identity for most methods); differentiate *these*.
- `direction, state = tx.update(task_gradients, state, losses)`: `task_gradients` has the shared parameters'
  structure with a leading task axis, $J_t = \\nabla_\\theta \\tilde\\ell_t$ (e.g. `jax.jacrev`); `losses` the raw
  $(T,)$ losses; `direction` has the shared parameters' structure and is applied as a gradient.
- `tx.update_with_info(...)` returns the same and more (an `Update`): the task weights, the head weights (each
  task's own gradients are multiplied by `head_weights[t]`: MGDA, GradNorm, Nash-MTL, FairGrad, ExcessMTL, and
  every loss-level method, whose head weight is $\\partial L / \\partial \\tilde\\ell_t$), the gradients of the
  balancer's learned parameters, and whether the step was applied.

An unusable step (a raw loss or a task gradient that is NaN or inf, or a loss the log transform cannot take) is
not applied, as in `fit`: `update` returns a zero direction and the state it was given, with a select (no Python
branch, so it stays jittable), and `Update.applied` is False. Skip the optimizer on it too, since a zero gradient
still moves Adam's moments and momentum, and the heads' own gradients may be NaN there:

```python
updates, new_opt_state = optimizer.update(grads, opt_state, params)
keep = lambda new, old: jax.tree_util.tree_map(lambda n, o: jnp.where(update.applied, n, o), new, old)
params, opt_state = keep(optax.apply_updates(params, updates), params), keep(new_opt_state, opt_state)
```

A task without labels in the batch (its raw loss exactly 0 and its rows of `task_gradients` exactly 0: no
labelled sample, or a sample weight of 0 over the batch) takes no part in a gradient-level step, as in `fit`: the
door passes the `labelled` mask to the balancing core (DB-MTL keeps that task's EMA and leaves it out of
$\\alpha_k$ and the sum; the min-norm methods leave it out of the min-norm point).

What `fit` does that this door leaves to you: skipping the optimizer on an unapplied step (above), the epoch
hooks (`tx.on_epoch_end`, eagerly, between epochs) and FAMO's second forward pass (`tx.after_step`, on applied
steps only).
"""

import collections
import math

import jax
import jax.numpy as jnp
import keras
import numpy as np

from keras_dbmtl import balancing
from keras_dbmtl.balancers import base as balancer_base

__all__ = ["BalancerState", "BalancerTransformation", "Update", "balancer", "scale_task_gradients", "task_jacobian"]


class BalancerState(collections.namedtuple("BalancerState", ["variables"])):
    """The state of a balancer in the JAX door: a pytree with one field.

    Attributes:
        variables: a dict, variable name → array, holding the values of the balancer's Keras variables (its step
            counter, DB-MTL's `ema_gradients`, UW's `log_variances`, the `seed_generator_state` of a random
            balancer, ...). Its keys, shapes and dtypes are fixed by `BalancerTransformation.init`.
    """


class Update(collections.namedtuple(
        "Update", ["direction", "state", "task_weights", "head_weights", "balancer_gradients", "applied"])):
    """What `BalancerTransformation.update_with_info` returns. On a step that is not applied (`applied` False)
    every array but `state` is zeros and `state` is the state given to `update`.

    Attributes:
        direction: the balanced direction $d$ for the shared parameters, with their structure and dtypes; apply it
            as a gradient (`optimizer.update(direction, opt_state, params)`).
        state: the balancer's next `BalancerState`.
        task_weights: $(T,)$ float32, the balancer's task weights (what `fit` logs as `<task>_weight`; for DB-MTL
            $\\alpha_k / (\\lVert m_t \\rVert + \\epsilon)$).
        head_weights: $(T,)$ float32: task $t$'s own parameters get `head_weights[t]` times the gradient of its
            transformed loss (`scale_task_gradients`). Ones for most gradient-level methods; the method's head
            weights for MGDA, GradNorm, Nash-MTL, FairGrad, ExcessMTL; for a loss-level method the derivative of
            its combined loss with respect to each transformed loss, $\\partial L / \\partial \\tilde\\ell_t$.
        balancer_gradients: dict name → array, the gradients of the balancer's learned parameters (UW's
            `log_variances`, IMTL's and IMTL-L's `scales`, GradNorm's `logits`), as `fit` computes them: of the
            combined loss (loss level) or of $\\sum_t \\tilde\\ell_t$ (gradient level). Empty for the others. Apply
            them with `BalancerTransformation.balancer_params` / `replace_balancer_params`.
        applied: a bool scalar: the step is usable and was applied to `state`: every raw loss is finite (and
            positive under the log transform, except a task without labels), every task gradient is finite, and
            so is what the balancer returned. Where it is False, skip the optimizer too (`jnp.where` on it, see
            the module docstring); `optax.apply_if_finite` does not see it by itself, since the zero direction is
            finite.
    """

    @property
    def usable(self):
        """The name of `applied` in version 0.1.0."""
        return self.applied


def _check_backend():
    if keras.backend.backend() != "jax":
        raise RuntimeError(
            f"keras_dbmtl.jax needs Keras's JAX backend, but Keras runs on {keras.backend.backend()!r}: set "
            f"KERAS_BACKEND=jax before keras is first imported (e.g. `KERAS_BACKEND=jax python train.py`), or use "
            f"the door of your backend (keras_dbmtl.torch, keras_dbmtl.tensorflow, or MultiTaskModel.fit).")


def balancer(balancer, **hyperparameters):
    """The JAX door's transformation of a balancer.

    Args:
        balancer: a registered name (`keras_dbmtl.balancers.names()`: `"dbmtl"`, `"mgda"`, `"uw"`, ...) or a
            `keras_dbmtl.balancers.Balancer` object. An object already built (e.g. a trained model's
            `model.balancer`) is used with its current state, for the shapes it was built for.
        **hyperparameters: the balancer's hyperparameters, with a name (`beta=0.9` for DB-MTL).

    Returns:
        A `BalancerTransformation`; call its `init` next.

    Raises:
        RuntimeError: Keras does not run on JAX (set `KERAS_BACKEND=jax` before importing keras).
        ValueError, TypeError: an unknown name, a hyperparameter out of range, hyperparameters with an object.
    """
    _check_backend()
    return BalancerTransformation(balancing.resolve(balancer, **hyperparameters))


def _overrides(balancer, method):
    return getattr(type(balancer), method) is not getattr(balancer_base.Balancer, method)


class BalancerTransformation:
    """A balancer as a pure function of its state, for JAX (make one with `keras_dbmtl.jax.balancer`).

    One transformation serves one set of shared parameters (the structure and shapes given to `init`) and one
    number of tasks. Every method but `init` and `on_epoch_end` is pure and can be called inside `jax.jit`,
    `jax.lax.scan` or `jax.vmap`; the Keras balancer's variables are never written (each call runs it inside a
    `keras.StatelessScope` with the values of `state`).

    Attributes:
        balancer: the Keras balancer (`keras_dbmtl.balancers.Balancer`) whose methods are run.
    """

    def __init__(self, balancer):
        _check_backend()
        if not isinstance(balancer, balancer_base.Balancer):
            raise TypeError(f"BalancerTransformation takes a keras_dbmtl.balancers.Balancer, not "
                            f"{type(balancer).__name__}; use keras_dbmtl.jax.balancer(name_or_object).")
        self.balancer = balancer
        self._treedef = None
        self._shapes = None
        self._variables = None
        self._names = None
        self._trainable = None
        self._initial = None

    # ------------------------------------------------------------------ description
    @property
    def num_tasks(self):
        """The number of tasks $T$ (None before `init`)."""
        return self.balancer.num_tasks if self._treedef is not None else None

    @property
    def task_names(self):
        """The task names given to `init` (None if only `num_tasks` was given)."""
        return self.balancer.task_names

    @property
    def uses_task_gradients(self):
        """Whether the method reads the task Jacobian (gradient level) or only weights the losses (loss level).
        Either way `update` takes the Jacobian: a loss-level direction is $\\sum_t w_t J_t$."""
        return bool(self.balancer.uses_task_gradients)

    @property
    def needs_after_step(self):
        """True for a method that needs the losses of the same batch after the update (FAMO): call
        `after_step` after each update, or its weights never change."""
        return _overrides(self.balancer, "after_step")

    @property
    def needs_epoch_end(self):
        """True for a method with an epoch boundary (DWA, IGBv2, STCH): call `on_epoch_end` after each epoch."""
        return _overrides(self.balancer, "on_epoch_end")

    # ------------------------------------------------------------------ state
    def init(self, shared_params, task_names=None, num_tasks=None):
        """The balancer's initial state, sized for `shared_params` and the tasks. Call it outside `jit`.

        Args:
            shared_params: any pytree of float arrays (the shared parameters $\\theta$, or arrays of their shapes).
            task_names: the task names, in the order of the losses (needed for losses or task parameters given
                as dicts).
            num_tasks: the number of tasks, if no names are given.

        Returns:
            A `BalancerState`. Calling `init` again with the same structure returns a fresh initial state.

        Raises:
            ValueError: no task count, no arrays in `shared_params`, a structure other than the first `init`'s,
                or a balancer object built for other tasks or shapes.
            TypeError: a leaf that is not a float array.
        """
        leaves, treedef = jax.tree_util.tree_flatten(shared_params)
        if not leaves:
            raise ValueError("shared_params has no arrays: pass the pytree of the shared parameters (the ones every "
                             "task's loss depends on).")
        for path, leaf in jax.tree_util.tree_flatten_with_path(shared_params)[0]:
            if not jnp.issubdtype(jnp.result_type(leaf), jnp.floating):
                raise TypeError(f"shared_params{jax.tree_util.keystr(path)} has dtype {jnp.result_type(leaf)}: the "
                                f"shared parameters must be float arrays.")
        shapes = [tuple(int(d) for d in np.shape(leaf)) for leaf in leaves]
        names = None if task_names is None else [str(name) for name in task_names]
        if names is not None and len(set(names)) != len(names):
            raise ValueError(f"task_names {names} repeat a name.")
        if names is not None and num_tasks is not None and int(num_tasks) != len(names):
            raise ValueError(f"num_tasks={num_tasks} but {len(names)} task_names were given; give one of them.")
        count = len(names) if names is not None else (None if num_tasks is None else int(num_tasks))
        if count is None and self.balancer.built:
            count = self.balancer.num_tasks
        if count is None:
            raise ValueError("init needs the number of tasks: tx.init(shared_params, task_names=[...]) or "
                             "tx.init(shared_params, num_tasks=T).")
        if count < 1:
            raise ValueError(f"num_tasks must be at least 1, got {count}.")
        if self._treedef is not None:
            if treedef != self._treedef or shapes != self._shapes or count != self.balancer.num_tasks:
                raise ValueError(
                    f"This transformation was initialised for {self.balancer.num_tasks} tasks and shared parameters "
                    f"{self._treedef} with shapes {self._shapes}; got {count} tasks and {treedef} with shapes "
                    f"{shapes}. Make a new one (keras_dbmtl.jax.balancer(...)) for other parameters.")
            return BalancerState(dict(self._initial))
        if self.balancer.built:
            built_shapes = self.balancer.shared_shapes
            if self.balancer.num_tasks != count or (built_shapes != shapes and built_shapes != [(sum(
                    math.prod(s) for s in shapes),)]):
                raise ValueError(
                    f"The balancer object was built for {self.balancer.num_tasks} tasks and shared shapes "
                    f"{built_shapes}, not {count} tasks and {shapes}: pass its name (keras_dbmtl.jax.balancer("
                    f"'{type(self.balancer).__name__.lower()}', ...)) or a fresh object.")
            if names is not None and self.balancer.task_names not in (None, names):
                raise ValueError(f"The balancer object was built for tasks {self.balancer.task_names}, not {names}.")
        else:
            balancing.build(self.balancer, names if names is not None else count, shapes)
        if names is not None and self.balancer.task_names is None:
            self.balancer.task_names = names
        self._variables = list(self.balancer.variables)
        self._names = _unique_names(self._variables)
        trainable = {id(v) for v in self.balancer.trainable_variables}
        self._trainable = [name for name, v in zip(self._names, self._variables) if id(v) in trainable]
        self._initial = {name: jnp.array(np.asarray(v.value)) for name, v in zip(self._names, self._variables)}
        self._treedef, self._shapes = treedef, shapes
        return BalancerState(dict(self._initial))

    def balancer_params(self, state):
        """The balancer's learned parameters in `state` (dict name → array; empty for most methods), e.g. to
        optimise with optax next to the network: UW's `log_variances`, IMTL's and IMTL-L's `scales`, GradNorm's
        `logits`. Their gradients are `Update.balancer_gradients`."""
        state = self._checked_state(state)
        return {name: state.variables[name] for name in self._trainable}

    def replace_balancer_params(self, state, params):
        """`state` with the learned parameters `params` (as `balancer_params` returns them) put back."""
        state = self._checked_state(state)
        if set(params) != set(self._trainable):
            raise ValueError(f"params has keys {sorted(params)}; the balancer's learned parameters are "
                             f"{sorted(self._trainable)}.")
        variables = dict(state.variables)
        for name in self._trainable:
            reference = variables[name]
            value = jnp.asarray(params[name], dtype=reference.dtype)
            if value.shape != reference.shape:
                raise ValueError(f"params[{name!r}] has shape {value.shape}, expected {reference.shape}.")
            variables[name] = value
        return BalancerState(variables)

    # ------------------------------------------------------------------ losses
    def transform_losses(self, losses, state=None):
        """The method's loss transform $\\tilde\\ell_t$ of the raw losses: differentiate these for `update`.

        Args:
            losses: the raw losses, a $(T,)$ array or a dict task name → scalar.
            state: the `BalancerState`; needed only where the transform reads learned parameters (IMTL's
                scales, GradNorm's logits), optional otherwise.

        Returns:
            The transformed losses in the form of `losses` (float32): $\\log(\\ell_t + \\epsilon)$ under the log
            transform (DB-MTL), the losses as they are for most methods.
        """
        raw = self._loss_vector(losses, "losses")
        if state is None:
            if _overrides(self.balancer, "transform_losses"):
                raise TypeError(f"{type(self.balancer).__name__}'s loss transform reads its learned parameters "
                                f"{self._trainable}: pass the state, tx.transform_losses(losses, state).")
            state = BalancerState(self._initial)
        transformed = self._transform(self._checked_state(state).variables, raw)
        if isinstance(losses, dict):
            return {name: transformed[t] for t, name in enumerate(self.task_names)}
        return transformed

    # ------------------------------------------------------------------ the step
    def update(self, task_gradients, state, losses):
        """The balanced direction of one step: `direction, state = tx.update(task_gradients, state, losses)`.

        Args:
            task_gradients: the Jacobian of the transformed losses (`transform_losses`) on the shared parameters:
                the shared parameters' pytree, each leaf with a leading task axis, $(T, *\\text{shape})$.
            state: the `BalancerState` from `init` or the previous `update`.
            losses: the raw losses, a $(T,)$ array or a dict task name → scalar.

        Returns:
            `(direction, state)`: the direction for the shared parameters (their structure and dtypes), to apply
            as a gradient, and the next state. On an unusable step (a NaN or inf loss or task gradient, a loss
            the log transform cannot take) every leaf of `direction` is zeros and `state` is returned unchanged;
            `update_with_info` says so (`Update.applied`) and returns the head weights and the rest too.

        Raises:
            ValueError: before `init`; `task_gradients` of another structure than the shared parameters given to
                `init`, or a leaf without the leading task axis; losses that are not $T$ scalars (or a dict
                with other task names); a state not made by this transformation's `init` (other variables or
                shapes).
            TypeError: a `state` that is not a `BalancerState`.
        """
        result = self.update_with_info(task_gradients, state, losses)
        return result.direction, result.state

    def update_with_info(self, task_gradients, state, losses):
        """`update`, returning an `Update` (direction, state, task weights, head weights, balancer gradients,
        applied). Same arguments and errors as `update`.

        Gradient-level methods run the balancer's `aggregate` on the Jacobian (DB-MTL's Algorithm 1: the EMA
        of each $J_t$, normalised, summed and rescaled by $\\alpha_k$), with the tasks without labels in the batch
        left out (`TaskJacobian.labelled`); loss-level methods form $d = \\sum_t w_t J_t$ with
        $w_t = \\partial L / \\partial \\tilde\\ell_t$ of their combined loss $L$ (differentiated with `jax.grad`,
        exact for a nonlinear combination such as GLS), the direction `fit` gets by differentiating $L$ itself.
        An unusable step runs on zeros in place of its losses and Jacobian (no NaN reaches a solver) and is then
        discarded by a select: zeros out, the input state back, `applied` False.
        """
        state = self._checked_state(state)
        raw = self._loss_vector(losses, "losses")
        blocks = self._checked_task_gradients(task_gradients)
        usable, labelled = self._usable(raw, blocks)
        raw = jnp.where(usable, raw, jnp.zeros_like(raw))
        blocks = [jnp.where(usable, block, jnp.zeros_like(block)) for block in blocks]
        values = state.variables
        params = {name: values[name] for name in self._trainable}
        if self.uses_task_gradients:
            if params:
                balancer_gradients = jax.grad(lambda p: jnp.sum(self._transform({**values, **p}, raw)))(params)
            else:
                balancer_gradients = {}
            transformed = self._transform(values, raw)

            def run():
                result = balancing.balance(self.balancer, balancer_base.TaskLosses(raw, transformed), blocks,
                                           labelled=labelled)
                return result.shared, result.task_weights, result.head_weights

            (shared, task_weights, head_weights), next_state = self._run(values, run)
            if head_weights is None:
                head_weights = jnp.ones((self.num_tasks,), "float32")
        else:
            def combined(p, delta):
                def run():
                    transformed = self.balancer.transform_losses(raw) + delta
                    return balancing.combine(self.balancer, balancer_base.TaskLosses(raw, transformed))

                (loss, weights), next_state = self._run({**values, **p}, run)
                return loss, (weights, next_state)

            (balancer_gradients, head_weights), (task_weights, next_state) = jax.grad(
                combined, argnums=(0, 1), has_aux=True)(params, jnp.zeros((self.num_tasks,), "float32"))
            shared = [jnp.tensordot(head_weights.astype(block.dtype), block, axes=1) for block in blocks]
        shared = [jnp.asarray(d, dtype=block.dtype) for d, block in zip(shared, blocks)]
        outputs = (shared, jnp.asarray(task_weights, "float32"), jnp.asarray(head_weights, "float32"),
                   dict(balancer_gradients))
        # Finite inputs can still give a non-finite output (a direction that overflows float32): not applied either.
        applied = jnp.logical_and(usable, _all_finite(jax.tree_util.tree_leaves(outputs)))
        shared, task_weights, head_weights, balancer_gradients = jax.tree_util.tree_map(
            lambda value: jnp.where(applied, value, jnp.zeros_like(value)), outputs)
        next_state = BalancerState({name: jnp.where(applied, value, values[name])
                                    for name, value in next_state.variables.items()})
        return Update(jax.tree_util.tree_unflatten(self._treedef, shared), next_state, task_weights, head_weights,
                      balancer_gradients, applied)

    def after_step(self, state, losses_before, losses_after):
        """The balancer's hook after the update, for FAMO (`needs_after_step`): `losses_after` are the raw losses
        of the same batch under the updated parameters (one more forward pass, no gradient). Pure; returns the
        next state (the same state for a method without the hook)."""
        state = self._checked_state(state)
        before = jax.lax.stop_gradient(self._loss_vector(losses_before, "losses_before"))
        after = jax.lax.stop_gradient(self._loss_vector(losses_after, "losses_after"))
        _, state = self._run(state.variables, lambda: self.balancer.after_step(before, lambda: after))
        return state

    def on_epoch_end(self, state, epoch):
        """The balancer's epoch boundary, for DWA, IGBv2, STCH (`needs_epoch_end`): returns the next state. Not
        jittable (these methods decide in Python, on concrete values): call it eagerly, between epochs."""
        state = self._checked_state(state)
        if any(isinstance(value, jax.core.Tracer) for value in state.variables.values()):
            raise TypeError("on_epoch_end reads concrete values: call it outside jax.jit / lax.scan, between epochs.")
        _, state = self._run(state.variables, lambda: self.balancer.on_epoch_end(int(epoch)))
        return state

    # ------------------------------------------------------------------ the common case
    def task_jacobian(self, loss_fn, state, shared_params, task_params, *args):
        """Raw losses, the transformed-loss Jacobian on the shared parameters and each task's own gradients, from
        one loss function (`keras_dbmtl.jax.task_jacobian` with this method's loss transform).

        Args:
            loss_fn: `loss_fn(shared_params, task_params, *args)` → the raw losses, a $(T,)$ array or a dict
                task name → scalar.
            state: the `BalancerState` (the transform of IMTL and GradNorm reads it).
            shared_params: the shared parameters (the structure given to `init`).
            task_params: each task's own parameters: a sequence of $T$ pytrees, or a dict task name → pytree, or
                None.
            *args: passed to `loss_fn` (the batch).

        Returns:
            `(raw_losses, jacobian, own_gradients)`: the $(T,)$ float32 raw losses; the Jacobian of the
            transformed losses on `shared_params` (leading task axis, ready for `update`); for each task the
            gradient of its transformed loss on its own parameters, in the form of `task_params` (None if None).
        """
        names = self.task_names

        def vector(losses):
            return self._loss_vector(losses, "loss_fn's losses")

        if isinstance(task_params, dict):
            if names is None or set(task_params) != set(names):
                raise ValueError(f"task_params has keys {sorted(task_params)}; give init the task_names "
                                 f"({names}) and one entry per task.")
        return task_jacobian(loss_fn, shared_params, task_params, *args,
                             transform=lambda raw: self.transform_losses(raw, state), losses_to_vector=vector,
                             task_order=names)

    # ------------------------------------------------------------------ internals
    def _run(self, values, fn):
        """`fn()` with the balancer's variables holding `values`; (its output, the next `BalancerState`)."""
        mapping = [(variable, values[name]) for name, variable in zip(self._names, self._variables)]
        with keras.StatelessScope(state_mapping=mapping) as scope:
            output = fn()
            updated = {}
            for name, variable in zip(self._names, self._variables):
                value = scope.get_current_value(variable)
                reference = self._initial[name]
                updated[name] = jnp.asarray(values[name] if value is None else value, dtype=reference.dtype)
        return output, BalancerState(updated)

    def _transform(self, values, raw):
        transformed, _ = self._run(values, lambda: self.balancer.transform_losses(raw))
        return jnp.asarray(transformed, "float32")

    def _usable(self, raw, blocks):
        """(usable, labelled) of a step, as `fit` decides them: `labelled` (T,) bool (None at loss level) is False
        for a task without labels in the batch, its raw loss exactly 0 and its Jacobian rows exactly 0; `usable`, a
        bool scalar, is True when every task gradient is finite and every raw loss is usable by the balancer
        (`invalid_losses`: finite, and positive under the log transform), a task without labels excepted unless
        no task has labels (then there is nothing to learn).

        One pass over the Jacobian answers both: $\\sum_j |J_{tj}|$ per task is exactly 0 for a zero row and not
        finite for a row with a NaN or inf (or one whose sum overflows, which `fit`'s check counts too)."""
        invalid = jnp.asarray(self.balancer.invalid_losses(raw))
        magnitude = sum(jnp.sum(jnp.abs(jnp.reshape(block, (self.num_tasks, -1))), axis=1,
                                dtype=jnp.promote_types(block.dtype, jnp.float32)) for block in blocks)
        labelled = None
        if self.uses_task_gradients:
            labelled = jnp.logical_or(raw != 0, magnitude != 0)
            none_labelled = jnp.logical_not(jnp.any(labelled))
            invalid = jnp.logical_and(invalid, jnp.logical_or(labelled, none_labelled))
        return jnp.logical_and(jnp.logical_not(jnp.any(invalid)), jnp.all(jnp.isfinite(magnitude))), labelled

    def _check_initialised(self):
        if self._treedef is None:
            raise ValueError("Call tx.init(shared_params, task_names=...) first: the balancer's state is sized there.")

    def _checked_state(self, state):
        self._check_initialised()
        if not isinstance(state, BalancerState):
            raise TypeError(f"state must be the BalancerState from tx.init or tx.update, not {type(state).__name__}.")
        if set(state.variables) != set(self._names):
            raise ValueError(f"state holds {sorted(state.variables)}, but this balancer's state is "
                             f"{sorted(self._names)}: pass the state this transformation's init returned.")
        for name in self._names:
            value, reference = state.variables[name], self._initial[name]
            if tuple(jnp.shape(value)) != tuple(reference.shape):
                raise ValueError(f"state.variables[{name!r}] has shape {tuple(jnp.shape(value))}, expected "
                                 f"{tuple(reference.shape)} (the shape init made).")
        return state

    def _loss_vector(self, losses, what):
        self._check_initialised()
        num_tasks = self.balancer.num_tasks
        if isinstance(losses, dict):
            names = self.task_names
            if names is None:
                raise ValueError(f"{what} is a dict, but init was given no task_names: pass task_names to init, or "
                                 f"the losses as a ({num_tasks},) array.")
            if set(losses) != set(names):
                raise ValueError(f"{what} has tasks {sorted(map(str, losses))}, the balancer {names}: give one loss "
                                 f"per task, with the names given to init.")
            for name in names:
                if jnp.ndim(losses[name]) != 0:
                    raise ValueError(f"{what}[{name!r}] has shape {jnp.shape(losses[name])}: each task loss must be "
                                     f"a scalar (reduce it over the batch).")
            return jnp.stack([jnp.asarray(losses[name], "float32") for name in names])
        if isinstance(losses, (list, tuple)):
            losses = jnp.stack([jnp.asarray(loss) for loss in losses])
        shape = tuple(jnp.shape(losses))
        if shape != (num_tasks,):
            raise ValueError(f"{what} has shape {shape}: pass the {num_tasks} raw task losses, each a scalar "
                             f"(reduced over the batch), as a ({num_tasks},) array (or a dict task name -> scalar).")
        return jnp.asarray(losses, "float32")

    def _checked_task_gradients(self, task_gradients):
        leaves, treedef = jax.tree_util.tree_flatten(task_gradients)
        if treedef != self._treedef:
            raise ValueError(
                f"task_gradients has the structure {treedef}, but init was given shared parameters of structure "
                f"{self._treedef}: pass the Jacobian of the transformed losses on those same parameters (e.g. "
                f"jax.jacrev(lambda p: tx.transform_losses(loss_fn(p, ...), state))(shared_params)).")
        num_tasks = self.balancer.num_tasks
        paths = [jax.tree_util.keystr(path) for path, _ in jax.tree_util.tree_flatten_with_path(task_gradients)[0]]
        for path, leaf, shape in zip(paths, leaves, self._shapes):
            if tuple(jnp.shape(leaf)) != (num_tasks,) + shape:
                raise ValueError(f"task_gradients{path} has shape {tuple(jnp.shape(leaf))}, expected "
                                 f"{(num_tasks,) + shape}: a leading axis of the {num_tasks} tasks, then the "
                                 f"parameter's shape {shape}.")
        return [jnp.asarray(leaf) for leaf in leaves]


def _all_finite(arrays):
    """Whether every entry of every array is finite (a bool scalar; True for none)."""
    checks = [jnp.all(jnp.isfinite(array)) for array in arrays]
    return jnp.all(jnp.stack(checks)) if checks else jnp.asarray(True)


def _unique_names(variables):
    names, seen = [], {}
    for variable in variables:
        name = variable.name
        if name in seen:
            seen[name] += 1
            name = f"{name}_{seen[name]}"
        seen.setdefault(name, 0)
        names.append(name)
    return names


def task_jacobian(loss_fn, shared_params, task_params, *args, transform=None, losses_to_vector=None,
                  task_order=None):
    """Raw losses, the Jacobian of the transformed losses on the shared parameters and each task's own gradients,
    from one loss function, with one `jax.jacrev` (pure; use inside `jit`).

    Args:
        loss_fn: `loss_fn(shared_params, task_params, *args)` → the raw $(T,)$ losses.
        shared_params: the shared parameters $\\theta$ (any pytree).
        task_params: each task's own parameters $\\psi_t$: a sequence of $T$ pytrees, a dict of $T$ pytrees (in
            the order of `task_order`, or its own order), or None.
        *args: passed to `loss_fn`.
        transform: the loss transform, $(T,)$ → $(T,)$ (`tx.transform_losses` with its state; None: identity).
        losses_to_vector: how `loss_fn`'s output becomes a $(T,)$ array (None: as it is).
        task_order: the task names, in the losses' order, for a dict `task_params`.

    Returns:
        `(raw_losses, jacobian, own_gradients)`: `raw_losses` $(T,)$; `jacobian` the pytree of `shared_params`
        with a leading task axis, $\\nabla_\\theta \\tilde\\ell_t$; `own_gradients` in the form of `task_params`,
        entry $t$ the gradient of $\\tilde\\ell_t$ on $\\psi_t$ (None if `task_params` is None).
    """
    to_vector = losses_to_vector or jnp.asarray

    def transformed(shared, tasks):
        raw = to_vector(loss_fn(shared, tasks, *args))
        return (raw if transform is None else transform(raw)), raw

    if task_params is None:
        jacobian, raw = jax.jacrev(lambda s: transformed(s, None), has_aux=True)(shared_params)
        return raw, jacobian, None
    (jacobian, task_jacobians), raw = jax.jacrev(transformed, argnums=(0, 1), has_aux=True)(shared_params,
                                                                                         task_params)
    if isinstance(task_params, dict):
        order = list(task_order) if task_order is not None else list(task_params)
        own = {name: jax.tree_util.tree_map(lambda g, t=t: g[t], task_jacobians[name])
               for t, name in enumerate(order)}
        return raw, jacobian, own
    own = [jax.tree_util.tree_map(lambda g, t=t: g[t], group) for t, group in enumerate(task_jacobians)]
    return raw, jacobian, type(task_params)(own) if isinstance(task_params, tuple) else own


def scale_task_gradients(task_gradients, head_weights, task_order=None):
    """Each task's own gradients times its head weight (`Update.head_weights`), as `fit` applies them.

    Args:
        task_gradients: a sequence of $T$ pytrees, or a dict of them (`task_jacobian`'s `own_gradients`).
        head_weights: $(T,)$, in the order of the losses.
        task_order: for a dict, the task names in the order of `head_weights` (None: the dict's own order,
            which is the task order for the dict `task_jacobian` returns).

    Returns:
        The same structure, entry $t$ multiplied by `head_weights[t]` (in each leaf's dtype).
    """
    def scaled(group, t):
        return jax.tree_util.tree_map(lambda g: g * jnp.asarray(head_weights[t], dtype=jnp.result_type(g)), group)

    if isinstance(task_gradients, dict):
        order = list(task_order) if task_order is not None else list(task_gradients)
        return {name: scaled(task_gradients[name], t) for t, name in enumerate(order)}
    result = [scaled(group, t) for t, group in enumerate(task_gradients)]
    return tuple(result) if isinstance(task_gradients, tuple) else result
