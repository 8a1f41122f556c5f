"""Event functions of the app. Generators `yield` updates; every user-caused problem
(SpecVLMError) becomes a visible message in the page, never a traceback.

`Handlers(state)` binds them to the shared model; `ui.build_demo` wires them to
components. The output order of `compare` is `COMPARE_OUTPUTS`.
"""
from __future__ import annotations

import logging
import os
import time
from dataclasses import asdict
from pathlib import Path

import gradio as gr
from PIL import Image, ImageDraw

from specvlm_core import bench, distill, engine
from specvlm_core.draft import EagleDraft
from specvlm_core.errors import InputError, ParameterError, SpecVLMError
from specvlm_core.media import DEFAULT_LIMITS, load_media

from . import plots, render
from .overlay import kept_cells_overlay
from .runner import ComparisonRun
from .state import AppState, RunRecord, Session
from .tasks import COMPRESSOR_MODES, TRAIN_COMPRESSORS, Worker, benchmark_job, tree_from_auto, write_bench_files
from .training import STARTUP_DRAFT, inside, list_drafts, new_upload_folder, run_folder, stage_uploads

log = logging.getLogger("specvlm_app")

UPDATE_INTERVAL_S = 0.15  # how often a running comparison refreshes the page
TASK_INTERVAL_S = 0.3  # how often a benchmark or auto-tree measurement refreshes it

# Outputs of `compare`, in order (the State is not part of the client's result tuple).
COMPARE_OUTPUTS = ("summary", "status", "ar_metrics", "ar_text", "spec_metrics", "spec_text", "speedup",
                   "session", "round_slider", "tree_plot", "accepted_plot", "speedup_plot", "compressor_info",
                   "gate_plot", "overlay")
# Outputs of the Train tab's events, of `benchmark`, and of `auto_tree`, in order.
TRAIN_OUTPUTS = ("train_status", "train_plot", "train_drafts", "draft_choice", "train_timer", "session")
BENCH_OUTPUTS = ("bench_status", "bench_table", "bench_plot", "bench_json", "bench_csv")
AUTO_OUTPUTS = ("auto_info", "tree_auto", "tree_top_k", "tree_depth", "tree_total")
DATA_SOURCES = ("generated world", "uploaded LLaVA JSON")


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
        raise ParameterError(f"unknown compressor mode {compressor!r}; choose one of {', '.join(COMPRESSOR_MODES)}")
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

        if tree_auto:  # the app-wide auto tree: measured once, by the first run that asks
            for kind, payload in self._auto_tree_steps():
                if kind == "done":
                    tree = tree_from_auto(payload)
                elif kind == "error":
                    gr.Warning(payload)
                    yield self._error_outputs(f"auto tree failed: {payload}", session)
                    return
                elif kind == "stopped":
                    return
                elif kind == "progress":
                    yield self._status_only(f"⏳ Auto tree: measuring once for this device and draft — {payload}")
                else:
                    yield _outputs()  # nothing new; yielding lets a Stop cancel this run

        record = RunRecord(question=question.strip(), media_name=description, temperature=sampling.temperature,
                           settings={"sampling": asdict(sampling), "tree": asdict(tree), "tree_auto": bool(tree_auto),
                                     "compressor": compressor},
                           compressor=compressor, image=image, video=video)
        session.last_run = record
        session.runs += 1
        segmenter = render.TokenSegmenter(self._decode)
        run = ComparisonRun(self.state, question.strip(), image, video, sampling, tree, compressor=compressor).start()
        try:
            for batch in run.messages(UPDATE_INTERVAL_S):
                for kind, payload in batch:
                    record.phase = "ar" if kind == "started" else kind
                    if kind == "started" and payload:
                        record.draft_info = payload
                    elif kind == "ar":
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
            record.image = record.video = None

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

    # --- auto tree (Compare settings) ---
    def _auto_tree_steps(self):
        """The app's auto tree, measured now unless cached: ("progress", text) and
        ("tick", None) while a measurement runs, then ("done", result), ("error",
        message) or ("stopped", None)."""
        result = self.state.auto_tree.cached()
        if result is not None:
            yield "done", result
            return
        worker = Worker(self.state.auto_tree.compute, name="specvlm-autotree").start()
        try:
            yield from worker.updates(TASK_INTERVAL_S)
        finally:
            worker.stop()

    def auto_tree(self, tree_auto: bool = False):
        """Measure (or recall) the auto tree; shows the choice and why, and puts it in the
        tree sliders. Yields AUTO_OUTPUTS."""
        skip = [gr.skip()] * (len(AUTO_OUTPUTS) - 1)
        while not self.state.done.wait(0.25):
            yield [f"⏳ Waiting for the model: {self.state.phase}", *skip]
        if not self.state.ready:
            yield [f"**The model is not available:** {self.state.error}", *skip]
            return
        result = None
        for kind, payload in self._auto_tree_steps():
            if kind == "done":
                result = payload
            elif kind == "error":
                gr.Warning(payload)
                yield [render.error_html(f"auto tree failed: {payload}"), *skip]
                return
            elif kind == "stopped":
                return
            elif kind == "progress":
                yield [f"⏳ Measuring: {payload}", *skip]
            else:
                yield [gr.skip(), *skip]
        t = result["tree"]
        yield [auto_tree_markdown(result),
               gr.Checkbox(label=f"Auto tree shape (measured: {t['top_k']} / {t['depth']} / {t['total_tokens']})"),
               *(gr.Slider(value=t[k], interactive=not tree_auto) for k in ("top_k", "depth", "total_tokens"))]

    # --- benchmark tab ---
    def benchmark(self, suite: str = "quick", max_new_tokens: float = 32, repeats: float = 1,
                  tree_mode: str = "fixed", tree_top_k: float = 4, tree_depth: float = 6, tree_total: float = 16):
        """bench.run_benchmark on the shared model, progress streamed; then the table,
        the per-case speedup chart and the JSON / CSV files. Yields BENCH_OUTPUTS."""
        def status(text):
            return [f'<div class="svlm-status">{text}</div>'] + [gr.skip()] * (len(BENCH_OUTPUTS) - 1)
        try:
            if suite not in ("quick", "default"):
                raise ParameterError(f"unknown suite {suite!r}: quick or default")
            if tree_mode not in ("auto", "fixed"):
                raise ParameterError(f"tree must be 'auto' or 'fixed', got {tree_mode!r}")
            try:
                tokens, reps = int(max_new_tokens), int(repeats)
                tree = engine.TreeSettings(top_k=int(tree_top_k), depth=int(tree_depth), total_tokens=int(tree_total))
            except (TypeError, ValueError) as exc:
                raise ParameterError(f"invalid setting: {exc}") from exc
            if not 1 <= tokens <= 512:
                raise ParameterError(f"max new tokens must be between 1 and 512, got {tokens}")
            if not 1 <= reps <= 10:
                raise ParameterError(f"repeats must be between 1 and 10, got {reps}")
            tree.validate()
        except SpecVLMError as exc:
            gr.Warning(str(exc))
            yield [render.error_html(str(exc))] + [gr.skip()] * (len(BENCH_OUTPUTS) - 1)
            return
        while not self.state.done.wait(0.25):
            yield status(f"⏳ Waiting for the model: {self.state.phase}")
        if not self.state.ready:
            yield [render.error_html(f"the model is not available: {self.state.error}")] + \
                [gr.skip()] * (len(BENCH_OUTPUTS) - 1)
            return
        start = time.monotonic()
        worker = Worker(benchmark_job(self.state, suite, tokens, reps, tree_mode, tree), name="specvlm-bench").start()
        last = "starting …"
        try:
            for kind, payload in worker.updates(TASK_INTERVAL_S):
                if kind == "done":
                    json_path, csv_path = write_bench_files(payload)
                    conditions = payload["conditions"]
                    shape = conditions["tree"]
                    done = (f"Done in {time.monotonic() - start:.1f} s: suite {suite}, "
                            f"{len(conditions['cases'])} cases, {tokens} new tokens, {reps} repeat(s), "
                            f"tree {tree_mode} (top_k {shape['top_k']}, depth {shape['depth']}, "
                            f"{shape['total_tokens']} nodes).")
                    if payload.get("speedup") is not None:
                        done += f" SpecVLM median speedup at T=0: <b>{payload['speedup']:.2f}×</b>."
                    yield [f'<div class="svlm-status" data-testid="bench-done">{done}</div>',
                           bench.to_markdown(payload), plots.benchmark_figure(payload), json_path, csv_path]
                    return
                if kind == "error":
                    gr.Warning(payload)
                    yield [render.error_html(payload)] + [gr.skip()] * (len(BENCH_OUTPUTS) - 1)
                    return
                if kind == "stopped":
                    yield status("⏹ Benchmark stopped.")
                    return
                if kind == "progress":
                    last = payload
                yield status(f"⏳ Benchmark running ({time.monotonic() - start:.0f} s): {last}")
        finally:
            worker.stop()

    def benchmark_stopped(self):
        return '<div class="svlm-status">⏹ Benchmark stopped (it ends after the current case).</div>'

    # --- train tab ---
    def toggle_data_source(self, source: str):
        uploaded = source == DATA_SOURCES[1]
        return gr.File(visible=uploaded), gr.File(visible=uploaded)

    def train_start(self, source: str = DATA_SOURCES[0], data_json: str | None = None,
                    media_files: list | None = None, steps: float = 60, lr: float = 1e-3, batch_size: float = 4,
                    compressor: str = "off", out_name: str = "draft-ui", eval_every: float = 20,
                    eval_samples: float = 2, checkpoint_every: float = 20, resume: bool = False,
                    choice: str | None = None, session: Session | None = None, request: gr.Request = None):
        """Start a DistillJob on the shared target (one at a time app-wide); yields
        TRAIN_OUTPUTS (the timer then keeps them fresh)."""
        session = session if isinstance(session, Session) else Session()
        owner = _owner(request)
        try:
            if not self.state.ready:
                raise SpecVLMError(f"the model is not available: {self.state.error}" if self.state.done.is_set()
                                   else "the model is not loaded yet; wait for it, then press Start again")
            busy = self.state.training.busy_message(owner)
            if busy:  # before staging uploads: the running job may be reading this session's folder
                raise SpecVLMError(busy)
            config, note = self._train_config(session, source, data_json, media_files, steps, lr, batch_size,
                                              compressor, out_name, eval_every, eval_samples, checkpoint_every,
                                              resume)
            self.state.training.start(config, owner, note)
        except SpecVLMError as exc:
            gr.Warning(str(exc))
            yield self._train_outputs(session, choice, owner, message=str(exc), error=True)
            return
        yield self._train_outputs(session, choice, owner, force=True,
                                  message=f"started: {note} → runs/{Path(config.out_dir).name}")

    def _train_config(self, session: Session, source, data_json, media_files, steps, lr, batch_size, compressor,
                      out_name, eval_every, eval_samples, checkpoint_every, resume):
        try:
            steps, batch_size, lr = int(steps), int(batch_size), float(lr)
            eval_every, eval_samples, checkpoint_every = int(eval_every), int(eval_samples), int(checkpoint_every)
        except (TypeError, ValueError) as exc:
            raise ParameterError(f"invalid training setting: {exc}") from exc
        for name, value, lo, hi in (("steps", steps, 1, 100_000), ("batch size", batch_size, 1, 64),
                                    ("eval every", eval_every, 1, 100_000), ("eval samples", eval_samples, 0, 64),
                                    ("checkpoint every", checkpoint_every, 1, 100_000)):
            if not lo <= value <= hi:
                raise ParameterError(f"{name} must be between {lo} and {hi}, got {value}")
        if not 0 < lr <= 1:
            raise ParameterError(f"learning rate must be in (0, 1], got {lr}")
        if compressor not in TRAIN_COMPRESSORS:
            raise ParameterError(f"compressor must be one of {', '.join(TRAIN_COMPRESSORS)}, got {compressor!r}")
        if source not in DATA_SOURCES:
            raise ParameterError(f"data source must be one of {', '.join(DATA_SOURCES)}")
        runs = self.state.runs_folder()
        out = run_folder(runs, out_name)
        has_files = out.is_dir() and any(out.iterdir())
        if resume and not distill.list_checkpoints(out):
            raise ParameterError(f"nothing to resume in runs/{out.name}: it has no checkpoint")
        if has_files and not resume:
            raise ParameterError(f"runs/{out.name} already holds a training run: choose another output folder "
                                 "name, or tick 'Resume' to continue it")
        data, media_dir, note = "generated", None, "generated world"
        if source == DATA_SOURCES[1]:
            if not session.upload_dir or not Path(session.upload_dir).is_dir():
                session.upload_dir = str(new_upload_folder())
            data_path, media_path, note = stage_uploads(Path(session.upload_dir), data_json,
                                                        media_files if isinstance(media_files, list) else
                                                        ([media_files] if media_files else []))
            data, media_dir = str(data_path), str(media_path)
        target = self.state.target
        config = distill.DistillConfig(
            model=target.name, data=data, media_dir=media_dir, steps=steps, batch_size=batch_size, lr=lr,
            warmup_steps=max(1, min(20, steps // 5)), compressor={"mode": compressor} if compressor != "off" else None,
            out_dir=str(out), checkpoint_every=checkpoint_every, eval_every=eval_every, eval_samples=eval_samples,
            eval_max_new_tokens=32, device="cpu" if target.device.type == "cpu" else "auto", resume=bool(resume))
        config.validate()
        return config, note

    def train_status(self, choice: str | None = None, session: Session | None = None, request: gr.Request = None):
        """The Train tab's status, curves, draft list and timer (what changed since this
        session last looked)."""
        session = session if isinstance(session, Session) else Session()
        return self._train_outputs(session, choice, _owner(request))

    def train_refresh(self, choice: str | None = None, session: Session | None = None, request: gr.Request = None):
        """Everything on the Train tab, sent in full (when the tab is opened)."""
        session = session if isinstance(session, Session) else Session()
        return self._train_outputs(session, choice, _owner(request), force=True)

    def train_control(self, action: str, choice: str | None, session: Session | None, request: gr.Request):
        session = session if isinstance(session, Session) else Session()
        owner = _owner(request)
        try:
            job = self.state.training.check_owner(owner)
            state = job.status()["state"]
            if action == "pause":
                job.pause()
                message = "pause requested: the job stops after the current step"
            elif action == "resume":
                job.resume()
                message = "resumed" if state == "paused" else "resume requested (the job was not paused)"
            else:
                job.cancel()
                message = "cancel requested: the job saves its draft after the current step and stops"
        except SpecVLMError as exc:
            gr.Warning(str(exc))
            return self._train_outputs(session, choice, owner, message=str(exc), error=True)
        return self._train_outputs(session, choice, owner, force=True, message=message)

    def train_pause(self, choice: str | None = None, session: Session | None = None, request: gr.Request = None):
        return self.train_control("pause", choice, session, request)

    def train_resume(self, choice: str | None = None, session: Session | None = None, request: gr.Request = None):
        return self.train_control("resume", choice, session, request)

    def train_cancel(self, choice: str | None = None, session: Session | None = None, request: gr.Request = None):
        return self.train_control("cancel", choice, session, request)

    def _train_outputs(self, session: Session, choice: str | None, owner: str | None, force: bool = False,
                       message: str | None = None, error: bool = False) -> list:
        training = self.state.training
        job = training.job
        status = job.status() if job else None
        metrics = list(job.metrics) if job else []
        if job and job.error:
            error, message = True, job.error
        drafts = list_drafts(self.state.runs_folder())
        choices = [(f"startup draft ({_short_source(self.state.startup_source)})", STARTUP_DRAFT)] + \
            [(d["label"], d["path"]) for d in drafts]
        values = [v for _, v in choices]
        seen = (id(job), status and status["state"], len(metrics))
        metrics_changed = force or seen != session.train_seen
        drafts_changed = force or values != session.draft_choices
        new_drafts = [v for v in values if v not in session.draft_choices]
        session.train_seen, session.draft_choices = seen, values
        html = render.train_status_html(status, metrics, owner_is_me=owner is not None and owner == training.owner,
                                        owned=training.owner is not None, note=training.note,
                                        out_dir=job.config.out_dir if job else None, message=message, error=error)
        plot = plots.training_figure(metrics) if metrics_changed else gr.skip()
        table_out = dropdown = gr.skip()
        if drafts_changed:
            runs = self.state.runs_folder()
            table_out = [[d["run"], d["kind"], d["step"] if d["step"] is not None else "",
                          str(Path("runs") / Path(d["path"]).relative_to(runs))] for d in drafts]
            newest = drafts[0]["path"] if drafts else STARTUP_DRAFT
            # A draft that just appeared (a new checkpoint, a finished run) is the likely next choice.
            fresh = bool(new_drafts) and not force and newest in new_drafts
            value = newest if fresh or choice not in values else choice
            dropdown = gr.Dropdown(choices=choices, value=value)
        return [html, plot, table_out, dropdown, gr.Timer(active=training.running), session]

    def use_draft(self, choice: str | None):
        """Load the chosen draft (a final draft or checkpoint under runs/, or the startup
        draft) and make it the one Compare uses, once no run holds the model. Yields
        (message, model status)."""
        try:
            if not self.state.ready:
                raise SpecVLMError("the model is not loaded yet")
            if choice is not None and not isinstance(choice, str):
                raise InputError("choose a draft from the list")
            if not choice or choice == STARTUP_DRAFT:
                draft, source = self.state.startup_draft, self.state.startup_source
            else:
                path = Path(choice)
                if not inside(self.state.runs_folder(), path):
                    raise InputError("choose a draft from the list (a folder under runs/)")
                draft = EagleDraft.from_pretrained(path, target=self.state.target)
                source = str(path)
        except SpecVLMError as exc:
            gr.Warning(str(exc))
            yield render.error_html(str(exc)), gr.skip()
            return
        lock = self.state.lock
        if not lock.acquire(blocking=False):
            yield "⏳ Waiting for the current run to finish …", gr.skip()
            while not lock.acquire(timeout=0.25):
                yield gr.skip(), gr.skip()
        try:
            self.state.swap_draft(draft, source)
        finally:
            lock.release()
        mode = draft.compressor.mode if draft.compressor is not None else None
        comp = f"trained compressor `{mode}`" if mode else "no trained compressor"
        yield (f"✓ Compare now uses **{_short_source(source)}** ({comp}); no restart needed.",
               self.state.status_markdown())

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
        if self.state.training.running:
            status += (' <span class="svlm-dim">· a draft is training in the background: it pauses while this '
                       "run holds the model, but the timings may be noisier</span>")
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
        overlay = compressor_overlay(record)
        record.image = record.video = None  # drawn: the session need not keep the input
        return _outputs(summary=summary, status=status, **panels,
                        speedup=render.summary_html(speedup, tau, identical, record.temperature, final=True),
                        session=session, round_slider=slider, tree_plot=first_tree,
                        accepted_plot=plots.accepted_length_figure(record.spec_events),
                        speedup_plot=plots.speedup_figure(record.ar_events, record.spec_events),
                        compressor_info=compressor_markdown(record), gate_plot=gate_plot(record), overlay=overlay)


def _owner(request) -> str | None:
    """The browser session behind a request (None outside gradio, e.g. in tests)."""
    return getattr(request, "session_hash", None) if request is not None else None


def _short_source(source: str | None) -> str:
    """A draft's source for display: runs/<run>[/checkpoints/step-N], else the last part."""
    if not source:
        return "none"
    p = Path(source)
    if p.parent.name == "checkpoints":
        return f"{p.parent.parent.name}/{p.name}"
    return p.name if p.is_absolute() else source


def auto_tree_markdown(result: dict) -> str:
    t = result["tree"]
    rows = "\n".join(f"| {r['top_k']} | {r['depth']} | {r['total_tokens']} | {r['expected_tau']:.2f} | "
                      f"{r['round_ms']:.1f} | {r['tokens_per_s']:.0f} |" for r in result.get("grid", [])[:5])
    return (f"**Auto tree:** top_k **{t['top_k']}**, depth **{t['depth']}**, **{t['total_tokens']}** nodes.\n\n"
            f"Why: {result['why']}\n\n| top_k | depth | nodes | expected τ | ms/round | tok/s |\n"
            f"|---|---|---|---|---|---|\n{rows}")


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


COMPRESSOR_INTRO = ("**Visual-token compressor.** The draft can see far fewer visual tokens than the target: "
                    "the compressor shrinks the draft's copy of the image or clip (pruning, pooling, a learned "
                    "resampler, or none at all), which makes the draft's prefill and every later step cheaper. "
                    "The target always sees every token, so the answer is unchanged. Pick a mode in Compare's "
                    "'Visual-token compressor' menu; round 1 of each SpecVLM run reports what it did.")
NOTES = {"trained": "the draft's **trained** compressor",
         "untrained": ("an **untrained** compressor built for this mode (fixed random weights: the draft's guesses "
                       "get worse, but the target still decides every token, so the output stays **lossless**)"),
         "off": "**off**: the draft saw every visual token",
         "as trained": "the draft as trained"}


def _round1_info(record: RunRecord | None) -> dict:
    rounds = record.rounds if record else []
    return (rounds[0].info or {}) if rounds else {}


def compressor_markdown(record: RunRecord | None) -> str:
    """What the compressor did in the last run (round 1's info), or the introduction."""
    if record is None or not record.rounds:
        return COMPRESSOR_INTRO + "\n\nRun a comparison on the Compare tab to see what the compressor kept."
    info = _round1_info(record)
    note = record.draft_info.get("compressor_note", "")
    head = f"{COMPRESSOR_INTRO}\n\n**Last run:** mode `{record.compressor}` — {NOTES.get(note, note)}."
    prefill = f"{info['draft_prefill_ms']:.1f} ms" if "draft_prefill_ms" in info else "—"
    if "primitive" not in info:
        return head + f"\n\n| draft prefill |\n|---|\n| {prefill} |"
    before, after = info.get("visual_tokens_before"), info.get("visual_tokens_after")
    ratio = info.get("ratio")
    ratio_s = f"{ratio:g}" if isinstance(ratio, (int, float)) else str(ratio)
    grid = info.get("grid")
    grid_s = " × ".join(str(v) for v in grid) if grid else "—"
    rows = [("primitive", f"`{info['primitive']}`"), ("ratio", ratio_s),
            ("visual tokens before → after", f"{before} → {after}" if before is not None else "—"),
            ("token grid (time × rows × cols)", grid_s), ("draft prefill", prefill)]
    if "kept_cells" in info:
        rows.append(("kept cells", f"{len(info['kept_cells'])} (shaded green in the overlay)"))
    table = "\n".join(f"| {k} | {v} |" for k, v in rows)
    return head + "\n\n| round 1 | |\n|---|---|\n" + table


def gate_plot(record: RunRecord | None):
    info = _round1_info(record)
    chosen = None
    if isinstance(info.get("ratio"), (int, float)) and "primitive" in info:
        chosen = f"{info['primitive']}:{info['ratio']:g}"
    return plots.gate_figure(info.get("gate"), chosen)


def compressor_overlay(record: RunRecord | None):
    """The kept cells over the input (pruning only), or None."""
    info = _round1_info(record)
    if record is None or "kept_cells" not in info:
        return None
    return kept_cells_overlay(record.image, record.video, info.get("grid"), info["kept_cells"])
