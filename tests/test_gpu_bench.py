"""The GPU script's code path, run on the CPU with shrunken configs."""
import json

from specvlm_core import gpu_bench


def test_tiny_gpu_bench_writes_curves(tmp_path):
    out = tmp_path / "gpu.json"
    report = gpu_bench.run(device="cpu", tiny=True, out=str(out))
    assert json.loads(out.read_text())["models"].keys() == {"llava-1.5-7b", "qwen2-vl-2b"}
    for name, m in report["models"].items():
        curve = m["verify_ms_by_nodes"]
        assert list(curve) == [1, 2, 4, 8, 16, 32, 48, 64, 96, 128] and all(v > 0 for v in curve.values())
        assert set(m["draft_ms_per_expansion_by_top_k"]) == {1, 4, 8, 10}


def test_unknown_part_is_refused_before_any_work(tmp_path):
    import pytest
    with pytest.raises(ValueError, match="unknown gpu-bench part"):
        gpu_bench.run(device="cpu", tiny=True, parts=["real", "suite"], out=str(tmp_path / "x.json"))
    assert not (tmp_path / "x.json").exists()


def test_embedded_part_alone_uses_the_chosen_tree(tmp_path, monkeypatch):
    """The embedded suite runs under the tree auto-tuned on the device, and that choice is
    written next to the suite (the suite itself is stubbed: it takes minutes on a CPU)."""
    from specvlm_core import autotune, bench
    chosen = {"tree": {"top_k": 8, "depth": 8, "total_tokens": 48}, "why": "measured", "costs": {}}
    monkeypatch.setattr(autotune, "auto_tree", lambda target, draft, use_cache: chosen)
    monkeypatch.setattr(bench, "run_benchmark", lambda *a, **k: {"tree": [k["tree"].top_k, k["tree"].total_tokens]})
    report = gpu_bench.run(device="cpu", parts=["embedded"], out=str(tmp_path / "e.json"), embedded_dtype="bfloat16")
    assert report["models"] == {} and report["embedded_suite"] == {"tree": [8, 48]}
    assert report["embedded_tree"]["dtype"] == "torch.bfloat16"
    assert json.loads((tmp_path / "e.json").read_text())["embedded_tree"]["why"] == "measured"
