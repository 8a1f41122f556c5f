"""Load: eight gradio_client sessions run Compare at T=0 at the same time, each with its
own input and settings, against the launched app (the embedded model when it exists,
else a tiny random Qwen2-VL). Every run completes, equals the single-user run of the
same input, and no session sees another's settings or results. The queue is bounded:
beyond max_size, requests are refused instead of piling up in memory.
"""
import os
import re
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")

import pytest  # noqa: E402

from apphelpers import serve  # noqa: E402
from app import build_demo, handlers  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "assets" / "examples"
OUTPUTS = [n for n in handlers.COMPARE_OUTPUTS if n != "session"]
pytestmark = [pytest.mark.filterwarnings("ignore:::gradio.queueing"),
              pytest.mark.filterwarnings("ignore:::gradio.helpers")]

# Eight different inputs and settings (all at temperature 0).
CASES = [
    dict(path="shapes_96.png", question="Describe this image.", max_new_tokens=20, compressor="off"),
    dict(path="shapes_160.png", question="How many objects are there?", max_new_tokens=24, tree_top_k=2,
         tree_depth=3, tree_total=6, compressor="prune_guided:4"),
    dict(path="shapes_256.png", question="What colour is the largest shape?", max_new_tokens=16, tree_top_k=8,
         tree_depth=4, tree_total=32, compressor="pool:4"),
    dict(path="clip_animated.gif", question="What happens in the video?", max_new_tokens=12, frames=4,
         compressor="select"),
    dict(path=None, question="What is a triangle?", max_new_tokens=20, tree_top_k=1, tree_depth=8, tree_total=8),
    dict(path="shapes_384.png", question="Where is the circle?", max_new_tokens=24, compressor="resampler:2"),
    dict(path="clip_8_frames.mp4", question="Which shape moves?", max_new_tokens=16, frames=6,
         compressor="text_only:0"),
    dict(path="shapes_96.png", question="List the shapes you see.", max_new_tokens=28, tree_top_k=3, tree_depth=5,
         tree_total=12, compressor="concat"),
]


def client_for(url):
    from gradio_client import Client
    return Client(url, verbose=False)


def run_case(client, case: dict) -> dict:
    """One comparison, then the caption of its round 1 (read back from the session)."""
    from gradio_client import handle_file
    settings = {k: v for k, v in case.items() if k != "path"}
    media = handle_file(str(EXAMPLES / case["path"])) if case["path"] else None
    out = dict(zip(OUTPUTS, client.predict(media=media, temperature=0, api_name="/compare", **settings)))
    _, caption = client.predict(1, api_name="/tree_round")
    out["caption"] = caption.split(" · draft")[0]  # the timings differ from run to run
    return out


def test_eight_concurrent_sessions_get_their_own_single_user_results(server, app_state):
    started = time.time()
    reference = [run_case(client_for(server), case) for case in CASES]
    for ref in reference:
        assert ref["summary"].get("identical") is True, ref["summary"]

    clients = [client_for(server) for _ in CASES]
    barrier = threading.Barrier(len(CASES))

    def together(i):
        barrier.wait()
        return run_case(clients[i], CASES[i])

    with ThreadPoolExecutor(len(CASES)) as pool:
        results = list(pool.map(together, range(len(CASES))))

    for case, ref, out in zip(CASES, reference, results):
        summary = out["summary"]
        assert "error" not in summary, summary
        # The same answer as the single-user run, token for token, and lossless.
        assert summary["ar"]["token_ids"] == ref["summary"]["ar"]["token_ids"]
        assert summary["spec"]["token_ids"] == ref["summary"]["spec"]["token_ids"]
        assert summary["identical"] is True and summary["spec"]["rounds"] == ref["summary"]["spec"]["rounds"]
        # Its own settings and input, nobody else's.
        assert summary["question"] == case["question"] and summary["temperature"] == 0
        assert summary["sampling"]["max_new_tokens"] == case["max_new_tokens"]
        tree = {"top_k": case.get("tree_top_k", 4), "depth": case.get("tree_depth", 6),
                "total_tokens": case.get("tree_total", 16)}
        assert summary["tree"] == tree and summary["compressor"] == case.get("compressor", "off")
        assert summary["media"].split(",")[0] == ref["summary"]["media"].split(",")[0]
        assert f"mode `{case.get('compressor', 'off')}`" in out["compressor_info"]
        # The session's stored run (read by a second call) is its own.
        assert out["caption"] == ref["caption"]
        assert re.search(r"data-identical=\"true\"", out["speedup"])
    assert app_state.lock.acquire(timeout=5)
    app_state.lock.release()
    assert time.time() - started < 80


def test_the_queue_refuses_requests_beyond_its_bound(app_state):
    from gradio_client import handle_file
    demo = build_demo(app_state, queue_size=2)
    assert demo._queue.max_size == 2
    url = serve(demo)
    try:
        client = client_for(url)
        media = handle_file(str(EXAMPLES / "shapes_96.png"))
        with app_state.lock:  # a long run holds the model: requests pile up
            jobs = [client.submit(media=media, question=f"Question {i}?", max_new_tokens=4, api_name="/compare")
                    for i in range(8)]
            time.sleep(2.0)
        outcomes = []
        for job in jobs:
            try:
                outcomes.append(dict(zip(OUTPUTS, job.result(timeout=60)))["summary"])
            except Exception as exc:  # refused by the full queue
                outcomes.append(str(exc))
        refused = [o for o in outcomes if isinstance(o, str)]
        done = [o for o in outcomes if isinstance(o, dict)]
        assert refused and all("queue is full" in o.lower() for o in refused), outcomes
        # At most: the running events (concurrency 2) plus max_size waiting ones.
        assert 1 <= len(done) <= 2 + 2 and all(o.get("identical") is True for o in done), outcomes
    finally:
        demo.close()
