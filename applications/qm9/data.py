"""QM9 data: the real QM9 shipped by ``qm9pack`` -> molecular graphs -> spektral.

Pipeline
--------
1. ``read_qm9_frame`` reads the three CSV parts of ``qm9pack/data`` (130,831
   molecules; coordinates in Angstrom, properties in atomic units) without
   importing ``qm9pack`` (its ``__init__`` needs ``pkg_resources``).
2. ``featurize_molecule`` perceives bonds from the XYZ geometry with RDKit's
   ``rdDetermineBonds`` (connectivity from covalent radii, falling back to
   extended-Hueckel connectivity when the first guess has impossible
   valences, see ``BOND_STATUS``) and keeps, per atom, the atomic number,
   RDKit's aromatic flag and hybridisation, and per bond its Kekule order and
   aromatic flag.
3. ``qm9_targets`` converts the 11 targets to the reference units (mu D,
   alpha a0^3, eps eV, <R^2> a0^2, ZPVE eV, atomization U0/U/H/G eV, c_v
   cal/mol K).
4. ``preprocess`` runs 2-3 over a set of rows with a progress bar and
   ``save_cache``/``load_cache`` store the result as a versioned ``.npz``.
5. ``split_indices`` is the seeded split (first 10,000 of a permutation =
   test, next 10,000 = validation, the rest = train), ``load_qm9`` puts it
   all together and returns spektral datasets (``QM9Graphs``) with z-scored
   targets, and ``GraphLoader`` (a ``keras.utils.PyDataset``) turns a
   spektral dataset into padded disjoint-mode numpy batches on the complete
   graph (edge features = bond one-hot + distance), for any Keras backend.

Node features (11, PyTorch Geometric's QM9 recipe): one-hot H/C/N/O/F, atomic
number, aromatic, sp, sp2, sp3, number of bonded hydrogens.
Edge features (5): one-hot single/double/triple/aromatic (zeros for atom
pairs that are not bonded), then the interatomic distance in Angstrom.

``features="rdkit"`` (default) uses the sanitised RDKit molecule: aromatic
atoms/bonds and sp/sp2/sp3 are filled in.  ``features="reference"`` mimics
the reference (molecules read without sanitisation): aromatic and
hybridisation columns are zero and bonds carry their Kekule order.

Bad input never becomes a silently wrong graph: a cache of another format version, a truncated or corrupt
cache, or one whose arrays do not fit together raises ``CacheVersionError``; a missing, truncated or damaged
CSV raises ``DataError`` (``MissingDataError`` when absent). All are ``applications.common.DataError``s (so
``ValueError``s; ``CacheVersionError`` is a ``RuntimeError`` too) whose message names the file and the fix.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.util
import os
import time

import numpy as np

from applications.common import DataError, MissingDataError

FORMAT_VERSION = 1
"""Version of the ``.npz`` cache layout; bump when the arrays change."""

N_MOLECULES = 130_831

TARGETS = ("mu", "alpha", "homo", "lumo", "r2", "zpve", "u0", "u", "h", "g", "cv")
"""The 11 targets, in the paper's order (PyG indices 0,1,2,3,5,6,12,13,14,15,11)."""

TARGET_LABELS = {
    "mu": "μ", "alpha": "α", "homo": "ε_HOMO", "lumo": "ε_LUMO", "r2": "⟨R²⟩",
    "zpve": "ZPVE", "u0": "U0", "u": "U", "h": "H", "g": "G", "cv": "c_v",
}
TARGET_UNITS = {
    "mu": "D", "alpha": "a0³", "homo": "eV", "lumo": "eV", "r2": "a0²",
    "zpve": "eV", "u0": "eV", "u": "eV", "h": "eV", "g": "eV", "cv": "cal/mol K",
}
"""Units of the stored (de-normalised) targets."""

PAPER_SCALE = {t: (1000.0 if t in ("homo", "lumo", "zpve", "u0", "u", "h", "g") else 1.0)
               for t in TARGETS}
"""Multiply a MAE in ``TARGET_UNITS`` by this to get the paper's units (meV)."""
PAPER_UNITS = {t: ("meV" if PAPER_SCALE[t] == 1000.0 else TARGET_UNITS[t]) for t in TARGETS}

HARTREE_TO_EV = 27.2113825435

ATOMREF_EV = {
    # element -> reference energy (eV) of the isolated atom, for U0, U, H, G
    "u0": {1: -13.61312172, 6: -1029.86312267, 7: -1485.30251237, 8: -2042.61123593, 9: -2713.48485589},
    "u": {1: -13.5745904, 6: -1029.82456413, 7: -1485.26398105, 8: -2042.5727046, 9: -2713.44632457},
    "h": {1: -13.54887564, 6: -1029.79887659, 7: -1485.2382935, 8: -2042.54701705, 9: -2713.42063702},
    "g": {1: -13.90303183, 6: -1030.25891228, 7: -1485.71166277, 8: -2043.01812778, 9: -2713.88796536},
}

_CSV_COLUMNS = {
    "mu": "Dipole_debye", "alpha": "Polarizability_bohr3", "homo": "HOMO_au", "lumo": "LUMO_au",
    "r2": "R2_bohr2", "zpve": "ZPVE_au", "u0": "InternalEnergy_0K_au",
    "u": "InternalEnergy_298K_au", "h": "Enthalphy_298K_au", "g": "GibbsFreeEnergy_298K_au",
    "cv": "Heatcapacity_Cv_cal_mol_K",
}
_HARTREE_TARGETS = ("homo", "lumo", "zpve", "u0", "u", "h", "g")
_CSV_PARTS = ("qm9_part1.csv", "qm9_part2.csv", "qm9_part3.csv")

ELEMENTS = {"H": 1, "C": 6, "N": 7, "O": 8, "F": 9}
_ONE_HOT_Z = (1, 6, 7, 8, 9)
N_NODE_FEATURES = 11
N_EDGE_FEATURES = 5

# Hybridisation codes stored in the cache.
HYB_OTHER, HYB_SP, HYB_SP2, HYB_SP3 = 0, 1, 2, 3

BOND_STATUS = {0: "covalent-radius connectivity", 1: "extended-Hueckel connectivity",
               2: "RDKit failed: kept, connectivity only (all bonds single)"}
"""How the bonds of a molecule were obtained (``status`` array of the cache)."""


class CacheVersionError(DataError, RuntimeError):
    """A cache file was written by another version of this module, or is truncated, corrupt or inconsistent."""


_CSV_FIX = ("Reinstall the data (pip install --force-reinstall qm9pack==1.0.3) or pass the data_dir of an "
            "intact copy of qm9pack's data/ folder.")


# --------------------------------------------------------------------------- files


def qm9pack_data_dir():
    """Folder holding qm9pack's CSV files, found without importing qm9pack."""
    spec = importlib.util.find_spec("qm9pack")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError(
            "The QM9 application needs the package qm9pack==1.0.3 (it ships the QM9 CSVs): "
            "pip install qm9pack==1.0.3")
    for loc in spec.submodule_search_locations:
        path = os.path.join(loc, "data")
        if os.path.exists(os.path.join(path, _CSV_PARTS[0])):
            return path
    raise MissingDataError(f"qm9pack is installed but has no data/{_CSV_PARTS[0]}. " + _CSV_FIX)


def default_cache_dir(cache_dir=None):
    """``cache_dir`` if given, else ``$KERAS_DBMTL_CACHE/qm9``, else ``~/.cache/keras_dbmtl/qm9``."""
    if cache_dir:
        return os.path.abspath(os.path.expanduser(cache_dir))
    root = os.environ.get("KERAS_DBMTL_CACHE")
    if root:
        return os.path.join(os.path.abspath(os.path.expanduser(root)), "qm9")
    return os.path.join(os.path.expanduser("~"), ".cache", "keras_dbmtl", "qm9")


def read_qm9_frame(data_dir=None):
    """All molecules as one pandas DataFrame, in file order (sorted by QM9 index)."""
    import pandas as pd

    from_qm9pack = data_dir is None
    data_dir = data_dir or qm9pack_data_dir()
    cols = ["Index", "SMILES", "Elements", "XYZ_Ang"] + list(_CSV_COLUMNS.values())
    frames = []
    for name in _CSV_PARTS:
        path = os.path.join(data_dir, name)
        if not os.path.exists(path):
            continue
        try:
            frame = pd.read_csv(path, usecols=cols)
        except Exception as err:  # truncated (EOF inside a quoted field), missing columns, not a CSV...
            raise DataError(f"QM9 CSV {path} cannot be read ({type(err).__name__}: {err}). " + _CSV_FIX) from err
        empty = frame[cols].isna().any(axis=1).to_numpy()
        if empty.any():
            row = int(np.argmax(empty))
            raise DataError(f"QM9 CSV {path} has empty fields in data row {row + 1} (a truncated or damaged "
                            "file). " + _CSV_FIX)
        frames.append(frame)
    if not frames:
        raise MissingDataError(f"no QM9 CSV ({', '.join(_CSV_PARTS)}) in {data_dir}. " + _CSV_FIX)
    frame = pd.concat(frames, ignore_index=True)
    if from_qm9pack and len(frame) != N_MOLECULES:
        raise DataError(f"The QM9 CSVs in {data_dir} hold {len(frame)} molecules, not {N_MOLECULES}. " + _CSV_FIX)
    frame.attrs["source"] = data_dir
    return frame


def parse_elements(text):
    """``"['C','H','H']"`` -> ``['C', 'H', 'H']``."""
    return [tok.strip().strip("'\"") for tok in text.strip().strip("[]").split(",") if tok.strip()]


def parse_xyz(text):
    """``"[[x,y,z],[x,y,z]]"`` -> float64 array of shape (n_atoms, 3), Angstrom."""
    flat = text.replace("[", " ").replace("]", " ").replace(",", " ").split()
    return np.asarray(flat, dtype=np.float64).reshape(-1, 3)


# --------------------------------------------------------------------------- chemistry


def _xyz_block(elements, coords):
    lines = [str(len(elements)), ""]
    lines += [f"{e} {x:.10f} {y:.10f} {z:.10f}" for e, (x, y, z) in zip(elements, coords)]
    return "\n".join(lines) + "\n"


def featurize_molecule(elements, coords):
    """Perceive bonds from a geometry with RDKit.

    Returns a dict with per-atom ``z`` (atomic number), ``aromatic`` (0/1),
    ``hyb`` (``HYB_*`` code) and per (undirected) bond ``bonds`` (k, 2) atom
    indices, ``kekule`` (bond order 1/2/3 in a Kekule structure), ``bond_aromatic``
    (0/1), plus ``status`` (see ``BOND_STATUS``).

    Bonds come from ``rdDetermineBonds.DetermineBonds(charge=0)``, first with
    covalent-radius connectivity (fast) and, when that yields impossible
    valences (strained bicyclic cages where a 1,3 distance looks like a bond),
    with extended-Hueckel connectivity.  The molecule is sanitised by RDKit on
    the way, so aromaticity and hybridisation are RDKit's perception.
    If both fail the molecule is kept with its covalent-radius connectivity and
    every bond single (``status`` 2).
    """
    from rdkit import Chem, RDLogger
    from rdkit.Chem import rdDetermineBonds

    RDLogger.DisableLog("rdApp.*")
    block = _xyz_block(elements, coords)
    mol = None
    status = 2
    for status_try, hueckel in ((0, False), (1, True)):
        candidate = Chem.MolFromXYZBlock(block)
        try:
            rdDetermineBonds.DetermineBonds(candidate, charge=0, useHueckel=hueckel)
        except Exception:  # RDKit raises ValueError/RuntimeError variants
            continue
        mol, status = candidate, status_try
        break
    n = len(elements)
    z = np.array([ELEMENTS[e] for e in elements], dtype=np.int8)
    if mol is None:
        mol = Chem.MolFromXYZBlock(block)
        rdDetermineBonds.DetermineConnectivity(mol)
        bonds = np.array([(b.GetBeginAtomIdx(), b.GetEndAtomIdx()) for b in mol.GetBonds()],
                         dtype=np.int8).reshape(-1, 2)
        return dict(z=z, aromatic=np.zeros(n, np.int8), hyb=np.zeros(n, np.int8), bonds=bonds,
                    kekule=np.ones(len(bonds), np.int8), bond_aromatic=np.zeros(len(bonds), np.int8),
                    status=status)
    hyb_code = {Chem.HybridizationType.SP: HYB_SP, Chem.HybridizationType.SP2: HYB_SP2,
                Chem.HybridizationType.SP3: HYB_SP3}
    aromatic = np.array([a.GetIsAromatic() for a in mol.GetAtoms()], dtype=np.int8)
    hyb = np.array([hyb_code.get(a.GetHybridization(), HYB_OTHER) for a in mol.GetAtoms()], dtype=np.int8)
    bonds = np.array([(b.GetBeginAtomIdx(), b.GetEndAtomIdx()) for b in mol.GetBonds()],
                     dtype=np.int8).reshape(-1, 2)
    bond_aromatic = np.array([b.GetIsAromatic() for b in mol.GetBonds()], dtype=np.int8)
    kek = Chem.Mol(mol)
    Chem.Kekulize(kek, clearAromaticFlags=True)
    order = {Chem.BondType.SINGLE: 1, Chem.BondType.DOUBLE: 2, Chem.BondType.TRIPLE: 3}
    kekule = np.array([order[b.GetBondType()] for b in kek.GetBonds()], dtype=np.int8)
    return dict(z=z, aromatic=aromatic, hyb=hyb, bonds=bonds, kekule=kekule,
                bond_aromatic=bond_aromatic, status=status)


def qm9_targets(frame, atom_counts=None):
    """(n, 11) float64 targets in ``TARGET_UNITS`` from the CSV columns.

    ``atom_counts``: optional (n, 5) counts of H, C, N, O, F per molecule (else
    counted from the ``Elements`` column).  U0/U/H/G become atomization
    energies: total energy in eV minus the per-element reference energies.
    """
    n = len(frame)
    if atom_counts is None:
        atom_counts = np.zeros((n, 5), np.int64)
        for i, text in enumerate(frame["Elements"]):
            for e in parse_elements(text):
                atom_counts[i, _ONE_HOT_Z.index(ELEMENTS[e])] += 1
    y = np.zeros((n, len(TARGETS)), np.float64)
    for k, t in enumerate(TARGETS):
        v = frame[_CSV_COLUMNS[t]].to_numpy(np.float64)
        if t in _HARTREE_TARGETS:
            v = v * HARTREE_TO_EV
        if t in ATOMREF_EV:
            ref = np.array([ATOMREF_EV[t][z] for z in _ONE_HOT_Z])
            v = v - atom_counts @ ref
        y[:, k] = v
    return y


# --------------------------------------------------------------------------- preprocessing + cache


def preprocess(frame, rows=None, progress=True):
    """Featurize ``frame.iloc[rows]`` (all rows if None) into flat arrays.

    Returns a dict of arrays (see ``save_cache``); molecules are concatenated,
    ``n_atoms``/``n_bonds`` give the per-molecule lengths.
    """
    rows = np.arange(len(frame)) if rows is None else np.asarray(rows, np.int64)
    sub = frame.iloc[rows]
    parts = {k: [] for k in ("z", "pos", "aromatic", "hyb", "bonds", "kekule", "bond_aromatic")}
    n_atoms = np.zeros(len(rows), np.int32)
    n_bonds = np.zeros(len(rows), np.int32)
    status = np.zeros(len(rows), np.int8)
    iterator = zip(sub["Elements"].tolist(), sub["XYZ_Ang"].tolist())
    if progress:
        from tqdm.auto import tqdm

        iterator = tqdm(iterator, total=len(rows), desc="QM9: RDKit bond perception",
                        unit="mol", mininterval=1.0)
    t0 = time.perf_counter()
    for i, (el_text, xyz_text) in enumerate(iterator):
        try:
            elements = parse_elements(el_text)
            coords = parse_xyz(xyz_text)
            if len(coords) != len(elements) or not np.isfinite(coords).all() or \
                    any(e not in ELEMENTS for e in elements):
                raise ValueError(f"{len(elements)} elements {elements} but {len(coords)} finite positions")
        except ValueError as err:
            source = frame.attrs.get("source", "the QM9 CSV files")
            raise DataError(f"QM9 molecule {int(sub['Index'].iloc[i])} in {source} has unreadable elements or "
                            f"coordinates ({err}). " + _CSV_FIX) from err
        f = featurize_molecule(elements, coords)
        n_atoms[i] = len(elements)
        n_bonds[i] = len(f["bonds"])
        status[i] = f["status"]
        parts["z"].append(f["z"])
        parts["pos"].append(coords.astype(np.float32))
        for k in ("aromatic", "hyb", "bonds", "kekule", "bond_aromatic"):
            parts[k].append(f[k])
    seconds = time.perf_counter() - t0
    out = {k: np.concatenate(v) if v else np.zeros((0,), np.int8) for k, v in parts.items()}
    if not parts["bonds"]:
        out["bonds"] = np.zeros((0, 2), np.int8)
        out["pos"] = np.zeros((0, 3), np.float32)
    counts = np.stack([np.bincount(np.repeat(np.arange(len(rows)), n_atoms)[out["z"] == z],
                                   minlength=len(rows)) for z in _ONE_HOT_Z], axis=1)
    out.update(rows=rows, qm9_index=sub["Index"].to_numpy(np.int64), n_atoms=n_atoms,
               n_bonds=n_bonds, status=status, targets=qm9_targets(sub, counts),
               smiles=sub["SMILES"].to_numpy(dtype=str))
    n_fail = int((status == 2).sum())
    n_hueckel = int((status == 1).sum())
    if progress:
        print(f"QM9: featurized {len(rows)} molecules in {seconds:.1f} s; "
              f"{n_hueckel} needed the extended-Hueckel fallback; RDKit could not assign "
              f"bond orders to {n_fail} (kept with connectivity only, all bonds single)")
    out["preprocess_seconds"] = np.float64(seconds)
    return out


_CACHE_KEYS = ("rows", "qm9_index", "n_atoms", "n_bonds", "status", "targets", "z", "pos",
               "aromatic", "hyb", "bonds", "kekule", "bond_aromatic", "smiles")


def save_cache(path, arrays):
    """Write the preprocessed arrays (+ ``format_version``) to ``path`` (.npz)."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = path + ".tmp.npz"
    np.savez(tmp, format_version=np.int64(FORMAT_VERSION),
             **{k: arrays[k] for k in _CACHE_KEYS})
    os.replace(tmp, path)


def _cache_fix(path):
    return (f"Delete it (rm {path}, or the whole cache folder {os.path.dirname(os.path.abspath(path))}) "
            "or pass rebuild=True / --rebuild-cache to preprocess the molecules again.")


def _cache_problem(arrays):
    """What does not fit together in a cache's arrays (None when they do): lengths, atom indices, values."""
    n = len(arrays["rows"])
    for k in ("qm9_index", "n_atoms", "n_bonds", "status", "targets", "smiles"):
        if len(arrays[k]) != n:
            return f"{k} has {len(arrays[k])} entries for {n} molecules"
    if arrays["targets"].shape != (n, len(TARGETS)):
        return f"targets have shape {arrays['targets'].shape}, expected {(n, len(TARGETS))}"
    n_atoms, n_bonds = arrays["n_atoms"].astype(np.int64), arrays["n_bonds"].astype(np.int64)
    if n and (n_atoms.min() < 1 or n_bonds.min() < 0):
        return "negative or zero atom / bond counts"
    atoms, bonds = int(n_atoms.sum()), int(n_bonds.sum())
    for k, count, shape in (("z", atoms, ()), ("pos", atoms, (3,)), ("aromatic", atoms, ()), ("hyb", atoms, ()),
                            ("bonds", bonds, (2,)), ("kekule", bonds, ()), ("bond_aromatic", bonds, ())):
        if arrays[k].shape != (count,) + shape:
            return f"{k} has shape {arrays[k].shape}, expected {(count,) + shape} from n_atoms / n_bonds"
    if bonds:
        mol_of_bond = np.repeat(np.arange(n), n_bonds)
        b = arrays["bonds"].astype(np.int64)
        if b.min() < 0 or (b.max(axis=1) >= n_atoms[mol_of_bond]).any():
            return "a bond joins atoms outside its molecule"
        if not np.isin(arrays["kekule"], (1, 2, 3)).all():
            return "bond orders other than 1, 2, 3"
    if not np.isin(arrays["z"], _ONE_HOT_Z).all():
        return "atomic numbers other than H, C, N, O, F"
    if not (np.isfinite(arrays["pos"]).all() and np.isfinite(arrays["targets"]).all()):
        return "NaN or infinite positions or targets"
    return None


def load_cache(path):
    """Read a cache written by ``save_cache``.

    Raises ``CacheVersionError`` (naming the file and the fix) for a cache of
    another format version, a truncated or corrupt file, missing arrays, or
    arrays that do not fit together (lengths, atom indices, values).
    """
    try:
        with np.load(path, allow_pickle=False) as f:
            version = int(f["format_version"]) if "format_version" in f.files else None
            if version != FORMAT_VERSION:
                raise CacheVersionError(
                    f"QM9 cache {path} has format version {version}, this code reads version "
                    f"{FORMAT_VERSION}. " + _cache_fix(path))
            missing = [k for k in _CACHE_KEYS if k not in f.files]
            if missing:
                raise CacheVersionError(f"QM9 cache {path} lacks the arrays {missing}. " + _cache_fix(path))
            arrays = {k: f[k] for k in _CACHE_KEYS}
        problem = _cache_problem(arrays)
        if problem:
            raise CacheVersionError(f"QM9 cache {path} is inconsistent ({problem}); it is corrupt or was written "
                                    "by another version. " + _cache_fix(path))
        return arrays
    except CacheVersionError:
        raise
    except FileNotFoundError:
        raise
    except Exception as err:  # truncated / corrupt zip (BadZipFile, EOFError, ValueError, OSError, ...)
        raise CacheVersionError(
            f"QM9 cache {path} cannot be read ({type(err).__name__}: {err}); it is truncated or corrupt. "
            + _cache_fix(path)) from err


def split_indices(n=N_MOLECULES, seed=0, n_test=10_000, n_val=10_000):
    """Seeded split of ``range(n)``: (train, val, test) row indices.

    test = the first ``n_test`` of ``np.random.default_rng(seed).permutation(n)``,
    val = the next ``n_val``, train = the rest (in permutation order).
    """
    perm = np.random.default_rng(seed).permutation(n)
    return perm[n_test + n_val:], perm[n_test:n_test + n_val], perm[:n_test]


def _take(arrays, idx):
    """Molecules ``idx`` (positions in ``arrays``) of a flat array dict."""
    idx = np.asarray(idx, np.int64)
    a_off = np.concatenate([[0], np.cumsum(arrays["n_atoms"], dtype=np.int64)])
    b_off = np.concatenate([[0], np.cumsum(arrays["n_bonds"], dtype=np.int64)])

    def ranges(off, counts):
        # concatenation of arange(off[i], off[i] + counts[i]) for i in idx, vectorised
        c = counts[idx].astype(np.int64)
        starts = off[idx] - (np.cumsum(c) - c)
        return np.repeat(starts, c) + np.arange(int(c.sum()), dtype=np.int64)

    ai = ranges(a_off, arrays["n_atoms"])
    bi = ranges(b_off, arrays["n_bonds"])
    out = {}
    for k in ("rows", "qm9_index", "n_atoms", "n_bonds", "status", "targets", "smiles"):
        out[k] = arrays[k][idx]
    for k in ("z", "pos", "aromatic", "hyb"):
        out[k] = arrays[k][ai]
    for k in ("bonds", "kekule", "bond_aromatic"):
        out[k] = arrays[k][bi]
    return out


def subset_cache_name(rows):
    """File name of the cache of the CSV rows ``rows``: ``qm9_subset_<sha1 of the int64 rows, 16 hex>.npz``."""
    digest = hashlib.sha1(np.asarray(rows, np.int64).tobytes()).hexdigest()[:16]
    return f"qm9_subset_{digest}.npz"


def load_arrays(rows=None, cache_dir=None, rebuild=False, progress=True, data_dir=None):
    """Preprocessed arrays for the CSV rows ``rows`` (all if None), cached.

    The full dataset is cached as ``qm9_full.npz``; a subset as
    ``qm9_subset_<hash>.npz`` unless the full cache exists (then it is sliced).
    """
    cdir = default_cache_dir(cache_dir)
    full_path = os.path.join(cdir, "qm9_full.npz")
    if rows is None:
        path = full_path
    else:
        rows = np.asarray(rows, np.int64)
        path = os.path.join(cdir, subset_cache_name(rows))
        if not rebuild and not os.path.exists(path) and os.path.exists(full_path):
            full = load_cache(full_path)
            pos = np.full(int(full["rows"].max()) + 1, -1, np.int64)
            pos[full["rows"]] = np.arange(len(full["rows"]))
            return _take(full, pos[rows]), full_path
    if os.path.exists(path) and not rebuild:
        t0 = time.perf_counter()
        arrays = load_cache(path)
        if rows is not None and not np.array_equal(arrays["rows"], rows):
            raise CacheVersionError(f"QM9 cache {path} holds other molecules. " + _cache_fix(path))
        if progress:
            print(f"QM9: loaded {len(arrays['rows'])} molecules from {path} "
                  f"in {time.perf_counter() - t0:.1f} s")
        return arrays, path
    frame = read_qm9_frame(data_dir)
    arrays = preprocess(frame, rows, progress=progress)
    save_cache(path, arrays)
    if progress:
        print(f"QM9: cached to {path}")
    return arrays, path


# --------------------------------------------------------------------------- graphs


def node_features(arrays, features="rdkit"):
    """(total atoms, 11) float32 node features for a flat array dict."""
    z = arrays["z"].astype(np.int64)
    n = len(z)
    x = np.zeros((n, N_NODE_FEATURES), np.float32)
    for k, zz in enumerate(_ONE_HOT_Z):
        x[:, k] = z == zz
    x[:, 5] = z
    if features == "rdkit":
        x[:, 6] = arrays["aromatic"]
        x[:, 7] = arrays["hyb"] == HYB_SP
        x[:, 8] = arrays["hyb"] == HYB_SP2
        x[:, 9] = arrays["hyb"] == HYB_SP3
    elif features != "reference":
        raise ValueError(f"features must be 'rdkit' or 'reference', got {features!r}")
    # number of bonded hydrogens
    a_off = np.concatenate([[0], np.cumsum(arrays["n_atoms"], dtype=np.int64)])
    mol_of_bond = np.repeat(np.arange(len(arrays["n_atoms"])), arrays["n_bonds"])
    gb = arrays["bonds"].astype(np.int64) + a_off[mol_of_bond][:, None]
    is_h = z == 1
    nh = np.zeros(n, np.float32)
    np.add.at(nh, gb[:, 0], is_h[gb[:, 1]])
    np.add.at(nh, gb[:, 1], is_h[gb[:, 0]])
    x[:, 10] = nh
    return x


def bond_features(arrays, features="rdkit"):
    """(total bonds, 4) one-hot single/double/triple/aromatic."""
    kek = arrays["kekule"].astype(np.int64)
    e = np.zeros((len(kek), 4), np.float32)
    if features == "rdkit":
        arom = arrays["bond_aromatic"].astype(bool)
        e[arom, 3] = 1.0
        e[~arom, kek[~arom] - 1] = 1.0
    else:
        e[np.arange(len(kek)), kek - 1] = 1.0
    return e


def spektral_data():
    """``spektral.data`` when spektral (and so TensorFlow) can be imported, else None.

    The QM9 run needs neither: without them ``make_graphs`` and ``QM9Graphs`` use ``MinimalGraph`` /
    ``MinimalDataset`` (the few attributes of spektral's ``Graph`` / ``Dataset`` this module reads), so a
    JAX- or torch-only install trains from a cached ``.npz`` with the same batches."""
    try:
        import spektral.data
    except ImportError:  # not installed, or TensorFlow missing under it
        return None
    return spektral.data


class MinimalGraph:
    """Stand-in for ``spektral.data.Graph`` when spektral is not installed: attributes x, a, e, y, pos."""

    def __init__(self, x=None, a=None, e=None, y=None, **kwargs):
        self.x, self.a, self.e, self.y = x, a, e, y
        for key, value in kwargs.items():
            setattr(self, key, value)

    @property
    def n_nodes(self):
        return 0 if self.x is None else int(self.x.shape[0])

    def __repr__(self):
        return f"MinimalGraph(n_nodes={self.n_nodes})"


class MinimalDataset:
    """Stand-in for a ``spektral.data.Dataset`` when spektral is not installed: a sized, indexable list of
    graphs (integer index -> graph; slice or index array -> a dataset of those graphs)."""

    def __init__(self, graphs, name="qm9"):
        self.graphs = list(graphs)
        self.name = name

    def __len__(self):
        return len(self.graphs)

    def __getitem__(self, key):
        if isinstance(key, (int, np.integer)):
            return self.graphs[key]
        if isinstance(key, slice):
            return MinimalDataset(self.graphs[key], self.name)
        return MinimalDataset([self.graphs[int(k)] for k in np.asarray(key).ravel()], self.name)

    def __iter__(self):
        return iter(self.graphs)

    @property
    def n_graphs(self):
        return len(self.graphs)

    def __repr__(self):
        return f"MinimalDataset(n_graphs={len(self.graphs)})"


def make_graphs(arrays, y=None, features="rdkit"):
    """List of graphs (``spektral.data.Graph``, or ``MinimalGraph`` without spektral): x (n, 11), a (n, n)
    dense 0/1 bond adjacency, e (directed bonds in row-major order of a, 4 features), y (11,), pos (n, 3)
    Angstrom."""
    spektral_data_module = spektral_data()
    graph_class = spektral_data_module.Graph if spektral_data_module is not None else MinimalGraph
    x_all = node_features(arrays, features)
    eb_all = bond_features(arrays, features)
    n_atoms = arrays["n_atoms"].astype(np.int64)
    n_bonds = arrays["n_bonds"].astype(np.int64)
    cut_a = np.cumsum(n_atoms)[:-1]
    cut_b = np.cumsum(n_bonds)[:-1]
    xs = np.split(x_all, cut_a)
    ps = np.split(arrays["pos"], cut_a)
    bs = np.split(arrays["bonds"].astype(np.int64), cut_b)
    es = np.split(eb_all, cut_b)
    y = np.asarray(arrays["targets"] if y is None else y, np.float32)
    graphs = []
    for m in range(len(n_atoms)):
        n, b, eb = int(n_atoms[m]), bs[m], es[m]
        a = np.zeros((n, n), np.float32)
        a[b[:, 0], b[:, 1]] = 1.0
        a[b[:, 1], b[:, 0]] = 1.0
        bond = np.zeros((n, n, 4), np.float32)
        bond[b[:, 0], b[:, 1]] = eb
        bond[b[:, 1], b[:, 0]] = eb
        graphs.append(graph_class(x=xs[m], a=a, e=bond[a > 0], y=y[m], pos=ps[m]))
    return graphs


@functools.lru_cache(maxsize=None)
def _spektral_dataset_class():
    from spektral.data import Dataset

    class QM9Graphs(Dataset):
        """spektral Dataset of QM9 molecular graphs (bond graph + positions).

        Each ``Graph`` holds x (n, 11), a (dense bond adjacency), e (bond one-hot),
        y (11 targets, z-scored in ``load_qm9``) and pos (n, 3).  The complete
        graph with distances is built per batch by ``GraphLoader`` (storing it
        for 130k molecules would take ~0.8 GB).
        """

        def __init__(self, graphs, name="qm9", **kwargs):
            self._graphs_in = graphs
            self._name = name
            super().__init__(**kwargs)

        @property
        def path(self):  # no download folder: the data come from qm9pack
            return os.path.dirname(os.path.abspath(__file__))

        def read(self):
            graphs, self._graphs_in = self._graphs_in, None
            return graphs

    return QM9Graphs


def QM9Graphs(graphs, **kwargs):  # noqa: N802 - spektral (and so TensorFlow) is imported on first use
    """A ``spektral.data.Dataset`` holding ``graphs`` (see ``_spektral_dataset_class``), or a
    ``MinimalDataset`` when spektral cannot be imported."""
    if spektral_data() is None:
        return MinimalDataset(graphs, **kwargs)
    return _spektral_dataset_class()(graphs, **kwargs)


class QM9Data:
    """What ``load_qm9`` returns: spektral datasets + normalisation + metadata."""

    def __init__(self, train, val, test, mean, std, info):
        self.train, self.val, self.test = train, val, test
        self.mean, self.std = mean, std
        self.info = info

    def denormalize(self, y):
        return np.asarray(y) * self.std + self.mean

    def __repr__(self):
        return (f"QM9Data(train={len(self.train)}, val={len(self.val)}, test={len(self.test)}, "
                f"features={self.info['features']!r})")


def load_qm9(cache_dir=None, split_seed=0, subset=None, features="rdkit", rebuild=False,
             progress=True, data_dir=None, n_test=10_000, n_val=10_000):
    """The QM9 split as spektral datasets with z-scored targets.

    subset: None for all molecules, or ``(n_train, n_val, n_test)``: the first
    molecules of each part of the full seeded split (so a subset's test set is
    part of the full test set).  Only those molecules are preprocessed.
    """
    if data_dir is not None:
        n_total = len(read_qm9_frame(data_dir))
    else:
        n_total = N_MOLECULES
    train, val, test = split_indices(n_total, split_seed, n_test, n_val)
    if subset is not None:
        ntr, nva, nte = subset
        train, val, test = train[:ntr], val[:nva], test[:nte]
        rows = np.concatenate([train, val, test])
        arrays, path = load_arrays(rows, cache_dir, rebuild, progress, data_dir)
        pos = {r: i for i, r in enumerate(arrays["rows"])}
        parts = [np.array([pos[r] for r in part], np.int64) for part in (train, val, test)]
    else:
        arrays, path = load_arrays(None, cache_dir, rebuild, progress, data_dir)
        pos = np.full(n_total, -1, np.int64)
        pos[arrays["rows"]] = np.arange(len(arrays["rows"]))
        parts = [pos[p] for p in (train, val, test)]
    y = arrays["targets"]
    mean = y[parts[0]].mean(axis=0)
    std = y[parts[0]].std(axis=0)
    yz = ((y - mean) / std).astype(np.float32)
    t0 = time.perf_counter()
    datasets = []
    for name, p in zip(("train", "val", "test"), parts):
        sub = _take(arrays, p)
        datasets.append(QM9Graphs(make_graphs(sub, yz[p], features), name=name))
    if progress:
        print(f"QM9: built {sum(len(d) for d in datasets)} spektral graphs in "
              f"{time.perf_counter() - t0:.1f} s")
    info = dict(cache=path, features=features, split_seed=split_seed, n_total=n_total,
                rows={k: arrays["rows"][p] for k, p in zip(("train", "val", "test"), parts)},
                n_bond_fallback=int((arrays["status"] == 1).sum()),
                n_rdkit_failed=int((arrays["status"] == 2).sum()))
    return QM9Data(*datasets, mean=mean, std=std, info=info)


# --------------------------------------------------------------------------- batching

_PAIRS = {}


def _complete_pairs(n):
    """Row-major (i, j), i != j, of an n-node complete graph (cached)."""
    if n not in _PAIRS:
        i, j = np.nonzero(~np.eye(n, dtype=bool))
        _PAIRS[n] = (i.astype(np.int64), j.astype(np.int64))
    return _PAIRS[n]


def graph_edges(graph, edges="complete"):
    """(src, dst, edge features (k, 5)) of one spektral Graph.

    edges="complete": every ordered pair of distinct atoms (the reference's
    ``Complete`` transform), bond one-hot where bonded, zeros elsewhere;
    edges="bonds": only the bonded pairs.  The last feature is the distance (A).
    """
    n = graph.n_nodes
    row, col = np.nonzero(graph.a)  # row-major: the order of graph.e
    if edges == "complete":
        src, dst = _complete_pairs(n)
        bond = np.zeros((n, n, 4), np.float32)
        bond[row, col] = graph.e
        eb = bond[src, dst]
    elif edges == "bonds":
        src, dst = row.astype(np.int64), col.astype(np.int64)
        eb = graph.e
    else:
        raise ValueError(f"edges must be 'complete' or 'bonds', got {edges!r}")
    d = np.linalg.norm(graph.pos[src] - graph.pos[dst], axis=-1).astype(np.float32)
    return src, dst, np.concatenate([eb, d[:, None]], axis=1)


def _round_up(v, q):
    return int(-(-v // q) * q)


def collate(graphs, batch_size=None, edges="complete", node_quantum=256, edge_quantum=4096,
            tasks=TARGETS):
    """Disjoint-mode batch of spektral Graphs, padded to bucketed sizes.

    Returns ``(inputs, targets)``: inputs is a dict of numpy arrays nodes
    (N, 11), edges (E, 5), edge_src/edge_dst (E,) int32, node_graph (N,) int32,
    graph_mask (B,) float32; targets a dict task -> (B, 1) float32.
    B = ``batch_size`` (default: the number of graphs; extra graphs have mask 0,
    no nodes and target 0).  N and E are rounded up to multiples of the quanta;
    N is always larger than the real node count: padding nodes belong to graph
    B, padding edges join the first padding node to itself.  So only a few
    shapes ever occur (few recompilations under JAX / XLA).
    """
    b = batch_size or len(graphs)
    x = np.concatenate([g.x for g in graphs], axis=0)
    i = np.repeat(np.arange(len(graphs), dtype=np.int32), [g.n_nodes for g in graphs])
    n_real = len(x)
    srcs, dsts, es = [], [], []
    offset = 0
    for g in graphs:
        s, d, e = graph_edges(g, edges)
        srcs.append(s + offset)
        dsts.append(d + offset)
        es.append(e)
        offset += g.n_nodes
    src = np.concatenate(srcs)
    dst = np.concatenate(dsts)
    e = np.concatenate(es)
    n_pad = _round_up(n_real + 1, node_quantum) if node_quantum else n_real + 1
    e_pad = _round_up(max(len(src), 1), edge_quantum) if edge_quantum else len(src)
    nodes = np.zeros((n_pad, x.shape[1]), np.float32)
    nodes[:n_real] = x
    node_graph = np.full(n_pad, b, np.int32)
    node_graph[:n_real] = i
    edge_src = np.full(e_pad, n_real, np.int32)
    edge_dst = np.full(e_pad, n_real, np.int32)
    edge_src[:len(src)] = src
    edge_dst[:len(dst)] = dst
    edge_attr = np.zeros((e_pad, e.shape[1]), np.float32)
    edge_attr[:len(e)] = e
    mask = np.zeros(b, np.float32)
    mask[:len(graphs)] = 1.0
    y = np.zeros((b, len(TARGETS)), np.float32)
    y[:len(graphs)] = np.stack([g.y for g in graphs])
    inputs = dict(nodes=nodes, edges=edge_attr, edge_src=edge_src, edge_dst=edge_dst,
                  node_graph=node_graph, graph_mask=mask)
    targets = {t: y[:, TARGETS.index(t):TARGETS.index(t) + 1] for t in tasks}
    return inputs, targets


def _py_dataset_base():
    import keras

    return keras.utils.PyDataset


class GraphLoader(_py_dataset_base()):
    """``keras.utils.PyDataset`` over a spektral Dataset, yielding numpy batches.

    Works on every Keras backend (spektral's own ``DisjointLoader`` yields a
    ``tf.SparseTensor`` adjacency, which torch and JAX cannot take).  Batches
    come from ``collate`` (complete graph + distances, padded to bucketed
    sizes).  ``shuffle`` reshuffles every epoch with a seeded generator;
    ``drop_remainder`` drops the last short batch (training); otherwise the
    last batch holds the remaining graphs only (B smaller, no padding graphs:
    MultiTaskModel's compiled metrics take no sample weights, so padding
    graphs would enter the MAE).
    """

    def __init__(self, dataset, batch_size=128, shuffle=False, drop_remainder=False, seed=0,
                 edges="complete", node_quantum=256, edge_quantum=4096, tasks=TARGETS):
        super().__init__()
        self.dataset = dataset
        self.batch_size = int(batch_size)
        self.shuffle = shuffle
        self.drop_remainder = drop_remainder
        self.edges = edges
        self.node_quantum = node_quantum
        self.edge_quantum = edge_quantum
        self.tasks = tuple(tasks)
        self._rng = np.random.default_rng(seed)
        self._order = np.arange(len(dataset))
        if shuffle:
            self._order = self._rng.permutation(len(dataset))

    def __len__(self):
        n = len(self.dataset)
        return n // self.batch_size if self.drop_remainder else -(-n // self.batch_size)

    def batch_graphs(self, index):
        idx = self._order[index * self.batch_size:(index + 1) * self.batch_size]
        return [self.dataset[int(k)] for k in idx]

    def __getitem__(self, index):
        if index >= len(self):
            raise IndexError(index)
        return collate(self.batch_graphs(index), None, self.edges,
                       self.node_quantum, self.edge_quantum, self.tasks)

    def n_real(self, index):
        """Number of real graphs in batch ``index``."""
        return min(self.batch_size, len(self.dataset) - index * self.batch_size)

    def on_epoch_end(self):
        if self.shuffle:
            self._order = self._rng.permutation(len(self.dataset))

    def as_tf_dataset(self):
        """A ``tf.data.Dataset`` with unknown node/edge dims (TensorFlow backend:
        Keras infers a PyDataset's signature from its first two batches, which
        would freeze the bucketed sizes)."""
        import tensorflow as tf

        b = None if not self.drop_remainder else self.batch_size
        sig_in = dict(
            nodes=tf.TensorSpec((None, N_NODE_FEATURES), tf.float32),
            edges=tf.TensorSpec((None, N_EDGE_FEATURES), tf.float32),
            edge_src=tf.TensorSpec((None,), tf.int32), edge_dst=tf.TensorSpec((None,), tf.int32),
            node_graph=tf.TensorSpec((None,), tf.int32), graph_mask=tf.TensorSpec((b,), tf.float32))
        sig_y = {t: tf.TensorSpec((b, 1), tf.float32) for t in self.tasks}

        def gen():
            for k in range(len(self)):
                yield self[k]
            self.on_epoch_end()

        ds = tf.data.Dataset.from_generator(gen, output_signature=(sig_in, sig_y))
        return ds.apply(tf.data.experimental.assert_cardinality(len(self))).prefetch(2)


def edge_count_stats(dataset, edges="complete"):
    """Mean nodes / directed edges per molecule (for sizing presets)."""
    n = np.array([g.n_nodes for g in dataset])
    if edges == "complete":
        e = n * (n - 1)
    else:
        e = np.array([int(np.count_nonzero(g.a)) for g in dataset])
    return float(n.mean()), float(e.mean())


__all__ = [
    "FORMAT_VERSION", "TARGETS", "TARGET_LABELS", "TARGET_UNITS", "PAPER_SCALE", "PAPER_UNITS",
    "HARTREE_TO_EV", "ATOMREF_EV", "CacheVersionError", "qm9pack_data_dir", "default_cache_dir",
    "read_qm9_frame", "parse_elements", "parse_xyz", "featurize_molecule", "qm9_targets",
    "preprocess", "subset_cache_name", "save_cache", "load_cache", "split_indices", "load_arrays", "node_features",
    "bond_features", "spektral_data", "MinimalGraph", "MinimalDataset", "make_graphs",
    "QM9Graphs", "QM9Data", "load_qm9", "graph_edges", "collate",
    "GraphLoader", "edge_count_stats",
]

