"""Independent float64 numpy re-implementation of the paper's Algorithm 1 (and EW), for the tests.

The model: a linear encoder z = X W + b (shared variables theta = (W, b)) and linear heads
pred_t = z v_t + c_t (task variables psi_t = (v_t, c_t)), MSE task losses, plain SGD.
Nothing here imports keras_dbmtl.
"""

import numpy as np


def linear_mtl_gradients(X, Y, W, b, heads, log_transform, eps=1e-8):
    """Per-task losses and gradients of (log-)losses wrt W, b and each head, all float64."""
    n = X.shape[0]
    z = X @ W + b
    losses, shared_grads, head_grads = [], [], []
    for t, (v, c) in enumerate(heads):
        pred = z @ v + c
        diff = pred - Y[t]
        loss = np.mean(diff**2)
        d_pred = 2.0 * diff / diff.size          # d loss / d pred
        if log_transform:
            d_pred = d_pred / (loss + eps)       # d log(loss + eps) / d pred
        d_z = d_pred @ v.T
        shared_grads.append(np.concatenate([(X.T @ d_z).ravel(), d_z.sum(axis=0)]))
        head_grads.append((z.T @ d_pred, d_pred.sum(axis=0)))
        losses.append(loss)
    return np.array(losses), np.stack(shared_grads), head_grads


def replay(X, Y, W, b, heads, batches, lr, method, beta=0.9, beta_sigma=0.0, scaling="max",
           log_transform=True, l2=0.0, eps=1e-8):
    """Runs SGD over `batches` (index arrays); returns final (W, b, heads), the EMA buffers and per-step weights.

    method: "dbmtl" (Algorithm 1) or "ew" (sum of losses). l2: kernel L2 penalty l2 * sum(W**2) on the encoder,
    added to the shared gradient after balancing.
    """
    W, b = W.astype(np.float64).copy(), b.astype(np.float64).copy()
    heads = [(v.astype(np.float64).copy(), c.astype(np.float64).copy()) for v, c in heads]
    T = len(heads)
    P = W.size + b.size
    ema = np.zeros((T, P))
    weights_per_step = []
    for k, idx in enumerate(batches, start=1):
        losses, G, head_grads = linear_mtl_gradients(
            X[idx], [y[idx] for y in Y], W, b, heads, log_transform and method == "dbmtl", eps
        )
        if method == "dbmtl":
            beta_k = beta / k**beta_sigma
            ema = beta_k * ema + (1 - beta_k) * G
            norms = np.linalg.norm(ema, axis=1)
            alpha = {"max": norms.max(), "min": norms.min(), "mean": norms.mean(),
                     "median": np.median(norms)}[scaling] if isinstance(scaling, str) else scaling
            w = alpha / (norms + eps)
            direction = (w[:, None] * ema).sum(axis=0)
        else:
            w = np.ones(T)
            direction = G.sum(axis=0)
        weights_per_step.append(w)
        grad_W = direction[: W.size].reshape(W.shape) + 2.0 * l2 * W
        grad_b = direction[W.size:]
        W = W - lr * grad_W
        b = b - lr * grad_b
        heads = [(v - lr * gv, c - lr * gc) for (v, c), (gv, gc) in zip(heads, head_grads)]
    return W, b, heads, ema, np.array(weights_per_step)


def dbmtl_replay_with_labels(X, Y, W, b, heads, order, labelled, lr, beta, beta_sigma, eps=1e-8):
    """Algorithm 1 in float64 (SGD) where task t has no labels at step k when `labelled[k][t]` is False: its raw loss
    and gradients are 0, so ema_t keeps its value (Eq. 1 is for the tasks with data), alpha_k = max_t ||ema_t|| and
    the sum of Eq. 2 run over the labelled tasks, and its head is not moved; k counts every step. Returns
    (W, b, heads, ema, per-step task weights)."""
    W, b = W.astype(np.float64), b.astype(np.float64)
    heads = [(v.astype(np.float64), c.astype(np.float64)) for v, c in heads]
    ema = np.zeros((len(heads), W.size + b.size))
    weights = []
    for k, (idx, mask) in enumerate(zip(order, labelled), start=1):
        mask = np.asarray(mask, bool)
        _, G, head_grads = linear_mtl_gradients(X[idx], [y[idx] for y in Y], W, b, heads, True, eps)
        beta_k = beta / k**beta_sigma
        ema = np.where(mask[:, None], beta_k * ema + (1 - beta_k) * G, ema)
        norms = np.linalg.norm(ema, axis=1)
        w = np.where(mask, norms[mask].max() / (norms + eps), 0.0)
        direction = w @ ema
        W, b = W - lr * direction[: W.size].reshape(W.shape), b - lr * direction[W.size:]
        heads = [(v - lr * gv, c - lr * gc) if on else (v, c) for (v, c), (gv, gc), on in zip(heads, head_grads, mask)]
        weights.append(w)
    return W, b, heads, ema, np.array(weights)
