"""Auto trees: scoring smaller trees offline from one recorded calibration tree."""
import math

import pytest

from specvlm_core import autotune

# Calibration tree: root 0; 1 (p .9) and 2 (p .05) below it; 3 (path p .6) below 1;
# 4 (path p .2) below 3. The target chose 5 after the root, 7 after 1, 8 after 3, 9 after 4.
RECORD = {"tree": {"tokens": [0, 5, 6, 7, 8], "parents": [-1, 0, 0, 1, 3], "depths": [0, 1, 1, 2, 3],
                   "scores": [0.0, math.log(0.9), math.log(0.05), math.log(0.6), math.log(0.2)]},
          "target_choice": [5, 7, 9, 8, 9]}


@pytest.mark.parametrize("top_k,depth,total,accepted", [
    (2, 3, 4, 4),  # the whole path 1-3-4 and the bonus
    (1, 3, 3, 4),  # a chain of the best children is enough here
    (2, 2, 4, 3),  # depth 2 stops before node 4
    (2, 3, 2, 3),  # the 2 best scores are nodes 1 and 3
    (1, 1, 1, 2),  # node 1 and the bonus
])
def test_a_smaller_tree_accepts_what_the_engine_would(top_k, depth, total, accepted):
    assert autotune.accepted_length(RECORD, top_k, depth, total) == accepted


def test_choose_tree_prices_chains_by_their_depth():
    costs = {"verify_ms": {1: 1.0, 64: 1.0}, "draft_step_ms": {k: 1.0 for k in autotune.GRID_TOP_K}}
    best, table = autotune.choose_tree([RECORD], costs, overhead_ms=0.5)
    row = next(r for r in table if (r["top_k"], r["depth"], r["total_tokens"]) == (1, 3, 3))
    assert row["expected_tau"] == 4 and row["round_ms"] == pytest.approx(1.0 + 3 * 1.0 + 0.5)
    # top_k 1 appears only as chains (total == depth): fewer nodes would be a shallower chain
    assert all(r["total_tokens"] == r["depth"] for r in table if r["top_k"] == 1)
    assert table[0]["tokens_per_s"] == max(r["tokens_per_s"] for r in table)
    assert (best.top_k, best.depth, best.total_tokens) == tuple(table[0][k] for k in ("top_k", "depth", "total_tokens"))


@pytest.mark.parametrize("entry,usable", [
    ({"tree": {"top_k": 1, "depth": 10, "total_tokens": 10}}, True),
    ({"tree": {"top_k": 1, "depth": 12, "total_tokens": 12, "min_prob": 0.5}}, False),  # a field this engine lacks
    ({"tree": {"top_k": 0, "depth": 10, "total_tokens": 10}}, False),  # out of range
    ({"why": "no tree"}, False),
    (None, False),
])
def test_a_cached_choice_is_used_only_if_this_engine_can_run_it(entry, usable):
    assert autotune._usable(entry) is usable
