"""Three real QM9 rows (methane, water, benzene: QM9 indices 1, 3, 214, copied from the dataset) and a writer
of small synthetic datasets in qm9pack's CSV format (rigidly moved copies of them)."""

import numpy as np

# Columns of qm9pack/data/qm9_part*.csv
CSV_HEADER = (
    "XYZ_file,Index,SMILES,InChi,N_atoms,Stoichiometry,Elements,XYZ_Ang,Mulliken_pop,Harmonic_Freq_cmi,"
    "RotA_GHz,RotB_GHz,RotC_GHz,Dipole_debye,Polarizability_bohr3,HOMO_au,LUMO_au,HOMO_LUMO_gap_au,R2_bohr2,"
    "ZPVE_au,InternalEnergy_0K_au,InternalEnergy_298K_au,Enthalphy_298K_au,GibbsFreeEnergy_298K_au,"
    "Heatcapacity_Cv_cal_mol_K"
)

# (index, smiles, elements, xyz (Angstrom), [mu, alpha, homo, lumo, r2, zpve, U0, U, H, G, cv] as in the CSV)
MOLECULES = {
    "methane": (1, "C", ["C", "H", "H", "H", "H"], [
        [-0.0126981359, 1.0858041578, 0.0080009958], [0.002150416, -0.0060313176, 0.0019761204],
        [1.0117308433, 1.4637511618, 0.0002765748], [-0.540815069, 1.4475266138, -0.8766437152],
        [-0.5238136345, 1.4379326443, 0.9063972942]],
        [0.0, 13.21, -0.3877, 0.1171, 35.3641, 0.044749, -40.47893, -40.476062, -40.475117, -40.498597, 6.469]),
    "water": (3, "O", ["O", "H", "H"], [
        [-0.0343604951, 0.9775395708, 0.0076015923], [0.0647664923, 0.0205721989, 0.0015346341],
        [0.8717903737, 1.3007924048, 0.0006931336]],
        [1.8511, 6.31, -0.2928, 0.0687, 19.0002, 0.021375, -76.404702, -76.401867, -76.400922, -76.422349,
         6.002]),
    "benzene": (214, "C1=CC=CC=C1", ["C"] * 6 + ["H"] * 6, [
        [-0.0263621144, 1.3835086344, 0.0103870267], [1.1708019283, 2.0965810056, 0.0023045827],
        [2.3868915311, 1.4163752988, -0.0131380362], [2.4057296503, 0.0230978461, -0.0205116117],
        [1.2085609122, -0.6899726756, -0.0124063764], [-0.0075247651, -0.0097718365, 0.0030452239],
        [-0.9733414726, 1.9132329519, 0.0224498095], [1.1560436477, 3.1816075197, 0.0080224004],
        [3.3191394577, 1.9717268815, -0.0194567412], [3.3527113702, -0.5066219591, -0.0325112361],
        [1.223326423, -1.7750001478, -0.0181456652], [-0.9397757183, -0.565118069, 0.0093265237]],
        [0.0, 57.28, -0.2475, 0.0029, 456.6788, 0.100175, -232.164586, -232.160188, -232.159244, -232.192047,
         17.214]),
}


def csv_row(index, smiles, elements, xyz, props):
    el = "[" + ",".join(f"'{e}'" for e in elements) + "]"
    xyz_text = "[" + ",".join("[" + ",".join(repr(float(v)) for v in p) + "]" for p in xyz) + "]"
    counts = [elements.count(e) for e in ("H", "C", "N", "O", "F")]
    mu, alpha, homo, lumo, r2, zpve, u0, u, h, g, cv = props
    zeros = "[" + ",".join("0.0" for _ in elements) + "]"
    return (f'"dsgdb9nsd_{index:06d}.xyz",{index},"{smiles}","InChI=1S/x",{len(elements)},'
            f'"[{",".join(map(str, counts))}]","{el}","{xyz_text}","{zeros}","[1.0]",1.0,1.0,1.0,'
            f"{mu},{alpha},{homo},{lumo},{lumo - homo},{r2},{zpve},{u0},{u},{h},{g},{cv}")


def write_synthetic_qm9(folder, n, seed=0):
    """``n`` molecules (methane/water/benzene in turn, rotated + shifted, targets jittered) as
    qm9_part1.csv (first half) and qm9_part2.csv (rest) in ``folder``. Returns the rows' props (n, 11)."""
    rng = np.random.default_rng(seed)
    names = list(MOLECULES)
    rows, props_all = [], []
    for k in range(n):
        _, smiles, elements, xyz, props = MOLECULES[names[k % 3]]
        q, _ = np.linalg.qr(rng.normal(size=(3, 3)))
        moved = np.asarray(xyz) @ q.T + rng.normal(size=3)
        props = list(np.asarray(props) + rng.normal(scale=1e-3, size=11) * np.abs(props))
        rows.append(csv_row(k + 1, smiles, elements, moved, props))
        props_all.append(props)
    half = n // 2
    for name, part in (("qm9_part1.csv", rows[:half]), ("qm9_part2.csv", rows[half:])):
        with open(f"{folder}/{name}", "w") as f:
            f.write(CSV_HEADER + "\n" + "\n".join(part) + "\n")
    return np.array(props_all)


def write_cli_cache(folder, cache_dir, subset=(12, 6, 6), seed=3):
    """A cache for the CLI's ``--subset`` rows of the full QM9 split, holding synthetic molecules in their place
    (the real ones are in qm9pack): ``--subset N_TRAIN N_VAL N_TEST --cache-dir cache_dir`` then trains on it."""
    from applications.qm9 import data

    write_synthetic_qm9(folder, sum(subset), seed=seed)
    train_rows, val_rows, test_rows = data.split_indices()
    rows = np.concatenate([train_rows[:subset[0]], val_rows[:subset[1]], test_rows[:subset[2]]])
    arrays = data.preprocess(data.read_qm9_frame(str(folder)), np.arange(sum(subset)), progress=False)
    arrays["rows"] = rows
    data.save_cache(f"{cache_dir}/{data.subset_cache_name(rows)}", arrays)
    return rows
