"""`k5 serve` on one process with the tiny model, driven by the unmodified OpenAI SDK, plain HTTP and a headless
browser: what it makes equals what `k5 generate` makes (the same code path: bitwise), progress is the real share of
the steps, a bounded queue refuses with 429 and loses nothing, and bad input gets its 4xx while the server goes on.

One server process serves the whole module (it loads once, like in production); a test that holds a job at a step
uses the harness's gate (tests/serve_harness.py) and releases it before it ends.
"""

import json
import threading
from pathlib import Path

import openai
import pytest
import torch
from safetensors.torch import load, load_file

from serve_util import TINY, Server

PROMPT = "a red fox running through snow"


@pytest.fixture(scope="module")
def lora_dir(tmp_path_factory):
    from test_generate_lora import make_lora  # a diffusers LoRA for the tiny DiT

    folder = tmp_path_factory.mktemp("loras")
    make_lora(folder / "camera", 1)
    return folder


@pytest.fixture(scope="module")
def server(tmp_path_factory, lora_dir):
    s = Server(tmp_path_factory.mktemp("serve1") / "state",
               [*TINY, "--max-queue", "4", "--max-upload-mb", "0.25", "--save-latents", "--poll-after-ms", "50",
                "--lora-dir", str(lora_dir)])
    try:
        yield s.start().wait_ready()
    finally:
        s.close()


def cli_latents(tmp_path, *flags) -> tuple[torch.Tensor, Path]:
    """`k5 generate` in this process (one thread, as the server's process: the same reductions)."""
    from k5.launch.generate import main

    tmp_path.mkdir(parents=True, exist_ok=True)
    out, latents = tmp_path / "cli.mp4", tmp_path / "cli.safetensors"
    assert main([*TINY, "--prompt", PROMPT, *flags, "--output", str(out), "--save-latents", str(latents)]) == 0
    return load_file(latents)["latents"], out


def test_sdk_create_and_poll_then_download_gives_the_clis_video(server, tmp_path):
    from k5.engine.media.mp4 import check_mp4

    client = server.client()
    video = client.videos.create_and_poll(prompt=PROMPT, size="64x64",
                                          extra_body={"seed": 7, "num_inference_steps": 3, "num_frames": 5})
    assert video.status == "completed" and video.progress == 100 and video.error is None, video
    assert video.size == "64x64" and video.model == "tiny" and video.completed_at >= video.created_at
    assert video.expires_at == video.completed_at + 24 * 3600  # --retention-hours default
    path = tmp_path / "served.mp4"
    client.videos.download_content(video.id).write_to_file(path)
    check_mp4(path, 5, 64, 64)  # decodes again: 5 frames of 64x64, no decode error
    served = load(client.videos.download_content(video.id, variant="latents").content)["latents"]
    reference, cli_mp4 = cli_latents(tmp_path, "--seed", "7", "--steps", "3")
    assert torch.equal(served, reference)  # the CLI's code path on the same tensors: bit for bit
    assert path.read_bytes() == cli_mp4.read_bytes()  # and the same H.264 file
    # listed, with the CLI's manifest record and metrics in its folder
    assert video.id in [v.id for v in client.videos.list(limit=100)]
    job = server.state / "jobs" / video.id
    (record,) = [json.loads(line) for line in (job / "manifest.jsonl").read_text().splitlines()]
    assert record["settings"]["request"]["seed"] == 7 and record["files"]["video"]["name"] == f"{video.id}.mp4"
    assert json.loads((job / "metrics.json").read_text())["per_item"][0]["steps"] == 3


def test_a_variant_and_magcache_per_request(server, tmp_path):
    # the tiny model takes a preset's sampling settings and MagCache ratios, as `k5 generate --variant --magcache`
    before = server.metrics()
    client = server.client()
    video = client.videos.create_and_poll(prompt=PROMPT, extra_body={"seed": 5, "variant": "t2v-lite-sft-5s",
                                                                     "magcache": True})
    assert video.status == "completed" and video.k5["steps"] == 50 and video.k5["magcache"], video
    served = load(client.videos.download_content(video.id, variant="latents").content)["latents"]
    reference, _ = cli_latents(tmp_path, "--seed", "5", "--variant", "t2v-lite-sft-5s", "--magcache", "--steps", "50")
    assert torch.equal(served, reference)
    record = json.loads((server.state / "jobs" / video.id / "manifest.jsonl").read_text())
    run, skipped = record["dit_forwards"]["run"], len(record["dit_forwards"]["skipped"])
    assert run + skipped == 100 and skipped > 0 and record["checkpoint"]["variant"] == "t2v-lite-sft-5s"
    after = server.metrics()
    assert after['k5_dit_forwards_total{kind="run"}'] - before['k5_dit_forwards_total{kind="run"}'] == run
    assert after['k5_dit_forwards_total{kind="skipped"}'] - before['k5_dit_forwards_total{kind="skipped"}'] == skipped
    assert after["k5_step_seconds_count"] - before["k5_step_seconds_count"] == 50


def test_progress_is_the_share_of_steps_done(server):
    # 8 steps and the decode: after step k the job is k/9 done. The gate holds it after each step until the test
    # has read the progress, whatever the machine's speed.
    client = server.client()
    server.hold(1)
    try:
        job = client.videos.create(prompt=PROMPT, extra_body={"num_inference_steps": 8})
        seen = []
        for k in range(1, 9):
            seen.append(server.wait_progress(job.id, 100 * k // 9).progress)
            server.hold(k + 1)
        server.release()
        done = server.wait_status(job.id)
    finally:
        server.release()
    assert seen == [100 * k // 9 for k in range(1, 9)]  # 11, 22, ..., 88: the real percentage of the steps
    assert len({p for p in seen if 0 < p < 100}) >= 4
    assert done.status == "completed" and done.progress == 100


def test_eight_clients_forty_requests_bounded_queue(server):
    before = server.metrics()
    accepted, refused, errors = [], [], []
    lock = threading.Lock()
    client = server.client()
    server.hold(1)  # the first job holds after its first step, so the queue fills whatever the machine's speed

    def send(c: int):
        for i in range(5):
            try:
                v = client.videos.create(prompt=f"client {c} request {i}",
                                         extra_body={"num_inference_steps": 1, "num_frames": 1, "seed": 10 * c + i})
                with lock:
                    accepted.append(v.id)
            except openai.RateLimitError as e:
                with lock:
                    refused.append((e.status_code, e.response.headers.get("retry-after"), e.body))
            except Exception as e:  # anything else fails the test below
                with lock:
                    errors.append(repr(e))

    threads = [threading.Thread(target=send, args=(c,)) for c in range(8)]
    try:
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
    finally:
        server.release()
    assert not errors, errors
    assert len(accepted) + len(refused) == 40 and 4 <= len(accepted) <= 5  # 4 waiting, 1 held running
    assert refused and all(code == 429 and int(after) >= 1 and body["code"] == "queue_full"
                           for code, after, body in refused), refused[:3]
    for job_id in accepted:  # none lost: every accepted request completes, its video downloadable
        assert server.wait_status(job_id).status == "completed"
        assert len(server.client().videos.download_content(job_id).content) > 0
    after = server.metrics()
    delta = {k: after.get(k, 0) - before.get(k, 0) for k in after}
    assert delta['k5_requests_total{outcome="accepted"}'] == len(accepted)
    assert delta['k5_requests_total{outcome="rejected_queue_full"}'] == len(refused)
    assert delta['k5_jobs_finished_total{outcome="completed"}'] == len(accepted)
    assert after["k5_queue_depth"] == 0 and after['k5_jobs{status="in_progress"}'] == 0


def cli_error(capsys, *flags) -> str:
    """The message `k5 generate` prints for the same mistake."""
    from k5.launch.generate import main

    with pytest.raises(SystemExit) as e:
        main([*TINY, "--prompt", PROMPT, "--output", "x.mp4", *flags])
    assert e.value.code == 2
    return capsys.readouterr().err.strip().splitlines()[-1].removeprefix("error: ")


def test_bad_inputs_get_their_4xx_and_the_server_goes_on(server, capsys):
    client = server.client()
    with pytest.raises(openai.BadRequestError) as e:
        client.videos.create(prompt=PROMPT, size="65x64")
    assert e.value.status_code == 400 and e.value.body["message"] == cli_error(capsys, "--width", "65")
    assert e.value.body["type"] == "invalid_request_error"

    with pytest.raises(openai.BadRequestError) as e:
        client.videos.create(prompt=PROMPT, extra_body={"guidance_scale": float("nan")})
    assert e.value.body["message"] == "'guidance_scale' must be a finite number, got 'nan'"  # a prompt file's rule

    with pytest.raises(openai.BadRequestError) as e:
        client.videos.create(prompt=PROMPT, input_reference=("cat.png", b"this is not an image", "image/png"))
    assert "'input_reference' cat.png is not an image file Pillow can read" in e.value.body["message"]
    assert e.value.body["code"] == "invalid_image"

    big = b"\x89PNG\r\n\x1a\n" + bytes(400 * 1024)  # over --max-upload-mb 0.25
    with pytest.raises(openai.APIStatusError) as e:
        client.videos.create(prompt=PROMPT, input_reference=("big.png", big, "image/png"))
    assert e.value.status_code == 413 and e.value.body["code"] == "upload_too_large"

    def chunks():  # no Content-Length: the server counts the body as it streams
        yield (b"--b\r\nContent-Disposition: form-data; name=\"prompt\"\r\n\r\nx\r\n--b\r\nContent-Disposition: "
               b"form-data; name=\"input_reference\"; filename=\"big.png\"\r\nContent-Type: image/png\r\n\r\n")
        for _ in range(40):
            yield bytes(16 * 1024)
        yield b"\r\n--b--\r\n"

    status, _, body = server.http("POST", "/v1/videos", chunks(), {"Content-Type": "multipart/form-data; boundary=b"},
                                  chunked=True)
    assert status == 413 and body["error"]["code"] == "upload_too_large"

    with pytest.raises(openai.NotFoundError) as e:
        client.videos.retrieve("video_doesnotexist")
    assert e.value.body["code"] == "not_found"
    status, _, body = server.http("GET", "/v1/videos/video_doesnotexist/content")
    assert status == 404 and set(body["error"]) == {"message", "type", "param", "code"}
    status, _, body = server.http("POST", "/v1/videos", {"prompt": PROMPT, "image": "/etc/passwd"})
    assert status == 400 and "unknown field(s) 'image'" in body["error"]["message"]
    status, _, body = server.http("POST", "/v1/videos", {"prompt": PROMPT, "lora": "../../x"})
    assert status == 400 and body["error"]["message"] == "'lora' '../../x' is not one of this server's LoRAs: camera"

    # and it goes on serving
    assert server.health() == 200
    ok = client.videos.create_and_poll(prompt=PROMPT, extra_body={"num_inference_steps": 1, "num_frames": 1})
    assert ok.status == "completed"
    assert server.metrics()['k5_requests_total{outcome="invalid"}'] >= 5


def test_the_page_in_a_headless_browser(server, tmp_path):
    from playwright.sync_api import sync_playwright

    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
             "--disable-background-networking", "--disable-component-update", "--disable-sync"]
    server.hold(2)
    try:
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path="/usr/bin/chromium", args=flags)
            try:
                page = browser.new_page()
                page.goto(server.url + "/")
                page.wait_for_selector("#model:has-text('tiny')")
                page.fill("#prompt", "a lighthouse in the page")
                page.fill("#steps", "4")
                page.click("#submit")
                page.wait_for_selector("#message:has-text('queued as')")
                job_id = page.inner_text("#message").removeprefix("queued as ").strip()
                row = f"#job-{job_id}"
                # held after step 2 of 4 (+ the decode): the page's bar shows 40%
                page.wait_for_function(f"document.querySelector('{row} progress') && "
                                       f"document.querySelector('{row} progress').value == 40", timeout=120_000)
                page.screenshot(path=str(tmp_path / "progress.png"))
                server.release()
                page.wait_for_selector(f"{row} video", timeout=120_000)
                # it plays: decoded frames (readyState >= 2), a size, and the clock moving
                page.wait_for_function(f"(v => v.readyState >= 2 && v.videoWidth == 64 && v.currentTime > 0)"
                                       f"(document.querySelector('{row} video'))", timeout=60_000)
                shot = tmp_path / "page.png"
                page.screenshot(path=str(shot), full_page=True)
            finally:
                browser.close()
    finally:
        server.release()
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and (tmp_path / "progress.png").is_file()
    assert server.video(job_id).status == "completed"


# Last in this file: a LoRA job leaves the DiT's base weights re-read from the checkpoint, equal bit for bit but at
# other memory addresses, where a CPU GEMM may round differently; the bitwise comparison above runs before it.
def test_i2v_upload_with_a_lora_named_from_the_folder(server, lora_dir, tmp_path):
    from PIL import Image

    from numerics import rel_err

    source = tmp_path / "wide.png"
    Image.new("RGB", (96, 48), (30, 120, 200)).save(source)
    client = server.client()
    with open(source, "rb") as f:
        video = client.videos.create_and_poll(prompt=PROMPT, input_reference=f,
                                              extra_body={"seed": 3, "lora": "camera:0.7"})
    assert video.status == "completed", video
    assert video.size == "96x48" and video.k5["lora"] == ["camera"]  # the image's aspect ratio at the area 64x64
    served = load(client.videos.download_content(video.id, variant="latents").content)["latents"]
    with_lora, _ = cli_latents(tmp_path, "--seed", "3", "--image", str(source),
                               "--lora", f"{lora_dir / 'camera'}:0.7")
    base, _ = cli_latents(tmp_path / "base", "--seed", "3", "--image", str(source))
    # the README's rule for an adapter switched in between items: the CLI's result up to fp32 rounding
    assert rel_err(served, with_lora) <= 1e-5 and rel_err(served, base) > 1e-2
    with pytest.raises(openai.BadRequestError) as e:
        client.videos.create(prompt=PROMPT, extra_body={"lora": "../camera"})
    assert e.value.body["message"] == "'lora' '../camera' is not one of this server's LoRAs: camera"
