"""What Luma's clients send to /dream-machine/v1, and how it maps onto a dreamq job.

Two kinds of refusal, as the clients expect them:
- 422 (UnprocessableEntityError): the body does not have the documented shape (a wrong type, an
  unknown field, a value outside the documented set). The pydantic models below say so.
- 400 (BadRequestError): a well-formed request this server cannot honour: an unknown model name,
  a missing prompt, an option the mapped dreamq model cannot do (loop, keyframes, concepts, a
  resolution or duration outside its manifest's limits). Never a silent change.

Sizes: `resolution` names the short side (`540p` -> 540 px, `4k` -> 2160 px) and `aspect_ratio`
the shape, so `540p` at 16:9 is 960x540, as on Luma. Left out, each comes from the model's own
defaults (the demo model's 128x128), because Luma's default (720p) is beyond what a small model
allows; a size is rounded to the model's `multiple_of` (at least 2, for H.264). `duration`
(`5s`) becomes that many seconds of frames at the model's default frame rate.
"""

from __future__ import annotations

import re
from typing import Annotated, Any, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, field_validator

from app.jobs.submit import FALLBACK_DEFAULTS
from app.outbound.addresses import url_syntax

AspectRatio = Literal["1:1", "16:9", "9:16", "4:3", "3:4", "21:9", "9:21"]
ModifyMode = Literal[
    "adhere_1", "adhere_2", "adhere_3", "flex_1", "flex_2", "flex_3", "reimagine_1", "reimagine_2", "reimagine_3"
]
_RESOLUTION = re.compile(r"^(?:(\d{2,4})p|4k)$")
_DURATION = re.compile(r"^(\d{1,3})s$")
MAX_DURATION_S = 60


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid", str_strip_whitespace=True, allow_inf_nan=False)


Url = Annotated[str, Field(min_length=1, max_length=2048)]


class ImageRef(_Body):
    type: Literal["image"]
    url: Url

    _url = field_validator("url")(url_syntax)


class GenerationRef(_Body):
    type: Literal["generation"]
    id: str = Field(min_length=1, max_length=100)


Frame = Annotated[Union[ImageRef, GenerationRef], Field(discriminator="type")]


class Keyframes(_Body):
    frame0: Optional[Frame] = None
    frame1: Optional[Frame] = None


class Concept(_Body):
    key: str = Field(min_length=1, max_length=100)


class _Submission(_Body):
    model: str = Field(min_length=1, max_length=100, description="A name of the admin's table (ray-2, ...)")
    prompt: Optional[str] = Field(None, max_length=5000)
    callback_url: Optional[Url] = None

    _callback = field_validator("callback_url")(url_syntax)


class VideoCreate(_Submission):
    generation_type: Optional[Literal["video"]] = None
    aspect_ratio: Optional[AspectRatio] = None
    resolution: Optional[str] = Field(None, max_length=10, description="540p, 720p, 1080p, 4k or <N>p")
    duration: Optional[str] = Field(None, max_length=10, description="Seconds, e.g. 5s")
    loop: Optional[bool] = None
    keyframes: Optional[Keyframes] = None
    concepts: Optional[list[Concept]] = Field(None, max_length=10)

    @field_validator("resolution")
    @classmethod
    def _resolution(cls, value: Optional[str]) -> Optional[str]:
        if value is not None and not _RESOLUTION.fullmatch(value):
            raise ValueError("must be 540p, 720p, 1080p, 4k or another <N>p")
        return value

    @field_validator("duration")
    @classmethod
    def _duration(cls, value: Optional[str]) -> Optional[str]:
        match = _DURATION.fullmatch(value) if value is not None else None
        if value is not None and (match is None or not 1 <= int(match.group(1)) <= MAX_DURATION_S):
            raise ValueError(f"must be a whole number of seconds from 1s to {MAX_DURATION_S}s, e.g. 5s")
        return value


class Media(_Body):
    url: Url

    _url = field_validator("url")(url_syntax)


class VideoModify(_Submission):
    generation_type: Literal["modify_video"]
    media: Media
    mode: ModifyMode
    first_frame: Optional[Media] = None


class ListQuery(_Body):
    limit: int = Field(10, ge=1, le=100)
    offset: int = Field(0, ge=0, le=1_000_000)


class Unsupported(ValueError):
    """A well-formed option the mapped model cannot honour: (field, reason) for a 400."""

    def __init__(self, field: str, reason: str):
        super().__init__(f"{field}: {reason}")
        self.field, self.reason = field, reason


def unsupported_options(body: VideoCreate | VideoModify, served_by: str) -> None:
    """Options no dreamq model runs today: refused by name rather than dropped. Raises Unsupported."""
    if isinstance(body, VideoCreate):
        if body.loop:
            raise Unsupported("loop", f"looping videos are not supported by {served_by}")
        if body.keyframes is not None and (body.keyframes.frame0 or body.keyframes.frame1):
            raise Unsupported(
                "keyframes", f"keyframes (start or end frames) are not supported by {served_by}; send a prompt only"
            )
        if body.concepts:
            raise Unsupported("concepts", f"concepts are not supported by {served_by}")
    elif body.first_frame is not None:
        raise Unsupported(
            "first_frame", f"a first_frame image is not supported by {served_by}; the prompt says what to change"
        )
    if not body.prompt:
        raise Unsupported("prompt", "a prompt is required")
    if len(body.prompt) < 3:
        raise Unsupported("prompt", "is too short, minimum length is 3 characters")


def _defaults(manifest: dict[str, Any]) -> tuple[dict[str, int], dict[str, dict]]:
    info = manifest.get("model", {})
    return {**FALLBACK_DEFAULTS, **info.get("defaults", {})}, info.get("limits", {})


def _round_to(value: float, multiple: int) -> int:
    return max(multiple, int(round(value / multiple)) * multiple)


def size_for(manifest: dict[str, Any], resolution: str | None, aspect_ratio: str | None) -> tuple[int, int] | None:
    """(width, height) for a resolution and aspect ratio on this model version; None = its default."""
    if resolution is None and aspect_ratio is None:
        return None
    defaults, limits = _defaults(manifest)
    if resolution is None:
        short = min(defaults["width"], defaults["height"])
    else:
        short = 2160 if resolution == "4k" else int(resolution[:-1])
    if aspect_ratio is None:
        ratio = defaults["width"] / defaults["height"]
    else:
        across, down = (int(n) for n in aspect_ratio.split(":"))
        ratio = across / down
    width, height = (short * ratio, short) if ratio >= 1 else (short, short / ratio)
    return (
        _round_to(width, max(2, limits.get("width", {}).get("multiple_of") or 2)),
        _round_to(height, max(2, limits.get("height", {}).get("multiple_of") or 2)),
    )


def frames_for(manifest: dict[str, Any], duration: str | None) -> tuple[int, int] | None:
    """(num_frames, fps) for a duration at the model's default frame rate; None = its default."""
    if duration is None:
        return None
    fps = int(_defaults(manifest)[0]["fps"])
    return int(duration[:-1]) * fps, fps


def modify_params(manifest: dict[str, Any], info) -> dict[str, int]:
    """Output size, length and frame rate of a modify-video job: the input's (a `VideoInfo`),
    brought within the model's limits keeping its aspect ratio and duration."""
    defaults, limits = _defaults(manifest)

    def bound(name: str) -> tuple[float, float]:
        spec = limits.get(name, {})
        return spec.get("min", 1), spec.get("max", float("inf"))

    (wmin, wmax), (hmin, hmax) = bound("width"), bound("height")
    scale = min(1.0, wmax / info.width, hmax / info.height)
    scale = max(scale, wmin / info.width, hmin / info.height)
    width = _round_to(info.width * scale, max(2, limits.get("width", {}).get("multiple_of") or 2))
    height = _round_to(info.height * scale, max(2, limits.get("height", {}).get("multiple_of") or 2))
    fmin, fmax = bound("num_frames")
    num_frames = int(min(max(info.frames, fmin), fmax))
    rate = info.fps or defaults["fps"]
    pmin, pmax = bound("fps")
    fps = int(min(max(round(rate * num_frames / info.frames), pmin), pmax))
    return {"width": width, "height": height, "num_frames": num_frames, "fps": fps}
