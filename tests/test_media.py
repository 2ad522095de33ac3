"""letstalk_rt.media: decoding any audio to 16 kHz mono, streaming resampling, atomic mp4 writing, clean errors."""

from __future__ import annotations

import os
import re
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
import pytest
from PIL import Image

from letstalk_rt.errors import InputError, LetsTalkError, OutputError
from letstalk_rt.media import (
    FPS,
    SAMPLE_RATE,
    MediaInfo,
    PcmResampler,
    TempoStretcher,
    VideoWriter,
    frame_pcm,
    load_audio,
    load_image,
    probe,
    read_frames,
)

FIXTURES = Path(__file__).parent / "fixtures"
ASSETS = Path(__file__).parents[1] / "letstalk_rt" / "assets"
SPF = SAMPLE_RATE // FPS  # 640 samples per video frame

# --------------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------------


def stereo_tone(seconds: float, rate: int, freq: float = 440.0) -> np.ndarray:
    """(n, 2) float32: the same sine at 0.5 (left) and 0.3 (right); its mono mix is 0.4 * sine."""
    t = np.arange(round(seconds * rate)) / rate
    s = np.sin(2 * np.pi * freq * t)
    return np.stack([0.5 * s, 0.3 * s], axis=1).astype(np.float32)


def write_audio_file(path: Path, pcm: np.ndarray, rate: int, codec: str) -> Path:
    """Encode (n, 2) float32 with PyAV, cut into the codec's frame size."""
    with av.open(str(path), "w") as out:
        stream = out.add_stream(codec, rate=rate, layout="stereo")
        cc = stream.codec_context
        cc.open()
        size = cc.frame_size or len(pcm)
        to_codec = av.AudioResampler(format=cc.format, layout="stereo", rate=rate)
        for i in range(0, len(pcm), size):
            chunk = np.ascontiguousarray(pcm[i:i + size]).reshape(1, -1)  # packed: (1, n * 2)
            frame = av.AudioFrame.from_ndarray(chunk, format="flt", layout="stereo")
            frame.sample_rate, frame.pts, frame.time_base = rate, i, Fraction(1, rate)
            for f in to_codec.resample(frame):
                for packet in stream.encode(f):
                    out.mux(packet)
        for packet in stream.encode(None):
            out.mux(packet)
    return path


def dominant_hz(x: np.ndarray, rate: int) -> float:
    spectrum = np.abs(np.fft.rfft(x * np.hanning(len(x))))
    return float(np.argmax(spectrum) * rate / len(x))


def listing(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir())


# --------------------------------------------------------------------------------------------------
# load_audio
# --------------------------------------------------------------------------------------------------

FORMATS = [("wav", "pcm_s16le", 44100), ("wav", "pcm_s16le", 48000), ("flac", "flac", 44100),
           ("mp3", "libmp3lame", 44100), ("mp3", "libmp3lame", 48000), ("m4a", "aac", 44100),
           ("m4a", "aac", 48000), ("ogg", "libopus", 48000)]  # Opus has no 44.1 kHz mode


@pytest.mark.parametrize("ext,codec,rate", FORMATS)
def test_load_audio_any_format_to_16k_mono(tmp_path, ext, codec, rate):
    seconds = 1.5
    path = write_audio_file(tmp_path / f"tone.{ext}", stereo_tone(seconds, rate), rate, codec)
    audio = load_audio(path)
    assert audio.dtype == np.float32 and audio.ndim == 1
    assert abs(len(audio) / SAMPLE_RATE - seconds) <= 0.010  # encoder delay and padding removed
    assert abs(dominant_hz(audio, SAMPLE_RATE) - 440) < 2
    mid = audio[len(audio) // 4: 3 * len(audio) // 4]
    peak = np.abs(mid).max()
    assert abs(peak - 0.4) < (0.005 if codec in ("pcm_s16le", "flac") else 0.05)  # (L + R) / 2, not 0.707 (L + R)
    assert np.abs(audio).max() <= 1.0


def test_load_audio_stereo_full_scale_does_not_clip(tmp_path):
    rate = 48000
    pcm = np.repeat(stereo_tone(0.5, rate)[:, :1] * 1.9, 2, axis=1)  # both channels at 0.95
    audio = load_audio(write_audio_file(tmp_path / "loud.wav", pcm, rate, "pcm_s16le"))
    assert 0.93 < np.abs(audio).max() < 0.97


def test_load_audio_lossless_matches_signal(tmp_path):
    """16 kHz mono wav in -> the same samples out (no resampling, just int16 scaling)."""
    rng = np.random.default_rng(0)
    pcm = (rng.standard_normal(16000) * 3000).astype(np.int16)
    path = tmp_path / "mono16k.wav"
    with av.open(str(path), "w") as out:
        stream = out.add_stream("pcm_s16le", rate=16000, layout="mono")
        frame = av.AudioFrame.from_ndarray(pcm[None], format="s16", layout="mono")
        frame.sample_rate = 16000
        for packet in [*stream.encode(frame), *stream.encode(None)]:
            out.mux(packet)
    audio = load_audio(path)
    np.testing.assert_allclose(audio, pcm / 32768.0, atol=1e-6)


def test_load_audio_from_video_track(tmp_path):
    out = tmp_path / "clip.mp4"
    tone = 0.3 * np.sin(2 * np.pi * 300 * np.arange(10 * SPF) / SAMPLE_RATE)
    with VideoWriter(out, 32) as writer:
        for i in range(10):
            writer.write_frame(np.zeros((32, 32, 3), np.uint8))
            writer.write_audio(tone[i * SPF:(i + 1) * SPF])
    audio = load_audio(out)
    assert len(audio) == 10 * SPF  # AAC priming and last-frame padding trimmed exactly
    assert abs(dominant_hz(audio, SAMPLE_RATE) - 300) < 5


def test_load_audio_other_rate(tmp_path):
    path = write_audio_file(tmp_path / "t.flac", stereo_tone(1.0, 44100), 44100, "flac")
    assert len(load_audio(path, sample_rate=24000)) == 24000


# --------------------------------------------------------------------------------------------------
# malformed inputs: each raises InputError with one line naming the file
# --------------------------------------------------------------------------------------------------

BAD_AUDIO = ["not_audio.wav", "truncated.wav", "truncated.mp3", "truncated.m4a", "empty.wav", "video_no_audio.mp4",
             "not_image.png"]
BAD_IMAGES = ["not_image.png", "not_audio.wav", "empty.wav", "truncated.mp3"]


@pytest.mark.parametrize("name", BAD_AUDIO)
def test_bad_audio_fixture_raises_input_error(name):
    path = FIXTURES / name
    assert path.exists() and path.stat().st_size < 20_000
    with pytest.raises(InputError) as info:
        load_audio(path)
    message = str(info.value)
    assert "\n" not in message and name in message and "audio" in message


def test_a_new_writer_of_an_output_deletes_what_a_killed_one_left_of_it(tmp_path):
    """`letstalk generate --out talk.mp4` killed (SIGKILL, out of memory) leaves `.talk.mp4.partial-PID-N`, hidden and
    never finished; the next writer of talk.mp4 deletes it. A writer of another output, and a live writer's file
    however old (locked while written), are left alone."""
    from conftest import killed_video_writer

    mine = killed_video_writer(tmp_path / "talk.mp4")
    other = killed_video_writer(tmp_path / "other.mp4")
    live = VideoWriter(tmp_path / "talk.mp4", 32)  # a second writer of the same output, still writing
    os.utime(live._tmp, (0, 0))
    with VideoWriter(tmp_path / "talk.mp4", 32) as writer:
        writer.write_frame(np.zeros((32, 32, 3), np.uint8))
        assert not mine.exists() and other.exists() and live._tmp.exists()
    live.abort()
    assert sorted(p.name for p in tmp_path.iterdir()) == [other.name, "talk.mp4"]


@pytest.mark.parametrize("name, said", [("no_face.png", "is an image (PNG), not audio"),
                                        ("video_no_audio.mp4", "has no audio stream (it holds video)")])
def test_a_picture_or_a_silent_video_given_as_audio_is_called_what_it_is(name, said):
    """The photo and the speech swapped (an easy slip with two file arguments): the error says the file is an image."""
    with pytest.raises(InputError, match=re.escape(said)):
        load_audio(FIXTURES / name)


@pytest.mark.parametrize("name, said", [("video_no_audio.mp4", "is a video (H264), not a photo"),
                                        ("empty.wav", "is audio (PCM), not a photo")])
def test_a_video_or_speech_given_as_the_portrait_is_called_what_it_is(name, said):
    """The other way round: a clip given where its still belongs (with how to take one), or the speech."""
    with pytest.raises(InputError, match=re.escape(said)) as info:
        load_image(FIXTURES / name)
    assert ("ffmpeg -i VIDEO -frames:v 1" in str(info.value)) == ("video" in said)


@pytest.mark.parametrize("name", BAD_IMAGES)
def test_bad_image_fixture_raises_input_error(name):
    with pytest.raises(InputError) as info:
        load_image(FIXTURES / name)
    assert "\n" not in str(info.value) and name in str(info.value) and "image" in str(info.value)


def test_missing_and_directory_paths(tmp_path):
    for fn in (load_audio, load_image, probe):
        with pytest.raises(InputError, match="does not exist"):
            fn(tmp_path / "missing.file")
        with pytest.raises(InputError, match="is a directory"):
            fn(tmp_path)
    with pytest.raises(InputError, match="does not exist"):
        read_frames(tmp_path / "missing.mp4")  # eager: at the call, not at the first next()


def test_probe_and_read_frames_on_non_video():
    with pytest.raises(InputError):
        probe(FIXTURES / "not_audio.wav")
    with pytest.raises(InputError, match="no video stream"):
        list(read_frames(FIXTURES / "empty.wav"))


# --------------------------------------------------------------------------------------------------
# load_image
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["RGB", "L", "RGBA", "P", "LA", "I;16", "CMYK"])
def test_load_image_modes_to_rgb(tmp_path, mode):
    rgb = np.zeros((20, 30, 3), np.uint8)
    rgb[:, :15] = (200, 40, 40)
    im = Image.fromarray(rgb)
    if mode == "I;16":
        im = Image.fromarray((np.asarray(im.convert("L"), np.uint16) * 257).astype(np.uint16))
    else:
        im = im.convert(mode)
    path = tmp_path / ("x.jpg" if mode == "CMYK" else "x.png")
    im.save(path)
    out = load_image(path)
    assert out.dtype == np.uint8 and out.shape == (20, 30, 3)
    assert out[:, :15].mean() > out[:, 15:].mean()  # content survives the conversion


def test_load_image_alpha_composited_on_white(tmp_path):
    rgba = np.zeros((8, 8, 4), np.uint8)  # fully transparent black
    Image.fromarray(rgba).save(tmp_path / "t.png")
    assert (load_image(tmp_path / "t.png") == 255).all()


def test_transparency_goes_on_a_key_colour_when_asked(tmp_path):
    from letstalk_rt.media import parse_colour

    path = tmp_path / "cutout.png"
    rgba = np.zeros((8, 8, 4), np.uint8)
    rgba[2:6, 2:6] = (200, 30, 40, 255)  # an opaque square in a transparent picture
    Image.fromarray(rgba, "RGBA").save(path)
    rgb = load_image(path, parse_colour("#00FF00", "--background"))
    assert (rgb[0, 0] == (0, 255, 0)).all() and (rgb[3, 3] == (200, 30, 40)).all()
    assert (load_image(path)[0, 0] == 255).all()  # white by default
    for bad in ("00ff0", "green", "#00ff00ff", ""):
        with pytest.raises(InputError, match="RRGGBB"):
            parse_colour(bad, "--background")


def test_load_image_applies_exif_rotation(tmp_path):
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90 degrees clockwise for display
    Image.new("RGB", (40, 20), (0, 128, 0)).save(tmp_path / "phone.jpg", exif=exif)
    assert load_image(tmp_path / "phone.jpg").shape == (40, 20, 3)


def test_a_large_jpeg_is_decoded_scaled_down_and_only_a_bomb_is_refused(tmp_path, monkeypatch):
    """A phone's 48-200 megapixel photo: a JPEG is decoded scaled down by libjpeg as it decodes (to 1..2x
    PHOTO_DECODE_SIDE: a portrait keeps 1280 px at most), upright, with no warning printed; Pillow refused one over
    2 x MAX_IMAGE_PIXELS outright ("could be decompression bomb DOS attack") and decoded one over MAX_IMAGE_PIXELS whole
    (108 MP: 2.8 GB). A PNG, which cannot be decoded scaled down, is still refused past Pillow's limit, and so is a
    JPEG still too large at 1/8. Here at a small scale: the limits lowered, a 512 px photo for a 200 MP one."""
    import warnings

    from letstalk_rt import media

    monkeypatch.setattr(media, "PHOTO_DECODE_SIDE", 64)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 50_000)  # refused outright over 100 000 px (a 512 x 384 photo)
    rgb = np.zeros((384, 512, 3), np.uint8)
    rgb[:, :256] = (200, 30, 30)  # left half red: the picture is kept, only smaller
    exif = Image.Exif()
    exif[0x0112] = 6  # a phone's portrait: stored sideways
    Image.fromarray(rgb).save(tmp_path / "phone.jpg", quality=95, exif=exif)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no DecompressionBombWarning either
        photo = load_image(tmp_path / "phone.jpg")
    assert photo.shape == (64, 48, 3)  # 1/8 of 512 x 384 (64..128 on its longest side), turned upright
    assert photo[:24].mean(axis=(0, 1))[0] > 150 and photo[-24:].mean() < 40  # the red half on top, once turned
    Image.fromarray(rgb).save(tmp_path / "big.png")
    with pytest.raises(InputError, match="big.png.*decompression bomb"):
        load_image(tmp_path / "big.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1_000)  # 1/8 of it, 64 x 48, still over 2 000 px
    with pytest.raises(InputError, match="phone.jpg.*exceeds"):
        load_image(tmp_path / "phone.jpg")


def test_an_iphones_heic_photo_is_read_and_a_cut_one_is_not_called_a_video(tmp_path):
    """An iPhone saves its photos as HEIC (HEIF holding HEVC): Pillow cannot read it, so it was refused, and FFmpeg,
    asked what the file held, called it "a video (HEVC), not a photo". Now it is read (pi-heif), and a cut one is said
    to be undecodable, not a video. (fixtures/portrait.heic: the bundled portrait at 160 px, saved as HEIC.)"""
    from letstalk_rt.media import not_an_image

    photo = load_image(FIXTURES / "portrait.heic")
    png = np.asarray(Image.open(ASSETS / "portrait.png").convert("RGB").resize((160, 160), Image.LANCZOS), float)
    assert photo.shape == (160, 160, 3)
    assert 10 * np.log10(255 ** 2 / np.mean((photo - png) ** 2)) > 35  # the same picture (HEVC at quality 90)
    (tmp_path / "cut.heic").write_bytes((FIXTURES / "portrait.heic").read_bytes()[:3000])
    with pytest.raises(InputError, match=r"cut.heic' (could not be decoded|is not an image).*PNG/JPEG/HEIC") as e:
        load_image(tmp_path / "cut.heic")
    assert "video" not in str(e.value)
    assert not_an_image(str(FIXTURES / "portrait.heic")) is None


def test_load_image_truncated_png(tmp_path):
    from skimage import data

    Image.fromarray(data.astronaut()).save(tmp_path / "full.png")
    blob = (tmp_path / "full.png").read_bytes()
    (tmp_path / "cut.png").write_bytes(blob[:len(blob) // 3])
    with pytest.raises(InputError, match="cut.png"):
        load_image(tmp_path / "cut.png")


# --------------------------------------------------------------------------------------------------
# VideoWriter, probe, read_frames
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("n", [1, 13, 50])
def test_writer_exact_frames_and_audio(tmp_path, n):
    out = tmp_path / "talk.mp4"
    rng = np.random.default_rng(n)
    colors = rng.integers(30, 220, (n, 3))
    with VideoWriter(out, 64) as writer:
        for i in range(n):
            writer.write_frame(np.broadcast_to(colors[i].astype(np.uint8), (64, 64, 3)))
            writer.write_audio(0.2 * np.sin(2 * np.pi * 200 * np.arange(i * SPF, (i + 1) * SPF) / SAMPLE_RATE))
    assert listing(tmp_path) == ["talk.mp4"]
    info = probe(out)
    assert isinstance(info, MediaInfo)
    assert info.video_frames == n and info.fps == 25 and (info.width, info.height) == (64, 64)
    assert info.audio_rate == SAMPLE_RATE
    assert abs(info.audio_seconds - n / FPS) <= 0.040
    frames = list(read_frames(out))
    assert len(frames) == n and frames[0].shape == (64, 64, 3) and frames[0].dtype == np.uint8
    errors = [np.abs(f.astype(int).mean(axis=(0, 1)) - c).max() for f, c in zip(frames, colors)]
    assert max(errors) < 8  # frames come back in order, colours within yuv420p rounding


def test_writer_audio_in_irregular_chunks(tmp_path):
    """Audio chunks of any length, not aligned to frames or to AAC's 1024: the total is kept."""
    out = tmp_path / "a.mp4"
    n = 40
    audio = (0.3 * np.sin(2 * np.pi * 330 * np.arange(n * SPF) / SAMPLE_RATE)).astype(np.float32)
    cuts = np.sort(np.random.default_rng(0).choice(np.arange(1, len(audio)), 37, replace=False))
    with VideoWriter(out, (48, 32)) as writer:  # (width, height)
        for i in range(n):
            writer.write_frame(np.zeros((32, 48, 3), np.uint8))
        for chunk in np.split(audio, cuts):
            writer.write_audio(chunk)
    info = probe(out)
    assert (info.width, info.height, info.video_frames) == (48, 32, n)
    assert abs(info.audio_seconds - n / FPS) <= 0.040
    back = load_audio(out)
    assert len(back) == len(audio)
    assert np.corrcoef(back[1000:-1000], audio[1000:-1000])[0, 1] > 0.99


def test_writer_without_audio(tmp_path):
    with VideoWriter(tmp_path / "v.mp4", 32, audio=False) as writer:
        for _ in range(3):
            writer.write_frame(np.zeros((32, 32, 3), np.uint8))
        with pytest.raises(RuntimeError):
            writer.write_audio(np.zeros(10, np.float32))
    info = probe(tmp_path / "v.mp4")
    assert info.video_frames == 3 and info.audio_rate == 0 and info.audio_seconds == 0


def test_exception_inside_with_leaves_nothing(tmp_path):
    out = tmp_path / "talk.mp4"
    with pytest.raises(KeyError), VideoWriter(out, 32) as writer:
        writer.write_frame(np.zeros((32, 32, 3), np.uint8))
        writer.write_audio(np.zeros(SPF, np.float32))
        assert any("partial" in name for name in listing(tmp_path))  # it writes beside the target
        raise KeyError("model crashed")
    assert listing(tmp_path) == []


def test_abort_keeps_an_existing_file_untouched(tmp_path):
    out = tmp_path / "talk.mp4"
    out.write_bytes(b"previous result")
    writer = VideoWriter(out, 32)
    writer.write_frame(np.zeros((32, 32, 3), np.uint8))
    writer.abort()
    writer.abort()  # idempotent
    assert out.read_bytes() == b"previous result" and listing(tmp_path) == ["talk.mp4"]


def test_close_replaces_existing_file(tmp_path):
    out = tmp_path / "talk.mp4"
    out.write_bytes(b"previous result")
    with VideoWriter(out, 32) as writer:
        writer.write_frame(np.zeros((32, 32, 3), np.uint8))
    assert probe(out).video_frames == 1 and listing(tmp_path) == ["talk.mp4"]


def test_dropped_writer_removes_its_partial_file(tmp_path):
    writer = VideoWriter(tmp_path / "talk.mp4", 32)
    writer.write_frame(np.zeros((32, 32, 3), np.uint8))
    del writer
    assert listing(tmp_path) == []


def test_no_frames_is_an_error_and_leaves_nothing(tmp_path):
    with pytest.raises(OutputError, match="no video frames"), VideoWriter(tmp_path / "talk.mp4", 32):
        pass
    assert listing(tmp_path) == []


def test_bad_output_paths_fail_at_open(tmp_path):
    with pytest.raises(OutputError, match="no_such_dir") as info:
        VideoWriter(tmp_path / "no_such_dir" / "x.mp4", 32)
    assert "does not exist" in str(info.value) and "\n" not in str(info.value)
    assert not (tmp_path / "no_such_dir").exists()
    with pytest.raises(OutputError, match=re.escape(f"is a directory; give a file name such as '{tmp_path}/out.mp4'")):
        VideoWriter(tmp_path, 32)  # a name the next try is not refused for: an MP4's
    (tmp_path / "file").write_text("x")
    with pytest.raises(OutputError, match="not a directory"):
        VideoWriter(tmp_path / "file" / "x.mp4", 32)
    with pytest.raises(OutputError, match="even"):
        VideoWriter(tmp_path / "odd.mp4", 33)
    with pytest.raises(OutputError, match="such as .*talk.mp4'"):  # MP4 data under another format's name
        VideoWriter(tmp_path / "talk.mkv", 32)
    VideoWriter(tmp_path / "talk.MOV", 32).abort()  # the MP4 family, any case
    assert listing(tmp_path) == ["file"]


def test_unwritable_directory_fails_at_open(tmp_path, monkeypatch):
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        if os.access(locked, os.W_OK):  # root ignores the mode bits: pretend the check says no
            real_access = os.access
            monkeypatch.setattr(os, "access", lambda p, mode: False if Path(p) == locked else real_access(p, mode))
        with pytest.raises(OutputError, match="not writable"):
            VideoWriter(locked / "x.mp4", 32)
        assert listing(locked) == []
    finally:
        locked.chmod(0o700)


def test_write_file_atomic_keeps_the_old_file_on_any_failure(tmp_path):
    """The JSON reports, caches and shards: a write that fails halfway leaves the previous file and no partial."""
    from letstalk_rt.media import write_file_atomic

    out = tmp_path / "report.json"
    write_file_atomic(out, lambda tmp: tmp.write_text("old"))
    assert out.read_text() == "old" and listing(tmp_path) == ["report.json"]

    def half_then(error):
        def write(tmp):
            tmp.write_text("half")
            raise error
        return write

    with pytest.raises(OutputError, match="No space left on device; free disk space"):
        write_file_atomic(out, half_then(OSError(28, "No space left on device")), "free disk space")
    from safetensors import SafetensorError  # safetensors' writers raise this, not OSError, for a full disk

    with pytest.raises(OutputError, match="I/O error"):
        write_file_atomic(out, half_then(SafetensorError("Error while serializing: I/O error")))
    with pytest.raises(KeyboardInterrupt):  # Ctrl-C mid-write is not turned into an OutputError
        write_file_atomic(out, half_then(KeyboardInterrupt()))
    assert out.read_text() == "old" and listing(tmp_path) == ["report.json"]


def test_audio_and_video_packets_are_interleaved(tmp_path):
    """A frame then its 640 samples, repeatedly: the file keeps the two streams within ~0.1 s of each other."""
    out = tmp_path / "il.mp4"
    with VideoWriter(out, 32) as writer:
        for i in range(75):
            writer.write_frame(np.full((32, 32, 3), i, np.uint8))
            writer.write_audio(np.full(SPF, 0.01, np.float32))
    last: dict[str, float] = {}
    worst = 0.0
    with av.open(str(out)) as container:
        for packet in container.demux():
            if packet.dts is not None:
                last[packet.stream.type] = float(packet.dts * packet.time_base)
                if len(last) == 2:
                    worst = max(worst, abs(last["video"] - last["audio"]))
    assert worst < 0.5


def test_write_frame_checks_shape(tmp_path):
    with pytest.raises(ValueError, match="uint8"), VideoWriter(tmp_path / "x.mp4", 32) as writer:
        writer.write_frame(np.zeros((32, 32, 3), np.float32))
    assert listing(tmp_path) == []


# --------------------------------------------------------------------------------------------------
# PcmResampler
# --------------------------------------------------------------------------------------------------


def _int16_wav(path: Path, pcm: np.ndarray, rate: int) -> Path:
    with av.open(str(path), "w") as out:
        stream = out.add_stream("pcm_s16le", rate=rate, layout="stereo")
        frame = av.AudioFrame.from_ndarray(pcm.reshape(1, -1), format="s16", layout="stereo")
        frame.sample_rate = rate
        for packet in [*stream.encode(frame), *stream.encode(None)]:
            out.mux(packet)
    return path


@pytest.mark.parametrize("rate,chunk", [(48000, 960), (44100, 441), (8000, 137), (22050, 1000)])
def test_pcm_resampler_streaming_equals_offline(tmp_path, rate, chunk):
    from conftest import speechlike

    mono = speechlike(2.0, rate)
    pcm = (np.stack([mono, 0.5 * mono], axis=1) * 32767).astype(np.int16)  # (n, 2) int16
    offline = load_audio(_int16_wav(tmp_path / "x.wav", pcm, rate))
    resampler = PcmResampler()
    parts = [resampler.push(pcm[i:i + chunk], rate) for i in range(0, len(pcm), chunk)]
    assert sum(len(p) for p in parts) >= len(offline) - 64  # output keeps up: only the filter delay is held
    parts.append(resampler.flush())
    streamed = np.concatenate(parts)
    assert streamed.dtype == np.float32
    assert abs(len(streamed) - len(offline)) <= 2 and abs(len(streamed) - round(len(pcm) * 16000 / rate)) <= 2
    n = min(len(streamed), len(offline))
    np.testing.assert_allclose(streamed[:n], offline[:n], atol=1e-3)


def test_pcm_resampler_formats_and_rate_change():
    r = PcmResampler()
    x = np.linspace(-0.5, 0.5, 320, dtype=np.float32)
    np.testing.assert_allclose(np.concatenate([r.push(x, 16000), r.flush()]), x, atol=1e-7)  # 16 kHz mono: as is
    i16 = (x * 32768).astype(np.int16)
    np.testing.assert_allclose(np.concatenate([r.push(i16, 16000), r.flush()]), x, atol=1e-4)
    np.testing.assert_allclose(np.concatenate([r.push(np.stack([x, x], 1), 16000), r.flush()]), x, atol=1e-6)
    # the rate may change mid-stream: the old stream's tail comes out first, nothing is lost
    out = [r.push(np.zeros(4800, np.float32), 48000), r.push(np.zeros(1600, np.float64), 16000), r.flush()]
    assert abs(sum(map(len, out)) - 3200) <= 2
    assert len(r.push(np.zeros((0, 2), np.int16), 48000)) == 0
    with pytest.raises(InputError):
        r.push(np.zeros((2, 2, 2), np.float32), 16000)
    for rate in (0, 100, 10**9, 16000.5):  # 0 is not "the default"; 100: seconds or a frame count given as the rate
        with pytest.raises(InputError, match="whole number of Hz, 4000..384000"):
            r.push(np.zeros(10, np.float32), rate)
    with pytest.raises(InputError, match="NaN or infinite"):
        r.push(np.array([0.1, np.inf], np.float32), 16000)
    with pytest.raises(InputError, match="these reach 12000"):  # int16 values held as floats
        r.push(np.array([0.0, -12000.0]), 48000)


def test_channel_counts_ffmpeg_has_no_layout_for_are_averaged(tmp_path):
    """9, 11, 13 ... channels (no FFmpeg layout): a file and pushed PCM come out as the mean of the channels,
    not as an error."""
    import wave

    rng = np.random.default_rng(0)
    pcm = (rng.standard_normal((16000, 9)) * 3000).astype(np.int16)
    path = tmp_path / "nine.wav"
    with wave.open(str(path), "wb") as w:
        w.setnchannels(9)
        w.setsampwidth(2)
        w.setframerate(16000)
        w.writeframes(pcm.tobytes())
    mean = pcm.mean(axis=1) / 32768
    np.testing.assert_allclose(load_audio(path), mean, atol=1e-6)
    r = PcmResampler()
    np.testing.assert_allclose(np.concatenate([r.push(pcm, 16000), r.flush()]), mean, atol=1e-6)
    assert abs(len(np.concatenate([r.push(pcm[:, :2].repeat(6, 1)[:, :11], 48000), r.flush()])) - 5333) <= 2


@pytest.mark.parametrize("fmt", ["s16", "s16p", "s32", "s32p", "u8", "fltp", "dbl"])
def test_frame_pcm_reads_every_sample_format_as_speech(fmt):
    """A track's frames in any sample format come out as (n, channels) samples of the same sound: int16 as they are,
    others as float32 in -1..1 (an s32 or u8 frame's integers scaled, not taken as floats far past full scale, which
    a session refuses), each channel in its column whether the frame is packed or planar; through TrackSource, a
    session takes them."""
    import asyncio

    from letstalk_rt.media import float_pcm_problem
    from letstalk_rt.stream.sources import TrackSource

    wave = stereo_tone(0.02, 48000)  # (960, 2): left 0.5 x sine, right 0.3 x sine
    ints = {"s16": 2 ** 15, "s32": 2 ** 31, "u8": 2 ** 7}
    base = fmt.rstrip("p")
    data = wave if base not in ints else np.round(wave * (ints[base] - 1))
    data = data + 128 if base == "u8" else data
    dtype = {"s16": np.int16, "s32": np.int32, "u8": np.uint8, "flt": np.float32, "dbl": np.float64}[base]
    data = data.astype(dtype)
    frame = av.AudioFrame.from_ndarray(data.T.copy() if fmt.endswith("p") else data.reshape(1, -1), format=fmt,
                                       layout="stereo")
    frame.sample_rate = 48000
    pcm = frame_pcm(frame)
    assert pcm.shape == (960, 2) and pcm.dtype == (np.int16 if base == "s16" else np.float32)
    scaled = pcm / 32768 if pcm.dtype == np.int16 else pcm
    np.testing.assert_allclose(scaled, wave, atol=1 / 100)  # u8 holds 8 bits
    assert float_pcm_problem(pcm) is None

    class Track:
        kind = "audio"

        def __init__(self):
            self.frames = [frame]

        async def recv(self):
            from aiortc.mediastreams import MediaStreamError

            if not self.frames:
                raise MediaStreamError
            return self.frames.pop()

    async def chunks():
        return [c async for c in TrackSource(Track()).chunks()]

    (got, rate), = asyncio.run(chunks())
    assert rate == 48000
    np.testing.assert_array_equal(got, pcm)
    assert len(PcmResampler().push(got, rate)) > 0  # taken, not refused as int values held as floats


@pytest.mark.parametrize("tempo", [1.25, 1.5])
def test_tempo_stretcher_shortens_speech_in_a_stream_and_keeps_its_pitch(tempo):
    """Streamed in 640-sample pieces, 2 s come out 2 / tempo s long, in runs that flush and restart;
    the voice's fundamental stays where it was (WSOLA drops whole periods, it does not resample)."""
    rate = SAMPLE_RATE
    t = np.arange(2 * rate) / rate
    tone = (0.3 * np.sin(2 * np.pi * 150 * t) + 0.1 * np.sin(2 * np.pi * 450 * t)).astype(np.float32)
    s = TempoStretcher(tempo)
    for _ in range(2):  # a second run after the flush starts a fresh stream
        out = np.concatenate([s.push(tone[i:i + SPF]) for i in range(0, len(tone), SPF)] + [s.flush()])
        assert abs(len(out) - len(tone) / tempo) <= 0.02 * rate, len(out)
        spectrum = np.abs(np.fft.rfft(out[: rate]))
        peak_hz = np.argmax(spectrum) * rate / rate  # 1 s of output: bins are 1 Hz apart
        assert abs(peak_hz - 150) <= 2, peak_hz
    assert len(s.push(np.zeros(0, np.float32))) == 0 and len(s.flush()) == 0
    with pytest.raises(LetsTalkError):
        TempoStretcher(3.0)


def test_tempo_stretcher_changes_speed_inside_a_stream():
    """Faster, then back at its own pace in the same stream (no flush): the length adds up, the pitch is
    kept in both parts, and pending_samples says what the filter still holds."""
    rate = SAMPLE_RATE
    t = np.arange(2 * rate) / rate
    tone = (0.3 * np.sin(2 * np.pi * 150 * t)).astype(np.float32)
    s = TempoStretcher(1.5)
    out = []
    for i in range(0, len(tone), SPF):
        if i == rate:
            s.set_tempo(1.0)
        out.append(s.push(tone[i:i + SPF]))
        assert 0 <= s.pending_samples <= 0.1 * rate, s.pending_samples
    out.append(s.flush())
    assert s.pending_samples == 0
    out = np.concatenate(out)
    assert abs(len(out) - (rate / 1.5 + rate)) <= 0.02 * rate, len(out)
    for part in (out[: rate // 2], out[-rate // 2:]):  # 0.5 s each: bins 2 Hz apart
        assert abs(np.argmax(np.abs(np.fft.rfft(part))) * 2 - 150) <= 2
    with pytest.raises(LetsTalkError):
        s.set_tempo(0.1)


# --------------------------------------------------------------------------------------------------
# bundled assets
# --------------------------------------------------------------------------------------------------


def test_bundled_speech_and_portrait_load():
    speech = ASSETS / "speech.ogg"
    assert speech.stat().st_size < 100_000
    audio = load_audio(speech)
    assert 8.0 <= len(audio) / SAMPLE_RATE <= 13.0
    frames = audio[: len(audio) // SPF * SPF].reshape(-1, SPF)
    loud = np.sqrt((frames ** 2).mean(axis=1)) > 0.02
    assert 0.4 < loud.mean() < 0.95  # mostly speech, with pauses between sentences
    portrait = ASSETS / "portrait.png"
    assert portrait.stat().st_size < 200_000
    image = load_image(portrait)
    assert image.dtype == np.uint8 and image.shape[2] == 3 and min(image.shape[:2]) >= 256


def test_an_mp4_stream_without_a_time_base_declares_no_length():
    """An mp4's audio declares its exact length by its duration in its time base, and the decode is trimmed to it
    (the AAC encoder's padding). A time base that is not set declares nothing: PyAV 19 reads it as AVRational(0, 1),
    false but not None, which was taken for a declared length of 0 samples."""
    from types import SimpleNamespace as NS

    from letstalk_rt.media import _declared_samples

    mp4 = NS(format=NS(name="mov,mp4,m4a,3gp,3g2,mj2"))
    assert _declared_samples(mp4, NS(duration=48000, time_base=Fraction(1, 48000)), 16000) == 16000
    assert _declared_samples(mp4, NS(duration=48000, time_base=Fraction(0)), 16000) is None  # PyAV 19's unset
    assert _declared_samples(mp4, NS(duration=48000, time_base=None), 16000) is None  # PyAV 18's
    assert _declared_samples(NS(format=NS(name="wav")), NS(duration=48000, time_base=Fraction(1, 48000)), 16000) is None
