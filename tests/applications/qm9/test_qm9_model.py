"""QM9 model: ECC convolution against spektral (TF) and numpy, encoder invariances, a few training steps."""

import numpy as np
import pytest

import keras

pytest.importorskip("rdkit")
pytest.importorskip("spektral")

from applications.qm9 import data  # noqa: E402
from applications.qm9 import model as qmodel  # noqa: E402

from tests.applications.qm9.qm9_fixtures import MOLECULES  # noqa: E402


def _random_graph(seed=0, n=7, f_in=4, f_e=5):
    rng = np.random.default_rng(seed)
    adj = rng.random((n, n)) < 0.5
    np.fill_diagonal(adj, False)
    src, dst = np.nonzero(adj)  # row-major, as a sorted sparse matrix
    x = rng.normal(size=(n, f_in)).astype(np.float32)
    e = rng.normal(size=(len(src), f_e)).astype(np.float32)
    return x, e, src.astype(np.int32), dst.astype(np.int32)


def _numpy_ecc(x, e, src, dst, w, aggregation):
    """x'_i = aggr_{j->i} x_j K(e_ji) + x_i W_root + b with K = (relu(e W1 + b1) W2 + b2).reshape(F_in, F_out)."""
    (w1, b1), (w2, b2), root, bias = w
    f_in, f_out = root.shape
    out = np.zeros((len(x), f_out))
    count = np.zeros(len(x))
    for k in range(len(src)):
        kernel = (np.maximum(e[k] @ w1 + b1, 0) @ w2 + b2).reshape(f_in, f_out)
        out[dst[k]] += x[src[k]] @ kernel
        count[dst[k]] += 1
    if aggregation == "mean":
        out /= np.maximum(count, 1)[:, None]
    return out + x @ root + bias


def _ecc_weights(layer):
    h, o = layer.hidden_layers[0], layer.out_layer
    c = keras.ops.convert_to_numpy
    return ((c(h.kernel), c(h.bias)), (c(o.kernel), c(o.bias)),
            c(layer.root_kernel), c(layer.bias))


@pytest.mark.parametrize("aggregation", ["mean", "sum"])
def test_ecc_matches_numpy(aggregation):
    x, e, src, dst = _random_graph()
    layer = qmodel.EdgeConditionedConv(3, kernel_network=(6,), aggregation=aggregation)
    layer((x, e, src, dst))
    layer.bias.assign(np.linspace(-1, 1, 3).astype(np.float32))  # non-zero bias
    out = keras.ops.convert_to_numpy(layer((x, e, src, dst)))
    ref = _numpy_ecc(x, e, src, dst, _ecc_weights(layer), aggregation)
    np.testing.assert_allclose(out, ref, rtol=1e-4, atol=1e-5)


@pytest.mark.skipif(keras.backend.backend() != "tensorflow", reason="spektral layers run on TensorFlow only")
def test_ecc_matches_spektral_eccconv():
    import tensorflow as tf
    from spektral.layers import ECCConv

    x, e, src, dst = _random_graph(seed=1)
    n = len(x)
    a = tf.sparse.SparseTensor(np.stack([src, dst], 1).astype(np.int64), np.ones(len(src), np.float32),
                               (n, n))
    ref_layer = ECCConv(3, kernel_network=[6], root=True, use_bias=True)
    # Keras 3's __call__ passes mask=[None, ...], which ECCConv cannot take: build it and call .call directly
    ref_layer.build([x.shape, (n, n), e.shape])
    ref_layer.bias.assign(np.linspace(-1, 1, 3).astype(np.float32))
    expected = ref_layer.call([tf.constant(x), a, tf.constant(e)]).numpy()

    mine = qmodel.EdgeConditionedConv(3, kernel_network=(6,), aggregation="sum")
    mine((x, e, src, dst))
    fgn0, fgn_out = ref_layer.kernel_network_layers
    mine.hidden_layers[0].kernel.assign(fgn0.kernel)
    mine.hidden_layers[0].bias.assign(fgn0.bias)
    mine.out_layer.kernel.assign(fgn_out.kernel)
    mine.out_layer.bias.assign(fgn_out.bias)
    mine.root_kernel.assign(ref_layer.root_kernel)
    mine.bias.assign(ref_layer.bias)
    got = keras.ops.convert_to_numpy(mine((x, e, src, dst)))
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)
    # mean aggregation = spektral's sum of messages divided by the in-degree
    mean_layer = qmodel.EdgeConditionedConv(3, kernel_network=(6,), aggregation="mean")
    mean_layer((x, e, src, dst))
    mean_layer.set_weights(mine.get_weights())
    root_and_bias = x @ ref_layer.root_kernel.numpy() + ref_layer.bias.numpy()
    degree = np.maximum(np.bincount(dst, minlength=n), 1)[:, None]
    np.testing.assert_allclose(keras.ops.convert_to_numpy(mean_layer((x, e, src, dst))),
                               (expected - root_and_bias) / degree + root_and_bias, rtol=1e-5, atol=1e-5)


def _molecule_graph(name, perm=None):
    _, _, elements, xyz, _ = MOLECULES[name]
    xyz = np.asarray(xyz)
    if perm is not None:
        elements, xyz = [elements[i] for i in perm], xyz[perm]
    f = data.featurize_molecule(elements, xyz)
    arrays = dict(z=f["z"], aromatic=f["aromatic"], hyb=f["hyb"], bonds=f["bonds"], kekule=f["kekule"],
                  bond_aromatic=f["bond_aromatic"], pos=xyz.astype(np.float32),
                  n_atoms=np.array([len(elements)]), n_bonds=np.array([len(f["bonds"])]),
                  targets=np.zeros((1, 11)))
    return data.make_graphs(arrays)[0]


def _encode(encoder, graphs, batch_size, **kw):
    x, _ = data.collate(graphs, batch_size=batch_size, **kw)
    return keras.ops.convert_to_numpy(encoder(x))[:len(graphs)]


def test_encoder_is_invariant_to_padding_batching_and_atom_order():
    keras.utils.set_random_seed(0)
    encoder = qmodel.MPNNEncoder(dim=8, edge_hidden=16, out_dim=6)
    mols = [_molecule_graph("methane"), _molecule_graph("water"), _molecule_graph("benzene")]
    together = _encode(encoder, mols, 4, node_quantum=64, edge_quantum=256)
    assert together.shape == (3, 6) and np.isfinite(together).all()
    assert np.abs(together[0] - together[2]).max() > 1e-4  # different molecules, different codes
    # other padding sizes and batch sizes, and each molecule alone: the same codes
    np.testing.assert_allclose(_encode(encoder, mols, 3, node_quantum=None, edge_quantum=None), together,
                               rtol=1e-4, atol=1e-5)
    for k, g in enumerate(mols):
        np.testing.assert_allclose(_encode(encoder, [g], 2, node_quantum=32, edge_quantum=512)[0],
                                   together[k], rtol=1e-4, atol=1e-5)
    # renumbering the atoms of benzene changes nothing (message passing + Set2Set are permutation invariant)
    perm = np.random.default_rng(0).permutation(12)
    np.testing.assert_allclose(_encode(encoder, [_molecule_graph("benzene", perm)], 2, node_quantum=32,
                                       edge_quantum=512)[0], together[2],
                               rtol=1e-4, atol=1e-5)


def test_paper_size_encoder_shapes():
    encoder = qmodel.MPNNEncoder()  # dim 64, edge net 128 -> 64*64, Set2Set 128, out 64
    out = _encode(encoder, [_molecule_graph("water")], 2)
    assert out.shape == (1, 64)
    conv = encoder.conv
    assert tuple(conv.out_layer.kernel.shape) == (128, 64 * 64)
    assert tuple(conv.hidden_layers[0].kernel.shape) == (5, 128)
    assert tuple(encoder.readout.kernel.shape) == (128, 64)
