"""The gateway's OpenAPI 3.1 document, served at /openapi.json.

The three Livepeer routes keep ai-runner's schemas (names, defaults,
required fields); the job and stream routes are this gateway's own.
"""

from __future__ import annotations

from typing import Any

from broadcaster.gateway.requests import DEFAULT_NUM_FRAMES, DEFAULT_PREVIEW_EVERY

_ERR = {"$ref": "#/components/schemas/HTTPError"}


def _json(schema: dict[str, Any]) -> dict[str, Any]:
    return {"application/json": {"schema": schema}}


def _errors(*codes: int) -> dict[str, Any]:
    text = {
        400: "Bad Request",
        401: "Unauthorized",
        403: "Forbidden (another site's page, or a non-loopback host without a token)",
        404: "Not Found",
        413: "Request Entity Too Large",
        429: "Too Many Requests (jobs in flight for this client)",
        500: "Internal Server Error",
        503: "Service Unavailable",
    }
    return {str(c): {"description": text[c], "content": _json(_ERR)} for c in codes}


def _prop(kind: str, description: str, default: Any = None, **extra: Any) -> dict[str, Any]:
    p: dict[str, Any] = {"type": kind, "description": description, **extra}
    if default is not None:
        p["default"] = default
    return p


_COMMON = {
    "model_id": _prop("string", "Model ID; empty picks the first offered model.", ""),
    "safety_check": _prop(
        "boolean", "No safety checker runs here: true is refused (400), send false.", False
    ),
    "seed": _prop("integer", "Seed for random number generation.", minimum=0),
    "preview_every": _prop(
        "integer", "stepstream: a preview every N steps.", DEFAULT_PREVIEW_EVERY, minimum=1
    ),
}
_TEXT = {
    "prompt": _prop("string", "Text prompt to guide image generation."),
    "negative_prompt": _prop("string", "What to exclude from the image.", ""),
    "loras": _prop("string", "Not supported here; must be empty.", ""),
    "guidance_scale": _prop("number", "How closely to follow the prompt.", 7.5),
    "num_images_per_prompt": _prop("integer", "Number of images to generate.", 1),
}
_IMAGE = {"image": {"type": "string", "format": "binary", "description": "The input image."}}


def _body(required: list[str], props: dict[str, Any]) -> dict[str, Any]:
    return {"type": "object", "required": required, "properties": props}


SCHEMAS: dict[str, Any] = {
    "TextToImageParams": _body(
        ["prompt"],
        {
            **_COMMON,
            **_TEXT,
            "height": _prop("integer", "Image height in pixels.", 576),
            "width": _prop("integer", "Image width in pixels.", 1024),
            "num_inference_steps": _prop("integer", "Denoising steps.", 50),
        },
    ),
    "Body_image_to_image": _body(
        ["prompt", "image"],
        {
            **_IMAGE,
            **_COMMON,
            **_TEXT,
            "strength": _prop("number", "Degree of transformation (0 to 1).", 0.8),
            "image_guidance_scale": _prop(
                "number", "For instruct-pix2pix, which no model here is: only 1.5 is accepted.", 1.5
            ),
            "num_inference_steps": _prop("integer", "Denoising steps.", 100),
        },
    ),
    "Body_image_to_video": _body(
        ["image"],
        {
            **_IMAGE,
            **_COMMON,
            "height": _prop("integer", "Video height in pixels.", 576),
            "width": _prop("integer", "Video width in pixels.", 1024),
            "fps": _prop("integer", "Frames per second of the video.", 6),
            "motion_bucket_id": _prop("integer", "Amount of motion.", 127),
            "noise_aug_strength": _prop("number", "Noise added to the input image.", 0.02),
            "num_inference_steps": _prop("integer", "Denoising steps.", 25),
            "num_frames": _prop(
                "integer", "stepstream: frames in the video.", DEFAULT_NUM_FRAMES, minimum=1
            ),
        },
    ),
    "Media": _body(
        ["url", "seed", "nsfw"],
        {
            "url": _prop("string", "Where the gateway serves the output (PNG or MP4)."),
            "seed": _prop("integer", "The seed used."),
            "nsfw": _prop("boolean", "Whether the output was flagged."),
        },
    ),
    "ImageResponse": _body(
        ["images"],
        {"images": {"type": "array", "items": {"$ref": "#/components/schemas/Media"}}},
    ),
    "APIError": _body(
        ["message"],
        {
            "message": _prop("string", "What went wrong, for people."),
            "code": _prop("string", "What went wrong, for programs (stepstream)."),
        },
    ),
    "HTTPError": _body(
        ["error", "detail"],
        {
            "error": {"$ref": "#/components/schemas/APIError"},
            "detail": _body(
                ["msg"], {"msg": _prop("string", "The same message, in ai-runner's shape.")}
            ),
        },
    ),
    "Offer": _body(
        ["pipeline", "model_id", "price_per_pixel_step_wei"],
        {
            "pipeline": _prop("string", "A pipeline route."),
            "model_id": _prop("string", "A model offered for it."),
            "price_per_pixel_step_wei": _prop(
                "string", 'The cheapest price, exact: "95367" or "4768371/50".'
            ),
            "orchestrators": _prop("integer", "How many orchestrators offer it."),
            "warm": _prop("integer", "How many of them hold it loaded."),
            "within_max_price": _prop("boolean", "Whether the gateway's --max-price allows it."),
        },
    ),
    "JobSubmitted": _body(
        ["job_id"],
        {
            "job_id": _prop("string", "The job's id."),
            "status_url": _prop("string", "GET: the job's state and result."),
            "events_url": _prop("string", "GET: the job's events as Server-Sent Events."),
            "ws_url": _prop("string", 'WebSocket: the job\'s events; send {"type":"cancel"}.'),
        },
    ),
}


def _livepeer(summary: str, body: dict[str, Any], op: str) -> dict[str, Any]:
    return {
        "post": {
            "summary": summary,
            "operationId": op,
            "requestBody": {"required": True, "content": body},
            "responses": {
                "200": {
                    "description": "Successful Response",
                    "content": _json({"$ref": "#/components/schemas/ImageResponse"}),
                },
                **_errors(400, 401, 403, 413, 429, 500, 503),
            },
            "security": [{"HTTPBearer": []}],
        }
    }


def _form(name: str) -> dict[str, Any]:
    return {"multipart/form-data": {"schema": {"$ref": f"#/components/schemas/{name}"}}}


_JOB_ID = {"name": "job_id", "in": "path", "required": True, "schema": {"type": "string"}}


def openapi_document() -> dict[str, Any]:
    t2i = _json({"$ref": "#/components/schemas/TextToImageParams"})
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "stepstream gateway",
            "version": "0.1.0",
            "description": "The Livepeer AI API, with live previews of every job.",
        },
        "paths": {
            "/text-to-image": _livepeer("Text To Image", t2i, "text_to_image"),
            "/image-to-image": _livepeer(
                "Image To Image", _form("Body_image_to_image"), "image_to_image"
            ),
            "/image-to-video": _livepeer(
                "Image To Video", _form("Body_image_to_video"), "image_to_video"
            ),
            "/jobs/{pipeline}": {
                "post": {
                    "summary": "Submit a job and return at once",
                    "operationId": "submit_job",
                    "parameters": [
                        {
                            "name": "pipeline",
                            "in": "path",
                            "required": True,
                            "schema": {
                                "type": "string",
                                "enum": ["text-to-image", "image-to-image", "image-to-video"],
                            },
                        },
                        {
                            "name": "wait_for_subscriber",
                            "in": "query",
                            "required": False,
                            "description": "Start only once a stream subscribes (30 s at most).",
                            "schema": {"type": "boolean"},
                        },
                    ],
                    "requestBody": {
                        "required": True,
                        "content": {
                            **t2i,
                            "multipart/form-data": {
                                "schema": {
                                    "oneOf": [
                                        {"$ref": "#/components/schemas/Body_image_to_image"},
                                        {"$ref": "#/components/schemas/Body_image_to_video"},
                                    ]
                                }
                            },
                        },
                    },
                    "responses": {
                        "202": {
                            "description": "Accepted",
                            "content": _json({"$ref": "#/components/schemas/JobSubmitted"}),
                        },
                        **_errors(400, 401, 403, 404, 429),
                    },
                    "security": [{"HTTPBearer": []}],
                }
            },
            "/jobs/{job_id}": {
                "get": {
                    "summary": "The job's state",
                    "operationId": "job_status",
                    "parameters": [_JOB_ID],
                    "responses": {
                        "200": {"description": "The job", "content": _json({"type": "object"})},
                        **_errors(401, 404),
                    },
                },
                "delete": {
                    "summary": "Cancel the job",
                    "operationId": "cancel_job",
                    "parameters": [_JOB_ID],
                    "responses": {
                        "202": {"description": "Cancelling", "content": _json({"type": "object"})},
                        **_errors(401, 404),
                    },
                },
            },
            "/jobs/{job_id}/events": {
                "get": {
                    "summary": "The job's events as Server-Sent Events",
                    "operationId": "job_events",
                    "parameters": [
                        _JOB_ID,
                        {
                            "name": "Last-Event-ID",
                            "in": "header",
                            "required": False,
                            "description": "Resume after this event id.",
                            "schema": {"type": "integer"},
                        },
                    ],
                    "responses": {
                        "200": {
                            "description": "accepted, orchestrator_changed, progress, preview, "
                            "payment, then result or error",
                            "content": {"text/event-stream": {"schema": {"type": "string"}}},
                        },
                        **_errors(401, 404),
                    },
                }
            },
            "/offers": {
                "get": {
                    "summary": "Pipelines, models and prices on offer now",
                    "operationId": "offers",
                    "responses": {
                        "200": {
                            "description": "The offers",
                            "content": _json(
                                _body(
                                    ["offers"],
                                    {
                                        "offers": {
                                            "type": "array",
                                            "items": {"$ref": "#/components/schemas/Offer"},
                                        }
                                    },
                                )
                            ),
                        }
                    },
                }
            },
            "/health": {
                "get": {
                    "summary": "OK, or 503 degraded when no orchestrator is reachable",
                    "operationId": "health",
                    "responses": {
                        "200": {"description": "OK", "content": _json({"type": "object"})},
                        "503": {"description": "degraded", "content": _json({"type": "object"})},
                    },
                }
            },
            "/outputs/{key}": {
                "get": {
                    "summary": "A stored output",
                    "operationId": "output",
                    "parameters": [{**_JOB_ID, "name": "key"}],
                    "responses": {
                        "200": {
                            "description": "The output",
                            "content": {
                                "image/png": {"schema": {"type": "string", "format": "binary"}},
                                "image/jpeg": {"schema": {"type": "string", "format": "binary"}},
                                "video/mp4": {"schema": {"type": "string", "format": "binary"}},
                            },
                        },
                        **_errors(404),
                    },
                }
            },
        },
        "components": {
            "schemas": SCHEMAS,
            "securitySchemes": {"HTTPBearer": {"type": "http", "scheme": "bearer"}},
        },
    }
