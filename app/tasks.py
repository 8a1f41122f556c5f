"""Work that runs beside the page: a generic worker thread (`Worker`), the per-run
compressor of a Compare mode (`compressor_for_mode`, `CompressorCache`), the app-wide auto-tree
result (`AutoTreeCache`) and the benchmark (`benchmark_job`, `write_bench_files`).

Everything here that touches the shared target takes `AppState.lock` for its whole
run (timings are never skewed by another run, and the target's forward hooks never
see another run's tensors), and never changes the shared draft.
"""
from __future__ import annotations

import csv
import logging
import queue
import tempfile
import threading
import time
import uuid
from pathlib import Path

import torch

from specvlm_core import autotune, bench, engine
from specvlm_core.compressor import VisualCompressor
from specvlm_core.errors import ParameterError, SpecVLMError

log = logging.getLogger("specvlm_app")

# Compare's "compressor mode" choices: off, the gate modes, then fixed options.
COMPRESSOR_MODES = ["off", "select", "weighted", "concat", "pool:4", "pool:16", "prune_guided:4", "resampler:2",
                    "text_only:0"]
TRAIN_COMPRESSORS = ["off", "select"]
FINAL = ("done", "error", "stopped")


class Stopped(Exception):
    """Raised inside a worker's function by `Worker.report` once the worker was stopped."""


class Worker:
    """fn(worker) on a daemon thread. fn reports with `worker.report(text)` (which raises
    Stopped once `stop()` was called) and returns a result. Messages on `self.queue`:
    ("progress", text)..., then exactly one of ("done", result), ("error", message),
    ("stopped", None)."""

    def __init__(self, fn, name: str = "specvlm-task"):
        self.fn = fn
        self.queue: queue.Queue = queue.Queue()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._work, name=name, daemon=True)

    def start(self) -> "Worker":
        self._thread.start()
        return self

    def stop(self) -> None:
        """Ask the function to stop at its next report; returns at once."""
        self._stop.set()

    @property
    def stopped(self) -> bool:
        return self._stop.is_set()

    def join(self, timeout: float | None = None) -> bool:
        self._thread.join(timeout)
        return not self._thread.is_alive()

    def report(self, text: str) -> None:
        if self._stop.is_set():
            raise Stopped()
        self.queue.put(("progress", text))

    def acquire(self, lock, waiting: str = "waiting for another run to finish …") -> None:
        """Take `lock`, reporting `waiting` while another holder has it; raises Stopped
        when stopped meanwhile. The caller releases the lock."""
        if lock.acquire(blocking=False):
            return
        self.report(waiting)
        while not lock.acquire(timeout=0.2):
            if self._stop.is_set():
                raise Stopped()

    def _work(self) -> None:
        try:
            result = self.fn(self)
            self.queue.put(("done", result))
        except Stopped:
            self.queue.put(("stopped", None))
        except SpecVLMError as exc:
            self.queue.put(("error", str(exc)))
        except Exception as exc:  # a bug: log it in full, show one line
            log.exception("%s failed", self._thread.name)
            self.queue.put(("error", f"internal error ({type(exc).__name__}: {exc}); see the server log"))

    def updates(self, interval: float = 0.25):
        """(kind, payload) pairs: the newest ("progress", text) each interval, or
        ("tick", None) when nothing arrived (so a generator handler yields regularly and
        can be cancelled), ending with the final message."""
        while True:
            latest = None
            for kind, payload in receive(self.queue, interval):
                if kind in FINAL:
                    if latest is not None:
                        yield latest
                    yield kind, payload
                    return
                latest = (kind, payload)
            yield latest or ("tick", None)


def receive(messages: queue.Queue, interval: float):
    """The messages that arrive on a worker's queue within `interval` seconds; the
    caller may stop early (break) on a message that must be shown at once."""
    deadline = time.monotonic() + interval
    while True:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            return
        try:
            yield messages.get(timeout=remaining)
        except queue.Empty:
            return


# ------------------------------------------------------------ drafts, compressors

def trained_mode(draft) -> str | None:
    """The compressor mode the draft was trained with, or None."""
    compressor = getattr(draft, "compressor", None)
    return getattr(compressor, "mode", None) if compressor is not None else None


class CompressorCache:
    """Untrained compressors for Compare's modes, built once per (mode, width, device,
    dtype) from a fixed seed, so every run with a mode sees the same weights."""

    def __init__(self):
        self._lock = threading.Lock()
        self._built: dict = {}

    def get(self, mode: str, hidden: int, device, dtype) -> VisualCompressor:
        key = (mode, hidden, str(device), str(dtype))
        with self._lock:
            if key not in self._built:
                with torch.random.fork_rng(devices=[]):
                    torch.manual_seed(0)
                    comp = VisualCompressor(hidden, mode=mode)
                comp.requires_grad_(False)
                self._built[key] = comp.to(device=device, dtype=dtype).eval()
            return self._built[key]


def compressor_for_mode(draft, mode: str | None, cache: CompressorCache) -> tuple[object, str]:
    """(compressor for `engine.EagleDrafter(..., compressor=)`, note) for a Compare mode.
    None: the draft's own ("draft"); "off": no compressor; the draft's trained mode: its
    trained compressor; any other mode: an untrained compressor (the draft still
    proposes, the target still decides: lossless). The shared draft is never changed.
    note: "as trained", "off", "trained" or "untrained"."""
    if mode is None:
        return "draft", "as trained"
    if mode not in COMPRESSOR_MODES:
        raise ParameterError(f"unknown compressor mode {mode!r}; choose one of {', '.join(COMPRESSOR_MODES)}")
    if mode == "off":
        return None, "off"
    if trained_mode(draft) == mode:
        return draft.compressor, "trained"
    p = draft.fuse.weight
    return cache.get(mode, draft.config.hidden_size, p.device, p.dtype), "untrained"


# ------------------------------------------------------------------- auto tree

class AutoTreeCache:
    """The auto tree for the current draft: measured once (lazily, by whichever session
    asks first; the others wait for that measurement), kept until the draft changes.
    `samples`: calibration prompts (None: autotune's default)."""

    def __init__(self, state, samples: int | None = None):
        self.state = state
        self.samples = samples
        self._lock = threading.Lock()
        self._draft = None
        self.result: dict | None = None

    def cached(self) -> dict | None:
        return self.result if self.result is not None and self._draft is self.state.draft else None

    def clear(self) -> None:
        self.result, self._draft = None, None

    def compute(self, worker: Worker) -> dict:
        """Run in a Worker: the cached result, or a measurement under the model lock."""
        hit = self.cached()
        if hit is not None:
            return hit
        worker.acquire(self._lock, "another session is measuring the auto tree …")
        try:
            hit = self.cached()
            if hit is not None:
                return hit
            worker.acquire(self.state.lock)
            try:
                draft = self.state.draft
                examples = None
                if self.samples:
                    from specvlm_core.distill import held_out_examples
                    examples = held_out_examples(self.samples, seed=autotune.engine_seed())
                worker.report("measuring verify and draft costs on this device …")
                result = autotune.auto_tree(self.state.target, draft, examples=examples,
                                            progress=lambda text: worker.report(text + " …"))
                self.result, self._draft = result, draft
                return result
            finally:
                self.state.lock.release()
        finally:
            self._lock.release()


def tree_from_auto(result: dict) -> engine.TreeSettings:
    t = result["tree"]
    return engine.TreeSettings(top_k=int(t["top_k"]), depth=int(t["depth"]), total_tokens=int(t["total_tokens"]))


# ------------------------------------------------------------------- benchmark

BENCH_DIR = Path(tempfile.gettempdir()) / "specvlm-studio" / "bench"
CSV_COLUMNS = ("case", "temperature", "method", "seconds", "new_tokens", "tokens_per_s", "speedup", "tau",
               "prefill_ms", "draft_ms", "verify_ms", "overhead_ms", "matches_plain")


def benchmark_job(state, suite_name: str, max_new_tokens: int, repeats: int, tree_mode: str,
                  fixed_tree: engine.TreeSettings):
    """A Worker function: the benchmark on the shared model (lock held throughout)."""

    def run(worker: Worker) -> dict:
        try:
            cases = bench.suite(suite_name)
        except ValueError as exc:
            raise ParameterError(str(exc)) from exc
        tree = fixed_tree
        if tree_mode == "auto":
            tree = tree_from_auto(state.auto_tree.compute(worker))
        worker.acquire(state.lock)
        try:
            draft = state.draft
            worker.report(f"warming up, then case 1 of {len(cases)} ({cases[0].name}) …")

            def progress(done, total, name):
                nxt = f"; next: {cases[done].name}" if done < total else ""
                worker.report(f"{done} of {total} cases done ({name}){nxt} …")

            report = bench.run_benchmark(state.target, draft, cases, max_new_tokens=max_new_tokens,
                                         repeats=repeats, tree=tree, progress=progress)
        finally:
            state.lock.release()
        report["conditions"]["tree_mode"] = tree_mode
        return report

    return run


def write_bench_files(report: dict, folder: Path | None = None) -> tuple[str, str]:
    """(JSON path, CSV path) of a report, in a fresh folder."""
    folder = folder or BENCH_DIR / f"{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:6]}"
    folder.mkdir(parents=True, exist_ok=True)
    json_path, csv_path = folder / "benchmark.json", folder / "benchmark.csv"
    bench.write_report(report, json_path=json_path)
    with open(csv_path, "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=CSV_COLUMNS, extrasaction="ignore")
        writer.writeheader()
        for row in report["rows"]:
            writer.writerow({k: row.get(k) for k in CSV_COLUMNS})
    return str(json_path), str(csv_path)
