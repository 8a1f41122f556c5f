"""Dynamic draft trees (EAGLE-2), as pure functions over tensors.

A tree is stored flat: node 0 is the root (the last accepted token, not yet seen by the
target); every other node has a parent index smaller than its own, so parents precede
children. Scores are cumulative draft log-probabilities (log of the path probability),
so a score never increases along a path.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class DraftTree:
    """tokens, parents, depths, scores: [n] each; parents[0] == -1, depths[0] == 0."""
    tokens: torch.Tensor
    parents: torch.Tensor
    depths: torch.Tensor
    scores: torch.Tensor

    def __len__(self) -> int:
        return int(self.tokens.shape[0])

    def as_dict(self) -> dict:
        return {"tokens": self.tokens.tolist(), "parents": self.parents.tolist(),
                "depths": self.depths.tolist(), "scores": [round(float(s), 4) for s in self.scores]}


def expand_frontier(frontier_scores: torch.Tensor, child_logprobs: torch.Tensor, top_k: int):
    """One expansion step of EAGLE-2.

    frontier_scores: [f] cumulative scores of the nodes being expanded;
    child_logprobs: [f, V] draft log-probs of their next token.
    Returns (child_tokens [f, k], child_scores [f, k], next_frontier [min(k, f*k)]) where
    next_frontier indexes the flattened [f*k] children with the highest scores.
    """
    k = min(top_k, child_logprobs.shape[-1])
    top_logprobs, child_tokens = child_logprobs.topk(k, dim=-1)
    child_scores = frontier_scores[:, None] + top_logprobs
    next_frontier = child_scores.reshape(-1).topk(min(top_k, child_scores.numel())).indices
    return child_tokens, child_scores, next_frontier


def select_tree(root_token: int, cand_tokens: torch.Tensor, cand_scores: torch.Tensor,
                cand_parents: torch.Tensor, total_tokens: int, cand_depths: torch.Tensor | None = None) -> DraftTree:
    """Keep the total_tokens best candidates and lay them out parents-first.

    cand_*: [N]; cand_parents index into the candidates, -1 meaning the root;
    cand_depths (0 = child of the root) is derived from the parents when not given.
    Ties are broken towards shallower nodes, and since a child's score never exceeds its
    parent's, every kept node's ancestors are kept too (checked below).
    """
    n_keep = min(total_tokens, int(cand_tokens.shape[0]))
    depth = cand_depths if cand_depths is not None else candidate_depths(cand_parents)
    # Sort by score (desc), then depth (asc), then index: lexsort via stable sorts.
    order = torch.arange(cand_tokens.shape[0])
    order = order[torch.sort(depth[order], stable=True).indices]
    order = order[torch.sort(cand_scores[order], descending=True, stable=True).indices]
    kept = order[:n_keep]
    # Parents before children: by depth, then by score within a depth.
    kept = kept[torch.sort(cand_scores[kept], descending=True, stable=True).indices]
    kept = kept[torch.sort(depth[kept], stable=True).indices]
    new_index = torch.full((cand_tokens.shape[0] + 1,), -1, dtype=torch.long)
    new_index[kept] = torch.arange(1, n_keep + 1)
    parent_old = cand_parents[kept]
    parents = torch.where(parent_old < 0, torch.zeros_like(parent_old), new_index[parent_old.clamp(min=0)])
    if bool((parents < 0).any()):
        raise AssertionError("draft tree lost an ancestor: scores must not increase along a path")
    return DraftTree(
        tokens=torch.cat([torch.tensor([root_token]), cand_tokens[kept].cpu()]),
        parents=torch.cat([torch.tensor([-1]), parents]),
        depths=torch.cat([torch.tensor([0]), depth[kept] + 1]),
        scores=torch.cat([torch.tensor([0.0]), cand_scores[kept].float().cpu()]),
    )


def candidate_depths(cand_parents: torch.Tensor) -> torch.Tensor:
    """Depth below the root's children (0 = child of root) of each candidate [N].
    Candidates are created level by level, so a parent always has a smaller index."""
    depth = torch.zeros_like(cand_parents)
    for i, p in enumerate(cand_parents.tolist()):
        if p >= 0:
            depth[i] = depth[p] + 1
    return depth


def ancestor_mask(parents: torch.Tensor) -> torch.Tensor:
    """[n, n] bool: entry (i, j) is True iff j is i or an ancestor of i."""
    n = parents.shape[0]
    mask = torch.eye(n, dtype=torch.bool)
    for i, p in enumerate(parents.tolist()):
        if p >= 0:
            mask[i] |= mask[p]
    return mask


def leaf_paths(parents: torch.Tensor) -> list[list[int]]:
    """Retrieve indices: one list per leaf, the node indices from root to that leaf."""
    n = parents.shape[0]
    has_child = torch.zeros(n, dtype=torch.bool)
    has_child[parents[parents >= 0]] = True
    paths = []
    for leaf in range(n):
        if has_child[leaf]:
            continue
        path, node = [], leaf
        while node >= 0:
            path.append(node)
            node = int(parents[node])
        paths.append(path[::-1])
    return paths


def children_lists(parents: torch.Tensor) -> list[list[int]]:
    """children[i]: the child node indices of node i, in index (= score) order."""
    children = [[] for _ in range(parents.shape[0])]
    for i, p in enumerate(parents.tolist()):
        if p >= 0:
            children[p].append(i)
    return children


def tree_attention_mask(parents: torch.Tensor, context_len: int, dtype=torch.float32) -> torch.Tensor:
    """Additive 4D mask [1, 1, n, context_len + n] for verifying a tree in one forward:
    every node sees the whole context and its own ancestors; 0 = attend, dtype min = not."""
    n = parents.shape[0]
    allowed = torch.cat([torch.ones(n, context_len, dtype=torch.bool), ancestor_mask(parents)], dim=1)
    mask = torch.zeros(n, context_len + n, dtype=dtype)
    mask.masked_fill_(~allowed, torch.finfo(dtype).min)
    return mask[None, None]
