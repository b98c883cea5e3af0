"""`k5 serve` with the tiny Image Lite pair on a non-loopback address: the OpenAI SDK's images.generate (T2I) and
images.edit (I2I) answer with PNG images, the same files the job recorded; a server that other machines can reach
serves only clients with its API key, and refuses to start without one.
"""

import base64
import io
import json

import openai
import pytest
from PIL import Image

from serve_util import Server

KEY = "k5-test-key-1234"


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    # --host 0.0.0.0: every interface (the tests talk to it on 127.0.0.1); the key comes from K5_API_KEY
    s = Server(tmp_path_factory.mktemp("serve-image") / "state",
               ["--model", "tiny-image", "--steps", "1", "--host", "0.0.0.0", "--poll-after-ms", "50"], api_key=KEY)
    try:
        yield s.start().wait_ready()
    finally:
        s.close()


def decoded(b64: str) -> Image.Image:
    image = Image.open(io.BytesIO(base64.b64decode(b64)))
    image.load()
    return image


def recorded_png(server, job_dir_name: str) -> bytes:
    folder = server.state / "jobs" / job_dir_name
    record = json.loads((folder / "manifest.jsonl").read_text())
    return (folder / record["files"]["image"]["name"]).read_bytes()


def test_images_generate_and_edit(server, tmp_path):
    client = server.client()
    made = client.images.generate(prompt="a red fox", size="1024x1024", n=2, extra_body={"seed": 3})
    assert len(made.data) == 2 and made.size == "1024x1024"
    for entry in made.data:
        image = decoded(entry.b64_json)
        assert image.format == "PNG" and image.size == (1024, 1024) and image.mode == "RGB"
    jobs = [p.name for p in (server.state / "jobs").iterdir()]
    records = {job: json.loads((server.state / "jobs" / job / "manifest.jsonl").read_text()) for job in jobs}
    assert sorted(r["settings"]["request"]["seed"] for r in records.values()) == [3, 4]  # n images: seed, seed+1
    by_seed = {r["settings"]["request"]["seed"]: job for job, r in records.items()}
    for entry, seed in zip(made.data, (3, 4)):  # in order, each the file the CLI's checked path wrote
        assert base64.b64decode(entry.b64_json) == recorded_png(server, by_seed[seed])
    assert made.data[0].b64_json != made.data[1].b64_json

    source = tmp_path / "wide.png"  # the edit's size follows the source's nearest bucket: 1408x640 for 2.2:1
    Image.new("RGB", (440, 200), (200, 40, 40)).save(source)
    with open(source, "rb") as f:
        edited = client.images.edit(image=f, prompt="make it night", extra_body={"seed": 4})
    out = decoded(edited.data[0].b64_json)
    assert out.size == (1408, 640) and edited.size == "1408x640"
    (edit_job,) = [p.name for p in (server.state / "jobs").iterdir() if p.name not in jobs]
    record = json.loads((server.state / "jobs" / edit_job / "manifest.jsonl").read_text())
    assert record["settings"]["request"]["task"] == "i2i" and record["settings"]["request"]["steps"] == 1

    with pytest.raises(openai.BadRequestError) as e:  # an image server has no videos
        client.videos.create(prompt="a fox")
    assert "Image Lite" in e.value.body["message"]


def test_a_non_loopback_server_needs_its_key(server):
    for headers in ({}, {"Authorization": "Bearer wrong-key"}, {"Authorization": KEY}):
        status, _, body = server.http("GET", "/v1/models", headers=headers, auth=False)
        assert status == 401 and body["error"]["code"] == "invalid_api_key", (headers, body)
    with pytest.raises(openai.AuthenticationError):
        server.client(api_key="wrong-key").images.generate(prompt="a fox")
    status, _, _ = server.http("POST", "/v1/videos", {"prompt": "x"}, headers={"Authorization": "Bearer nope"})
    assert status == 401
    assert server.health() == 200  # health and the page need no key (they hold no data)
    assert server.http("GET", "/", auth=False)[0] == 200
    status, _, body = server.http("GET", "/v1/models")  # with the key: served
    assert status == 200 and body["data"][0]["id"] == "tiny-image/i2i" and body["data"][0]["k5"]["edits"]


def test_no_key_no_other_address(tmp_path, capsys, monkeypatch):
    from k5.serve.server import main

    monkeypatch.delenv("K5_API_KEY", raising=False)
    assert main(["--model", "tiny", "--host", "0.0.0.0", "--state-dir", str(tmp_path / "s")]) == 2
    err = capsys.readouterr().err
    assert "--host 0.0.0.0 accepts connections from other machines: give --api-key KEY" in err
    assert not (tmp_path / "s").exists()  # refused before anything was made
