"""The paper's QM9 model in ``keras.ops`` (TensorFlow, PyTorch, JAX).

Shared encoder (``MPNNEncoder``), as in the reference (Nash-MTL / LibMTL):

    node embedding  Dense(dim) + ReLU
    3 x [ edge-conditioned convolution (edge network Dense(edge_hidden) + ReLU
          -> Dense(dim*dim), mean aggregation, root weight + bias), ReLU,
          GRU cell update ]            (conv and GRU weights shared by the 3 steps)
    Set2Set readout, 3 processing steps (output 2*dim)
    Dense(out_dim) + ReLU              -> the shared representation
Heads: one linear ``Dense(1)`` per target.

Inputs are disjoint-mode batches (``applications.qm9.data.collate``): a dict
with ``nodes`` (N, 11), ``edges`` (E, 5), ``edge_src``/``edge_dst`` (E,),
``node_graph`` (N,) (graph of each node; padding nodes belong to graph B) and
``graph_mask`` (B,), whose static length B is the number of graphs.

The edge network depends only on the edge features, which do not change over
the 3 message-passing steps, and its weights are shared by the steps, so its
output (the per-edge dim x dim kernels) is computed once per forward pass and
reused: the same function as the reference, which re-evaluates it every step,
at a third of the cost.
"""

from __future__ import annotations

import keras
from keras import ops


@keras.saving.register_keras_serializable(package="keras_dbmtl_qm9")
class EdgeConditionedConv(keras.layers.Layer):
    """Edge-conditioned convolution (Simonovsky & Komodakis; PyG ``NNConv``).

        x'_i = aggr_{j -> i} x_j K(e_ji) + x_i W_root + b,  K(e) = MLP(e) reshaped (F_in, F_out)

    ``aggregation="mean"`` (the reference) or ``"sum"`` (spektral's ECCConv).
    Call with ``(x, edge_attr, edge_src, edge_dst)``; messages go from
    ``edge_src`` to ``edge_dst``.  ``edge_kernel`` + ``propagate`` split the
    call so that a kernel can be reused by several propagation steps.
    """

    def __init__(self, channels, kernel_network=(128,), aggregation="mean", root=True,
                 use_bias=True, activation=None, kernel_initializer="glorot_uniform", **kwargs):
        super().__init__(**kwargs)
        if aggregation not in ("mean", "sum"):
            raise ValueError(f"aggregation must be 'mean' or 'sum', got {aggregation!r}")
        self.channels = int(channels)
        self.kernel_network = tuple(int(h) for h in kernel_network)
        self.aggregation = aggregation
        self.root = root
        self.use_bias = use_bias
        self.activation = keras.activations.get(activation)
        self.kernel_initializer = keras.initializers.get(kernel_initializer)
        self.hidden_layers = [keras.layers.Dense(h, activation="relu", name=f"edge_net_{i}")
                              for i, h in enumerate(self.kernel_network)]
        self.out_layer = None

    def build(self, input_shape):
        x_shape, e_shape = input_shape[0], input_shape[1]
        f_in = int(x_shape[-1])
        self.f_in = f_in
        last = e_shape
        for layer in self.hidden_layers:
            layer.build(last)
            last = tuple(last[:-1]) + (layer.units,)
        self.out_layer = keras.layers.Dense(f_in * self.channels, name="edge_net_out")
        self.out_layer.build(last)
        if self.root:
            self.root_kernel = self.add_weight(name="root_kernel", shape=(f_in, self.channels),
                                               initializer=self.kernel_initializer)
        if self.use_bias:
            self.bias = self.add_weight(name="bias", shape=(self.channels,), initializer="zeros")

    def edge_kernel(self, edge_attr):
        """(E, F_in, F_out) per-edge kernels."""
        h = edge_attr
        for layer in self.hidden_layers:
            h = layer(h)
        h = self.out_layer(h)
        return ops.reshape(h, (-1, self.f_in, self.channels))

    def propagate(self, x, kernel, edge_src, edge_dst):
        n = ops.shape(x)[0]
        messages = ops.einsum("ef,efo->eo", ops.take(x, edge_src, axis=0), kernel)
        out = ops.segment_sum(messages, edge_dst, num_segments=n)
        if self.aggregation == "mean":
            ones = ops.ones_like(edge_dst, dtype=out.dtype)
            degree = ops.segment_sum(ones, edge_dst, num_segments=n)
            out = out / ops.expand_dims(ops.maximum(degree, 1.0), -1)
        if self.root:
            out = out + ops.matmul(x, self.root_kernel)
        if self.use_bias:
            out = out + self.bias
        return self.activation(out)

    def call(self, inputs):
        x, edge_attr, edge_src, edge_dst = inputs
        return self.propagate(x, self.edge_kernel(edge_attr), edge_src, edge_dst)

    def compute_output_shape(self, input_shape):
        return tuple(input_shape[0][:-1]) + (self.channels,)

    def get_config(self):
        config = super().get_config()
        config.update(channels=self.channels, kernel_network=list(self.kernel_network),
                      aggregation=self.aggregation, root=self.root, use_bias=self.use_bias,
                      activation=keras.activations.serialize(self.activation),
                      kernel_initializer=keras.initializers.serialize(self.kernel_initializer))
        return config


@keras.saving.register_keras_serializable(package="keras_dbmtl_qm9")
class Set2Set(keras.layers.Layer):
    """Set2Set readout (Vinyals et al.; PyG ``Set2Set``) over disjoint-mode graphs.

        q_t = LSTM(q*_{t-1}),  a_i = softmax_{i in graph}(x_i . q_t),
        r_t = sum_i a_i x_i,   q*_t = [q_t, r_t]

    Call with ``(x, node_graph, num_graphs)`` where ``num_graphs`` is a static
    int (nodes with ``node_graph >= num_graphs`` are ignored).  Output
    (num_graphs, 2 * F).  A graph without nodes reads out r = 0.
    """

    def __init__(self, steps=3, **kwargs):
        super().__init__(**kwargs)
        self.steps = int(steps)
        self.lstm = None

    def build(self, x_shape):
        f = int(x_shape[-1])
        self.units = f
        self.lstm = keras.layers.LSTMCell(f, name="lstm")
        self.lstm.build((None, 2 * f))

    def call(self, x, node_graph, num_graphs):
        f = self.units
        segments = num_graphs + 1  # + the padding graph
        h = ops.zeros((segments, f), dtype=x.dtype)
        c = ops.zeros((segments, f), dtype=x.dtype)
        q_star = ops.zeros((segments, 2 * f), dtype=x.dtype)
        for _ in range(self.steps):
            q, (h, c) = self.lstm(q_star, [h, c])
            score = ops.sum(x * ops.take(q, node_graph, axis=0), axis=-1)
            # softmax per graph; the shift is for stability only (no gradient)
            shift = ops.stop_gradient(ops.segment_max(score, node_graph, num_segments=segments))
            shift = ops.where(ops.isfinite(shift), shift, ops.zeros_like(shift))
            weight = ops.exp(score - ops.take(shift, node_graph, axis=0))
            total = ops.segment_sum(weight, node_graph, num_segments=segments)
            attention = weight / ops.take(total, node_graph, axis=0)
            r = ops.segment_sum(ops.expand_dims(attention, -1) * x, node_graph, num_segments=segments)
            q_star = ops.concatenate([q, r], axis=-1)
        return q_star[:num_graphs]

    def get_config(self):
        config = super().get_config()
        config.update(steps=self.steps)
        return config


@keras.saving.register_keras_serializable(package="keras_dbmtl_qm9")
class MPNNEncoder(keras.Model):
    """Message-passing encoder of the paper's QM9 experiments (see module doc).

    Args:
        dim: node state width (64 in the paper).
        edge_hidden: hidden width of the edge network (128).
        steps: message-passing steps (3), conv + GRU weights shared.
        set2set_steps: Set2Set processing steps (3).
        out_dim: width of the shared representation (64).
    """

    def __init__(self, dim=64, edge_hidden=128, steps=3, set2set_steps=3, out_dim=64, **kwargs):
        super().__init__(**kwargs)
        self.dim, self.edge_hidden, self.steps = int(dim), int(edge_hidden), int(steps)
        self.set2set_steps, self.out_dim = int(set2set_steps), int(out_dim)
        self.embed = keras.layers.Dense(self.dim, activation="relu", name="node_embedding")
        self.conv = EdgeConditionedConv(self.dim, kernel_network=(self.edge_hidden,),
                                        aggregation="mean", name="ecc")
        self.gru = keras.layers.GRUCell(self.dim, name="gru")  # reset_after=True == torch.nn.GRU
        self.set2set = Set2Set(self.set2set_steps, name="set2set")
        self.readout = keras.layers.Dense(self.out_dim, activation="relu", name="shared_out")

    def build(self, input_shape):
        n_feat = int(input_shape["nodes"][-1])
        e_feat = int(input_shape["edges"][-1])
        self.embed.build((None, n_feat))
        self.conv.build(((None, self.dim), (None, e_feat)))
        self.gru.build((None, self.dim))
        self.set2set.build((None, self.dim))
        self.readout.build((None, 2 * self.dim))
        self.built = True

    def call(self, inputs, training=None):
        x = inputs["nodes"]
        edge_src = ops.cast(inputs["edge_src"], "int32")
        edge_dst = ops.cast(inputs["edge_dst"], "int32")
        node_graph = ops.cast(inputs["node_graph"], "int32")
        num_graphs = ops.shape(inputs["graph_mask"])[0]
        out = self.embed(x)
        hidden = out
        kernel = self.conv.edge_kernel(inputs["edges"])  # once: shared by the 3 steps
        for _ in range(self.steps):
            m = ops.relu(self.conv.propagate(out, kernel, edge_src, edge_dst))
            out, _ = self.gru(m, [hidden], training=training)
            hidden = out
        pooled = self.set2set(out, node_graph, num_graphs=num_graphs)
        return self.readout(pooled)

    def compute_output_spec(self, inputs, training=None):
        b = inputs["graph_mask"].shape[0]
        return keras.KerasTensor((b, self.out_dim), dtype=self.compute_dtype)

    def get_config(self):
        return dict(name=self.name, dim=self.dim, edge_hidden=self.edge_hidden, steps=self.steps,
                    set2set_steps=self.set2set_steps, out_dim=self.out_dim)


def build_heads(tasks):
    """One linear ``Dense(1)`` head per target."""
    return {t: keras.layers.Dense(1, name=f"head_{t}") for t in tasks}


def build_model(tasks, dim=64, edge_hidden=128, steps=3, set2set_steps=3, out_dim=64):
    """``keras_dbmtl.MultiTaskModel`` with the MPNN encoder and linear heads."""
    import keras_dbmtl

    encoder = MPNNEncoder(dim, edge_hidden, steps, set2set_steps, out_dim, name="mpnn_encoder")
    return keras_dbmtl.MultiTaskModel(encoder=encoder, heads=build_heads(tasks), name="qm9_mtl")


__all__ = ["EdgeConditionedConv", "Set2Set", "MPNNEncoder", "build_heads", "build_model"]
