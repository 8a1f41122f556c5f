"""The page: `build_demo(state)` lays out the tabs and wires events to `Handlers`;
`launch(demo, ...)` starts the server with the app's CSS and theme."""
from __future__ import annotations

import json
from pathlib import Path

import gradio as gr

from specvlm_core.media import DEFAULT_LIMITS
from specvlm_core.models import ROOT

from . import render
from .handlers import (AUTO_OUTPUTS, BENCH_OUTPUTS, COMPARE_OUTPUTS, DATA_SOURCES, TRAIN_OUTPUTS, Handlers,
                       compressor_markdown)
from .plots import benchmark_figure, empty_figure, gate_figure, training_figure
from .state import AppState, Session
from .tasks import COMPRESSOR_MODES, TRAIN_COMPRESSORS

EXAMPLES_DIR = ROOT / "assets" / "examples"

INTRO = """# SpecVLM Studio
Lossless speculative decoding for vision-language models: a small draft proposes a tree
of tokens, the target verifies the whole tree in one forward pass and keeps the longest
prefix it agrees with. The answer is the target's own; only the wall time changes."""

TREES_HELP = """Each verification round the draft grows a tree of candidate tokens (EAGLE-2: keep
the most likely paths). The target checks every node in **one** forward pass; the
**green** path is what it accepted, the **orange star** is the bonus token it picked
itself after that path. Pick a round of the last SpecVLM run with the slider."""

TRAIN_HELP = """### Train a draft for the loaded model
Online-logit distillation (`specvlm_core.distill`): the loaded target runs on every
batch and the draft learns its next-token distribution and features. One job runs at a
time for the whole app, on the same model as Compare (the job waits while a comparison
runs). Checkpoints land in `runs/<folder>/checkpoints`; pick one below and press
**Use this draft** to compare with it at once."""

BENCH_HELP = """### Benchmark
Plain decoding, HF prompt lookup, EagleVLM (the draft without its compressor) and
SpecVLM on a fixed suite, interleaved, first pass discarded; speed as ratios to plain
decoding measured in the same run. The benchmark holds the model while it runs, so
other comparisons wait."""


def load_examples(examples_dir: Path = EXAMPLES_DIR) -> tuple[list[list[str]], list[str]]:
    """([[file path, question], ...], labels) from examples.json; empty if missing."""
    listing = Path(examples_dir) / "examples.json"
    if not listing.is_file():
        return [], []
    entries = json.loads(listing.read_text(encoding="utf-8"))
    rows, labels = [], []
    for e in entries:
        path = Path(examples_dir) / e["file"]
        if path.is_file():
            rows.append([str(path), e["question"]])
            labels.append(f"{e['file']} — {e['question']}")
    return rows, labels


def build_demo(state: AppState, queue_size: int = 32) -> gr.Blocks:
    """The Blocks app over one shared AppState (model may still be loading). queue_size:
    events waiting in the queue at most (more are refused), which bounds memory."""
    h = Handlers(state)
    with gr.Blocks(title="SpecVLM Studio", analytics_enabled=False) as demo:
        gr.Markdown(INTRO)
        model_status = gr.Markdown(state.status_markdown(), elem_id="model-status")
        timer = gr.Timer(1.0, active=not state.done.is_set())
        session = gr.State(Session(), delete_callback=lambda s: s.cleanup(state.training)
                           if isinstance(s, Session) else None)

        with gr.Tabs():
            with gr.Tab("Compare", id="compare"):
                with gr.Row():
                    with gr.Column(scale=2, min_width=320):
                        media = gr.File(label="Image or video (png, jpg, webp, animated gif, mp4, webm, …)",
                                        type="filepath", file_count="single", elem_id="media-input", height=120)
                        preview = gr.Image(label="What the model sees", type="pil", interactive=False, height=200,
                                           elem_id="media-preview")
                        media_info = gr.HTML(elem_id="media-info")
                        question = gr.Textbox(label="Question", lines=2, elem_id="question",
                                              placeholder="Ask something about the image or video")
                        with gr.Accordion("Settings", open=False):
                            temperature = gr.Slider(0.0, 2.0, value=0.0, step=0.05, label="Temperature (0 = greedy)")
                            top_p = gr.Slider(0.05, 1.0, value=1.0, step=0.05, label="Top-p")
                            max_new = gr.Slider(1, 512, value=96, step=1, label="Max new tokens",
                                                elem_id="max-new-tokens")
                            seed = gr.Number(0, precision=0, label="Seed (used when temperature > 0)")
                            frames = gr.Slider(1, DEFAULT_LIMITS.max_frames, value=DEFAULT_LIMITS.default_frames,
                                               step=1, label="Frames sampled from a video")
                            tree_auto = gr.Checkbox(False, label="Auto tree shape (measured once for this device "
                                                                  "and draft, on first use)", elem_id="tree-auto")
                            tree_top_k = gr.Slider(1, 16, value=4, step=1, label="Tree top-k (children per node)")
                            tree_depth = gr.Slider(1, 16, value=6, step=1, label="Tree depth")
                            tree_total = gr.Slider(1, 128, value=16, step=1, label="Tree size (draft tokens per round)")
                            auto_btn = gr.Button("Measure the auto tree now", size="sm", elem_id="auto-tree-btn")
                            auto_info = gr.Markdown(elem_id="auto-tree-info")
                            compressor = gr.Dropdown(
                                COMPRESSOR_MODES, value="off", label="Visual-token compressor (the draft's side only)",
                                elem_id="compressor-mode",
                                info="off: the draft sees every visual token. The mode the draft was trained with "
                                     "uses its trained compressor; any other mode an untrained one — still "
                                     "lossless, the target decides every token. See the Compressor tab.")
                        with gr.Row():
                            run = gr.Button("Run", variant="primary", elem_id="run-btn")
                            stop = gr.Button("Stop", variant="stop", elem_id="stop-btn")
                        rows, labels = load_examples()
                        if rows:
                            gr.Examples(rows, inputs=[media, question], example_labels=labels, label="Examples",
                                        cache_examples=False, examples_per_page=8, api_name="load_example")
                    with gr.Column(scale=3, min_width=420):
                        status = gr.HTML(elem_id="status")
                        speedup = gr.HTML(render.summary_html(None, None, None, 0.0, final=False), elem_id="speedup")
                        with gr.Row(equal_height=False):
                            with gr.Column(min_width=200):
                                ar_metrics = gr.HTML(render.metrics_html("Plain decoding", None, "idle"),
                                                     elem_id="ar-metrics")
                                ar_text = gr.HTML(render.plain_text_html(""), elem_id="ar-output")
                            with gr.Column(min_width=200):
                                spec_metrics = gr.HTML(render.metrics_html("SpecVLM", None, "idle"),
                                                       elem_id="spec-metrics")
                                spec_text = gr.HTML(render.spec_text_html([]), elem_id="spec-output")
                        gr.HTML(render.legend_html())
                        with gr.Accordion("Result as JSON", open=False):
                            summary = gr.JSON(label="Summary", elem_id="summary")

            with gr.Tab("Draft trees", id="trees"):
                gr.Markdown(TREES_HELP)
                round_slider = gr.Slider(1, 2, value=1, step=1, label="Round", interactive=False,
                                         elem_id="round-slider")
                round_info = gr.Markdown(elem_id="round-info")
                tree_plot = gr.Plot(empty_figure("No draft tree yet: run a comparison first."), elem_id="tree-plot",
                                    show_label=False)
                with gr.Row():
                    accepted_plot = gr.Plot(elem_id="accepted-plot", show_label=False)
                    speedup_plot = gr.Plot(elem_id="speedup-plot", show_label=False)

            with gr.Tab("Compressor", id="compressor"):
                compressor_info = gr.Markdown(compressor_markdown(None), elem_id="compressor-info")
                with gr.Row(equal_height=False):
                    gate_plot = gr.Plot(gate_figure(None), elem_id="gate-plot", show_label=False)
                    overlay = gr.Image(label="Kept visual tokens (pruning modes: green kept, dark dropped)",
                                       type="pil", interactive=False, elem_id="compressor-overlay", height=340)

            with gr.Tab("Train", id="train") as train_tab:
                gr.Markdown(TRAIN_HELP)
                with gr.Row():
                    with gr.Column(scale=2, min_width=320):
                        data_source = gr.Radio(list(DATA_SOURCES), value=DATA_SOURCES[0], label="Data",
                                               elem_id="train-source")
                        data_json = gr.File(label="LLaVA-format JSON (list of records: conversations + image/video)",
                                            file_types=[".json"], type="filepath", visible=False,
                                            elem_id="train-json", height=100)
                        data_media = gr.File(label="Media files the records name", file_count="multiple",
                                             type="filepath", visible=False, elem_id="train-media", height=100)
                        with gr.Row():
                            steps = gr.Number(60, precision=0, minimum=1, maximum=100_000, label="Steps",
                                              elem_id="train-steps")
                            lr = gr.Number(1e-3, minimum=1e-7, maximum=1.0, step=1e-4, label="Learning rate")
                            batch_size = gr.Number(4, precision=0, minimum=1, maximum=64, label="Batch size")
                        with gr.Row():
                            train_compressor = gr.Dropdown(TRAIN_COMPRESSORS, value="off", label="Compressor")
                            out_name = gr.Textbox("draft-ui", label="Output folder (under runs/)",
                                                  elem_id="train-out")
                        with gr.Accordion("Evaluation and checkpoints", open=False):
                            with gr.Row():
                                eval_every = gr.Number(20, precision=0, minimum=1, label="τ every N steps")
                                eval_samples = gr.Number(2, precision=0, minimum=0, maximum=64,
                                                         label="τ prompts (0: no τ)")
                                checkpoint_every = gr.Number(20, precision=0, minimum=1, label="Checkpoint every")
                            resume = gr.Checkbox(False, label="Resume from the folder's last checkpoint")
                        with gr.Row():
                            train_start = gr.Button("Start", variant="primary", elem_id="train-start")
                            train_pause = gr.Button("Pause", elem_id="train-pause")
                            train_resume = gr.Button("Resume", elem_id="train-resume")
                            train_cancel = gr.Button("Cancel", variant="stop", elem_id="train-cancel")
                    with gr.Column(scale=3, min_width=420):
                        train_status = gr.HTML(elem_id="train-status")
                        train_plot = gr.Plot(training_figure([]), elem_id="train-plot", show_label=False)
                        train_drafts = gr.Dataframe(headers=["run", "kind", "step", "folder"], interactive=False,
                                                    label="Drafts and checkpoints under runs/",
                                                    elem_id="train-drafts", type="array", max_height=240)
                        with gr.Row():
                            draft_choice = gr.Dropdown([], label="Draft", allow_custom_value=True, scale=3,
                                                       elem_id="draft-choice")
                            use_draft = gr.Button("Use this draft", scale=1, elem_id="use-draft")
                        use_info = gr.Markdown(elem_id="use-draft-info")
                train_timer = gr.Timer(1.0, active=False)

            with gr.Tab("Benchmark", id="benchmark"):
                gr.Markdown(BENCH_HELP)
                with gr.Row():
                    suite = gr.Dropdown(["quick", "default"], value="quick", label="Suite",
                                        info="quick: 4 inputs; default: 16 (sizes, clip lengths, T = 0 and 1)")
                    bench_tokens = gr.Slider(1, 512, value=32, step=1, label="Max new tokens", elem_id="bench-tokens")
                    repeats = gr.Slider(1, 10, value=1, step=1, label="Repeats (median)")
                    bench_tree = gr.Radio(["fixed", "auto"], value="fixed", label="Tree")
                with gr.Row():
                    bench_top_k = gr.Slider(1, 16, value=4, step=1, label="Fixed tree top-k")
                    bench_depth = gr.Slider(1, 16, value=6, step=1, label="Fixed tree depth")
                    bench_total = gr.Slider(1, 128, value=16, step=1, label="Fixed tree size")
                with gr.Row():
                    bench_run = gr.Button("Run benchmark", variant="primary", elem_id="bench-run")
                    bench_stop = gr.Button("Stop", variant="stop", elem_id="bench-stop")
                bench_status = gr.HTML(elem_id="bench-status")
                bench_table = gr.Markdown(elem_id="bench-table")
                bench_plot = gr.Plot(benchmark_figure(None), elem_id="bench-plot", show_label=False)
                with gr.Row():
                    bench_json = gr.File(label="Report (JSON)", interactive=False, elem_id="bench-json")
                    bench_csv = gr.File(label="Per-case rows (CSV)", interactive=False, elem_id="bench-csv")

        # ---- events (every one has an api_name) ----
        demo.load(h.model_status, None, [model_status, timer], api_name="model_status", queue=False)
        timer.tick(h.model_status, None, [model_status, timer], api_name="model_status_tick", queue=False,
                   show_progress="hidden")
        media.change(h.preview, [media, frames], [preview, media_info], api_name="preview")
        frames.release(h.preview, [media, frames], [preview, media_info], api_name="preview_frames")
        outputs = {"summary": summary, "status": status, "ar_metrics": ar_metrics, "ar_text": ar_text,
                   "spec_metrics": spec_metrics, "spec_text": spec_text, "speedup": speedup, "session": session,
                   "round_slider": round_slider, "tree_plot": tree_plot, "accepted_plot": accepted_plot,
                   "speedup_plot": speedup_plot, "compressor_info": compressor_info, "gate_plot": gate_plot,
                   "overlay": overlay, "tree_auto": tree_auto, "tree_top_k": tree_top_k, "tree_depth": tree_depth,
                   "tree_total": tree_total, "auto_info": auto_info, "train_status": train_status,
                   "train_plot": train_plot, "train_drafts": train_drafts, "draft_choice": draft_choice,
                   "train_timer": train_timer, "bench_status": bench_status, "bench_table": bench_table,
                   "bench_plot": bench_plot, "bench_json": bench_json, "bench_csv": bench_csv}
        run_event = run.click(state.gpu(h.compare),
                              [media, question, temperature, top_p, max_new, seed, frames, tree_auto, tree_top_k,
                               tree_depth, tree_total, compressor, session],
                              [outputs[name] for name in COMPARE_OUTPUTS], api_name="compare",
                              show_progress="minimal", show_progress_on=[status],
                              # A Run pressed right after Stop, while the cancelled run is still
                              # winding down, starts once it has; "once" would drop the click.
                              trigger_mode="always_last")
        stop.click(h.stopped, None, [status], cancels=[run_event], api_name="stop", queue=False)
        round_slider.change(h.show_round, [round_slider, session], [tree_plot, round_info], api_name="tree_round",
                            show_progress="hidden")
        tree_auto.change(h.toggle_tree_auto, [tree_auto], [tree_top_k, tree_depth, tree_total],
                         api_name="tree_auto", queue=False)
        auto_btn.click(state.gpu(h.auto_tree), [tree_auto], [outputs[n] for n in AUTO_OUTPUTS], api_name="auto_tree",
                       show_progress="minimal", show_progress_on=[auto_info])

        # Benchmark tab.
        bench_event = bench_run.click(state.gpu(h.benchmark), [suite, bench_tokens, repeats, bench_tree, bench_top_k,
                                                               bench_depth, bench_total],
                                      [outputs[n] for n in BENCH_OUTPUTS], api_name="benchmark",
                                      show_progress="minimal", show_progress_on=[bench_status])
        bench_stop.click(h.benchmark_stopped, None, [bench_status], cancels=[bench_event], api_name="benchmark_stop",
                         queue=False)

        # Train tab: Start and the controls answer at once; the timer keeps the view fresh.
        train_out = [outputs[n] for n in TRAIN_OUTPUTS]
        data_source.change(h.toggle_data_source, [data_source], [data_json, data_media], api_name="train_data_source",
                           queue=False)
        train_start.click(h.train_start, [data_source, data_json, data_media, steps, lr, batch_size, train_compressor,
                                          out_name, eval_every, eval_samples, checkpoint_every, resume, draft_choice,
                                          session], train_out, api_name="train_start", concurrency_limit=1)
        for button, fn, name in ((train_pause, h.train_pause, "train_pause"),
                                 (train_resume, h.train_resume, "train_resume"),
                                 (train_cancel, h.train_cancel, "train_cancel")):
            button.click(fn, [draft_choice, session], train_out, api_name=name, queue=False)
        train_timer.tick(h.train_status, [draft_choice, session], train_out, api_name="train_status", queue=False,
                         show_progress="hidden")
        train_tab.select(h.train_refresh, [draft_choice, session], train_out, api_name="train_tab", queue=False,
                         show_progress="hidden")
        use_draft.click(h.use_draft, [draft_choice], [use_info, model_status], api_name="use_draft",
                        concurrency_limit=1)
    demo.queue(default_concurrency_limit=2, max_size=queue_size)
    return demo


THEME = dict(font=[gr.themes.Font("system-ui"), gr.themes.Font("sans-serif")],
             font_mono=[gr.themes.Font("ui-monospace"), gr.themes.Font("monospace")])


def launch(demo: gr.Blocks, host: str = "127.0.0.1", port: int | None = None, share: bool = False,
           prevent_thread_lock: bool = False, quiet: bool = False):
    """demo.launch with the app's theme, CSS and the examples folder allowed."""
    return demo.launch(server_name=host, server_port=port, share=share, prevent_thread_lock=prevent_thread_lock,
                       quiet=quiet, show_error=True, ssr_mode=False, allowed_paths=[str(EXAMPLES_DIR)],
                       css=render.CSS, theme=gr.themes.Soft(**THEME), footer_links=["api", "gradio"])
