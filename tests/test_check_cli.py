"""`ugsep check --data`: every row of the file by default (as export's parity step), --rows limits."""

from __future__ import annotations

import json
import shutil

from exporter.cli import main
from runtime.sample import sample_requests
from runtime.spec import FeatureSpec
from students.data import save_npz
from tests.conftest import TOY_SPEC


def test_check_uses_all_data_rows_unless_rows_limits(toy_bundle, tmp_path, capsys):
    bundle = shutil.copytree(toy_bundle, tmp_path / "b")
    rows, rid = sample_requests(FeatureSpec.from_dict(TOY_SPEC), 13, 100, seed=3)
    data = save_npz(tmp_path / "held.npz", {**rows, "request_id": rid})
    capsys.readouterr()
    assert main(["check", str(bundle), "--trust-module", "tests", "--data", str(data)]) == 0
    assert "1300 rows, 13 requests" in capsys.readouterr().err
    assert json.loads((bundle / "parity.json").read_text())["rows"]["n"] == 1300
    assert main(["check", str(bundle), "--trust-module", "tests", "--data", str(data), "--rows", "250"]) == 0
    assert "250 rows" in capsys.readouterr().err
    assert main(["check", str(bundle), "--trust-module", "tests", "--rows", "300"]) == 0  # no data: sampled rows
    assert "sampled" in capsys.readouterr().err
