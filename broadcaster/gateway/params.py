"""Livepeer AI requests as wire parameters, checked before any orchestrator is asked.

The mapping keeps ai-runner's names (they are the wire's names too); what the
wire does not carry (`safety_check`, `image_guidance_scale`, `loras`) stays
at the gateway. The same torch-free check the orchestrator and the session
run (`pipelines.requests.output_shape`) runs here first, so a bad upload
(an image whose sides are not multiples of 8, strength x steps under one
step, too many pixels) is a 400 before any connection or payment.
"""

from __future__ import annotations

from broadcaster.gateway.errors import invalid
from broadcaster.gateway.requests import (
    GatewayRequest,
    ImageToImageRequest,
    ImageToVideoRequest,
    TextToImageRequest,
)
from pipelines.errors import InvalidRequest
from pipelines.requests import output_shape
from protocol.messages import (
    ImageToImageParams,
    ImageToVideoParams,
    JobParams,
    TextToImageParams,
)


def protocol_params(request: GatewayRequest) -> JobParams:
    """The wire parameters of a request, field by field."""
    if isinstance(request, TextToImageRequest):
        return TextToImageParams(
            prompt=request.prompt,
            negative_prompt=request.negative_prompt,
            width=request.width,
            height=request.height,
            guidance_scale=request.guidance_scale,
            num_inference_steps=request.num_inference_steps,
            seed=request.seed,
            num_images_per_prompt=request.num_images_per_prompt,
        )
    if isinstance(request, ImageToImageRequest):
        return ImageToImageParams(
            prompt=request.prompt,
            image=request.image.data,
            negative_prompt=request.negative_prompt,
            strength=request.strength,
            guidance_scale=request.guidance_scale,
            num_inference_steps=request.num_inference_steps,
            seed=request.seed,
            num_images_per_prompt=request.num_images_per_prompt,
        )
    if isinstance(request, ImageToVideoRequest):
        return ImageToVideoParams(
            image=request.image.data,
            width=request.width,
            height=request.height,
            fps=request.fps,
            motion_bucket_id=request.motion_bucket_id,
            noise_aug_strength=request.noise_aug_strength,
            num_inference_steps=request.num_inference_steps,
            seed=request.seed,
            num_frames=request.num_frames,
        )
    raise TypeError(f"no wire parameters for {type(request).__name__}")


def checked_params(request: GatewayRequest) -> JobParams:
    """`protocol_params`, or the 400 `invalid_request` an orchestrator would answer."""
    params = protocol_params(request)
    try:
        output_shape(params)
    except InvalidRequest as exc:
        raise invalid(str(exc)) from None
    return params
