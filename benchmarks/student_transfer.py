"""How distilled students hold on traces they were not trained on: another resolution, another teacher
setting, another capture. Prints per-layer held-out metrics of ARTIFACT on every tuple of STORE.

    python benchmarks/student_transfer.py artifacts/flux2_ttr.safetensors traces/capture_512.zarr

Not a test: a measurement for choosing what to capture at (see the README's student section).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from flux2ttr.distill.trainer import validation_metrics
from flux2ttr.students.artifacts import load_students
from flux2ttr.traces.loader import read_batch
from flux2ttr.traces.store import TraceStore


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("artifact", type=Path)
    ap.add_argument("store", type=Path)
    ap.add_argument("--max-tuples", type=int, default=64, help="tuples per layer (all when fewer)")
    ap.add_argument("--batch", type=int, default=4)
    args = ap.parse_args()
    art = load_students(args.artifact)
    store = TraceStore.open(args.store)
    layers = [k for k in store.layers if k in art.layers]
    print(f"students {args.artifact} ({art.header['hkr']['mode'] if 'mode' in art.header['hkr'] else 'hkr'} mode) "
          f"on {args.store}: {len(layers)} layers")
    print("| layer | grid | tuples | cos | image-query cos | text-query cos | NMSE | p95 rel err | artifact val cos |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for key in layers:
        batches, grids, n_tuples = [], set(), 0
        for n_tokens, count in store.groups(key):
            rows = list(range(count))[: max(0, args.max_tuples - n_tuples)]
            for s in range(0, len(rows), args.batch):
                b = read_batch(store, key, n_tokens, rows[s:s + args.batch])
                grids.add(f"{int(b['h'][0])}x{int(b['w'][0])}")
                batches.append(b)
            n_tuples += len(rows)
        m = validation_metrics(art.layers[key], batches)
        offline = art.metrics.get(key, {}).get("val_cos_sim", float("nan"))
        print(f"| {key} | {','.join(sorted(grids))} | {m['val_tuples']} | {m['val_cos_sim']:.5f} | "
              f"{m.get('val_image_cos_sim', float('nan')):.5f} | {m.get('val_text_cos_sim', float('nan')):.5f} | "
              f"{m['val_nmse']:.5f} | {m['val_p95_err']:.4f} | {offline:.5f} |")


if __name__ == "__main__":
    main()
