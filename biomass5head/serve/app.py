"""The local web page and its JSON API over a finished run (FastAPI; run by `python -m src.serve`).

- `GET /`: the page (plain HTML, CSS and JS from `serve/static/`, nothing from outside the machine).
- `GET /api/health`: `{"status": "ok"}` once the run is loaded.
- `GET /api/model`: backbone, folds, img-size, grid, training date, OOF score when evaluated, the OOD reference.
- `POST /api/predict`: multipart field `files` (one or more photos), optional form field `area_m2` (default 0.21).
  Answers `{"results": [...]}`, one entry per file in order: its `name` and either the estimates (`grams`,
  `kg_per_ha`, `range` [min, max] over the fold models (and flips with TTA), `per_fold`, `tile_weights`, `ood`,
  `note`) or `error` with the HTTP `status` it deserves. The answer is 200 when at least one file succeeded, else
  the first file's error status (400 empty, 413 over --max-upload-mb, 415 not an image, 422 truncated or corrupt).
"""
from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Annotated

from fastapi import FastAPI, File, Form, UploadFile
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import FileResponse, JSONResponse
from fastapi.staticfiles import StaticFiles

from biomass5head.constants import TARGETS
from biomass5head.infer.photo_service import QUADRAT_M2, PhotoError, PhotoPredictor, kg_per_ha

logger = logging.getLogger(__name__)
STATIC = Path(__file__).with_name("static")


def _finite(value):
    """JSON has no NaN or infinity: such a number (a broken model, a zero threshold) becomes null."""
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_finite(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def _result(name: str, out: dict, note: str | None, size: tuple[int, int], area: float, grid) -> dict:
    names = list(TARGETS)
    rows, cols = grid
    return {
        "name": name, "width": size[0], "height": size[1], "note": note,
        "grams": dict(zip(names, map(float, out["grams"]), strict=True)),
        "kg_per_ha": {t: kg_per_ha(g, area) for t, g in zip(names, out["grams"], strict=True)},
        "range": {t: [float(out["each"][:, i].min()), float(out["each"][:, i].max())] for i, t in enumerate(names)},
        "per_fold": {str(f): dict(zip(names, map(float, g), strict=True))
                     for f, g in zip(out["folds"], out["per_fold"], strict=True)},
        "tile_weights": {"grid": [rows, cols], "left": out["tile_weights"][0].round(5).tolist(),
                         "right": out["tile_weights"][1].round(5).tolist()},
        "ood": out["ood"], "area_m2": area,
    }


def create_app(predictor: PhotoPredictor, max_upload_mb: float = 20.0) -> FastAPI:
    app = FastAPI(title="biomass5head", docs_url="/api/docs", redoc_url=None, openapi_url="/api/openapi.json")
    limit = int(max_upload_mb * 1024 * 1024)
    grid = tuple(predictor.tiles.grid)

    @app.get("/", include_in_schema=False)
    def page():
        return FileResponse(STATIC / "index.html")

    @app.get("/api/health")
    def health():
        return {"status": "ok"}

    @app.get("/api/model")
    def model():
        return predictor.describe()

    @app.post("/api/predict")
    async def predict(files: Annotated[list[UploadFile] | None, File()] = None,
                      area_m2: Annotated[float, Form()] = QUADRAT_M2):
        if not files:
            return JSONResponse({"detail": "no photos: send one or more in the multipart field `files`",
                                 "results": []}, status_code=400)
        if not (math.isfinite(area_m2) and area_m2 > 0):
            return JSONResponse({"detail": f"area_m2 must be a positive number of square metres, got {area_m2}",
                                 "results": []}, status_code=400)
        results = []
        for upload in files:
            name = upload.filename or "(unnamed file)"
            data = await upload.read(limit + 1)
            try:
                if len(data) > limit:
                    raise PhotoError(f"{name}: over the {max_upload_mb:g} MB upload limit (--max-upload-mb)", 413)
                photo, note = await run_in_threadpool(predictor.decode, name, data)
                out = await run_in_threadpool(predictor.predict, photo)
                results.append(_finite(_result(name, out, note, (photo.shape[1], photo.shape[0]), area_m2, grid)))
            except PhotoError as exc:
                logger.warning("%s", exc)
                results.append({"name": name, "error": str(exc), "status": exc.status})
        if all("error" in r for r in results):
            return JSONResponse({"detail": results[0]["error"], "results": results}, status_code=results[0]["status"])
        return {"results": results}

    app.mount("/static", StaticFiles(directory=STATIC), name="static")
    return app
