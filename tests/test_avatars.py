"""Avatars uploaded once (POST /v1/avatars): prepared when they come, opened by id with no preparation, kept across
restarts under --avatar-dir, deleted; and every refusal clear, leaving nothing half-made."""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import logging
import os
import time

import aiohttp
import numpy as np
import pytest
from server_helpers import create_session, run, running_server

KEY = {"Authorization": "Bearer k"}


async def _upload(http, url: str, headers: dict | None = KEY, **fields) -> tuple[int, dict]:
    form = aiohttp.FormData()
    for name, value in fields.items():
        form.add_field(name, value, **({"filename": "face.png"} if isinstance(value, bytes) else {}))
    async with http.post(f"{url}/v1/avatars", data=form, headers=headers) as r:
        return r.status, await r.json()


async def _listed(http, url: str) -> dict[str, dict]:
    async with http.get(f"{url}/v1/avatars", headers=KEY) as r:
        assert r.status == 200
        return {a["id"]: a for a in (await r.json())["avatars"]}


def _with_transparent_left_edge(path) -> bytes:
    """The photo as a PNG whose left 150 columns are transparent: the left edge of the astronaut's face crop (x 122..340),
    where a key colour shows, not the face."""
    from PIL import Image

    img = Image.open(path).convert("RGBA")
    alpha = np.array(img)[..., 3]
    alpha[:, :150] = 0
    img.putalpha(Image.fromarray(alpha))
    out = io.BytesIO()
    img.save(out, format="PNG")
    return out.getvalue()


def test_an_uploaded_avatar_is_prepared_once_and_kept_across_restarts(tiny_pipeline, astronaut_png, tmp_path,
                                                                      monkeypatch):
    """An upload is prepared once; sessions on its id start with no preparation and share its portrait; the avatar
    (its name, key colour and time) comes back after a restart from --avatar-dir; deleted, it is gone from the list,
    the disk and later starts, while a session already open on it goes on."""
    prepared = [0]
    prepare = type(tiny_pipeline).prepare_portrait

    def counted(self, *args, **kwargs):
        prepared[0] += 1
        return prepare(self, *args, **kwargs)

    monkeypatch.setattr(type(tiny_pipeline), "prepare_portrait", counted)
    folder = tmp_path / "avatars"
    upload = _with_transparent_left_edge(astronaut_png)

    async def first_run():
        async with running_server(tiny_pipeline, api_key="k", avatar_dir=folder) as srv, \
                aiohttp.ClientSession() as http:
            assert (await _upload(http, srv.url, None, portrait=upload))[0] == 401
            before = prepared[0]
            status, made = await _upload(http, srv.url, portrait=upload, id="astro", name="  Eileen \n Collins ",
                                         background="00ff00")
            assert status == 201, made
            assert prepared[0] == before + 1
            listed = await _listed(http, srv.url)
            assert listed["astro"] == made and made["name"] == "Eileen Collins" and made["uploaded"] is True
            assert listed["default"] == {"id": "default", "name": "Bundled portrait", "uploaded": False}
            async with http.get(f"{srv.url}/v1/avatars/astro", headers=KEY) as r:
                assert r.status == 200 and await r.json() == made
            sessions = [await create_session(http, srv.url, headers=KEY, avatar_id="astro", seed=s) for s in (1, 2)]
            assert prepared[0] == before + 1  # opened with no preparation
            avatar = _store(srv)["astro"]
            opened = [srv.engine.sessions[s["session_id"]] for s in sessions]
            assert all(s._w.stream.portrait is avatar.portrait for s in opened)
            crop = avatar.portrait.image
            assert 10 < (crop == (0, 255, 0)).all(-1).sum() < crop.shape[0] * crop.shape[1] / 2  # the key colour
            async with http.delete(f"{srv.url}/v1/avatars/default", headers=KEY) as r:
                assert r.status == 409 and "configured" in (await r.json())["error"]
            async with http.delete(f"{srv.url}/v1/avatars/nobody", headers=KEY) as r:
                assert r.status == 404
            return made, crop.copy()

    made, crop = run(first_run())
    assert sorted(p.name for p in folder.iterdir()) == ["astro.json", "astro.upload"]  # no temporary file left
    assert json.loads((folder / "astro.json").read_text())["background"] == "00ff00"

    # an upload a killed server was writing (unlocked, a minute old): deleted at the next start
    abandoned = folder / ".other.upload.partial-1-9"
    abandoned.write_bytes(b"half a photo")
    os.utime(abandoned, (time.time() - 120, time.time() - 120))

    async def second_run():
        async with running_server(tiny_pipeline, api_key="k", avatar_dir=folder) as srv, \
                aiohttp.ClientSession() as http:
            assert (await _listed(http, srv.url))["astro"] == made
            assert np.array_equal(_store(srv)["astro"].portrait.image, crop)  # prepared again, the same
            info = await create_session(http, srv.url, headers=KEY, avatar_id="astro")
            session = srv.engine.sessions[info["session_id"]]
            async with http.delete(f"{srv.url}/v1/avatars/astro", headers=KEY) as r:
                assert r.status == 204
            assert "astro" not in await _listed(http, srv.url)
            async with http.post(f"{srv.url}/v1/sessions", json={"avatar_id": "astro"}, headers=KEY) as r:
                assert r.status == 422 and "unknown avatar_id" in (await r.json())["error"]
            frames = 0
            async for _ in session.frames():  # the session open on it goes on
                frames += 1
                if frames == 5:
                    break
            assert not session.closed

    run(second_run())
    assert list(folder.iterdir()) == []

    async def third_run():
        async with running_server(tiny_pipeline, api_key="k", avatar_dir=folder) as srv, \
                aiohttp.ClientSession() as http:
            assert set(await _listed(http, srv.url)) == {"default"}

    run(third_run())


def _store(srv):
    from letstalk_rt.server.app import AVATARS

    return srv.app[AVATARS]


def test_avatar_upload_refusals_are_clear_and_leave_nothing(tiny_pipeline, astronaut_png, tmp_path, caplog):
    """Each bad upload gets its status and a message saying what to fix, and adds nothing: not to the list, not to
    the disk. Two uploads naming the same id: one wins. A record on disk that cannot be read is skipped at start with
    a warning; the others load."""
    folder = tmp_path / "avatars"
    folder.mkdir()
    (folder / "broken.json").write_text("{not json")
    (folder / "half.upload").write_bytes(b"\x89PNG")  # an upload whose record was never written: not an avatar
    face = astronaut_png.read_bytes()
    noise = io.BytesIO()
    from PIL import Image

    Image.fromarray(np.random.default_rng(0).integers(0, 255, (200, 200, 3), dtype=np.uint8)).save(noise, "PNG")

    async def main():
        async with running_server(tiny_pipeline, avatar_dir=folder, max_avatars=2, max_upload_mb=0.5) as srv, \
                aiohttp.ClientSession() as http:
            url = srv.url
            cases = [
                ({"portrait": b"this is not an image"}, 415, "not an image"),
                ({"portrait": noise.getvalue()}, 422, "face"),
                ({"portrait": b""}, 422, "empty"),
                ({"name": "x"}, 422, "multipart/form-data, field `portrait`"),
                ({"portrait": b"\0" * (600 * 1024)}, 413, "limit"),
                ({"portrait": face, "id": "../etc"}, 422, "letters, digits"),
                ({"portrait": face, "id": "default"}, 409, "already exists"),
                ({"portrait": face, "name": "n" * 81}, 422, "`name` must be 1..80"),
                ({"portrait": face, "background": "green"}, 422, "RRGGBB"),
                ({"portrait": face, "seed": "3"}, 422, "unknown field 'seed'"),
            ]
            for fields, status, words in cases:
                got, body = await _upload(http, url, **fields)
                assert got == status and words in body["error"], (list(fields), got, body)
            async with http.post(f"{url}/v1/avatars", json={"id": "a"}) as r:
                assert r.status == 422 and "multipart" in (await r.json())["error"]
            assert set(await _listed(http, url)) == {"default"}
            assert sorted(p.name for p in folder.iterdir()) == ["broken.json", "half.upload"]
            # the same id twice at once: one is prepared and kept, the other told it exists
            results = await asyncio.gather(*(_upload(http, url, portrait=face, id="twin") for _ in range(2)))
            assert sorted(status for status, _ in results) == [201, 409]
            assert (await _upload(http, url, portrait=face))[0] == 201  # a second: the limit
            status, body = await _upload(http, url, portrait=face)
            assert status == 409 and "--max-avatars" in body["error"]
            assert len(await _listed(http, url)) == 3
            # a disk that will not take it: 507, and the avatar is not added
            async with http.delete(f"{url}/v1/avatars/twin", headers=KEY) as r:
                assert r.status == 204
            _store(srv).directory = folder / "broken.json"  # a file where the folder should be
            status, body = await _upload(http, url, portrait=face, id="nowhere")
            assert status == 507 and "could not be saved" in body["error"], body
            assert "nowhere" not in await _listed(http, url)
            assert srv.manager.metrics.errors_total == 0

    with caplog.at_level(logging.WARNING, logger="letstalk.server"):
        run(main())
    assert any("broken.json" in r.getMessage() for r in caplog.records)


@pytest.mark.parametrize("spec, words", [("nofile", "give ID=IMAGE"), ("a/b=x.png", "give ID=IMAGE"),
                                         ("face=/nowhere.png", "no such file")])
def test_serve_refuses_a_bad_avatar_option_with_one_line(spec, words):
    from letstalk_rt.errors import LetsTalkError
    from letstalk_rt.server.app import add_serve_arguments, config_from_args

    parser = argparse.ArgumentParser()
    add_serve_arguments(parser)
    with pytest.raises(LetsTalkError, match=words):
        config_from_args(parser.parse_args(["--avatar", spec]))
