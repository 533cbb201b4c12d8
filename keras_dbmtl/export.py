"""Export of a MultiTaskModel (`model.export(...)` calls `prepare` first) and the command that exports a saved
`.keras` MultiTaskModel as a TensorFlow SavedModel, through the TensorFlow backend.

Keras cannot export a SavedModel from the torch backend; models trained there are exported with:

    KERAS_BACKEND=tensorflow python -m keras_dbmtl.export model.keras served/
"""

import argparse
import os
import sys


def prepare(model, format, input_signature=None):
    """What `model.export(filepath, format, ...)` needs before Keras' own export: a clear error on torch (no
    tf_saved_model there), and one eager call on JAX or after loading a `.keras` file."""
    import keras

    backend = keras.backend.backend()
    if backend == "torch" and format == "tf_saved_model":
        raise ValueError(
            "Keras cannot export a tf_saved_model from the torch backend. Save the model with "
            "model.save('model.keras'), then export it through the TensorFlow backend:\n"
            "    KERAS_BACKEND=tensorflow python -m keras_dbmtl.export model.keras served/"
        )
    if format == "tf_saved_model" and input_signature is None and (
        backend == "jax" or not getattr(model, "_called", False)
    ):
        # JAX needs one eager call before exporting, and so does a model just loaded from a .keras file.
        _eager_call(model)


def _eager_call(model):
    from keras import ops
    import keras

    shapes = getattr(model, "_build_shapes_dict", None)
    if not shapes:
        raise ValueError("Call or fit the model once before exporting it.")
    shape = next(iter(shapes.values()))

    def zeros(s):
        return ops.zeros(tuple(1 if d is None else d for d in s))

    if model.per_task_inputs:
        model({t: zeros(shape[t]) for t in model.task_names})
    else:
        model(keras.tree.map_shape_structure(zeros, shape))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", help="path of a .keras file saved with model.save(...)")
    parser.add_argument("output", help="directory to write the SavedModel to")
    args = parser.parse_args(argv)
    if "keras" in sys.modules and os.environ.get("KERAS_BACKEND") not in (None, "tensorflow"):
        raise SystemExit("Run this command with KERAS_BACKEND=tensorflow.")
    os.environ["KERAS_BACKEND"] = "tensorflow"
    import keras

    import keras_dbmtl  # noqa: F401  (registers the classes)

    if keras.backend.backend() != "tensorflow":
        raise SystemExit("Run this command with KERAS_BACKEND=tensorflow.")
    model = keras.models.load_model(args.model, compile=False)
    model.export(args.output, format="tf_saved_model")
    print(f"Exported {args.model} to {args.output}")


if __name__ == "__main__":
    main()
