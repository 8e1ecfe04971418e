from __future__ import annotations

import json

import pytest

from runtime.errors import SpecError
from runtime.spec import FeatureSpec
from tests.conftest import TOY_SPEC


def test_round_trip_and_sides(tmp_path):
    spec = FeatureSpec.from_dict(TOY_SPEC)
    assert [i.name for i in spec.user_inputs] == ["user_ids", "user_dense"]
    assert [i.name for i in spec.group_inputs] == ["item_ids", "item_dense"]
    p = tmp_path / "s.json"
    p.write_text(json.dumps(spec.to_dict()))
    assert FeatureSpec.load(p) == spec


def test_yaml_and_dict_args(tmp_path):
    p = tmp_path / "s.yaml"
    p.write_text(
        "name: tt\ninputs:\n"
        "  - {name: user.ids, side: user, dtype: int64, shape: [3], vocab: 10}\n"
        "  - {name: item.ids, side: group, dtype: int64, shape: [1], vocab: 10}\n"
        "outputs: [ctr]\n"
    )
    spec = FeatureSpec.load(p)
    assert spec.inputs[0].arg == "user" and spec.inputs[0].key == "ids"


def test_columns_form():
    spec = FeatureSpec.from_dict({
        "name": "c",
        "inputs": [{"name": "x", "dtype": "float32", "shape": [9],
                    "columns": {"user": [[0, 5]], "group": [[5, 9]]}}],
    })
    assert spec.inputs[0].side == "mixed"
    assert spec.inputs[0].user_columns() == [0, 1, 2, 3, 4]
    assert spec.group_inputs == spec.inputs


@pytest.mark.parametrize(
    "mutate, message",
    [
        (lambda d: d["inputs"][0].update(dtype="float8"), "dtype 'float8'"),
        (lambda d: d["inputs"][0].update(side="both"), "side 'both'"),
        (lambda d: d["inputs"][0].update(shape=[0]), "positive ints"),
        (lambda d: d["inputs"][1].update(vocab=10), "'vocab' applies to integer ids"),
        (lambda d: d["inputs"].append(dict(d["inputs"][0])), "more than once"),
        (lambda d: d.update(inputs=[i for i in d["inputs"] if i["side"] == "user"]), "no group"),
        (lambda d: d["inputs"][0].update(colour="red"), "unknown keys"),
        (lambda d: d.update(outputs=[]), "outputs"),
    ],
)
def test_bad_specs_name_the_problem(mutate, message):
    d = json.loads(json.dumps(TOY_SPEC))
    mutate(d)
    with pytest.raises(SpecError, match=message):
        FeatureSpec.from_dict(d)


def test_overlapping_columns_refused():
    with pytest.raises(SpecError, match="claimed by both"):
        FeatureSpec.from_dict({
            "name": "c",
            "inputs": [{"name": "x", "dtype": "float32", "shape": [4],
                        "columns": {"user": [[0, 3]], "group": [[2, 4]]}}],
        })


def test_missing_spec_file(tmp_path):
    with pytest.raises(SpecError, match="does not exist"):
        FeatureSpec.load(tmp_path / "nope.yaml")
