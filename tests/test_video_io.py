"""MP4 writing (H.264 through ffmpeg, else OpenCV), the job in the container's metadata, sidecar JSON and
PNG frames."""

from __future__ import annotations

import json
import struct

import numpy as np
import pytest

from studio.media import video as V


def _frames(t: int = 9, h: int = 48, w: int = 64) -> np.ndarray:
    # smooth gradients: lossy codecs keep them close, so read-back can be checked by value
    y, x = np.mgrid[0:h, 0:w]
    out = [np.stack([(x * 4 + i * 20) % 256, (y * 5) % 256, np.full_like(x, 40 + 20 * i)], -1) for i in range(t)]
    return np.stack(out).astype(np.uint8)


@pytest.mark.parametrize("encoder", ["auto", "opencv"])
def test_written_mp4_reads_back_with_frame_count_size_and_content(tmp_path, encoder):
    frames = _frames()
    path = tmp_path / "v.mp4"
    codec = V.write_mp4(path, frames, fps=16, encoder=encoder)
    assert codec in V.CODECS
    info = V.video_info(path)
    assert (info["frames"], info["width"], info["height"]) == (9, 64, 48)
    assert info["fps"] == pytest.approx(16)
    back = np.stack(list(V.read_frames(path)))
    assert back.shape == frames.shape
    assert np.abs(back.astype(int) - frames.astype(int)).mean() < 12  # lossy, but the same picture


def test_job_goes_into_the_container_metadata_and_the_file_still_plays(tmp_path):
    path = tmp_path / "v.mp4"
    job = {"kind": "video", "prompt": "a fox — ünïcode", "seed": 7}
    V.write_mp4(path, _frames(), fps=8, metadata=job)
    tags = V.read_mp4_metadata(path)
    assert json.loads(tags["©cmt"]) == job
    assert tags["©too"] == "Studio"
    assert V.read_job(path) == job  # no sidecar: read from the container
    assert V.video_info(path)["frames"] == 9
    # writing again replaces the tags instead of stacking a second meta box
    V.write_mp4_metadata(path, {"©cmt": "{}"})
    assert V.read_mp4_metadata(path) == {"©cmt": "{}"}
    assert len(list(V.read_frames(path))) == 9


def _move_moov_first(path) -> None:
    """Rewrite an MP4 with its moov before mdat (as 'faststart' files are), fixing the chunk offsets."""
    data = path.read_bytes()
    boxes = list(V._boxes(data))
    moov = next(b for b in boxes if b[0] == b"moov")
    first_media = min(s for k, s, _, _ in boxes if k == b"mdat")
    assert moov[1] > first_media, "OpenCV writes moov last; this test needs that starting point"
    moov_bytes = bytearray(data[moov[1]:moov[3]])
    V._shift_chunk_offsets(moov_bytes, len(moov_bytes))
    rest = b"".join(data[s:e] for k, s, _, e in boxes if k != b"moov" and s >= first_media)
    path.write_bytes(data[:first_media] + bytes(moov_bytes) + rest)


def test_metadata_edit_moves_chunk_offsets_when_moov_comes_first(tmp_path):
    path = tmp_path / "v.mp4"
    frames = _frames()
    V.write_mp4(path, frames, fps=8, encoder="opencv")  # OpenCV writes moov last
    before = np.stack(list(V.read_frames(path)))
    _move_moov_first(path)
    np.testing.assert_array_equal(np.stack(list(V.read_frames(path))), before)
    V.write_mp4_metadata(path, {"©cmt": json.dumps({"x": "y" * 5000})})  # grows moov by ~5 kB
    assert json.loads(V.read_mp4_metadata(path)["©cmt"]) == {"x": "y" * 5000}
    np.testing.assert_array_equal(np.stack(list(V.read_frames(path))), before)


def test_unique_paths_never_overwrite_videos_or_sidecars(tmp_path):
    a = V.unique_video_path(tmp_path, "clip")
    assert a.name == "clip.mp4"
    V.write_sidecar(a, {"n": 1})
    b = V.unique_video_path(tmp_path, "clip")
    assert b != a and b.suffix == ".mp4"
    b.with_suffix(".json").write_text("{}")  # a stray sidecar for the next name
    c = V.unique_video_path(tmp_path, "clip")
    assert c not in (a, b) and not c.with_suffix(".json").exists()
    with pytest.raises(FileExistsError):
        V.write_sidecar(a, {"n": 2})
    assert json.loads(a.with_suffix(".json").read_text()) == {"n": 1}


def test_frames_export_as_png(tmp_path):
    from PIL import Image

    frames = _frames(t=3)
    paths = V.export_png_frames(frames, tmp_path / "png", "clip")
    assert [p.name for p in paths] == ["clip-0001.png", "clip-0002.png", "clip-0003.png"]
    np.testing.assert_array_equal(np.asarray(Image.open(paths[1])), frames[1])
    with pytest.raises(FileExistsError):
        V.export_png_frames(frames, tmp_path / "png", "clip")
    video = tmp_path / "v.mp4"
    V.write_mp4(video, frames, fps=8)
    assert len(V.export_video_frames(video, tmp_path / "from_video")) == 3


def test_bad_input_is_refused_clearly(tmp_path):
    with pytest.raises(ValueError, match="uint8"):
        V.write_mp4(tmp_path / "v.mp4", np.zeros((2, 8, 8, 3), np.float32), fps=8)
    broken = tmp_path / "broken.mp4"
    broken.write_bytes(struct.pack(">I4s", 8, b"ftyp") + struct.pack(">I4s", 99, b"mdat"))
    with pytest.raises(ValueError, match="corrupt MP4"):
        V.read_mp4_metadata(broken)
    assert V.read_job(broken) is None
    nomoov = tmp_path / "nomoov.mp4"
    nomoov.write_bytes(struct.pack(">I4s", 8, b"ftyp"))
    with pytest.raises(ValueError, match="no movie header"):
        V.write_mp4_metadata(nomoov, {"©cmt": "x"})


def test_h264_through_ffmpeg_when_there_is_one_with_the_job_inside(tmp_path):
    if V.ffmpeg_exe() is None:
        pytest.skip("no ffmpeg here (setup.sh installs imageio-ffmpeg)")
    path = tmp_path / "v.mp4"
    job = {"kind": "video", "prompt": "waves", "seed": 3}
    assert V.write_mp4(path, _frames(), fps=16, metadata=job, encoder="ffmpeg") == "avc1"
    info = V.video_info(path)
    assert info["codec"] in ("h264", "avc1") and (info["frames"], info["width"], info["height"]) == (9, 64, 48)
    assert V.read_job(path) == job  # the tags went in after ffmpeg's faststart moov, offsets moved
    back = np.stack(list(V.read_frames(path)))
    assert np.abs(back.astype(int) - _frames().astype(int)).mean() < 6  # CRF 17: close to the original


def test_odd_sides_and_no_ffmpeg_still_write_a_video(tmp_path, monkeypatch):
    odd = _frames(t=3, h=47, w=63)
    for encoder in ("auto", "opencv"):  # both encoders drop the odd last row and column
        codec = V.write_mp4(tmp_path / f"odd-{encoder}.mp4", odd, fps=8, encoder=encoder)
        info = V.video_info(tmp_path / f"odd-{encoder}.mp4")
        assert (info["width"], info["height"], info["frames"]) == (62, 46, 3) and codec in V.CODECS
    monkeypatch.setattr(V, "ffmpeg_exe", lambda: None)
    assert V.write_mp4(tmp_path / "v.mp4", _frames(), fps=8) in V.CODECS
    assert V.video_info(tmp_path / "v.mp4")["frames"] == 9
    with pytest.raises(OSError, match="imageio-ffmpeg"):
        V.write_mp4(tmp_path / "w.mp4", _frames(), fps=8, encoder="ffmpeg")
    with pytest.raises(ValueError, match="encoder"):
        V.write_mp4(tmp_path / "x.mp4", _frames(), fps=8, encoder="gstreamer")
