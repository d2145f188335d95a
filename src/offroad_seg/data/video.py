"""Videos in and out through PyAV (FFmpeg): probe, stream frames, write frames atomically.

Off-road runs are whole drives: tens of thousands of frames. `iter_frames` decodes one frame at a
time (memory bounded by the decoder's few reference frames, never the whole video), and
`VideoWriter` encodes as frames come. PyAV is optional (`pip install 'offroad-seg[video]'`) and
imported only when a video is touched, so image-only installs never need FFmpeg.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from types import ModuleType, TracebackType

import numpy as np

from offroad_seg.core.atomic import temp_path
from offroad_seg.errors import ConfigError, DataError

# Containers VideoWriter can write, by extension, and the FFmpeg muxer of each.
_MUXERS = {".mp4": "mp4", ".m4v": "mp4", ".mov": "mov", ".mkv": "matroska"}
# Encoders VideoWriter tries, best first: H.264 plays everywhere; MPEG-4 part 2 is FFmpeg's
# built-in fallback for builds without libx264.
ENCODERS = ("libx264", "mpeg4")
# libx264 quality (constant rate factor; lower is better, 18 is near-transparent) and speed.
_X264_OPTIONS = {"crf": "20", "preset": "veryfast"}
# mpeg4 has no CRF mode: bits per pixel per frame, about what it needs to look like crf 20.
_MPEG4_BITS_PER_PIXEL = 0.3


def _av(doing: str = "reading") -> ModuleType:
    try:
        import av
    except ImportError as e:
        raise ConfigError(f"{doing} video needs PyAV: pip install 'offroad-seg[video]'") from e
    return av


def _reason(error: BaseException) -> str:
    """FFmpeg's own words without the path it repeats ('Invalid data found when ...')."""
    return getattr(error, "strerror", None) or str(error)


@dataclass(frozen=True)
class VideoInfo:
    """A video stream's header. `frames` is the container's count when it has one, else
    duration x fps (an estimate: the true count is known only after decoding)."""

    frames: int
    fps: float
    width: int
    height: int
    pix_fmt: str = ""  # FFmpeg's pixel format of the stream, e.g. yuv420p, gray


@dataclass(frozen=True)
class Frame:
    """One decoded frame: its index in the video (0-based, every frame counted), its pixels
    and its presentation time from the start of the stream."""

    index: int
    rgb: np.ndarray  # (H, W, 3) uint8
    time_s: float


def _open(path: Path):
    """(container, first video stream); one-line DataError when there is none to read."""
    av = _av()
    try:
        container = av.open(str(path))
    except FileNotFoundError as e:
        raise DataError(f"{path}: file not found") from e
    except (av.error.FFmpegError, OSError, ValueError) as e:
        raise DataError(f"{path}: not a readable video ({_reason(e)})") from e
    if not container.streams.video:
        container.close()
        raise DataError(f"{path}: no video stream")
    stream = container.streams.video[0]
    if not (stream.codec_context.width and stream.codec_context.height):
        container.close()
        raise DataError(f"{path}: video stream without a frame size; not a readable video")
    return container, stream


def _fps(stream) -> float:
    rate = stream.average_rate or stream.guessed_rate or stream.base_rate
    return float(rate) if rate else 0.0


def video_info(path: str | Path) -> VideoInfo:
    """Frame count (or estimate), frame rate, size and pixel format, from the header only."""
    path = Path(path)
    container, stream = _open(path)
    with container:
        fps = _fps(stream)
        frames = stream.frames
        if not frames:
            if stream.duration and stream.time_base:
                seconds = float(stream.duration * stream.time_base)
            else:
                seconds = (container.duration or 0) / 1_000_000  # AV_TIME_BASE units
            frames = round(seconds * fps)
        cc = stream.codec_context
        return VideoInfo(int(frames), fps, cc.width, cc.height, cc.format.name if cc.format else "")


def iter_frames(path: str | Path, stride: int = 1) -> Iterator[Frame]:
    """Decode every `stride`-th frame (indices 0, stride, 2*stride, ...) as RGB, one at a time.
    Every frame is still decoded (inter-frame codecs need them), but only the kept ones are
    converted to RGB. The file is opened on the first `next()`; an unreadable file, one
    without a video stream or a corrupt frame raise a one-line DataError."""
    if stride < 1:
        raise ConfigError(f"frame stride {stride}: expected 1 or more")
    return _frames(Path(path), stride)


def _frames(path: Path, stride: int) -> Iterator[Frame]:
    av = _av()
    container, stream = _open(path)
    stream.thread_type = "AUTO"  # frame and slice threads: several times faster on HD video
    with container:
        fps = _fps(stream)
        start = stream.start_time or 0
        time_base = stream.time_base
        index = -1
        try:
            for frame in container.decode(stream):
                index += 1
                if index % stride:
                    continue
                if frame.pts is not None and time_base:
                    time_s = float((frame.pts - start) * time_base)
                else:
                    time_s = index / fps if fps else 0.0
                rgb = np.ascontiguousarray(frame.to_ndarray(format="rgb24"))
                yield Frame(index, rgb, time_s)
        except av.error.FFmpegError as e:
            raise DataError(
                f"{path}: cannot decode frame {index + 1} ({_reason(e)}); the file is corrupt "
                "or truncated"
            ) from e


def frame_name(video: str | Path, index: int, frames: int | None = None) -> str:
    """The file name of a video frame's per-frame outputs: `drive01.mp4`, 123 ->
    `drive01_f000123.png`. The index is zero-padded to at least 6 digits, more when the
    video's frame count `frames` needs them, so names sort in frame order."""
    digits = max(6, len(str(max((frames or 0) - 1, 0))))
    return f"{Path(video).stem}_f{index:0{digits}d}.png"


def pick_encoder() -> str:
    """The first of ENCODERS that this PyAV's FFmpeg build can encode with."""
    av = _av("writing")
    for name in ENCODERS:
        try:
            av.codec.Codec(name, "w")
        except (av.error.FFmpegError, ValueError):  # UnknownCodecError is a ValueError
            continue
        return name
    raise ConfigError(f"this PyAV's FFmpeg has none of the video encoders {', '.join(ENCODERS)}")


class VideoWriter:
    """Write (height, width, 3) uint8 RGB frames to an .mp4 (.m4v, .mov, .mkv) as H.264
    (libx264, CRF 20) or MPEG-4 part 2 where FFmpeg lacks libx264, in yuv420p so that every
    player shows it:

        with VideoWriter(out / "drive01.mp4", info.fps, width, height) as video:
            for frame in frames:
                video.write(rgb)

    yuv420p needs even sizes: an odd width or height is padded by repeating the last column
    or row (`coded_size` is what the file holds). Atomic like `atomic.atomic_write`: frames go
    to a hidden temporary file in the same folder, renamed over `path` when the block ends
    without an error and removed when it ends with one, so a present file is a whole video.
    """

    def __init__(
        self,
        path: str | Path,
        fps: float | Fraction,
        width: int,
        height: int,
        encoder: str | None = None,
    ) -> None:
        self.path = Path(path)
        if self.path.suffix.lower() not in _MUXERS:
            raise ConfigError(
                f"{self.path}: videos are written as {', '.join(sorted(_MUXERS))} files"
            )
        if width < 1 or height < 1:
            raise ConfigError(f"{self.path}: video size {width}x{height}; expected at least 1x1")
        if not fps > 0:
            raise ConfigError(f"{self.path}: frame rate {fps}; expected more than 0")
        # 30000/1001 (NTSC's 29.97) is exact; a float fps becomes the nearest such fraction
        self.rate = Fraction(fps).limit_denominator(1001)
        self.width, self.height = width, height
        self.coded_size = (width + width % 2, height + height % 2)  # (width, height)
        self.encoder = encoder
        self.frames = 0
        self._tmp: Path | None = None
        self._container = None
        self._stream = None

    def __enter__(self) -> VideoWriter:
        av = _av("writing")
        encoder = self.encoder or pick_encoder()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._tmp = temp_path(self.path)
        fmt = _MUXERS[self.path.suffix.lower()]
        options = {"movflags": "+faststart"} if fmt in ("mp4", "mov") else {}
        try:
            self._container = av.open(str(self._tmp), "w", format=fmt, options=options)
            codec_options = dict(_X264_OPTIONS) if encoder == "libx264" else {}
            stream = self._container.add_stream(encoder, rate=self.rate, options=codec_options)
            stream.width, stream.height = self.coded_size
            stream.pix_fmt = "yuv420p"
            if encoder != "libx264":
                pixels_per_s = self.coded_size[0] * self.coded_size[1] * float(self.rate)
                stream.bit_rate = max(200_000, int(pixels_per_s * _MPEG4_BITS_PER_PIXEL))
            self._stream = stream
        except BaseException as e:
            self._discard()
            if isinstance(e, av.error.FFmpegError):
                raise DataError(f"{self.path}: cannot write video ({_reason(e)})") from e
            raise
        return self

    def write(self, rgb: np.ndarray) -> None:
        """Append one frame: (height, width, 3) uint8 RGB, the size given at creation."""
        if self._stream is None:
            raise RuntimeError("VideoWriter.write outside its `with` block")
        if rgb.shape != (self.height, self.width, 3) or rgb.dtype != np.uint8:
            raise ValueError(
                f"{self.path}: frame {rgb.dtype} {rgb.shape}; expected uint8 "
                f"({self.height}, {self.width}, 3)"
            )
        w, h = self.coded_size
        if (w, h) != (self.width, self.height):
            rgb = np.pad(rgb, ((0, h - self.height), (0, w - self.width), (0, 0)), mode="edge")
        av = _av("writing")
        frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(rgb), format="rgb24")
        frame.pts = self.frames  # in 1/rate units, the encoder's time base
        try:
            self._container.mux(self._stream.encode(frame))
        except av.error.FFmpegError as e:
            raise DataError(f"{self.path}: cannot write video ({_reason(e)})") from e
        self.frames += 1

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if exc_type is not None:
            self._discard()
            return
        if not self.frames:  # FFmpeg writes nothing until the first frame: no video to keep
            self._discard()
            raise DataError(f"{self.path}: no frames to write; no video written")
        av = _av("writing")
        try:
            self._container.mux(self._stream.encode(None))  # flush the encoder's delayed frames
            self._container.close()
            with open(self._tmp, "rb") as f:  # once per video: cheap, and survives power loss
                os.fsync(f.fileno())
            os.replace(self._tmp, self.path)
        except BaseException as e:
            self._discard()
            if isinstance(e, av.error.FFmpegError):
                raise DataError(f"{self.path}: cannot write video ({_reason(e)})") from e
            raise
        finally:
            self._container = self._stream = None

    def _discard(self) -> None:
        if self._container is not None:
            # already failing; the temporary file goes either way
            with contextlib.suppress(Exception):
                self._container.close()
        self._container = self._stream = None
        if self._tmp is not None:
            self._tmp.unlink(missing_ok=True)
