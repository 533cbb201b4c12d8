"""What every balancer is, and its three kinds.

A balancer turns the T task losses (and, for gradient-level methods, the T x P task Jacobian of the shared
variables) into one update. It is a small transformation with explicit state. The model hands it a `TaskLosses`
record: the raw losses (float32, of the global batch) and the transformed ones (`transform_losses`, e.g.
log(loss + eps)); a method reads whichever its paper uses and nothing is un-transformed. The kind is the class:

- `LossBalancer` (EW, GLS, UW, DWA, ...): `combine_losses(losses) -> (scalar, task_weights)`. The model
  differentiates the scalar once with respect to every trainable variable. No per-task gradients are computed.
- `GramianBalancer` (MGDA, IMTL-G, CAGrad, ...): `aggregate(losses, jacobian) -> Aggregation` reading only
  `jacobian.gramian()` / `jacobian.norms()` (T x T); the shared direction is w^T J, formed block by block.
- `JacobianBalancer` (DB-MTL, MoCo, MTAdam, ...): `aggregate(losses, jacobian)` reading the T x P Jacobian
  (`jacobian.matrix()` or `jacobian.blocks`); it may return the flat shared direction (P,).

The model forms one `TaskJacobian` per step; its Gramian is computed at most once (the logged gradient norms
read the same one).

Head (task-specific) variables are updated from the gradient of their own task's transformed loss, multiplied by
`head_weights[t]` (1 for most methods; MGDA-style methods weight the heads too).

What else a method may need, through the interface (nothing is special-cased in the model):
- learned variables (UW, GradNorm, IMTL): `add_weight(..., trainable=True)` in `build`; the model's optimizer
  updates them with the gradient of the combined loss (loss level) or of sum_t transformed_losses[t];
- a forward pass after the update (FAMO): override `after_step(raw_losses, losses_after)`, where
  `losses_after()` runs that forward pass on the same batch; the default does nothing (and runs nothing);
- an epoch boundary (DWA, IGBv2, STCH): `on_epoch_end(epoch)`.

State lives in Keras variables created with `add_weight` in `build(num_tasks, num_shared_parameters, task_names,
shared_shapes)`, so the model tracks them: they are saved in `.keras` files, restored by `BackupAndRestore`, and
threaded through the JAX stateless train step. A balancer is a `keras.layers.Layer` only for that tracking; it is
never called on tensors.
"""

import collections
import math

import keras
from keras import ops

from keras_dbmtl.balancers._checks import check_hyperparameters

LOSS_TRANSFORMS = (None, "log")


class TaskLosses(collections.namedtuple("TaskLosses", ["raw", "transformed"])):
    """The task losses a balancer sees, both (T,) float32: `raw` as the loss functions return them (times
    `compile(loss_weights=...)`), `transformed` after the balancer's `transform_losses` (what is differentiated).
    A named tuple, so it passes through `jax.vjp` as auxiliary output."""

    def where(self, flag):
        """Both losses where `flag`, zeros elsewhere (keeps NaN out of a balancer on a skipped step)."""
        return TaskLosses(*(ops.where(flag, value, ops.zeros_like(value)) for value in self))


class TaskJacobian:
    """The T x P Jacobian of the task losses with respect to the shared variables, held as one block per variable.

    `blocks[i]` has shape `(T,) + shared_variables[i].shape`. Properties compute what a balancer asks for, and
    nothing else: `gramian()` sums per-block products and never concatenates; `matrix()` concatenates into (T, P).

    `labelled`: None, or (T,) bool, False for a task without labels in this batch (its loss is exactly 0 and all
    its gradients are 0). Such a task contributes nothing to the shared direction and its state stays as it was:
    DB-MTL and the min-norm methods honour it; for the others its zero row is one more task gradient.
    """

    def __init__(self, blocks, num_tasks, labelled=None):
        self.blocks = list(blocks)
        self.num_tasks = num_tasks
        self.labelled = labelled
        self._matrix = None
        self._gramian = None

    @property
    def num_parameters(self):
        total = 0
        for block in self.blocks:
            size = 1
            for dim in block.shape[1:]:
                size *= int(dim)
            total += size
        return total

    def _flat_blocks(self):
        return [ops.reshape(block, (self.num_tasks, -1)) for block in self.blocks]

    def matrix(self):
        """The Jacobian as one (T, P) tensor, variables in order, each flattened row-major."""
        if self._matrix is None:
            self._matrix = ops.concatenate(self._flat_blocks(), axis=1)
        return self._matrix

    def gramian(self):
        """J J^T, shape (T, T), accumulated block by block."""
        if self._gramian is None:
            if self._matrix is not None:
                self._gramian = ops.matmul(self._matrix, ops.transpose(self._matrix))
            else:
                gramian = None
                for flat in self._flat_blocks():
                    product = ops.matmul(flat, ops.transpose(flat))
                    gramian = product if gramian is None else gramian + product
                self._gramian = gramian
        return self._gramian

    def norms(self):
        """Per-task gradient norms ||g_t||, shape (T,)."""
        return ops.sqrt(ops.maximum(ops.diagonal(self.gramian()), 0.0))

    def weighted_sum_blocks(self, weights):
        """sum_t w_t g_t, returned as one tensor per shared variable (no concatenation)."""
        directions = []
        for block in self.blocks:
            shape = ops.shape(block)
            flat = ops.reshape(block, (self.num_tasks, -1))
            directions.append(ops.reshape(ops.matmul(weights[None, :], flat)[0], shape[1:]))
        return directions


class Aggregation:
    """What a gradient-level balancer returns.

    Attributes:
        shared_direction: flat (P,) update direction for the shared variables, or None when the direction is
            `task_weights^T J` (then the model forms it block by block).
        task_weights: (T,) weights reported in the logs (and used for the direction when it is None).
        head_weights: (T,) multipliers of each head's own gradient; ones for most methods.
    """

    def __init__(self, task_weights, shared_direction=None, head_weights=None):
        self.task_weights = task_weights
        self.shared_direction = shared_direction
        self.head_weights = head_weights


class Disclaimed(str):
    """A property a balancer declares it does not have, with the reason: false in a test, the reason as text.

    `amortisable = Disclaimed("an element-wise random mask of the gradients, not task weights")`
    """

    def __bool__(self):
        return False


class Balancer(keras.layers.Layer):
    """Base class of all balancers.

    Args:
        loss_transform: `None` (losses as they are) or `"log"`: every task loss becomes `log(loss + eps)`
            (DB-MTL's loss-scale balancing, Section 3.1), composable with every method.
        eps: the epsilon of the log transform.
    """

    #: Whether the model computes per-task gradients for this balancer (set by the kind; see the module docstring).
    uses_task_gradients = False
    #: Whether `compile(loss_weights=...)` has a meaning with this balancer (static weights on the raw losses).
    accepts_loss_weights = False
    #: Whether one task with a loss but an exactly zero shared gradient (a dead ReLU branch) stops every task (the
    #: min-norm point is zero: MGDA, Nash-MTL); `fit` then warns once, naming the task (callbacks.TaskReport).
    stalls_on_zero_gradient = False

    # What a balancer can do, declared on its class and read by the library and the tests: each registered balancer
    # declares (True, or a description of how) or disclaims (`Disclaimed(reason)`) every one of these; None is
    # "not declared" (tests/balancers/test_properties.py fails on it; for an unregistered balancer the library
    # falls back to what its kind allows).
    #: T = 1 gives the plain gradient of the one task's loss (tests/balancers/test_properties.py).
    plain_single_task = None
    #: Permuting the tasks permutes the weights (deterministic, no anchor task).
    permutation_equivariant = None
    #: `compile(task_gradients_every=k > 1)`: the direction is a weighted sum of the task gradients (or of a state
    #: built from them), so the last refresh's weights can stand in between refreshes; the value says how.
    amortisable = None
    #: `compile(task_gradients="representation")`: only the T x T Gramian is read and no balancer variable is
    #: learned, so the Jacobian over the encoder's output can replace the one over the shared parameters.
    representation_level = None

    def __init__(self, loss_transform=None, eps=1e-8, **kwargs):
        kwargs.setdefault("dtype", "float32")
        super().__init__(**kwargs)
        check_hyperparameters(self, loss_transform=(loss_transform, LOSS_TRANSFORMS), eps=(eps, "(0, inf)"))
        self.loss_transform = loss_transform
        self.eps = float(eps)
        self.num_tasks = None
        self.num_shared_parameters = None
        self.shared_shapes = None
        self.task_names = None

    # ------------------------------------------------------------------ state
    def build(self, num_tasks, num_shared_parameters, task_names=None, shared_shapes=None):
        """Create the state variables. Subclasses call super().build(...) and then `add_weight`.

        `shared_shapes`: the shapes of the shared variables, in the order of the Jacobian's blocks (default: one
        flat variable of `num_shared_parameters` entries), for state kept per variable.
        """
        self.num_tasks = int(num_tasks)
        self.num_shared_parameters = int(num_shared_parameters)
        self.task_names = list(task_names) if task_names is not None else None
        if shared_shapes is None:
            shared_shapes = [(self.num_shared_parameters,)]
        self.shared_shapes = [tuple(int(d) for d in shape) for shape in shared_shapes]
        if sum(math.prod(shape) for shape in self.shared_shapes) != self.num_shared_parameters:
            raise ValueError(f"shared_shapes {self.shared_shapes} do not hold {num_shared_parameters} parameters.")
        self.iterations = self.add_weight(
            shape=(), dtype="int32", initializer="zeros", trainable=False, name="iterations"
        )
        self.built = True

    def state_variable(self, shape, name, initializer="zeros", dtype="float32"):
        return self.add_weight(
            shape=shape, dtype=dtype, initializer=initializer, trainable=False, name=name
        )

    def next_step(self):
        """Increments the step counter and returns k, counting from 1 (as a float32 scalar)."""
        self.iterations.assign_add(ops.cast(1, "int32"))
        return ops.cast(self.iterations, "float32")

    # ------------------------------------------------------------------ losses
    def transform_losses(self, task_losses):
        """The loss transform of Section 3.1; identity when `loss_transform` is None."""
        if self.loss_transform == "log":
            return ops.log(task_losses + self.eps)
        return task_losses

    def task_losses(self, raw_losses):
        """The `TaskLosses` record of the raw (T,) losses: what `combine_losses` and `aggregate` receive."""
        return TaskLosses(raw_losses, self.transform_losses(raw_losses))

    def invalid_losses(self, raw_losses):
        """(T,) bool: the losses this balancer cannot use (not finite; not positive under the log transform)."""
        invalid = ops.logical_not(ops.isfinite(raw_losses))
        if self.loss_transform == "log":
            invalid = ops.logical_or(invalid, raw_losses <= 0.0)
        return invalid

    def untransform_losses(self, transformed_losses):
        """The inverse of `transform_losses` (not used by the train step: balancers read `TaskLosses.raw`)."""
        if self.loss_transform == "log":
            return ops.exp(transformed_losses) - self.eps
        return transformed_losses

    def on_epoch_end(self, epoch):
        """Hook for methods that need an epoch boundary (DWA). Called by the model's fit loop."""

    def after_step(self, raw_losses, losses_after):
        """Called after the optimizer update of every applied step. `losses_after()` runs one more forward pass
        on the same batch (training mode, no gradient) and returns its raw losses: a method calls it only if it
        needs it (FAMO); the default does nothing."""

    # ------------------------------------------------------------------ saving
    # Keras saves a layer's variables but not the state of its SeedGenerators: balancers with random draws (RLW,
    # PCGrad's task order, GradDrop, ...) store it too, so a restored model continues the same random stream.
    def save_own_variables(self, store):
        super().save_own_variables(store)
        for i, generator in enumerate(getattr(self, "_seed_generators", [])):
            store[f"seed_generator_{i}"] = generator.state

    def load_own_variables(self, store):
        seeds = {key: store[key] for key in store.keys() if str(key).startswith("seed_generator_")}
        super().load_own_variables({key: store[key] for key in store.keys() if key not in seeds})
        for i, generator in enumerate(getattr(self, "_seed_generators", [])):
            if f"seed_generator_{i}" in seeds:
                generator.state.assign(seeds[f"seed_generator_{i}"])

    # ------------------------------------------------------------------ config
    def get_config(self):
        config = super().get_config()
        for key in ("trainable", "dtype", "name"):
            config.pop(key, None)
        config.update({"loss_transform": self.loss_transform, "eps": self.eps})
        return config

    def call(self, *args, **kwargs):  # pragma: no cover - never called on tensors
        raise TypeError("A balancer is not called on tensors; compile a MultiTaskModel with it.")


class LossBalancer(Balancer):
    """A loss-level method: weights on the losses, one backward pass of `combine_losses`."""

    uses_task_gradients = False
    amortisable = Disclaimed("loss level: one backward pass per step already, no per-task gradients")
    representation_level = Disclaimed("loss level: no per-task gradients")

    def combine_losses(self, losses):
        """`losses`: a `TaskLosses` record. Returns (scalar loss to differentiate, (T,) task weights to log)."""
        raise NotImplementedError(f"{type(self).__name__} must implement combine_losses.")


class GramianBalancer(Balancer):
    """A gradient-level method that reads only the T x T Gramian of the task gradients."""

    uses_task_gradients = True

    def aggregate(self, losses, task_jacobian):
        """`losses`: `TaskLosses`; `task_jacobian`: `TaskJacobian` (use `gramian()` / `norms()` only). Returns an
        `Aggregation` with `task_weights` (and no `shared_direction`: the model forms w^T J block by block)."""
        raise NotImplementedError(f"{type(self).__name__} must implement aggregate.")


class JacobianBalancer(Balancer):
    """A gradient-level method that reads the T x P task Jacobian itself."""

    uses_task_gradients = True
    representation_level = Disclaimed("reads the T x P Jacobian or keeps state over the shared parameters, which "
                                      "has no meaning over the representation gradients of different batches")

    def aggregate(self, losses, task_jacobian):
        """`losses`: `TaskLosses`; `task_jacobian`: `TaskJacobian`. Returns an `Aggregation`, with the flat (P,)
        `shared_direction` or None (then w^T J)."""
        raise NotImplementedError(f"{type(self).__name__} must implement aggregate.")


KINDS = (LossBalancer, GramianBalancer, JacobianBalancer)
