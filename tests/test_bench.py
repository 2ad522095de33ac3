"""`letstalk bench` on the tiny model: the figures it reports are measured from what the tracks emitted."""

from __future__ import annotations

import json
import resource
import time

import numpy as np

from letstalk_rt.bench import busy_neighbours, run_bench
from letstalk_rt.cli import main

from conftest import speechlike


def test_bench_reports_every_run_and_the_spread_of_repeats(tiny_pipeline, tmp_path, astronaut_png):
    from letstalk_rt.media import load_image

    portrait = tiny_pipeline.prepare_portrait(load_image(astronaut_png), detect=False)
    audio = np.concatenate([speechlike(0.6, seed=3), np.zeros(3200, np.float32)])  # speech and a pause
    out = tmp_path / "bench.json"
    report = run_bench(tiny_pipeline, [1, 2], 1.5, audio, portrait, json_path=out, breakdown=True, repeat=2)

    assert json.loads(out.read_text()) == report
    assert [r["sessions"] for r in report["runs"]] == [1, 1, 2, 2]
    for run in report["runs"]:
        needed = run["fps_generated"] * run["seconds"] / run["realtime_factor"]  # frames the clock asked for
        assert needed <= run["sessions"] * 25 * run["seconds"] + run["sessions"]  # never more than real time
        assert run["latency_ms_p50"] is not None and run["latency_ms_p50"] <= run["latency_ms_p95"]
        assert run["av_offset_ms_max"] < 40  # both tracks release the same 40 ms together
    assert [s["sessions"] for s in report["spread"]] == [1, 2]
    for s, runs in zip(report["spread"], (report["runs"][:2], report["runs"][2:])):
        assert s["repeats"] == 2
        rtf = sorted(r["realtime_factor"] for r in runs)
        assert (s["realtime_factor"]["min"], s["realtime_factor"]["max"]) == (rtf[0], rtf[1])
        assert rtf[0] <= s["realtime_factor"]["median"] <= rtf[1]
    w = report["window_ms"]
    assert w["frames"] == tiny_pipeline.window and "step_1" in w and w["decode"] > 0
    assert w["total"] >= w["step_1"] + w["decode"]


def test_bad_counts_fail_before_a_model_loads(capsys):
    for argv in (["bench", "--repeat", "0"], ["bench", "--sessions", "0,1"], ["bench", "--sessions", "two"],
                 ["bench", "--max-steps", "51"], ["demo", "--max-steps", "-1"], ["bench", "--catch-up-tempo", "3"],
                 ["demo", "--catch-up-tempo", "0.9"], ["bench", "--threads", "-2"], ["bench", "--neighbours", "-1"],
                 ["bench", "--neighbour-duty", "60/30"], ["bench", "--neighbour-duty", "half"]):
        assert main(argv + ["--model", "/nonexistent"]) == 2
        err = capsys.readouterr().err
        assert argv[1] in err, err
        assert "/nonexistent" not in err  # the arguments fail first, not the model


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
