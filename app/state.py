"""What the app holds: one shared model (`AppState`) and a small per-session record
(`Session`, kept in a `gr.State`).

The model loads once, in a background thread when the app starts, so the page can show
its progress; every generation then runs under `AppState.lock`, one at a time, so the
plain-vs-SpecVLM wall-clock comparison is never skewed by another user's run. The
benchmark and the auto-tree measurement hold the lock for their whole run too; a
training job takes it around each forward of the target (see `training`); "Use this
draft" swaps the draft under it.
"""
from __future__ import annotations

import logging
import shutil
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from specvlm_core import api, engine
from specvlm_core.errors import SpecVLMError
from specvlm_core.models import DEFAULT_MODEL, check_load_options, load_target, prepare_inputs

from .tasks import AutoTreeCache, CompressorCache
from .training import TrainingManager

log = logging.getLogger("specvlm_app")


@dataclass
class LoadOptions:
    """How to load the target and its draft (the command-line flags of app.py)."""
    model: str | None = None  # Hub name or folder; None = the embedded tiny model
    draft: str | None = None  # draft folder; None = the shipped draft, else a random one
    device: str = "auto"
    load_in_4bit: bool = False
    load_in_8bit: bool = False
    warmup: bool = True


def _identity(fn):
    return fn


class AppState:
    """The shared model and its loading status; one instance per running app.

    gpu: a decorator applied to the handler that does GPU work (`spaces.GPU` on
    Hugging Face Spaces, the identity elsewhere).
    """

    def __init__(self, options: LoadOptions | None = None, gpu=None):
        self.options = options or LoadOptions()
        self.gpu = gpu or _identity
        self.target = None
        self.draft = None
        self.draft_source: str | None = None
        self.error: str | None = None
        self.phase = "not started"
        self.load_seconds: float | None = None
        self.done = threading.Event()  # set once loading succeeded or failed
        self.lock = threading.Lock()  # one generation at a time on the shared model
        self._thread: threading.Thread | None = None
        self.startup_draft = None  # the draft loaded at start ("Use this draft" can go back to it)
        self.startup_source: str | None = None
        self.runs_dir: Path | None = None  # where Train writes; None: ./runs at the time of use
        self.auto_tree = AutoTreeCache(self)
        self.compressors = CompressorCache()
        self.training = TrainingManager(self)

    # ------------------------------------------------------------------ loading
    @classmethod
    def from_target(cls, target, draft=None, draft_source: str | None = None, warmup: bool = False,
                    gpu=None) -> "AppState":
        """An app state around an already loaded target (tests, notebooks). Without a
        draft, `api.load_draft` picks the shipped one or a random one."""
        state = cls(LoadOptions(model=target.name, warmup=warmup), gpu=gpu)
        state.target = target
        if draft is None:
            draft, draft_source = api.load_draft(target, None)
        state.draft, state.draft_source = draft, draft_source or "given"
        state.startup_draft, state.startup_source = state.draft, state.draft_source
        if warmup:
            state._warmup()
        state.load_seconds = 0.0
        state.phase = "ready"
        state.done.set()
        return state

    def _set_phase(self, text: str) -> None:
        self.phase = text
        log.info("%s", text)

    def precheck(self) -> None:
        """Fail fast, before any server starts, on options that cannot work here: a GPU
        that is not there, 4/8-bit weights without CUDA, a model or draft folder that
        does not exist. Raises ModelLoadError (`models.check_load_options`, which
        load_target runs again)."""
        opts = self.options
        check_load_options(opts.model, opts.device, opts.load_in_4bit, opts.load_in_8bit, draft=opts.draft)

    def load(self) -> None:
        """Load target and draft (and warm them up); never raises a SpecVLMError: a
        failure is kept in `self.error` for the page and the console."""
        opts = self.options
        start = time.perf_counter()
        try:
            name = opts.model or DEFAULT_MODEL
            self._set_phase(f"loading target model {_short(name)} (device: {opts.device}) ...")
            target = load_target(opts.model, device=opts.device, load_in_4bit=opts.load_in_4bit,
                                 load_in_8bit=opts.load_in_8bit)
            self._set_phase(f"loaded {_short(target.name)} ({target.family}) on {target.device}; "
                            "loading draft ...")
            draft, source = api.load_draft(target, opts.draft)
            self.target, self.draft, self.draft_source = target, draft, source
            self.startup_draft, self.startup_source = draft, source
            if opts.warmup:
                self._set_phase("warming up ...")
                self._warmup()
            self.load_seconds = time.perf_counter() - start
            self._set_phase("ready")
            log.info("model ready in %.1f s: %s", self.load_seconds, self.describe())
        except SpecVLMError as exc:
            self.error = str(exc)
            self.phase = "failed"
            log.error("model loading failed: %s", exc)
        except Exception as exc:  # a bug or an unexpected library error: keep the app up
            self.error = f"unexpected error while loading the model: {type(exc).__name__}: {exc}"
            self.phase = "failed"
            log.exception("model loading failed")
        finally:
            self.done.set()

    def start_loading(self) -> threading.Thread:
        """Load in a background thread; returns it (join it to wait)."""
        self._thread = threading.Thread(target=self.load, name="specvlm-load", daemon=True)
        self._thread.start()
        return self._thread

    def _warmup(self) -> None:
        """One tiny plain + speculative run, so the first user comparison does not pay
        one-off costs (allocator, kernel selection) in the plain run only."""
        from PIL import Image
        try:
            with self.lock:
                inputs = prepare_inputs(self.target, "Describe this image.", image=Image.new("RGB", (64, 64), "gray"))
                sampling = engine.SamplingSettings(max_new_tokens=4)
                engine.collect(engine.autoregressive_stream(self.target, inputs, sampling))
                drafter = engine.EagleDrafter(self.draft, self.target)
                engine.collect(engine.speculative_stream(self.target, drafter, inputs, sampling,
                                                         engine.TreeSettings(), media=None))
        except Exception as exc:  # warm-up is an optimisation only
            log.warning("warm-up skipped: %s", exc)

    # ------------------------------------------------------------------- drafts
    def runs_folder(self) -> Path:
        return (self.runs_dir or Path.cwd() / "runs").resolve()

    def swap_draft(self, draft, source: str) -> None:
        """Make `draft` the one every later comparison uses. The caller holds `self.lock`
        (no run is using the old draft). The auto tree is measured again when needed."""
        self.draft, self.draft_source = draft, source
        self.auto_tree.clear()

    # ------------------------------------------------------------------- status
    @property
    def ready(self) -> bool:
        return self.done.is_set() and self.error is None and self.target is not None

    def describe(self) -> str:
        t = self.target
        if t is None:
            return ""
        draft = {"random": "random draft (outputs stay identical; speedup is low until a trained "
                           "draft is given)"}.get(self.draft_source or "", f"draft {_short(self.draft_source)}")
        return f"{_short(t.name)} ({t.family}) on {t.device}, {str(t.dtype).replace('torch.', '')} · {draft}"

    def status_markdown(self) -> str:
        if self.error:
            return f"**Model failed to load:** {self.error}"
        if self.ready:
            secs = f" · loaded in {self.load_seconds:.1f} s" if self.load_seconds else ""
            return f"**Model:** {self.describe()}{secs}"
        return f"⏳ **Loading the model:** {self.phase}"


def _short(name: str | None) -> str:
    """A folder path shortened to its last part; Hub names unchanged."""
    if not name:
        return ""
    p = Path(name)
    return p.name if p.is_absolute() or name.startswith(".") else name


# ------------------------------------------------------------------- per session

@dataclass
class RunRecord:
    """One comparison: the events of both runs as they arrived, and what produced them."""
    question: str = ""
    media_name: str = ""
    temperature: float = 0.0
    settings: dict = field(default_factory=dict)  # the SamplingSettings and TreeSettings used
    ar_events: list = field(default_factory=list)  # RoundEvent, one per token
    spec_events: list = field(default_factory=list)  # RoundEvent, one per verification round
    phase: str = "starting"  # starting, waiting, ar, spec, done, error, stopped
    error: str | None = None
    compressor: str = "off"  # the compressor mode asked for
    draft_info: dict = field(default_factory=dict)  # which draft ran, and its compressor (trained or not)
    image: object = None  # the input, until the Compressor tab's overlay is drawn
    video: list | None = None

    @property
    def rounds(self) -> list:
        """Speculative verification rounds (the prefill event excluded)."""
        return [e for e in self.spec_events if e.round > 0]


@dataclass
class Session:
    """Per-browser-session data, kept in a gr.State: the last comparison, the folder of
    this session's training uploads, and what the Train tab last showed."""
    last_run: RunRecord | None = None
    runs: int = 0
    upload_dir: str | None = None
    train_seen: tuple | None = None  # (job id, state, metrics count, drafts) last sent to the page
    draft_choices: list = field(default_factory=list)

    def cleanup(self, training=None) -> None:
        """Delete the upload folder (when the session ends), unless a running job reads it."""
        if self.upload_dir and not (training is not None and training.uses(Path(self.upload_dir))):
            shutil.rmtree(self.upload_dir, ignore_errors=True)
            self.upload_dir = None
