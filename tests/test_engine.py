"""Lossless speculative decoding: token-identical to `generate(do_sample=False)`.

Random drafts make acceptance rare and the trees odd: output must still be identical,
only slower (the test that matters, as in transformers' assisted generation tests).
"""
import pytest
import torch

from specvlm_core import engine, testing
from specvlm_core.draft import new_draft_for
from specvlm_core.models import prepare_inputs

MEDIA = {
    "img64": dict(image=lambda: testing.tiny_image((64, 64), 1)),
    "img100x48": dict(image=lambda: testing.tiny_image((100, 48), 2)),
    "img128": dict(image=lambda: testing.tiny_image((128, 128), 3)),
    "img48x120": dict(image=lambda: testing.tiny_image((48, 120), 4)),
    "clip4": dict(video=lambda: testing.tiny_clip(4, (64, 64), 5)),
    "clip8": dict(video=lambda: testing.tiny_clip(8, (48, 64), 6)),
    "clip16": dict(video=lambda: testing.tiny_clip(16, (32, 32), 7)),
    "text": dict(),
}
TREES = [(1, 1, 1), (1, 8, 8), (2, 3, 6), (4, 6, 16), (10, 2, 20), (10, 8, 64), (3, 5, 64), (6, 4, 1)]
CASES = [(m, TREES[i % len(TREES)], i % 3) for i, m in enumerate(MEDIA)] + \
        [(m, TREES[(i + 3) % len(TREES)], 3 + i % 2) for i, m in enumerate(MEDIA)]


def reference_greedy(target, inputs, max_new_tokens):
    out = target.model.generate(**inputs, do_sample=False, max_new_tokens=max_new_tokens)
    return out[0, inputs["input_ids"].shape[1]:].tolist()


def run_spec(target, inputs, tree, draft_seed, max_new_tokens, sampling=None):
    drafter = engine.EagleDrafter(new_draft_for(target, seed=draft_seed), target)
    sampling = sampling or engine.SamplingSettings(max_new_tokens=max_new_tokens)
    return engine.collect(engine.speculative_stream(target, drafter, inputs, sampling,
                                                    engine.TreeSettings(*tree)))


def media_kwargs(name):
    return {k: f() for k, f in MEDIA[name].items()}


@pytest.mark.parametrize("media,tree,draft_seed", CASES, ids=[f"{m}-{t}-d{s}" for m, t, s in CASES])
def test_greedy_speculative_equals_generate(family_target, media, tree, draft_seed):
    target = family_target("qwen2_vl")
    inputs = prepare_inputs(target, "Describe the image in detail.", **media_kwargs(media))
    ref = reference_greedy(target, inputs, 24)
    spec = run_spec(target, inputs, tree, draft_seed, 24)
    ar = engine.collect(engine.autoregressive_stream(target, inputs, engine.SamplingSettings(max_new_tokens=24)))
    assert ar.token_ids == ref
    assert spec.token_ids == ref
    assert spec.finish_reason == ("eos" if ref[-1] in target.eos_token_ids() else "length")
    # Each round emits between 1 and depth + 1 tokens.
    for event in spec.events[1:]:
        assert 1 <= len(event.new_tokens) <= tree[1] + 1


def started_drafter(target, draft_seed: int = 3):
    """A random-draft EagleDrafter after its prefill on an image prompt, and the root token."""
    inputs = prepare_inputs(target, "Describe the image in detail.", image=testing.tiny_image((64, 64), 1))
    logits, features, embeds = engine.TargetRunner(target).prefill(inputs)
    root = int(logits.argmax())
    drafter = engine.EagleDrafter(new_draft_for(target, seed=draft_seed), target)
    drafter.start(features, embeds, root, visual_mask=engine.visual_mask(target, inputs))
    return drafter, root


@pytest.mark.parametrize("depth,total", [(6, 6), (8, 5), (3, 10), (1, 1)])
def test_a_chain_is_proposed_as_the_general_tree_with_top_k_1_would_be(family_target, depth, total):
    """top_k 1 takes a shortcut (EagleDrafter._propose_chain): same tokens, parents,
    depths and scores as the general expansion, min(depth, total) nodes deep."""
    target = family_target("qwen2_vl")
    drafter, root = started_drafter(target)
    settings = engine.TreeSettings(1, depth, total)
    chain, general = drafter.propose(root, settings), drafter._propose_tree(root, settings)
    assert len(chain) == 1 + min(depth, total)
    assert chain.parents.tolist() == list(range(-1, min(depth, total)))
    for name in ("tokens", "parents", "depths"):
        assert getattr(chain, name).tolist() == getattr(general, name).tolist(), name
    torch.testing.assert_close(chain.scores, general.scores)


def test_a_chain_ends_at_an_end_of_turn_token(family_target):
    """Nothing after an end-of-turn token is ever emitted: the chain stops there."""
    target = family_target("qwen2_vl")
    drafter, root = started_drafter(target)
    eos = target.eos_token_ids()[0]
    real_lm_head, calls = drafter.lm_head, []

    def eos_third(features):  # the draft's third token is the end of the turn
        out = real_lm_head(features).clone()
        calls.append(1)
        if len(calls) == 3:
            out[:, eos] = out.max() + 10.0
        return out
    drafter.lm_head = eos_third
    chain = drafter.propose(root, engine.TreeSettings(1, 8, 8))
    assert chain.tokens.tolist()[-1] == eos and len(chain) == 4 and len(calls) == 3


def test_a_draft_that_copies_the_target_is_accepted_fully(family_target):
    # With top_k 1 the tree is a chain; a random draft rarely matches, but accepted
    # length per round is still bounded and the text identical. Here we check the
    # accounting: tau == tokens / rounds.
    target = family_target("qwen2_vl")
    inputs = prepare_inputs(target, "How many objects are there?", image=testing.tiny_image((64, 64), 9))
    spec = run_spec(target, inputs, (1, 4, 4), 0, 20)
    rounds = [e for e in spec.events if e.round > 0]
    assert spec.mean_accepted == pytest.approx(sum(len(e.new_tokens) for e in rounds) / len(rounds))
    assert sum(len(e.new_tokens) for e in spec.events) == spec.new_tokens == 20


def test_stops_at_eos_and_never_emits_past_it(family_target):
    target = family_target("qwen2_vl")
    inputs = prepare_inputs(target, "Describe the image.", image=testing.tiny_image((64, 64), 11))
    free_run = reference_greedy(target, inputs, 30)
    eos = free_run[6]  # pretend this token ends the turn
    first = free_run.index(eos)
    gen_cfg = target.model.generation_config
    saved = gen_cfg.eos_token_id
    try:
        gen_cfg.eos_token_id = [saved, eos] if isinstance(saved, int) else list(saved) + [eos]
        ref = reference_greedy(target, inputs, 30)
        assert ref == free_run[:first + 1]
        for tree in [(4, 6, 16), (1, 8, 8), (10, 8, 64)]:
            spec = run_spec(target, inputs, tree, 0, 30)
            assert spec.token_ids == ref
            assert spec.finish_reason == "eos"
            assert spec.events[-1].finished
    finally:
        gen_cfg.eos_token_id = saved


@pytest.mark.parametrize("family", testing.FAMILIES_UNDER_TEST)
def test_every_family_is_lossless_on_images_and_video(family_target, family):
    target = family_target(family)
    cases = [dict(image=testing.tiny_image((96, 64), 21))]
    if target.supports_video:
        cases.append(dict(video=testing.tiny_clip(8, (64, 64), 22)))
    for kwargs in cases:
        inputs = prepare_inputs(target, "Describe it.", **kwargs)
        ref = reference_greedy(target, inputs, 16)
        for tree, seed in [((4, 5, 12), 0), ((2, 3, 5), 1)]:
            assert run_spec(target, inputs, tree, seed, 16).token_ids == ref, (family, list(kwargs), tree)


def test_events_carry_tree_path_and_timings(family_target):
    target = family_target("qwen2_vl")
    inputs = prepare_inputs(target, "Describe it.", image=testing.tiny_image((64, 64), 12))
    spec = run_spec(target, inputs, (3, 4, 10), 0, 12)
    first, second = spec.events[0], spec.events[1]
    assert first.round == 0 and first.prefill_ms > 0 and len(first.new_tokens) == 1
    tree = second.tree
    assert len(tree["tokens"]) == len(tree["parents"]) == len(tree["depths"]) == len(tree["scores"]) <= 11
    assert tree["parents"][0] == -1 and second.accepted_nodes[0] == 0
    path_tokens = [tree["tokens"][i] for i in second.accepted_nodes[1:]]
    assert second.new_tokens == path_tokens + [second.bonus_token][:len(second.new_tokens) - len(path_tokens)]
    assert second.draft_ms > 0 and second.verify_ms > 0 and second.overhead_ms >= 0
    assert spec.text == target.tokenizer.decode(spec.token_ids, skip_special_tokens=True)
    assert "".join(e.new_text for e in spec.events) == spec.text


def _exact_two_token_distribution(target, inputs, sampling, top=12):
    """p(t1, t2) under the target's warped distribution, for the `top` likeliest t1."""
    runner = engine.TargetRunner(target)
    logits, _, _ = runner.prefill(inputs)
    p1 = engine.logits_to_probs(logits, sampling.temperature, sampling.top_k, sampling.top_p)
    exact = {}
    for t1 in p1.topk(top).indices.tolist():
        r = engine.TargetRunner(target)
        r.prefill(inputs)
        l2, _ = r.step(t1)
        p2 = engine.logits_to_probs(l2, sampling.temperature, sampling.top_k, sampling.top_p)
        for t2, q in enumerate(p2.tolist()):
            if q > 0:
                exact[(t1, t2)] = float(p1[t1]) * q
    return exact


@pytest.mark.parametrize("temperature,top_p", [(0.7, 0.9), (1.0, 1.0)])
def test_sampling_preserves_the_target_distribution_end_to_end(family_target, temperature, top_p):
    target = family_target("qwen2_vl")
    inputs = prepare_inputs(target, "What happens?")
    n = 600
    counts = {}
    for seed in range(n):
        sampling = engine.SamplingSettings(temperature=temperature, top_p=top_p, max_new_tokens=2, seed=seed)
        drafter = engine.EagleDrafter(new_draft_for(target, seed=0), target)
        out = engine.collect(engine.speculative_stream(target, drafter, inputs, sampling,
                                                       engine.TreeSettings(3, 3, 8)))
        key = tuple(out.token_ids)
        counts[key] = counts.get(key, 0) + 1
    exact = _exact_two_token_distribution(target, inputs, engine.SamplingSettings(temperature=temperature,
                                                                                     top_p=top_p))
    keys = set(exact) | set(counts)
    tv = 0.5 * sum(abs(counts.get(k, 0) / n - exact.get(k, 0.0)) for k in keys)
    mass_covered = sum(exact.values())
    # The exact table covers the top first tokens only; the uncovered mass is an allowance.
    assert tv < 0.12 + (1 - mass_covered), (tv, mass_covered)


def test_prompt_lookup_proposes_what_followed_the_latest_match_and_skips_visual_tokens():
    drafter = engine.PromptLookupDrafter(num_tokens=3, max_ngram=2)
    # prompt: 5 6 [img] [img] 7 5 6 9 8; first token 5, then commit 6.
    prompt = torch.tensor([5, 6, 50, 50, 7, 5, 6, 9, 8])
    drafter.start(None, None, 5, visual_mask=prompt == 50, prompt_ids=prompt)
    drafter.commit([6])
    assert drafter.lookup() == [9, 8, 5]  # the later "5 6" wins; the chain runs on
    tree = drafter.propose(6)
    assert tree.tokens.tolist() == [6, 9, 8, 5] and tree.parents.tolist() == [-1, 0, 1, 2]
    # A continuation stops at a visual token, which is never proposed.
    drafter = engine.PromptLookupDrafter(num_tokens=4, max_ngram=1)
    drafter.start(None, None, 6, visual_mask=prompt == 50, prompt_ids=prompt)
    assert drafter.lookup() == [9, 8, 6]  # ... up to the end of what exists
    drafter.history = [1, 2, -1, 3, 1]
    assert drafter.lookup() == [2]
    assert engine.PromptLookupDrafter().propose(4).tokens.tolist() == [4]  # nothing to copy: root only


@pytest.mark.parametrize("family", ["qwen2_vl", "llava"])
def test_prompt_lookup_is_lossless(family_target, family):
    target = family_target(family)
    inputs = prepare_inputs(target, "Describe the image in detail.", image=testing.tiny_image((64, 64), 3))
    ref = reference_greedy(target, inputs, 32)
    res = engine.collect(engine.speculative_stream(target, engine.PromptLookupDrafter(), inputs,
                                                   engine.SamplingSettings(max_new_tokens=32), engine.TreeSettings()))
    assert res.token_ids == ref
