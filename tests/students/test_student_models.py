"""The students: forward contract, spec, row independence, the user path, checkpoints."""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file

from runtime.spec import FeatureSpec
from students.base import model_inputs
from students.checkpoint import load_checkpoint, save_checkpoint
from students.data import make_dataset, take
from students.rankmixer import RankMixerConfig, RankMixerStudent, mix_tokens
from students.zoo import FACTORY, KINDS, build_model, build_student, build_teacher, model_kwargs

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def rows():
    _, _, held = make_dataset("tiny", n_train=10, n_requests=4, candidates=10, seed=0)
    return held


def _model(kind: str, seed: int = 0):
    torch.manual_seed(seed)
    return build_student(kind, "tiny").eval()


@pytest.mark.parametrize("kind", list(KINDS))
@pytest.mark.parametrize("batch", [1, 7])
def test_forward_gives_a_probability_per_row(kind, batch, rows):
    model = _model(kind)
    kwargs = model_inputs(model, rows, slice(0, batch))
    with torch.no_grad():
        ctr = model(**kwargs)
        z = model.logits(**kwargs)
    assert ctr.shape == (batch,) and ctr.dtype == torch.float32
    assert ((ctr > 0) & (ctr < 1)).all()
    torch.testing.assert_close(ctr, torch.sigmoid(z), rtol=0, atol=0)


@pytest.mark.parametrize("kind", [*KINDS, "teacher"])
def test_spec_is_valid_and_addresses_forward_arguments(kind):
    model = build_teacher("tiny") if kind == "teacher" else _model(kind)
    spec = FeatureSpec.from_dict(model.feature_spec())
    assert spec.outputs == ("ctr",)
    assert {i.name for i in spec.user_inputs} == {
        model.input_names[n] for n in ("user_ids", "user_dense", "user_seq")
    }
    assert {i.name for i in spec.group_inputs} == {
        model.input_names[n] for n in ("item_ids", "item_dense")
    }
    args = set(model.forward.__code__.co_varnames[1 : model.forward.__code__.co_argcount])
    assert {i.arg for i in spec.inputs} == args


def test_two_tower_takes_dict_arguments(rows):
    spec = FeatureSpec.from_dict(_model("twotower").feature_spec())
    assert sorted(i.name for i in spec.inputs) == [
        "item.dense",
        "item.ids",
        "user.dense",
        "user.ids",
        "user.seq",
    ]
    kwargs = model_inputs(_model("twotower"), rows, slice(0, 3))
    assert set(kwargs) == {"user", "item"} and set(kwargs["user"]) == {"ids", "dense", "seq"}


def _perturb_row(kwargs, row: int, rng):
    out = copy.deepcopy(kwargs)
    leaves = [v for v in out.values() if torch.is_tensor(v)] + [
        t for v in out.values() if isinstance(v, dict) for t in v.values()
    ]
    for t in leaves:
        if t.dtype == torch.int64:
            t[row] = torch.from_numpy(rng.integers(1, 1000, tuple(t[row].shape)))
        else:
            t[row] = torch.from_numpy(rng.standard_normal(tuple(t[row].shape)).astype(np.float32))
    return out


@pytest.mark.parametrize("kind", list(KINDS))
def test_rows_are_independent(kind, rows):
    """Changing one row's inputs changes that row's output and no other."""
    model = _model(kind)
    kwargs = model_inputs(model, rows, slice(0, 9))
    changed = _perturb_row(kwargs, 4, np.random.default_rng(0))
    with torch.no_grad():
        a, b = model(**kwargs), model(**changed)
    others = torch.arange(9) != 4
    torch.testing.assert_close(a[others], b[others], rtol=0, atol=0)
    assert a[4] != b[4]


def _record_tokens(model: RankMixerStudent):
    seen: list[tuple[torch.Tensor, torch.Tensor]] = []
    hooks = [layer.register_forward_hook(lambda m, i, o: seen.append(o)) for layer in model.layers]
    kv: list = []
    hooks.append(model.target.register_forward_hook(lambda m, i, o: kv.append(i[1:])))
    return seen, kv, hooks


def test_rankmixer_user_path_ignores_candidate_inputs(rows):
    """Same users, different candidates: every layer's user tokens and the K/V are identical,
    while the candidate tokens differ."""
    model = _model("rankmixer")
    kwargs = model_inputs(model, rows, slice(0, 8))
    other = model_inputs(model, rows, slice(8, 16))
    swapped = {**kwargs, "item_ids": other["item_ids"], "item_dense": other["item_dense"]}
    seen, kv, hooks = _record_tokens(model)
    with torch.no_grad():
        model(**kwargs)
        model(**swapped)
    for h in hooks:
        h.remove()
    n = len(model.layers)
    assert len(seen) == 2 * n
    for layer in range(n):
        (xu_a, xg_a), (xu_b, xg_b) = seen[layer], seen[n + layer]
        torch.testing.assert_close(xu_a, xu_b, rtol=0, atol=0)
        assert not torch.equal(xg_a, xg_b)
    for a, b in zip(kv[0], kv[1], strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def _reference_mix(xu, xg):
    """Loop form of the masked head-piece mixing, written independently of the model."""
    tokens = torch.cat([xu, xg], 1)
    b, t, d = tokens.shape
    p, cu = d // t, xu.shape[1]
    out = torch.zeros_like(tokens)
    for head in range(t):
        for src in range(t):
            if head < cu and src >= cu:
                continue  # user tokens never receive candidate pieces
            out[:, head, src * p : (src + 1) * p] = tokens[:, src, head * p : (head + 1) * p]
    return out[:, :cu], out[:, cu:]


def test_token_mixing_is_the_masked_head_piece_regrouping():
    torch.manual_seed(0)
    xu, xg = torch.randn(3, 4, 16), torch.randn(3, 4, 16)
    mu, mg = mix_tokens(xu, xg)
    ru, rg = _reference_mix(xu, xg)
    torch.testing.assert_close(mu, ru, rtol=0, atol=0)
    torch.testing.assert_close(mg, rg, rtol=0, atol=0)


@settings(max_examples=25, deadline=None)
@given(cu=st.integers(1, 5), cg=st.integers(1, 5), piece=st.integers(1, 3), batch=st.integers(1, 3))
def test_token_mixing_matches_the_reference_for_any_token_counts(cu, cg, piece, batch):
    gen = torch.Generator().manual_seed(cu * 100 + cg * 10 + piece)
    d = (cu + cg) * piece
    xu, xg = torch.randn(batch, cu, d, generator=gen), torch.randn(batch, cg, d, generator=gen)
    for got, want in zip(mix_tokens(xu, xg), _reference_mix(xu, xg), strict=True):
        torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_compensation_flows_user_to_candidate_only(rows):
    model = _model("rankmixer")
    layer = model.layers[0]
    xu, xg = torch.randn(2, 4, 32), torch.randn(2, 4, 32)
    with torch.no_grad():
        base = layer(xu, xg)
        more_user = layer(xu + 1.0, xg)
        more_cand = layer(xu, xg + 1.0)
    assert not torch.equal(base[1], more_user[1])  # candidates see the user
    torch.testing.assert_close(base[0], more_cand[0], rtol=0, atol=0)  # users never see candidates


def test_bench_rankmixer_has_the_documented_shape():
    cfg = RankMixerConfig(**model_kwargs("rankmixer", "bench")["config"])
    assert (cfg.n_user_tokens, cfg.n_cand_tokens, cfg.d_model, cfg.n_layers, cfg.ffn_mult) == (
        8,
        8,
        128,
        4,
        4,
    )
    assert (cfg.seq_len, cfg.seq_layers, cfg.seq_width, cfg.seq_heads) == (64, 2, 64, 4)
    assert (cfg.n_user_fields, cfg.n_user_dense, cfg.n_item_fields, cfg.n_item_dense) == (
        12,
        4,
        6,
        2,
    )
    assert (cfg.vocab, cfg.emb_dim) == (50_000, 16)


def test_bad_configs_are_refused_with_a_reason():
    with pytest.raises(ValueError, match="divisible"):
        RankMixerConfig(d_model=30)
    with pytest.raises(ValueError, match="unknown student kind"):
        build_student("transformer", "tiny")
    with pytest.raises(ValueError, match="unknown size"):
        build_student("dcn", "huge")


@pytest.mark.parametrize("kind", list(KINDS))
def test_checkpoint_round_trip(kind, rows, tmp_path):
    model = _model(kind, seed=5)
    kwargs = model_kwargs(kind, "tiny")
    out = save_checkpoint(
        model, FACTORY, kwargs, model.feature_spec(), tmp_path / kind, {"auc": 0.5}
    )
    assert sorted(p.name for p in out.iterdir()) == [
        "config.json",
        "metrics.json",
        "model.safetensors",
        "spec.json",
    ]
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["factory"] == FACTORY
    rebuilt = build_model(**cfg["kwargs"]).eval()  # factory(**kwargs), by hand
    rebuilt.load_state_dict(load_file(str(out / "model.safetensors")), strict=True)
    batch = model_inputs(model, rows, slice(0, 7))
    with torch.no_grad():
        torch.testing.assert_close(rebuilt(**batch), model(**batch), rtol=0, atol=0)
        torch.testing.assert_close(load_checkpoint(out)(**batch), model(**batch), rtol=0, atol=0)
    assert FeatureSpec.from_dict(json.loads((out / "spec.json").read_text())).name == f"{kind}_tiny"
    assert json.loads((out / "metrics.json").read_text()) == {"auc": 0.5}


def test_checkpoint_loads_through_the_exporter(rows, tmp_path):
    from exporter.load import load_student

    model = _model("twotower", seed=2)
    save_checkpoint(
        model, FACTORY, model_kwargs("twotower", "tiny"), model.feature_spec(), tmp_path
    )
    loaded = load_student(tmp_path)
    batch = model_inputs(model, take(rows, slice(0, 5)))
    with torch.no_grad():
        torch.testing.assert_close(loaded.eager()(**batch), model(**batch), rtol=0, atol=0)
