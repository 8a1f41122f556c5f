"""SpecVLM Studio, the Gradio app over `specvlm_core`.

    state = AppState(LoadOptions(model=...)); state.start_loading()
    demo = build_demo(state); launch(demo)

Modules: `state` (the shared model, per-session record), `runner` (a comparison on a
worker thread), `tasks` (benchmark, auto tree, per-run compressor views, a generic
worker), `training` (the app-wide distillation job, uploads, runs/), `handlers` (event
functions), `render` (HTML), `plots` (plotly figures), `overlay` (the compressor's kept
cells drawn on the input), `ui` (layout and launch).
"""
from .state import AppState, LoadOptions, Session
from .ui import build_demo, launch

__all__ = ["AppState", "LoadOptions", "Session", "build_demo", "launch"]
