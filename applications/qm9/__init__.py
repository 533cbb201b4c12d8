"""QM9 with keras-dbmtl: 11 molecular property targets as 11 regression tasks (the DB-MTL paper's Table 3).

Command line (``--backend`` is applied before Keras is imported)::

    # ~8.5 minutes on 2 CPU cores: EW and DB-MTL on a subset, 3 seeds, MAE per target + Δp + learning curves and
    # DB-MTL's task weights, gradient norms and gradient cosines (PNG)
    python -m applications.qm9 --preset quick --backend jax --balancer ew dbmtl --out results/qm9_quick
    # ~40 minutes per seed on 2 CPU cores: 8,000 molecules, 20 epochs, 7 balancers, then the STL baselines
    python -m applications.qm9 --preset medium --balancer ew dbmtl mgda pcgrad nash_mtl famo upgrad --seeds 0
    python -m applications.qm9 --preset medium --stl --seeds 0
    # the same for 3 seeds, one process per method and seed, two at a time (2 h on 2 cores)
    bash benchmarks/qm9_medium.sh results/qm9_medium CACHE_DIR
    # runs made in separate processes (one per seed): one table, the spread verdict and the figures
    python -m applications.qm9.report results/
    # the paper's model and recipe (a GPU job), 3 seeds, then the 11 single-task baselines
    python -m applications.qm9 --preset paper --backend jax --balancer ew dbmtl --seeds 0 1 2
    python -m applications.qm9 --preset paper --backend jax --stl --seeds 0 1 2

In Python (set ``KERAS_BACKEND`` first)::

    import keras
    from applications.qm9 import data, model

    qm9 = data.load_qm9(subset=(1024, 256, 256))    # RDKit preprocessing once, then a cached .npz
    train = data.GraphLoader(qm9.train, batch_size=64, shuffle=True, drop_remainder=True, edges="bonds")
    val = data.GraphLoader(qm9.val, batch_size=64, edges="bonds")
    mtl = model.build_model(data.TARGETS, dim=32, edge_hidden=64)   # keras_dbmtl.MultiTaskModel
    mtl.compile(optimizer=keras.optimizers.Adam(1e-3), loss="mse", balancer="dbmtl")
    mtl.fit(train, validation_data=val, epochs=1, verbose=2)  # TensorFlow: train.as_tf_dataset() etc.

Where the data come from, and running without TensorFlow: the molecules are QM9 as shipped by the PyPI
package ``qm9pack==1.0.3`` (its CSVs). The first run perceives bonds with RDKit and writes one ``.npz`` per
subset to the cache folder (``--cache-dir``; default ``$KERAS_DBMTL_CACHE/qm9`` or
``~/.cache/keras_dbmtl/qm9``). From then on a run needs only keras, the backend, numpy, scipy, pandas and
tqdm: not RDKit, qm9pack, spektral or TensorFlow (spektral's ``Graph``/``Dataset`` are used when spektral
imports, ``data.MinimalGraph``/``MinimalDataset`` otherwise, with identical batches;
``tests/applications/qm9/test_qm9_without_tensorflow.py``). To run on a machine without RDKit::

    python -m applications.qm9 --preset quick --prepare-data --cache-dir qm9_cache   # here: ~4 MB
    python -m applications.qm9 --preset quick --backend jax --cache-dir qm9_cache    # there (copy the folder)

Each finished run writes ``<out>/run_<balancer>_seed<seed>.json`` at once, and
``<out>/curve_<balancer>_seed<seed>.json`` holds the learning curve (every epoch's logs, ``val_delta_p``
included, and the epoch / training times) after every epoch.

Modules: ``data`` (qm9pack CSVs -> RDKit -> spektral graphs, cache, split, batching), ``model`` (the
MPNN encoder in keras.ops: edge-conditioned convolution, GRU, Set2Set), ``train`` (recipe, STL baselines,
Δp, tables, plot), ``report`` (merges run files: table, spread verdict, curves, diagnostics; merges STL files),
``__main__`` (CLI).  Stored STL baselines: ``stl_baselines_quick.json`` (made by this
code, command inside) and ``stl_baselines_paper.json`` (the paper's published STL row, see its
``source``).

Design decisions (see data.py / model.py for details):
- Bonds are perceived from the XYZ geometry with RDKit ``rdDetermineBonds`` (covalent-radius
  connectivity, extended-Hueckel connectivity when that fails), not from the SMILES: the atom order is
  the XYZ order by construction (no atom matching) and the graph is the one of the geometry the
  targets were computed on.  Of the 130,831 molecules, 6,808 need the Hueckel fallback and 2 (QM9
  indices 133831, 133850, strained cages) fail both; they are kept with their covalent-radius
  connectivity, all bonds single, aromatic/hybridisation zero (counted and printed during preprocessing).
- Aromatic flags and sp/sp2/sp3 come from the sanitised RDKit molecule (``features="rdkit"``, default);
  ``features="reference"`` reproduces the reference's unsanitised molecules (those columns zero, Kekule
  bond types).
"""
