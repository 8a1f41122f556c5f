"""Property-based tests (hypothesis) over validation, tree building and acceptance."""
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from specvlm_core.engine import SamplingSettings, TreeSettings, accept_greedy, accept_sampling, logits_to_probs
from specvlm_core.errors import ParameterError
from specvlm_core.tree import ancestor_mask, expand_frontier, select_tree

ints = st.integers(min_value=-5, max_value=600)


@given(top_k=ints, depth=ints, total=ints)
def test_tree_settings_validate_exactly_the_documented_ranges(top_k, depth, total):
    ok = 1 <= top_k <= 64 and 1 <= depth <= 32 and 1 <= total <= 512
    if ok:
        TreeSettings(top_k, depth, total).validate()
    else:
        with pytest.raises(ParameterError):
            TreeSettings(top_k, depth, total).validate()


@given(temperature=st.floats(allow_nan=True, allow_infinity=True, width=32),
       top_p=st.floats(allow_nan=True, allow_infinity=True, width=32),
       max_new=st.integers(min_value=-10, max_value=10**6))
def test_sampling_settings_reject_nonsense_with_a_typed_error(temperature, top_p, max_new):
    s = SamplingSettings(temperature=temperature, top_p=top_p, max_new_tokens=max_new)
    ok = temperature >= 0 and 0 < top_p <= 1 and 1 <= max_new <= 8192
    if ok:
        s.validate()
    else:
        with pytest.raises(ParameterError):
            s.validate()


def grow_tree(seed, top_k, depth, total, vocab=12):
    """Random draft log-probs run through the real expansion and selection."""
    g = torch.Generator().manual_seed(seed)
    def logp(rows):
        return torch.randn(rows, vocab, generator=g).log_softmax(-1)
    tokens, scores, frontier = expand_frontier(torch.zeros(1), logp(1), top_k)
    ct, cs = [tokens.reshape(-1)], [scores.reshape(-1)]
    cp = [torch.full((tokens.numel(),), -1)]
    f_ids, f_scores, n = frontier, scores.reshape(-1)[frontier], tokens.numel()
    for _ in range(1, depth):
        child_tokens, child_scores, nxt = expand_frontier(f_scores, logp(f_ids.numel()), top_k)
        ct.append(child_tokens.reshape(-1))
        cs.append(child_scores.reshape(-1))
        cp.append(f_ids.repeat_interleave(child_tokens.shape[1]))
        f_scores, f_ids = child_scores.reshape(-1)[nxt], nxt + n
        n += child_tokens.numel()
    return select_tree(99, torch.cat(ct), torch.cat(cs), torch.cat(cp), total)


@settings(max_examples=60, deadline=None)
@given(seed=st.integers(0, 10**6), top_k=st.integers(1, 10), depth=st.integers(1, 8), total=st.integers(1, 64))
def test_any_tree_is_well_formed(seed, top_k, depth, total):
    tree = grow_tree(seed, top_k, depth, total)
    n = len(tree)
    assert 2 <= n <= total + 1 and tree.parents[0] == -1 and tree.depths[0] == 0
    for i in range(1, n):
        p = int(tree.parents[i])
        assert 0 <= p < i and tree.depths[i] == tree.depths[p] + 1 and tree.depths[i] <= depth
        assert tree.scores[i] <= tree.scores[p] + 1e-6 or p == 0
    # siblings carry distinct tokens (a target token can match at most one child)
    for p in range(n):
        kids = [int(tree.tokens[i]) for i in range(1, n) if int(tree.parents[i]) == p]
        assert len(kids) == len(set(kids))
    mask = ancestor_mask(tree.parents)
    assert mask.diagonal().all() and mask[:, 0].all()


@settings(max_examples=60, deadline=None)
@given(seed=st.integers(0, 10**6), top_k=st.integers(1, 6), depth=st.integers(1, 6), total=st.integers(1, 30))
def test_acceptance_returns_a_root_path(seed, top_k, depth, total):
    tree = grow_tree(seed, top_k, depth, total)
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(len(tree), 12, generator=g) * 3
    for path, bonus in (accept_greedy(tree.tokens, tree.parents, logits),
                        accept_sampling(tree.tokens, tree.parents, logits_to_probs(logits, 0.8, top_p=0.9), g)):
        assert path[0] == 0
        for a, b in zip(path, path[1:]):
            assert int(tree.parents[b]) == a
        assert 0 <= bonus < 12
    path, bonus = accept_greedy(tree.tokens, tree.parents, logits)
    assert bonus == int(logits[path[-1]].argmax())


@given(t=st.floats(0.05, 5), top_k=st.integers(0, 12), top_p=st.floats(0.01, 1.0))
def test_warped_distribution_is_a_distribution(t, top_k, top_p):
    logits = torch.linspace(-3, 3, 12)
    p = logits_to_probs(logits, t, top_k, top_p)
    assert math.isclose(float(p.sum()), 1.0, rel_tol=1e-5) and (p >= 0).all()
    assert p.argmax() == logits.argmax()
    if top_k:
        assert int((p > 0).sum()) <= top_k
