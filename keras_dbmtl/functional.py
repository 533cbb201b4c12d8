"""Which variables each task uses, read from a Keras functional graph (`MultiTaskModel(inputs=..., outputs=...)`,
`MultiTaskModel.from_model(model)`).

A functional model records, for every tensor, the layer call that made it (`KerasTensor._keras_history`: the
operation, which of its calls, which of its outputs) and that call's input tensors. Walking that graph from each
task's output back to the model's inputs gives the layers the task's output depends on:

    task_outputs(model)              dict task -> output tensor (dict outputs, or list outputs named by the model)
    task_dependencies(model)         dict task -> the layers (operations) its output depends on
    split_variables(model, ...)      the shared variables (used by two tasks or more) and each task's own
    shared_representation(model, shared)   the last tensor through which every shared variable reaches the outputs
                                     (called with `common_variables(split)`, those every task uses)
    encoder_decoder(model, tensor)   two functional models that share the model's layers: inputs -> tensor, and
                                     tensor (plus the inputs that bypass it) -> outputs

A layer reached from two task outputs or more is shared, and so are its trainable variables: the balancer sees
them in the task Jacobian. A task whose output does not reach a shared variable (a tower used by tasks a and b
but not c is shared; c's output does not depend on it) has a zero row in that variable's block of the Jacobian,
which is what the per-task gradient is. A layer reached from one task's output only is that task's own: its
variables get the gradient of that task's (transformed) loss, times the method's head weight, as the heads of an
`encoder`/`heads` model do. A layer no output reaches is not trained.

A layer is the unit: every trainable variable of a reached layer (a nested model included) counts as used. A
variable two layers hold (weight tying) is used by every task that reaches either layer.

These functions only read the graph; they change no layer.
"""

import collections

import keras

#: `split_variables`' result: `shared`, the shared variables (the model's order); `task`, dict task -> the
#: variables only that task's output depends on; `users`, dict id(variable) -> the tasks whose output depends on it.
Split = collections.namedtuple("Split", ["shared", "task", "users"])

NO_GRAPH = (
    "{what} has no functional graph (it is a subclassed keras.Model, whose call() Keras does not record), so "
    "which task uses which variable cannot be read from it. Pass the variables to balance, "
    "MultiTaskModel.from_model(model, shared_variables=model.trunk.trainable_variables) (every other variable is "
    "then updated from the losses of the tasks that reach it); or build it functionally (keras.Model(inputs, "
    "{{task: output}})); or use keras_dbmtl.MultiTaskModel(encoder=..., heads=...) (with task_layers= for "
    "task-only layers inside the encoder)."
)


def is_functional(model):
    """Whether `model` is a Keras functional model (or Sequential) with a recorded graph."""
    return isinstance(model, keras.Model) and hasattr(model, "_nodes_by_depth") and hasattr(model, "_inputs_struct")


def task_outputs(model):
    """dict task name -> output tensor of the functional `model`, in the model's output order.

    Dict outputs give their keys; list (or tuple) outputs the names of the layers that make them
    (`model.output_names`). Raises a ValueError naming the fix for a single output, outputs of another structure,
    or list outputs whose names repeat (two outputs of one layer)."""
    if isinstance(model, keras.Sequential):
        raise ValueError(f"The Sequential model {model.name!r} has a single output; a multi-task model needs one "
                         "output per task: build it with dict outputs, keras.Model(inputs, {'task_a': out_a, "
                         "'task_b': out_b}).")
    if not is_functional(model):
        raise ValueError(NO_GRAPH.format(what=f"The model {getattr(model, 'name', model)!r}"))
    struct = model._outputs_struct
    if isinstance(struct, dict):
        outputs = dict(struct)
    elif isinstance(struct, (list, tuple)):
        names = list(getattr(model, "output_names", None) or [])
        if len(names) != len(struct) or len(set(names)) != len(names) or not all(names):
            raise ValueError(
                f"The outputs of model {model.name!r} are a list without one distinct name per output (names: "
                f"{names}): the task names cannot be read from it. Build the model with dict outputs, "
                "keras.Model(inputs, {'task_a': out_a, 'task_b': out_b}), or give each output layer its own name."
            )
        outputs = dict(zip(names, struct))
    else:
        raise ValueError(
            f"The model {model.name!r} has a single output; a multi-task model needs one output per task: build "
            "it with dict outputs, keras.Model(inputs, {'task_a': out_a, 'task_b': out_b})."
        )
    for name, tensor in outputs.items():
        if not isinstance(name, str) or not name:
            raise ValueError(f"Task names must be non-empty strings; received {name!r}.")
        if not isinstance(tensor, keras.KerasTensor):
            raise ValueError(
                f"The output of task {name!r} is {type(tensor).__name__}, not one tensor: give each task a single "
                "output tensor."
            )
    if len(outputs) < 2:
        raise ValueError(f"A multi-task model needs two task outputs or more; model {model.name!r} has "
                         f"{list(outputs)}.")
    return outputs


class _Graph:
    """The model's tensors from its outputs back to its inputs: for each tensor (by id), the operation that made it
    (None for an input), its parent tensors, and its depth (longest path from an input)."""

    def __init__(self, model):
        inputs = {id(t) for t in model.inputs}
        self.tensor, self.operation, self.parents, self.order = {}, {}, {}, []
        stack = [(t, False) for t in reversed(model.outputs)]
        while stack:
            tensor, finished = stack.pop()
            key = id(tensor)
            if finished:
                self.order.append(key)
                continue
            if key in self.tensor:
                continue
            history = getattr(tensor, "_keras_history", None)
            operation, parents = None, []
            if key not in inputs and history is not None and history.operation is not None:
                node = history.operation._inbound_nodes[history.node_index]
                if not node.is_input:
                    operation, parents = history.operation, list(node.input_tensors)
            self.tensor[key], self.operation[key], self.parents[key] = tensor, operation, [id(p) for p in parents]
            stack.append((tensor, True))
            stack.extend((p, False) for p in reversed(parents) if id(p) not in self.tensor)
        self.depth = {}
        for key in self.order:                        # parents first
            self.depth[key] = 1 + max((self.depth[p] for p in self.parents[key]), default=-1)

    def ancestors(self, tensor, stop=()):
        """The ids of `tensor` and every tensor it depends on, not looking past the ids in `stop`."""
        seen, stack = set(), [id(tensor)]
        while stack:
            key = stack.pop()
            if key in seen:
                continue
            seen.add(key)
            if key not in stop:
                stack.extend(self.parents[key])
        return seen

    def variables(self, key):
        operation = self.operation[key]
        return list(getattr(operation, "trainable_variables", None) or []) if operation is not None else []


def task_dependencies(model):
    """dict task -> the operations (layers, and `keras.ops` calls) that task's output depends on, each once, from
    the inputs to the output. A layer called several times counts once."""
    graph = _Graph(model)
    result = {}
    for task, output in task_outputs(model).items():
        reached = graph.ancestors(output)
        operations, seen = [], set()
        for key in graph.order:
            operation = graph.operation[key]
            if key in reached and operation is not None and id(operation) not in seen:
                seen.add(id(operation))
                operations.append(operation)
        result[task] = operations
    return result


def split_variables(model, shared_variables=None, dependencies=None):
    """The shared variables of the functional `model` and each task's own, as a `Split`.

    Shared: the trainable variables on which two task outputs or more depend; task t's own: those only t's
    output depends on. `shared_variables` (a list of the model's trainable variables) replaces the shared set:
    it may add a variable only one task uses (the other tasks' Jacobian rows are zero for it), but every variable
    two tasks use must stay in it. Raises a ValueError naming the fix when no variable is shared (the tasks are
    separate models), or an entry of `shared_variables` is not a trainable variable of the model or no output
    depends on it.
    """
    dependencies = task_dependencies(model) if dependencies is None else dependencies
    users = {}
    for task, operations in dependencies.items():
        for operation in operations:
            for variable in getattr(operation, "trainable_variables", None) or []:
                tasks = users.setdefault(id(variable), [])
                if task not in tasks:
                    tasks.append(task)
    ordered = [v for v in model.trainable_variables if id(v) in users]
    if shared_variables is None:
        shared_ids = {id(v) for v in ordered if len(users[id(v)]) > 1}
        if not shared_ids:
            raise ValueError(
                f"No trainable variable of model {model.name!r} is used by more than one task output: the tasks "
                f"{list(dependencies)} are fully separate models, and there is nothing to balance. Share layers "
                "between the tasks' outputs (a trunk), or pass shared_variables=[...] to name the variables to "
                "balance."
            )
    else:
        shared_ids = _check_shared(model, list(shared_variables), users)
    task_own = {task: [] for task in dependencies}
    for variable in ordered:
        if id(variable) not in shared_ids:
            task_own[users[id(variable)][0]].append(variable)
    shared = [v for v in ordered if id(v) in shared_ids]
    return Split(shared, task_own, users)


def _check_shared(model, shared_variables, users):
    trainable = {id(v) for v in model.trainable_variables}
    names = lambda variables: [getattr(v, "path", getattr(v, "name", repr(v))) for v in variables]  # noqa: E731
    if not shared_variables:
        raise ValueError("shared_variables=[] names no variable; leave it out to find the shared variables from "
                         "the graph.")
    foreign = [v for v in shared_variables if id(v) not in trainable]
    if foreign:
        raise ValueError(
            f"shared_variables has entries that are not trainable variables of model {model.name!r}: "
            f"{names(foreign)}. Pass variables of the model (e.g. model.get_layer('trunk').trainable_variables)."
        )
    unreached = [v for v in shared_variables if id(v) not in users]
    if unreached:
        raise ValueError(
            f"No task output depends on the shared_variables {names(unreached)}: they would never get a gradient. "
            "Remove them from shared_variables."
        )
    shared_ids = {id(v) for v in shared_variables}
    missing = [v for v in model.trainable_variables if id(v) in users and len(users[id(v)]) > 1
               and id(v) not in shared_ids]
    if missing:
        raise ValueError(
            f"The variables {names(missing)} are used by several tasks "
            f"({sorted({t for v in missing for t in users[id(v)]})}) but are not in shared_variables; a variable "
            "outside shared_variables must belong to one task. Add them to shared_variables (or leave "
            "shared_variables out: the graph gives the shared variables)."
        )
    return shared_ids


def common_variables(split):
    """The shared variables that every task's output depends on (the trunk's), in the split's order: the
    representation is found for them; a shared variable some tasks only use (a tower after the branch) lies after
    it, in the decoder."""
    tasks = set(split.task)
    return [v for v in split.shared if set(split.users.get(id(v), ())) == tasks]


def shared_representation(model, shared_variables, representation=None):
    """The representation z for `task_gradients="representation"`: a tensor of `model`'s graph through which every
    path from a shared variable to a task output passes (so that the outputs are a function of z and of task
    variables only, and z a function of the inputs and the shared variables).

    Without `representation`, the deepest such tensor (nearest the outputs). `representation` names one: a layer
    name (a layer called once, with one output) or a tensor of the graph; it is checked. Raises a ValueError
    naming the fix when there is none (a shared variable after the branch, e.g. a tower used by some tasks only,
    or a skip connection that carries a shared layer's output around it)."""
    graph = _Graph(model)
    outputs = task_outputs(model)
    shared_ids = {id(v) for v in shared_variables}
    holds_shared = {key: any(id(v) in shared_ids for v in graph.variables(key)) for key in graph.order}
    carries, cuts = {}, {}
    for key in graph.order:
        carried = [p for p in graph.parents[key] if carries[p]]
        carries[key] = holds_shared[key] or bool(carried)
        if holds_shared[key]:
            cuts[key] = {key}
        elif carried:
            cuts[key] = {key} | set.intersection(*(cuts[p] for p in carried))
    common = None
    for output in outputs.values():
        if carries[id(output)]:
            common = set(cuts[id(output)]) if common is None else common & cuts[id(output)]
    common = (common or set()) - {id(o) for o in outputs.values()}
    if representation is None:
        if not common:
            raise ValueError(
                f"Model {model.name!r} has no single tensor through which every shared variable reaches the task "
                "outputs (a layer used by some tasks but not all sits after the branch, or a skip connection goes "
                "around the trunk's last layer), so task_gradients='representation' has no representation. "
                "Name one with representation='layer_name', or use task_gradients='parameters'."
            )
        return graph.tensor[max(common, key=lambda k: graph.depth[k])]
    key = id(_named_tensor(model, graph, representation))
    if key not in common:
        raise ValueError(
            f"representation={_describe(representation)} is not a tensor through which every shared variable "
            "reaches every task output: a shared layer lies after it, or a path goes around it. Name a later "
            "layer of the trunk (before the graph branches into layers some tasks do not use), or use "
            "task_gradients='parameters'."
        )
    return graph.tensor[key]


def representation_name(model, representation):
    """The layer name that `representation` (a layer name or a tensor of `model`'s graph) stands for."""
    if representation is None or isinstance(representation, str):
        return representation
    graph = _Graph(model)
    key = id(_named_tensor(model, graph, representation))
    return graph.operation[key].name


def _describe(representation):
    return repr(representation) if isinstance(representation, str) else f"<tensor {representation.name!r}>"


def _named_tensor(model, graph, representation):
    if isinstance(representation, keras.KerasTensor):
        key = id(representation)
        if key not in graph.tensor or graph.operation[key] is None:
            raise ValueError(f"representation={_describe(representation)} is not a tensor inside the model's graph "
                             "(between its inputs and its outputs).")
        operation = graph.operation[key]
        if sum(1 for k in graph.order if graph.operation[k] is operation) != 1:
            raise ValueError(f"representation: the layer {operation.name!r} that makes this tensor is called more "
                             "than once or has several outputs; wrap the representation in a layer of its own.")
        return representation
    if not isinstance(representation, str):
        raise ValueError(f"representation must be a layer name or a tensor of the model; received "
                         f"{representation!r}.")
    keys = [k for k in graph.order if graph.operation[k] is not None and graph.operation[k].name == representation]
    if not keys:
        names = sorted({graph.operation[k].name for k in graph.order if graph.operation[k] is not None})
        raise ValueError(f"representation={representation!r} names no layer of the model's graph; its layers: "
                         f"{names[:50]}.")
    if len(keys) > 1:
        raise ValueError(f"representation={representation!r}: that layer is called more than once or has several "
                         "outputs; wrap the representation in a layer of its own.")
    return graph.tensor[keys[0]]


def encoder_decoder(model, representation):
    """Two functional models sharing `model`'s layers (and variables): `encode` (the model's inputs -> the tensor
    `representation`), `decode` ([representation, *bypass] -> list of the task outputs, in task order), and
    `bypass`, the positions in the model's flattened inputs of those that reach an output without passing through
    the representation (`decode` takes them after it)."""
    outputs = task_outputs(model)
    graph = _Graph(model)
    reached = set()
    for output in outputs.values():
        reached |= graph.ancestors(output, stop={id(representation)})
    flat_inputs = list(model.inputs)
    bypass = [i for i, tensor in enumerate(flat_inputs) if id(tensor) in reached]
    encode = keras.Model(model._inputs_struct, representation, name=f"{model.name}_encode")
    decode = keras.Model([representation] + [flat_inputs[i] for i in bypass], list(outputs.values()),
                         name=f"{model.name}_decode")
    return encode, decode, bypass


def variable_references(model, variables):
    """`variables` (trainable variables of `model`'s layers) as `{"layer": name, "index": i}` dicts: the i-th
    trainable variable of the graph's layer `name`; what a saved config holds (`resolve_variables` reads it)."""
    owners = {}
    for layer in model.layers:
        for index, variable in enumerate(layer.trainable_variables):
            owners.setdefault(id(variable), {"layer": layer.name, "index": index})
    missing = [getattr(v, "path", repr(v)) for v in variables if id(v) not in owners]
    if missing:
        raise ValueError(f"shared_variables has entries that are not trainable variables of model {model.name!r}: "
                         f"{missing}. Pass variables of the model (e.g. model.get_layer('trunk').trainable_variables).")
    return [owners[id(v)] for v in variables]


def resolve_variables(model, entries):
    """The variables that `entries` name: variables as they are, `{"layer": name, "index": i}` dicts
    (`variable_references`) as the i-th trainable variable of that layer."""
    result = []
    for entry in entries:
        if isinstance(entry, dict) and set(entry) == {"layer", "index"}:
            try:
                result.append(model.get_layer(entry["layer"]).trainable_variables[int(entry["index"])])
            except (ValueError, IndexError) as error:
                raise ValueError(f"shared_variables entry {entry} names no trainable variable of model "
                                 f"{model.name!r}.") from error
        elif isinstance(entry, keras.Variable):
            result.append(entry)
        else:
            raise ValueError(f"shared_variables entries must be variables of the model; received {entry!r}.")
    return result


# ---------------------------------------------------------------------- subclassed models (no graph)
def subclassed_task_names(model, task_names=None):
    """The task names of a subclassed `model` whose call returns a dict {task: output}: `task_names` as given, or
    the keys of its output on one symbolic call (the model must have been called or built, so that its input
    shape is known)."""
    if task_names is not None:
        names = list(task_names)
    else:
        shapes = getattr(model, "_build_shapes_dict", None)
        if not model.built or not shapes:
            raise ValueError(
                f"The subclassed model {model.name!r} has not been called yet, so its task names (the keys of "
                "its output dict) are unknown: call it once on a batch (or model.build(input_shape)) first, or "
                "pass task_names=[...]."
            )
        (shape,) = shapes.values() if len(shapes) == 1 else (None,)
        if shape is None:
            raise ValueError(f"The subclassed model {model.name!r} was built with several arguments "
                             f"({sorted(shapes)}): pass task_names=[...].")
        spec = keras.tree.map_shape_structure(lambda s: keras.KerasTensor(tuple(s)), shape)
        outputs = model.compute_output_spec(spec)
        if not isinstance(outputs, dict):
            raise ValueError(f"The subclassed model {model.name!r} returns {type(outputs).__name__}; a multi-task "
                             "model's call must return a dict {task: output}.")
        names = list(outputs)
    for name in names:
        if not isinstance(name, str) or not name:
            raise ValueError(f"Task names must be non-empty strings; received {name!r}.")
    if len(names) < 2 or len(set(names)) != len(names):
        raise ValueError(f"A multi-task model needs two distinct task names or more; received {names}.")
    return names


def check_subclassed_shared(model, shared_variables):
    """`shared_variables` as trainable variables of the subclassed `model` (in the model's order), or a ValueError
    naming the fix."""
    names = lambda variables: [getattr(v, "path", repr(v)) for v in variables]  # noqa: E731
    if not shared_variables:
        raise ValueError("shared_variables=[] names no variable: a subclassed model needs the variables to balance "
                         "(e.g. model.trunk.trainable_variables).")
    trainable = {id(v) for v in model.trainable_variables}
    foreign = [v for v in shared_variables if id(v) not in trainable]
    if foreign:
        raise ValueError(
            f"shared_variables has entries that are not trainable variables of model {model.name!r}: "
            f"{names(foreign)}. Pass variables of the model (e.g. model.trunk.trainable_variables), after the "
            "model has been called once."
        )
    given = {id(v) for v in shared_variables}
    return [v for v in model.trainable_variables if id(v) in given]
