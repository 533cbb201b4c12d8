"""DB-MTL in your own JAX training loop: a pure-JAX MLP, optax, `jax.jit` and `lax.scan`; no Keras model.

    KERAS_BACKEND=jax python examples/jax_optax_loop.py               # ~10 s on a laptop CPU
    KERAS_BACKEND=jax python examples/jax_optax_loop.py --compare-ew  # also equal weights, for the table
    KERAS_BACKEND=jax python examples/jax_optax_loop.py --quick       # a few seconds (what the test runs)

The data is generated here: 12 numeric features per customer; "spend" is a yearly amount in dollars (a regression
whose MSE starts around 1e6) and "churn" a yes/no label (a binary cross-entropy around 0.7), both driven by the
same latent factors plus one of their own. A shared trunk (two dense layers) feeds one head per task. The balancer
is `keras_dbmtl.jax.balancer("dbmtl")`: each step computes the raw losses, the Jacobian of the log-losses on the
trunk and each head's own gradient (`tx.task_jacobian`), the balanced trunk direction and head weights
(`tx.update_with_info`), and hands them to optax as gradients. One epoch is one `lax.scan` over its batches.
"""

import argparse
import os
import time

os.environ.setdefault("KERAS_BACKEND", "jax")          # before keras is imported: the door runs on Keras's JAX

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402

import keras_dbmtl  # noqa: E402

TASKS = ("spend", "churn")


def make_data(n, seed):
    """x (n, 12); spend in dollars (mean ~1000, sd ~300); churn in {0, 1} (about 40 % ones)."""
    rng = np.random.default_rng(seed)
    mixing = np.random.default_rng(0).normal(size=(4, 12))          # fixed: the same task for every split
    latent = rng.normal(size=(n, 4))                                # 2 shared factors, 1 per task
    x = (latent @ mixing + 0.3 * rng.normal(size=(n, 12))).astype("float32")
    shared = np.tanh(latent[:, 0]) + 0.5 * latent[:, 1] ** 2
    spend = 1000.0 + 250.0 * shared + 120.0 * latent[:, 2] + 30.0 * rng.normal(size=n)
    churn_logit = -1.5 * shared + 1.2 * np.sin(2.0 * latent[:, 3]) + 0.8
    churn = (rng.random(n) < 1.0 / (1.0 + np.exp(-churn_logit))).astype("float32")
    return x, {"spend": spend.astype("float32"), "churn": churn}


def init_params(key, hidden=64):
    """The trunk (shared) and one linear head per task, as plain dicts of arrays."""
    def dense(key, fan_in, fan_out):
        return {"kernel": jax.random.normal(key, (fan_in, fan_out)) * jnp.sqrt(2.0 / fan_in),
                "bias": jnp.zeros((fan_out,))}

    keys = jax.random.split(key, 4)
    trunk = {"dense1": dense(keys[0], 12, hidden), "dense2": dense(keys[1], hidden, hidden)}
    heads = {"spend": dense(keys[2], hidden, 1), "churn": dense(keys[3], hidden, 1)}
    heads["spend"]["bias"] = jnp.full((1,), 1000.0)                 # start at the mean spend: a fair start for EW
    return {"trunk": trunk, "heads": heads}


def trunk_apply(trunk, x):
    h = jax.nn.relu(x @ trunk["dense1"]["kernel"] + trunk["dense1"]["bias"])
    return jax.nn.relu(h @ trunk["dense2"]["kernel"] + trunk["dense2"]["bias"])


def predict(params, x):
    z = trunk_apply(params["trunk"], x)
    return {task: (z @ head["kernel"] + head["bias"])[:, 0] for task, head in params["heads"].items()}


def loss_fn(trunk, heads, x, y):
    """The raw task losses, a dict task -> scalar: MSE in dollars squared, binary cross-entropy."""
    out = predict({"trunk": trunk, "heads": heads}, x)
    return {"spend": jnp.mean(jnp.square(out["spend"] - y["spend"])),
            "churn": jnp.mean(optax.sigmoid_binary_cross_entropy(out["churn"], y["churn"]))}


def train(balancer_name, x, y, epochs, batch_size, learning_rate, seed=0):
    """Trains with the door; returns the parameters and per-epoch mean losses and task weights."""
    tx = keras_dbmtl.jax.balancer(balancer_name)
    params = init_params(jax.random.PRNGKey(seed))
    state = tx.init(params["trunk"], task_names=TASKS)               # sized once, outside jit
    optimizer = optax.adam(learning_rate)
    opt_state = optimizer.init(params)

    def step(carry, batch):
        params, opt_state, state = carry
        xb, yb = batch
        raw, jacobian, own = tx.task_jacobian(loss_fn, state, params["trunk"], params["heads"], xb, yb)
        update = tx.update_with_info(jacobian, state, raw)
        grads = {"trunk": update.direction,
                 "heads": keras_dbmtl.jax.scale_task_gradients(own, update.head_weights)}
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return (optax.apply_updates(params, updates), opt_state, update.state), (raw, update.task_weights)

    @jax.jit
    def epoch(carry, xs, ys):
        return jax.lax.scan(step, carry, (xs, ys))

    steps = len(x) // batch_size
    rng = np.random.default_rng(seed)
    history = {"loss": [], "weights": []}
    carry = (params, opt_state, state)
    for _ in range(epochs):
        order = rng.permutation(len(x))[: steps * batch_size].reshape(steps, batch_size)
        xs = jnp.asarray(x[order])
        ys = {task: jnp.asarray(y[task][order]) for task in TASKS}
        carry, (losses, weights) = epoch(carry, xs, ys)
        history["loss"].append(np.asarray(losses).mean(axis=0))
        history["weights"].append(np.asarray(weights).mean(axis=0))
    return carry[0], history


def evaluate(params, x, y):
    out = predict(params, jnp.asarray(x))
    return {"spend_mae": float(jnp.mean(jnp.abs(out["spend"] - y["spend"]))),
            "churn_accuracy": float(jnp.mean((out["churn"] > 0) == (y["churn"] > 0.5)))}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a small run (what the test runs)")
    parser.add_argument("--epochs", type=int, default=None)
    parser.add_argument("--compare-ew", action="store_true", help="also train with equal weights")
    args = parser.parse_args(argv)
    epochs = args.epochs or (2 if args.quick else 20)
    n_train = 1024 if args.quick else 8192
    x, y = make_data(n_train, seed=1)
    x_test, y_test = make_data(2048, seed=2)
    results = {}
    for name in ["dbmtl"] + (["ew"] if args.compare_ew else []):
        start = time.perf_counter()
        params, history = train(name, x, y, epochs, batch_size=128, learning_rate=1e-3)
        results[name] = {"history": history, "test": evaluate(params, x_test, y_test),
                         "seconds": time.perf_counter() - start}
        last = history["loss"][-1]
        print(f"{name:6s} {epochs} epochs in {results[name]['seconds']:.1f} s | train loss spend {last[0]:.4g} "
              f"churn {last[1]:.4g} | task weights {np.round(history['weights'][-1], 4).tolist()} | test "
              f"spend MAE ${results[name]['test']['spend_mae']:.1f}, churn accuracy "
              f"{results[name]['test']['churn_accuracy']:.3f}")
    return results


if __name__ == "__main__":
    main()
