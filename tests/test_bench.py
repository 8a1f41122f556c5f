"""Benchmark summaries: the bounds the report gives next to the measured speedup."""
import pytest

from specvlm_core import bench


def test_free_draft_speedup_pays_prefill_and_verification_only():
    plain = {"a": {"seconds": 1.0}, "b": {"seconds": 0.5}}
    rows = [
        # 11 tokens: the prefill's token + 2 rounds of 5 -> 100 + 2 x (40 + 5) = 190 ms
        {"case": "a", "new_tokens": 11, "tau": 5.0, "prefill_ms": 100.0, "verify_ms": 40.0, "overhead_ms": 5.0},
        # 5 tokens: 1 round of 4 -> 50 + 50 = 100 ms
        {"case": "b", "new_tokens": 5, "tau": 4.0, "prefill_ms": 50.0, "verify_ms": 50.0, "overhead_ms": None},
        # no plain run for this case, and a case without rounds: both left out
        {"case": "c", "new_tokens": 5, "tau": 4.0, "prefill_ms": 50.0, "verify_ms": 50.0, "overhead_ms": 0.0},
        {"case": "a", "new_tokens": 1, "tau": None, "prefill_ms": 100.0, "verify_ms": None, "overhead_ms": None},
    ]
    assert bench.free_draft_speedup(rows, plain) == pytest.approx((1000 / 190 + 500 / 100) / 2)
    assert bench.free_draft_speedup([], plain) is None


def test_markdown_states_the_bounds():
    report = {"hardware": "cpu", "conditions": {"tree": {}, "max_new_tokens": 8, "cases": ["a"]}, "methods": [],
              "ideal": {"ideal_speedup": 2.2, "fraction_of_ideal": 0.72, "overhead_share": 0.043,
                        "free_draft_speedup": 2.27}}
    text = bench.to_markdown(report)
    assert "ideal tau x plain step / round time is 2.20x (reached: 72%)" in text
    assert "engine overhead is 4.3% of a round" in text
    assert "would reach 2.27x." in text
