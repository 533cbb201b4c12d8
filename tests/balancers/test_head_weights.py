"""Head weights (issue 16): for the methods whose papers weight the heads (MGDA, GradNorm, Nash-MTL), one `fit`
step with plain SGD moves each head by -lr * (the paper's weight of its task) * (its own task's gradient).

Everything is recomputed here in float64 numpy from the tiny model's weights: the forward pass, the per-task
gradients of the shared encoder and of the heads, and each paper's weights from them."""

import keras
import numpy as np
import pytest
from scipy.optimize import fsolve

from keras_dbmtl import MultiTaskModel
from keras_dbmtl.balancers import MGDA, GradNorm, NashMTL

LEARNING_RATE = 0.1
TASKS = ("a", "b")


def _data():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(16, 4)).astype("float32")
    y = {"a": rng.normal(size=(16, 1)).astype("float32"), "b": (3.0 * rng.normal(size=(16, 1))).astype("float32")}
    return x, y


def _model(balancer):
    keras.utils.set_random_seed(0)
    encoder = keras.layers.Dense(5, activation="relu")
    heads = {t: keras.layers.Dense(1) for t in TASKS}
    model = MultiTaskModel(encoder=encoder, heads=heads)
    model.compile(optimizer=keras.optimizers.SGD(LEARNING_RATE), loss="mse", balancer=balancer)
    return model, encoder, heads


def _numpy(variable):
    return np.asarray(keras.ops.convert_to_numpy(variable), "float64")


def _gradients(x, y, encoder, heads):
    """Per task: loss, gradient of the shared variables (flat), gradient of the head kernel and bias."""
    kernel, bias = _numpy(encoder.kernel), _numpy(encoder.bias)
    pre = x @ kernel + bias
    hidden = np.maximum(pre, 0.0)
    out = {}
    for t in TASKS:
        head_kernel, head_bias = _numpy(heads[t].kernel), _numpy(heads[t].bias)
        residual = hidden @ head_kernel + head_bias - y[t]
        loss = np.mean(residual ** 2)
        d_pred = 2.0 * residual / residual.size
        d_pre = (d_pred @ head_kernel.T) * (pre > 0)
        shared = np.concatenate([(x.T @ d_pre).ravel(), d_pre.sum(0)])
        out[t] = (loss, shared, hidden.T @ d_pred, d_pred.sum(0))
    return out


def _check_head_updates(balancer, paper_weights, prepare=None):
    x, y = _data()
    model, encoder, heads = _model(balancer)
    model(x[:1])
    if prepare is not None:
        prepare(model)
    x64, y64 = x.astype("float64"), {t: v.astype("float64") for t, v in y.items()}
    gradients = _gradients(x64, y64, encoder, heads)
    before = {t: (_numpy(heads[t].kernel), _numpy(heads[t].bias)) for t in TASKS}
    model.fit(x, y, batch_size=16, epochs=1, shuffle=False, verbose=0)
    weights = paper_weights(gradients)
    for i, t in enumerate(TASKS):
        _, _, kernel_gradient, bias_gradient = gradients[t]
        np.testing.assert_allclose(_numpy(heads[t].kernel), before[t][0] - LEARNING_RATE * weights[i] * kernel_gradient,
                                   rtol=1e-4, atol=1e-6)
        np.testing.assert_allclose(_numpy(heads[t].bias), before[t][1] - LEARNING_RATE * weights[i] * bias_gradient,
                                   rtol=1e-4, atol=1e-6)


def test_mgda_heads_get_the_min_norm_weights():
    def paper(gradients):                                            # Eq. (3), "loss+": g_t / (l_t ||g_t||)
        v = [g[1] / (g[0] * np.linalg.norm(g[1])) for g in (gradients[t] for t in TASKS)]
        w1 = np.clip(v[1] @ (v[1] - v[0]) / np.sum((v[0] - v[1]) ** 2), 0.0, 1.0)   # min-norm point of a segment
        return [w1, 1.0 - w1]

    _check_head_updates(MGDA(), paper)


def test_nash_mtl_heads_get_alpha():
    def paper(gradients):                                            # G alpha = 1 / alpha (Section 3.1)
        jacobian = np.stack([gradients[t][1] for t in TASKS])
        gram = jacobian @ jacobian.T
        start = 1.0 / np.sqrt(np.diag(gram))
        alpha = fsolve(lambda a: gram @ a - 1.0 / a, start, xtol=1e-14)
        np.testing.assert_allclose(gram @ alpha, 1.0 / alpha, rtol=1e-8)
        return alpha

    _check_head_updates(NashMTL(), paper)


def test_gradnorm_heads_get_the_learned_weights():
    logits = np.array([0.4, -0.2])

    def prepare(model):
        model.balancer.logits.assign(logits.astype("float32"))

    def paper(gradients):                                            # w_t = T softmax(s)_t
        return len(TASKS) * np.exp(logits) / np.sum(np.exp(logits))

    _check_head_updates(GradNorm(), paper, prepare)
