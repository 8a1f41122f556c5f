"""The page: `build_demo(state)` lays out the tabs and wires events to `Handlers`;
`launch(demo, ...)` starts the server with the app's CSS and theme."""
from __future__ import annotations

import json
from pathlib import Path

import gradio as gr

from specvlm_core.media import DEFAULT_LIMITS
from specvlm_core.models import ROOT

from . import render
from .handlers import COMPARE_OUTPUTS, COMPRESSOR_MODES, Handlers, compressor_markdown
from .plots import empty_figure
from .state import AppState, Session

EXAMPLES_DIR = ROOT / "assets" / "examples"

INTRO = """# SpecVLM Studio
Lossless speculative decoding for vision-language models: a small draft proposes a tree
of tokens, the target verifies the whole tree in one forward pass and keeps the longest
prefix it agrees with. The answer is the target's own; only the wall time changes."""

TREES_HELP = """Each verification round the draft grows a tree of candidate tokens (EAGLE-2: keep
the most likely paths). The target checks every node in **one** forward pass; the
**green** path is what it accepted, the **orange star** is the bonus token it picked
itself after that path. Pick a round of the last SpecVLM run with the slider."""

TRAIN_PLACEHOLDER = """### Train a draft
Distillation from the UI arrives with `specvlm_core.distill`: pick a target, a data
source and a time budget here, watch the loss and acceptance curves, then use the new
draft on the Compare tab."""


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


def build_demo(state: AppState) -> gr.Blocks:
    """The Blocks app over one shared AppState (model may still be loading)."""
    h = Handlers(state)
    with gr.Blocks(title="SpecVLM Studio", analytics_enabled=False) as demo:
        gr.Markdown(INTRO)
        model_status = gr.Markdown(state.status_markdown(), elem_id="model-status")
        timer = gr.Timer(1.0, active=not state.done.is_set())
        session = gr.State(Session())

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
                            tree_auto = gr.Checkbox(False, label="Auto tree shape (currently: the defaults 4 / 6 / 16)")
                            tree_top_k = gr.Slider(1, 16, value=4, step=1, label="Tree top-k (children per node)")
                            tree_depth = gr.Slider(1, 16, value=6, step=1, label="Tree depth")
                            tree_total = gr.Slider(1, 128, value=16, step=1, label="Tree size (draft tokens per round)")
                            compressor = gr.Dropdown(COMPRESSOR_MODES, value="off", label="Visual-token compressor")
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

            with gr.Tab("Train", id="train"):
                gr.Markdown(TRAIN_PLACEHOLDER, elem_id="train-placeholder")

        # ---- events (every one has an api_name) ----
        demo.load(h.model_status, None, [model_status, timer], api_name="model_status", queue=False)
        timer.tick(h.model_status, None, [model_status, timer], api_name="model_status_tick", queue=False,
                   show_progress="hidden")
        media.change(h.preview, [media, frames], [preview, media_info], api_name="preview")
        frames.release(h.preview, [media, frames], [preview, media_info], api_name="preview_frames")
        outputs = {"summary": summary, "status": status, "ar_metrics": ar_metrics, "ar_text": ar_text,
                   "spec_metrics": spec_metrics, "spec_text": spec_text, "speedup": speedup, "session": session,
                   "round_slider": round_slider, "tree_plot": tree_plot, "accepted_plot": accepted_plot,
                   "speedup_plot": speedup_plot, "compressor_info": compressor_info}
        run_event = run.click(state.gpu(h.compare),
                              [media, question, temperature, top_p, max_new, seed, frames, tree_auto, tree_top_k,
                               tree_depth, tree_total, compressor, session],
                              [outputs[name] for name in COMPARE_OUTPUTS], api_name="compare",
                              show_progress="minimal", show_progress_on=[status])
        stop.click(h.stopped, None, [status], cancels=[run_event], api_name="stop", queue=False)
        round_slider.change(h.show_round, [round_slider, session], [tree_plot, round_info], api_name="tree_round",
                            show_progress="hidden")
        tree_auto.change(h.toggle_tree_auto, [tree_auto], [tree_top_k, tree_depth, tree_total],
                         api_name="tree_auto", queue=False)
    demo.queue(default_concurrency_limit=2, max_size=32)
    return demo


THEME = dict(font=[gr.themes.Font("system-ui"), gr.themes.Font("sans-serif")],
             font_mono=[gr.themes.Font("ui-monospace"), gr.themes.Font("monospace")])


def launch(demo: gr.Blocks, host: str = "127.0.0.1", port: int | None = None, share: bool = False,
           prevent_thread_lock: bool = False, quiet: bool = False):
    """demo.launch with the app's theme, CSS and the examples folder allowed."""
    return demo.launch(server_name=host, server_port=port, share=share, prevent_thread_lock=prevent_thread_lock,
                       quiet=quiet, show_error=True, ssr_mode=False, allowed_paths=[str(EXAMPLES_DIR)],
                       css=render.CSS, theme=gr.themes.Soft(**THEME), footer_links=["api", "gradio"])
