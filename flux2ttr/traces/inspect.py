"""``flux2ttr inspect STORE``: a readable (or ``--json``) summary of a trace store, where the teacher's
attention mass lies (text tokens, 2-D windows and window-student tiles on the latent grid, and how well
exact softmax restricted to those keys reproduces the stored teacher output), and attention heatmaps of
stored queries over the latent image grid.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
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
                "head_subset": store.has_heads(layer, n),
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
        "teacher_heads": store.teacher_heads() if store.layers else None,
        "head_subset": any(g["head_subset"] for lay in layers for g in lay["groups"]),
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


def _subset_heads(s: dict[str, Any]) -> str:
    return "/".join(str(h) for h in sorted({g["heads"] for lay in s["layers"] for g in lay["groups"]}))


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
        *([f"heads        each tuple holds a head subset: {_subset_heads(s)} of the teacher's {s['teacher_heads']} "
           "heads (seeded per tuple, recorded in the store: capture.tuple_heads)"] if s.get("head_subset") else []),
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


def heatmap_data(store: TraceStore, layer: str, queries: int, max_rows: int = 64, *, prompt: int | None = None,
                 step: int | None = None, token: int | None = None) -> list[dict[str, Any]]:
    """Head-averaged teacher attention of up to ``queries`` stored queries of ``layer`` (smallest token
    count), each as ``{"grid": [h, w] float64 array over the image keys, "pos": (row, col) of the query or
    None for a text query, "text_mass": attention on the text keys, "token", "row", "sigma", "step",
    "prompt"}``.

    Candidates are the stored queries of up to ``max_rows`` tuples (only those of ``prompt`` / ``step``
    / ``token`` when given). Image queries are picked spread over the image: the one nearest the grid's
    centre first, then each time the one farthest from those already picked (ties: the earlier tuple and
    query); text queries fill up when there are too few image queries."""
    n, count = store.groups(layer)[0]
    image, text = [], []
    for row in range(min(count, max_rows)):
        t = store.read(layer, n, [row])
        if (prompt is not None and int(t["prompt"][0]) != prompt) or (step is not None and int(t["step"][0]) != step):
            continue
        n_cond, h, w = int(t["n_cond"][0]), int(t["h"][0]), int(t["w"][0])
        if n_cond + h * w != n:
            raise TraceStoreError(f"{store.path}: {layer} tuple has {n} tokens but n_cond {n_cond} + {h}x{w} "
                                  "grid; the store is inconsistent, recapture it")
        probs = query_attention(t["q_sub"][0], t["k"][0]).mean(dim=0)  # [Nq, N], heads averaged
        for j, tok in enumerate(t["q_idx"][0].tolist()):
            if token is not None and tok != token:
                continue
            p = probs[j]
            entry = {
                "query": j, "token": tok, "row": row,
                "pos": divmod(tok - n_cond, w) if tok >= n_cond else None,
                "text_mass": float(p[:n_cond].sum()), "grid": p[n_cond:].reshape(h, w).numpy(),
                "sigma": float(t["sigma"][0]), "step": int(t["step"][0]), "prompt": int(t["prompt"][0]),
                "_hw": (h, w),
            }
            (image if tok >= n_cond else text).append(entry)
    picked = _spread(image, queries)
    out = (picked + text)[:queries]
    for m in out:
        m.pop("_hw", None)
    return out


def _spread(entries: list[dict[str, Any]], k: int) -> list[dict[str, Any]]:
    """Up to ``k`` of ``entries`` spread over the latent grid (greedy farthest point, from the centre)."""
    if not entries or k <= 0:
        return []
    pos = np.array([e["pos"] for e in entries], dtype=np.float64)
    h, w = entries[0]["_hw"]
    dist = np.hypot(pos[:, 0] - (h - 1) / 2, pos[:, 1] - (w - 1) / 2)
    order = [int(np.argmin(dist))]
    nearest = np.hypot(*(pos - pos[order[0]]).T)
    while len(order) < min(k, len(entries)):
        nearest[order] = -1.0  # never pick one twice
        nxt = int(np.argmax(nearest))
        order.append(nxt)
        nearest = np.minimum(nearest, np.hypot(*(pos - pos[nxt]).T))
    return [entries[i] for i in order]


def render_heatmap(store: TraceStore, layer: str, out_path: Path, queries: int, **select: int | None
                   ) -> list[dict[str, Any]]:
    """Draw :func:`heatmap_data` (``select``: its ``prompt``/``step``/``token`` filters) into a PNG at
    ``out_path`` (written atomically), latent-grid rows and columns on the axes. Returns the data."""
    import matplotlib  # noqa: PLC0415

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415

    maps = heatmap_data(store, layer, queries, **select)
    if not maps:
        raise TraceStoreError(f"{store.path}: {layer} has no stored queries to draw (for {select}); pick another "
                              "prompt, step or query token")
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
        ax.set_xlabel("latent column", fontsize=7)
        ax.set_ylabel("latent row", fontsize=7)
        ax.tick_params(labelsize=6)
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


# --------------------------------------------------------------------------------------------------
# where the attention mass lies

MASS_RADII = (1, 2, 3, 4, 6, 8)  # window radii R in latent tokens: (2R+1)x(2R+1) neighbourhoods
MASS_TILE = (4, 4)  # (th, tw) of the window student's key/query tiles, latent tokens
MASS_TILE_RADIUS = 4  # the tile variant's radius R, latent tokens
MASS_TUPLES = 16  # tuples read per layer (evenly spread over the layer's stored tuples)
MASS_TAIL_Q = 0.10  # the "p10" values: 10th percentile over (tuple, head, query)
MASS_CHUNK_ELEMS = 1 << 24  # float64 elements of one head chunk's scores [chunk, Nq + M*Qi, N]


def grid_positions(tokens: torch.Tensor, n_cond: int, w: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Latent-grid ``(row, col)`` of image tokens: ``tokens`` ``[Q]`` (all ``>= n_cond``) -> two ``[Q]``
    int64 tensors. The grid follows the ``n_cond`` text tokens in row-major order, ``w`` tokens a row."""
    rel = tokens.to(torch.int64) - int(n_cond)
    return torch.div(rel, w, rounding_mode="floor"), rel % w


def window_mask(rows: torch.Tensor, cols: torch.Tensor, h: int, w: int, radius: int) -> torch.Tensor:
    """Image keys inside each query's ``(2R+1) x (2R+1)`` neighbourhood (clipped at the grid edge).

    ``rows``, ``cols`` ``[Q]`` query grid positions -> ``[Q, h*w]`` bool over the image keys (row-major):
    key ``(kr, kc)`` is in iff ``max(|kr - r|, |kc - c|) <= radius``.
    """
    kr = torch.arange(h).repeat_interleave(w)
    kc = torch.arange(w).repeat(h)
    cheb = torch.maximum((kr[None] - rows[:, None]).abs(), (kc[None] - cols[:, None]).abs())
    return cheb <= int(radius)


def tile_mask(rows: torch.Tensor, cols: torch.Tensor, h: int, w: int, tile: Sequence[int], radius: int) -> torch.Tensor:
    """Image keys the window student's tiles show each query: ``[Q, h*w]`` bool (see :func:`window_mask`).

    A query at ``(r, c)`` lies in tile ``(tr, tc) = (r // th, c // tw)`` and sees every key whose tile row
    ``kr // th`` lies in ``[floor((tr*th - R) / th), floor(((tr+1)*th - 1 + R) / th)]`` and whose tile
    column ``kc // tw`` lies in the same range built from ``tw`` (whole tiles; the last tile of a grid
    that ``th``/``tw`` do not divide is partial). The set always contains the query's radius-R window.
    """
    th, tw = (int(x) for x in tile)
    kr = torch.arange(h).repeat_interleave(w)
    kc = torch.arange(w).repeat(h)
    tr = torch.div(rows, th, rounding_mode="floor")[:, None]
    tc = torch.div(cols, tw, rounding_mode="floor")[:, None]
    r_lo = torch.div(tr * th - radius, th, rounding_mode="floor")
    r_hi = torch.div((tr + 1) * th - 1 + radius, th, rounding_mode="floor")
    c_lo = torch.div(tc * tw - radius, tw, rounding_mode="floor")
    c_hi = torch.div((tc + 1) * tw - 1 + radius, tw, rounding_mode="floor")
    ktr, ktc = (kr // th)[None], (kc // tw)[None]
    return (ktr >= r_lo) & (ktr <= r_hi) & (ktc >= c_lo) & (ktc <= c_hi)


def _cosine(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Cosine over the last dim of ``[..., D]`` tensors -> ``[...]`` (0 where a vector is zero)."""
    den = (a.norm(dim=-1) * b.norm(dim=-1)).clamp_min(1e-300)
    return (a * b).sum(-1) / den


def _restricted(logits: torch.Tensor, keep: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Exact softmax over the kept keys only: ``logits`` ``[..., Q, N]``, ``keep`` ``[..., Q, N]`` bool (each
    row keeps at least one key), ``v`` ``[..., N, D]`` (broadcast) -> ``[..., Q, D]``."""
    return torch.softmax(logits.masked_fill(~keep, -math.inf), dim=-1) @ v


def tuple_mass(q_sub: torch.Tensor, q_idx: torch.Tensor, k: torch.Tensor, v: torch.Tensor, teacher_sub: torch.Tensor,
               n_cond: int, h: int, w: int, radii: Sequence[int] = MASS_RADII, tile: Sequence[int] = MASS_TILE,
               tile_radius: int = MASS_TILE_RADIUS) -> dict[str, torch.Tensor]:
    """Attention mass and restricted-softmax cosines of one tuple, per (head, query), in float64.

    Inputs: ``q_sub``/``teacher_sub`` ``[H, Nq, D]``, ``q_idx`` ``[Nq]``, ``k``/``v`` ``[H, N, D]`` with
    ``N = n_cond + h*w``. The probabilities are ``softmax(q k^T / sqrt(D))`` recomputed in float64; the
    cosines compare restricted outputs with the stored ``teacher_sub``. Returns (``Qi``/``Qt`` = image /
    text queries of the tuple, ``M`` = ``len(radii) + 1`` exact sets: the windows, then the tile set):

    - ``rel_err`` ``[H, Nq]``: ``|P v - teacher_sub| / |teacher_sub|`` (L2 over D);
    - ``img_text_mass`` ``[H, Qi]``: mass of image queries on the text keys;
    - ``img_entropy`` ``[H, Qi]``: entropy of image queries' softmax over all ``N`` keys, nats;
    - ``img_set_mass``, ``img_set_cos`` ``[M, H, Qi]``: mass on the image keys of each set, and cosine of
      softmax restricted to text + that set against ``teacher_sub``; ``img_set_keys`` ``[M, Qi]``: size of
      text + set, keys;
    - ``txt_text_mass``, ``txt_cos`` ``[H, Qt]``: mass of text queries on the text keys, and cosine of
      softmax restricted to the text keys against ``teacher_sub``.
    """
    heads, _, d = q_sub.shape
    n = k.shape[1]
    if n_cond + h * w != n:
        raise TraceStoreError(f"tuple has {n} tokens but n_cond {n_cond} + {h}x{w} grid; the store is "
                              "inconsistent, recapture it")
    q_idx = q_idx.to(torch.int64)
    img = q_idx >= n_cond
    rows, cols = grid_positions(q_idx[img], n_cond, w)
    sets = torch.stack([window_mask(rows, cols, h, w, r) for r in radii]
                       + [tile_mask(rows, cols, h, w, tile, tile_radius)])  # [M, Qi, h*w]
    keeps = torch.cat([torch.ones(*sets.shape[:2], n_cond, dtype=torch.bool), sets], dim=-1)  # [M, Qi, N]
    sets_f = sets.double()
    out: dict[str, list[torch.Tensor]] = {name: [] for name in
                                          ("rel_err", "img_text_mass", "img_entropy", "img_set_mass",
                                           "img_set_cos", "txt_text_mass", "txt_cos")}
    # heads in chunks: scores [chunk, Nq, N] and restricted softmaxes [chunk, M, Qi, N] float64 (128 MiB), and
    # few large ops instead of many small ones (small ops are slow on a busy multi-threaded CPU)
    chunk = max(1, MASS_CHUNK_ELEMS // (keeps.numel() + q_sub.shape[1] * n))
    for h0 in range(0, heads, chunk):
        sl = slice(h0, h0 + chunk)
        q64, k64, v64, t64 = (x[sl].double() for x in (q_sub, k, v, teacher_sub))  # [c, *, D]
        logits = q64 @ k64.transpose(-1, -2) / math.sqrt(d)  # [c, Nq, N]
        p = torch.softmax(logits, dim=-1)
        out["rel_err"].append((p @ v64 - t64).norm(dim=-1) / t64.norm(dim=-1).clamp_min(1e-300))
        pi, li, ti = p[:, img], logits[:, img], t64[:, img]  # [c, Qi, *]
        out["img_text_mass"].append(pi[..., :n_cond].sum(-1))
        out["img_entropy"].append(-torch.special.xlogy(pi, pi).sum(-1))
        out["img_set_mass"].append((pi[:, None, :, n_cond:] * sets_f).sum(-1))  # [c, M, Qi]
        restricted = _restricted(li[:, None], keeps, v64[:, None])  # [c, M, Qi, D]
        out["img_set_cos"].append(_cosine(restricted, ti[:, None]))
        pt, lt, tt = p[:, ~img], logits[:, ~img], t64[:, ~img]  # [c, Qt, *]
        out["txt_text_mass"].append(pt[..., :n_cond].sum(-1))
        out["txt_cos"].append(_cosine(torch.softmax(lt[..., :n_cond], dim=-1) @ v64[:, :n_cond], tt))
    res = {name: torch.cat(vals, dim=0) for name, vals in out.items()}
    res["img_set_mass"] = res["img_set_mass"].transpose(0, 1)  # [M, H, Qi]
    res["img_set_cos"] = res["img_set_cos"].transpose(0, 1)
    res["img_set_keys"] = keeps.sum(-1).double()  # [M, Qi]
    return res


def _pick(groups: list[tuple[int, int]], max_tuples: int) -> list[tuple[int, int]]:
    """``(n_tokens, row)`` of up to ``max_tuples`` tuples spread evenly over the groups' rows."""
    flat = [(n, row) for n, count in groups for row in range(count)]
    if len(flat) <= max_tuples:
        return flat
    picks = np.unique(np.linspace(0, len(flat) - 1, max_tuples).round().astype(np.int64))
    return [flat[i] for i in picks]


def _stats(x: torch.Tensor) -> tuple[float | None, float | None]:
    """Mean and :data:`MASS_TAIL_Q` quantile of all values (``None`` for none)."""
    x = x.reshape(-1)
    if not x.numel():
        return None, None
    return float(x.mean()), float(torch.quantile(x, MASS_TAIL_Q))


def attention_mass(store: TraceStore, radii: Sequence[int] = MASS_RADII, tile: Sequence[int] = MASS_TILE,
                   tile_radius: int = MASS_TILE_RADIUS, max_tuples: int = MASS_TUPLES,
                   layers: Sequence[str] | None = None, progress: bool | None = None) -> dict[str, Any]:
    """Where the teacher's attention mass lies, per layer, measured on up to ``max_tuples`` stored tuples
    of each layer (evenly spread over its rows, all token counts; reads one tuple at a time).

    Per tuple see :func:`tuple_mass`. Every value is pooled over (tuple, head, query) of the layer: each
    stored query of each head counts once; ``p10`` is the 10th percentile of that pool. Masses are shares
    of a query's softmax mass (0..1), cosines are over the head dimension D, ``keys`` is the mean size of
    the exact set (text + window) in tokens. ``progress``: a tqdm bar on stderr after half a second
    (``None``: only on a terminal). Returns plain data::

        {"radii": [R...], "tile": [th, tw], "tile_radius": R, "max_tuples": m, "layers": [
            {"layer", "tuples" (read), "stored", "heads", "image_queries", "text_queries" (per tuple summed),
             "teacher_rel_err": {"max", "mean"}  # |P v - teacher_sub| / |teacher_sub| over D
             "image": None | {"text_mass", "image_mass", "entropy" (nats, of the softmax over all keys),
                              "windows": [{"radius", "keys", "mass", "text_window_mass",
                                           "text_window_mass_p10", "cos", "cos_p10"}, ...],
                              "tile": {"tile", "radius", same fields as a window},
                              "heads": [{"head" (the teacher's index), "queries", "entropy", "text_mass",
                                         "window_mass": {"R": image-key mass within radius R}}, ...]},
             "text": None | {"text_mass", "image_mass", "cos", "cos_p10"}}, ...]}
    """
    from tqdm import tqdm  # noqa: PLC0415

    radii = [int(r) for r in radii]
    tile = [int(x) for x in tile]
    tile_radius = int(tile_radius)
    if any(r < 0 for r in radii) or tile_radius < 0:
        raise ValueError(f"radii must be >= 0 latent tokens, got {radii} and tile radius {tile_radius}")
    if len(tile) != 2 or min(tile) < 1:
        raise ValueError(f"tile must be two sizes >= 1 latent tokens (th, tw), got {tile}")
    if max_tuples < 1:
        raise ValueError(f"max_tuples must be at least 1, got {max_tuples}")
    layers = list(store.layers if layers is None else layers)
    plan = {layer: _pick(store.groups(layer), max_tuples) for layer in layers}
    bar = tqdm(total=sum(len(p) for p in plan.values()), desc="attention mass", unit="tuple", delay=0.5,
               disable=None if progress is None else not progress)
    result_layers = []
    try:
        for layer in layers:
            acc: dict[str, list[torch.Tensor]] = {}
            per_head: dict[int, dict[str, list[torch.Tensor]]] = {}  # teacher head -> its image queries' values
            heads = 0
            for n, row in plan[layer]:
                t = store.read(layer, n, [row])
                n_cond, h, w = int(t["n_cond"][0]), int(t["h"][0]), int(t["w"][0])
                try:
                    m = tuple_mass(t["q_sub"][0], t["q_idx"][0], t["k"][0], t["v"][0], t["teacher_sub"][0],
                                   n_cond, h, w, radii, tile, tile_radius)
                except TraceStoreError as e:
                    raise TraceStoreError(f"{store.path}: {layer} row {row} of n{n}: {e}") from None
                heads = int(t["q_sub"].shape[1])
                for name, val in m.items():
                    acc.setdefault(name, []).append(val)
                # a head-subset tuple's rows are the teacher heads its ``heads`` names
                ids = t["heads"][0].tolist() if "heads" in t else range(heads)
                for row, head in enumerate(ids):
                    ph = per_head.setdefault(int(head), {"entropy": [], "text": [], "sets": []})
                    ph["entropy"].append(m["img_entropy"][row])
                    ph["text"].append(m["img_text_mass"][row])
                    ph["sets"].append(m["img_set_mass"][:, row])
                bar.update(1)
            entry = _layer_mass(layer, store.count(layer), heads, acc, radii, tile, tile_radius)
            if entry["image"] is not None:
                entry["image"]["heads"] = _head_mass(per_head, radii)
            result_layers.append(entry)
    finally:
        bar.close()
    return {"radii": radii, "tile": tile, "tile_radius": tile_radius, "max_tuples": int(max_tuples),
            "layers": result_layers}


def _head_mass(per_head: dict[int, dict[str, list[torch.Tensor]]], radii: list[int]) -> list[dict[str, Any]]:
    """Per teacher head (sorted), over its image queries: mean entropy (nats), text mass and window mass."""
    out = []
    for head in sorted(per_head):
        ph = per_head[head]
        ent, text, sets = torch.cat(ph["entropy"]), torch.cat(ph["text"]), torch.cat(ph["sets"], dim=-1)  # [M, Q]
        if not ent.numel():
            continue
        out.append({"head": head, "queries": int(ent.numel()), "entropy": float(ent.mean()),
                    "text_mass": float(text.mean()),
                    "window_mass": {str(r): float(sets[i].mean()) for i, r in enumerate(radii)}})
    return out


def _layer_mass(layer: str, stored: int, heads: int, acc: dict[str, list[torch.Tensor]], radii: list[int],
                tile: list[int], tile_radius: int) -> dict[str, Any]:
    """Pool one layer's :func:`tuple_mass` results (concatenated along the query axis) into plain data."""
    def cat(name: str) -> torch.Tensor:
        return torch.cat(acc[name], dim=-1)

    entry: dict[str, Any] = {"layer": layer, "tuples": len(acc.get("rel_err", [])), "stored": stored, "heads": heads,
                             "image_queries": 0, "text_queries": 0, "teacher_rel_err": None, "image": None,
                             "text": None}
    if not acc:
        return entry
    rel = cat("rel_err")
    entry["teacher_rel_err"] = {"max": float(rel.max()), "mean": float(rel.mean())}
    text_mass = cat("img_text_mass")  # [H, Qi]
    entry["image_queries"] = int(text_mass.shape[-1])
    if text_mass.numel():
        set_mass, set_cos, keys = cat("img_set_mass"), cat("img_set_cos"), cat("img_set_keys")  # [M, H, Qi]
        sets = []
        for i in range(len(radii) + 1):
            mass, _ = _stats(set_mass[i])
            tw_mass, tw_p10 = _stats(set_mass[i] + text_mass)
            cos, cos_p10 = _stats(set_cos[i])
            sets.append({"keys": float(keys[i].mean()), "mass": mass, "text_window_mass": tw_mass,
                         "text_window_mass_p10": tw_p10, "cos": cos, "cos_p10": cos_p10})
        entry["image"] = {
            "text_mass": float(text_mass.mean()), "image_mass": float((1.0 - text_mass).mean()),
            "entropy": float(cat("img_entropy").mean()),
            "windows": [{"radius": r, **s} for r, s in zip(radii, sets[:-1])],
            "tile": {"tile": list(tile), "radius": tile_radius, **sets[-1]},
        }
    txt_mass = cat("txt_text_mass")  # [H, Qt]
    entry["text_queries"] = int(txt_mass.shape[-1])
    if txt_mass.numel():
        cos, cos_p10 = _stats(cat("txt_cos"))
        entry["text"] = {"text_mass": float(txt_mass.mean()), "image_mass": float((1.0 - txt_mass).mean()),
                         "cos": cos, "cos_p10": cos_p10}
    return entry


def _f(x: float | None, fmt: str = ".3f") -> str:
    return "-" if x is None else format(x, fmt)


def format_mass(mass: dict[str, Any]) -> str:
    """The :func:`attention_mass` result as a compact table per layer (columns: window radii, then the
    tile variant)."""
    th, tw = mass["tile"]
    tile_col = f"tile{th}x{tw}r{mass['tile_radius']}"
    lines = [f"attention mass  teacher softmax(q.k/sqrt(D)) recomputed in fp64 on up to {mass['max_tuples']} "
             "tuples per layer",
             f"                R: (2R+1)x(2R+1) latent-token window (clipped); {tile_col}: {th}x{tw} tiles, "
             f"radius {mass['tile_radius']}",
             "                keys: text + window; cos: exact softmax on text + window only vs teacher_sub; "
             "p10 over (tuple, head, query)"]
    for lay in mass["layers"]:
        err = lay["teacher_rel_err"]
        lines.append("")
        lines.append(f"{lay['layer']}  {lay['tuples']} of {lay['stored']} tuples x {lay['heads']} heads, "
                     f"{lay['image_queries']} image + {lay['text_queries']} text queries; "
                     f"P@v vs teacher_sub max rel. dev {_f(err and err['max'], '.1e')}")
        img = lay["image"]
        if img is not None:
            cols = [*img["windows"], img["tile"]]
            head = [f"R={w['radius']}" for w in img["windows"]] + [tile_col]
            width = max(7, len(tile_col) + 1)
            lines.append(f"  image queries: text mass {img['text_mass']:.3f}, image mass {img['image_mass']:.3f}, "
                         f"entropy {img['entropy']:.2f} nats")
            lines.append(f"    {'':<14}" + "".join(f"{h:>{width}}" for h in head))
            for label, key, fmt in (("keys", "keys", ".0f"), ("window mass", "mass", ".3f"),
                                    ("text+window", "text_window_mass", ".3f"), ("  p10", "text_window_mass_p10", ".3f"),
                                    ("cos", "cos", ".4f"), ("  p10", "cos_p10", ".4f")):
                lines.append(f"    {label:<14}" + "".join(f"{_f(c[key], fmt):>{width}}" for c in cols))
            if img.get("heads"):
                radii = [w["radius"] for w in img["windows"]]
                lines.append("    per head       entropy   text" + "".join(f"{'R=' + str(r):>7}" for r in radii)
                             + "  (image queries; R: image-key mass in the window)")
                for hd in img["heads"]:
                    lines.append(f"    head {hd['head']:<9}{hd['entropy']:>7.2f}{hd['text_mass']:>7.3f}"
                                 + "".join(f"{hd['window_mass'][str(r)]:>7.3f}" for r in radii))
        txt = lay["text"]
        if txt is not None:
            lines.append(f"  text queries: text mass {txt['text_mass']:.3f}, image mass {txt['image_mass']:.3f}, "
                         f"cos text only {txt['cos']:.4f} (p10 {txt['cos_p10']:.4f})")
    return "\n".join(lines)


def render_mass_plot(mass: dict[str, Any], out_path: Path, title: str = "") -> None:
    """Draw :func:`attention_mass` as a PNG at ``out_path`` (written atomically): mass within radius R and
    restricted-softmax cosine vs R, one line per layer; the tile variant is a star at its radius."""
    import matplotlib  # noqa: PLC0415

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415

    from flux2ttr.atomic import atomic_write  # noqa: PLC0415

    layers = [lay for lay in mass["layers"] if lay["image"] is not None]
    if not layers:
        raise TraceStoreError("no image queries among the read tuples: nothing to plot")
    th, tw = mass["tile"]
    fig, (ax_m, ax_c) = plt.subplots(1, 2, figsize=(11, 4.2))
    colors = plt.get_cmap("viridis")(np.linspace(0, 0.9, len(layers)))
    for color, lay in zip(colors, layers):
        img = lay["image"]
        r = [w["radius"] for w in img["windows"]]
        ax_m.plot(r, [w["text_window_mass"] for w in img["windows"]], "-o", color=color, ms=4, label=lay["layer"])
        ax_m.plot(r, [w["mass"] for w in img["windows"]], "--", color=color, lw=1)
        ax_c.plot(r, [w["cos"] for w in img["windows"]], "-o", color=color, ms=4, label=lay["layer"])
        ax_m.plot([mass["tile_radius"]], [img["tile"]["text_window_mass"]], "*", color=color, ms=11, mec="k")
        ax_c.plot([mass["tile_radius"]], [img["tile"]["cos"]], "*", color=color, ms=11, mec="k")
    ax_m.set_title("image queries: attention mass within radius R\n"
                   f"solid text + window, dashed window only, star {th}x{tw} tiles", fontsize=9)
    ax_m.set_ylabel("share of softmax mass")
    ax_c.set_title("exact softmax on text + window only vs teacher output\n"
                   "cosine over head dim, mean over heads and queries", fontsize=9)
    ax_c.set_ylabel("cosine")
    for ax in (ax_m, ax_c):
        ax.set_xlabel("window radius R (latent tokens; window (2R+1)x(2R+1))")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, ncol=max(1, len(layers) // 12))
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    atomic_write(out_path, lambda tmp: fig.savefig(tmp, format="png", dpi=100))
    plt.close(fig)


def run_inspect(store: Path, *, as_json: bool, heatmap_layer: str | None, out_path: Path | None,
                queries: int, tile: Sequence[int] = MASS_TILE, radius: int = MASS_TILE_RADIUS,
                mass_tuples: int = MASS_TUPLES, mass_plot: Path | None = None, prompt: int | None = None,
                step: int | None = None, token: int | None = None) -> None:
    """The ``flux2ttr inspect`` command: print the summary and the attention-mass table (``mass_tuples``
    tuples per layer, 0 skips it; windows of :data:`MASS_RADII` and ``tile``/``radius`` in latent tokens);
    optionally draw a heatmap PNG and the mass plot PNG ``mass_plot``."""
    import click  # noqa: PLC0415

    if heatmap_layer is not None and out_path is None:
        raise click.ClickException("--heatmap needs --out FILE.png")
    if queries < 1:
        raise click.ClickException("--queries must be at least 1")
    if mass_tuples < 0:
        raise click.ClickException("--mass-tuples must be 0 (no mass report) or more")
    if mass_plot is not None and mass_tuples == 0:
        raise click.ClickException("--mass-plot needs the mass report; drop --mass-tuples 0")
    if len(tile) != 2 or min(tile) < 1 or radius < 0:
        raise click.ClickException(f"--tile needs two sizes >= 1 and --radius one >= 0, got {tuple(tile)} {radius}")
    try:
        ts = TraceStore.open(store)
        summary = summarize(ts)
        if heatmap_layer is not None:
            if heatmap_layer not in ts.layers:
                raise click.ClickException(f"{store}: no layer {heatmap_layer!r}; stored layers: {ts.layers}")
            maps = render_heatmap(ts, heatmap_layer, out_path, queries, prompt=prompt, step=step, token=token)
            summary["heatmap"] = {"layer": heatmap_layer, "out": str(out_path),
                                  "queries": [{"token": m["token"], "pos": m["pos"], "text_mass": m["text_mass"]}
                                              for m in maps]}
        if mass_tuples:
            summary["attention_mass"] = attention_mass(ts, tile=tile, tile_radius=radius, max_tuples=mass_tuples)
            if mass_plot is not None:
                render_mass_plot(summary["attention_mass"], mass_plot, title=f"{store}")
                summary["attention_mass"]["plot"] = str(mass_plot)
    except TraceStoreError as e:
        raise click.ClickException(str(e)) from e
    if as_json:
        click.echo(json.dumps(summary, indent=2, sort_keys=True))
    else:
        click.echo(format_summary(summary))
        if "attention_mass" in summary:
            click.echo("\n" + format_mass(summary["attention_mass"]))
        if "heatmap" in summary:
            click.echo(f"\nheatmap of {len(summary['heatmap']['queries'])} queries of {heatmap_layer} -> {out_path}")
        if mass_plot is not None:
            click.echo(f"\nattention mass plot -> {mass_plot}")
