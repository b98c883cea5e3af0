"""Outputs: the one table of what k5 writes, all-or-nothing publishing, folders tried before anything runs, and a
job on a disk with room for half a video: nothing published or recorded, and the resume after freeing space
completes the job with valid files."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from k5.engine.media.mp4 import check_mp4
from k5.launch.batch import MANIFEST, read_manifest
from k5.launch.outputs import check_writable, output_name, sha256_file, write_outputs
from sandbox import can_mount, in_mount_namespace, limit_file_size

ROOT = Path(__file__).resolve().parents[1]
GENERATE = ROOT / "launch" / "generate.py"


def test_output_names_keep_our_extension_and_refuse_another_format():
    assert output_name("cat") == "cat.mp4"
    assert output_name("cat.MP4") == "cat.MP4"
    assert output_name("take.1") == "take.1.mp4"  # not a media extension: the name goes on
    with pytest.raises(ValueError, match=r"'output' 'cat.gif': k5 writes the video as .mp4 .*; use cat.mp4"):
        output_name("cat.gif")


def frames(n=1):
    return torch.full((n, 16, 16, 3), 90, dtype=torch.uint8)


def test_write_outputs_publishes_all_or_nothing(tmp_path):
    targets = {"video": tmp_path / "a.mp4", "latents": tmp_path / "a.safetensors"}
    with pytest.raises(AttributeError):  # the latents writer fails after the video was written and checked
        write_outputs(targets, {"video": frames(), "latents": "not a tensor"})
    assert list(tmp_path.iterdir()) == []

    def commit(files):  # the manifest append fails after both files were published
        assert all(p.exists() for p in targets.values())
        raise OSError(28, "No space left on device")

    with pytest.raises(OSError, match="No space left"):
        write_outputs(targets, {"video": frames(), "latents": torch.zeros(1, 1, 2, 2, 16)}, commit)
    assert list(tmp_path.iterdir()) == []

    files = write_outputs(targets, {"video": frames(3), "latents": torch.zeros(1, 1, 2, 2, 16)})
    assert files["video"]["checked"] == {"frames": 3, "width": 16, "height": 16}
    assert files["latents"]["checked"] == {"key": "latents", "shape": [1, 1, 2, 2, 16], "dtype": "float32"}
    assert files["video"]["sha256"] == sha256_file(targets["video"])
    with pytest.raises(FileExistsError):  # a finished file is never replaced
        write_outputs({"video": targets["video"]}, {"video": frames()})


def test_check_writable_looks_above_a_folder_that_does_not_exist_yet(tmp_path):
    check_writable(tmp_path / "new" / "deeper" / "x.mp4", "--output")
    assert list(tmp_path.iterdir()) == []  # tried with a file that is gone again, nothing made
    (tmp_path / "file").write_text("")
    with pytest.raises(ValueError, match="is not a folder"):
        check_writable(tmp_path / "file" / "x.mp4", "--output")


# ---- a read-only folder, refused before any weight loads ---------------------------------------------------------

NO_LOADING = ("import sys; sys.path.insert(0, {root!r})\n"
              "from k5.engine.pipelines.video import Kandinsky5Pipeline\n"
              "def loaded(*a, **k):\n    raise SystemExit('weights were loaded for a run that must be refused')\n"
              "Kandinsky5Pipeline.from_pretrained = loaded\n"
              "from k5.launch.generate import main\nsys.exit(main(sys.argv[1:]))\n").format(root=str(ROOT))


@pytest.mark.parametrize("job", [False, True])
def test_a_read_only_output_folder_is_refused_before_loading(tmp_path, job):
    folder = tmp_path / "ro"
    folder.mkdir()
    prompts = tmp_path / "p.txt"
    prompts.write_text("a cat\n")
    out = ["--prompts", prompts, "--output-dir", folder / "job"] if job else ["--prompt", "a cat", "--output",
                                                                                 folder / "cat.mp4"]
    cmd = [sys.executable, "-c", NO_LOADING, "--model", "tiny", *out]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    if can_mount():  # a read-only mount: what root sees too (permission bits do not stop root)
        r = in_mount_namespace(f'mount -t tmpfs -o ro,size=64k tmpfs {folder} && exec "$@"', env, cmd)
        reason = "Read-only file system"
    elif os.geteuid() != 0:
        folder.chmod(0o555)
        r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
        reason = "Permission denied"
    else:
        pytest.skip("root without a mount namespace: no folder here is read-only for this process")
    assert r.returncode == 2, r.stderr
    flag = "--output-dir" if job else "--output"
    assert f"error: {flag} {folder / ('job' if job else 'cat.mp4')}" in r.stderr, r.stderr
    assert f"cannot create files in {folder} ({reason})" in r.stderr and r.stderr.count("error:") == 1


# ---- a full disk ---------------------------------------------------------------------------------------------------

ROOM = 48 * 1024  # the tmpfs: the job's small files (lock, log: < 16 KiB) and about half of the video
SIZES = ["--height", "256", "--width", "256", "--num-frames", "9", "--steps", "2"]


def test_a_disk_with_room_for_half_a_video_publishes_nothing_and_the_resume_completes(tmp_path):
    prompts = tmp_path / "p.txt"
    prompts.write_text("a lighthouse in a storm\n")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    if can_mount():
        mnt, out = tmp_path / "mnt", tmp_path / "out"
        mnt.mkdir()
        out.mkdir()
        job = mnt / "job"
        cmd = [sys.executable, str(GENERATE), "--model", "tiny", "--prompts", prompts, "--output-dir", job, *SIZES]
        script = (f'mount -t tmpfs -o size={ROOM} tmpfs {mnt} || exit 99\n'
                  f'"$@" > {out}/first.out 2> {out}/first.err; echo $? > {out}/first.rc\n'
                  f'cp -a {job} {out}/after_failure\n'
                  f'mount -o remount,size=64m {mnt}\n'  # space freed
                  f'"$@" > {out}/second.out 2> {out}/second.err; echo $? > {out}/second.rc\n'
                  f'cp -a {job} {out}/after_resume\n')
        r = in_mount_namespace(script, env, cmd)
        assert r.returncode == 0, r.stderr
        first = ((out / "first.rc").read_text().strip(), (out / "first.err").read_text())
        second = ((out / "second.rc").read_text().strip(), (out / "second.err").read_text())
        failed, resumed, reason = out / "after_failure", out / "after_resume", "No space left on device"
    else:  # the same fault at the write: files of the job may not grow past ROOM - 16 KiB
        job = tmp_path / "job"
        cmd = [sys.executable, str(GENERATE), "--model", "tiny", "--prompts", str(prompts), "--output-dir", str(job),
               *SIZES]
        r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600, cwd=ROOT,
                           preexec_fn=limit_file_size(ROOM - 16 * 1024))
        first = (str(r.returncode), r.stderr)
        failed = tmp_path / "after_failure"
        subprocess.run(["cp", "-a", str(job), str(failed)], check=True)
        r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600, cwd=ROOT)
        second, resumed, reason = (str(r.returncode), r.stderr), job, "ffmpeg failed"

    # The full disk: the job fails (exit 1) and leaves no published video, no record, no temporary file.
    assert first[0] == "1", first[1][-3000:]
    assert reason in first[1], first[1][-3000:]
    assert first[1].strip().splitlines()[-1] == (f"0 item(s) finished in this run; every finished item stays in {job}; "
                                                 f"run the same command again to resume")
    assert sorted(p.name for p in failed.iterdir() if not p.name.startswith(".k5-job")) == ["logs", MANIFEST]
    assert read_manifest(failed / MANIFEST).records == []

    # Space freed, the same command: the job completes, with a video that plays and matches its record.
    assert second[0] == "0", second[1][-3000:]
    (record,) = read_manifest(resumed / MANIFEST).records
    video = resumed / record["files"]["video"]["name"]
    assert record["files"]["video"]["sha256"] == sha256_file(video)
    check_mp4(video, 9, 256, 256)
    assert video.stat().st_size >= 2 * (ROOM - 16 * 1024)  # the premise: the disk had room for half of it at most
    assert not [p.name for p in resumed.iterdir() if ".partial" in p.name]
    metrics = json.loads((resumed / "metrics.json").read_text())
    assert metrics["status"] == "done" and metrics["items"]["finished"] == 1
