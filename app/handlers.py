"""Event functions of the app. Generators `yield` updates; every user-caused problem
(SpecVLMError) becomes a visible message in the page, never a traceback.

`Handlers(state)` binds them to the shared model; `ui.build_demo` wires them to
components. The output order of `compare` is `COMPARE_OUTPUTS`.
"""
from __future__ import annotations

import logging
import os
from dataclasses import asdict

import gradio as gr
from PIL import Image, ImageDraw

from specvlm_core import engine
from specvlm_core.errors import InputError, ParameterError, SpecVLMError
from specvlm_core.media import DEFAULT_LIMITS, load_media

from . import plots, render
from .runner import ComparisonRun
from .state import AppState, RunRecord, Session

log = logging.getLogger("specvlm_app")

UPDATE_INTERVAL_S = 0.15  # how often a running comparison refreshes the page
COMPRESSOR_MODES = ["off"]
COMPRESSOR_KEYS = ("primitive", "ratio", "visual_tokens_before", "visual_tokens_after", "kept_cells")

# Outputs of `compare`, in order (the State is not part of the client's result tuple).
COMPARE_OUTPUTS = ("summary", "status", "ar_metrics", "ar_text", "spec_metrics", "spec_text", "speedup",
                   "session", "round_slider", "tree_plot", "accepted_plot", "speedup_plot", "compressor_info")


# ----------------------------------------------------------------------- inputs

def load_input(path: str | None, frames: int | None = None):
    """(image, video frames, one-line description) for an uploaded file; no file gives
    (None, None, "no image"). Raises MediaError for anything unreadable."""
    if not path:
        return None, None, "no image or video"
    kind, media = load_media(path, num_frames=frames)
    return describe_media(kind, media, path)


def make_settings(temperature, top_p, max_new_tokens, seed, tree_auto, tree_top_k, tree_depth, tree_total,
                  compressor) -> tuple[engine.SamplingSettings, engine.TreeSettings]:
    """Validated settings from the form values. Raises ParameterError."""
    try:
        sampling = engine.SamplingSettings(temperature=float(temperature), top_p=float(top_p),
                                           max_new_tokens=int(max_new_tokens), seed=int(seed or 0))
        tree = engine.TreeSettings() if tree_auto else engine.TreeSettings(
            top_k=int(tree_top_k), depth=int(tree_depth), total_tokens=int(tree_total))
    except (TypeError, ValueError) as exc:
        raise ParameterError(f"invalid setting: {exc}") from exc
    if compressor not in COMPRESSOR_MODES:
        raise ParameterError(f"compressor mode {compressor!r} is not available yet (choose 'off')")
    sampling.validate(max_tokens_limit=2048)
    tree.validate()
    return sampling, tree


def contact_sheet(frames: list, timestamps: list[float] | None = None, thumb: int = 120) -> Image.Image:
    """The sampled frames of a clip side by side (what the model sees), with times."""
    cols = min(4, len(frames))
    rows = (len(frames) + cols - 1) // cols
    thumbs = []
    for frame in frames:
        t = frame.copy()
        t.thumbnail((thumb, thumb))
        thumbs.append(t)
    cell_w = max(t.width for t in thumbs) + 6
    cell_h = max(t.height for t in thumbs) + 20
    sheet = Image.new("RGB", (cols * cell_w, rows * cell_h), "white")
    draw = ImageDraw.Draw(sheet)
    for i, t in enumerate(thumbs):
        x, y = (i % cols) * cell_w + 3, (i // cols) * cell_h + 3
        sheet.paste(t, (x, y))
        label = f"{timestamps[i]:.2f}s" if timestamps else f"#{i}"
        draw.text((x, y + t.height + 2), label, fill="black")
    return sheet


# ---------------------------------------------------------------------- handlers

class Handlers:
    """The app's event functions, bound to the shared AppState."""

    def __init__(self, state: AppState):
        self.state = state

    # --- model status ---
    def model_status(self):
        """Status line of the model, and whether the polling timer keeps running."""
        return self.state.status_markdown(), gr.Timer(active=not self.state.done.is_set())

    # --- media preview ---
    def preview(self, media: str | None, frames: float = DEFAULT_LIMITS.default_frames):
        """What the model will see of the uploaded file, and a one-line description."""
        if not media:
            return None, ""
        try:
            kind, loaded = load_media(media, num_frames=int(frames))
        except SpecVLMError as exc:
            gr.Warning(str(exc))
            return None, render.error_html(str(exc))
        image, frames_, description = describe_media(kind, loaded, media)
        if image is not None:
            return image, description
        return contact_sheet(frames_, loaded.timestamps), description

    # --- the comparison ---
    def compare(self, media: str | None, question: str, temperature: float = 0.0, top_p: float = 1.0,
                max_new_tokens: float = 96, seed: float = 0, frames: float = DEFAULT_LIMITS.default_frames,
                tree_auto: bool = False, tree_top_k: float = 4, tree_depth: float = 6, tree_total: float = 16,
                compressor: str = "off", session: Session | None = None):
        """Plain decoding, then SpecVLM, streamed side by side; yields COMPARE_OUTPUTS."""
        session = session if isinstance(session, Session) else Session()
        try:
            if not isinstance(question, str) or not question.strip():
                raise InputError("the question is empty: type a question about the image or video")
            sampling, tree = make_settings(temperature, top_p, max_new_tokens, seed, tree_auto, tree_top_k,
                                           tree_depth, tree_total, compressor)
            image, video, description = load_input(media, int(frames))
        except SpecVLMError as exc:
            gr.Warning(str(exc))
            yield self._error_outputs(str(exc), session)
            return

        while not self.state.done.wait(0.25):
            yield self._status_only(f"⏳ Waiting for the model: {self.state.phase}")
        if not self.state.ready:
            yield self._error_outputs(f"the model is not available: {self.state.error}", session)
            return

        record = RunRecord(question=question.strip(), media_name=description, temperature=sampling.temperature,
                           settings={"sampling": asdict(sampling), "tree": asdict(tree)})
        session.last_run = record
        session.runs += 1
        segmenter = render.TokenSegmenter(self._decode)
        run = ComparisonRun(self.state, question.strip(), image, video, sampling, tree).start()
        try:
            for batch in run.messages(UPDATE_INTERVAL_S):
                for kind, payload in batch:
                    record.phase = "ar" if kind == "started" else kind
                    if kind == "ar":
                        record.ar_events.append(payload)
                    elif kind == "spec":
                        record.spec_events.append(payload)
                        segmenter.feed(payload)
                    elif kind == "error":
                        record.error = payload
                if record.phase in ("done", "error", "stopped"):
                    if record.error:
                        gr.Warning(record.error)
                    yield self._final_outputs(record, segmenter, session, description)
                    return
                yield self._live_outputs(record, segmenter, description)
        finally:
            # Reached when the run ends and also when gradio closes this generator (Stop
            # button, closed tab): the worker stops after its current forward and
            # releases the model.
            run.stop()

    def stopped(self):
        """Status after the Stop button (the run itself is cancelled by gradio)."""
        return '<div class="svlm-status">⏹ Stopped. Press Run to start again.</div>'

    # --- draft trees tab ---
    def show_round(self, round_no: float, session: Session | None):
        """The draft tree of one round of the last SpecVLM run, and a line about it."""
        record = session.last_run if isinstance(session, Session) else None
        rounds = record.rounds if record else []
        if not rounds:
            return plots.tree_figure(None), "Run a comparison on the Compare tab first."
        idx = min(max(int(round_no or 1), 1), len(rounds)) - 1
        event = rounds[idx]
        return plots.tree_figure(event, self._decode_one), round_caption(event, self._decode)

    def toggle_tree_auto(self, auto: bool):
        return [gr.Slider(interactive=not auto) for _ in range(3)]

    # --- helpers ---
    def _decode(self, ids: list[int]) -> str:
        return self.state.target.tokenizer.decode(ids, skip_special_tokens=True)

    def _decode_one(self, ids: list[int]) -> str:
        return self.state.target.tokenizer.decode(ids, skip_special_tokens=False)

    def _status_only(self, message: str):
        return _outputs(status=f'<div class="svlm-status">{message}</div>')

    def _error_outputs(self, message: str, session: Session):
        return _outputs(summary={"error": message}, status=render.error_html(message),
                        ar_metrics=render.metrics_html("Plain decoding", None, "idle"),
                        ar_text=render.plain_text_html(""), spec_metrics=render.metrics_html("SpecVLM", None, "idle"),
                        spec_text=render.spec_text_html([]),
                        speedup=render.summary_html(None, None, None, 0.0, final=False), session=session)

    def _panels(self, record: RunRecord, segmenter, final: bool):
        ar_m, spec_m = render.run_metrics(record.ar_events), render.run_metrics(record.spec_events)
        phase = record.phase
        ar_state = "running" if phase in ("ar", "waiting", "starting") and not final else "done"
        spec_state = "running" if phase == "spec" and not final else ("waiting" if not record.spec_events else "done")
        ar_text = record.ar_events[-1].text if record.ar_events else ""
        panels = dict(ar_metrics=render.metrics_html("Plain decoding", ar_m, ar_state),
                      ar_text=render.plain_text_html(ar_text, running=ar_state == "running"),
                      spec_metrics=render.metrics_html("SpecVLM", spec_m, spec_state),
                      spec_text=render.spec_text_html(segmenter.pieces, running=spec_state == "running"))
        return panels, ar_m, spec_m

    def _live_outputs(self, record: RunRecord, segmenter, description: str):
        panels, _, spec_m = self._panels(record, segmenter, final=False)
        status = {"waiting": "⏳ Waiting for another user's run to finish …",
                  "ar": "Running plain decoding …", "spec": "Running SpecVLM …"}.get(record.phase, "Starting …")
        speedup = render.live_speedup(record.ar_events, record.spec_events)
        return _outputs(status=f'<div class="svlm-status">{status} <span class="svlm-dim">({description})</span></div>',
                        speedup=render.summary_html(speedup, spec_m and spec_m.get("tau"), None, record.temperature,
                                                    final=False), **panels)

    def _final_outputs(self, record: RunRecord, segmenter, session: Session, description: str):
        panels, ar_m, spec_m = self._panels(record, segmenter, final=True)
        both = bool(record.ar_events and record.spec_events and record.ar_events[-1].finished
                    and record.spec_events[-1].finished)
        identical = None
        if both:
            ar_ids = [t for e in record.ar_events for t in e.new_tokens]
            spec_ids = [t for e in record.spec_events for t in e.new_tokens]
            identical = ar_ids == spec_ids
        speedup = render.live_speedup(record.ar_events, record.spec_events) if both else None
        tau = spec_m.get("tau") if spec_m else None
        summary = {"ar": _summary(record.ar_events, ar_m), "spec": _summary(record.spec_events, spec_m),
                   "speedup": speedup, "tau": tau, "identical": identical, "temperature": record.temperature,
                   "question": record.question, "media": description, **record.settings}
        if record.error:
            summary["error"] = record.error
            status = render.error_html(record.error)
        elif record.phase == "stopped":
            summary["error"] = "stopped"
            status = '<div class="svlm-status">⏹ Stopped.</div>'
        else:
            status = (f'<div class="svlm-status">Done: plain {ar_m["seconds"]:.3f} s, SpecVLM '
                      f'{spec_m["seconds"]:.3f} s → {speedup:.2f}× '
                      f'<span class="svlm-dim">({description})</span></div>'
                      if speedup is not None else '<div class="svlm-status">Done.</div>')
        rounds = record.rounds
        slider = gr.Slider(minimum=1, maximum=max(2, len(rounds)), value=1, step=1, interactive=len(rounds) > 1,
                           label=f"Round (1–{len(rounds)})" if rounds else "Round (no rounds)")
        first_tree = plots.tree_figure(rounds[0] if rounds else None, self._decode_one)
        return _outputs(summary=summary, status=status, **panels,
                        speedup=render.summary_html(speedup, tau, identical, record.temperature, final=True),
                        session=session, round_slider=slider, tree_plot=first_tree,
                        accepted_plot=plots.accepted_length_figure(record.spec_events),
                        speedup_plot=plots.speedup_figure(record.ar_events, record.spec_events),
                        compressor_info=compressor_markdown(record))


def _outputs(**values) -> list:
    """compare's outputs in COMPARE_OUTPUTS order; the ones not given stay as they are."""
    unknown = set(values) - set(COMPARE_OUTPUTS)
    if unknown:
        raise KeyError(f"not outputs of compare: {sorted(unknown)}")
    return [values.get(name, gr.skip()) for name in COMPARE_OUTPUTS]


def describe_media(kind: str, loaded, path: str):
    """(image, video frames, one-line description) for what load_media returned; a
    one-frame clip counts as an image."""
    name = os.path.basename(path)
    if kind == "image":
        return loaded, None, f"image {name}, {loaded.width}×{loaded.height}"
    if len(loaded.frames) == 1:
        return loaded.frames[0], None, f"image {name} (one frame)"
    w, h = loaded.frames[0].size
    return None, loaded.frames, (f"video {name}: {len(loaded.frames)} of {loaded.total_frames} frames sampled, "
                                 f"{w}×{h}, {loaded.fps:.3g} fps")


def _summary(events, metrics) -> dict | None:
    if not events or metrics is None:
        return None
    out = {"text": events[-1].text, "token_ids": [t for e in events for t in e.new_tokens], **metrics}
    return {k: (round(v, 5) if isinstance(v, float) else v) for k, v in out.items()}


def round_caption(event, decode) -> str:
    n_acc = max(0, len(event.accepted_nodes) - 1)
    text = decode(event.new_tokens).replace("\n", "⏎").replace("`", "'")
    return (f"**Round {event.round}**: {len(event.tree['tokens']) - 1} draft nodes verified in one forward; "
            f"{n_acc} accepted + bonus → emitted `{text}` · draft {event.draft_ms:.1f} ms, "
            f"verify {event.verify_ms:.1f} ms")


def compressor_markdown(record: RunRecord | None) -> str:
    """What the compressor did in the last run (round 1's info), or the placeholder."""
    intro = ("**Visual-token compressor.** This tab lands with the compressor: the draft will shrink the "
             "visual tokens it attends to, and round 1 of each SpecVLM run will report what it kept.")
    info = {}
    rounds = record.rounds if record else []
    if rounds:
        info = rounds[0].info or {}
    found = {k: info[k] for k in COMPRESSOR_KEYS if k in info}
    if not found:
        extra = f" (draft prefill took {info['draft_prefill_ms']:.1f} ms.)" if "draft_prefill_ms" in info else ""
        return intro + "\n\nCompressor: **off** in the last run — nothing to show yet." + extra
    rows = "\n".join(f"| `{k}` | {v} |" for k, v in found.items())
    return intro + "\n\n| key | value |\n|---|---|\n" + rows
