"""The draft layer's inference path (a KV cache written by slot) against its training path."""
import torch

from specvlm_core.draft import DraftConfig, EagleDraft


def small_draft(seed: int = 0) -> EagleDraft:
    torch.manual_seed(seed)
    d = EagleDraft(DraftConfig(hidden_size=64, num_heads=4, num_kv_heads=2, intermediate_size=128))
    # Weights away from the near-identity init, so every part of the layer matters.
    with torch.no_grad():
        for p in d.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return d.eval()


def test_cached_steps_match_the_training_forward():
    """Prefill 5 inputs in one step, then 3 one at a time: the outputs are those of the
    cache-free causal forward that training uses, at every position."""
    d = small_draft()
    g = torch.Generator().manual_seed(3)
    embeds, features = torch.randn(1, 8, 64, generator=g), torch.randn(1, 8, 64, generator=g)
    with torch.no_grad():
        reference = d(embeds, features)[0]
    cache = d.new_cache(4)  # smaller than needed: the cache must grow on its own
    outs = []
    for lo, hi in ((0, 5), (5, 6), (6, 7), (7, 8)):
        slots = torch.arange(lo, hi)
        visible = torch.ones(hi - lo, hi, dtype=torch.bool).tril(lo)
        outs.append(d.step(embeds[0, lo:hi], features[0, lo:hi], slots, slots, visible, cache))
    torch.testing.assert_close(torch.cat(outs), reference, rtol=1e-4, atol=1e-4)
