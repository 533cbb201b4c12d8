"""Door 3: any keras-dbmtl balancer in a plain PyTorch training loop (no Keras model, no Keras layer).

```python
import os; os.environ["KERAS_BACKEND"] = "torch"          # before keras is imported
import torch, keras_dbmtl

balancer = keras_dbmtl.torch.Balancer("dbmtl", beta=0.9)   # any registered name + hyperparameters, or an object
optimizer = torch.optim.SGD(model.parameters(), lr=1e-2)
for x, y in batches:
    optimizer.zero_grad()
    z = model.trunk(x)
    losses = {task: loss_fn(head(z), y[task]) for task, head in model.heads.items()}
    balancer.backward(losses, shared_parameters=model.trunk.parameters())
    optimizer.step()
```

What `Balancer.backward` does, with $\\ell_t$ the raw losses and $\\tilde\\ell_t$ = `task_losses(raw).transformed`
(the method's loss transform, $\\log(\\ell_t + \\epsilon)$ under DB-MTL), all of it through the balancing core
`keras_dbmtl.balancing` (no balancer is re-implemented here):

- gradient-level balancers (DB-MTL, MGDA, UPGrad, PCGrad, IMTL-G, ...): the task Jacobian
  $J = \\partial \\tilde\\ell / \\partial \\theta$ on the shared parameters $\\theta$ (`torch.autograd.grad`, all rows
  at once with `is_grads_batched=True` or one row per task), then `keras_dbmtl.balancing.balance`; each shared
  parameter's `.grad` receives the balanced direction $d$ (DB-MTL: $\\alpha_k \\sum_t m_t / \\lVert m_t \\rVert$),
  every other parameter $\\psi$ the losses reach receives
  $\\sum_t h_t\\,\\partial \\tilde\\ell_t / \\partial \\psi$, i.e. its own task's gradient times the method's
  head weight $h_t$ (1 except MGDA-style methods, GradNorm, Nash-MTL);
- loss-level balancers (EW, UW, DWA, RLW, GLS, IMTL-L, ...): one backward pass of the combined loss
  (`keras_dbmtl.balancing.combine`), as `loss.backward()` would do.

Gradients are accumulated into `.grad` (added to what is there, as `Tensor.backward` does): call
`optimizer.zero_grad()` before every step (or on purpose, to accumulate several batches).

With `features=` (TorchJD's `mtl_backward` style), the Jacobian is taken with respect to the shared representation
$z$ (the trunk's output) instead: backward passes through the heads only, the balancer on the $T \\times |z|$
Jacobian, and one backward pass of $\\langle d_z, z \\rangle$ through the trunk (MGDA-UB's representation level).

Learned balancer parameters (UW, IMTL, IMTL-L, GradNorm) are `torch.nn.Parameter`s returned by
`Balancer.parameters()`: they exist once the balancer is built, so call `Balancer.build(tasks, shared_parameters)`
before creating the optimizer and give them to it (see `Balancer.parameters`).

Several processes (`keras_dbmtl.distributed.initialize("gloo")` or NCCL, one shard of every global batch per
process, no `DistributedDataParallel` wrapper): the losses take their replica mean's value before the transform,
and the Jacobian and every gradient are averaged over the processes (one flattened all-reduce) before the balancer
runs, so every process gets the same direction and its balancer state stays identical; with equal shards and
mean-reduced losses this equals one process on the global batch. With `features=`, the representation Jacobian's
columns of every process are gathered instead (`all_gather`, the processes' shards in rank order along the batch
axis, the first axis of every feature tensor): the balancer runs on the global batch's $T \\times (B |z|)$
Jacobian (its state sized by the global batch), each process backpropagates its own rows of $d_z$ through its
trunk, and the trunk gradients are summed over the processes.

Unusable steps, as `fit` skips them: when a task's raw loss is not finite (or not positive under a log transform),
or any gradient the door computed is NaN or inf, `backward` writes no gradient (every `.grad` stays as it was),
leaves the balancer's state as it was (DB-MTL's EMA and step counter; a loss-level balancer's state is restored),
returns None, counts the step in `Balancer.skipped_steps`, sets `Balancer.last_step_skipped` and warns
(RuntimeWarning) naming the tasks. `optimizer.step()` then moves nothing whose `.grad` is None (after
`optimizer.zero_grad()`, which sets None by default); gradients that were already there (accumulation,
`zero_grad(set_to_none=False)`, where momentum and weight decay still move the parameters) are applied as they
are: skip the `optimizer.step()` when `backward` returned None to skip the step exactly. The checks run before
the balancer (on the Jacobian and every gradient, after the all-reduce with several processes, so that every
process skips together); the gradients the balanced step produces are checked too before they are written: with
`features=`, where the trunk's backward pass follows the balancer, the balancer's state is copied before it runs
and restored when that pass is not finite.

A task without labels in the batch (its raw loss exactly 0 and every gradient of it exactly 0, e.g. a masked mean
over no labelled sample) takes no part, as in `fit`: `TaskJacobian.labelled` is False for it (DB-MTL keeps its EMA
and leaves it out of $\\alpha_k$ and of the direction; the min-norm methods leave it out), and its zero loss is not
an unusable one under the log transform (unless no task has labels: then, under the log transform, the step is
skipped).

Mixed precision: the door runs inside a user's `torch.autocast` region; the losses are cast to float32 for the
balancer and the balancer itself runs with autocast disabled. float16 loss scaling: pass the `torch.amp.GradScaler`
as `backward(losses, ..., scaler=scaler)` with the unscaled losses (not `scaler.scale(loss)`: the door cannot tell
them apart), then `scaler.step(optimizer)` and `scaler.update()` as usual. The door differentiates the scaled
transformed losses, unscales the Jacobian before the balancer and writes every gradient scaled by the current
scale; on an overflow (a NaN or inf gradient with finite losses: no warning, the scaler's normal adjustment) or an
unusable loss it writes inf into the `.grad` of every parameter it would have given a gradient, so that
`scaler.step` skips the update and `scaler.update()` backs the scale off, and the balancer's state stays as it
was. `torch.compile`: compile the model (or its forward) and call
`backward` eagerly on its losses; `backward` itself is not meant to be compiled. The vectorised Jacobian runs
the backward pass under `vmap`, which compiled graphs and some operators do not support: `vectorize=False` (the
default on the CPU) pulls one task row at a time.
"""

import collections
import collections.abc
import warnings
import zlib

from keras_dbmtl import balancing
from keras_dbmtl._utils import unique

__all__ = ["Balancer", "Step"]

#: What `Balancer.backward` also keeps as `Balancer.last_step`: `raw` and `transformed` (T,) float32 losses,
#: `task_weights` (T,) and `head_weights` ((T,) or None), all detached.
Step = collections.namedtuple("Step", ["raw", "transformed", "task_weights", "head_weights"])


def _require_torch_backend():
    import keras

    if keras.backend.backend() != "torch":
        raise RuntimeError(
            f"keras_dbmtl.torch needs the torch Keras backend, but Keras runs on {keras.backend.backend()!r}: set "
            "KERAS_BACKEND=torch in the environment before keras (or keras_dbmtl) is first imported "
            "(os.environ['KERAS_BACKEND'] = 'torch' at the top of the script)."
        )


def _reached_leaves(roots):
    """The leaf tensors (AccumulateGrad nodes' `.variable`) that the autograd graph of `roots` reaches, by id."""
    stack = [r.grad_fn for r in roots if r.grad_fn is not None]
    seen, leaves = set(), {}
    while stack:
        node = stack.pop()
        if node is None or id(node) in seen:
            continue
        seen.add(id(node))
        variable = getattr(node, "variable", None)
        if variable is not None:
            leaves[id(variable)] = variable
        stack.extend(child for child, _ in node.next_functions if child is not None)
    return leaves


class Balancer:
    """A keras-dbmtl balancer for a plain PyTorch loop: `backward(losses, shared_parameters=...)` sets `.grad`.

    Args:
        balancer: a registered name ("dbmtl", "mgda", "upgrad", "ew", "uw", ...; `keras_dbmtl.balancers.names()`)
            or a `keras_dbmtl.balancers.Balancer` object.
        vectorize: how the task Jacobian is pulled: True, all $T$ rows in one `torch.autograd.grad` with
            `is_grads_batched=True` (fastest on a GPU); False, one `torch.autograd.grad` per task (the least
            memory; works with every operator and with compiled graphs); None (default): vectorised when the
            shared parameters are on a CUDA device.
        **hyperparameters: the balancer's hyperparameters when `balancer` is a name (e.g. `beta=0.9`).

    The state (DB-MTL's EMA of the task gradients, the learned weights of UW, ...) is the wrapped balancer's Keras
    variables (torch tensors on Keras's device), sized at the first `backward` (or `build`): the task names (or
    number) and the shapes of the shared parameters (or of `features`) are fixed from then on.

    Raises:
        RuntimeError: when Keras does not run on the torch backend (set KERAS_BACKEND=torch before importing keras).
    """

    def __init__(self, balancer="dbmtl", vectorize=None, **hyperparameters):
        _require_torch_backend()
        self.balancer = balancing.resolve(balancer, **hyperparameters)
        self.vectorize = vectorize
        self.task_names = None
        self.last_step = None
        #: The number of `backward` calls that were skipped (an unusable loss or a non-finite gradient).
        self.skipped_steps = 0
        #: Whether the last `backward` was skipped (then `last_step` is still the last applied step's).
        self.last_step_skipped = False
        self._keyed = None
        self._shapes = None
        self._split = None               # (task parameters, params reached by several tasks) found at the first call
        self._shared_checked = False     # every shared parameter is reached (checked once, at the first call)
        self._checked_learned = 0
        self._learned_before = None

    # ------------------------------------------------------------------ state
    def build(self, tasks, shared_parameters=None, features=None):
        """Sizes the balancer's state now (else the first `backward` does): needed before creating the optimizer
        when the balancer has learned parameters (`parameters()`).

        Args:
            tasks: the task names (the keys `backward` will receive) or their number.
            shared_parameters: the shared parameters (an iterable of tensors; only their shapes are read), or
            features: the shared representation (a tensor or a list of tensors) when `backward` will take
                `features=`: its shapes, batch axis included (this process's: with several processes, the state
                is sized by the global batch, the first axis times the number of processes).
        """
        names = [f"task{i}" for i in range(tasks)] if isinstance(tasks, int) else [str(t) for t in tasks]
        if not names:
            raise ValueError("build needs at least one task.")
        if (shared_parameters is None) == (features is None):
            raise ValueError("build takes shared_parameters= or features= (one of them): the shapes of what the "
                             "task Jacobian is taken with respect to.")
        tensors = self._as_list(features if features is not None else shared_parameters, "shared_parameters")
        shapes = self._feature_shapes(tensors) if features is not None else [tuple(t.shape) for t in tensors]
        if self.balancer.built:
            self._check_build(names, shapes)
        else:
            balancing.build(self.balancer, names, shapes)
        self.task_names, self._shapes = names, shapes
        return self

    def _check_build(self, names, shapes):
        if self.task_names is not None and len(names) != len(self.task_names):
            raise ValueError(f"This balancer was built for {len(self.task_names)} tasks ({self.task_names}); got "
                             f"{len(names)}. Use one Balancer per set of tasks.")
        if self._shapes is not None and self.balancer.uses_task_gradients and shapes != self._shapes:
            raise ValueError(
                f"The shared tensors' shapes changed from {self._shapes} to {shapes}: the balancer's state is sized "
                "for the first ones. With features=, every batch must have the same size (drop the last, shorter "
                "batch: DataLoader(drop_last=True)); otherwise pass the same shared_parameters at every step."
            )

    def parameters(self):
        """The balancer's learned parameters (`torch.nn.Parameter`s: UW's log-variances, IMTL's and IMTL-L's
        scales, GradNorm's logits; empty for every other method). `backward` accumulates their gradient ($\\partial
        \\sum_t \\tilde\\ell_t$, or of the combined loss at loss level) into `.grad`; they move only if they are in an
        optimizer:

            balancer = keras_dbmtl.torch.Balancer("uw").build(["a", "b"], trunk.parameters())
            optimizer = torch.optim.Adam([*model.parameters(), *balancer.parameters()], lr=1e-3)

        A learned balancer's parameters do not exist before it is built: this raises then. `backward` cannot see the
        optimizer; it warns once when the parameters received a gradient at one call and had not moved by the next.
        """
        if not self.balancer.built:
            if self._has_learned_parameters():
                raise RuntimeError(
                    f"{type(self.balancer).__name__} has learned parameters, which exist once it is built: call "
                    "balancer.build(task_names, shared_parameters) before creating the optimizer, then pass "
                    "balancer.parameters() to it.")
            return []
        return [v.value for v in self.balancer.trainable_variables]

    def _has_learned_parameters(self):
        from keras_dbmtl.balancers import GradNorm, IMTL, IMTLL, UW

        return isinstance(self.balancer, (UW, IMTL, IMTLL, GradNorm))

    def state_dict(self):
        """The balancer's state (every Keras variable, learned ones included) as {name: tensor} copies."""
        return {f"{i}:{v.path}": v.value.detach().clone() for i, v in enumerate(self.balancer.variables)}

    def load_state_dict(self, state):
        """Restores what `state_dict` returned (the balancer must be built the same way first)."""
        variables = self.balancer.variables
        if len(state) != len(variables):
            raise ValueError(f"state has {len(state)} entries, the built balancer {len(variables)} variables.")
        for v, value in zip(variables, state.values()):
            v.assign(value)

    # ------------------------------------------------------------------ inputs
    @staticmethod
    def _as_list(tensors, what):
        import torch

        if isinstance(tensors, torch.Tensor):
            tensors = [tensors]
        try:
            tensors = unique(list(tensors))
        except TypeError:
            raise TypeError(f"{what} must be a tensor or an iterable of tensors (e.g. trunk.parameters()), not "
                            f"{type(tensors).__name__}.") from None
        for t in tensors:
            if not isinstance(t, torch.Tensor):
                raise TypeError(f"{what} must hold torch tensors; got a {type(t).__name__}.")
        return tensors

    def _losses(self, losses):
        import torch

        names, values, keyed = balancing.named_losses(losses, "backward")
        for name, value in zip(names, values):
            if not isinstance(value, torch.Tensor):
                raise TypeError(f"The loss of task {name!r} is a {type(value).__name__}, not a torch tensor.")
            if value.dim() != 0:
                raise ValueError(f"The loss of task {name!r} has shape {tuple(value.shape)}, not a scalar: reduce "
                                 "it to one value per task (e.g. loss_fn(..., reduction='mean') or .mean()).")
            if not value.requires_grad:
                raise ValueError(f"The loss of task {name!r} does not require grad: it must come from the model's "
                                 "forward pass, outside torch.no_grad().")
        balancing.check_same_tasks(names, keyed, self.task_names, self._keyed, "backward")
        if self._keyed is None:
            self._keyed = keyed
        return names, values

    # ------------------------------------------------------------------ the step
    def backward(self, losses, shared_parameters=None, task_parameters=None, features=None, scaler=None):
        """Sets `.grad` of the shared parameters to the balanced direction and of each task's parameters to its own
        gradient times its head weight (accumulating into `.grad`); call `optimizer.step()` after it.

        Args:
            losses: a dict {task: 0-d tensor} (the names and their order are fixed at the first call) or a
                sequence of 0-d tensors, from one forward pass of the model (any dtype: cast to float32).
            shared_parameters: the parameters all tasks share (e.g. `trunk.parameters()`), whose gradient is
                balanced. Optional with `features=` (then: every parameter that the features reach).
            task_parameters: optional, the other parameters to give gradients to (a flat iterable, or one
                iterable per task: only the union is used). Default: every leaf tensor requiring grad that the
                losses reach and that is not shared, found once, at the first call, by walking the autograd graph
                (pass it when the set changes between steps). A non-shared parameter reached by several tasks
                gets $\\sum_t h_t\\,\\partial\\tilde\\ell_t/\\partial\\psi$ (not balanced; a warning says so once).
            features: the shared representation $z$ (a tensor, or a list of tensors, batch axis first) that every
                task's head reads: the Jacobian is taken with respect to it (the balancer's state is then sized by
                $z$'s shape, batch axis included, the global batch's with several processes: keep the batch size
                fixed) and the balanced direction $d_z$ reaches the shared parameters through one backward pass of
                the trunk.
            scaler: an enabled `torch.amp.GradScaler` (float16 loss scaling), or None. `losses` are the unscaled
                losses; every gradient written is scaled by the scaler's current scale, for
                `scaler.step(optimizer)` and `scaler.update()`; on a skipped step the door writes inf into those
                `.grad`s instead, so that the scaler skips the update and backs its scale off.

        Returns:
            The task weights of the step, detached: a dict {task: 0-d tensor} when `losses` is a dict, else a (T,)
            tensor (also in `last_step`, with the losses and the head weights). None when the step is skipped: a
            loss is unusable (not finite, or not positive under a log transform, for a task with labels) or a
            gradient is NaN or inf. Then nothing is written (no `.grad` is touched, except the inf a `scaler`
            needs), the balancer's state stays as it was, `skipped_steps` counts it, `last_step_skipped` is True
            and a RuntimeWarning names the tasks (none for an overflow under a `scaler` with finite losses: the
            scaler's normal adjustment).

        Raises:
            ValueError, TypeError: losses that are not 0-d tensors, task names that change, no shared parameters,
                a shared parameter that no loss reaches (checked at the first call), a `scaler` that is not a
                GradScaler, features whose shapes differ between the processes.
        """
        import torch

        from keras_dbmtl.gradients import torch as backend

        names, values = self._losses(losses)
        device_type = values[0].device.type
        scale = self._scale(scaler, values[0].device)
        if features is not None:
            features = self._as_list(features, "features")
            if shared_parameters is None:
                reached = _reached_leaves(features)
                shared = [t for t in reached.values() if t.requires_grad]
            else:
                shared = self._as_list(shared_parameters, "shared_parameters")
        elif shared_parameters is None:
            raise ValueError("backward needs shared_parameters= (the parameters every task shares, e.g. "
                             "trunk.parameters()) or features= (the shared representation).")
        else:
            shared = self._as_list(shared_parameters, "shared_parameters")
        if not shared:
            raise ValueError("No shared parameters: shared_parameters is empty (an exhausted generator? pass "
                             "list(trunk.parameters()) or call .parameters() at each step). If the tasks share "
                             "nothing, train them separately: there is nothing to balance.")
        raw_local = torch.stack([v.float() for v in values])
        raw = backend.global_losses(raw_local)                 # the global batch's values on several processes
        shapes = self._feature_shapes(features) if features is not None else [tuple(t.shape) for t in shared]
        task_params = self._task_parameters(values, shared, task_parameters, features)
        self._prepare(names, shapes)
        written = unique(list(shared) + list(task_params) + self.parameters())   # what a scaler's inf goes to
        with torch.autocast(device_type, enabled=False):
            task_losses = self.balancer.task_losses(raw)
            transformed = task_losses.transformed
            invalid = self.balancer.invalid_losses(raw.detach()).to(raw.device)
            if self.balancer.uses_task_gradients:
                # A zero loss may be a task without labels (decided with its gradients): not unusable yet.
                invalid = torch.logical_and(invalid, raw.detach() != 0)
            if bool(invalid.any()):
                return self._skip(self._unusable_losses_message(names, invalid), written, scale)
            if self.balancer.uses_task_gradients:
                result = self._gradient_level(task_losses, shared, task_params, features, scale, names)
            else:
                result = self._loss_level(task_losses, shared, task_params, scale)
            if not isinstance(result, tuple):                   # the reason the step is skipped
                return self._skip(result, written, scale)
            weights, head_weights = result
        weights = weights.detach().to(values[0].device)
        self.last_step = Step(raw.detach(), transformed.detach(), weights,
                              None if head_weights is None else head_weights.detach().to(values[0].device))
        self.last_step_skipped = False
        if self._keyed:
            return {name: weights[t] for t, name in enumerate(names)}
        return weights

    @staticmethod
    def _unusable_losses_message(names, invalid):
        bad = [n for n, b in zip(names, invalid.tolist()) if b]
        return (f"Unusable losses for tasks {bad} (not finite, or not positive under a log transform): this step "
                "writes no gradient and leaves the balancer's state as it was.")

    @staticmethod
    def _non_finite_message(where):
        return (f"Non-finite gradients (NaN or inf) {where}: this step writes no gradient and leaves the balancer's "
                "state as it was.")

    def _skip(self, message, written, scale):
        """A skipped step: nothing written (a scaler's inf aside), the balancer's state as it was; warns with
        `message` (None: a scaler's overflow, its normal adjustment: no warning). Returns None."""
        import torch

        self.skipped_steps += 1
        self.last_step_skipped = True
        if scale is not None:
            # The GradScaler protocol: a non-finite .grad makes scaler.step skip and scaler.update back off.
            with torch.no_grad():
                for t in written:
                    if t.grad is None:
                        t.grad = torch.full_like(t, float("inf"))
                    else:
                        t.grad.fill_(float("inf"))
        if message is not None:
            if scale is not None:
                message += " With scaler=, the gradients are set to inf instead: scaler.step skips the update."
            warnings.warn(message, RuntimeWarning, stacklevel=3)
        return None

    @staticmethod
    def _scale(scaler, device):
        """The scaler's current scale as a float32 0-d tensor on `device`, or None (no scaler, or a disabled one)."""
        import torch

        if scaler is None:
            return None
        if not (callable(getattr(scaler, "scale", None)) and callable(getattr(scaler, "is_enabled", None))):
            raise TypeError(f"scaler must be a torch.amp.GradScaler (e.g. torch.amp.GradScaler('cuda')), not "
                            f"{type(scaler).__name__}.")
        if not scaler.is_enabled():
            return None
        return scaler.scale(torch.ones((), dtype=torch.float32, device=device)).float()

    @staticmethod
    def _feature_shapes(features):
        """The shapes the state is sized by with `features=`: the global batch's (the first axis times the number
        of processes); checks that every process has the same shapes (else the gathered Jacobian would not line
        up)."""
        import torch

        from keras_dbmtl.gradients import torch as backend

        shapes = [tuple(int(d) for d in t.shape) for t in features]
        if any(len(s) == 0 for s in shapes):
            raise ValueError(f"features must have a batch axis (their first); got shapes {shapes}.")
        world = backend.num_replicas()
        if world == 1:
            return shapes
        import torch.distributed as dist

        code = zlib.crc32(repr(shapes).encode())
        both = torch.tensor([code, -code], dtype=torch.int64, device=features[0].device)
        dist.all_reduce(both, op=dist.ReduceOp.MAX)             # every process raises, or none
        if int(both[0]) != -int(both[1]):
            raise ValueError(f"features= with several processes needs the same features shapes on every process; "
                             f"this one (rank {backend.replica_rank()}) has {shapes} and another differs: give "
                             "every process a shard of the same size (keras_dbmtl.distributed.shard_batches, "
                             "DataLoader(drop_last=True)).")
        return [(s[0] * world,) + s[1:] for s in shapes]

    def _prepare(self, names, shapes):
        if not self.balancer.built:
            balancing.build(self.balancer, names, shapes)
            if self.balancer.trainable_variables:
                warnings.warn(
                    f"{type(self.balancer).__name__}'s learned parameters were created by this first backward: they "
                    "are not in your optimizer. Call balancer.build(task_names, shared_parameters) before creating "
                    "the optimizer and add balancer.parameters() to it.", UserWarning, stacklevel=3)
            self.task_names, self._shapes = names, shapes
        else:
            self._check_build(names, shapes)
            if self.task_names is None or (self.task_names != names and not self._keyed):
                self.task_names = names
            self._shapes = shapes if self._shapes is None else self._shapes

    def _task_parameters(self, values, shared, given, features):
        """The non-shared parameters to give gradients to (found once) and the check that every shared one is
        reached."""
        shared_ids = {id(t) for t in shared}
        if given is not None:
            if not self._shared_checked:
                self._check_reached(shared, _reached_leaves(features if features is not None else values), features)
            flat = []
            for item in (given if not hasattr(given, "shape") else [given]):
                flat.extend([item] if hasattr(item, "shape") else list(item))
            return [t for t in unique(flat) if id(t) not in shared_ids]
        if self._split is not None:
            return self._split
        per_task = [_reached_leaves([v]) for v in values]
        reached = {}
        for leaves in per_task:
            reached.update(leaves)
        below = _reached_leaves(features) if features is not None else None
        self._check_reached(shared, reached if features is None else below, features)
        own = [t for tid, t in reached.items() if tid not in shared_ids and t.requires_grad]
        if features is not None:
            own = [t for t in own if id(t) not in below]  # the trunk's parameters get d_z, not head gradients
        several = [t for t in own if sum(id(t) in leaves for leaves in per_task) > 1]
        if several:
            # Exact for parameters that only one task really depends on (the others' gradients are zero): a
            # compiled graph (torch.compile) is one autograd node, which every task's loss reaches.
            warnings.warn(f"{len(several)} parameters (shapes {[tuple(t.shape) for t in several][:5]}) are reached by "
                          "several tasks' losses in the autograd graph but are not in shared_parameters: each gets "
                          "sum_t h_t * (gradient of task t's loss), which is its own task's gradient when only one "
                          "task depends on it (a compiled graph joins the tasks' paths), and the plain sum, not the "
                          "balanced direction, when several do: pass those as shared to balance them, or pass "
                          "task_parameters= to silence this.", UserWarning, stacklevel=3)
        self._split = own
        return own

    def _check_reached(self, shared, reached, features):
        """Every shared parameter is among the `reached` leaves (of the losses; of the features with features=)."""
        unreached = [i for i, t in enumerate(shared) if id(t) not in reached]
        if unreached:
            shapes = [tuple(shared[i].shape) for i in unreached]
            if features is not None:
                raise ValueError(f"shared_parameters {unreached} (shapes {shapes}) are not reached by the features: "
                                 "with features=, pass the parameters the features depend on (the trunk's), or "
                                 "leave shared_parameters out (then: every parameter the features reach).")
            raise ValueError(f"shared_parameters {unreached} (shapes {shapes}) are not reached by any loss: pass "
                             "only parameters the losses depend on (frozen or unused layers out), e.g. "
                             "[p for p in trunk.parameters() if p.requires_grad].")
        self._shared_checked = True

    @staticmethod
    def _accumulate(tensors, gradients):
        import torch

        with torch.no_grad():
            for t, g in zip(tensors, gradients):
                if g is None:
                    continue
                g = g.to(dtype=t.dtype, device=t.device)
                if t.grad is None:
                    # a view of a larger tensor (a piece of a flat direction) gets its own storage
                    t.grad = g.detach().clone() if g._base is not None or not g.is_contiguous() else g.detach()
                else:
                    t.grad.add_(g)

    def _grad(self, outputs, inputs, grad_outputs=None, batched=False):
        import torch

        if not inputs:
            return []
        return list(torch.autograd.grad(outputs, inputs, grad_outputs=grad_outputs, retain_graph=True,
                                        allow_unused=True, is_grads_batched=batched))

    def _vectorized(self, tensors):
        if self.vectorize is not None:
            return bool(self.vectorize)
        return tensors[0].device.type == "cuda"

    def _jacobian(self, transformed, wrt):
        """(T, *shape) blocks of the Jacobian of `transformed` (T,) with respect to `wrt`, float32."""
        import torch

        num = int(transformed.shape[0])
        if self._vectorized(wrt):
            eye = torch.eye(num, dtype=transformed.dtype, device=transformed.device)
            rows = self._grad(transformed, wrt, grad_outputs=eye, batched=True)
            blocks = [None if g is None else g for g in rows]
        else:
            per_task = [self._grad(transformed[t], wrt) for t in range(num)]
            blocks = []
            for i in range(len(wrt)):
                column = [row[i] for row in per_task]
                if all(g is None for g in column):
                    blocks.append(None)
                else:
                    blocks.append(torch.stack([torch.zeros_like(wrt[i]) if g is None else g for g in column]))
        return [torch.zeros((num,) + tuple(t.shape), dtype=torch.float32, device=t.device) if b is None
                else b.float() for b, t in zip(blocks, wrt)]

    def _gradient_level(self, task_losses, shared, task_params, features, scale, names):
        """The Jacobian (on the shared parameters, or on the features), the checks before the balancer sees it
        (tasks without labels, unusable losses, NaN or inf), the balance, then the writes. Returns (task weights,
        head weights), or, for a skipped step, the warning's message (None: a scaler's overflow, no warning)."""
        import torch
        from keras.src.backend.torch.core import get_device

        from keras_dbmtl.gradients import torch as backend

        transformed = task_losses.transformed
        raw = task_losses.raw.detach()
        num = int(transformed.shape[0])
        differentiated = transformed if scale is None else transformed * scale
        wrt = features if features is not None else shared
        blocks = self._jacobian(differentiated, wrt)
        learned = self.parameters()
        # The heads' gradients of sum_t tilde-l_t (the step's own when every head weight is 1) and the learned
        # parameters', in one pull, checked with the Jacobian before the balancer runs.
        pulled = self._grad(differentiated.sum(), list(task_params) + learned)
        if backend.num_replicas() > 1:
            if features is not None:
                blocks = self._gathered(blocks)
                pulled = backend._replica_mean_list(pulled)
            else:
                reduced = backend._replica_mean_list(blocks + pulled)
                blocks, pulled = reduced[: len(blocks)], reduced[len(blocks):]
        if scale is not None:
            blocks = [b.div_(scale.to(b.device)) for b in blocks]  # the balancer sees the unscaled Jacobian
        own, learned_grads = pulled[: len(task_params)], pulled[len(task_params):]
        row_max = self._row_max(blocks, num).to(raw.device)      # NaN or inf, or exactly 0: per task, one pass
        candidates = torch.logical_and(raw == 0, row_max == 0)   # perhaps without labels (their own gradients?)
        invalid = self.balancer.invalid_losses(raw).to(raw.device)
        finite_rows = torch.isfinite(row_max)
        present = [g for g in pulled if g is not None]
        flags = [candidates.any(), invalid.any(), finite_rows.all()]
        if present:
            flags.append(self._all_finite(present).to(raw.device))
        any_candidate, any_invalid, *finite = torch.stack(flags).tolist()  # one host transfer for every check

        labelled = self._labelled(raw, candidates, differentiated, task_params) if any_candidate else None
        if labelled is not None:
            # As in fit: a task without labels is usable (it takes no part), unless no task has labels.
            invalid = torch.logical_and(invalid, torch.logical_or(labelled, torch.logical_not(labelled.any())))
            any_invalid = bool(invalid.any())
        if any_invalid:
            return self._unusable_losses_message(names, invalid)
        if not all(finite):
            if scale is not None:
                return None                                     # an overflow: the scaler backs off
            bad = [n for n, ok in zip(names, finite_rows.tolist()) if not ok]
            return self._non_finite_message(f"in the Jacobian rows of tasks {bad}" if bad else
                                            "in the task parameters' or the balancer's learned parameters' gradients")
        self._check_learned_moved()

        saved = None
        if features is not None:
            # The trunk's backward pass comes after the balancer: its state is restored if that pass overflows.
            saved = backend.snapshot(self.balancer.variables)
        keras_device = get_device()
        balanced = balancing.balance(self.balancer, task_losses, [b.to(keras_device) for b in blocks],
                                     labelled=None if labelled is None else labelled.to(keras_device))
        directions = [d.to(t.device) for d, t in zip(balanced.shared, wrt)]
        if features is not None and backend.num_replicas() > 1:
            rank = backend.replica_rank()
            directions = [d[rank * f.shape[0]: (rank + 1) * f.shape[0]] for d, f in zip(directions, features)]
        if scale is not None:
            directions = [d * scale.to(d.device) for d in directions]
        head_weights = balanced.head_weights
        if head_weights is not None and task_params:
            # sum_t h_t * tilde-l_t restricted to the non-shared parameters: one more pull.
            cotangent = head_weights.to(transformed.device, transformed.dtype)
            own = self._grad(transformed, task_params, grad_outputs=cotangent if scale is None else cotangent * scale)
            own = backend._replica_mean_list(own)
        if features is not None:
            trunk = self._grad(features, shared, grad_outputs=[d.to(f.dtype) for d, f in zip(directions, features)])
            if backend.num_replicas() > 1:
                trunk = self._replica_sum(trunk)                # each process's rows of the global batch
            directions = trunk
        outputs = [g for g in list(directions) + list(own) if g is not None]
        if outputs and not bool(self._all_finite(outputs)):
            if saved is not None:
                with torch.no_grad():
                    for v, old in zip(self.balancer.variables, saved):
                        v.value.copy_(old)
            if scale is not None:
                return None
            return self._non_finite_message("in the balanced step (" + (
                "the trunk's backward pass of the balanced direction; the balancer's state is restored)"
                if features is not None else "the balancer's output from finite gradients; its state took the step)"))
        self._accumulate(shared, directions)
        self._accumulate(task_params, own)
        self._accumulate(learned, learned_grads)
        self._remember_learned(learned, learned_grads)
        return balanced.task_weights, head_weights

    def _labelled(self, raw, candidates, differentiated, task_params):
        """None when every task has labels in this batch, else (T,) bool, False for a task without labels: its raw
        loss exactly 0 and every gradient of it (the Jacobian row, its own parameters') exactly 0, as `fit` decides
        (`TaskJacobian.labelled`). `candidates`: the tasks whose loss and Jacobian row are exactly 0; their own
        parameters' gradients are pulled here (one pull per candidate; rare)."""
        import torch

        from keras_dbmtl.gradients import torch as backend

        indices = candidates.nonzero().flatten().tolist()
        unlabelled = torch.zeros_like(candidates)
        if task_params:
            largest = []
            for t in indices:
                grads = [g for g in self._grad(differentiated[t], task_params) if g is not None]
                largest.append(self._row_max([g.reshape(1, -1).float() for g in grads], 1)[0] if grads else
                               torch.zeros((), device=raw.device))
            largest = backend.replica_mean(torch.stack([m.to(raw.device) for m in largest]))
            for t, m in zip(indices, largest.tolist()):
                unlabelled[t] = m == 0
        else:
            unlabelled[indices] = True
        if not bool(unlabelled.any()):
            return None
        return torch.logical_not(unlabelled)

    @staticmethod
    def _row_max(blocks, num):
        """(T,) max |entry| of each task's row over the (T, ...) blocks (NaN propagates; 0 for an all-zero row)."""
        import torch

        result = torch.zeros(num, dtype=torch.float32, device=blocks[0].device)
        for b in blocks:
            if b.numel():
                flat = b.reshape(num, -1)
                # max(amax, -amin): no |b| temporary, and 10x faster on the CPU than vector_norm(ord=inf)
                row = torch.maximum(flat.amax(dim=1), -flat.amin(dim=1))
                result = torch.maximum(result, row.to(result.device))
        return result

    @staticmethod
    def _all_finite(tensors):
        """Whether every entry of `tensors` is finite (a 0-d bool tensor): their max |entry|, one fused
        `_foreach_norm(ord=inf)` on a GPU; amax and amin per tensor on the CPU, where ord=inf is 10x slower."""
        import torch

        with torch.no_grad():
            tensors = [t.detach() for t in tensors if t.numel()]
            if not tensors:
                return torch.ones((), dtype=torch.bool)
            if tensors[0].device.type == "cuda":
                largest = torch._foreach_norm(tensors, ord=float("inf"))
            else:
                largest = [torch.maximum(t.amax(), -t.amin()) for t in tensors]
            device = largest[0].device
            return torch.isfinite(torch.stack([m.float().to(device) for m in largest])).all()

    @staticmethod
    def _gathered(blocks):
        """The global batch's representation Jacobian from every process's (T, b, ...) blocks: one all_gather,
        the shards in rank order along the batch axis, divided by the number of processes (the global loss is the
        mean of the processes' losses, whose value each one carries)."""
        import torch
        import torch.distributed as dist

        world = dist.get_world_size()
        flat = torch.cat([b.reshape(-1) for b in blocks]).contiguous()
        parts = [torch.empty_like(flat) for _ in range(world)]
        dist.all_gather(parts, flat)
        result, start = [], 0
        for b in blocks:
            size = b.numel()
            result.append(torch.cat([p[start: start + size].reshape(b.shape) for p in parts], dim=1) / world)
            start += size
        return result

    @staticmethod
    def _replica_sum(tensors):
        """The sum over the processes of a list of tensors (None entries kept), one flattened all_reduce per
        dtype."""
        import torch.distributed as dist

        from keras_dbmtl.gradients import torch as backend

        def total(flat):
            dist.all_reduce(flat, op=dist.ReduceOp.SUM)
            return flat

        return backend._flat_collective(tensors, total)

    def _loss_level(self, task_losses, shared, task_params, scale):
        """One backward pass of the combined loss; the balancer's state (which `combine` may advance: DWA's
        history, RLW's random stream) is restored when a gradient is NaN or inf. Returns (task weights, None), or
        the skip message (None: a scaler's overflow)."""
        import torch

        from keras_dbmtl.gradients import torch as backend

        state = list(self.balancer.non_trainable_variables)
        saved = backend.snapshot(state) if state else []
        combined, weights = balancing.combine(self.balancer, task_losses)
        learned = self.parameters()
        everything = unique(list(shared) + list(task_params) + learned)
        grads = self._grad(combined if scale is None else combined * scale.to(combined.device), everything)
        grads = backend._replica_mean_list(grads)
        present = [g for g in grads if g is not None]
        if present and not bool(self._all_finite(present)):
            with torch.no_grad():
                for v, old in zip(state, saved):
                    v.value.copy_(old)
            if scale is not None:
                return None
            return self._non_finite_message("in the combined loss's gradient")
        self._check_learned_moved()
        self._accumulate(everything, grads)
        self._remember_learned(learned, grads[len(everything) - len(learned):])
        return weights, None

    def _remember_learned(self, learned, grads):
        if learned and self._checked_learned == 0 and any(g is not None and bool(g.any()) for g in grads):
            self._learned_before = [t.detach().clone() for t in learned]
            self._checked_learned = 1

    def _check_learned_moved(self):
        import torch

        if self._checked_learned != 1:
            return
        self._checked_learned = 2
        now = self.parameters()
        if all(torch.equal(a, b) for a, b in zip(self._learned_before, now)):
            warnings.warn(f"{type(self.balancer).__name__}'s learned parameters got a gradient at the last step but "
                          "have not moved: add balancer.parameters() to your optimizer (build the balancer first "
                          "with balancer.build(task_names, shared_parameters)).", UserWarning, stacklevel=3)
        self._learned_before = None

    # ------------------------------------------------------------------ hooks
    def after_step(self, losses):
        """The balancer's hook after `optimizer.step()`, for the methods that read the losses again (FAMO): call it
        with the losses of the same batch computed after the update (under `torch.no_grad()`); a dict or list as
        `backward` got, or a callable returning one. Nothing happens for the other methods."""
        import torch

        from keras_dbmtl.balancers import base
        from keras_dbmtl.gradients import torch as backend

        if type(self.balancer).after_step is base.Balancer.after_step or self.last_step_skipped:
            return                                              # (fit runs no hook after a skipped step)
        if self.last_step is None:
            raise RuntimeError("after_step follows a backward: call balancer.backward(losses, ...) and "
                               "optimizer.step() first.")

        def losses_after():
            values = losses() if callable(losses) else losses
            values = list(values.values()) if isinstance(values, collections.abc.Mapping) else list(values)
            if len(values) != len(self.task_names):
                raise ValueError(f"after_step got {len(values)} losses for {len(self.task_names)} tasks.")
            raw = torch.stack([torch.as_tensor(v).detach().float().reshape(()) for v in values])
            return backend.replica_mean(raw)

        self.balancer.after_step(self.last_step.raw, losses_after)

    def on_epoch_end(self, epoch):
        """The balancer's epoch-boundary hook (DWA, IGBv2, STCH read it): call it at the end of every epoch, as
        `fit` does. Nothing happens for the other methods."""
        self.balancer.on_epoch_end(epoch)

    def __repr__(self):
        return f"keras_dbmtl.torch.Balancer({type(self.balancer).__name__}, tasks={self.task_names})"
