"""A comparison run in a worker thread: plain decoding, then SpecVLM, on the shared model.

The engine's generators time themselves (`RoundEvent.elapsed_s` counts from their own
start), and any time their consumer spends between two events is counted too. Gradio's
generator handlers pause at every `yield` until the update has been sent, so driving the
engine from the handler would charge the UI's cost to whichever run yields more often
(plain decoding: once per token). The worker thread therefore runs both streams flat out
and hands events over a queue; the handler samples it at a fixed rate.
"""
from __future__ import annotations

import logging
import queue
import threading

from specvlm_core import engine
from specvlm_core.errors import SpecVLMError
from specvlm_core.models import prepare_inputs

from .tasks import FINAL, compressor_for_mode, receive

log = logging.getLogger("specvlm_app")


class ComparisonRun:
    """Plain then speculative decoding of one input, on a worker thread.

    Messages on `self.queue`: ("waiting", None) while another run holds the model,
    ("started", {"draft_source", "compressor", "compressor_note"}), ("ar", RoundEvent),
    ("spec", RoundEvent), then exactly one of ("done", None), ("error", message) or
    ("stopped", None).

    compressor: the draft's compressor for this run (see `tasks.compressor_for_mode`: "off",
    a mode, or None for the draft as it is); the shared draft itself is never changed.
    """

    def __init__(self, app_state, prompt: str, image, video, sampling: engine.SamplingSettings,
                 tree: engine.TreeSettings, compressor: str | None = None):
        self.state = app_state
        self.prompt, self.image, self.video = prompt, image, video
        self.sampling, self.tree = sampling, tree
        self.compressor = compressor
        self.queue: queue.Queue = queue.Queue()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._work, name="specvlm-run", daemon=True)

    def start(self) -> "ComparisonRun":
        self._thread.start()
        return self

    def stop(self) -> None:
        """Ask the worker to stop after the current forward; returns at once (it runs in
        gradio's event loop when a run is cancelled, so it must not block)."""
        self._stop.set()

    def join(self, timeout: float | None = None) -> bool:
        self._thread.join(timeout)
        return not self._thread.is_alive()

    @property
    def stopped(self) -> bool:
        return self._stop.is_set()

    def _work(self) -> None:
        lock = self.state.lock
        if not lock.acquire(blocking=False):
            self.queue.put(("waiting", None))
            while not lock.acquire(timeout=0.2):
                if self._stop.is_set():
                    self.queue.put(("stopped", None))
                    return
        try:
            if self._stop.is_set():
                self.queue.put(("stopped", None))
                return
            target = self.state.target
            # Read under the lock: "Use this draft" swaps the shared draft under it too.
            draft = self.state.draft
            compressor, note = compressor_for_mode(draft, self.compressor, self.state.compressors)
            self.queue.put(("started", {"draft_source": self.state.draft_source, "compressor": self.compressor,
                                        "compressor_note": note}))
            inputs = prepare_inputs(target, self.prompt, image=self.image, video=self.video)
            drafter = engine.EagleDrafter(draft, target, compressor=compressor)
            media = {"image": self.image, "video": self.video}
            streams = (("ar", lambda: engine.autoregressive_stream(target, inputs, self.sampling)),
                       ("spec", lambda: engine.speculative_stream(target, drafter, inputs, self.sampling,
                                                                  self.tree, media=media)))
            for method, make in streams:
                stream = make()
                try:
                    for event in stream:
                        self.queue.put((method, event))
                        if self._stop.is_set():
                            self.queue.put(("stopped", None))
                            return
                finally:
                    stream.close()
            self.queue.put(("done", None))
        except SpecVLMError as exc:
            self.queue.put(("error", str(exc)))
        except Exception as exc:  # a bug: log it in full, show one line
            log.exception("generation failed")
            self.queue.put(("error", f"internal error ({type(exc).__name__}: {exc}); see the server log"))
        finally:
            lock.release()

    def messages(self, interval: float):
        """Batches of messages, one batch every `interval` seconds (possibly empty; sooner
        for status changes), until the final message has been delivered."""
        while True:
            batch = []
            final = False
            for kind, payload in receive(self.queue, interval):
                batch.append((kind, payload))
                if kind in FINAL:
                    final = True
                    break
                if kind in ("waiting", "started"):
                    break
            yield batch
            if final:
                return

