"""`k5 serve --model tiny-k6-distill`: the videos API serves Kandinsky 6, its content an MP4 with the AAC track
(ffprobe: one H.264 and one AAC stream of the video's duration) and its latents the one-process CLI's (video and
audio, bit for bit: the same code path in one thread); a request the checkpoint cannot run (guidance on a PiFlow
checkpoint) is a 400 with the CLI's message."""

import pytest
import torch
from safetensors.torch import load, load_file

from serve_util import Server
from test_k6_generate import assert_av

K6 = ["--model", "tiny-k6-distill", "--height", "64", "--width", "64", "--num-frames", "5", "--steps", "2"]
PROMPT = "a drummer on a rooftop"


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    s = Server(tmp_path_factory.mktemp("serve-k6") / "state", [*K6, "--save-latents", "--poll-after-ms", "50"])
    try:
        yield s.start().wait_ready()
    finally:
        s.close()


def test_video_with_audio_track_and_the_clis_latents(server, tmp_path):
    from k5.launch.generate import main

    client = server.client()
    video = client.videos.create_and_poll(prompt=PROMPT, extra_body={"seed": 9})
    assert video.status == "completed"
    path = tmp_path / "served.mp4"
    path.write_bytes(client.videos.download_content(video.id).content)
    assert_av(path, 5)
    served = load(client.videos.download_content(video.id, variant="latents").content)
    assert main([*K6, "--prompt", PROMPT, "--seed", "9", "--output", str(tmp_path / "cli.mp4"),
                 "--save-latents", str(tmp_path / "cli.safetensors")]) == 0
    cli = load_file(tmp_path / "cli.safetensors")
    assert sorted(served) == ["audio_latents", "latents"]
    assert torch.equal(served["latents"], cli["latents"]) and torch.equal(served["audio_latents"], cli["audio_latents"])


def test_guidance_on_a_distilled_checkpoint_is_a_bad_request(server):
    import openai

    with pytest.raises(openai.BadRequestError, match="guidance-scale 1"):
        server.client().videos.create(prompt=PROMPT, extra_body={"guidance_scale": 5.0})
