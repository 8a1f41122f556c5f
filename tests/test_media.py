"""Tests of specvlm_core.media: image modes, bounds, errors, video sampling, examples."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import av
import decord
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from PIL import Image, ImageDraw

from specvlm_core import media, world
from specvlm_core.errors import MediaError, ParameterError
from specvlm_core.examples import write_examples
from specvlm_core.media import (
    Clip, MediaLimits, load_image, load_media, load_video, sample_frame_indices,
    write_gif, write_video,
)

REPO_ROOT = Path(__file__).resolve().parents[1]
WHITE, BLACK = (255, 255, 255), (0, 0, 0)


def assert_one_line_error(exc_info, file_name: str) -> str:
    message = str(exc_info.value)
    assert "\n" not in message and message.strip() == message
    assert file_name in message
    return message


def index_coded_frame(index: int, size=(64, 48)) -> Image.Image:
    """A flat frame whose colour encodes its index in steps of 16, robust to H.264 noise."""
    return Image.new("RGB", size, ((index % 16) * 16 + 8, (index // 16) * 16 + 8, 128))


def decode_index(frame: Image.Image) -> int:
    red, green, _ = np.asarray(frame, dtype=np.float32).reshape(-1, 3).mean(axis=0)
    return int(green // 16) * 16 + int(red // 16)


def halves(mode: str, left, right, size=(40, 30)) -> Image.Image:
    """An image of the given mode whose left and right halves have the given values."""
    image = Image.new(mode, size, left)
    ImageDraw.Draw(image).rectangle([size[0] // 2, 0, size[0] - 1, size[1] - 1], fill=right)
    return image


# -------------------------------------------------------------------------- image modes

def _palette_image(transparent: bool) -> Image.Image:
    image = Image.new("P", (40, 30), 0)
    image.putpalette([255, 0, 0, 0, 0, 255] + [0] * 762)  # index 0 red, index 1 blue
    ImageDraw.Draw(image).rectangle([20, 0, 39, 29], fill=1)
    if transparent:
        image.info["transparency"] = 0
    return image


def _cmyk_image() -> Image.Image:
    return halves("CMYK", (0, 0, 0, 0), (255, 0, 0, 0))  # white, then full cyan


# mode -> (image factory, file format, expected RGB of the left half, of the right half)
MODE_CASES = {
    "1": (lambda: halves("1", 0, 1), "PNG", BLACK, WHITE),
    "L": (lambda: halves("L", 0, 200), "PNG", BLACK, (200, 200, 200)),
    "LA": (lambda: halves("LA", (50, 0), (50, 255)), "PNG", WHITE, (50, 50, 50)),
    "RGB": (lambda: halves("RGB", (10, 20, 30), (200, 100, 0)), "PNG", (10, 20, 30), (200, 100, 0)),
    "RGBA": (lambda: halves("RGBA", (10, 20, 30, 0), (10, 20, 30, 255)), "PNG", WHITE, (10, 20, 30)),
    "P": (lambda: _palette_image(False), "PNG", (255, 0, 0), (0, 0, 255)),
    "P-transparent": (lambda: _palette_image(True), "PNG", WHITE, (0, 0, 255)),
    "CMYK": (_cmyk_image, "TIFF", WHITE, (0, 255, 255)),
}


@pytest.mark.parametrize("case", sorted(MODE_CASES))
def test_every_pixel_mode_loads_as_rgb_from_file(tmp_path, case):
    make, file_format, left, right = MODE_CASES[case]
    path = tmp_path / f"{case}.{file_format.lower()}"
    make().save(path, format=file_format)
    image = load_image(path)
    assert image.mode == "RGB" and image.size == (40, 30)
    assert image.getpixel((5, 15)) == left
    assert image.getpixel((35, 15)) == right


@pytest.mark.parametrize("case", sorted(MODE_CASES))
def test_every_pixel_mode_loads_as_rgb_from_pil(case):
    make, _, left, right = MODE_CASES[case]
    image = load_image(make())
    assert image.mode == "RGB" and image.size == (40, 30)
    assert (image.getpixel((5, 15)), image.getpixel((35, 15))) == (left, right)


@pytest.mark.parametrize("mode, highest, file_format", [
    ("I;16", 1000, "PNG"),  # a dim 16-bit image: clipping to 255 would flatten it to white
    ("I", 100_000, "TIFF"),
    ("F", 5.0, "TIFF"),
])
def test_deep_pixels_are_scaled_by_their_max_and_keep_their_order(tmp_path, mode, highest, file_format):
    ramp = np.linspace(0, highest, 50, dtype=np.float64)
    array = np.tile(ramp, (10, 1))
    dtype = {"I;16": np.uint16, "I": np.int32, "F": np.float32}[mode]
    image = Image.fromarray(array.astype(dtype))
    if mode == "I;16":
        assert image.mode == "I;16"
    path = tmp_path / f"deep.{file_format.lower()}"
    image.save(path, format=file_format)
    assert Image.open(path).mode == mode

    row = np.asarray(load_image(path))[5, :, 0].astype(int)
    assert row[0] == 0 and row[-1] == 255
    assert np.all(np.diff(row) >= 0) and len(np.unique(row)) > 40  # ordered, not clipped
    assert abs(row[25] - round(255 * ramp[25] / highest)) <= 1


def test_float_image_within_unit_range_is_read_as_intensity():
    image = load_image(Image.fromarray(np.full((4, 4), 0.5, dtype=np.float32)))
    assert image.getpixel((0, 0)) == (128, 128, 128)


def test_numpy_arrays_of_every_supported_shape():
    gray = np.zeros((30, 40), np.uint8)
    gray[:, 20:] = 200
    assert load_image(gray).getpixel((35, 5)) == (200, 200, 200)

    rgb = np.zeros((30, 40, 3), np.uint8)
    rgb[..., 2] = 255
    assert load_image(rgb).getpixel((0, 0)) == (0, 0, 255)

    rgba = np.zeros((30, 40, 4), np.uint8)
    rgba[:, 20:] = (10, 20, 30, 255)  # left half fully transparent
    image = load_image(rgba)
    assert image.size == (40, 30)
    assert (image.getpixel((5, 5)), image.getpixel((35, 5))) == (WHITE, (10, 20, 30))

    deep = np.tile(np.arange(0, 4000, 100, dtype=np.uint16), (30, 1))
    row = np.asarray(load_image(deep))[0, :, 0]
    assert row[-1] == 255 and np.all(np.diff(row.astype(int)) > 0)

    assert load_image(np.full((2, 3), 0.25)).getpixel((0, 0)) == (64, 64, 64)
    assert load_image(np.ones((2, 3), bool)).getpixel((2, 1)) == WHITE
    assert load_image(np.zeros((5, 6, 1), np.uint8)).size == (6, 5)


@pytest.mark.parametrize("shape", [(2, 3, 2), (2, 3, 4, 1), (5,)])
def test_array_of_wrong_shape_is_a_media_error(shape):
    with pytest.raises(MediaError) as exc_info:
        load_image(np.zeros(shape, np.uint8))
    assert "shape" in assert_one_line_error(exc_info, "the image")


def test_one_pixel_image(tmp_path):
    path = tmp_path / "dot.png"
    Image.new("RGB", (1, 1), (1, 2, 3)).save(path)
    image = load_image(path)
    assert image.size == (1, 1) and image.getpixel((0, 0)) == (1, 2, 3)


def test_bytes_source_and_its_name_in_errors(tmp_path):
    path = tmp_path / "scene.png"
    world.make_sample(3, kind="image").frames[0].save(path)
    data = path.read_bytes()
    assert load_image(data).size == Image.open(path).size
    with pytest.raises(MediaError) as exc_info:
        load_image(data[:100], name="upload.png")
    assert_one_line_error(exc_info, "upload.png")


def test_downscaling_keeps_the_aspect_ratio(tmp_path):
    path = tmp_path / "wide.png"
    halves("RGB", (255, 0, 0), (0, 0, 255), size=(300, 100)).save(path)
    image = load_image(path, MediaLimits(max_image_side=64))
    assert image.size == (64, 21)
    assert image.getpixel((2, 10)) == (255, 0, 0) and image.getpixel((61, 10)) == (0, 0, 255)


def test_jpeg_exif_rotation_is_applied(tmp_path):
    path = tmp_path / "phone.jpg"
    exif = Image.Exif()
    exif[0x0112] = 6  # stored sideways: the camera was turned 90 degrees clockwise
    halves("RGB", (255, 0, 0), (0, 0, 255), size=(40, 20)).save(path, exif=exif, quality=95)
    image = load_image(path)
    assert image.size == (20, 40)
    top, bottom = np.asarray(image)[2, 10], np.asarray(image)[37, 10]
    assert top[0] > 200 and bottom[2] > 200  # the left (red) half is now on top


def test_animated_gif_as_image_is_its_first_frame(tmp_path):
    path = tmp_path / "anim.gif"
    write_gif([Image.new("RGB", (8, 8), (255, 0, 0)), Image.new("RGB", (8, 8), (0, 0, 255))], path)
    assert load_image(path).getpixel((4, 4)) == (255, 0, 0)


@pytest.mark.skipif(not os.path.exists("/proc/self/status"), reason="measures memory via Linux /proc")
def test_huge_images_are_downscaled_in_bounded_memory(tmp_path):
    """A 10000x10000 PNG (100 MB decoded as L) and JPEG load at 2048 px without blowing up.

    As written they peak ~70 MB (JPEG) and ~110 MB (PNG) above the baseline. Converting
    the full PNG to RGB would add 300 MB more; decoding the JPEG without draft mode, 100 MB
    more. Peak memory is measured in a fresh process by its VmHWM, which, unlike
    ru_maxrss, starts afresh at exec instead of at the parent's size.
    """
    big = halves("L", 0, 255, size=(10_000, 10_000))
    big.save(tmp_path / "big.png", compress_level=1)
    big.save(tmp_path / "big.jpg", quality=50)
    del big
    script = """
import json, sys
from specvlm_core.media import load_image
def peak_mb():
    with open("/proc/self/status") as status:
        line = next(line for line in status if line.startswith("VmHWM:"))
    return int(line.split()[1]) / 1024
report = {}
for path in sys.argv[1:]:
    before = peak_mb()
    image = load_image(path)
    report[path] = [image.size, image.getpixel((10, 10)), image.getpixel((2000, 10)), peak_mb() - before]
print(json.dumps(report))
"""
    paths = [str(tmp_path / "big.jpg"), str(tmp_path / "big.png")]  # smaller peak first
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT), "OMP_NUM_THREADS": "1"}
    result = subprocess.run([sys.executable, "-c", script, *paths], capture_output=True,
                            text=True, env=env, timeout=120, check=True)
    report = json.loads(result.stdout.strip().splitlines()[-1])
    for path, max_growth_mb in zip(paths, (120, 250)):
        size, left, right, growth_mb = report[path]
        assert tuple(size) == (2048, 2048)
        assert max(left) < 20 and min(right) > 235
        assert growth_mb < max_growth_mb, (path, growth_mb)


def test_decompression_bomb_is_refused(tmp_path):
    path = tmp_path / "bomb.png"
    Image.new("L", (20, 20)).save(path)
    with pytest.raises(MediaError) as exc_info:
        load_image(path, MediaLimits(max_decode_pixels=100))
    assert "decompression bomb" in assert_one_line_error(exc_info, "bomb.png")


# -------------------------------------------------------------------------- bad files

def _write_bad_file(tmp_path: Path, case: str) -> Path:
    scene = world.make_sample(7, kind="image", size_range=(256, 256)).frames[0]
    if case == "empty":
        path = tmp_path / "empty.png"
        path.write_bytes(b"")
    elif case in ("truncated_png", "truncated_jpeg"):
        path = tmp_path / ("half.png" if case == "truncated_png" else "half.jpg")
        scene.save(path)
        data = path.read_bytes()
        path.write_bytes(data[: len(data) // 2])
    elif case == "text":
        path = tmp_path / "notes.txt"
        path.write_text("this is not a picture\n" * 20)
    elif case == "missing":
        path = tmp_path / "nowhere.png"
    elif case == "too_large":
        path = tmp_path / "large.png"
        scene.save(path)
    else:
        path = tmp_path / "folder.png"
        path.mkdir()
    return path


BAD_FILES = {  # case -> words the message must contain
    "empty": "empty",
    "truncated_png": "truncated or corrupt",
    "truncated_jpeg": "truncated or corrupt",
    "text": "not an image",
    "missing": "does not exist",
    "too_large": "limit",
    "folder": "folder",
}


@pytest.mark.parametrize("loader", [load_image, load_video, load_media])
@pytest.mark.parametrize("case", sorted(BAD_FILES))
def test_bad_files_raise_one_line_media_errors(tmp_path, case, loader):
    path = _write_bad_file(tmp_path, case)
    limits = MediaLimits(max_file_mb=0.0001)  # 104 bytes: every real file is too large
    with pytest.raises(MediaError) as exc_info:
        loader(path, limits=limits) if case == "too_large" else loader(path)
    message = assert_one_line_error(exc_info, path.name)
    assert BAD_FILES[case] in message
    assert "Traceback" not in message


# ------------------------------------------------------------------------------ videos

def test_mp4_of_world_frames_round_trips(tmp_path):
    sample = world.make_sample(4, kind="video")  # 8 frames of 120x160, one object moves
    path = tmp_path / "clip.mp4"
    write_video(sample.frames, path, fps=4)
    clip = load_video(path, num_frames=len(sample.frames))
    assert isinstance(clip, Clip) and clip.source == "clip.mp4"
    assert clip.total_frames == len(sample.frames) == len(clip.frames) == 8
    assert clip.fps == pytest.approx(4.0)
    assert clip.timestamps == pytest.approx([i / 4 for i in range(8)])
    for original, loaded in zip(sample.frames, clip.frames):
        assert loaded.mode == "RGB" and loaded.size == original.size
        error = np.abs(np.asarray(loaded, float) - np.asarray(original, float)).mean()
        assert error < 6
    # The event is visible: the first and last frames differ where the object moved.
    first, last = (np.asarray(clip.frames[i], float) for i in (0, -1))
    assert np.abs(first - last).mean() > 2


def test_odd_sized_frames_are_padded_to_even(tmp_path):
    path = tmp_path / "odd.mp4"
    write_video([halves("RGB", (255, 0, 0), (0, 0, 255), size=(33, 17))] * 2, path)
    frame = load_video(path).frames[0]
    assert frame.size == (34, 18)
    assert np.asarray(frame)[17, 33, 2] > 200  # the padding repeats the blue edge


def test_asking_for_more_frames_than_the_video_has_gives_all(tmp_path):
    path = tmp_path / "short.mp4"
    write_video([index_coded_frame(i) for i in range(5)], path)
    clip = load_video(path, num_frames=20)
    assert [decode_index(frame) for frame in clip.frames] == [0, 1, 2, 3, 4]
    assert np.all(np.diff(clip.timestamps) > 0)


def test_long_video_reads_only_the_sampled_frames(tmp_path, monkeypatch):
    path = tmp_path / "long.mp4"
    write_video([index_coded_frame(i) for i in range(200)], path, fps=25)
    requested = []
    original_get_batch = decord.VideoReader.get_batch

    def recording_get_batch(reader, indices):
        requested.append(list(indices))
        return original_get_batch(reader, indices)

    monkeypatch.setattr(decord.VideoReader, "get_batch", recording_get_batch)
    clip = load_video(path)  # default_frames = 8
    expected = sample_frame_indices(200, 8)
    assert expected == [12, 37, 62, 87, 112, 137, 162, 187]
    assert requested == [expected]  # one batch of exactly the sampled frames
    assert [decode_index(frame) for frame in clip.frames] == expected
    assert clip.total_frames == 200
    assert clip.timestamps == pytest.approx([i / 25 for i in expected])


def test_frame_count_is_clamped_to_the_limits(tmp_path):
    path = tmp_path / "forty.mp4"
    write_video([index_coded_frame(i) for i in range(40)], path)
    assert len(load_video(path, num_frames=1000).frames) == media.DEFAULT_LIMITS.max_frames
    assert len(load_video(path, num_frames=0).frames) == 1
    limits = MediaLimits(default_frames=3, max_frames=4)
    assert len(load_video(path, limits=limits).frames) == 3
    assert len(load_video(path, num_frames=10, limits=limits).frames) == 4


def test_video_frames_are_downscaled_like_images(tmp_path):
    path = tmp_path / "wide.mp4"
    write_video([halves("RGB", (255, 0, 0), (0, 0, 255), size=(200, 100))] * 3, path)
    clip = load_video(path, limits=MediaLimits(max_image_side=64))
    assert [frame.size for frame in clip.frames] == [(64, 32)] * 3
    pixels = np.asarray(clip.frames[0])
    assert pixels[16, 4, 0] > 200 and pixels[16, 60, 2] > 200


def test_video_from_bytes(tmp_path):
    path = tmp_path / "clip.mp4"
    write_video([index_coded_frame(i) for i in range(6)], path)
    clip = load_video(path.read_bytes(), num_frames=3, name="upload.mp4")
    assert clip.source == "upload.mp4"
    assert [decode_index(frame) for frame in clip.frames] == sample_frame_indices(6, 3)


def test_one_frame_video(tmp_path):
    path = tmp_path / "single.mp4"
    write_video([index_coded_frame(7)], path)
    clip = load_video(path)
    assert clip.total_frames == 1 and clip.timestamps == [0.0]
    assert [decode_index(frame) for frame in clip.frames] == [7]


def test_still_image_as_video_is_a_one_frame_clip(tmp_path):
    path = tmp_path / "still.png"
    Image.new("RGB", (30, 20), (9, 8, 7)).save(path)
    clip = load_video(path, num_frames=8)
    assert clip.total_frames == 1 and clip.timestamps == [0.0] and clip.source == "still.png"
    assert clip.frames[0].size == (30, 20) and clip.frames[0].getpixel((0, 0)) == (9, 8, 7)


COLOURS = [(255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 0)]


@pytest.mark.parametrize("file_format", ["GIF", "PNG", "WEBP"])
def test_animations_are_clips_timed_by_frame_durations(tmp_path, file_format):
    path = tmp_path / f"anim.{file_format.lower()}"
    frames = [Image.new("RGB", (24, 16), colour) for colour in COLOURS]
    options = {"lossless": True} if file_format == "WEBP" else {}
    frames[0].save(path, format=file_format, save_all=True, append_images=frames[1:],
                   duration=[100, 200, 300, 400], loop=0, **options)
    kind, clip = load_media(path, num_frames=10)
    assert kind == "video" and clip.total_frames == 4
    assert clip.timestamps == pytest.approx([0.0, 0.1, 0.3, 0.6])
    assert clip.fps == pytest.approx(4 / 1.0)
    assert [frame.getpixel((12, 8)) for frame in clip.frames] == COLOURS


def test_write_gif_round_trips_and_samples(tmp_path):
    path = tmp_path / "ramp.gif"
    write_gif([Image.new("RGB", (10, 10), (i * 25, 0, 0)) for i in range(10)], path, fps=5)
    clip = load_video(path, num_frames=5)
    assert clip.total_frames == 10 and clip.fps == pytest.approx(5.0)
    indices = sample_frame_indices(10, 5)
    assert [frame.getpixel((5, 5))[0] for frame in clip.frames] == [i * 25 for i in indices]
    assert clip.timestamps == pytest.approx([i * 0.2 for i in indices])


def test_gif_frames_without_duration_play_at_ten_fps(tmp_path):
    path = tmp_path / "untimed.gif"
    frames = [Image.new("RGB", (8, 8), colour) for colour in COLOURS[:3]]
    frames[0].save(path, save_all=True, append_images=frames[1:], duration=0)
    clip = load_video(path)
    assert clip.timestamps == pytest.approx([0.0, 0.1, 0.2])
    assert clip.fps == pytest.approx(media.DEFAULT_ANIMATION_FPS)


def test_text_file_is_not_a_video(tmp_path):
    path = tmp_path / "movie.mp4"
    path.write_text("definitely not a movie\n" * 50)
    with pytest.raises(MediaError) as exc_info:
        load_video(path)
    assert "not an image or video" in assert_one_line_error(exc_info, "movie.mp4")


def _zero_frame_mp4(path: Path) -> None:
    """An mp4 whose header declares a video track that has no frames at all."""
    with av.open(str(path), mode="w") as container:
        stream = container.add_stream("libx264", rate=4)
        stream.width, stream.height, stream.pix_fmt = 64, 48, "yuv420p"
        container.start_encoding()  # writes the header; without frames nothing else follows


@pytest.mark.parametrize("damage", ["truncated", "zero_frames", "garbled"])
def test_broken_mp4_raises_media_error(tmp_path, damage):
    path = tmp_path / f"{damage}.mp4"
    if damage == "zero_frames":
        _zero_frame_mp4(path)
    else:
        write_video([index_coded_frame(i) for i in range(30)], path)
        data = path.read_bytes()
        if damage == "truncated":
            path.write_bytes(data[: len(data) // 2])
        else:  # a real mp4 signature followed by noise
            noise = np.random.default_rng(0).integers(0, 256, len(data) - 32, np.uint8)
            path.write_bytes(data[:32] + noise.tobytes())
    with pytest.raises(MediaError) as exc_info:
        load_video(path)
    assert "video cannot be decoded" in assert_one_line_error(exc_info, path.name)


def test_video_is_not_an_image(tmp_path):
    path = tmp_path / "clip.mp4"
    write_video([index_coded_frame(0)] * 2, path)
    with pytest.raises(MediaError) as exc_info:
        load_image(path)
    assert "a video, not an image" in assert_one_line_error(exc_info, "clip.mp4")


def test_write_helpers_refuse_bad_frames(tmp_path):
    with pytest.raises(ParameterError):
        write_video([], tmp_path / "none.mp4")
    with pytest.raises(ParameterError):
        write_video([Image.new("RGB", (8, 8)), Image.new("RGB", (10, 8))], tmp_path / "mixed.mp4")
    with pytest.raises(ParameterError):
        write_gif([], tmp_path / "none.gif")


# ------------------------------------------------------------------------ sniffing

def test_load_media_tells_images_from_videos(tmp_path):
    scene = world.make_sample(2, kind="image").frames[0]
    scene.save(tmp_path / "scene.png")
    write_gif([scene], tmp_path / "still.gif")
    write_gif([scene, scene.rotate(90)], tmp_path / "moving.gif")
    write_video([index_coded_frame(i) for i in range(4)], tmp_path / "clip.mp4")
    # A misleading extension: the bytes decide, not the name.
    (tmp_path / "actually_png.mp4").write_bytes((tmp_path / "scene.png").read_bytes())

    kinds = {name: load_media(tmp_path / name)[0]
             for name in ("scene.png", "still.gif", "moving.gif", "clip.mp4", "actually_png.mp4")}
    assert kinds == {"scene.png": "image", "still.gif": "image", "moving.gif": "video",
                     "clip.mp4": "video", "actually_png.mp4": "image"}
    kind, image = load_media(tmp_path / "scene.png")
    assert isinstance(image, Image.Image) and image.size == scene.size
    kind, clip = load_media(tmp_path / "clip.mp4", num_frames=2)
    assert isinstance(clip, Clip) and len(clip.frames) == 2


# ---------------------------------------------------------------- sample_frame_indices

@given(total=st.integers(0, 100_000), n=st.integers(0, 300))
def test_sample_frame_indices_properties(total, n):
    indices = sample_frame_indices(total, n)
    assert len(indices) == min(n, total)
    assert indices == sorted(set(indices))
    assert all(0 <= index < total for index in indices)
    if 2 <= n < total:  # uniform: gaps differ by at most one frame
        gaps = np.diff(indices)
        assert gaps.max() - gaps.min() <= 1


def test_sample_frame_indices_centres_segments_and_rejects_negatives():
    assert sample_frame_indices(10, 2) == [2, 7]
    assert sample_frame_indices(3, 1) == [1]
    assert sample_frame_indices(4, 4) == [0, 1, 2, 3]
    with pytest.raises(ParameterError):
        sample_frame_indices(-1, 3)
    with pytest.raises(ParameterError):
        sample_frame_indices(5, -2)


# ------------------------------------------------------------------------- examples

def test_examples_are_small_loadable_and_listed(tmp_path):
    entries = write_examples(tmp_path)
    listed = json.loads((tmp_path / "examples.json").read_text())
    assert listed == entries
    assert sum(entry["kind"] == "image" for entry in listed) == 4
    assert sum(entry["kind"] == "video" for entry in listed) == 3
    assert sum(path.stat().st_size for path in tmp_path.iterdir()) < 1_000_000
    image_sides = []
    for entry in listed:
        assert entry["question"].strip() and entry["answer"].strip()
        kind, loaded = load_media(tmp_path / entry["file"])
        assert kind == entry["kind"]
        if kind == "image":
            image_sides.append(max(loaded.size))
    assert image_sides == [96, 160, 256, 384]
    frame_counts = {e["file"]: load_video(tmp_path / e["file"], num_frames=32).total_frames
                    for e in listed if e["file"].endswith(".mp4")}
    assert sorted(frame_counts.values()) == [8, 16]


def test_limits_are_configurable_from_the_environment():
    from specvlm_core.errors import ParameterError
    from specvlm_core.media import MediaLimits, limits_from_env
    limits = limits_from_env({"SPECVLM_MAX_FRAMES": "12", "SPECVLM_MAX_FILE_MB": "5.5"})
    assert limits.max_frames == 12 and limits.max_file_mb == 5.5
    assert limits.max_image_side == MediaLimits().max_image_side
    for bad in ("twelve", "0"):
        with pytest.raises(ParameterError, match="SPECVLM_MAX_FRAMES"):
            limits_from_env({"SPECVLM_MAX_FRAMES": bad})
