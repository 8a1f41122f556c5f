import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
if "SPECVLM_CACHE" not in os.environ:  # auto-tree measurements: never touch the user's cache
    import tempfile
    os.environ["SPECVLM_CACHE"] = tempfile.mkdtemp(prefix="specvlm-cache-")

import pytest  # noqa: E402
import torch  # noqa: E402

from specvlm_core import models, testing  # noqa: E402

torch.set_num_threads(min(2, os.cpu_count() or 1))


@pytest.fixture(scope="session")
def family_target(tmp_path_factory):
    """family -> loaded tiny random Target, built once per session."""
    cache = {}

    def get(family: str):
        if family not in cache:
            path = testing.build_tiny_target(family, tmp_path_factory.mktemp(family))
            cache[family] = models.load_target(path, device="cpu")
        return cache[family]
    return get


@pytest.fixture(scope="session")
def embedded_target():
    return models.load_target(models.DEFAULT_MODEL, device="cpu")


@pytest.fixture(scope="session")
def app_target(request):
    """What the app tests run on: the embedded model if it is there, else a tiny random target."""
    from pathlib import Path
    if (Path(models.DEFAULT_MODEL) / "config.json").exists():
        return request.getfixturevalue("embedded_target")
    return request.getfixturevalue("family_target")("qwen2_vl")


@pytest.fixture(scope="module")
def app_state(app_target):
    """The app's shared state on app_target, one per test module."""
    from app import AppState
    return AppState.from_target(app_target)


@pytest.fixture(scope="module")
def server(app_state):
    """The app on app_state (a module may override app_state), served locally; its URL."""
    from apphelpers import serve

    from app import build_demo
    demo = build_demo(app_state)
    yield serve(demo)
    demo.close()
