"""MP4 writing and reading, the job's parameters in the container, frames as PNG.

Torch-free (numpy + cv2, plus an ffmpeg executable when there is one), so the GUI's player and
gallery use it too.

Writing prefers H.264 through ffmpeg (the static build the imageio-ffmpeg package ships, else one on
PATH): yuv420p, CRF 17, so the files play in browsers, phones and editors. Without ffmpeg, OpenCV
picks the encoder: H.264 ('avc1') where its FFmpeg build has one (the pip wheels usually do not
ship libx264), else MPEG-4 Part 2 ('mp4v'), which every build has. Neither can write our tags, so
`write_mp4_metadata` edits the finished file: it adds an iTunes-style metadata list
(moov/udta/meta/ilst, the iTunes-style tags FFmpeg reads as `comment` and `encoder`) holding the
job as JSON in '©cmt' and "Studio" in '©too'. If the movie header comes before the media data (as
ffmpeg's faststart files have it), every chunk offset (stco/co64) is moved by the bytes added, so
the file stays playable either way. The sidecar `.json` next to the video carries the full job too.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import struct
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from studio.fsutil import atomic_path, atomic_write

CODECS = ("avc1", "mp4v")  # preferred first
ENCODERS = ("auto", "ffmpeg", "opencv")
_codec_cache: dict[str, bool] = {}
log = logging.getLogger(__name__)


# ---------------------------------------------------------------- writing


def codec_works(fourcc: str) -> bool:
    """Whether this OpenCV build can encode an .mp4 with `fourcc` (probed once with a tiny file)."""
    if fourcc not in _codec_cache:
        import cv2

        with tempfile.TemporaryDirectory() as tmp:
            path = os.path.join(tmp, "probe.mp4")
            writer = cv2.VideoWriter(path, cv2.VideoWriter_fourcc(*fourcc), 8.0, (64, 64))
            ok = writer.isOpened()
            if ok:
                writer.write(np.zeros((64, 64, 3), np.uint8))
            writer.release()
            _codec_cache[fourcc] = ok and os.path.getsize(path) > 0
    return _codec_cache[fourcc]


def pick_codec() -> str:
    for fourcc in CODECS:
        if codec_works(fourcc):
            return fourcc
    raise OSError("OpenCV cannot write MP4 here (neither H.264 nor MPEG-4 encoders work): reinstall "
                  "opencv-python, or export the frames as PNG instead.")


def ffmpeg_exe() -> str | None:
    """An ffmpeg executable: imageio-ffmpeg's bundled static build, else one on PATH, else None."""
    try:
        import imageio_ffmpeg

        return imageio_ffmpeg.get_ffmpeg_exe()
    except (ImportError, RuntimeError, OSError):
        return shutil.which("ffmpeg")


def _write_h264_ffmpeg(path: str, frames: np.ndarray, fps: float) -> bool:
    """H.264 (libx264, yuv420p, CRF 17, faststart) through ffmpeg; False where it cannot (no ffmpeg, or
    ffmpeg failed: logged)."""
    t, h, w, _ = frames.shape
    exe = ffmpeg_exe()
    if exe is None:
        return False
    cmd = [exe, "-hide_banner", "-loglevel", "error", "-y", "-f", "rawvideo", "-pix_fmt", "rgb24",
           "-s", f"{w}x{h}", "-r", f"{float(fps):g}", "-i", "-",
           "-vf", "crop=trunc(iw/2)*2:trunc(ih/2)*2",  # yuv420p needs even sides (OpenCV drops the odd line too)
           "-c:v", "libx264", "-pix_fmt", "yuv420p", "-crf", "17", "-preset", "medium",
           "-movflags", "+faststart", path]
    try:
        done = subprocess.run(cmd, input=np.ascontiguousarray(frames).tobytes(), capture_output=True, timeout=600)
    except (OSError, subprocess.TimeoutExpired) as exc:
        log.warning("ffmpeg could not run (%s); writing with OpenCV", exc)
        return False
    if done.returncode != 0 or not os.path.exists(path) or os.path.getsize(path) == 0:
        log.warning("ffmpeg failed (%s); writing with OpenCV", done.stderr.decode(errors="replace").strip()[-300:])
        return False
    return True


def write_mp4(path: str | os.PathLike, frames: np.ndarray, fps: float, metadata: dict | None = None,
              encoder: str = "auto") -> str:
    """uint8 RGB frames (T, H, W, 3) -> an MP4 at `path` (overwritten); returns the codec used ("avc1" is H.264).

    `metadata` (a JSON-able dict, the job) goes into the container's comment tag. `encoder`: "auto"
    (ffmpeg's H.264 where there is an ffmpeg, else OpenCV), "ffmpeg" or "opencv".
    """
    if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != np.uint8:
        raise ValueError(f"frames must be uint8 (T, H, W, 3), got {frames.dtype} {frames.shape}")
    if encoder not in ENCODERS:
        raise ValueError(f"encoder must be one of {', '.join(ENCODERS)}, got {encoder!r}")
    # Encoders write to a temporary name; only a finished file gets the final one (studio.fsutil).
    with atomic_path(path) as tmp:
        codec = _encode(tmp, frames, fps, encoder)
        if metadata is not None:
            write_mp4_metadata(tmp, {"©cmt": json.dumps(metadata, ensure_ascii=False), "©too": "Studio"})
    return codec


def _encode(path: Path, frames: np.ndarray, fps: float, encoder: str) -> str:
    import cv2

    if encoder != "opencv" and _write_h264_ffmpeg(os.fspath(path), frames, fps):
        return "avc1"
    if encoder == "ffmpeg":
        raise OSError("ffmpeg could not write the video: install imageio-ffmpeg (pip install imageio-ffmpeg) "
                      "or put ffmpeg on PATH")
    t, h, w, _ = frames.shape
    codec = pick_codec()
    writer = cv2.VideoWriter(os.fspath(path), cv2.VideoWriter_fourcc(*codec), float(fps), (w, h))
    if not writer.isOpened():
        raise OSError(f"OpenCV could not open {path} for writing: is the folder writable?")
    try:
        for frame in frames:
            writer.write(np.ascontiguousarray(frame[..., ::-1]))  # OpenCV wants BGR
    finally:
        writer.release()
    if os.path.getsize(path) == 0:
        raise OSError(f"OpenCV wrote nothing to {path}: the disk may be full.")
    return codec


def unique_video_path(folder: str | os.PathLike, stem: str) -> Path:
    """A new `folder/stem.mp4` (numbered if taken) whose sidecar `.json` does not exist either."""
    from studio.library.pngmeta import unique_output_path

    while True:
        path = unique_output_path(folder, stem, ".mp4")
        if not path.with_suffix(".json").exists():
            return path
        # a stray sidecar holds this name: the empty placeholder stays, so the next call numbers past it


def write_sidecar(video: str | os.PathLike, job: dict) -> Path:
    """`video.json` with the full job; refuses to overwrite."""
    return atomic_write(Path(video).with_suffix(".json"), json.dumps(job, ensure_ascii=False, indent=2),
                        exclusive=True)


def export_png_frames(frames: np.ndarray, folder: str | os.PathLike, stem: str) -> list[Path]:
    """Each uint8 RGB frame as `folder/stem-0001.png`, ... (never overwriting: a taken name gets a new folder)."""
    from PIL import Image

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    out = []
    for i, frame in enumerate(frames):
        path = folder / f"{stem}-{i + 1:04d}.png"
        image = Image.fromarray(frame, "RGB")
        out.append(atomic_write(path, lambda fh, image=image: image.save(fh, format="PNG"), exclusive=True))
    return out


# ---------------------------------------------------------------- reading


def read_frames(path: str | os.PathLike) -> Iterator[np.ndarray]:
    """uint8 RGB (H, W, 3) frames of a video file, one at a time."""
    import cv2

    cap = cv2.VideoCapture(os.fspath(path))
    if not cap.isOpened():
        raise OSError(f"Cannot open the video {path}")
    try:
        while True:
            ok, frame = cap.read()
            if not ok:
                return
            yield frame[..., ::-1].copy()
    finally:
        cap.release()


def video_info(path: str | os.PathLike) -> dict:
    """{'frames', 'fps', 'width', 'height', 'codec'} as the container states them (codec: the FourCC,
    e.g. 'h264' / 'avc1' for H.264, 'mp4v' for MPEG-4 Part 2)."""
    import cv2

    cap = cv2.VideoCapture(os.fspath(path))
    if not cap.isOpened():
        raise OSError(f"Cannot open the video {path}")
    try:
        fourcc = int(cap.get(cv2.CAP_PROP_FOURCC))
        codec = "".join(chr((fourcc >> (8 * i)) & 0xFF) for i in range(4)).strip("\0 ").lower()
        return {"frames": int(cap.get(cv2.CAP_PROP_FRAME_COUNT)), "fps": float(cap.get(cv2.CAP_PROP_FPS)),
                "width": int(cap.get(cv2.CAP_PROP_FRAME_WIDTH)), "height": int(cap.get(cv2.CAP_PROP_FRAME_HEIGHT)),
                "codec": codec}
    finally:
        cap.release()


def export_video_frames(video: str | os.PathLike, folder: str | os.PathLike) -> list[Path]:
    """Every frame of an MP4 as numbered PNGs in `folder`."""
    return export_png_frames(np.stack(list(read_frames(video))), folder, Path(video).stem)


def read_job(video: str | os.PathLike) -> dict | None:
    """The job of a Studio video: the sidecar JSON when present, else the container's comment tag."""
    side = Path(video).with_suffix(".json")
    try:
        if side.is_file():
            return json.loads(side.read_text(encoding="utf-8"))
        text = read_mp4_metadata(video).get("©cmt")
        return json.loads(text) if text else None
    except (OSError, ValueError):
        return None


# ---------------------------------------------------------------- MP4 boxes

_CONTAINERS = {b"moov", b"trak", b"mdia", b"minf", b"stbl", b"udta", b"edts", b"dinf"}


def _boxes(data: bytes, start: int = 0, end: int | None = None) -> Iterator[tuple[bytes, int, int, int]]:
    """(type, box start, payload start, box end) of the boxes in data[start:end]."""
    end = len(data) if end is None else end
    pos = start
    while pos + 8 <= end:
        size, kind = struct.unpack_from(">I4s", data, pos)
        head = 8
        if size == 1:
            if pos + 16 > end:
                break
            size = struct.unpack_from(">Q", data, pos + 8)[0]
            head = 16
        elif size == 0:
            size = end - pos
        if size < head or pos + size > end:
            raise ValueError(f"corrupt MP4: box {kind!r} at {pos} has size {size}")
        yield kind, pos, pos + head, pos + size
        pos += size


def _box(kind: bytes, payload: bytes) -> bytes:
    return struct.pack(">I4s", 8 + len(payload), kind) + payload


def _ilst(tags: dict[str, str]) -> bytes:
    items = b""
    for name, value in tags.items():
        key = name.encode("latin-1")  # '©' is 0xA9 in the MP4 atom names
        if len(key) != 4:
            raise ValueError(f"MP4 tag names are four bytes: {name!r}")
        data = _box(b"data", struct.pack(">II", 1, 0) + value.encode("utf-8"))  # type 1 = UTF-8
        items += _box(key, data)
    return _box(b"ilst", items)


def _meta(tags: dict[str, str]) -> bytes:
    hdlr = _box(b"hdlr", struct.pack(">I", 0) + struct.pack(">I4s", 0, b"mdir") + b"appl" + bytes(9))
    return _box(b"meta", struct.pack(">I", 0) + hdlr + _ilst(tags))  # meta is a full box: version + flags


def write_mp4_metadata(path: str | os.PathLike, tags: dict[str, str]) -> None:
    """Put `tags` in moov/udta/meta/ilst (replacing an existing meta box); atomic rewrite of the file."""
    path = Path(path)
    data = path.read_bytes()
    top = list(_boxes(data))
    moov = next((b for b in top if b[0] == b"moov"), None)
    if moov is None:
        raise ValueError(f"{path.name} has no movie header (moov): not a finished MP4")
    _, m_start, m_payload, m_end = moov
    kept = b""
    udta_payload = b""
    for kind, start, payload, end in _boxes(data, m_payload, m_end):
        if kind == b"udta":
            udta_payload = b"".join(data[s:e] for k, s, _, e in _boxes(data, payload, end) if k != b"meta")
        else:
            kept += data[start:end]
    new_moov = bytearray(_box(b"moov", kept + _box(b"udta", udta_payload + _meta(tags))))
    delta = len(new_moov) - (m_end - m_start)
    if any(kind == b"mdat" and start > m_start for kind, start, _, _ in top):
        _shift_chunk_offsets(new_moov, delta)
    out = data[:m_start] + bytes(new_moov) + data[m_end:]
    atomic_write(path, out)


def _shift_chunk_offsets(moov: bytearray, delta: int) -> None:
    """Add `delta` to every stco / co64 entry inside this moov box (in place)."""

    def walk(start: int, end: int) -> None:
        for kind, _, payload, box_end in _boxes(bytes(moov), start, end):
            if kind in _CONTAINERS:
                walk(payload, box_end)
            elif kind in (b"stco", b"co64"):
                count = struct.unpack_from(">I", moov, payload + 4)[0]
                fmt, width = (">I", 4) if kind == b"stco" else (">Q", 8)
                for i in range(count):
                    at = payload + 8 + i * width
                    struct.pack_into(fmt, moov, at, struct.unpack_from(fmt, moov, at)[0] + delta)

    _, _, payload, end = next(_boxes(bytes(moov)))
    walk(payload, end)


def read_mp4_metadata(path: str | os.PathLike) -> dict[str, str]:
    """The moov/udta/meta/ilst text tags of an MP4 ({'©cmt': ..., '©too': ...})."""
    data = Path(path).read_bytes()
    out: dict[str, str] = {}
    for kind, _, payload, end in _boxes(data):
        if kind != b"moov":
            continue
        for k2, _, p2, e2 in _boxes(data, payload, end):
            if k2 != b"udta":
                continue
            for k3, _, p3, e3 in _boxes(data, p2, e2):
                if k3 != b"meta":
                    continue
                for k4, _, p4, e4 in _boxes(data, p3 + 4, e3):  # skip the full box's version/flags
                    if k4 != b"ilst":
                        continue
                    for item, _, p5, e5 in _boxes(data, p4, e4):
                        for k6, _, p6, e6 in _boxes(data, p5, e5):
                            if k6 == b"data" and e6 - p6 >= 8:
                                out[item.decode("latin-1")] = data[p6 + 8:e6].decode("utf-8", "replace")
    return out
