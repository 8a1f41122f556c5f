"""Load user images and videos as bounded RGB frames; every failure is a one-line MediaError.

Images come from paths, bytes, PIL images or numpy arrays, in any common pixel mode, and
leave as RGB no larger than `MediaLimits.max_image_side`. Videos come from files decord can
read (mp4, webm, avi, ...) or from animated GIF / WebP / PNG, and leave as a `Clip` of
uniformly sampled frames with their timestamps. Memory stays bounded: JPEGs decode at a
reduced scale, large images shrink before any mode conversion, pixel counts are capped
against decompression bombs, and a video yields only the frames that are sampled.

`write_video` and `write_gif` produce real files for tests and the bundled examples.
"""
from __future__ import annotations

import io
import os
import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from fractions import Fraction

import decord
import numpy as np
from PIL import Image, UnidentifiedImageError

from .errors import MediaError, ParameterError


@dataclass(frozen=True)
class MediaLimits:
    """Bounds applied to every image and video the user gives."""

    max_file_mb: float = 200
    max_image_side: int = 2048  # longer sides are downscaled to this, keeping aspect ratio
    # A decoded image must fit in memory before it is shrunk: 12000x12000 is ~144 MP,
    # so a 10000x10000 scan is downscaled, while a bomb declaring 50000x50000 is refused.
    # Pillow refuses above 2 * Image.MAX_IMAGE_PIXELS (~179 MP) whatever this says.
    max_decode_pixels: int = 12000 * 12000
    default_frames: int = 8
    max_frames: int = 32


# Environment overrides, for the CLI and the app alike (a Space sets them in its settings).
LIMIT_ENV = {"SPECVLM_MAX_FILE_MB": "max_file_mb", "SPECVLM_MAX_IMAGE_SIDE": "max_image_side",
             "SPECVLM_MAX_DECODE_PIXELS": "max_decode_pixels", "SPECVLM_DEFAULT_FRAMES": "default_frames",
             "SPECVLM_MAX_FRAMES": "max_frames"}


def limits_from_env(environ=os.environ) -> MediaLimits:
    """MediaLimits with any SPECVLM_* overrides; a malformed value is an error naming it."""
    values = {}
    for var, field_name in LIMIT_ENV.items():
        raw = environ.get(var)
        if raw is None:
            continue
        kind = float if field_name == "max_file_mb" else int
        try:
            value = kind(raw)
        except ValueError:
            raise ParameterError(f"{var} must be a number, got {raw!r}") from None
        if value <= 0:
            raise ParameterError(f"{var} must be positive, got {raw!r}")
        values[field_name] = value
    return MediaLimits(**values)


DEFAULT_LIMITS = limits_from_env()

# Frame rate assumed for animation frames that carry no duration (what browsers do).
DEFAULT_ANIMATION_FPS = 10.0
# Multi-frame formats whose frames are moments in time; other multi-frame files (TIFF
# pages, MPO stereo pairs, ICO sizes) are images and load as their first frame.
ANIMATION_FORMATS = frozenset({"GIF", "PNG", "WEBP", "FLI"})

_MB = 1024 * 1024
_EXIF_ORIENTATION = 0x0112
# EXIF orientation -> the transpose that makes the photo upright (as ImageOps.exif_transpose).
_UPRIGHT = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}
_HIGH_DEPTH_MODES = frozenset({"I", "I;16", "I;16L", "I;16B", "I;16N", "F"})
_ALPHA_MODES = frozenset({"RGBA", "LA", "PA"})
_PALETTE_MODES = frozenset({"1", "P", "PA"})  # pixel values are indices: never average them


@dataclass
class Clip:
    """Frames sampled from a video or animation."""

    frames: list[Image.Image]  # RGB, at most max_image_side on the longer side
    timestamps: list[float]  # start time in seconds of each sampled frame
    fps: float  # average frame rate of the source
    total_frames: int  # frames in the source, sampled or not
    source: str  # file name, for messages and logs


# ---------------------------------------------------------------------------- public API

def load_image(source, limits: MediaLimits = DEFAULT_LIMITS, *,
               name: str | None = None) -> Image.Image:
    """An RGB image, downscaled to fit `limits.max_image_side`.

    source: a path (str or os.PathLike), the file's bytes, a PIL image, or a numpy array
    of shape HxW, HxWx3 or HxWx4. `name` is the file name to mention in errors when the
    source is bytes. Transparent pixels are composited on white; 16/32-bit and float
    pixels are scaled to 8 bits by the image's own range; an animated file gives its
    first frame; EXIF rotation is applied. Raises MediaError.
    """
    if isinstance(source, (Image.Image, np.ndarray)):
        with _errors_as_media_error("the image", "its pixels cannot be converted to RGB."):
            image = source if isinstance(source, Image.Image) else _image_from_array(source)
            _check_pixel_count(image.size, "the image", limits)
            return _decode_still(image, "the image", limits)
    label = _label(source, name)
    with _errors_as_media_error(label, "the file is corrupt or in an unsupported format."):
        file = _MediaFile.checked(source, label, name, limits)
        image = _open_image(file, limits)
        if image is None:
            if file.signature == "video":
                raise _error(label, "it is a video, not an image.")
            raise _error(label, "it is not an image file (unrecognised format).")
        with image:
            return _decode_still(image, label, limits)


def load_video(source, num_frames: int | None = None, limits: MediaLimits = DEFAULT_LIMITS,
               *, name: str | None = None) -> Clip:
    """`num_frames` frames sampled uniformly from a video, animation or still image.

    source: a path or the file's bytes (`name` as in `load_image`). num_frames defaults to
    `limits.default_frames` and is clamped to [1, limits.max_frames]; a shorter clip gives
    all its frames. A still image becomes a one-frame clip. Raises MediaError.
    """
    kind, media = _load(source, num_frames, limits, name)
    if kind == "image":
        # A still has no frame rate; one frame per second keeps fps and timestamps sane.
        return Clip([media], [0.0], 1.0, 1, _display_name(source, name))
    return media


def load_media(path, num_frames: int | None = None,
               limits: MediaLimits = DEFAULT_LIMITS) -> tuple[str, Image.Image | Clip]:
    """("image", RGB image) or ("video", Clip), by what the file turns out to be.

    Pillow is asked first: an animated GIF/WebP/PNG is a video, any other image an image.
    Anything else goes to decord as a video. Raises MediaError.
    """
    return _load(path, num_frames, limits, None)


def sample_frame_indices(total: int, n: int) -> list[int]:
    """`min(n, total)` sorted, distinct frame indices spread uniformly over `total` frames.

    Each index is the middle frame of one of n equal segments, so the first and last
    frames of a long video are not over-represented.
    """
    if total < 0 or n < 0:
        raise ParameterError(f"Frame counts must not be negative (got total={total}, n={n}).")
    if n >= total:
        return list(range(total))
    # Segments are at least one frame long (n < total), so the floors are all distinct.
    return [(2 * i + 1) * total // (2 * n) for i in range(n)]


def write_video(frames: Sequence[Image.Image], path, fps: float = 4) -> None:
    """Write frames to an H.264 mp4 (mpeg4 where PyAV lacks libx264).

    Odd widths or heights gain one edge-replicated row or column, since 4:2:0 video needs
    even sizes. Used by the tests and the bundled examples.
    """
    import av  # only needed to write videos, never to read them

    if not frames:
        raise ParameterError("write_video needs at least one frame.")
    size = frames[0].size
    if any(frame.size != size for frame in frames):
        raise ParameterError("write_video needs all frames to have the same size.")
    width, height = size[0] + size[0] % 2, size[1] + size[1] % 2
    codec = "libx264" if "libx264" in av.codecs_available else "mpeg4"
    rate = Fraction(fps).limit_denominator(1001)
    with av.open(os.fspath(path), mode="w") as container:
        # One encoder thread makes the bytes the same on any machine with this PyAV.
        stream = container.add_stream(codec, rate=rate, options={"threads": "1"})
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        for frame in frames:
            padded = _pad_to(frame.convert("RGB"), width, height)
            container.mux(stream.encode(av.VideoFrame.from_image(padded)))
        container.mux(stream.encode(None))


def write_gif(frames: Sequence[Image.Image], path, fps: float = 4) -> None:
    """Write frames to a looping animated GIF.

    Pillow merges consecutive identical frames into one longer frame, so the file may hold
    fewer frames than given; it plays the same.
    """
    if not frames:
        raise ParameterError("write_gif needs at least one frame.")
    rgb = [frame.convert("RGB") for frame in frames]
    rgb[0].save(os.fspath(path), format="GIF", save_all=True, append_images=rgb[1:],
                duration=round(1000 / fps), loop=0)


# ------------------------------------------------------------------------- file checks

def _error(label: str, problem: str) -> MediaError:
    return MediaError(f"Cannot read {label}: {problem}")


@contextmanager
def _errors_as_media_error(label: str, problem: str) -> Iterator[None]:
    """Let MediaError through and turn anything PIL, decord or the OS raises into one."""
    try:
        yield
    except MediaError:
        raise
    except Exception as exc:
        raise _error(label, problem) from exc


def _display_name(source, name: str | None) -> str:
    """The name a user knows the source by: the file's base name, on one line."""
    if isinstance(source, (str, os.PathLike)):
        name = os.path.basename(os.fspath(source))
    if not name:
        return "uploaded data"
    return "".join(ch if ch.isprintable() else "?" for ch in str(name))


def _label(source, name: str | None) -> str:
    """How error messages refer to the source: 'cat.png', or the uploaded data."""
    if isinstance(source, (str, os.PathLike)) or name:
        return f"'{_display_name(source, name)}'"
    return "the uploaded data"


def _sniff(header: bytes) -> str | None:
    """"image", "video" or None, from a file's first bytes; only used to word errors."""
    if header.startswith((b"\x89PNG\r\n\x1a\n", b"\xff\xd8\xff", b"GIF87a", b"GIF89a",
                          b"II*\x00", b"MM\x00*")):
        return "image"
    if header[:4] == b"RIFF":
        return {b"WEBP": "image", b"AVI ": "video"}.get(header[8:12])
    if header[4:8] == b"ftyp":  # ISO media: mp4/mov/m4v, but also HEIC and AVIF stills
        still_brands = (b"heic", b"heix", b"hevc", b"mif1", b"msf1", b"avif", b"avis")
        return "image" if header[8:12] in still_brands else "video"
    if header[:1] == b"\x47" and len(header) > 188 and header[188:189] == b"\x47":
        return "video"  # MPEG transport stream: a sync byte every 188 bytes
    if header.startswith((b"\x1a\x45\xdf\xa3", b"FLV", b"OggS", b"\x00\x00\x01\xba",
                          b"\x00\x00\x01\xb3", b"\x30\x26\xb2\x75\x8e\x66\xcf\x11")):
        return "video"  # Matroska/WebM, FLV, Ogg, MPEG-PS, MPEG-1/2 video, ASF/WMV
    return None


@dataclass(frozen=True)
class _MediaFile:
    """A file path or in-memory bytes that passed the size checks."""

    path: str | None
    data: bytes | None
    label: str  # for error messages
    name: str  # for Clip.source
    signature: str | None  # what the first bytes look like: "image", "video" or None

    @classmethod
    def checked(cls, source, label: str, name: str | None, limits: MediaLimits) -> _MediaFile:
        if isinstance(source, (bytes, bytearray, memoryview)):
            data = bytes(source)
            cls._check_size(len(data), label, limits)
            return cls(None, data, label, _display_name(source, name), _sniff(data[:192]))
        if not isinstance(source, (str, os.PathLike)):
            raise _error(label, f"expected a file path or bytes, got {type(source).__name__}.")
        path = os.fspath(source)
        if not os.path.exists(path):
            raise _error(label, "the file does not exist.")
        if os.path.isdir(path):
            raise _error(label, "it is a folder, not a file.")
        cls._check_size(os.path.getsize(path), label, limits)
        with open(path, "rb") as handle:
            header = handle.read(192)
        return cls(path, None, label, _display_name(source, name), _sniff(header))

    @staticmethod
    def _check_size(size: int, label: str, limits: MediaLimits) -> None:
        if size == 0:
            raise _error(label, "the file is empty (0 bytes).")
        if size > limits.max_file_mb * _MB:
            raise _error(label, f"the file is {size / _MB:.1f} MB, "
                                f"above the {limits.max_file_mb:g} MB limit.")

    def stream(self):
        """What Pillow and decord open: the path, or a stream over the bytes."""
        return self.path if self.path is not None else io.BytesIO(self.data)


def _load(source, num_frames: int | None, limits: MediaLimits, name: str | None):
    """("image", Image) or ("video", Clip) for a path or bytes."""
    count = _clamp_frame_count(num_frames, limits)
    label = _label(source, name)
    with _errors_as_media_error(label, "the file is corrupt or in an unsupported format."):
        file = _MediaFile.checked(source, label, name, limits)
        image = _open_image(file, limits)
        if image is None:
            if file.signature == "image":
                raise _error(label, "the image is corrupt or in an unsupported format.")
            return "video", _clip_from_video(file, count, limits)
        with image:
            if image.format in ANIMATION_FORMATS and getattr(image, "n_frames", 1) > 1:
                return "video", _clip_from_animation(image, file, count, limits)
            return "image", _decode_still(image, label, limits)


def _clamp_frame_count(num_frames: int | None, limits: MediaLimits) -> int:
    wanted = limits.default_frames if num_frames is None else int(num_frames)
    return max(1, min(wanted, limits.max_frames))


# ------------------------------------------------------------------------------ images

def _open_image(file: _MediaFile, limits: MediaLimits) -> Image.Image | None:
    """The file opened lazily by Pillow (header only), or None if Pillow does not know it.

    Refuses decompression bombs before any pixel is decoded, and asks JPEGs to decode at
    the smallest of 1/1, 1/2, 1/4, 1/8 scale that still covers the target size.
    """
    try:
        with warnings.catch_warnings():
            # Our own pixel cap below replaces Pillow's warning, which would fire at ~89 MP.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image = Image.open(file.stream())
    except Image.DecompressionBombError as exc:
        raise _error(file.label, "the image has too many pixels to decode safely "
                                 "(possible decompression bomb).") from exc
    except UnidentifiedImageError:
        return None
    try:
        _check_pixel_count(image.size, file.label, limits)
    except MediaError:
        image.close()
        raise
    if image.format in ("JPEG", "MPO"):
        image.draft(image.mode, _fit_within(image.size, limits.max_image_side))
    return image


def _check_pixel_count(size: tuple[int, int], label: str, limits: MediaLimits) -> None:
    width, height = size
    if width == 0 or height == 0:
        raise _error(label, f"the image is {width}x{height} pixels (empty).")
    if width * height > limits.max_decode_pixels:
        raise _error(label, f"the image is {width}x{height} pixels, more than the "
                            f"{limits.max_decode_pixels:,} allowed (possible decompression bomb).")


def _decode_still(image: Image.Image, label: str, limits: MediaLimits) -> Image.Image:
    """Decode fully (so truncation shows now, not later), shrink, convert to RGB, rotate."""
    try:
        image.load()
    except Exception as exc:
        raise _error(label, "the image is truncated or corrupt.") from exc
    orientation = image.getexif().get(_EXIF_ORIENTATION)  # resizing drops the metadata
    rgb = _downscale(image, limits.max_image_side)
    return rgb.transpose(_UPRIGHT[orientation]) if orientation in _UPRIGHT else rgb


def _downscale(image: Image.Image, max_side: int) -> Image.Image:
    """An RGB copy of a decoded image whose longer side is at most max_side.

    A large image is first reduced by an integer factor in its own mode, so the
    conversion to RGB (up to 4x the bytes of an L or P image) works on a small image.
    """
    target = _fit_within(image.size, max_side)
    factor = min(image.width // target[0], image.height // target[1])
    if factor >= 2:
        palette = image.mode in _PALETTE_MODES
        resample = Image.Resampling.NEAREST if palette else Image.Resampling.BOX
        image = image.resize((image.width // factor, image.height // factor), resample)
    rgb = _to_rgb(image)
    return rgb if rgb.size == target else rgb.resize(target, Image.Resampling.LANCZOS)


def _fit_within(size: tuple[int, int], max_side: int) -> tuple[int, int]:
    """size scaled down (never up) so that its longer side is at most max_side."""
    width, height = size
    if max(width, height) <= max_side:
        return size
    scale = max_side / max(width, height)
    return max(1, round(width * scale)), max(1, round(height * scale))


def _to_rgb(image: Image.Image) -> Image.Image:
    """A new RGB image: transparency composited on white, deep pixels scaled to 8 bits."""
    if image.mode in _HIGH_DEPTH_MODES:
        return Image.fromarray(_to_uint8(np.asarray(image))).convert("RGB")
    if image.mode in _ALPHA_MODES or "transparency" in image.info:
        rgba = image.convert("RGBA")
        canvas = Image.new("RGB", rgba.size, (255, 255, 255))
        canvas.paste(rgba, mask=rgba.getchannel("A"))
        return canvas
    return image.convert("RGB")


def _to_uint8(values: np.ndarray) -> np.ndarray:
    """8-bit pixels from any numeric array.

    Floats within [0, 1] are intensities; anything else (16/32-bit integers, other floats)
    is stretched from min(0, lowest) to its highest value, so a dim 16-bit image stays
    visible and its ordering is kept, instead of clipping to white.
    """
    if values.dtype == np.uint8:
        return values
    if values.dtype == np.bool_:
        return values.astype(np.uint8) * 255
    is_float = np.issubdtype(values.dtype, np.floating)
    values = np.nan_to_num(values.astype(np.float32), nan=0.0, posinf=0.0, neginf=0.0)
    low, high = min(0.0, float(values.min())), float(values.max())
    if is_float and low >= 0.0 and high <= 1.0:
        return np.round(values * 255).astype(np.uint8)
    if high <= low:
        return np.zeros(values.shape, np.uint8)
    return np.round((values - low) * (255 / (high - low))).astype(np.uint8)


def _image_from_array(array: np.ndarray) -> Image.Image:
    """A PIL image (L, RGB or RGBA) from an HxW, HxWx1, HxWx3 or HxWx4 array."""
    if array.ndim == 3 and array.shape[2] == 1:
        array = array[:, :, 0]
    if not (array.ndim == 2 or (array.ndim == 3 and array.shape[2] in (3, 4))):
        raise _error("the image", f"expected an array of shape HxW, HxWx3 or HxWx4, "
                                  f"got {tuple(array.shape)}.")
    if not (np.issubdtype(array.dtype, np.number) or array.dtype == np.bool_):
        raise _error("the image", f"expected numeric pixels, got dtype {array.dtype}.")
    return Image.fromarray(np.ascontiguousarray(_to_uint8(array)))


def _pad_to(image: Image.Image, width: int, height: int) -> Image.Image:
    """image grown to width x height by repeating its last column and row."""
    if image.size == (width, height):
        return image
    padded = Image.new("RGB", (width, height))
    padded.paste(image)
    if width > image.width:
        padded.paste(image.crop((image.width - 1, 0, image.width, image.height)), (image.width, 0))
    if height > image.height:
        padded.paste(padded.crop((0, image.height - 1, width, image.height)), (0, image.height))
    return padded


# ------------------------------------------------------------------------------ videos

def _clip_from_animation(image: Image.Image, file: _MediaFile, count: int,
                         limits: MediaLimits) -> Clip:
    """Sampled frames of an animated GIF/WebP/PNG, timed by each frame's duration.

    Every frame is visited (GIF frames are deltas of the previous one, and durations are
    needed for timestamps) but only sampled frames are kept.
    """
    total = image.n_frames
    wanted = set(sample_frame_indices(total, count))
    frames, timestamps, elapsed = [], [], 0.0
    for index in range(total):
        image.seek(index)
        image.load()  # WebP only knows a frame's duration once it is decoded
        if index in wanted:
            frames.append(_downscale(image, limits.max_image_side))
            timestamps.append(elapsed)
        duration_ms = image.info.get("duration") or 0
        elapsed += duration_ms / 1000 if duration_ms > 0 else 1 / DEFAULT_ANIMATION_FPS
    return Clip(frames, timestamps, total / elapsed, total, file.name)


@contextmanager
def _native_stderr_silenced() -> Iterator[None]:
    """decord's C++ core logs decoding failures straight to file descriptor 2; the
    user gets our one-line MediaError instead, so those lines are dropped."""
    try:
        saved = os.dup(2)
    except OSError:  # no usable stderr: nothing to silence
        yield
        return
    try:
        with open(os.devnull, "wb") as devnull:
            os.dup2(devnull.fileno(), 2)
            yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def _clip_from_video(file: _MediaFile, count: int, limits: MediaLimits) -> Clip:
    """Sampled frames of a video file, decoding only those frames, at the bounded size."""
    if file.signature is None:
        raise _error(file.label, "it is not an image or video file (unrecognised format).")
    with _native_stderr_silenced():
        return _decode_video(file, count, limits)


def _decode_video(file: _MediaFile, count: int, limits: MediaLimits) -> Clip:
    try:
        reader = decord.VideoReader(file.stream())
        total = len(reader)
        if total == 0:
            raise _error(file.label, "the video has no frames.")
        # decord only reveals the size through a frame; rescaling inside the decoder keeps
        # full-size frames of a 4K video out of memory.
        height, width = reader[0].shape[:2]
        target = _fit_within((width, height), limits.max_image_side)
        if target != (width, height):
            reader = decord.VideoReader(file.stream(), width=target[0], height=target[1])
        indices = sample_frame_indices(total, count)
        pixels = reader.get_batch(indices).asnumpy()
        starts = reader.get_frame_timestamp(indices)[:, 0]
        fps = float(reader.get_avg_fps())
    except MediaError:
        raise
    except Exception as exc:
        if file.signature == "video":
            problem = ("the video cannot be decoded (corrupt, truncated, "
                       "unsupported codec or no video track).")
        else:
            problem = "it is not an image or video file (unrecognised format)."
        raise _error(file.label, problem) from exc
    frames = [Image.fromarray(frame) for frame in pixels]
    return Clip(frames, [float(start) for start in starts], fps, total, file.name)
