"""``ugsep export``'s flags are the steps' own options (add_arguments / from_args per step
module, composed by ExportOptions): every option has a flag, the flags' defaults are the
dataclasses' defaults, and building the CLI parser imports no step (no torch)."""

from __future__ import annotations

import dataclasses
import subprocess
import sys
from pathlib import Path

import pytest

from exporter.cli import build_parser
from exporter.pipeline import ExportOptions
from exporter.steps.embeddings import EmbeddingsOptions
from exporter.steps.optimize import OptimizeOptions
from exporter.steps.quantize import QuantizeStepOptions
from exporter.steps.tensorrt import TensorRTOptions
from exporter.steps.threads import ThreadsOptions
from exporter.steps.write import WriteOptions

ROOT = Path(__file__).resolve().parents[1]


def _parse(*flags: str):
    return build_parser().parse_args(["export", "ckpt", "-o", "out", *flags])


def test_the_flags_defaults_are_the_options_defaults():
    assert ExportOptions.from_args(_parse()) == ExportOptions()


def test_every_step_option_has_a_flag():
    opts = ExportOptions.from_args(_parse(
        "--precision", "w4a16", "--target", "trt", "--no-split", "--no-parity", "--parity-rows", "9",
        "--budgets", "b.yaml", "--serve-threads", "2", "--max-candidates", "64", "--overwrite",
        "--seed", "3",
        "--embeddings", "int8", "--store-min-bytes", "5",
        "--moe-form", "dense", "--no-per-token-layout",
        "--quant-min-elements", "0", "--quant-per-token-stages", "user", "group", "--no-quant-tune",
        "--quant-small-batch", "off", "--quant-block-size", "64", "--quant-accuracy-level", "0",
        "--quant-stages", "user",
        "--no-stage-threads",
        "--trt-m", "1,2,4", "--trt-n", "1,64,256", "--trt-require-gpu",
        "--external-data-bytes", "7",
    ))
    assert opts == ExportOptions(
        precision="w4a16", split=False, parity=False, parity_rows=9, max_candidates=64,
        overwrite=True, seed=3, target="trt", serve_threads=2, budgets="b.yaml",
        embeddings=EmbeddingsOptions(dtype="int8", min_bytes=5),
        optimize=OptimizeOptions(per_token_layout=False, moe_form="dense"),
        quantize=QuantizeStepOptions(min_elements=0, per_token_stages=("user", "group"), tune=False,
                                     small_batch=0, block_size=64, accuracy_level=0, stages=("user",)),
        threads=ThreadsOptions(enabled=False),
        tensorrt=TensorRTOptions(m="1,2,4", n="1,64,256", require_gpu=True),
        write=WriteOptions(external_data_bytes=7),
    )
    # each step option above differs from its default: none is left without a flag
    for name, cls in ExportOptions.STEP_OPTIONS.items():
        given, default = getattr(opts, name), cls()
        same = [f.name for f in dataclasses.fields(cls) if getattr(given, f.name) == getattr(default, f.name)]
        assert not same, f"{cls.__name__}: no flag changed {same}"


@pytest.mark.parametrize("flags", [["--serve-threads", "0"], ["--quant-small-batch", "-1"],
                                   ["--embeddings", "int4"], ["--quant-stages", "side"]])
def test_a_bad_flag_is_a_usage_error(flags, capsys):
    with pytest.raises(SystemExit) as e:
        _parse(*flags)
    assert e.value.code == 2
    assert flags[0] in capsys.readouterr().err


def test_building_the_parser_imports_no_step():
    code = ("import sys; from exporter.cli import build_parser; build_parser(); "
            "print(sorted(m for m in ('torch', 'exporter.pipeline', 'exporter.steps.capture') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                         env={"PYTHONPATH": str(ROOT), "PATH": ""}, check=True).stdout
    assert out.strip() == "[]"
