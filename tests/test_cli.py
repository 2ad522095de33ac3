"""`letstalk generate` end to end on the tiny model: exact frame count, synced audio, clean failures."""

from __future__ import annotations

import math
import subprocess
import sys
from pathlib import Path

import pytest

from letstalk_rt.cli import main
from letstalk_rt.media import probe

FIXTURES = Path(__file__).parent / "fixtures"


def _run(capsys, *argv) -> tuple[int, str]:
    code = main(list(map(str, argv)))
    err = capsys.readouterr().err
    return code, err


def _leftovers(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir())


@pytest.mark.parametrize("seconds,rate", [(2.0, 16000), (1.3, 44100)])
def test_generate_writes_exact_frames_and_synced_audio(capsys, tmp_path, tiny_model_dir, astronaut_png, wav_file,
                                                        seconds, rate):
    audio = wav_file(seconds, rate)
    out = tmp_path / "out" / "talk.mp4"
    out.parent.mkdir()
    code, err = _run(capsys, "generate", "--portrait", astronaut_png, "--audio", audio, "--out", out,
                     "--model", tiny_model_dir, "--quiet")
    assert code == 0, err
    info = probe(out)
    assert info.video_frames == math.ceil(seconds * 25)
    assert info.fps == 25
    assert (info.width, info.height) == (32, 32)
    assert abs(info.audio_seconds - seconds) <= 0.04
    assert _leftovers(out.parent) == ["talk.mp4"]  # no temporary file left behind


def test_generate_full_frame_writes_the_whole_photo(capsys, tmp_path, tiny_model_dir, astronaut_png, wav_file):
    """--full-frame [PX]: frames of the whole photo fit to PX (default 512; a 512 px photo is not enlarged)."""
    audio = wav_file(0.5)
    for extra, size in ((("--full-frame", "200"), (200, 200)), (("--full-frame",), (512, 512))):
        out = tmp_path / f"whole{size[0]}.mp4"
        code, err = _run(capsys, "generate", "--portrait", astronaut_png, "--audio", audio, "--out", out,
                         "--model", tiny_model_dir, "--quiet", *extra)
        assert code == 0, err
        info = probe(out)
        assert (info.width, info.height) == size and info.video_frames == 13
    with pytest.raises(SystemExit) as exit_info:
        _run(capsys, "generate", "--portrait", astronaut_png, "--audio", audio, "--out", tmp_path / "x.mp4",
             "--full-frame", "8")
    assert exit_info.value.code == 2 and "16..1280" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_info:
        _run(capsys, "generate", "--portrait", astronaut_png, "--audio", audio, "--out", tmp_path / "x.mp4",
             "--full-frame", "--framing", "1")
    assert exit_info.value.code == 2 and "--framing must be 0 (the whole photo) or 2..20" in capsys.readouterr().err
    assert not (tmp_path / "x.mp4").exists()


def _expect_error(capsys, tmp_path, tiny_model_dir, portrait, audio, match, out=None, model=None, extra=()):
    out = out or tmp_path / "result.mp4"
    code, err = _run(capsys, "generate", "--portrait", portrait, "--audio", audio, "--out", out,
                     "--model", model or tiny_model_dir, "--quiet", *extra)
    assert code == 2
    lines = [line for line in err.splitlines() if line.startswith("letstalk: error:")]
    assert len(lines) == 1, err
    assert match in lines[0].lower(), lines[0]
    assert "Traceback" not in err
    assert not Path(out).exists()
    if Path(out).parent.exists():
        assert not [p for p in Path(out).parent.iterdir() if p.name.startswith(".") and "partial" in p.name]


def test_bad_inputs_fail_with_one_clear_line_and_no_output(capsys, tmp_path, tiny_model_dir, astronaut_png, wav_file):
    good_audio = wav_file(0.5)
    cases = [
        (FIXTURES / "not_image.png", good_audio, "image"),
        (FIXTURES / "no_face.png", good_audio, "face"),
        (astronaut_png, FIXTURES / "not_audio.wav", "audio"),
        (astronaut_png, FIXTURES / "empty.wav", "audio"),
        (astronaut_png, tmp_path / "missing.wav", "missing.wav"),
        (tmp_path / "missing.png", good_audio, "missing.png"),
    ]
    for portrait, audio, match in cases:
        _expect_error(capsys, tmp_path, tiny_model_dir, portrait, audio, match)


def test_missing_model_and_unwritable_output(capsys, tmp_path, tiny_model_dir, astronaut_png, wav_file):
    audio = wav_file(0.5)
    _expect_error(capsys, tmp_path, tiny_model_dir, astronaut_png, audio, "model directory",
                  model=tmp_path / "no_such_model")
    _expect_error(capsys, tmp_path, tiny_model_dir, astronaut_png, audio, "no_such_dir",
                  out=tmp_path / "no_such_dir" / "x.mp4")
    # the output is checked before the model loads (a missing model would be reported first otherwise), and
    # a name a player would read as another format is refused: the file is always MP4
    _expect_error(capsys, tmp_path, tiny_model_dir, astronaut_png, audio, "no_such_dir",
                  out=tmp_path / "no_such_dir" / "x.mp4", model=tmp_path / "no_such_model")
    _expect_error(capsys, tmp_path, tiny_model_dir, astronaut_png, audio, "ending in .mp4",
                  out=tmp_path / "talk.webm", model=tmp_path / "no_such_model")
    _expect_error(capsys, tmp_path, tiny_model_dir, astronaut_png, audio, "detail transfer",
                  extra=("--detail-transfer", "-1"))
    _expect_error(capsys, tmp_path, tiny_model_dir, astronaut_png, audio, "guidance scales",
                  extra=("--audio-guidance", "-2"))
    _expect_error(capsys, tmp_path, tiny_model_dir, astronaut_png, audio, "--start-time 0",
                  extra=("--start-time", "0"))
    _expect_error(capsys, tmp_path, tiny_model_dir, astronaut_png, audio, "--noise-hold 1.5",
                  extra=("--noise-hold", "1.5"))
    _expect_error(capsys, tmp_path, tiny_model_dir, astronaut_png, audio, "--noise-draws 0",
                  extra=("--noise-draws", "0"))
    _expect_error(capsys, tmp_path, tiny_model_dir, astronaut_png, audio, "--audio-lookahead -1",
                  extra=("--audio-lookahead", "-1"))
    _expect_error(capsys, tmp_path, tiny_model_dir, astronaut_png, audio, "audio lookahead 3: choose 0..2",
                  extra=("--audio-lookahead", "3"))
    for flag, value, match in (("--audio-guidance", "nan", "finite"), ("--device", "gpu", "--device gpu"),
                               ("--device", "mps", "--device mps")):
        _expect_error(capsys, tmp_path, tiny_model_dir, astronaut_png, audio, match, extra=(flag, value))
    for box in ("0.5,0.5,0.8,0.2", "0.3,0.4", "mouth"):  # outside the crop, too few numbers, not numbers
        _expect_error(capsys, tmp_path, tiny_model_dir, astronaut_png, audio, f"--audio-guidance-box {box}",
                      extra=("--audio-guidance", "1.5", "--audio-guidance-box", box))


def test_console_script_reports_errors_without_traceback(tmp_path, astronaut_png):
    """The installed entry point: a wrong file exits 2 with one line on stderr."""
    proc = subprocess.run([sys.executable, "-m", "letstalk_rt.cli", "generate", "--portrait", str(astronaut_png),
                           "--audio", str(tmp_path / "nothing.wav"), "--out", str(tmp_path / "o.mp4")],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2
    assert proc.stderr.strip().startswith("letstalk: error:") and "Traceback" not in proc.stderr
    assert not (tmp_path / "o.mp4").exists()


def test_a_wrongly_typed_model_config_fails_at_load_naming_the_field(capsys, tmp_path, tiny_model_dir, astronaut_png,
                                                                      wav_file):
    import json
    import shutil

    model = tmp_path / "model"
    shutil.copytree(tiny_model_dir, model)
    config = json.loads((model / "config.json").read_text())
    config["audio"]["level_min"] = None
    (model / "config.json").write_text(json.dumps(config))
    _expect_error(capsys, tmp_path, tiny_model_dir, astronaut_png, wav_file(0.5), "audio.level_min", model=model)
    (model / "config.json").write_bytes(b"\x89PNG\r\n")  # not even text
    _expect_error(capsys, tmp_path, tiny_model_dir, astronaut_png, wav_file(0.5), "config.json", model=model)


def test_generate_reads_each_input_once_so_pipes_work(capsys, tmp_path, tiny_model_dir, astronaut_png, wav_file):
    """`--audio <(ffmpeg ...)` and `--portrait <(curl ...)`: a pipe can be read only once."""
    import os
    import threading
    import time

    pipes = {}
    for name, source in (("portrait", astronaut_png), ("audio", wav_file(0.5))):
        pipes[name] = tmp_path / f"{name}.fifo"
        os.mkfifo(pipes[name])

        def feed(path=pipes[name], data=Path(source).read_bytes()):
            with open(path, "wb") as f:  # blocks until the reader opens it
                f.write(data)
            end = time.monotonic() + 5  # a second reader (the bug) then gets an empty pipe, not a hang
            while time.monotonic() < end:
                try:
                    os.close(os.open(path, os.O_WRONLY | os.O_NONBLOCK))
                except OSError:  # no reader yet
                    time.sleep(0.05)
        threading.Thread(target=feed, daemon=True).start()
    out = tmp_path / "talk.mp4"
    code, err = _run(capsys, "generate", "--portrait", pipes["portrait"], "--audio", pipes["audio"], "--out", out,
                     "--model", tiny_model_dir, "--quiet", "--no-face-detect")
    assert code == 0, err
    assert probe(out).video_frames == 13


def test_new_model_never_overwrites_a_model_unless_forced(capsys, tmp_path):
    out = tmp_path / "m"
    assert main(["new-model", "--preset", "tiny", "--out", str(out)]) == 0
    before = (out / "transformer.safetensors").read_bytes()
    assert main(["new-model", "--preset", "tiny", "--out", str(out), "--seed", "1"]) == 2
    assert "--force" in capsys.readouterr().err
    assert (out / "transformer.safetensors").read_bytes() == before
    assert main(["new-model", "--preset", "tiny", "--out", str(out), "--seed", "1", "--force"]) == 0
    assert (out / "transformer.safetensors").read_bytes() != before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]  # no partial folder left
    (tmp_path / "file").write_text("x")
    assert main(["new-model", "--preset", "tiny", "--out", str(tmp_path / "file" / "m")]) == 2
    assert "cannot write" in capsys.readouterr().err
