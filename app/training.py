"""Draft training from the page: one `DistillJob` at a time app-wide, on the shared
target, and the files it needs (uploads staged in a per-session folder, output under
`runs/`).

The job shares the target with comparisons. `locked_target` hands it a view whose
model forwards each take `AppState.lock`: a comparison (which holds the lock for its
whole run) never has a training forward beside it, the forward hooks that record
features never mix the two, and a running job pauses at its next target forward
while someone compares.
"""
from __future__ import annotations

import dataclasses
import json
import re
import shutil
import tempfile
import threading
from pathlib import Path, PurePosixPath

from specvlm_core import distill
from specvlm_core.errors import InputError, ParameterError, SpecVLMError

NAME_OK = re.compile(r"[^A-Za-z0-9._-]+")
MEDIA_KEYS = ("image", "video")
STARTUP_DRAFT = "startup"  # "Use this draft" value for the draft the app started with


def safe_filename(name: str, fallback: str = "file", max_len: int = 100) -> str:
    """A plain file name from an uploaded one: last path part only, letters, digits,
    '.', '_' and '-', no leading dots (so never '..' or a hidden file)."""
    base = PurePosixPath(str(name).replace("\\", "/")).name
    base = NAME_OK.sub("_", base).lstrip(".")[:max_len]
    return base or fallback


def run_folder(runs_dir: Path, name: str) -> Path:
    """runs_dir/<sanitised name>; refuses names that sanitise to nothing."""
    clean = safe_filename(str(name or "").strip(), fallback="", max_len=64)
    if not clean:
        raise ParameterError("give the output folder a name (letters, digits, '.', '_' or '-')")
    folder = (Path(runs_dir) / clean).resolve()
    if folder.parent != Path(runs_dir).resolve():  # cannot happen after sanitising; cheap to be sure
        raise ParameterError(f"output folder {name!r} is not allowed")
    return folder


def inside(folder: Path, path: str | Path) -> bool:
    try:
        Path(path).resolve().relative_to(Path(folder).resolve())
        return True
    except ValueError:
        return False


def stage_uploads(folder: Path, data_json: str | None, media_files: list[str] | None) -> tuple[Path, Path, str]:
    """Copy an uploaded LLaVA-format JSON and its media into `folder` (emptied first):
    media under sanitised names in folder/media, and the records rewritten to point at
    those names where an upload matches a record's file name (others are left as they
    are; the loader refuses any that escape the media folder). Returns (JSON path, media
    folder, one-line description). Raises InputError."""
    if not data_json:
        raise InputError("upload a LLaVA-format JSON file (a list of records with 'conversations' and "
                         "'image' or 'video'), or choose the generated world")
    try:
        records = json.loads(Path(data_json).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise InputError(f"cannot read the uploaded JSON: {str(exc).splitlines()[0]}") from exc
    if not isinstance(records, list) or not records:
        raise InputError("the uploaded JSON must be a non-empty list of LLaVA-format records")
    if folder.exists():
        shutil.rmtree(folder)
    media_dir = folder / "media"
    media_dir.mkdir(parents=True)
    uploaded = set()
    for src in media_files or []:
        name = safe_filename(Path(src).name)
        shutil.copyfile(src, media_dir / name)
        uploaded.add(name)
    matched = 0
    for record in records:
        if not isinstance(record, dict):
            continue
        for key in MEDIA_KEYS:
            if isinstance(record.get(key), str):
                name = safe_filename(record[key])
                if name in uploaded:
                    record[key] = name
                    matched += 1
    json_path = folder / "data.json"
    json_path.write_text(json.dumps(records), encoding="utf-8")
    wanted = sum(1 for r in records if isinstance(r, dict) and any(k in r for k in MEDIA_KEYS))
    return json_path, media_dir, (f"{len(records)} records, {len(uploaded)} media files uploaded, "
                                  f"{matched} of {wanted} media references found")


class LockedModel:
    """The target model for a background job: calls (forwards) take `lock`; every other
    attribute is the model's own."""

    def __init__(self, model, lock):
        self._model = model
        self._lock = lock

    def __call__(self, *args, **kwargs):
        with self._lock:
            return self._model(*args, **kwargs)

    def __getattr__(self, name):
        return getattr(self._model, name)


def locked_target(target, lock):
    """The same Target, its forwards serialised with the app's generation lock."""
    return dataclasses.replace(target, model=LockedModel(target.model, lock))


def list_drafts(runs_dir: Path, limit: int = 60) -> list[dict]:
    """Loadable drafts under runs_dir, newest run first: each run's final draft, then its
    checkpoints newest first. {"label", "path", "kind", "step", "run"}."""
    runs_dir = Path(runs_dir)
    if not runs_dir.is_dir():
        return []
    out = []
    def recency(run: Path) -> float:  # checkpoints are written inside checkpoints/, the final draft in run/
        ckpts = run / "checkpoints"
        return max(run.stat().st_mtime, ckpts.stat().st_mtime if ckpts.is_dir() else 0.0)

    runs = sorted((p for p in runs_dir.iterdir() if p.is_dir()), key=recency, reverse=True)
    for run in runs:
        if (run / "draft.safetensors").is_file() and (run / "draft_config.json").is_file():
            out.append({"label": f"{run.name} · final", "path": str(run), "kind": "final", "step": None,
                        "run": run.name})
        for ckpt in reversed(distill.list_checkpoints(run)):
            step = int(ckpt.name.split("-")[-1]) if ckpt.name.split("-")[-1].isdigit() else None
            out.append({"label": f"{run.name} · step {step}", "path": str(ckpt), "kind": "checkpoint", "step": step,
                        "run": run.name})
        if len(out) >= limit:
            break
    return out[:limit]


class TrainingManager:
    """At most one DistillJob at a time for the whole app, and who started it."""

    def __init__(self, state):
        self.state = state
        self.job: distill.DistillJob | None = None
        self.owner: str | None = None
        self.note: str = ""  # what the data was (one line)
        self._lock = threading.Lock()

    @property
    def running(self) -> bool:
        return self.job is not None and self.job.running

    def busy_message(self, owner: str | None) -> str | None:
        """Why another job cannot start now, or None."""
        job = self.job
        if job is None or not job.running:
            return None
        who = "this session" if owner is not None and owner == self.owner else "another session"
        return (f"a training job is already {job.status()['state']} (started by {who}, writing to "
                f"runs/{Path(job.config.out_dir).name}); only one job runs at a time: cancel it or wait "
                "for it to finish")

    def start(self, config: distill.DistillConfig, owner: str | None, note: str = "") -> distill.DistillJob:
        with self._lock:
            busy = self.busy_message(owner)
            if busy:
                raise SpecVLMError(busy)
            job = distill.DistillJob(config, target=locked_target(self.state.target, self.state.lock))
            job.start()
            self.job, self.owner, self.note = job, owner, note
            return job

    def check_owner(self, owner: str | None) -> distill.DistillJob:
        """The running job, if `owner` may control it; else a SpecVLMError."""
        job = self.job
        if job is None or not job.running:
            raise SpecVLMError("no training job is running")
        if self.owner is not None and owner != self.owner:
            raise SpecVLMError("this training job was started in another browser session; only that session "
                               "can pause, resume or cancel it")
        return job

    def uses(self, folder: Path) -> bool:
        """Whether the running job reads data from `folder` (so it must not be deleted)."""
        job = self.job
        return bool(job and job.running and job.config.data != "generated" and inside(folder, job.config.data))


def new_upload_folder() -> Path:
    return Path(tempfile.mkdtemp(prefix="specvlm-upload-"))
