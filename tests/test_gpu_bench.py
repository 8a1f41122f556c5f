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
