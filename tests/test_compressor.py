"""Elastic visual compressor: shapes and ratios, gate, and losslessness in every mode."""
import math

import pytest
import torch

from specvlm_core import compressor as C
from specvlm_core import engine, testing
from specvlm_core.draft import EagleDraft, new_draft_for
from specvlm_core.models import prepare_inputs

H = 64


def seq_with_visual(n_text_before=5, grid=(1, 8, 8), n_text_after=7, seed=0):
    g = torch.Generator().manual_seed(seed)
    n_vis = grid[0] * grid[1] * grid[2]
    s = n_text_before + n_vis + n_text_after
    emb = torch.randn(s, H, generator=g)
    feat = torch.randn(s, H, generator=g)
    mask = torch.zeros(s, dtype=torch.bool)
    mask[n_text_before:n_text_before + n_vis] = True
    return emb, feat, mask


@pytest.mark.parametrize("option,grid,expected", [
    ("none:1", (1, 8, 8), 64), ("prune_random:4", (1, 8, 8), 16), ("prune_guided:16", (1, 8, 8), 4),
    ("pool:4", (1, 8, 8), 16), ("pool:16", (1, 8, 8), 4), ("pool:4", (1, 5, 7), 12),
    ("pool:16", (4, 8, 8), 2 * 3 * 3), ("conv:4", (1, 8, 8), 16), ("conv:4", (2, 6, 6), 18),
    ("resampler:2", (1, 8, 8), 2), ("text_only:0", (1, 8, 8), 0),
])
def test_every_primitive_has_the_promised_output_size(option, grid, expected):
    comp = C.VisualCompressor(H, mode=option)
    emb, feat, mask = seq_with_visual(grid=grid)
    new_e, new_f, info = comp.compress_sequence(emb, feat, mask, {"grid": grid})
    n_vis = int(mask.sum())
    assert info["visual_tokens_before"] == n_vis and info["visual_tokens_after"] == expected
    assert new_e.shape == new_f.shape == (emb.shape[0] - n_vis + expected, H)
    assert comp.kept_tokens(C.Option.parse(option), n_vis, grid) == expected
    # Text positions are untouched and keep their source index.
    assert torch.equal(new_e[:5], emb[:5]) and torch.equal(new_e[-7:], emb[-7:])
    src = info["source_index"]
    assert src[:5].tolist() == list(range(5)) and src[-7:].tolist() == list(range(emb.shape[0] - 7, emb.shape[0]))


def test_pruning_reports_kept_cells_and_guided_keeps_the_distinct_tokens():
    comp = C.VisualCompressor(H, mode="prune_guided:16")
    emb, feat, mask = seq_with_visual(grid=(1, 8, 8))
    emb[5:69] = 0.0  # a flat background ...
    emb[5 + 8 * 2 + 3] = 5.0  # ... with one distinct object at row 2, col 3
    _, _, info = comp.compress_sequence(emb, feat, mask, {"grid": (1, 8, 8)})
    assert [0, 2, 3] in info["kept_cells"] and len(info["kept_cells"]) == 4
    assert 5 + 8 * 2 + 3 in info["source_index"].tolist()


def test_pooling_averages_grid_cells():
    x = torch.arange(16.0).view(16, 1)
    pooled = C.grid_pool(x, (1, 4, 4), 1, 2)
    assert pooled.flatten().tolist() == [2.5, 4.5, 10.5, 12.5]


def test_gate_selects_per_input_and_its_cost_term_prefers_compression_on_big_inputs():
    comp = C.VisualCompressor(H, mode="select", explore=0.0, lambda_cost=1.0)
    emb, feat, mask = seq_with_visual(grid=(1, 16, 16))
    _, _, info = comp.compress_sequence(emb, feat, mask, {"grid": (1, 16, 16)})
    assert set(info["gate"]) == {str(o) for o in comp.options} and math.isclose(sum(info["gate"].values()), 1,
                                                                                   rel_tol=1e-3)
    assert info["primitive"] == max(info["gate"], key=info["gate"].get).split(":")[0]
    # Minimising the cost term alone moves probability to options that keep fewer tokens.
    opt = torch.optim.SGD(comp.gate.parameters(), lr=1.0)
    for _ in range(30):
        _, _, info = comp.compress_sequence(emb, feat, mask, {"grid": (1, 16, 16)}, training=True)
        opt.zero_grad()
        info["cost_loss"].backward()
        opt.step()
    _, _, info = comp.compress_sequence(emb, feat, mask, {"grid": (1, 16, 16)})
    assert info["gate"]["none:1"] < 0.05
    assert comp.kept_tokens(C.Option.parse(max(info["gate"], key=info["gate"].get)), 256, (1, 16, 16)) <= 16


def test_gumbel_choice_passes_gradient_to_the_gate():
    comp = C.VisualCompressor(H, mode="select", explore=0.0)
    emb, feat, mask = seq_with_visual()
    new_e, _, _ = comp.compress_sequence(emb, feat, mask, {"grid": (1, 8, 8)}, training=True)
    new_e.sum().backward()
    assert comp.gate[-1].weight.grad is not None and comp.gate[-1].weight.grad.abs().sum() > 0


@pytest.mark.parametrize("mode", ["select", "weighted", "concat", "prune_random:4", "prune_guided:4", "pool:16",
                                  "conv:4", "resampler:2", "text_only:0"])
def test_decoding_stays_lossless_with_every_mode(family_target, mode):
    target = family_target("qwen2_vl")
    draft = new_draft_for(target, seed=1)
    draft.compressor = C.VisualCompressor(draft.config.hidden_size, mode=mode)
    for kwargs in (dict(image=testing.tiny_image((128, 96), 5)), dict(video=testing.tiny_clip(8, (64, 64), 6))):
        inputs = prepare_inputs(target, "Describe it.", **kwargs)
        ref = target.model.generate(**inputs, do_sample=False, max_new_tokens=12)[0, inputs["input_ids"].shape[1]:]
        res = engine.collect(engine.speculative_stream(target, engine.EagleDrafter(draft, target), inputs,
                                                       engine.SamplingSettings(max_new_tokens=12),
                                                       engine.TreeSettings(3, 4, 10), media=kwargs))
        assert res.token_ids == ref.tolist()
        info = res.events[1].info
        assert info["visual_tokens_before"] > 0 and "draft_prefill_ms" in info and "primitive" in info


def test_a_draft_with_compressor_round_trips_through_disk(family_target, tmp_path):
    target = family_target("qwen2_vl")
    draft = new_draft_for(target, seed=2)
    draft.compressor = C.VisualCompressor(draft.config.hidden_size, mode="select")
    draft.save_pretrained(tmp_path / "d")
    loaded = EagleDraft.from_pretrained(tmp_path / "d", target=target)
    assert loaded.compressor is not None and loaded.compressor.config_dict() == draft.compressor.config_dict()
    for (k, a), (_, b) in zip(sorted(draft.state_dict().items()), sorted(loaded.state_dict().items())):
        assert torch.equal(a, b), k


def test_parameter_table_lists_every_primitive():
    rows = {r["primitive"]: r for r in C.parameter_table(256)}
    assert set(rows) >= {"prune_random", "prune_guided", "pool", "conv", "resampler", "text_only", "gate"}
    assert rows["pool"]["params"] == 0 and rows["conv"]["params"] > 0 and rows["resampler"]["params"] > 0


def test_head_to_head_pairs_repeats_and_reports_tau():
    from specvlm_core import bench
    rows = [
        {"group": "clips", "case": "a", "option": "eagle", "tau": 5.0, "seconds": [1.0, 1.2, 0.9]},
        {"group": "clips", "case": "a", "option": "select", "tau": 4.9, "seconds": [0.9, 1.25, 0.8]},
        {"group": "clips", "case": "b", "option": "eagle", "tau": 6.0, "seconds": [2.0, 2.0, 2.0]},
        {"group": "clips", "case": "b", "option": "select", "tau": 6.0, "seconds": [1.0, 4.0, 2.0]},
    ]
    v = bench.head_to_head(rows)["clips"]
    # pairs: 1.111, 0.96, 1.125, 2.0, 0.5, 1.0 -> median 1.0555...
    assert v["pairs"] == 6 and v["faster_in"] == 3
    assert v["time_ratio"] == pytest.approx((1.0 / 0.9 + 1.0) / 2)
    assert v["tau_ratio"] == pytest.approx((4.9 / 5.0 + 1.0) / 2)


def test_ablation_runs_every_option_losslessly_on_the_embedded_model(embedded_target):
    from specvlm_core import api, bench
    draft, _ = api.load_draft(embedded_target, None)
    rows = bench.run_ablation(embedded_target, draft, options=("eagle", "pool:4", "select"), max_new_tokens=6,
                              repeats=2)
    assert {r["group"] for r in rows} == {"small images", "large images", "clips"}
    assert all(r["lossless"] and len(r["seconds"]) == 2 and r["speedup"] > 0 for r in rows)
    pooled = [r for r in rows if r["option"] == "pool:4"]
    assert all(r["visual_after"] < r["visual_before"] for r in pooled)
    assert "| pool:4 |" in bench.ablation_table(rows)
