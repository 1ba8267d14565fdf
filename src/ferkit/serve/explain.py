"""``POST /v1/explain``: the uploaded photo with a Grad-CAM heat map over each face, as PNG.

The image comes as for ``/v1/predict`` (multipart field ``file`` or the raw body) and goes through the same
admission, size and pixel limits. The response is ``image/png``; ``X-Faces`` gives the number of faces and
``X-Explanation`` a JSON list of ``{box, label, score, explained, hottest}`` per face. Explanations need torch
(``pip install 'ferkit[train]'``): without it the route answers 501 with that one line. Included by
:mod:`ferkit.serve.app` (its ``EXTRA_ROUTERS``) behind the same API key, rate limit and query check as the rest.
"""

from __future__ import annotations

import json
import logging
import threading
from typing import Any

from fastapi import APIRouter, Query, Request
from fastapi.responses import Response

from ferkit.serve.upload import Rejected, one_line

log = logging.getLogger(__name__)

router = APIRouter()
# captum attaches hooks to the network for the duration of one attribution: one explanation at a time per process.
_LOCK = threading.Lock()


def _explain(state: Any, data: bytes, name: str, detect: bool, target: str | None) -> tuple[bytes, list[dict]]:
    from ferkit.infer.explain import encode_png

    rec = state.recognizer
    image = rec.load(data, name=name, max_pixels=state.settings.max_pixels)
    with _LOCK:
        ex = rec.explain(image, detect=detect, target=target)
    return encode_png(ex.overlay), ex.to_dict()["faces"]


@router.post(
    "/v1/explain",
    summary="The photo with a heat map of what drove each face's predicted expression (PNG)",
    response_class=Response,
    responses={200: {"content": {"image/png": {}}, "description": "the overlay, PNG"},
               501: {"description": "explanations need torch on the server: pip install 'ferkit[train]'"}},
)
async def explain(
    request: Request,
    detect: bool = Query(True, description="find faces first; false explains the whole image as one face"),
    target: str | None = Query(None, description="explain this class instead of each face's predicted one"),
) -> Response:
    from ferkit.serve.routes import run_upload

    try:
        png, faces = await run_upload(request, _explain, detect, target)
    except ImportError as e:  # torch or captum missing: the server still predicts, it cannot explain
        raise Rejected(501, one_line(str(e)), reason="not_installed") from None
    return Response(png, media_type="image/png",
                    headers={"X-Faces": str(len(faces)), "X-Explanation": json.dumps(faces, separators=(",", ":"))})
