"""What an install from a wheel holds: every package of the tree under one top-level name (the checkout's server/ as
letstalk_rt.server), the bundled model and assets, and the browser client (client_examples/browser, installed as
letstalk_rt/server/browser so that `letstalk serve` serves it at / there too); and what an install without the engine
(`pip install letstalk-rt`, the SDK alone) says when the model is asked for."""

import fnmatch
import importlib.metadata
import shutil
import subprocess
import sys
import textwrap
import tomllib
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def _setuptools_table() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]


def test_the_listed_packages_are_the_trees_and_the_browser_client_is_package_data():
    """pyproject.toml lists its packages (the browser client needs a package-dir of its own): a new subpackage
    left off the list, or a browser file no package-data pattern takes, would be missing from a wheel."""
    table = _setuptools_table()
    found = {".".join((prefix, *p.parent.relative_to(ROOT / top).parts)) for top, prefix
             in (("letstalk_rt", "letstalk_rt"), ("server", "letstalk_rt.server"))
             for p in (ROOT / top).rglob("__init__.py")}
    assert set(table["packages"]) == found | {"letstalk_rt.server.browser"}
    assert ROOT / table["package-dir"]["letstalk_rt.server"] == ROOT / "server"
    browser = ROOT / table["package-dir"]["letstalk_rt.server.browser"]
    assert browser == ROOT / "client_examples" / "browser"
    files = sorted(p.name for p in browser.iterdir() if p.is_file())
    assert {"index.html", "overlay.html", "app.js"} <= set(files)
    patterns = table["package-data"]["letstalk_rt.server.browser"]
    assert [f for f in files if not any(fnmatch.fnmatch(f, pat) for pat in patterns)] == []


def test_a_wheel_holds_the_browser_client_the_openapi_file_and_the_bundled_model(tmp_path):
    """Built from a copy of what the wheel is made of, so that a build/ folder an earlier build left in the checkout
    (setuptools copies what it holds into later wheels) cannot make up for a broken package list."""
    pytest.importorskip("pip")
    # this environment's setuptools where it can build a wheel alone (70.1+; read, not imported: importing it here,
    # after distutils, trips its distutils shim), else pip's isolated build with one it downloads
    try:
        version = tuple(int(x) for x in importlib.metadata.version("setuptools").split(".")[:2])
    except (importlib.metadata.PackageNotFoundError, ValueError):
        version = (0, 0)
    isolation = ["--no-build-isolation"] if version >= (70, 1) else []
    src = tmp_path / "src"
    skip = shutil.ignore_patterns("__pycache__", "*.pyc", "*.egg-info", "build")
    for name in ("letstalk_rt", "server", "client_examples"):
        shutil.copytree(ROOT / name, src / name, ignore=skip)
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, src / name)
    out = subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", *isolation, "-w", str(tmp_path),
                          str(src)], capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    (wheel,) = tmp_path.glob("letstalk_rt-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    for name in ("letstalk_rt/server/browser/index.html", "letstalk_rt/server/browser/overlay.html",
                 "letstalk_rt/server/browser/app.js", "letstalk_rt/server/openapi.yaml", "letstalk_rt/server/app.py",
                 "letstalk_rt/assets/portrait.png", "letstalk_rt/assets/speech.ogg",
                 "letstalk_rt/assets/default_model/config.json", "letstalk_rt/stream/engine.py"):
        assert name in names, f"{name} is missing from the wheel"
    # one top-level package: nothing for another distribution's `server` (or `client_examples`) to overwrite
    assert {n.split("/")[0] for n in names if not n.split("/")[0].endswith(".dist-info")} == {"letstalk_rt"}
    model = {p.relative_to(ROOT).as_posix() for p in (ROOT / "letstalk_rt/assets/default_model").iterdir()}
    assert model <= names


def test_the_engine_extra_is_what_an_sdk_install_is_told_it_lacks():
    """ENGINE_PACKAGES (what the engine-missing line names) is the `[engine]` extra, and the plain install has none of
    it: a package added to one and not the other would go unnamed, or make the SDK pull torch again."""
    import re

    from letstalk_rt.errors import ENGINE_PACKAGES

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]

    def names(requirements):
        return {re.match(r"[A-Za-z0-9_.-]+", r).group(0).lower() for r in requirements}

    assert names(project["optional-dependencies"]["engine"]) == set(ENGINE_PACKAGES.values())
    assert not names(project["dependencies"]) & set(ENGINE_PACKAGES.values())


def test_without_the_engine_its_commands_and_names_say_how_to_install_it(tmp_path):
    """An install of the SDK alone (`pip install letstalk-rt`): what runs the model says in one line that the engine
    is not installed and how to install it - the CLI's commands, `python -m letstalk_rt.server`, the engine's names -
    and writes nothing."""
    from without_engine import PRELUDE

    out = tmp_path / "demo.mp4"
    code = PRELUDE + textwrap.dedent(f"""
        from letstalk_rt.cli import main
        from letstalk_rt.errors import EngineNotInstalledError
        assert main(['demo', '--out', {str(out)!r}]) == 2
        assert main(['serve', '--port', '0']) == 2
        speech = {str(ROOT / 'letstalk_rt/assets/speech.ogg')!r}
        assert main(['camera', '--audio', speech, '--speaker', 'none']) == 2
        try:
            from letstalk_rt.stream import StreamEngine
        except EngineNotInstalledError as e:  # also an ImportError, for code that falls back
            assert isinstance(e, ImportError) and e.name == "torch", e
            print(e)
        else:
            raise AssertionError("imported")
        """)
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    lines = run.stderr.splitlines()
    assert [line.split(" needs the engine")[0] for line in lines] == [
        "letstalk: error: letstalk demo", "letstalk: error: letstalk serve",
        "letstalk: error: letstalk camera without --server"], run.stderr
    assert all("pip install 'letstalk-rt[engine]'" in line for line in lines + [run.stdout]), run.stderr
    assert run.stdout.startswith("letstalk_rt.stream.StreamEngine needs the engine"), run.stdout
    assert not out.exists()

    server = subprocess.run([sys.executable, "-c", PRELUDE + "import runpy; runpy.run_module('letstalk_rt.server', "
                             "run_name='__main__')"], capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert server.returncode == 1, server.stderr
    assert server.stderr.startswith("letstalk serve: error: python -m letstalk_rt.server needs the engine"), server.stderr
    assert "Traceback" not in server.stderr


def _dockerfile() -> list[tuple[str, str]]:
    """The Dockerfile's instructions as (INSTRUCTION, rest), continuation lines joined, comments left out."""
    text = (ROOT / "Dockerfile").read_text().replace("\\\n", " ")
    lines = [line.strip() for line in text.splitlines()]
    return [(line.split()[0].upper(), line.split(None, 1)[1]) for line in lines if line and not line.startswith("#")]


def test_the_container_image_copies_every_package_and_serves_what_it_exposes():
    """The image (Dockerfile) installs from what it COPYs: every package of the wheel, the browser client's folder,
    pyproject.toml and README.md must be copied and let through .dockerignore (an allow-list), or the image's install
    fails or serves no browser page. Its entry point must be a `letstalk serve` the CLI accepts, on the port the image
    exposes and its health check asks. scripts/docker_check.sh builds the image and streams a session through it
    (docs/server.md, "In a container"); this runs where no Docker is."""
    import json

    from letstalk_rt.cli import build_parser

    instructions = _dockerfile()
    copied = {src for op, rest in instructions if op == "COPY" for src in rest.split()[:-1]}
    table = _setuptools_table()
    needed = {"pyproject.toml", "README.md", *table["package-dir"].values(),
              *{p.split(".")[0] for p in table["packages"]}}
    assert needed <= copied, f"not copied into the image: {sorted(needed - copied)}"
    allowed = {line[1:] for line in (ROOT / ".dockerignore").read_text().splitlines() if line.startswith("!")}
    assert "*" in (ROOT / ".dockerignore").read_text().splitlines()
    assert needed <= allowed, f"left out of the build context by .dockerignore: {sorted(needed - allowed)}"

    (entry,) = [json.loads(rest) for op, rest in instructions if op == "ENTRYPOINT"]
    assert entry[:2] == ["tini", "--"] and entry[2] == "letstalk"
    args = build_parser().parse_args([*entry[3:], "--max-sessions", "2"])
    assert args.host == "0.0.0.0" and args.max_sessions == 2
    (exposed,) = [rest for op, rest in instructions if op == "EXPOSE"]
    (health,) = [rest for op, rest in instructions if op == "HEALTHCHECK"]
    assert int(exposed) == args.port and f"127.0.0.1:{args.port}/health" in health


def test_setup_refuses_a_python_older_than_the_package_needs_before_installing_anything(tmp_path):
    """scripts/setup.sh on a Python below pyproject's requires-python (3.10, whose pip would find no PyAV 18 or aiortc
    1.16 and fail deep in the install) stops at once with one line naming the version and how to give another, having
    run nothing else; the floor it checks is the one pyproject.toml declares."""
    floor = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["requires-python"]
    assert floor == ">=3.11" and "sys.version_info < (3, 11)" in (ROOT / "scripts" / "setup.sh").read_text()
    calls = tmp_path / "calls"
    python = tmp_path / "python3.10"  # answers as Python 3.10 would, and writes down every other call
    python.write_text(textwrap.dedent(f"""\
        #!/bin/sh
        case "$1" in
          -V) echo "Python 3.10.13" ;;
          -c) case "$2" in *version_info*) exit 1 ;; esac; echo "$@" >> {calls}; exit 1 ;;
          *) echo "$@" >> {calls} ;;
        esac
        """))
    python.chmod(0o755)
    for mode in ([], ["--dev"], ["--sdk"]):
        out = subprocess.run(["bash", str(ROOT / "scripts" / "setup.sh"), *mode], capture_output=True, text=True,
                             timeout=60, env={"PATH": "/usr/bin:/bin", "PYTHON": str(python)})
        assert out.returncode == 2, out.stderr
        assert out.stderr.startswith("setup: letstalk-rt needs Python >= 3.11"), out.stderr
        assert "is Python 3.10.13" in out.stderr and f"PYTHON=python3.11 bash scripts/setup.sh {' '.join(mode)}" \
            in out.stderr, out.stderr
    assert not calls.exists(), calls.read_text()
    missing = subprocess.run(["bash", str(ROOT / "scripts" / "setup.sh")], capture_output=True, text=True, timeout=60,
                             env={"PATH": "/usr/bin:/bin", "PYTHON": str(tmp_path / "nowhere")})
    assert missing.returncode == 2 and missing.stderr.startswith(f"setup: no {tmp_path / 'nowhere'} here"), \
        missing.stderr
