"""Plotly figures of a SpecVLM run; pure functions of RoundEvent lists.

`decode` (token id list -> text) turns tree tokens into labels; without it the ids are
shown.
"""
from __future__ import annotations

import math

import plotly.graph_objects as go
from plotly.subplots import make_subplots

from .render import time_at_tokens

ACCEPTED = "#16a34a"
BONUS = "#f59e0b"
ROOT = "#334155"
OTHER = "#94a3b8"
EDGE = "#cbd5e1"
AR_COLOUR = "#64748b"
SPEC_COLOUR = "#2563eb"


def token_label(token: int, decode=None) -> str:
    """A short visible form of one token: whitespace shown, long pieces cut."""
    if decode is None:
        return f"#{token}"
    text = decode([token])
    text = text.replace("\n", "⏎").replace("\t", "⇥").replace(" ", "␣")
    if not text:
        text = f"#{token}"
    return text if len(text) <= 14 else text[:13] + "…"


def empty_figure(message: str) -> go.Figure:
    fig = go.Figure()
    fig.add_annotation(text=message, showarrow=False, x=0.5, y=0.5, xref="paper", yref="paper",
                       font=dict(size=14, color="#64748b"))
    fig.update_layout(xaxis=dict(visible=False), yaxis=dict(visible=False), height=260,
                      margin=dict(l=10, r=10, t=30, b=10), plot_bgcolor="white")
    return fig


def tree_layout(parents: list[int]) -> tuple[list[float], list[float]]:
    """(x, y) per node: x = depth, leaves on consecutive rows in child (= score)
    order, each parent centred on its children. parents[0] == -1 and parents precede
    children."""
    n = len(parents)
    children = [[] for _ in range(n)]
    for i, p in enumerate(parents):
        if p >= 0:
            children[p].append(i)
    x = [0.0] * n
    y = [0.0] * n
    next_row = 0.0

    def place(node: int, depth: int) -> None:  # iterative would be overkill: depth <= 32
        nonlocal next_row
        x[node] = float(depth)
        if not children[node]:
            y[node] = -next_row
            next_row += 1
            return
        for c in children[node]:
            place(c, depth + 1)
        y[node] = sum(y[c] for c in children[node]) / len(children[node])

    place(0, 0)
    return x, y


def tree_figure(event, decode=None) -> go.Figure:
    """The draft tree of one verification round: nodes are draft tokens (text and
    cumulative draft log-prob), edges parent -> child, the accepted path in green and
    the target's bonus token in orange."""
    if event is None or not event.tree:
        return empty_figure("No draft tree yet: run a comparison first.")
    tree = event.tree
    tokens, parents, depths, scores = tree["tokens"], tree["parents"], tree["depths"], tree["scores"]
    n = len(tokens)
    accepted = set(event.accepted_nodes)
    x, y = tree_layout(parents)
    fig = go.Figure()

    # Edges: grey for the rest of the tree, green along the accepted path.
    for on_path, colour, width in ((False, EDGE, 1.5), (True, ACCEPTED, 4)):
        ex, ey = [], []
        for i in range(1, n):
            if (i in accepted and parents[i] in accepted) == on_path:
                ex += [x[parents[i]], x[i], None]
                ey += [y[parents[i]], y[i], None]
        if ex:
            fig.add_trace(go.Scatter(x=ex, y=ey, mode="lines", line=dict(color=colour, width=width),
                                     hoverinfo="skip", showlegend=False))

    labels = [token_label(t, decode) for t in tokens]
    colours = [ROOT if i == 0 else (ACCEPTED if i in accepted else OTHER) for i in range(n)]
    texts = [f"{labels[i]}" if i == 0 else f"{labels[i]} {scores[i]:.2f}" for i in range(n)]
    hover = []
    for i in range(n):
        role = "root (last token, not yet verified)" if i == 0 else ("accepted" if i in accepted else "rejected")
        hover.append(f"node {i} · depth {depths[i]}<br>token {tokens[i]} '{labels[i]}'<br>"
                     f"draft log p {scores[i]:.3f} (p {math.exp(scores[i]):.3f})<br>{role}")
    fig.add_trace(go.Scatter(x=x, y=y, mode="markers+text", text=texts, textposition="middle right",
                             textfont=dict(size=12), hovertext=hover, hoverinfo="text",
                             marker=dict(size=14, color=colours, line=dict(color="white", width=1)),
                             showlegend=False))

    # The bonus token: chosen by the target after the last accepted node.
    n_accepted = len(event.accepted_nodes) - 1
    if event.bonus_token is not None and len(event.new_tokens) > n_accepted:
        last = event.accepted_nodes[-1] if event.accepted_nodes else 0
        bx, by = x[last] + 1, y[last] + 0.45
        label = token_label(event.bonus_token, decode)
        fig.add_trace(go.Scatter(x=[x[last], bx], y=[y[last], by], mode="lines",
                                 line=dict(color=BONUS, width=3, dash="dot"), hoverinfo="skip", showlegend=False))
        fig.add_trace(go.Scatter(x=[bx], y=[by], mode="markers+text", text=[f"{label} (bonus)"],
                                 textposition="middle right", textfont=dict(size=12, color="#b45309"),
                                 marker=dict(size=16, color=BONUS, symbol="star"),
                                 hovertext=[f"bonus token {event.bonus_token} '{label}'<br>picked by the target"],
                                 hoverinfo="text", showlegend=False))

    # Legend entries without data.
    for name, colour, symbol in (("accepted path", ACCEPTED, "circle"), ("rejected draft", OTHER, "circle"),
                                 ("bonus (target)", BONUS, "star")):
        fig.add_trace(go.Scatter(x=[None], y=[None], mode="markers", name=name,
                                 marker=dict(size=11, color=colour, symbol=symbol)))
    leaves = max(1, -min(y) + 1)
    fig.update_layout(
        title=dict(text=f"Round {event.round}: {n - 1} draft nodes, {n_accepted} accepted + bonus", x=0.01),
        height=int(min(900, max(300, 34 * leaves + 110))), margin=dict(l=10, r=10, t=50, b=30),
        plot_bgcolor="white", legend=dict(orientation="h", y=-0.06),
        xaxis=dict(title="depth", dtick=1, range=[-0.3, max(x) + 2.2], showgrid=True, gridcolor="#f1f5f9",
                   zeroline=False),
        yaxis=dict(visible=False, range=[min(y) - 0.8, max(y) + 0.9]))
    return fig


def accepted_length_figure(spec_events) -> go.Figure:
    """Tokens emitted per verification round: accepted drafts and the bonus, stacked,
    with tau (their mean) as a line."""
    rounds = [e for e in spec_events if e.round > 0]
    if not rounds:
        return empty_figure("No verification rounds yet.")
    xs = [e.round for e in rounds]
    acc = [min(max(0, len(e.accepted_nodes) - 1), len(e.new_tokens)) for e in rounds]
    bonus = [len(e.new_tokens) - a for e, a in zip(rounds, acc)]
    tau = sum(len(e.new_tokens) for e in rounds) / len(rounds)
    fig = go.Figure()
    fig.add_trace(go.Bar(x=xs, y=acc, name="accepted draft tokens", marker_color=ACCEPTED))
    fig.add_trace(go.Bar(x=xs, y=bonus, name="bonus token", marker_color=BONUS))
    fig.add_hline(y=tau, line=dict(color="#0f172a", dash="dash"))
    fig.update_layout(barmode="stack", height=300,
                      title=dict(text=f"Tokens per verification round (τ = {tau:.2f}, dashed)", x=0.01),
                      margin=dict(l=10, r=10, t=50, b=30), xaxis_title="round", yaxis_title="tokens",
                      plot_bgcolor="white", legend=dict(orientation="h", y=1.12, x=1, xanchor="right"))
    return fig


def speedup_series(ar_events, spec_events) -> tuple[list[float], list[float]]:
    """(SpecVLM seconds, speedup at that moment): the plain run's time to reach the same
    token count over SpecVLM's time."""
    ts, sp = [], []
    for e in spec_events:
        t_ar = time_at_tokens(ar_events, e.total_tokens)
        if t_ar is not None and e.elapsed_s > 0:
            ts.append(e.elapsed_s)
            sp.append(t_ar / e.elapsed_s)
    return ts, sp


def speedup_figure(ar_events, spec_events) -> go.Figure:
    """Tokens over wall time for both runs, and the running speedup."""
    if not ar_events and not spec_events:
        return empty_figure("Run a comparison to see tokens over time.")
    fig = make_subplots(rows=2, cols=1, shared_xaxes=True, vertical_spacing=0.08, row_heights=[0.6, 0.4],
                        subplot_titles=("Tokens over wall time", "Speedup so far"))
    for name, events, colour in (("plain", ar_events, AR_COLOUR), ("SpecVLM", spec_events, SPEC_COLOUR)):
        if events:
            fig.add_trace(go.Scatter(x=[0.0] + [e.elapsed_s for e in events], y=[0] + [e.total_tokens for e in events],
                                     mode="lines", line=dict(color=colour, width=2.5, shape="hv"), name=name),
                          row=1, col=1)
    ts, sp = speedup_series(ar_events, spec_events)
    if ts:
        fig.add_trace(go.Scatter(x=ts, y=sp, mode="lines+markers", line=dict(color=SPEC_COLOUR),
                                 marker=dict(size=4), name="speedup", showlegend=False), row=2, col=1)
        fig.add_hline(y=1.0, line=dict(color="#94a3b8", dash="dot"), row=2, col=1)
    fig.update_yaxes(title_text="tokens", row=1, col=1)
    fig.update_yaxes(title_text="×", row=2, col=1)
    fig.update_xaxes(title_text="seconds", row=2, col=1)
    fig.update_layout(height=440, margin=dict(l=10, r=10, t=40, b=30), plot_bgcolor="white",
                      legend=dict(orientation="h", y=-0.15, x=0))
    return fig


# ------------------------------------------------------------------ Train tab

TRAIN_CURVES = (("loss_logit", "loss_logit (CE to teacher logits)"), ("loss_feat", "loss_feat (SmoothL1 to features)"),
                ("top1", "top-1 agreement with the teacher"), ("tau", "τ on held-out prompts (eval steps)"))


def training_figure(metrics: list[dict]) -> go.Figure:
    """loss_logit, loss_feat, top1 and tau (only on evaluation steps) over steps."""
    if not metrics:
        return empty_figure("No training metrics yet: press Start.")
    fig = make_subplots(rows=2, cols=2, subplot_titles=[title for _, title in TRAIN_CURVES],
                        horizontal_spacing=0.1, vertical_spacing=0.16)
    for i, (key, _) in enumerate(TRAIN_CURVES):
        points = [(m["step"], m[key]) for m in metrics if m.get(key) is not None]
        xs, ys = [p[0] for p in points], [p[1] for p in points]
        sparse = key == "tau"
        fig.add_trace(go.Scatter(x=xs, y=ys, mode="lines+markers" if sparse or len(xs) < 30 else "lines",
                                 line=dict(color=SPEC_COLOUR if key != "tau" else ACCEPTED, width=2),
                                 marker=dict(size=7 if sparse else 4), name=key, showlegend=False),
                      row=i // 2 + 1, col=i % 2 + 1)
    fig.update_xaxes(title_text="step", row=2)
    fig.update_layout(height=460, margin=dict(l=10, r=10, t=40, b=30), plot_bgcolor="white")
    return fig


# -------------------------------------------------------------- Benchmark tab

METHOD_COLOURS = {"prompt_lookup": "#a855f7", "hf_prompt_lookup": "#d8b4fe", "eagle": "#0ea5e9",
                  "specvlm": SPEC_COLOUR, "plain": AR_COLOUR}


def benchmark_figure(report: dict | None) -> go.Figure:
    """Per-case speedup over plain decoding, one bar group per case, one bar per method."""
    rows = [r for r in (report or {}).get("rows", []) if r.get("speedup") is not None and r["method"] != "plain"]
    if not rows:
        return empty_figure("No benchmark yet: press Run benchmark.")
    fig = go.Figure()
    cases = list(dict.fromkeys(r["case"] for r in rows))
    for method in dict.fromkeys(r["method"] for r in rows):
        by_case = {r["case"]: r for r in rows if r["method"] == method}
        fig.add_trace(go.Bar(name=method, x=cases, y=[by_case[c]["speedup"] if c in by_case else None for c in cases],
                             marker_color=METHOD_COLOURS.get(method),
                             hovertext=[f"{method} on {c}: τ {by_case[c]['tau']:.2f}" if c in by_case
                                        and by_case[c].get("tau") is not None else method for c in cases]))
    fig.add_hline(y=1.0, line=dict(color="#94a3b8", dash="dot"))
    fig.update_layout(barmode="group", height=380, title=dict(text="Speedup vs plain decoding, per case", x=0.01),
                      yaxis_title="speedup (×)", margin=dict(l=10, r=10, t=50, b=30), plot_bgcolor="white",
                      legend=dict(orientation="h", y=1.12, x=1, xanchor="right"))
    return fig


# ------------------------------------------------------------- Compressor tab

def gate_figure(gate: dict | None, chosen: str | None = None) -> go.Figure:
    """The gate's probability per option (or per primitive, in weighted mode); the chosen
    option highlighted."""
    if not gate:
        return empty_figure("No gate in the last run (compressor off, or a fixed option).")
    names = list(gate)
    colours = [ACCEPTED if name == chosen else OTHER for name in names]
    fig = go.Figure(go.Bar(x=names, y=[gate[n] for n in names], marker_color=colours,
                           text=[f"{gate[n]:.2f}" for n in names], textposition="outside"))
    fig.update_layout(height=320, title=dict(text="Gate probabilities (green: chosen)", x=0.01),
                      yaxis=dict(title="probability", range=[0, 1.1]), margin=dict(l=10, r=10, t=50, b=30),
                      plot_bgcolor="white")
    return fig
