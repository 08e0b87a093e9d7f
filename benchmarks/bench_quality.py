"""CPU time of each quality term per student/teacher image pair, at the default architectures.

No pretrained weights exist here, so each model is built by its real loader from random weights written
in its package's format (``tests/helpers/quality_models.py``): DreamSim ``ensemble`` (three ViT-B/16),
HPSv2's ``ViT-H-14`` (about 1 B parameters; its checkpoint is ~4 GB in a temporary folder, skip it with
``--terms``), pyiqa's ``topiq_nr`` and ``topiq_iaa_res50``, and LPIPS (AlexNet, random backbone). Random
weights cost what trained ones do. Each term runs alone (RMSE/cosine off) on batches of ``--batch`` pairs,
one warm-up call, then ``--repeats`` timed calls; the table prints seconds per pair as median (min-max).
Lower is cheaper; a controller iteration pays it ``group_size`` times.

Usage: ``python benchmarks/bench_quality.py [--px 256 1024] [--batch 1] [--repeats 3] [--terms dreamsim hps ...]``
(needs the extras the test command installs; HPS needs prompts, one per row, which are passed).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch
from timing import noisy, spread  # benchmarks/timing.py (the scripts' folder is on sys.path)

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))  # the random-weight writers (helpers.quality_models)

from flux2ttr.routing.quality import QualityConfig, QualityLoss  # noqa: E402

TERMS = ("rmse_cosine", "lpips", "dreamsim", "hps", "biqa_quality", "biqa_aesthetic")


def _config(term: str, tmp: Path) -> QualityConfig:
    from helpers import quality_models as QM

    off = {"rmse_weight": 0.0, "cosine_weight": 0.0}
    if term == "rmse_cosine":
        return QualityConfig(latent_space=False)
    if term == "lpips":
        return QualityConfig(**off, lpips_weight=1.0)
    if term == "dreamsim":
        return QualityConfig(**off, dreamsim_weight=1.0,
                             dreamsim_cache_dir=str(QM.write_dreamsim_cache(tmp / "dreamsim")))
    if term == "hps":
        QM.write_hps_checkpoint(tmp / "hps.pt", QualityConfig().hps_model)
        return QualityConfig(**off, hps_weight=1.0, hps_checkpoint=str(tmp / "hps.pt"))
    metric = getattr(QualityConfig(), f"{term}_metric")
    QM.write_pyiqa_weights(tmp / f"{metric}.pth", metric)
    return QualityConfig(**off, **{f"{term}_weight": 1.0, f"{term}_weights": str(tmp / f"{metric}.pth")})


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--px", type=int, nargs="+", default=[256, 1024], help="square image sizes (pixels)")
    ap.add_argument("--batch", type=int, default=1, help="image pairs per call")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--terms", nargs="+", default=list(TERMS), choices=TERMS)
    args = ap.parse_args()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; seconds per image pair, "
          f"median (min-max) of {args.repeats}, batch {args.batch}")
    print("| term | build s | " + " | ".join(f"{px}² s/pair" for px in args.px) + " |")
    print("| --- | --- | " + " | ".join("---" for _ in args.px) + " |")
    flagged = False
    for term in args.terms:
        with tempfile.TemporaryDirectory() as d:
            cfg = _config(term, Path(d))  # writes the random-weight files (not timed)
            t0 = time.perf_counter()
            ql = QualityLoss(cfg)  # the real loader: build + load the files
            build = time.perf_counter() - t0
            cells = []
            for px in args.px:
                g = torch.Generator().manual_seed(px)
                t = torch.rand(args.batch, 3, px, px, generator=g)
                s = (t + 0.1 * torch.randn(t.shape, generator=g)).clamp(0, 1)
                prompts = ["a red fox in snow"] * args.batch
                ql(s, t, prompts=prompts)  # warm-up
                times = []
                for _ in range(args.repeats):
                    t1 = time.perf_counter()
                    ql(s, t, prompts=prompts)
                    times.append((time.perf_counter() - t1) / args.batch)
                flagged |= noisy(times)
                cells.append(spread(times))
            print(f"| {term} | {build:.1f} | " + " | ".join(cells) + " |", flush=True)
            del ql
    if flagged:
        print("(some repeats spread more than 1.5x: the machine was busy)")


if __name__ == "__main__":
    main()
