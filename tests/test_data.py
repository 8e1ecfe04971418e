"""exporter.data.load_rows: held-out files named as the spec, or as the students' generator."""

from __future__ import annotations

import csv

import numpy as np
import pytest

from exporter.data import load_rows
from exporter.errors import ExportError
from runtime.spec import FeatureSpec
from students.data import make_dataset, rename, save_npz
from students.zoo import build_model, model_kwargs


@pytest.fixture(scope="module")
def twotower():
    """The two-tower student's spec (dict-leaf inputs ``user.ids`` …) and generator rows."""
    model = build_model(**model_kwargs("twotower", "tiny"))
    spec = FeatureSpec.from_dict(model.feature_spec())
    _, _, held = make_dataset("tiny", n_train=10, n_requests=3, candidates=5, seed=0)
    return model, spec, held


def test_npz_with_generator_names_maps_to_dict_leaf_inputs(twotower, tmp_path):
    model, spec, held = twotower
    assert "user.ids" in {s.name for s in spec.inputs} and "user_ids" in held
    path = save_npz(tmp_path / "flat.npz", held)  # user_ids, item_dense, … as generated
    rows = load_rows(path, spec)
    assert set(rows) == {s.name for s in spec.inputs} | {"label", "request_id", "prob"}
    for canon, name in model.input_names.items():
        np.testing.assert_array_equal(rows[name], held[canon].astype(spec.input(name).dtype))
    np.testing.assert_array_equal(rows["label"], held["label"])


def test_npz_named_as_the_spec_loads_unchanged(twotower, tmp_path):
    model, spec, held = twotower
    path = save_npz(tmp_path / "spec.npz", rename(held, model.input_names))
    rows = load_rows(path, spec)
    np.testing.assert_array_equal(rows["user.seq"], held["user_seq"])


def test_missing_input_lists_what_is_missing_and_what_is_there(twotower, tmp_path):
    _, spec, held = twotower
    rows = {k: v for k, v in held.items() if k != "item_dense"}
    with pytest.raises(ExportError) as e:
        load_rows(save_npz(tmp_path / "m.npz", rows), spec)
    msg = str(e.value)
    assert "['item.dense']" in msg and "'user_ids'" in msg and "item_dense" in msg


def test_ambiguous_names_are_refused(twotower, tmp_path):
    model, spec, held = twotower
    rows = {**held, "user/ids": held["user_ids"]}  # two arrays that both read as user.ids
    with pytest.raises(ExportError, match="'user.ids' is ambiguous"):
        load_rows(save_npz(tmp_path / "a.npz", rows), spec)


def test_csv_with_flat_column_names(twotower, tmp_path):
    _, spec, held = twotower
    path = tmp_path / "flat.csv"
    header, cols = [], []
    for s in spec.inputs:
        flat = s.name.replace(".", "_")
        a = held[flat].reshape(len(held["label"]), -1)
        header += [f"{flat}[{i}]" for i in range(a.shape[1])]
        cols.append(a)
    table = np.concatenate([c.astype(np.float64) for c in cols] + [held["label"][:, None]], 1)
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(header + ["label"])
        w.writerows(table.tolist())
    rows = load_rows(path, spec)
    np.testing.assert_array_equal(rows["item.ids"], held["item_ids"])
    np.testing.assert_allclose(rows["user.dense"], held["user_dense"], rtol=1e-6)
