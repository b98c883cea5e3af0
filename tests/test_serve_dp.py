"""`k5 serve` on two ranks as two data-parallel groups: each group serves its own request at the same time, and
each request gives the one-process CLI's latents bit for bit (a group of one rank runs the one-process code path)."""

import pytest
import torch
from safetensors.torch import load

from serve_util import TINY, Server
from test_serve_api import PROMPT, cli_latents


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    s = Server(tmp_path_factory.mktemp("serve-dp") / "state",
               [*TINY, "--dp-degree", "2", "--ulysses-degree", "1", "--ring-degree", "1", "--save-latents",
                "--poll-after-ms", "50"], world=2)
    try:
        yield s.start().wait_ready()
    finally:
        s.close()


def test_each_group_serves_its_own_request(server, tmp_path):
    client = server.client()
    server.hold(1)
    try:
        jobs = [client.videos.create(prompt=PROMPT, extra_body={"seed": 20 + i, "num_inference_steps": 2})
                for i in range(2)]
        # both held after their first step at once: two groups, one job each
        for job in jobs:
            server.wait_progress(job.id, 100 * 1 // 3)
        assert [client.videos.retrieve(j.id).status for j in jobs] == ["in_progress", "in_progress"]
        server.release()
        done = [server.wait_status(j.id) for j in jobs]
    finally:
        server.release()
    assert [d.status for d in done] == ["completed", "completed"]
    groups = {server.log(0).count(f"job {j.id}: starting") + 2 * server.log(1).count(f"job {j.id}: starting")
              for j in jobs}
    assert groups == {1, 2}  # one job started on rank 0 only, the other on rank 1 only
    for i, job in enumerate(jobs):
        served = load(client.videos.download_content(job.id, variant="latents").content)["latents"]
        reference, _ = cli_latents(tmp_path / str(i), "--seed", str(20 + i), "--steps", "2")
        assert torch.equal(served, reference)
    assert server.metrics()['k5_peak_memory_bytes{rank="1",kind="max resident set"}'] > 0
