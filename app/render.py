"""HTML for the Compare tab: output texts, metrics, the identical badge, the legend.

Pure functions of RoundEvent lists (and a `decode` callable for token ids), so they are
easy to test and cheap to call on every streamed update.
"""
from __future__ import annotations

import html
from dataclasses import dataclass
from pathlib import Path

ROUND_HUES = (205, 130, 35, 280, 0, 170, 55, 320, 95, 245)  # one hue per round, cycling


def round_colour(round_no: int, light: bool = True) -> str:
    hue = ROUND_HUES[round_no % len(ROUND_HUES)]
    return f"hsl({hue}, 70%, {85 if light else 35}%)"


# ------------------------------------------------------------------ token pieces

@dataclass
class Piece:
    """The text one emitted token added, the round that emitted it, and how:
    "prefill" (the first token, from the prefill), "accepted" (a draft token the target
    accepted) or "bonus" (the token the target itself picked at the end of a round)."""
    text: str
    round: int
    kind: str


class TokenSegmenter:
    """Splits the streamed SpecVLM text into per-token pieces, incrementally.

    A token's text is what it adds to the decoded sequence, so multi-byte characters
    split over tokens come out right; the pieces always join to the full decoded text.
    decode: list of token ids -> text (special tokens skipped, as the engine does).
    """

    def __init__(self, decode):
        self.decode = decode
        self.tokens: list[int] = []
        self.pieces: list[Piece] = []
        self._text = ""

    def feed(self, event) -> None:
        n_accepted = max(0, len(event.accepted_nodes) - 1)
        for i, token in enumerate(event.new_tokens):
            kind = "prefill" if event.round == 0 else ("accepted" if i < n_accepted else "bonus")
            self.tokens.append(token)
            text = self.decode(self.tokens)
            if text.startswith(self._text):
                piece = text[len(self._text):]
            else:  # a character completed by this token replaced a placeholder: re-cut
                common = _common_prefix(text, self._text)
                self._trim_to(common)
                piece = text[common:]
            self.pieces.append(Piece(piece, event.round, kind))
            self._text = text

    def _trim_to(self, length: int) -> None:
        total = len(self._text)
        for piece in reversed(self.pieces):
            if total <= length:
                break
            cut = min(len(piece.text), total - length)
            piece.text = piece.text[:len(piece.text) - cut]
            total -= cut

    @property
    def text(self) -> str:
        return self._text


def _common_prefix(a: str, b: str) -> int:
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


def token_pieces(events, decode) -> list[Piece]:
    """All pieces of a finished (or partial) SpecVLM run."""
    seg = TokenSegmenter(decode)
    for event in events:
        seg.feed(event)
    return seg.pieces


# ------------------------------------------------------------------------ texts

def spec_text_html(pieces: list[Piece], running: bool = False) -> str:
    """The SpecVLM output, each token's span coloured by its round; bonus tokens carry
    a dark underline, accepted draft tokens none."""
    spans = []
    for p in pieces:
        if not p.text:
            continue
        title = f"round {p.round}: " + {"prefill": "first token (prefill)", "accepted": "accepted draft token",
                                         "bonus": "bonus token (from the target)"}[p.kind]
        spans.append(f'<span class="svlm-tok svlm-{p.kind}" style="background:{round_colour(p.round)};'
                     f'--svlm-edge:{round_colour(p.round, light=False)}" title="{title}">'
                     f"{html.escape(p.text)}</span>")
    cursor = '<span class="svlm-cursor">▍</span>' if running else ""
    body = "".join(spans) or ('<span class="svlm-empty">(no text yet)</span>' if not running else "")
    return f'<div class="svlm-text" data-testid="spec-text">{body}{cursor}</div>'


def plain_text_html(text: str, running: bool = False) -> str:
    cursor = '<span class="svlm-cursor">▍</span>' if running else ""
    body = html.escape(text) if text else ("" if running else '<span class="svlm-empty">(no text yet)</span>')
    return f'<div class="svlm-text" data-testid="ar-text">{body}{cursor}</div>'


def legend_html() -> str:
    swatches = "".join(f'<span class="svlm-tok svlm-accepted" style="background:{round_colour(r)}">'
                       f"&nbsp;{r}&nbsp;</span>" for r in range(1, 6))
    return ('<div class="svlm-legend">'
            f'<span>Rounds: {swatches} … (colour = verification round)</span>'
            f'<span><span class="svlm-tok svlm-accepted" style="background:{round_colour(1)}">draft</span> '
            'accepted draft token</span>'
            f'<span><span class="svlm-tok svlm-bonus" style="background:{round_colour(1)};'
            f'--svlm-edge:{round_colour(1, light=False)}">bonus</span> bonus token chosen by the target</span>'
            '</div>')


# ---------------------------------------------------------------------- metrics

def run_metrics(events) -> dict | None:
    """Wall time, tokens, tokens/s (and tau, rounds for SpecVLM) of a (partial) run."""
    if not events:
        return None
    last = events[-1]
    rounds = [e for e in events if e.round > 0]
    out = {"tokens": last.total_tokens, "seconds": last.elapsed_s,
           "tokens_per_s": last.total_tokens / last.elapsed_s if last.elapsed_s > 0 else None,
           "prefill_ms": events[0].prefill_ms, "finished": last.finished, "finish_reason": last.finish_reason}
    if last.method == "spec":
        out["rounds"] = len(rounds)
        out["tau"] = sum(len(e.new_tokens) for e in rounds) / len(rounds) if rounds else None
    return out


def time_at_tokens(events, n_tokens: int) -> float | None:
    """Elapsed seconds when a run had emitted n_tokens (None if it never did)."""
    for e in events:
        if e.total_tokens >= n_tokens:
            return e.elapsed_s
    return None


def live_speedup(ar_events, spec_events) -> float | None:
    """Speedup so far: the plain run's time to reach SpecVLM's current token count over
    SpecVLM's time (the final ratio of wall times once both are done)."""
    if not ar_events or not spec_events:
        return None
    spec_last = spec_events[-1]
    if ar_events[-1].finished and spec_last.finished:
        return ar_events[-1].elapsed_s / spec_last.elapsed_s if spec_last.elapsed_s > 0 else None
    t_ar = time_at_tokens(ar_events, spec_last.total_tokens)
    if t_ar is None or spec_last.elapsed_s <= 0:
        return None
    return t_ar / spec_last.elapsed_s


def metrics_html(name: str, metrics: dict | None, state: str) -> str:
    """One panel's metric line. state: "waiting", "running" or "done"."""
    if metrics is None:
        label = {"waiting": "waiting", "running": "starting …"}.get(state, "—")
        return f'<div class="svlm-metrics"><b>{name}</b> <span class="svlm-dim">{label}</span></div>'
    parts = [f'<span class="svlm-num" data-metric="seconds">{metrics["seconds"]:.3f}</span> s wall',
             f'<span class="svlm-num">{metrics["tokens"]}</span> tokens']
    if metrics["tokens_per_s"]:
        parts.append(f'<span class="svlm-num" data-metric="tokens-per-s">{metrics["tokens_per_s"]:.1f}</span> tok/s')
    if metrics.get("tau") is not None:
        parts.append(f'τ <span class="svlm-num" data-metric="tau">{metrics["tau"]:.2f}</span> '
                     f'over {metrics["rounds"]} rounds')
    tail = " · running …" if state == "running" else ""
    return (f'<div class="svlm-metrics"><b>{name}</b> ' + " · ".join(parts)
            + f'<span class="svlm-dim">{tail}</span></div>')


def summary_html(speedup: float | None, tau: float | None, identical: bool | None, temperature: float,
                 final: bool) -> str:
    """Speedup and tau, big, and the identical badge."""
    sp = f"{speedup:.2f}×" if speedup is not None else "—"
    sp_note = "" if final or speedup is None else ' <span class="svlm-dim">(so far)</span>'
    tau_s = f"{tau:.2f}" if tau is not None else "—"
    return ('<div class="svlm-summary">'
            f'<div class="svlm-stat"><div class="svlm-dim">speedup</div>'
            f'<div class="svlm-big" data-testid="speedup">{sp}</div>{sp_note}</div>'
            f'<div class="svlm-stat"><div class="svlm-dim">τ (tokens per round)</div>'
            f'<div class="svlm-big" data-testid="tau">{tau_s}</div></div>'
            f'<div class="svlm-stat">{identical_badge(identical, temperature) if final else ""}</div>'
            '</div>')


def identical_badge(identical: bool | None, temperature: float) -> str:
    if identical is None:
        return ""
    if temperature > 0:
        same = "token-identical this time" if identical else "different tokens"
        return ('<span class="svlm-badge svlm-badge-info" data-testid="identical" '
                f'data-identical="{str(identical).lower()}">T &gt; 0: same distribution ({same})</span>')
    if identical:
        return ('<span class="svlm-badge svlm-badge-ok" data-testid="identical" data-identical="true">'
                '✓ identical to plain decoding</span>')
    return ('<span class="svlm-badge svlm-badge-bad" data-testid="identical" data-identical="false">'
            '✗ outputs differ</span>')


def error_html(message: str) -> str:
    return f'<div class="svlm-error" data-testid="error">⚠️ {html.escape(message)}</div>'


# -------------------------------------------------------------------- Train tab

def duration(seconds: float | None) -> str:
    if seconds is None:
        return "—"
    seconds = int(round(seconds))
    if seconds < 60:
        return f"{seconds} s"
    if seconds < 3600:
        return f"{seconds // 60} min {seconds % 60:02d} s"
    return f"{seconds // 3600} h {seconds % 3600 // 60:02d} min"


def train_status_html(status: dict | None, metrics: list[dict], owner_is_me: bool = False, owned: bool = False,
                      note: str = "", out_dir: str | None = None, message: str | None = None,
                      error: bool = False) -> str:
    """Progress bar and one status line of the training job (state, step/total, epoch,
    ETA, last losses and tau), plus the last message."""
    extra = ""
    if message:
        extra = (f'<div class="svlm-error" data-testid="train-message">⚠️ {html.escape(message)}</div>' if error
                 else f'<div class="svlm-dim" data-testid="train-message">{html.escape(message)}</div>')
    if status is None:
        return (f'<div class="svlm-train" data-state="idle" data-testid="train-status"><b>No training job yet.</b> '
                f'<span class="svlm-dim">Choose data and settings, then press Start.</span>{extra}</div>')
    state, step, total = status["state"], status["step"], status["total_steps"] or 0
    pct = 100.0 * step / total if total else 0.0
    parts = [f"<b>{html.escape(state)}</b>", f"step {step}/{total or '?'}", f"epoch {status['epoch']:.3f}"]
    if state in ("running", "paused", "idle"):
        parts.append(f"ETA {duration(status.get('eta_s'))}")
    last = metrics[-1] if metrics else None
    if last:
        parts.append(f"loss {last['loss']:.3f} · top-1 {last['top1']:.2f}")
    taus = [m["tau"] for m in metrics if m.get("tau") is not None]
    if taus:
        parts.append(f"τ {taus[-1]:.2f}")
    who = "started here" if owner_is_me else ("started by another session" if owned else "")
    facts = " · ".join(x for x in (html.escape(note), f"→ runs/{html.escape(Path(out_dir).name)}" if out_dir else "",
                                    who) if x)
    msg = status.get("message") or ""
    return (f'<div class="svlm-train" data-state="{html.escape(state)}" data-step="{step}" data-total="{total}" '
            f'data-testid="train-status">'
            f'<div class="svlm-bar"><div class="svlm-bar-fill svlm-bar-{html.escape(state)}" '
            f'style="width:{pct:.1f}%"></div></div>'
            f'<div>{" · ".join(parts)}</div>'
            f'<div class="svlm-dim">{facts}{" · " + html.escape(msg) if msg else ""}</div>{extra}</div>')


CSS = """
.svlm-text { white-space: pre-wrap; overflow-wrap: anywhere; word-break: break-word;
  font-family: ui-monospace, SFMono-Regular, Menlo, monospace; font-size: 14px;
  line-height: 1.9; min-height: 6em; padding: 8px; border: 1px solid var(--border-color-primary); border-radius: 6px; }
.svlm-tok { border-radius: 3px; padding: 1px 0; color: #111; }
.svlm-bonus { box-shadow: inset 0 -3px 0 var(--svlm-edge, #333); font-weight: 600; }
.svlm-prefill { box-shadow: inset 0 -3px 0 #888; }
.svlm-cursor { animation: svlm-blink 1s steps(2) infinite; }
@keyframes svlm-blink { to { visibility: hidden; } }
.svlm-empty, .svlm-dim { color: var(--body-text-color-subdued); }
.svlm-metrics { font-size: 14px; margin: 4px 0; }
.svlm-num { font-variant-numeric: tabular-nums; font-weight: 600; }
.svlm-legend { display: flex; flex-wrap: wrap; gap: 18px; font-size: 13px; margin-top: 6px; }
.svlm-summary { display: flex; gap: 32px; align-items: center; flex-wrap: wrap; }
.svlm-stat { min-width: 110px; }
.svlm-big { font-size: 28px; font-weight: 700; font-variant-numeric: tabular-nums; }
.svlm-badge { display: inline-block; padding: 4px 10px; border-radius: 999px; font-weight: 600; font-size: 14px; }
.svlm-badge-ok { background: #dcfce7; color: #166534; }
.svlm-badge-bad { background: #fee2e2; color: #991b1b; }
.svlm-badge-info { background: #e0e7ff; color: #3730a3; }
.svlm-bar { height: 10px; background: var(--border-color-primary); border-radius: 5px; overflow: hidden;
  margin: 4px 0 6px; }
.svlm-bar-fill { height: 100%; background: #2563eb; transition: width 0.4s; }
.svlm-bar-paused { background: #f59e0b; } .svlm-bar-finished { background: #16a34a; }
.svlm-bar-cancelled, .svlm-bar-failed { background: #94a3b8; }
.svlm-train { font-size: 14px; }
.svlm-error { background: #fef2f2; color: #991b1b; border: 1px solid #fecaca; border-radius: 6px; padding: 8px 12px; }
"""
