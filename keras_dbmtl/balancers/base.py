"""What every balancer is.

A balancer turns the T task losses (and, for gradient-level methods, the T x P task Jacobian of the shared
variables) into one update. It is a small transformation with explicit state:

    transform_losses(task_losses)            -> transformed losses (T,)         [e.g. log(loss + eps)]
    combine_losses(transformed_losses)       -> scalar loss                     [loss-level methods]
    aggregate(transformed_losses, jacobian)  -> Aggregation(shared_direction,   [gradient-level methods]
                                                            task_weights, head_weights)

Three kinds, declared by `needs`:

- `"losses"`: a loss-level method (EW, GLS, UW, DWA, ...). The model differentiates `combine_losses(...)` once
  with respect to every trainable variable. No per-task gradients are computed.
- `"gramian"`: a gradient-level method that only needs the T x T Gramian J J^T (MGDA, IMTL-G, ...). It returns
  task weights w and the shared direction is w^T J, formed block by block without concatenating J.
- `"jacobian"`: a gradient-level method that needs the task gradients themselves (DB-MTL, PCGrad, ...). It
  returns the flat shared direction (P,).

Head (task-specific) variables are updated from the gradient of their own task's transformed loss, multiplied by
`head_weights[t]` (1 for most methods; MGDA-style methods weight the heads too).

State lives in Keras variables created with `add_weight` in `build(num_tasks, num_shared_parameters)`, so the
model tracks them: they are saved in `.keras` files, restored by `BackupAndRestore`, and threaded through the
JAX stateless train step. A balancer is a `keras.layers.Layer` only for that tracking; it is never called on
tensors.
"""

import keras
from keras import ops

from keras_dbmtl.balancers._checks import check_hyperparameters

LOSS_TRANSFORMS = (None, "log")


class TaskJacobian:
    """The T x P Jacobian of the task losses with respect to the shared variables, held as one block per variable.

    `blocks[i]` has shape `(T,) + shared_variables[i].shape`. Properties compute what a balancer asks for, and
    nothing else: `gramian()` sums per-block products and never concatenates; `matrix()` concatenates into (T, P).
    """

    def __init__(self, blocks, num_tasks):
        self.blocks = list(blocks)
        self.num_tasks = num_tasks
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


class Balancer(keras.layers.Layer):
    """Base class of all balancers.

    Args:
        loss_transform: `None` (losses as they are) or `"log"`: every task loss becomes `log(loss + eps)`
            (DB-MTL's loss-scale balancing, Section 3.1), composable with every method.
        eps: the epsilon of the log transform.
    """

    #: "losses", "gramian" or "jacobian": what the method needs from the model.
    needs = "losses"
    #: Whether `compile(loss_weights=...)` has a meaning with this balancer (static weights on the raw losses).
    accepts_loss_weights = False

    def __init__(self, loss_transform=None, eps=1e-8, **kwargs):
        kwargs.setdefault("dtype", "float32")
        super().__init__(**kwargs)
        check_hyperparameters(self, loss_transform=(loss_transform, LOSS_TRANSFORMS), eps=(eps, "(0, inf)"))
        self.loss_transform = loss_transform
        self.eps = float(eps)
        self.num_tasks = None
        self.num_shared_parameters = None
        self.task_names = None

    # ------------------------------------------------------------------ state
    def build(self, num_tasks, num_shared_parameters, task_names=None):
        """Create the state variables. Subclasses call super().build(...) and then `add_weight`."""
        self.num_tasks = int(num_tasks)
        self.num_shared_parameters = int(num_shared_parameters)
        self.task_names = list(task_names) if task_names is not None else None
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

    def untransform_losses(self, transformed_losses):
        """The inverse of `transform_losses`: the raw task losses (for methods whose statistics use raw losses)."""
        if self.loss_transform == "log":
            return ops.exp(transformed_losses) - self.eps
        return transformed_losses

    def combine_losses(self, transformed_losses):
        """Loss-level methods: the scalar that is differentiated once. Returns (loss, task_weights)."""
        raise NotImplementedError(f"{type(self).__name__} is not a loss-level balancer.")

    def aggregate(self, transformed_losses, task_jacobian):
        """Gradient-level methods: returns an `Aggregation`."""
        raise NotImplementedError(f"{type(self).__name__} is not a gradient-level balancer.")

    def on_epoch_end(self, epoch):
        """Hook for methods that need an epoch boundary (DWA). Called by the model's fit loop."""

    # Methods that need the task losses of the same mini-batch after the update (FAMO) set this to True: the
    # model's train step then makes one more forward pass after the optimizer step and calls `update_after_step`.
    needs_losses_after_update = False

    def update_after_step(self, losses_before, losses_after):
        """Hook for `needs_losses_after_update`: raw task losses of the batch before and after the update."""

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
