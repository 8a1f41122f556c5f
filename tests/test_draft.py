"""The draft layer's inference path (a KV cache written by slot) against its training path."""
import pytest
import torch
from torch import nn

from specvlm_core.draft import DraftConfig, EagleDraft
from specvlm_core.engine import direct_call


def small_draft(seed: int = 0) -> EagleDraft:
    torch.manual_seed(seed)
    d = EagleDraft(DraftConfig(hidden_size=64, num_heads=4, num_kv_heads=2, intermediate_size=128))
    # Weights away from the near-identity init, so every part of the layer matters.
    with torch.no_grad():
        for p in d.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return d.eval()


@pytest.mark.parametrize("chain_form", [False, True])
def test_cached_steps_match_the_training_forward(chain_form):
    """Prefill 5 inputs in one step, then 3 one at a time: the outputs are those of the
    cache-free causal forward that training uses, at every position. chain_form: the
    single steps say "every slot before hi" with an int instead of a mask."""
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
        if chain_form and hi - lo == 1:
            visible = hi
        outs.append(d.step(embeds[0, lo:hi], features[0, lo:hi], slots, slots, visible, cache))
    torch.testing.assert_close(torch.cat(outs), reference, rtol=1e-4, atol=1e-4)


def test_the_inference_weights_follow_an_in_place_update():
    """The folded inference weights are rebuilt when a weight changes in place (as an
    optimizer step does while distillation measures tau): the step still equals the
    training forward, and it has changed."""
    d = small_draft()
    g = torch.Generator().manual_seed(5)
    embeds, features = torch.randn(1, 4, 64, generator=g), torch.randn(1, 4, 64, generator=g)
    slots, visible = torch.arange(4), torch.ones(4, 4, dtype=torch.bool).tril()
    before = d.step(embeds[0], features[0], slots, slots, visible, d.new_cache(4))
    with torch.no_grad():
        d.mlp_norm.weight.mul_(1.5)
        reference = d(embeds, features)[0]
    after = d.step(embeds[0], features[0], slots, slots, visible, d.new_cache(4))
    torch.testing.assert_close(after, reference, rtol=1e-4, atol=1e-4)
    assert not torch.allclose(after, before, atol=1e-3)


def test_direct_call_computes_what_the_module_does():
    torch.manual_seed(0)
    embedding, linear = nn.Embedding(10, 4), nn.Linear(4, 3)
    ids, x = torch.tensor([3, 0, 9]), torch.randn(2, 4)
    assert torch.equal(direct_call(embedding)(ids), embedding(ids))
    assert torch.equal(direct_call(linear)(x), linear(x))

    class Scaled(nn.Embedding):  # e.g. an embedding that multiplies by sqrt(H) in forward
        def forward(self, ids):
            return super().forward(ids) * 2.0

    scaled = Scaled(10, 4)
    assert direct_call(scaled) is scaled
