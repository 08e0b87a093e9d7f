"""``flux2ttr inspect STORE``: a readable (or ``--json``) summary of a trace store, and attention
heatmaps of stored queries over the latent image grid.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import torch

from flux2ttr.traces.store import TraceStore, TraceStoreError

HIST_BINS = 10  # sigma histogram bins in the text summary
HIST_WIDTH = 40  # characters of the longest histogram bar


def summarize(store: TraceStore, bins: int = HIST_BINS) -> dict[str, Any]:
    """Everything the summary prints, as a JSON-friendly dict."""
    layers = []
    sigmas: list[np.ndarray] = []
    steps: set[int] = set()
    prompts: set[int] = set()
    for layer in store.layers:
        groups = []
        for n, count in store.groups(layer):
            shapes = store.shapes(layer, n)
            sc = store.scalars(layer, n)
            sigmas.append(sc["sigma"])
            steps.update(sc["step"].tolist())
            prompts.update(sc["prompt"].tolist())
            h_, nq, d = shapes["q_sub"]
            groups.append({
                "n_tokens": n, "count": count, "heads": h_, "queries": nq, "head_dim": d,
                "n_cond": sorted(set(sc["n_cond"].tolist())),
                "grid": sorted({f"{a}x{b}" for a, b in zip(sc["h"].tolist(), sc["w"].tolist())}),
            })
        layers.append({"layer": layer, "tuples": sum(g["count"] for g in groups), "groups": groups})
    sigma = np.concatenate(sigmas) if sigmas else np.zeros(0)
    hist: dict[str, Any] = {"edges": [], "counts": []}
    if sigma.size:
        lo, hi = float(sigma.min()), float(sigma.max())
        counts, edges = np.histogram(sigma, bins=bins, range=(lo, hi) if hi > lo else (lo - 0.5, lo + 0.5))
        hist = {"edges": [float(e) for e in edges], "counts": [int(c) for c in counts]}
    res = store.attrs.get("reservoir", {})
    return {
        "path": str(store.path),
        "format": store.attrs.get("format"),
        "schema": store.schema,
        "storage_dtype": store.storage_dtype,
        "teacher": store.attrs.get("teacher"),
        "capture": store.attrs.get("capture"),
        "bytes_on_disk": store.nbytes_on_disk(),
        "files": store.file_count(),
        "tuples": store.count(),
        "offered": res.get("offered"),
        "kept": res.get("kept"),
        "budget_bytes": res.get("budget_bytes"),
        "kept_bytes": res.get("kept_bytes"),
        "offered_per_layer": res.get("offered_per_layer"),
        "layers": layers,
        "sigma": {"min": float(sigma.min()) if sigma.size else None,
                  "max": float(sigma.max()) if sigma.size else None, "histogram": hist},
        "steps": sorted(steps),
        "prompts": len(prompts),
    }


def _mib(n: int | None) -> str:
    return "?" if n is None else f"{n / 2**20:.2f} MiB"


def _teacher_line(teacher: Any) -> str:
    """``kind file sha256 <12 hex>`` for identities that have them (the full dict is in ``--json``)."""
    if not isinstance(teacher, dict) or "kind" not in teacher:
        return json.dumps(teacher, sort_keys=True)
    parts = [str(teacher["kind"])]
    if teacher.get("file"):
        parts.append(str(teacher["file"]))
    if teacher.get("sha256"):
        parts.append(f"sha256 {str(teacher['sha256'])[:12]}")
    return "  ".join(parts)


def format_summary(s: dict[str, Any]) -> str:
    """The summary as text a person reads."""
    lines = [
        f"trace store  {s['path']}",
        f"format       {s['format']} schema {s['schema']}, storage {s['storage_dtype']}",
        f"teacher      {_teacher_line(s['teacher'])}",
        f"on disk      {_mib(s['bytes_on_disk'])} in {s['files']} files",
        f"tuples       {s['tuples']} kept of {s['offered']} offered "
        f"({_mib(s['kept_bytes'])} of a {_mib(s['budget_bytes'])} budget)",
        f"prompts      {s['prompts']}, steps {s['steps']}",
        "",
        f"{'layer':<18} {'tuples':>7} {'offered':>8}  token counts (N: tuples, heads x queries x head_dim)",
    ]
    offered = s.get("offered_per_layer") or {}
    for lay in s["layers"]:
        groups = ", ".join(f"{g['n_tokens']}: {g['count']} ({g['heads']}x{g['queries']}x{g['head_dim']}, "
                           f"text {'/'.join(map(str, g['n_cond']))}, grid {'/'.join(g['grid'])})"
                           for g in lay["groups"])
        lines.append(f"{lay['layer']:<18} {lay['tuples']:>7} {offered.get(lay['layer'], '?'):>8}  {groups}")
    sig = s["sigma"]
    lines.append("")
    if sig["min"] is None:
        lines.append("sigma        (no tuples)")
    else:
        lines.append(f"sigma        {sig['min']:.4f} .. {sig['max']:.4f}")
        counts, edges = sig["histogram"]["counts"], sig["histogram"]["edges"]
        top = max(counts) or 1
        for i, c in enumerate(counts):
            bar = "#" * math.ceil(HIST_WIDTH * c / top) if c else ""
            lines.append(f"  [{edges[i]:.3f}, {edges[i + 1]:.3f}{']' if i == len(counts) - 1 else ')'} "
                         f"{c:>6} {bar}")
    return "\n".join(lines)


def query_attention(q_sub: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """Teacher attention probabilities of stored queries: ``softmax(q_sub k^T / sqrt(D))`` over keys.

    ``q_sub`` ``[H, Nq, D]``, ``k`` ``[H, N, D]`` -> ``[H, Nq, N]`` float64 (rows sum to 1).
    """
    q64, k64 = q_sub.to(torch.float64), k.to(torch.float64)
    logits = q64 @ k64.transpose(-1, -2) / math.sqrt(q_sub.shape[-1])
    return torch.softmax(logits, dim=-1)


def heatmap_data(store: TraceStore, layer: str, queries: int, max_rows: int = 64) -> list[dict[str, Any]]:
    """Head-averaged teacher attention of up to ``queries`` stored queries of ``layer`` (smallest token
    count), each as ``{"grid": [h, w] float64 array over the image keys, "pos": (row, col) of the query or
    None for a text query, "text_mass": attention on the text keys, "token", "row", "sigma", "step",
    "prompt"}``. Image queries come first, taken from the group's tuples in row order (up to ``max_rows``
    tuples are looked at); text queries fill up when there are too few image queries."""
    n, count = store.groups(layer)[0]
    image, text = [], []
    for row in range(min(count, max_rows)):
        t = store.read(layer, n, [row])
        n_cond, h, w = int(t["n_cond"][0]), int(t["h"][0]), int(t["w"][0])
        if n_cond + h * w != n:
            raise TraceStoreError(f"{store.path}: {layer} tuple has {n} tokens but n_cond {n_cond} + {h}x{w} "
                                  "grid; the store is inconsistent, recapture it")
        probs = query_attention(t["q_sub"][0], t["k"][0]).mean(dim=0)  # [Nq, N], heads averaged
        for j, token in enumerate(t["q_idx"][0].tolist()):
            p = probs[j]
            entry = {
                "query": j, "token": token, "row": row,
                "pos": divmod(token - n_cond, w) if token >= n_cond else None,
                "text_mass": float(p[:n_cond].sum()), "grid": p[n_cond:].reshape(h, w).numpy(),
                "sigma": float(t["sigma"][0]), "step": int(t["step"][0]), "prompt": int(t["prompt"][0]),
            }
            (image if token >= n_cond else text).append(entry)
        if len(image) >= queries:
            break
    return (image + text)[:queries]


def render_heatmap(store: TraceStore, layer: str, out_path: Path, queries: int) -> list[dict[str, Any]]:
    """Draw :func:`heatmap_data` into a PNG at ``out_path`` (written atomically). Returns the data."""
    import matplotlib  # noqa: PLC0415

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415

    maps = heatmap_data(store, layer, queries)
    if not maps:
        raise TraceStoreError(f"{store.path}: {layer} has no stored queries to draw")
    cols = len(maps)
    fig, axes = plt.subplots(1, cols, figsize=(3.2 * cols, 3.4), squeeze=False)
    for ax, m in zip(axes[0], maps):
        im = ax.imshow(m["grid"], cmap="magma", interpolation="nearest")
        if m["pos"] is not None:
            ax.plot(m["pos"][1], m["pos"][0], marker="x", color="cyan", markersize=9, mew=2)
            where = f"query ({m['pos'][0]},{m['pos'][1]})"
        else:
            where = f"text query {m['token']}"
        ax.set_title(f"{where}  prompt {m['prompt']} step {m['step']}\n"
                     f"sigma {m['sigma']:.3f}  text mass {m['text_mass']:.3f}", fontsize=8)
        ax.set_xticks([])
        ax.set_yticks([])
        fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04)
    fig.suptitle(f"{layer}: teacher attention over the image grid (x = query position)", fontsize=10)
    fig.tight_layout()
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_path.with_name(f".{out_path.name}.tmp")
    fig.savefig(tmp, format="png", dpi=100)
    plt.close(fig)
    tmp.replace(out_path)
    return maps


def run_inspect(store: Path, *, as_json: bool, heatmap_layer: str | None, out_path: Path | None,
                queries: int) -> None:
    """The ``flux2ttr inspect`` command: print the summary; optionally draw a heatmap PNG."""
    import click  # noqa: PLC0415

    if heatmap_layer is not None and out_path is None:
        raise click.ClickException("--heatmap needs --out FILE.png")
    if queries < 1:
        raise click.ClickException("--queries must be at least 1")
    try:
        ts = TraceStore.open(store)
        summary = summarize(ts)
        if heatmap_layer is not None:
            if heatmap_layer not in ts.layers:
                raise click.ClickException(f"{store}: no layer {heatmap_layer!r}; stored layers: {ts.layers}")
            maps = render_heatmap(ts, heatmap_layer, out_path, queries)
            summary["heatmap"] = {"layer": heatmap_layer, "out": str(out_path),
                                  "queries": [{"token": m["token"], "pos": m["pos"], "text_mass": m["text_mass"]}
                                              for m in maps]}
    except TraceStoreError as e:
        raise click.ClickException(str(e)) from e
    if as_json:
        click.echo(json.dumps(summary, indent=2, sort_keys=True))
    else:
        click.echo(format_summary(summary))
        if "heatmap" in summary:
            click.echo(f"\nheatmap of {len(summary['heatmap']['queries'])} queries of {heatmap_layer} -> {out_path}")
