"""Column-layout inputs (runtime.columns): per-column side and vocabulary, sampling each
column from its own domain, and float-coded ids validated like integer ids (400, never an
ONNX Runtime error)."""

from __future__ import annotations

import numpy as np
import pytest

from runtime.errors import RequestError, SpecError
from runtime.sample import sample_requests, sample_rows
from runtime.spec import FeatureSpec
from runtime.validate import check_candidates, check_user

COLUMNS = [
    {"name": "user_id", "side": "user", "vocab": 50},
    {"name": "user_age", "side": "user", "vocab": 8},
    {"name": "user_score", "side": "user"},
    {"name": "item_tags", "side": "group", "vocab": 60, "width": 2},
    {"name": "item_price", "side": "group"},
]
SPEC = {"name": "ctr", "outputs": ["ctr"],
        "inputs": [{"name": "X", "dtype": "float32", "shape": [6], "columns": COLUMNS}]}


def test_list_form_derives_sides_and_ranges_and_round_trips():
    spec = FeatureSpec.from_dict(SPEC)
    x = spec.input("X")
    assert x.side == "mixed" and x.columns == {"user": ((0, 3),), "group": ((3, 6),)}
    assert x.user_columns() == [0, 1, 2]
    assert [(f.name, f.start, f.width, f.vocab) for f in x.fields][3] == ("item_tags", 3, 2, 60)
    assert FeatureSpec.from_dict(spec.to_dict()) == spec


def test_older_range_form_still_reads():
    old = {"name": "x", "inputs": [{"name": "X", "side": "mixed", "dtype": "float32", "shape": [9],
                                    "columns": {"user": [[0, 5]], "group": [[5, 9]]}}]}
    x = FeatureSpec.from_dict(old).input("X")
    assert x.fields is None and x.user_columns() == [0, 1, 2, 3, 4]


@pytest.mark.parametrize(
    ("columns", "says"),
    [
        (COLUMNS[:-1], "widths add up to 5; the last dim is 6"),
        ([*COLUMNS[:-1], {"name": "p", "side": "item"}], "side 'item' is not user or group"),
        ([*COLUMNS[:-1], {"name": "p", "side": "group", "vocab": 0}], "'vocab' must be a positive int"),
    ],
)
def test_bad_column_lists_refused(columns, says):
    bad = {**SPEC, "inputs": [{**SPEC["inputs"][0], "columns": columns}]}
    with pytest.raises(SpecError, match=says):
        FeatureSpec.from_dict(bad)


def test_sampling_draws_each_column_from_its_domain():
    x = sample_rows(FeatureSpec.from_dict(SPEC), 2000, seed=3)["X"]
    for col, vocab in ((0, 50), (1, 8), (3, 60), (4, 60)):
        assert np.all(x[:, col] == np.round(x[:, col])) and x[:, col].min() >= 0
        assert x[:, col].max() == vocab - 1  # 2000 draws reach the top id
    assert x[:, 2].min() < 0 < x[:, 2].max() and not np.all(x[:, 5] == np.round(x[:, 5]))


def test_requests_keep_user_columns_equal_within_a_request():
    rows, rid = sample_requests(FeatureSpec.from_dict(SPEC), 3, 4, seed=1)
    for r in range(3):
        block = rows["X"][rid == r][:, :3]
        assert np.array_equal(block, np.broadcast_to(block[:1], block.shape))


def _cands() -> dict:
    x = sample_rows(FeatureSpec.from_dict(SPEC), 4, seed=0)["X"]
    x[:, :3] = x[:1, :3]  # one request is one user
    return {"X": x}


@pytest.mark.parametrize(
    ("where", "value", "says"),
    [
        ((2, 3), 2.5, "input 'X' column 3 ('item_tags') has a non-integer id: 2.5"),
        ((1, 4), -1.0, "input 'X' column 4 ('item_tags') has an id outside its vocabulary [0, 60): -1"),
        ((0, 3), 60.0, "input 'X' column 3 ('item_tags') has an id outside its vocabulary [0, 60): 60"),
        ((3, 3), float("nan"), "column 3 ('item_tags') has a non-integer id: nan"),
    ],
)
def test_float_coded_ids_are_validated_naming_input_column_and_value(where, value, says):
    spec = FeatureSpec.from_dict(SPEC)
    cands = _cands()
    cands["X"][where] = value
    with pytest.raises(RequestError) as e:
        check_candidates(spec, cands, 100)
    assert says in str(e.value)


def test_user_side_column_input_is_validated_too():
    spec = FeatureSpec.from_dict({"name": "u", "outputs": ["ctr"], "inputs": [
        {"name": "U", "dtype": "float32", "shape": [2],
         "columns": [{"name": "uid", "side": "user", "vocab": 5}, {"name": "d", "side": "user"}]},
        {"name": "g", "side": "group", "dtype": "float32", "shape": [1]}]})
    assert spec.input("U").side == "user"
    check_user(spec, {"U": np.array([4.0, -3.5], np.float32)})
    with pytest.raises(RequestError, match=r"column 0 \('uid'\) has an id outside .*: 5"):
        check_user(spec, {"U": np.array([5.0, 0.0], np.float32)})
