"""Draft-tree construction on hand-made scores: pure functions, no model."""
import math

import torch

from specvlm_core.tree import (ancestor_mask, candidate_depths, children_lists, expand_frontier, leaf_paths,
                               select_tree, tree_attention_mask)


def logp(*probs):
    return torch.log(torch.tensor(probs))


def test_expand_frontier_keeps_global_top_k_by_cumulative_score():
    # Two frontier nodes: A (score log .6) and B (score log .4); vocab of 4.
    frontier_scores = logp(0.6, 0.4)
    child = torch.stack([logp(0.5, 0.3, 0.1, 0.1), logp(0.9, 0.05, 0.03, 0.02)])
    tokens, scores, nxt = expand_frontier(frontier_scores, child, top_k=2)
    assert tokens.tolist() == [[0, 1], [0, 1]]
    # path probabilities: A0 .30, A1 .18, B0 .36, B1 .02 -> best two are B0 then A0
    assert torch.allclose(scores.exp(), torch.tensor([[0.30, 0.18], [0.36, 0.02]]), atol=1e-6)
    assert nxt.tolist() == [2, 0]


def test_select_tree_orders_parents_first_and_keeps_ancestors():
    # candidates: 0,1 children of root; 2,3 children of 0; 4 child of 2
    tokens = torch.tensor([10, 11, 12, 13, 14])
    scores = logp(0.6, 0.3, 0.5, 0.05, 0.45)
    parents = torch.tensor([-1, -1, 0, 0, 2])
    tree = select_tree(99, tokens, scores, parents, total_tokens=4)
    # best four: 10 (.6), 12 (.5), 14 (.45), 11 (.3); 13 (.05) dropped
    assert tree.tokens.tolist() == [99, 10, 11, 12, 14]
    assert tree.parents.tolist() == [-1, 0, 0, 1, 3]
    assert tree.depths.tolist() == [0, 1, 1, 2, 3]
    assert tree.scores[0] == 0 and math.isclose(float(tree.scores[1].exp()), 0.6, rel_tol=1e-6)
    assert all(int(p) < i for i, p in enumerate(tree.parents.tolist()) if i > 0)


def test_select_tree_ties_prefer_the_parent():
    # A child with log-prob 0 ties its parent's score; the parent must come first.
    tokens = torch.tensor([1, 2, 3])
    scores = torch.tensor([-1.0, -1.0, -1.0])
    parents = torch.tensor([-1, 0, 1])
    tree = select_tree(0, tokens, scores, parents, total_tokens=2)
    assert tree.tokens.tolist() == [0, 1, 2]
    assert tree.parents.tolist() == [-1, 0, 1]


def test_select_tree_with_total_one_is_root_plus_best_child():
    tree = select_tree(7, torch.tensor([4, 5]), logp(0.2, 0.7), torch.tensor([-1, -1]), total_tokens=1)
    assert tree.tokens.tolist() == [7, 5]


def test_candidate_depths():
    assert candidate_depths(torch.tensor([-1, -1, 0, 2, 1])).tolist() == [0, 0, 1, 2, 1]


def test_ancestor_mask_and_paths():
    parents = torch.tensor([-1, 0, 0, 1, 3, 2])
    mask = ancestor_mask(parents)
    assert mask[4].nonzero().flatten().tolist() == [0, 1, 3, 4]
    assert mask[5].nonzero().flatten().tolist() == [0, 2, 5]
    assert not mask[1, 2] and not mask[0, 1]
    assert leaf_paths(parents) == [[0, 1, 3, 4], [0, 2, 5]]
    assert children_lists(parents) == [[1, 2], [3], [5], [4], [], []]


def test_tree_attention_mask_is_additive_4d():
    parents = torch.tensor([-1, 0, 0])
    mask = tree_attention_mask(parents, context_len=2)
    assert mask.shape == (1, 1, 3, 5)
    blocked = torch.finfo(torch.float32).min
    assert (mask[0, 0, :, :2] == 0).all()
    assert mask[0, 0, 1, 3] == 0 and mask[0, 0, 1, 4] == blocked and mask[0, 0, 2, 3] == blocked
