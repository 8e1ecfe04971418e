"""The TokenMixer-Large-style MoE student: forms agree, ties go to the lowest expert index
(eager and exported ONNX alike), the load-balance loss is trained, and the sparse ONNX forms
(gather, grouped) equal the dense-masked one and the eager model."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import pytest
import torch

from exporter.steps.onnx_build import export_onnx
from graph_passes.onnx.moe import FORMS, SparseMoEFormPass
from graph_passes.onnx.moe_match import find_banks
from students.base import model_inputs
from students.data import make_dataset
from students.moe import TokenMoE, route_topk
from students.train import TrainConfig, fit
from students.zoo import build_student

torch.manual_seed(0)


def _forms(model: torch.nn.Module, form: str) -> None:
    for m in model.modules():
        if hasattr(m, "form"):
            m.form = form


def test_route_topk_ties_go_to_the_lowest_expert_index():
    logits = torch.tensor([[1.0, 1.0, 1.0, 0.0], [0.0, 2.0, 2.0, 2.0], [3.0, 0.0, 3.0, 5.0]])
    vals, idx = route_topk(logits, 2)
    assert idx.tolist() == [[0, 1], [1, 2], [3, 0]]
    assert vals.tolist() == [[1.0, 1.0], [2.0, 2.0], [5.0, 3.0]]


def test_gather_and_dense_forms_agree_and_only_k_experts_matter():
    moe = TokenMoE(n_tokens=3, d_model=8, hidden=16, n_experts=5, top_k=2).eval()
    x = torch.randn(7, 3, 8)
    with torch.no_grad():
        moe.experts.form = "gather"
        sparse = moe(x)
        moe.experts.form = "dense"
        dense = moe(x)
        _, idx, _ = moe.route(x)
        unused = torch.ones(3, 5, dtype=torch.bool)  # experts no row selected: any weights
        for t in range(3):
            unused[t, idx[:, t].unique()] = False
        moe.experts.w1.data[unused] = 1e3
        moe.experts.form = "gather"
        poisoned = moe(x)
    torch.testing.assert_close(sparse, dense, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(poisoned, sparse)


def test_training_records_the_load_balance_loss_and_it_trains():
    _, rows, _ = make_dataset("tiny", 1024, 4, 4, seed=0)
    model = build_student("tokenmixer", "tiny")
    model.train()
    model.logits(**model_inputs(model, rows, slice(0, 64)))
    aux = model.aux_loss()
    assert aux is not None and aux.item() >= 1.0 * len(model.layers) * 2 - 1e-4  # >= 1 per layer
    hist = fit(model, rows, TrainConfig(batch_size=128, max_steps=4, lr=1e-3), epochs=1, seed=0)
    assert np.isfinite(hist["final_loss"]) and hist["steps"] == 4
    assert not model.training


class _TieMoE(torch.nn.Module):
    """One TokenMoE (k=1) whose router has duplicate expert columns: every row ties."""

    def __init__(self, gate: str) -> None:
        super().__init__()
        self.moe = TokenMoE(n_tokens=2, d_model=8, hidden=8, n_experts=4, top_k=1, gate=gate)
        with torch.no_grad():
            r = self.moe.router
            r[:, :, 2] = r[:, :, 1]  # experts 1 and 2 tie everywhere
            r[:, :, 3] = r[:, :, 0]  # experts 0 and 3 tie everywhere
            self.moe.experts.b2.normal_()

    def forward(self, x):
        return self.moe(x).sum(-1)


def _onnx_forms(model: torch.nn.Module, x: torch.Tensor) -> dict[str, np.ndarray]:
    dim = torch.export.Dim("batch", min=1, max=4096)
    ep = torch.export.export(model, (x,), dynamic_shapes=({0: dim},))
    proto = export_onnx(ep, ["x"], ["y"])
    assert len(find_banks(ir.serde.deserialize_model(proto).graph)[0]) == 1
    out = {}
    for form in FORMS:
        m = ir.serde.deserialize_model(proto)
        assert SparseMoEFormPass(form)(m).modified
        rewritten = ir.serde.serialize_model(m)
        onnx.checker.check_model(rewritten)
        sess = ort.InferenceSession(rewritten.SerializeToString(), providers=["CPUExecutionProvider"])
        out[form] = sess.run(None, {"x": x.numpy()})[0]
    return out


@pytest.mark.parametrize("gate", ["softmax", "sigmoid"])
def test_tied_router_scores_pick_the_lowest_index_in_eager_and_every_onnx_form(gate):
    model = _TieMoE(gate).eval()
    x = torch.randn(33, 2, 8)
    with torch.no_grad():
        logits, idx, _ = model.moe.route(x)
        want = model(x).numpy()
        assert (idx < 2).all()  # the tie rule: 0 beats 3, 1 beats 2
        e = model.moe.experts  # the higher tied twin would give a different score
        e.w1.data[:, 2:] = e.w1.data[:, [1, 0]]
        e.w2.data[:, 2:], e.b2.data[:, 2:] = e.w2.data[:, [1, 0]], e.b2.data[:, [1, 0]]
        e.b1.data[:, 2:] = e.b1.data[:, [1, 0]]
        assert torch.allclose(model(x), torch.from_numpy(want))  # twins equal: same answer
        e.b2.data[:, 2:] += 1.0  # twins differ: only a wrong tie rule would see it
        assert torch.allclose(model(x), torch.from_numpy(want))
    for form, got in _onnx_forms(model, x).items():
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5, err_msg=form)


def test_trt_lint_covers_the_moe_forms_and_names_the_one_a_trt_build_gets():
    from exporter.steps.moe_form import trt_form
    from exporter.steps.tensorrt import lint_models
    from graph_passes.onnx.trt_support import has_errors

    model = _TieMoE("softmax").eval()
    x = torch.randn(5, 2, 8)
    ep = torch.export.export(model, (x,), dynamic_shapes=({0: torch.export.Dim("b", max=64)},))
    proto = export_onnx(ep, ["x"], ["y"])
    forms = {}
    for form in FORMS:
        m = ir.serde.deserialize_model(proto)
        moe = SparseMoEFormPass(form)
        moe(m)
        forms[form] = ir.serde.serialize_model(m)
    findings = lint_models(forms)
    assert not has_errors(findings["gather"]) and not has_errors(findings["dense"])
    for form in ("grouped", "padded"):  # data-dependent TopK K (the sort): not in TensorRT
        assert has_errors(findings[form])
        assert any("TopK" in str(f) and "build-time constant" in str(f) for f in findings[form])
    assert has_errors(findings["fused"])  # com.microsoft.MoE: an ONNX Runtime contrib op
    assert any("MoE" in str(f) and "contrib op" in str(f) for f in findings["fused"])
    assert trt_form(moe.banks) == "dense"  # E=4 <= 8
    assert trt_form([{**moe.banks[0], "experts": 16}]) == "gather"


def test_flop_count_counts_the_activated_experts_only():
    from graph_passes.fx import FLOPS_KEY, FlopCountPass
    from graph_passes.fx._base import batch_symbol

    t, d, h, e, k = 3, 8, 16, 6, 2
    moe = TokenMoE(n_tokens=t, d_model=d, hidden=h, n_experts=e, top_k=k).eval()
    ep = torch.export.export(moe, (torch.randn(4, t, d),),
                             dynamic_shapes=({0: torch.export.Dim("b", max=64)},))
    FlopCountPass(batch_symbol(ep, ["x"])).call(ep)
    nodes = [n for n in ep.graph.nodes if n.op == "call_function"]
    matmul = sum(n.meta[FLOPS_KEY] for n in nodes if "matmul" in str(n.target) or "bmm" in str(n.target))
    router = sum(n.meta[FLOPS_KEY] for n in nodes if "einsum" in str(n.target))
    assert matmul == 2 * t * k * (d * h + h * d)  # k of the E experts, per row
    assert router == 2 * t * d * e


def test_student_graph_in_every_form_equals_eager():
    from exporter.steps.capture import capture, flat_input_names, to_torch_inputs
    from runtime.sample import sample_rows
    from runtime.spec import FeatureSpec
    from students.tokenmixer import TokenMixerConfig, TokenMixerStudent

    torch.manual_seed(1)
    model = TokenMixerStudent(TokenMixerConfig(n_layers=1, n_experts=5, gate="sigmoid")).eval()
    spec = FeatureSpec.from_dict(model.feature_spec())
    rows = sample_rows(spec, 40, 3)
    with torch.no_grad():
        want = model(**to_torch_inputs(spec, rows)).numpy()
    names = flat_input_names(spec, to_torch_inputs(spec, rows))
    proto = export_onnx(capture(model, spec), names, ["ctr"])
    for form in FORMS:
        m = ir.serde.deserialize_model(proto)
        assert SparseMoEFormPass(form)(m).modified
        sess = ort.InferenceSession(ir.serde.serialize_model(m).SerializeToString(),
                                    providers=["CPUExecutionProvider"])
        got = sess.run(None, {n: rows[n] for n in names})[0]
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6, err_msg=form)


def test_weight_bytes_count_the_gather_form_expert_tables_fp32_and_int8():
    from exporter.steps.graph_record import group_of, quantized_weights
    from graph_passes.onnx import linear_weight_bytes, quantize_onnx

    t, d, h, e = 2, 32, 64, 4
    moe = TokenMoE(n_tokens=t, d_model=d, hidden=h, n_experts=e, top_k=2).eval()
    ep = torch.export.export(moe, (torch.randn(3, t, d),),
                             dynamic_shapes=({0: torch.export.Dim("b", max=64)},))
    proto = export_onnx(ep, ["x"], ["y"])
    forms = {}
    for form in ("gather", "grouped"):
        m = ir.serde.deserialize_model(proto)
        SparseMoEFormPass(form)(m)
        assert [o.name for o in m.graph.outputs] == ["y"]  # the bank's output was the graph's
        forms[form] = m
    gather, grouped = (linear_weight_bytes(forms[f]) for f in ("gather", "grouped"))
    tables = 2 * t * e * d * h * 4  # w1 [T*E, D, H] and w2 [T*E, H, D], fp32
    assert gather["fp32"] == grouped["fp32"] >= tables  # the same expert weights, either form
    assert gather["layers"] == grouped["layers"] - 2 * t * e + 2  # one layer per table
    quantized = {f: quantize_onnx(forms[f], target="ort-cpu").model for f in ("gather", "grouped")}
    # the manifest's layer rows follow the written graph: int8 tables are seen as int8
    written = {f: quantized_weights(ir.serde.serialize_model(m)) for f, m in quantized.items()}
    names = {"experts.w1_table", "experts.w2_table"}
    assert {w: p for w, p in written["gather"].items() if "router" not in w} == dict.fromkeys(names, "int8")
    assert {group_of(w) for w in written["grouped"]} == {"experts.w1", "experts.w2"}
    q = linear_weight_bytes(quantized["gather"])
    assert q["quantized_layers"] == 2  # the two tables (the router stays float)
    assert q["quantized_layers_fp32"] == tables
    # int8 payload + one fp32 scale per (token, expert, output channel)
    assert q["quantized_layers_bytes"] == 2 * t * e * d * h + 4 * t * e * (h + d)


def test_routing_rounds_fuse_into_one_topk_and_keep_the_tie_rule():
    # k=2, experts 0, 1 and 2 tie everywhere: the rounds pick 0 then 1 (never 2) unless
    # expert 3 wins; expert 2 is made different, so a TopK ordering ties otherwise would show
    moe = TokenMoE(n_tokens=2, d_model=8, hidden=8, n_experts=4, top_k=2).eval()
    with torch.no_grad():
        moe.router[:, :, 1] = moe.router[:, :, 0]
        moe.router[:, :, 2] = moe.router[:, :, 0]
        moe.experts.b2.normal_()
    x = torch.randn(64, 2, 8)
    with torch.no_grad():
        _, idx, _ = moe.route(x)
        want = moe(x).numpy()
    assert not (idx == 2).any() and (idx[..., 0] != 3).any()  # the tie rule is exercised
    ep = torch.export.export(moe, (x,), dynamic_shapes=({0: torch.export.Dim("b", max=4096)},))
    proto = export_onnx(ep, ["x"], ["y"])
    for form in FORMS:
        m = ir.serde.deserialize_model(proto)
        moe_pass = SparseMoEFormPass(form)
        moe_pass(m)
        ops = [n.op_type for n in m.graph]
        assert moe_pass.fused_routing == 1 and "ArgMax" not in ops and "Where" not in ops, form
        sess = ort.InferenceSession(ir.serde.serialize_model(m).SerializeToString(),
                                    providers=["CPUExecutionProvider"])
        got = sess.run(None, {"x": x.numpy()})[0]
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5, err_msg=form)


def test_fused_form_w8a16_is_block_int8_qmoe_one_layer_group():
    """W8A16 of the fused form is com.microsoft.QMoE: its uint8 weights dequantize to the
    float weights within half a quantization step per (expert, channel, block), its output
    is as close to fp32 as the gather form's W8A16 (within 2x) but not equal; the bank is
    one layer group, its weight bytes are counted, and a selection naming only one of its
    two weights leaves it float."""
    from exporter.steps.graph_record import group_of, quantized_weights
    from exporter.steps.quantize import group_of as select_group_of
    from graph_passes.onnx import linear_layers, linear_weight_bytes, quantize_onnx
    from graph_passes.onnx.moe_quant import qmoe_block_size

    t, d, h, e = 2, 32, 64, 4
    torch.manual_seed(3)
    moe = TokenMoE(n_tokens=t, d_model=d, hidden=h, n_experts=e, top_k=2, gate="sigmoid").eval()
    with torch.no_grad():
        moe.experts.b1.normal_()
        moe.experts.b2.normal_()
    x = torch.randn(9, t, d)
    ep = torch.export.export(moe, (x,), dynamic_shapes=({0: torch.export.Dim("b", max=64)},))
    proto = export_onnx(ep, ["x"], ["y"])
    forms = {}
    for form in ("gather", "fused"):
        m = ir.serde.deserialize_model(proto)
        SparseMoEFormPass(form)(m)
        forms[form] = m
    fused_names = [n for n in linear_layers(forms["fused"]) if "fused_w" in n]
    assert sorted(fused_names) == ["experts.fused_w1", "experts.fused_w2"]
    assert {group_of(n) for n in fused_names} == {select_group_of(n) for n in fused_names} == {"experts"}

    def run(m):
        sess = ort.InferenceSession(ir.serde.serialize_model(m).SerializeToString(),
                                    providers=["CPUExecutionProvider"])
        return sess.run(None, {"x": x.numpy()})[0]

    fp32 = run(forms["fused"])
    half = quantize_onnx(ir.serde.serialize_model(forms["fused"]), only=["experts.fused_w1"])
    assert [n.op_type for n in half.model.graph if n.domain == "com.microsoft"] == ["MoE"]
    w8 = {f: quantize_onnx(ir.serde.serialize_model(m), target="ort-cpu") for f, m in forms.items()}
    qmoe = [n for n in w8["fused"].model.graph if n.domain == "com.microsoft"]
    assert [n.op_type for n in qmoe] == ["QMoE"]
    block = qmoe_block_size([d, h])
    assert block == 32 and qmoe[0].attributes["block_size"].value == block
    want = {1: moe.experts.w1.detach().numpy(), 2: moe.experts.w2.detach().numpy()}
    for j, (wi, si) in enumerate(((2, 3), (5, 6)), start=1):
        q = ir.convenience.get_const_tensor(qmoe[0].inputs[wi]).numpy().astype(np.float32) - 128
        s = ir.convenience.get_const_tensor(qmoe[0].inputs[si]).numpy()
        deq = (q.reshape(*s.shape, block) * s[..., None]).reshape(q.shape)  # [T*E, N, K]
        w = want[j].reshape(t * e, *want[j].shape[2:]).transpose(0, 2, 1)  # (out, in) per expert
        assert np.all(np.abs(deq - w) <= np.repeat(s, block, axis=-1) / 2 + 1e-7)
    got = {f: run(r.model) for f, r in w8.items()}
    err = {f: np.abs(g - fp32).max() for f, g in got.items()}
    assert 1e-4 < err["fused"] <= 2 * err["gather"]  # int8 weights change the output, as much
    written = quantized_weights(ir.serde.serialize_model(w8["fused"].model))
    assert {w: p for w, p in written.items() if "router" not in w} == {
        "experts.fused_w1": "int8", "experts.fused_w2": "int8"}
    before, after = linear_weight_bytes(forms["fused"]), linear_weight_bytes(w8["fused"].model)
    tables = 2 * t * e * d * h * 4
    assert before["fp32"] == linear_weight_bytes(forms["gather"])["fp32"] >= tables
    assert after["quantized_layers"] == 2 and after["quantized_layers_fp32"] == tables
    # int8 payload + one fp32 scale per (token, expert, output channel, block of 32)
    assert after["quantized_layers_bytes"] == 2 * t * e * d * h + 4 * t * e * (h * d + d * h) // block
