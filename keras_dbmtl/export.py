"""Export a saved `.keras` MultiTaskModel as a TensorFlow SavedModel, through the TensorFlow backend.

Keras cannot export a SavedModel from the torch backend; models trained there are exported with:

    KERAS_BACKEND=tensorflow python -m keras_dbmtl.export model.keras served/
"""

import argparse
import os
import sys


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
