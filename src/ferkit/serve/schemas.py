"""The response bodies of the HTTP API as pydantic models: they are what ``/openapi.json`` describes and what the
routes send (FastAPI serialises each response through its ``response_model``)."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field


class _Open(BaseModel):
    # New fields added by the library (e.g. a face's track in videos) pass through rather than being dropped.
    model_config = ConfigDict(extra="allow")


class Error(BaseModel):
    """Every error response."""

    detail: str = Field(description="one line saying what is wrong and, where it helps, what to send instead")


class FaceOut(_Open):
    box: list[int] = Field(description="x, y, width, height in the image's pixels", min_length=4, max_length=4)
    det_score: float | None = Field(None, description="the face detector's confidence (absent without detection)")
    label: str = Field(description="the most probable expression, or 'uncertain' when its score is below min_score")
    score: float = Field(description="its probability")
    scores: dict[str, float] = Field(description="probability of every class; they sum to 1")


class ImageSize(BaseModel):
    width: int
    height: int


class Prediction(_Open):
    """``POST /v1/predict``: the same JSON as ``ferkit predict --format json`` plus the model and the image size.

    An upload with several frames (animated GIF, multi-page TIFF) also carries ``frames_total`` and a ``note``
    saying that only the first frame was read (absent otherwise, like ``frame`` for photos)."""

    model: str = Field(description="the model that answered (a bundled name or a file name)")
    classes: list[str]
    image: ImageSize = Field(description="the size the boxes refer to")
    faces: list[FaceOut] = Field(description="largest face first; empty when there is none")
    time_ms: float = Field(description="time spent on this request in the server")


class Health(BaseModel):
    status: str = Field(description="'ok' while the process is up")
    model_loaded: bool
    in_flight: int = Field(description="requests being read, waiting or running in this worker")


class Ready(BaseModel):
    status: str = Field(description="'ready' once the model is loaded and a warm-up inference ran")
    model: str
    classes: list[str]


class ModelInfo(_Open):
    name: str
    arch: str
    classes: list[str]
    input_size: int
    val_accuracy: float | None = None
    val_split: str | None = None
    metrics: dict[str, float | int | str] = {}


class LoadedModel(ModelInfo):
    backend: str
    version: str = Field(description="first 12 hex digits of the model file's SHA-256")


class Limits(_Open):
    max_upload_bytes: int
    max_pixels: int
    max_concurrency: int
    max_queue: int
    rate_limit_per_s: float | None = Field(description="requests per second per client, None when off")
    auth: bool = Field(description="whether /v1/* needs an API key")


class Models(BaseModel):
    """``GET /v1/models``."""

    loaded: LoadedModel
    bundled: list[ModelInfo]
    limits: Limits


#: The error responses every protected endpoint may give, for the OpenAPI description.
AUTH_RESPONSES: dict[int | str, dict] = {
    401: {"model": Error, "description": "no API key sent (the server has keys: see --api-keys)"},
    403: {"model": Error, "description": "the API key is not one of the server's"},
    429: {"model": Error, "description": "over the rate limit for this key or address (see Retry-After)"},
}
