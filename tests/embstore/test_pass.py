"""FindEmbeddingsPass / CutEmbeddingsPass on real torch.export graphs."""

from __future__ import annotations

import torch

from exporter.steps.capture import capture, to_torch_inputs
from exporter.steps.embeddings import choose_tables
from graph_passes.fx.embeddings import EMBED_KEY, CutEmbeddingsPass, FindEmbeddingsPass
from runtime.sample import sample_rows
from runtime.spec import FeatureSpec
from tests.embstore.models import HashedIds, ToyLookups, V, hashed_spec, toy_spec

EXPECTED = {  # table -> (op, mode, input, side, offsets)
    "user_emb.weight": ("embedding", None, "user_ids", "user", [0, V, 2 * V]),
    "seq_mean.weight": ("embedding_bag", "mean", "user_seq", "user", None),
    "seq_max.weight": ("embedding_bag", "max", "user_seq", "user", None),
    "city.weight": ("embedding", None, "user_city", "user", None),
    "item_w": ("embedding", None, "item_ids", "group", None),
    "cat_w": ("index", None, "item_cat", "group", None),
    "tags.weight": ("embedding_bag", "sum", "item_tags", "group", None),
}


def _toy():
    model = ToyLookups().eval()
    spec = FeatureSpec.from_dict(toy_spec())
    return model, spec, capture(model, spec)


def test_finds_every_lookup_kind_with_its_input_side_and_offsets():
    _, spec, ep = _toy()
    found = FindEmbeddingsPass(spec).call(ep).facts["lookups"]
    got = {lk.table: (lk.op, lk.mode, lk.input, lk.side, lk.offsets) for lk in found}
    assert got == EXPECTED
    assert all(lk.reason is None for lk in found)
    tagged = [n for n in ep.graph.nodes if EMBED_KEY in n.meta]  # facts on the nodes
    assert sorted(n.meta[EMBED_KEY]["table"] for n in tagged) == sorted(EXPECTED)


def test_computed_ids_stay_in_the_graph_with_a_reason():
    model, spec = HashedIds().eval(), FeatureSpec.from_dict(hashed_spec())
    found = FindEmbeddingsPass(spec).call(capture(model, spec)).facts["lookups"]
    reasons = {lk.input: lk.reason for lk in found}
    assert reasons.get("item_ids") is None
    refused = [lk for lk in found if lk.reason]
    assert len(refused) == 1 and "computed" in refused[0].reason
    tables, stay = choose_tables(found, 0)
    assert tables == set()  # one refused lookup keeps its whole table in the graph
    assert stay[0]["name"] == "emb.weight" and "computed" in stay[0]["reason"]


def test_threshold_keeps_small_tables():
    _, spec, ep = _toy()
    found = FindEmbeddingsPass(spec).call(ep).facts["lookups"]
    tables, stay = choose_tables(found, 4096)
    assert tables == set(EXPECTED) - {"city.weight"}  # 10 x 4 fp32 = 160 bytes
    assert [s["name"] for s in stay] == ["city.weight"] and stay[0]["bytes"] == 160


def test_cut_program_fed_gathered_rows_equals_eager():
    model, spec, ep = _toy()
    tables = set(EXPECTED) - {"city.weight"}
    result = CutEmbeddingsPass(spec, tables).call(ep)
    cut = result.graph_module
    assert not set(cut.state_dict) & tables  # the tables left the program
    rows = sample_rows(spec, 7, seed=3)
    kwargs = to_torch_inputs(spec, rows)
    sd = model.state_dict()
    offsets = {"user_ids": torch.arange(3) * V}
    for name, lk in result.facts["stage_inputs"]:
        ids = kwargs[lk.input] + offsets.get(lk.input, 0)
        kwargs[name] = sd[lk.table][ids]  # plain indexing, not the code under test
    with torch.no_grad():
        want = model(**to_torch_inputs(spec, rows))
        got = cut.module()(**kwargs)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-6)
    names = [n for n, _ in result.facts["stage_inputs"]]
    assert len(names) == 6 and len(set(names)) == 6
