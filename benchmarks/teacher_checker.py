"""How often the trained teacher draws its held-out captions: the caption checker's pass rate of a trained
file (default: the shipped ``teacher.trained_file``) on the first N held-out captions, for every combination of
sampler steps, guidance and schedule shift given. Prints a markdown table (one row per setting).

    python benchmarks/teacher_checker.py --captions 256 --steps 6 --guidance 1.5,2,2.5,3

Not a test: a measurement for choosing the pipeline's sampler settings (see the README's trained-teacher
section). The checker passes one caption in N with a binomial standard error of about sqrt(p(1-p)/N).
"""

from __future__ import annotations

import argparse
import itertools
import json
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from flux2ttr.teachers import scenes
from flux2ttr.teachers import train_teacher as tt
from flux2ttr.teachers.teacher import TeacherConfig
from flux2ttr.teachers.trained import load_trained_teacher, write_trained_teacher


def _floats(text: str) -> list[float]:
    return [float(x) for x in text.split(",")]


def _mus(text: str) -> list[float | None]:
    return [None if x == "auto" else float(x) for x in text.split(",")]


def sweep(file: str, captions: int, steps: list[int], guidance: list[float], mus: list[float | None], *,
          seed: int = 0, batch: int = 16, log=print) -> list[dict[str, Any]]:
    """One row per (steps, guidance, mu): the checker's rates (:func:`flux2ttr.teachers.caption_check.summarize`)
    and the wall seconds of sampling and checking."""
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tcfg = TeacherConfig(kind="trained", trained_file=file, out_dir=str(Path(tmp) / "teacher"))
        write_trained_teacher(tcfg)  # the pipeline's own path: unpack, from_single_file, the exact latent map
        teacher = load_trained_teacher(tcfg)
        for n_steps, g, mu in itertools.product(steps, guidance, mus):
            t0 = time.perf_counter()
            summary, _, _ = tt.evaluate(teacher, scenes.SceneConfig(), captions, steps=n_steps, guidance=g, seed=seed,
                                        batch=batch, mu=mu)
            row = {"steps": n_steps, "guidance": g, "mu": mu, "seconds": round(time.perf_counter() - t0, 1), **summary}
            rows.append(row)
            log(f"| {n_steps} | {g:g} | {'auto' if mu is None else f'{mu:g}'} | {100 * row['pass_rate']:.1f}% | "
                f"{100 * row['clause_colour_rate']:.1f}% | {100 * row['clause_count_rate']:.1f}% | "
                f"{100 * row['strict_rate']:.1f}% | {row['seconds']:.1f} |")
    return rows


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--file", default=TeacherConfig().trained_file, help="trained teacher file (default: shipped)")
    ap.add_argument("--captions", type=int, default=64, help="first N held-out captions")
    ap.add_argument("--steps", default="6", help="comma-separated sampler steps")
    ap.add_argument("--guidance", default="2", help="comma-separated guidance-embedding values")
    ap.add_argument("--mu", default="auto", help="comma-separated schedule shifts (auto: FLUX.2's empirical fit)")
    ap.add_argument("--seed", type=int, default=0, help="noise seed of caption i: seed + i")
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    ap.add_argument("--json", type=Path, default=None, help="also write the rows here")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"caption checker on the first {args.captions} held-out captions of {args.file}")
    print("| steps | guidance | mu | pass | clause colour | clause count | strict | seconds |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    rows = sweep(args.file, args.captions, [int(s) for s in args.steps.split(",")], _floats(args.guidance),
                 _mus(args.mu), seed=args.seed)
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2) + "\n")
    return rows


if __name__ == "__main__":
    main()
