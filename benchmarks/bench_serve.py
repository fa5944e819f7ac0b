"""Latency of the web page's API on this machine: one photo, and 20 photos in one request, through the FastAPI app
(in process, no network), after a warm-up.

    python benchmarks/bench_serve.py --model-dir RUN [--photos DIR] [--repeats 5]

Photos default to the run's test photos (its data folder's test/). Prints the CPU, whether the fold models share one
backbone (a frozen-backbone run encodes each photo once), and the median seconds of each measurement.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model-dir", required=True)
    p.add_argument("--photos", default=None, help="folder of photos (default: the run's data folder test/)")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--device", default="cpu")
    args = p.parse_args()

    import torch
    from fastapi.testclient import TestClient

    from biomass5head.device import cpu_info
    from biomass5head.infer.photo_service import PhotoPredictor
    from biomass5head.serve.app import create_app

    start = time.perf_counter()
    predictor = PhotoPredictor(args.model_dir, device=args.device)
    load = time.perf_counter() - start
    client = TestClient(create_app(predictor, max_upload_mb=50))
    folder = Path(args.photos) if args.photos else Path(predictor.opts.data_dir) / "test"
    photos = sorted(q for q in folder.iterdir() if q.suffix.lower() in (".jpg", ".jpeg", ".png"))
    photos = (photos * 20)[:20]
    files = [("files", (q.name, q.read_bytes(), "image/jpeg")) for q in photos]
    m = predictor.describe()
    print(f"torch {torch.__version__}; CPU: {cpu_info().describe()}; {torch.get_num_threads()} threads")
    print(f"run {args.model_dir}: {m['backbone']} at {m['img_size']} px, grid {m['grid']}, folds {m['folds']}, "
          f"{'one shared backbone' if m['shared_backbone'] else 'a backbone per fold'}; loaded in {load:.1f} s "
          f"(OOD reference: {predictor.ood_status})")

    def timed(batch) -> float:
        t0 = time.perf_counter()
        r = client.post("/api/predict", files=batch)
        assert r.status_code == 200, r.text[:300]
        return time.perf_counter() - t0

    timed(files[:1])  # warm-up: first calls pay one-off allocations
    one = [timed(files[:1]) for _ in range(args.repeats)]
    twenty = [timed(files) for _ in range(max(1, args.repeats // 2))]
    print(f"1 photo:   median {statistics.median(one):.3f} s (min {min(one):.3f}, max {max(one):.3f}; "
          f"{args.repeats} requests, {photos[0].name})")
    print(f"20 photos: median {statistics.median(twenty):.3f} s in one request "
          f"({statistics.median(twenty) / 20:.3f} s per photo)")


if __name__ == "__main__":
    main()
