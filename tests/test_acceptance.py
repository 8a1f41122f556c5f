"""Acceptance rules and cache compaction as pure functions.

The sampling test runs the whole round loop against a synthetic Markov-chain target,
whose exact distribution over the first three emitted tokens is known, and bounds the
total-variation distance of the empirical histogram; a deliberately wrong rule must
break the same bound.
"""
import itertools

import pytest
import torch

from specvlm_core.engine import accept_greedy, accept_sampling, compact_cache, compact_kv, logits_to_probs
from specvlm_core.tree import children_lists

V = 5
# Row a: target distribution of the token after a (a fixed, peaked-but-mixed chain).
CHAIN = torch.tensor([
    [0.05, 0.50, 0.20, 0.15, 0.10],
    [0.30, 0.05, 0.40, 0.05, 0.20],
    [0.10, 0.10, 0.10, 0.60, 0.10],
    [0.45, 0.15, 0.15, 0.15, 0.10],
    [0.20, 0.20, 0.20, 0.20, 0.20],
])


def draft_tree(root: int):
    """A fixed draft policy: two children of the root ((r+1), (r+3)), and a chain of
    two more under the first (deliberately not the target's favourites)."""
    a, b = (root + 1) % V, (root + 3) % V
    c = (a + 2) % V
    d = (c + 4) % V
    tokens = torch.tensor([root, a, b, c, d])
    parents = torch.tensor([-1, 0, 0, 1, 3])
    return tokens, parents


def sample_prefix(rule, gen, length=3, root=0):
    out = []
    while len(out) < length:
        tokens, parents = draft_tree(root)
        probs = CHAIN[tokens]
        path, bonus = rule(tokens, parents, probs, gen)
        emitted = tokens[path[1:]].tolist() + [bonus]
        out.extend(emitted)
        root = emitted[-1]
    return tuple(out[:length])


def exact_prefix_distribution(length=3, root=0):
    dist = {}
    for seq in itertools.product(range(V), repeat=length):
        p, prev = 1.0, root
        for t in seq:
            p *= float(CHAIN[prev, t])
            prev = t
        dist[seq] = p
    return dist


def total_variation(samples, exact):
    counts = {}
    for s in samples:
        counts[s] = counts.get(s, 0) + 1
    n = len(samples)
    return 0.5 * sum(abs(counts.get(k, 0) / n - p) for k, p in exact.items())


def wrong_rule_no_residual(tokens, parents, probs, gen):
    """Broken on purpose: after rejecting a child, keeps sampling from the original p
    (no residual), which over-weights the drafted tokens."""
    children = children_lists(parents)
    path = [0]
    toks = tokens.tolist()
    while True:
        p = probs[path[-1]]
        for child in children[path[-1]]:
            if float(torch.rand((), generator=gen)) < float(p[toks[child]]):
                path.append(child)
                break
        else:
            return path, int(torch.multinomial(p, 1, generator=gen))


N_SAMPLES = 12000
TV_BOUND = 0.06  # a correct rule gives ~0.035 at this sample size, the wrong one ~0.28


def test_tree_speculative_sampling_preserves_the_target_distribution():
    gen = torch.Generator().manual_seed(0)
    samples = [sample_prefix(accept_sampling, gen) for _ in range(N_SAMPLES)]
    assert total_variation(samples, exact_prefix_distribution()) < TV_BOUND


def test_the_bound_catches_a_wrong_acceptance_rule():
    gen = torch.Generator().manual_seed(0)
    samples = [sample_prefix(wrong_rule_no_residual, gen) for _ in range(N_SAMPLES)]
    assert total_variation(samples, exact_prefix_distribution()) > TV_BOUND


def test_accept_greedy_takes_longest_matching_path():
    tokens = torch.tensor([9, 1, 2, 3, 4])
    parents = torch.tensor([-1, 0, 0, 2, 3])
    logits = torch.full((5, 10), -5.0)
    logits[0, 2] = 5  # after root: 2 (node 2, not node 1)
    logits[2, 3] = 5  # after node 2: 3 (node 3)
    logits[3, 7] = 5  # after node 3: 7, but the drafted child is 4 -> stop, bonus 7
    assert accept_greedy(tokens, parents, logits) == ([0, 2, 3], 7)


def test_accept_greedy_rejects_everything():
    tokens = torch.tensor([9, 1])
    parents = torch.tensor([-1, 0])
    logits = torch.zeros(2, 10)
    logits[0, 5] = 1
    assert accept_greedy(tokens, parents, logits) == ([0], 5)


def test_logits_to_probs_filters():
    logits = torch.tensor([3.0, 2.0, 1.0, 0.0])
    p = logits_to_probs(logits, 1.0, top_k=2)
    assert (p[2:] == 0).all() and torch.isclose(p.sum(), torch.tensor(1.0))
    full = logits.softmax(-1)
    p = logits_to_probs(logits, 1.0, top_p=0.7)  # keeps the smallest set with mass >= 0.7
    assert p[0] > 0 and p[1] > 0 and (p[2:] == 0).all() and float(full[0]) < 0.7
    cold = logits_to_probs(logits, 0.1)
    assert cold[0] > 0.99


def test_compact_kv_moves_accepted_entries_after_context():
    # [B=1, H=1, L=6, D=1]: context of 3 (values 0..2), tree of 3 (values 10, 11, 12)
    kv = torch.tensor([0.0, 1, 2, 10, 11, 12]).view(1, 1, 6, 1)
    out = compact_kv(kv, 3, torch.tensor([0, 2]))
    assert out.flatten().tolist() == [0, 1, 2, 10, 12]


@pytest.mark.parametrize("keep,expected", [([0, 2], [0, 1, 2, 10, 12]), ([0, 1], [0, 1, 2, 10, 11]),
                                           ([], [0, 1, 2]), ([1], [0, 1, 2, 11])])
def test_compact_cache_keeps_the_context_then_the_accepted_entries(keep, expected):
    """Both ways through compact_cache (a prefix of the tree is cut, not copied) leave
    every layer's keys and values as compact_kv would."""
    from transformers import DynamicCache
    cache = DynamicCache()
    kv = torch.tensor([0.0, 1, 2, 10, 11, 12]).view(1, 1, 6, 1)
    for layer in range(2):
        cache.update(kv + 100 * layer, -kv, layer)
    compact_cache(cache, 3, keep)
    for i, layer in enumerate(cache.layers):
        assert layer.keys.flatten().tolist() == [v + 100 * i for v in expected]
        assert layer.values.flatten().tolist() == [-v for v in expected]
    assert cache.get_seq_length() == len(expected)


@pytest.mark.parametrize("temperature", [0.7, 1.0])
def test_sampling_rule_matches_plain_sampling_on_the_first_token(temperature):
    # One round, real logits through the same warper: the first emitted token's
    # histogram matches sampling the warped distribution directly.
    gen = torch.Generator().manual_seed(1)
    logits = torch.tensor([[2.0, 1.5, 0.5, 0.0, -1.0]] * 3)
    probs = logits_to_probs(logits, temperature, top_p=0.9)
    tokens, parents = torch.tensor([0, 3, 1]), torch.tensor([-1, 0, 0])
    first = []
    for _ in range(6000):
        path, bonus = accept_sampling(tokens, parents, probs, gen)
        first.append(int(tokens[path[1]]) if len(path) > 1 else bonus)
    hist = torch.bincount(torch.tensor(first), minlength=5).float() / len(first)
    assert 0.5 * (hist - probs[0]).abs().sum() < 0.03
