"""The task Jacobian of `keras_dbmtl.gradients.task_gradients`, looped (on JAX and TensorFlow one sequential map over
the one-hot cotangents, SEQUENTIAL_ROWS) and with the rows unrolled in a Python loop, compiled as in the train step,
against the float64 numpy Jacobian of a small tanh network with T weighted MSE heads whose losses and gradients
span orders of magnitude."""

import keras
import numpy as np
import pytest

from keras_dbmtl import gradients

B, D_IN, D_HID = 12, 4, 3


def make_problem(num_tasks, seed=0):
    rng = np.random.default_rng(seed)
    X = rng.normal(size=(B, D_IN)).astype("float32")
    scales = np.logspace(-1, 1, num_tasks) if num_tasks > 1 else np.ones(1)
    Y = [(s * rng.normal(size=(B, 1))).astype("float32") for s in scales]
    weights = np.logspace(-2, 2, num_tasks) if num_tasks > 1 else np.ones(1)   # l_t = weights[t] * MSE_t
    keras.utils.set_random_seed(seed)
    encoder = keras.layers.Dense(D_HID, activation="tanh")
    heads = [keras.layers.Dense(1) for _ in range(num_tasks)]
    encoder.build((None, D_IN))
    for head in heads:
        head.build((None, D_HID))
    return X, Y, weights, encoder, heads


def numpy_gradients(X, Y, weights, encoder, heads):
    """Rows of the Jacobian of the T MSE losses w.r.t. (kernel, bias) of the encoder, and each head's own
    gradient, in float64: l_t = a_t mean((tanh(X W + b) v_t + c_t - y_t)^2)."""
    W, b = (np.asarray(keras.ops.convert_to_numpy(v), np.float64) for v in encoder.weights)
    H = np.tanh(X.astype(np.float64) @ W + b)
    rows, own = [], []
    for head, y, a in zip(heads, Y, weights):
        v, c = (np.asarray(keras.ops.convert_to_numpy(w), np.float64) for w in head.weights)
        d_pred = 2.0 * a * (H @ v + c - y) / len(X)
        d_z = (d_pred @ v.T) * (1.0 - H**2)
        rows.append(np.concatenate([(X.T @ d_z).ravel(), d_z.sum(axis=0)]))
        own.append(np.concatenate([(H.T @ d_pred).ravel(), d_pred.sum(axis=0)]))
    return np.array(rows), own


def compilers():
    """How the train step runs: jax.jit; tf.function as a graph and under XLA; torch eagerly."""
    backend = keras.backend.backend()
    if backend == "jax":
        import jax

        return [jax.jit]
    if backend == "tensorflow":
        import tensorflow as tf

        return [tf.function, lambda f: tf.function(f, jit_compile=True)]
    return [lambda f: f]


def keras_gradients(X, Y, weights, encoder, heads, vectorize, compiler):
    blocks, own = compiler(task_gradients_fn(X, Y, weights, encoder, heads, vectorize))()
    T = len(heads)
    rows = np.concatenate([np.asarray(keras.ops.convert_to_numpy(g), np.float64).reshape(T, -1) for g in blocks],
                          axis=1)
    own = [np.concatenate([np.asarray(keras.ops.convert_to_numpy(g), np.float64).ravel() for g in group])
           for group in own]
    return rows, own


def task_gradients_fn(X, Y, weights, encoder, heads, vectorize):
    x = keras.ops.convert_to_tensor(X)
    ys = [keras.ops.convert_to_tensor(y) for y in Y]

    def forward():
        features = encoder(x)
        losses = keras.ops.stack([float(a) * keras.ops.mean(keras.ops.square(h(features) - y))
                                  for h, y, a in zip(heads, ys, weights)])
        return losses, 0.0, None

    def run():
        result = gradients.task_gradients(forward, encoder.weights, [h.weights for h in heads], vectorize=vectorize)
        return result.shared_blocks, result.task_gradients

    return run


def assert_rows_close(got, expected, rtol):
    for g, e in zip(got, expected):
        np.testing.assert_allclose(g, e, rtol=0, atol=rtol * np.linalg.norm(e))


@pytest.mark.parametrize("compiler_index", [0, 1])
@pytest.mark.parametrize("num_tasks", [1, 11])
def test_every_way_of_pulling_rows_gives_the_numpy_jacobian(num_tasks, compiler_index, monkeypatch):
    if compiler_index >= len(compilers()):
        pytest.skip("one compiled mode on this backend")
    compiler = compilers()[compiler_index]
    problem = make_problem(num_tasks)
    expected_rows, expected_own = numpy_gradients(*problem)
    if num_tasks > 1:   # gradient norms spanning orders of magnitude
        norms = np.linalg.norm(expected_rows, axis=1)
        assert norms.max() / norms.min() > 1e4

    looped, looped_own = keras_gradients(*problem, vectorize=False, compiler=compiler)
    monkeypatch.setattr(gradients.backend_module(), "SEQUENTIAL_ROWS", False, raising=False)
    unrolled, _ = keras_gradients(*problem, vectorize=False, compiler=compiler)
    monkeypatch.undo()

    for rows in (looped, unrolled):
        assert_rows_close(rows, expected_rows, 1e-5)
    assert_rows_close(looped, unrolled, 1e-6)    # the sequential map against the unrolled loop
    assert_rows_close(looped_own, expected_own, 1e-5)


# A convolutional encoder: XLA:CPU runs a convolution inside a while-loop body ~30x slower than outside one
# (benchmarks/RESULTS.md), so JAX and TensorFlow pull its rows unrolled instead of with the sequential map.
L, C, F, K = 7, 2, 3, 3


def make_conv_problem(num_tasks, seed=1):
    rng = np.random.default_rng(seed)
    X = rng.normal(size=(B, L, C)).astype("float32")
    Y = [(s * rng.normal(size=(B, 1))).astype("float32") for s in np.logspace(-1, 1, num_tasks)]
    weights = np.logspace(-2, 2, num_tasks)
    keras.utils.set_random_seed(seed)
    encoder = keras.Sequential([keras.layers.Conv1D(F, K, activation="tanh"), keras.layers.GlobalAveragePooling1D()])
    encoder.build((None, L, C))
    heads = [keras.layers.Dense(1) for _ in range(num_tasks)]
    for head in heads:
        head.build((None, F))
    return X, Y, weights, encoder, heads


def numpy_conv_gradients(X, Y, weights, encoder, heads):
    """l_t = a_t mean((mean_i tanh(conv(X, W)_i + b) v_t + c_t - y_t)^2), conv the valid cross-correlation
    z[n, i, f] = sum_k,c X[n, i + k, c] W[k, c, f]; rows of its Jacobian w.r.t. (W, b), float64."""
    W, b = (np.asarray(keras.ops.convert_to_numpy(v), np.float64) for v in encoder.weights)
    X = X.astype(np.float64)
    out = L - K + 1
    windows = np.stack([X[:, i:i + K, :] for i in range(out)], axis=1)        # (B, out, K, C)
    H = np.tanh(np.einsum("nikc,kcf->nif", windows, W) + b)
    features = H.mean(axis=1)
    rows, own = [], []
    for head, y, a in zip(heads, Y, weights):
        v, c = (np.asarray(keras.ops.convert_to_numpy(w), np.float64) for w in head.weights)
        d_pred = 2.0 * a * (features @ v + c - y) / len(X)
        d_z = (d_pred @ v.T)[:, None, :] / out * (1.0 - H**2)                  # (B, out, F)
        rows.append(np.concatenate([np.einsum("nikc,nif->kcf", windows, d_z).ravel(), d_z.sum(axis=(0, 1))]))
        own.append(np.concatenate([(features.T @ d_pred).ravel(), d_pred.sum(axis=0)]))
    return np.array(rows), own


def loops_in_step(run, compiler_index):
    """Whether the compiled step holds a while loop (None where the backend compiles nothing)."""
    backend = keras.backend.backend()
    if backend == "jax":
        import jax

        text = str(jax.make_jaxpr(run)())
        return "while[" in text or "scan[" in text          # lax.map is a scan: an XLA while loop
    if backend == "tensorflow":
        import tensorflow as tf

        graph = tf.function(run, jit_compile=bool(compiler_index)).get_concrete_function().graph
        return any("While" in op.type for op in graph.get_operations())
    return None


@pytest.mark.parametrize("compiler_index", [0, 1])
def test_a_convolutional_encoder_pulls_its_rows_unrolled_and_exact(compiler_index):
    if compiler_index >= len(compilers()):
        pytest.skip("one compiled mode on this backend")
    compiler = compilers()[compiler_index]
    conv = make_conv_problem(11)
    expected_rows, expected_own = numpy_conv_gradients(*conv)
    norms = np.linalg.norm(expected_rows, axis=1)
    assert norms.max() / norms.min() > 1e3

    rows, own = keras_gradients(*conv, vectorize=False, compiler=compiler)
    assert_rows_close(rows, expected_rows, 1e-5)
    assert_rows_close(own, expected_own, 1e-5)

    dense = make_problem(11)
    conv_loops = loops_in_step(task_gradients_fn(*conv, vectorize=False), compiler_index)
    dense_loops = loops_in_step(task_gradients_fn(*dense, vectorize=False), compiler_index)
    if conv_loops is None:
        pytest.skip("torch pulls rows in a Python loop on every model")
    assert (conv_loops, dense_loops) == (False, True)
