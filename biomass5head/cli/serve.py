"""Serve a finished run as a local web page and JSON API: choose or drop photos, get the five estimates.

    python -m src.serve --model-dir RUN                       # then open http://127.0.0.1:8000
    python -m src.serve --model-dir RUN --host 0.0.0.0 --port 8080 --device cpu --max-upload-mb 30

The page and the API (`GET /api/health`, `GET /api/model`, `POST /api/predict` with multipart field `files`) are
described in `biomass5head/serve/app.py` and the README. It binds 127.0.0.1 unless told otherwise: other machines
reach it only with --host 0.0.0.0 (or an address of this machine).
"""
from __future__ import annotations

import argparse
import logging

from biomass5head.cli.common import prog, run_command

logger = logging.getLogger(__name__)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog("python -m src.serve"), description=__doc__.splitlines()[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__.split("\n", 2)[2])
    p.add_argument("--model-dir", required=True, help="a finished run folder (5head_best_fold*.pth, config.json)")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=8000, help="port (default 8000; 0: any free port)")
    p.add_argument("--device", default=None, choices=("cuda", "mps", "cpu"), help="default: auto-detect")
    p.add_argument("--tta", action="store_true", help="also average horizontal and vertical flips (3x the work)")
    p.add_argument("--max-upload-mb", type=float, default=20.0, help="largest photo accepted, in MB (default 20)")
    p.add_argument("--no-ood", action="store_true", help="skip the out-of-distribution check (and building its "
                   "reference from the training photos on first start)")
    return p


def serve(args: argparse.Namespace) -> int:
    import uvicorn

    from biomass5head.infer.photo_service import PhotoPredictor
    from biomass5head.serve.app import create_app

    if args.max_upload_mb <= 0:
        raise ValueError(f"--max-upload-mb must be > 0, got {args.max_upload_mb}")
    if not 0 <= args.port <= 65535:
        raise ValueError(f"--port must be 0-65535, got {args.port}")
    predictor = PhotoPredictor(args.model_dir, device=args.device, tta=args.tta, ood=not args.no_ood)
    app = create_app(predictor, max_upload_mb=args.max_upload_mb)
    config = uvicorn.Config(app, host=args.host, port=args.port, log_level="warning")
    server = uvicorn.Server(config)
    original = server.startup

    async def startup(sockets=None):  # log the real address (also with --port 0) once the socket is bound
        await original(sockets=sockets)
        for s in server.servers:
            for sock in s.sockets:
                host, port = sock.getsockname()[:2]
                logger.info("serving %s on http://%s:%d (Ctrl-C to stop)", predictor.run.path,
                            "127.0.0.1" if host == "0.0.0.0" else host, port)

    server.startup = startup
    server.run()
    return 0


def main(argv: list[str] | None = None) -> int:
    return run_command(build_parser(), argv, serve, logger)
