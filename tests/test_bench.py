"""`letstalk bench` on the tiny model: the figures it reports are measured from what the tracks emitted."""

from __future__ import annotations

import asyncio
import json
import resource
import time

import numpy as np
import pytest
import torch

from letstalk_rt.bench import busy_neighbours, run_bench
from letstalk_rt.cli import main

from conftest import speechlike


def test_bench_reports_every_run_and_the_spread_of_repeats(tiny_pipeline, tmp_path, astronaut_png, monkeypatch):
    from letstalk_rt import bench
    from letstalk_rt.media import load_image

    monkeypatch.setattr(bench, "STEADY_AFTER_S", 0.5)  # the runs last 1.5 s
    monkeypatch.setattr(bench, "RSS_EVERY_S", 0.6)  # resident memory at 0.6 s, 1.2 s and the end

    portrait = tiny_pipeline.prepare_portrait(load_image(astronaut_png), detect=False)
    audio = np.concatenate([speechlike(0.6, seed=3), np.zeros(3200, np.float32)])  # speech and a pause
    out = tmp_path / "bench.json"
    report = run_bench(tiny_pipeline, [1, 2], 1.5, audio, portrait, json_path=out, breakdown=True, repeat=2,
                       full_frame=64)  # the whole photo talks: what the breakdown adds per frame for it

    assert json.loads(out.read_text()) == report and report["complete"]
    assert [r["sessions"] for r in report["runs"]] == [1, 1, 2, 2]
    for run in report["runs"]:
        # ticks that showed a generated frame: never more than all, short of all only by the held ones (how far short
        # is the machine's speed, which the benchmark measures, not this test: a slow spell of a shared VM held 10 of
        # 75 ticks of 2 sessions once)
        assert 0 < run["realtime_factor"] <= 1.0 and (run["realtime_factor"] < 1.0) == (run["held_frames"] > 0)
        assert run["latency_ms_p50"] is not None and run["latency_ms_p50"] <= run["latency_ms_p95"]
        # each session's own p50 (the pooled p50 lies among them), and the p95 without the start
        by_session = run["latency_ms_p50_by_session"]
        assert len(by_session) == run["sessions"] and min(by_session) <= run["latency_ms_p50"] <= max(by_session)
        assert run["latency_ms_p95_after_start"] is not None
        assert run["latency_ms_p95_after_start"] <= run["latency_ms_p99"] + 1
        assert run["av_offset_ms_max"] < 40  # both tracks release the same 40 ms together
        assert run["av_offset_ms_p50"] <= run["av_offset_ms_p99"] <= run["av_offset_ms_max"]
        assert 0 <= run["av_offset_max_at_s"] <= run["seconds"]
        assert run["av_offset_ms_by_minute"] == [run["av_offset_ms_max"]]  # a 1.5 s run is in its first minute
        (p95,) = run["latency_ms_p95_by_minute"]  # ... whose p95 is the run's, interpolated
        assert run["latency_ms_p50"] <= p95 <= run["latency_ms_p99"] + 1
        assert len(run["rss_mb_by_minute"]) >= 2 and 0 < min(run["rss_mb_by_minute"])
        assert max(run["rss_mb_by_minute"]) <= run["peak_rss_mb"] + 1  # now, never above the peak so far
        assert sum(run["held_frames_by_minute"]) == run["held_frames"] and len(run["held_frames_by_minute"]) <= 1
        # the latency steered to: the window's audio, the encoder's lookahead, the window's compute, a margin
        assert run["window_compute_ms"] > 0
        assert run["target_latency_ms"] > run["window_compute_ms"] + 1000 * tiny_pipeline.window / 25
    assert [s["sessions"] for s in report["spread"]] == [1, 2]
    for s, runs in zip(report["spread"], (report["runs"][:2], report["runs"][2:])):
        assert s["repeats"] == 2
        rtf = sorted(r["realtime_factor"] for r in runs)
        assert (s["realtime_factor"]["min"], s["realtime_factor"]["max"]) == (rtf[0], rtf[1])
        assert rtf[0] <= s["realtime_factor"]["median"] <= rtf[1]
    w = report["window_ms"]
    assert w["frames"] == tiny_pipeline.window and "step_1" in w and w["decode"] > 0
    assert w["total"] >= w["step_1"] + w["decode"]
    assert 0 < w["full_frame_per_frame"] < 1000 / 25 and report["full_frame"] == 64
    # the step's arithmetic against this CPU's own matrix-product rate: a real fraction, below 1
    assert report["transformer_gflops_per_step"] > 0 and report["matmul_peak_tflops"] > 0
    assert 0 < report["fraction_of_peak"] < 1
    rate = report["transformer_gflops_per_step"] / w["step_1"]  # GFLOP per ms = TFLOP/s
    assert abs(report["transformer_tflops"] - rate) <= 0.01 * rate + 1e-3


def test_the_av_offset_summary_tells_a_drift_from_one_stall():
    """Offsets are summarised by minute with the moment of the largest, so a soak tells a drift (growing minute
    by minute) from a single stall of the event loop (one spike)."""
    from letstalk_rt.bench import offset_summary

    times = np.arange(0, 180, 0.04)  # 3 minutes of frames
    drift = offset_summary([(1 + t / 10, t) for t in times])
    assert drift["av_offset_ms_by_minute"] == sorted(drift["av_offset_ms_by_minute"])
    assert len(drift["av_offset_ms_by_minute"]) == 3 and drift["av_offset_max_at_s"] > 179
    stall = offset_summary([(25.0 if abs(t - 70) < 0.01 else 1.0, t) for t in times])
    assert stall["av_offset_ms_by_minute"] == [1.0, 25.0, 1.0]
    assert stall["av_offset_max_at_s"] == 70.0 and stall["av_offset_ms_p99"] == 1.0 and stall["av_offset_ms_max"] == 25
    assert offset_summary([]) == {"av_offset_ms_max": None}  # nothing paired (--webrtc: the peer measures it)


def test_a_session_count_that_cannot_run_keeps_the_counts_before_it(tiny_pipeline, tmp_path, monkeypatch):
    """A count the device cannot hold (warm-up out of GPU memory) ends the benchmark with its error, and the
    JSON written so far holds every count measured before it and says which count failed."""
    import letstalk_rt.bench as bench
    from letstalk_rt.errors import LetsTalkError

    real = bench.run_sessions

    async def limited(pipe, n, *a, **k):
        if n > 1:
            raise LetsTalkError(f"warm-up with {n} sessions per batch ran out of GPU memory")
        return await real(pipe, n, *a, **k)

    monkeypatch.setattr(bench, "run_sessions", limited)
    portrait = tiny_pipeline.prepare_portrait(np.full((64, 64, 3), 120, np.uint8), detect=False)
    out = tmp_path / "bench.json"
    with pytest.raises(LetsTalkError, match="2 sessions"):
        run_bench(tiny_pipeline, [1, 2, 4], 1.0, speechlike(1.0, seed=4), portrait, json_path=out, breakdown=False)
    saved = json.loads(out.read_text())
    assert [r["sessions"] for r in saved["runs"]] == [1] and saved["runs"][0]["fps_generated"] > 0
    assert saved["error"]["sessions"] == 2 and "GPU memory" in saved["error"]["message"]
    assert saved["complete"] is False  # read alone, the file says it is not the whole benchmark
    assert [p.name for p in tmp_path.iterdir()] == ["bench.json"]  # each rewrite removed its temporary file


def test_the_matrix_product_peak_is_measured_not_assumed():
    import torch

    from letstalk_rt.bench import matmul_peak_tflops

    fast = matmul_peak_tflops(torch.device("cpu"), torch.float32, repeats=3)
    assert 0.001 < fast < 10  # a 2-core CPU: tens to hundreds of GFLOP/s, never a datasheet figure


def test_a_run_that_shows_no_frame_is_not_real_time(tiny_pipeline, monkeypatch, astronaut_png):
    """A first window slower than the whole run (a 256 px preset on a CPU) leaves nothing on screen: the
    report says so (no first frame, real-time factor ~0), never 'real time' from frames made but not shown."""
    import asyncio

    from letstalk_rt.bench import run_sessions
    from letstalk_rt.media import load_image

    generate = tiny_pipeline.generate_latents
    monkeypatch.setattr(tiny_pipeline, "generate_latents", lambda *a, **k: time.sleep(1.5) or generate(*a, **k))
    portrait = tiny_pipeline.prepare_portrait(load_image(astronaut_png), detect=False)
    result = asyncio.run(run_sessions(tiny_pipeline, 1, 0.8, speechlike(1.0, seed=4), portrait,
                                      live={"warmup": False}))
    assert result.first_frame_ms_max is None and result.latency_ms_p95 is None
    assert result.realtime_factor < 0.2 and not result.realtime


def test_bad_counts_fail_before_a_model_loads(capsys):
    for argv in (["bench", "--repeat", "0"], ["bench", "--sessions", "0,1"], ["bench", "--sessions", "two"],
                 ["bench", "--max-steps", "51"], ["demo", "--max-steps", "-1"], ["bench", "--catch-up-tempo", "3"],
                 ["demo", "--catch-up-tempo", "0.9"], ["bench", "--threads", "-2"], ["bench", "--neighbours", "-1"],
                 ["bench", "--neighbour-duty", "60/30"], ["bench", "--neighbour-duty", "half"],
                 ["bench", "--decoder-channels", "8,8,16"], ["bench", "--safety-ms", "-5"], ["demo", "--safety-ms", "300"],
                 ["bench", "--window", "-1"], ["bench", "--seconds", "-1"], ["bench", "--soak", "-5"],
                 ["bench", "--noise-hold", "9"], ["bench", "--steps", "0"], ["bench", "--audio-guidance", "nan"],
                 ["bench", "--json", "/no_such_dir/x.json"], ["demo", "--window", "-2"],
                 ["bench", "--threads-raise-after", "-1"], ["demo", "--threads-raise-after", "nan"],
                 ["bench", "--trim-heap-every", "-1"], ["demo", "--trim-heap-every", "inf"],
                 ["bench", "--loss", "60", "--webrtc"], ["bench", "--loss", "2"]):  # (--loss: through WebRTC only)
        assert main(argv + ["--model", "/nonexistent"]) == 2
        err = capsys.readouterr().err
        assert argv[1] in err, err
        assert "/nonexistent" not in err  # the arguments fail first, not the model


def test_the_live_flags_reach_the_engine_config():
    from letstalk_rt.cli import build_parser, live_config

    args = build_parser().parse_args(["bench", "--threads-raise-after", "0", "--safety-ms", "20", "--threads", "2"])
    live = live_config(args)
    assert live["threads_raise_after_s"] == 0 and live["safety_ms"] == 20 and live["threads"] == 2
    assert "threads_raise_after_s" not in live_config(build_parser().parse_args(["bench"]))  # the engine's default
    assert live["freeze_gc"] and not live_config(build_parser().parse_args(["demo", "--no-freeze-gc"]))["freeze_gc"]
    assert "trim_heap_every_s" not in live
    assert live_config(build_parser().parse_args(["demo", "--trim-heap-every", "0"]))["trim_heap_every_s"] == 0


def test_the_loop_watch_puts_a_stalled_loop_and_a_collection_in_their_minute():
    """LoopWatch: how late the event loop woke and how long the collector held it, the largest of each minute."""
    import asyncio
    import gc

    from letstalk_rt.bench import LAG_EVERY_S, LoopWatch

    async def main():
        async with LoopWatch() as watch:
            await asyncio.sleep(0.05)
            time.sleep(0.12)  # a blocking call holds the loop
            await asyncio.sleep(0.05)
            watch.t0 -= 90  # 90 s on: minute 1
            gc.collect()  # a full collection
            await asyncio.sleep(0.05)
        return watch

    watch = asyncio.run(main())
    figures = watch.figures()
    lag, pauses = figures["loop_lag_ms_by_minute"], figures["gc_pause_ms_by_minute"]
    full = figures["gc_full_collections"]
    assert len(lag) == len(pauses) == 2
    assert 100 <= lag[0] < 1000  # the blocked loop woke >= 110 ms late, in its minute
    assert pauses[0] < lag[0] and pauses[1] > 0 and [at for at, _ in full if at >= 90] and full[-1][1] == pauses[1]
    assert lag[1] >= pauses[1] - 1000 * LAG_EVERY_S  # the collection held the loop as long
    assert figures["gc_frozen_objects"] == gc.get_freeze_count()
    seen = len(watch.full)
    gc.collect()  # closed: no longer listening
    assert len(watch.full) == seen


def test_busy_neighbours_load_the_cpu_for_their_duty_and_are_gone_after():
    """--neighbours: each process burns CPU for `busy` of every `period` seconds, busy first, and none
    outlives the benchmark (their CPU time is counted once they are reaped)."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_utime
    with busy_neighbours(1, busy=0.6, period=1.2) as procs:
        time.sleep(1.2)
        assert all(p.poll() is None for p in procs)
    used = resource.getrusage(resource.RUSAGE_CHILDREN).ru_utime - before
    assert all(p.poll() is not None for p in procs)
    assert 0.3 <= used <= 0.95, used  # ~0.6 s busy of the 1.2 s it lived; idle for the rest


def test_a_preset_benchmarks_with_a_narrower_decoder_for_its_latents():
    """--decoder-channels: the preset's decoder at other widths (the lever docs/benchmarks.md weighs for the
    B preset), checked like any autoencoder config before anything is built."""
    import argparse

    from letstalk_rt.checkpoint import build_components
    from letstalk_rt.cli import _preset_config
    from letstalk_rt.errors import ModelError

    args = argparse.Namespace(preset="tiny", wav2vec2=None, decoder_channels=(8, 8, 16))
    config = _preset_config(args)
    assert config.autoencoder.decoder_widths == (8, 8, 16) and config.autoencoder.block_channels == (8, 16, 16)
    ae = build_components(config).autoencoder
    assert ae.decoder.conv_out.in_channels == 8 and ae.decode(torch.zeros(1, 4, 8, 8)).shape == (1, 3, 32, 32)
    with pytest.raises(ModelError, match="divide"):
        _preset_config(argparse.Namespace(preset="tiny", wav2vec2=None, decoder_channels=(8, 16, 12)))


def test_a_preset_bench_takes_the_sampling_flags_and_checks_its_window(capsys):
    """--preset benchmarks with the sampling flags it was given (not silently its own), and a window the model
    cannot make fails with one line before any run."""
    assert main(["bench", "--preset", "tiny", "--window", "99", "--device", "cpu"]) == 2
    assert "--window 99" in capsys.readouterr().err
    assert main(["bench", "--preset", "tiny", "--model", "x", "--device", "cpu"]) == 2
    assert "--preset" in capsys.readouterr().err


def test_the_av_offset_is_read_by_content_so_a_track_serving_other_audio_shows(tiny_pipeline, astronaut_png,
                                                                                 monkeypatch):
    """The A/V offset pairs each frame's picture with its own speech, whichever tick each track released them at:
    an audio track that serves the speech of 5 frames before reads ~200 ms (keyed by the tracks' timestamps, as
    before, it read ~0 whatever audio went out)."""
    from letstalk_rt.bench import run_sessions
    from letstalk_rt.media import load_image
    from letstalk_rt.stream.engine import Player
    import asyncio

    portrait = tiny_pipeline.prepare_portrait(load_image(astronaut_png), detect=False)
    audio = speechlike(1.0, seed=4)
    right = asyncio.run(run_sessions(tiny_pipeline, 1, 2.0, audio, portrait))
    real_get = Player.get

    async def late_audio(self, tick, at=None):
        frame = await real_get(self, tick, at)
        return self.shown.get(tick - 5, frame) if at is not None else frame  # the audio 5 frames behind the picture

    monkeypatch.setattr(Player, "get", late_audio)
    wrong = asyncio.run(run_sessions(tiny_pipeline, 1, 2.0, audio, portrait))
    assert right.av_offset_ms_p50 is not None and right.av_offset_ms_max < 40  # pairs were read, and they agree
    assert 160 < wrong.av_offset_ms_p50 < 240, wrong.av_offset_ms_p50


def test_neighbours_stop_when_the_bench_is_killed():
    """A bench killed without its cleanup (SIGKILL, the OOM killer) leaves no neighbour spinning on the machine."""
    import subprocess
    import sys

    code = ("import time\nfrom letstalk_rt.bench import busy_neighbours\n"
            "with busy_neighbours(1, 0.05, 1.0) as procs:\n    print(procs[0].pid, flush=True)\n    time.sleep(60)\n")
    child = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    pid = int(child.stdout.readline())
    child.kill()
    child.wait()

    def running() -> bool:
        try:
            state = open(f"/proc/{pid}/status").read().split("State:")[1].split()[0]
        except (FileNotFoundError, IndexError):
            return False
        return state not in ("Z", "X")  # an exited orphan may stay a zombie where nothing reaps it

    deadline = time.monotonic() + 5
    while running() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not running()


def test_a_bench_stopped_by_a_kill_names_the_runs_its_json_holds(tiny_model_dir, tmp_path, monkeypatch, capsys):
    """`letstalk bench` stopped by SIGTERM (`kill`, `timeout`) during a session count ends as Ctrl-C would: exit 130,
    and the message names what --json holds (the counts finished before, "complete": false), instead of dying
    with no word while its file reads like a smaller benchmark. With nothing finished: the usual line."""
    import signal

    import letstalk_rt.bench as bench

    monkeypatch.setattr(bench, "STEADY_AFTER_S", 0.3)
    real = bench.run_sessions

    async def killed_at_two(pipe, n, *a, **k):
        if n == 2:
            signal.raise_signal(signal.SIGTERM)
            await asyncio.sleep(30)  # cancelled by the stop
        return await real(pipe, n, *a, **k)

    monkeypatch.setattr(bench, "run_sessions", killed_at_two)

    def unhandled(signum, frame):  # a bench that did not take SIGTERM over fails here, not by ending pytest
        raise AssertionError("the SIGTERM reached the test: letstalk bench left it to the default handler")

    before = signal.signal(signal.SIGTERM, unhandled)
    try:
        out = tmp_path / "bench.json"
        argv = ["bench", "--model", str(tiny_model_dir), "--device", "cpu", "--seconds", "0.6", "--json", str(out)]
        t0 = time.monotonic()
        assert main(argv + ["--sessions", "1,2,4"]) == 130
        assert time.monotonic() - t0 < 25  # not the 30-s sleep: the kill stopped it
        err = capsys.readouterr().err
        assert f"--json {out} holds the 1 run finished before it" in err and '"complete": false' in err
        saved = json.loads(out.read_text())
        assert [r["sessions"] for r in saved["runs"]] == [1] and saved["complete"] is False
        assert signal.getsignal(signal.SIGTERM) == signal.SIG_IGN  # a repeat cannot cut the cleanup short
        signal.signal(signal.SIGTERM, unhandled)

        out.unlink()
        assert main(argv + ["--sessions", "2"]) == 130  # stopped before any run finished: nothing in --json
        assert "interrupted; no output was written" in capsys.readouterr().err and not out.exists()
    finally:
        signal.signal(signal.SIGTERM, before)
