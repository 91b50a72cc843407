"""Video in and out with PyAV: probe uploads, decode inputs, encode H.264 MP4 and thumbnails."""

from __future__ import annotations

import io
import tempfile
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
from PIL import Image

# Containers we accept for uploads, by the format names FFmpeg's demuxers report.
ACCEPTED_FORMATS = {"mov,mp4,m4a,3gp,3g2,mj2", "matroska,webm", "avi", "mpegts"}
ACCEPTED_CONTENT_TYPES = {
    "video/mp4",
    "video/quicktime",
    "video/webm",
    "video/x-matroska",
    "video/x-msvideo",
    "video/mp2t",
}


class InvalidMedia(ValueError):
    """The bytes are not a video we can read; the message says why, for the client."""


@dataclass(frozen=True)
class VideoInfo:
    format: str
    codec: str
    width: int
    height: int
    frames: int
    duration_s: float
    fps: float


def probe_video(data: bytes, *, max_duration_s: float | None = None) -> VideoInfo:
    """Open the container, find a video stream and decode every frame (proves it is playable).

    Decoding everything is bounded by the upload size and duration limits, and it is the only
    honest check: headers can claim anything.
    """
    try:
        with av.open(io.BytesIO(data), mode="r") as container:
            fmt = container.format.name
            if fmt not in ACCEPTED_FORMATS:
                raise InvalidMedia(f"container format {fmt!r} is not a supported video format")
            streams = container.streams.video
            if not streams:
                raise InvalidMedia("no video stream in the file")
            stream = streams[0]
            codec = stream.codec_context.name
            width, height = stream.codec_context.width, stream.codec_context.height
            frames = 0
            last_time = 0.0
            fps = float(stream.average_rate) if stream.average_rate else 0.0
            for frame in container.decode(stream):
                frames += 1
                if frame.time is not None:
                    last_time = max(last_time, float(frame.time))
                if max_duration_s is not None and last_time > max_duration_s:
                    raise InvalidMedia(f"video is longer than {max_duration_s:g} s")
    except InvalidMedia:
        raise
    except (av.error.FFmpegError, ValueError, IndexError) as exc:
        raise InvalidMedia(f"not a readable video: {exc}") from None
    if frames == 0 or width <= 0 or height <= 0:
        raise InvalidMedia("video has no decodable frames")
    duration = last_time + (1.0 / fps if fps else 0.0)
    if max_duration_s is not None and duration > max_duration_s + 1e-6:
        raise InvalidMedia(f"video is longer than {max_duration_s:g} s")
    return VideoInfo(fmt, codec, width, height, frames, round(duration, 3), fps)


def decode_video(data: bytes, *, width: int, height: int, num_frames: int) -> np.ndarray:
    """Decode to uint8 RGB [num_frames, height, width, 3], sampled uniformly over the clip."""
    decoded: list[np.ndarray] = []
    with av.open(io.BytesIO(data), mode="r") as container:
        stream = container.streams.video[0]
        for frame in container.decode(stream):
            decoded.append(frame.to_ndarray(format="rgb24", width=width, height=height))
    if not decoded:
        raise InvalidMedia("video has no decodable frames")
    index = np.linspace(0, len(decoded) - 1, num_frames).round().astype(int)
    return np.stack([decoded[i] for i in index])


def encode_mp4(frames: np.ndarray, fps: int, *, crf: int = 20) -> bytes:
    """H.264 (libx264, yuv420p: what every browser plays) in an MP4 with the index up front."""
    if frames.dtype != np.uint8 or frames.ndim != 4 or frames.shape[-1] != 3:
        raise ValueError(f"expected uint8 [T,H,W,3] frames, got {frames.dtype} {frames.shape}")
    _, height, width, _ = frames.shape
    if width % 2 or height % 2:
        raise ValueError("H.264 yuv420p needs even width and height")
    # A real file, not BytesIO: +faststart moves the index to the front in a second pass that
    # reopens the output by name, and a browser can only start playing early with it up front.
    with tempfile.TemporaryDirectory(prefix="dreamq-encode-") as tmp:
        path = Path(tmp) / "out.mp4"
        _encode_to(path, frames, fps, crf, width, height)
        return path.read_bytes()


def _encode_to(path: Path, frames: np.ndarray, fps: int, crf: int, width: int, height: int) -> None:
    with av.open(str(path), mode="w", format="mp4", options={"movflags": "+faststart"}) as container:
        stream = container.add_stream("libx264", rate=Fraction(fps))
        stream.width = width
        stream.height = height
        stream.pix_fmt = "yuv420p"
        stream.options = {"crf": str(crf), "preset": "veryfast"}
        for array in frames:
            frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(array), format="rgb24")
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode(None):
            container.mux(packet)


def thumbnail_jpeg(frames: np.ndarray, *, max_side: int = 320, quality: int = 85) -> bytes:
    """The middle frame: the first is often the least representative of a moving subject."""
    image = Image.fromarray(frames[len(frames) // 2])
    image.thumbnail((max_side, max_side))
    out = io.BytesIO()
    image.save(out, format="JPEG", quality=quality)
    return out.getvalue()
