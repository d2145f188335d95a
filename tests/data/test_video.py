"""Videos: VideoWriter -> iter_frames round trips on a tiny clip with a moving red square.

The codecs are lossy, so frames are compared through what survives compression exactly enough
to catch a wrong, missing or reordered frame: the square's position (the centroid of the red
pixels must be within half a pixel of where it was drawn; neighbouring frames differ by 4
pixels) and the colour inside it (within 12 grey levels: H.264 at CRF 20 and MPEG-4 keep flat
areas within ~5 levels here, the RGB <-> limited-range YUV conversion costs ~2), plus the mean
absolute error over the frame (~1.7 measured; 4:2:0 chroma subsampling blurs the square's edges).
"""

from __future__ import annotations

import sys

import numpy as np
import pytest

from offroad_seg.data import video as video_module
from offroad_seg.data.video import (
    ENCODERS,
    VideoInfo,
    VideoWriter,
    frame_name,
    iter_frames,
    pick_encoder,
    video_info,
)
from offroad_seg.errors import ConfigError, DataError

av = pytest.importorskip("av")

N, W, H, FPS = 12, 64, 48, 25
RED = (220, 40, 30)
STEP, SIDE, TOP = 4, 12, 10  # the square moves STEP px right per frame


def drawn(i: int, width: int = W, height: int = H) -> np.ndarray:
    frame = np.full((height, width, 3), 90, np.uint8)
    frame[TOP : TOP + SIDE, STEP * i : STEP * i + SIDE] = RED
    return frame


def write_clip(path, n=N, width=W, height=H, encoder=None):
    with VideoWriter(path, FPS, width, height, encoder=encoder) as video:
        for i in range(n):
            video.write(drawn(i, width, height))
    return video


def square_centroid(rgb: np.ndarray) -> tuple[float, float]:
    red = (rgb[..., 0].astype(int) - rgb[..., 1]) > 100
    rows, cols = np.nonzero(red)
    return rows.mean(), cols.mean()


def assert_is_frame(rgb: np.ndarray, i: int, width: int = W, height: int = H) -> None:
    row, col = square_centroid(rgb)
    assert abs(row - (TOP + (SIDE - 1) / 2)) < 0.5 and abs(col - (STEP * i + (SIDE - 1) / 2)) < 0.5
    inside = rgb[TOP + 2 : TOP + SIDE - 2, STEP * i + 2 : STEP * i + SIDE - 2].reshape(-1, 3)
    np.testing.assert_allclose(inside.mean(0), RED, atol=12)
    assert np.abs(rgb.astype(int) - drawn(i, width, height)).mean() < 4


@pytest.fixture(scope="module")
def clip(tmp_path_factory):
    path = tmp_path_factory.mktemp("video") / "drive01.mp4"
    write_clip(path)
    return path


def test_encoder_is_the_first_available(monkeypatch):
    assert pick_encoder() in ENCODERS
    monkeypatch.setattr(video_module, "ENCODERS", ("no_such_encoder", "mpeg4"))
    assert pick_encoder() == "mpeg4"
    monkeypatch.setattr(video_module, "ENCODERS", ("no_such_encoder",))
    with pytest.raises(ConfigError, match="none of the video encoders no_such_encoder"):
        pick_encoder()


def test_video_info(clip):
    assert video_info(clip) == VideoInfo(N, FPS, W, H, "yuv420p")


def test_every_frame_in_order(clip):
    frames = list(iter_frames(clip))
    assert [f.index for f in frames] == list(range(N))
    np.testing.assert_allclose([f.time_s for f in frames], np.arange(N) / FPS, atol=1e-6)
    for f in frames:
        assert f.rgb.shape == (H, W, 3) and f.rgb.dtype == np.uint8 and f.rgb.flags.c_contiguous
        assert_is_frame(f.rgb, f.index)


def test_stride_keeps_every_third_frame_unchanged(clip):
    every = {f.index: f.rgb for f in iter_frames(clip)}
    third = list(iter_frames(clip, stride=3))
    assert [f.index for f in third] == [0, 3, 6, 9]
    assert [f.time_s for f in third] == pytest.approx([0, 3 / FPS, 6 / FPS, 9 / FPS])
    for f in third:  # decoding is deterministic: the same pixels as without a stride
        np.testing.assert_array_equal(f.rgb, every[f.index])
    with pytest.raises(ConfigError, match="stride 0"):
        iter_frames(clip, stride=0)


def test_frames_stream_lazily(clip):
    frames = iter_frames(clip)
    first = next(frames)
    assert first.index == 0
    frames.close()  # stopping early closes the file


@pytest.mark.parametrize("encoder", ENCODERS)
def test_odd_sizes_are_padded_to_even(encoder, tmp_path):
    video = write_clip(tmp_path / "odd.mp4", n=4, width=W - 1, height=H - 1, encoder=encoder)
    assert video.coded_size == (W, H) and video.frames == 4
    info = video_info(tmp_path / "odd.mp4")
    assert (info.width, info.height) == (W, H)
    frames = list(iter_frames(tmp_path / "odd.mp4"))
    assert [f.index for f in frames] == [0, 1, 2, 3]
    for f in frames:
        assert f.rgb.shape == (H, W, 3)
        assert_is_frame(f.rgb[: H - 1, : W - 1], f.index, W - 1, H - 1)
        # the padding repeats the last column and row
        assert np.abs(f.rgb[:, -1].astype(int) - f.rgb[:, -2]).mean() < 4
        assert np.abs(f.rgb[-1].astype(int) - f.rgb[-2]).mean() < 4


def test_mpeg4_fallback_round_trip(tmp_path):
    write_clip(tmp_path / "m.mp4", n=5, encoder="mpeg4")
    assert video_info(tmp_path / "m.mp4") == VideoInfo(5, FPS, W, H, "yuv420p")
    for f in iter_frames(tmp_path / "m.mp4"):
        assert_is_frame(f.rgb, f.index)


def test_writer_is_atomic(tmp_path):
    out = tmp_path / "v.mp4"
    out.write_bytes(b"old")
    with pytest.raises(RuntimeError, match="boom"), VideoWriter(out, FPS, W, H) as video:
        video.write(drawn(0))
        raise RuntimeError("boom")
    assert out.read_bytes() == b"old"  # the old file is untouched and no temporary is left
    assert sorted(p.name for p in tmp_path.iterdir()) == ["v.mp4"]
    write_clip(out, n=2)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["v.mp4"]
    assert video_info(out).frames == 2


def test_writer_refuses_bad_frames_and_settings(tmp_path):
    with (
        pytest.raises(ValueError, match=r"expected uint8 \(48, 64, 3\)"),
        VideoWriter(tmp_path / "v.mp4", FPS, W, H) as video,
    ):
        video.write(drawn(0)[:-1])
    assert list(tmp_path.iterdir()) == []
    with (
        pytest.raises(DataError, match="v.mp4: no frames to write"),
        VideoWriter(tmp_path / "v.mp4", FPS, W, H),
    ):
        pass
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(ConfigError, match="v.webm: videos are written as"):
        VideoWriter(tmp_path / "v.webm", FPS, W, H)
    with pytest.raises(ConfigError, match="frame rate 0"):
        VideoWriter(tmp_path / "v.mp4", 0, W, H)


def test_ntsc_rate_is_exact(tmp_path):
    with VideoWriter(tmp_path / "v.mp4", 30000 / 1001, W, H) as video:
        video.write(drawn(0))
    assert video.rate.numerator == 30000 and video.rate.denominator == 1001
    assert video_info(tmp_path / "v.mp4").fps == pytest.approx(30000 / 1001)


def _audio_only(path):
    with av.open(str(path), "w") as out:
        stream = out.add_stream("pcm_s16le", rate=8000)
        frame = av.AudioFrame.from_ndarray(
            np.zeros((1, 800), np.int16), format="s16", layout="mono"
        )
        frame.sample_rate, frame.pts = 8000, 0
        out.mux(stream.encode(frame))
        out.mux(stream.encode(None))


def test_unreadable_videos_are_one_line_data_errors(clip, tmp_path):
    garbage = tmp_path / "garbage.mp4"
    garbage.write_bytes(bytes(np.random.default_rng(0).integers(0, 256, 3000, dtype=np.uint8)))
    truncated = tmp_path / "truncated.mp4"
    data = clip.read_bytes()
    truncated.write_bytes(data[: len(data) // 2])
    _audio_only(tmp_path / "audio.mkv")
    cases = [
        (garbage, "garbage.mp4: not a readable video"),
        (tmp_path / "audio.mkv", "audio.mkv: no video stream"),
        (tmp_path / "missing.mp4", "missing.mp4: file not found"),
    ]
    for path, message in cases:
        for read in (video_info, lambda p: list(iter_frames(p))):
            with pytest.raises(DataError, match=message) as err:
                read(path)
            assert "\n" not in str(err.value)
    # the index at the front survives; the frames it points to are cut off
    with pytest.raises(DataError, match=r"truncated.mp4: cannot decode frame \d+ .*truncated"):
        list(iter_frames(truncated))


def test_frame_names_sort_in_frame_order():
    assert frame_name("runs/drive01.mp4", 123) == "drive01_f000123.png"
    assert frame_name("drive01.mov", 5, frames=12) == "drive01_f000005.png"
    assert frame_name("d.mp4", 5, frames=2_000_000) == "d_f0000005.png"
    names = [frame_name("d.mp4", i, frames=10**7) for i in (9, 10, 999_999, 1_000_000)]
    assert names == sorted(names)


def test_missing_pyav_is_a_config_error(clip, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "av", None)  # `import av` now raises ImportError
    with pytest.raises(ConfigError, match=r"needs PyAV: pip install 'offroad-seg\[video\]'"):
        video_info(clip)
    with pytest.raises(ConfigError, match="reading video needs PyAV"):
        next(iter_frames(clip))
    with pytest.raises(ConfigError, match="writing video needs PyAV"):
        write_clip(tmp_path / "v.mp4")
