"""Writing results so that a finished file is never half-written, unplayable, overwritten or lost.

``OUTPUTS`` is the one table of what k5 writes: for every kind of output its file extensions, its writer and its
check. Every output goes the same way (``write_outputs``): written under a temporary name beside its final name
(``.NAME.<random>.partial``), checked (a video is decoded again: frame count, size, no decode error), fsync'ed and
hashed, and only then linked to its final name, which is never replaced. A write the filesystem refused (a full
disk, a quota) is an error even where the encoder exits 0; nothing of the item is published then.

A kind of output is one row: a writer that fills the temporary file and returns what the file must hold, and a
check that raises unless it does. Image Lite's PNG images are the "image" row (decoded again: size and the sha256
of the pixels, PNG being lossless). An item's main file is its "video" or its "image" (``MEDIA``), told apart by
the name's extension (``media_kind``).
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from safetensors import safe_open
from safetensors.torch import save_file

from k5.engine.media.png import check_png, encode_png
from k5.engine.media.mp4 import check_mp4, encode_mp4, publish, shareable

FPS = 24


# ---- the kinds of output -------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class AudioVideo:
    """A video with its audio track (Kandinsky 6): uint8 frames [F, H, W, 3] and a mono waveform [S] at
    ``sample_rate``, already as long as the video (engine.vae.audio.fit_to_video)."""

    frames: Any
    waveform: Any
    sample_rate: int


def _write_video(frames, path: Path) -> dict:
    if isinstance(frames, AudioVideo):  # H.264 + AAC, checked: the frames, and one AAC track of the waveform's length
        from k5.engine.media.av import encode_av_mp4

        found = encode_av_mp4(frames.frames, frames.waveform, path, fps=FPS, sample_rate=frames.sample_rate)
        found["audio"].update(samples=int(frames.waveform.shape[-1]))
        return found
    return encode_mp4(frames, path, fps=FPS)  # checked: decodes to these frames and size


def _check_video(path: Path, expect: dict) -> None:
    check_mp4(path, expect["frames"], expect["width"], expect["height"])
    if "audio" in expect:  # a Kandinsky 6 video: its AAC track must still be there, as long as it was
        from k5.engine.media.av import check_audio

        check_audio(path, expect["audio"]["samples"], expect["audio"]["sample_rate"])


def _write_image(image, path: Path) -> dict:
    return encode_png(image, path)  # checked: decodes to these pixels at this size


def _check_image(path: Path, expect: dict) -> None:
    check_png(path, expect["width"], expect["height"], expect.get("pixels_sha256"))


def _tensor_writer(key: str) -> Callable[[Any, Path], dict]:
    def write(tensor, path: Path) -> dict:
        # A dict holds ``key`` and more tensors of the same item (Kandinsky 6: "audio_latents" beside "latents").
        tensors = tensor if isinstance(tensor, dict) else {key: tensor}
        tensors = {k: t.detach().contiguous().cpu() for k, t in tensors.items()}
        save_file(tensors, str(path))
        main = tensors[key]
        expect = {"key": key, "shape": list(main.shape), "dtype": str(main.dtype).removeprefix("torch.")}
        if len(tensors) > 1:
            expect["more"] = {k: list(t.shape) for k, t in tensors.items() if k != key}
        _check_tensors(path, expect)
        return expect

    return write


def _check_tensors(path: Path, expect: dict) -> None:
    try:
        with safe_open(str(path), framework="pt") as f:
            keys = list(f.keys())
            shape = list(f.get_slice(expect["key"]).get_shape()) if expect["key"] in keys else None
    except Exception as e:  # safetensors raises several types for a damaged file
        raise OSError(f"{path} is not a readable safetensors file: {e}") from e
    more = expect.get("more", {})
    if sorted(keys) != sorted([expect["key"], *more]) or shape != expect["shape"]:
        raise OSError(f"{path} holds {keys} {shape}, not {expect['key']!r} of shape {expect['shape']}"
                      + (f" and {', '.join(more)}" if more else ""))


@dataclass(frozen=True)
class OutputKind:
    name: str
    suffixes: tuple[str, ...]  # extensions a file of this kind may have; the first is the default
    describe: str
    write: Callable[[Any, Path], dict]  # (data, temporary path) -> what the file must hold; raises if it does not
    check: Callable[[Path, dict], None]  # raises unless the file holds what ``write`` returned


OUTPUTS = {
    "video": OutputKind("video", (".mp4",), "H.264 MP4 video (24 fps, yuv420p)", _write_video, _check_video),
    "image": OutputKind("image", (".png",), "PNG image (RGB, lossless)", _write_image, _check_image),
    "latents": OutputKind("latents", (".safetensors",), "safetensors file of the final latents (key 'latents')",
                          _tensor_writer("latents"), _check_tensors),
    "frames": OutputKind("frames", (".safetensors",), "safetensors file of the uint8 frames (key 'frames')",
                         _tensor_writer("frames"), _check_tensors),
}

# Extensions of media files k5 does not write as this kind: a name ending in one is refused, not given a second
# extension (the other MEDIA kind's extensions count too: cat.mp4 is no name for an image).
OTHER_MEDIA = {".avi", ".mov", ".mkv", ".webm", ".gif", ".m4v", ".mpg", ".mpeg", ".wmv", ".flv", ".ts", ".png",
               ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff", ".pt", ".pth", ".bin", ".npy", ".npz", ".mp4"}
MEDIA = ("video", "image")  # an item's main file: a video model's video, an Image Lite model's image


def media_kind(name: str | Path) -> str:
    """The MEDIA kind a file name is written as: "image" for .png, else "video"."""
    return "image" if Path(name).suffix.lower() in OUTPUTS["image"].suffixes else "video"


def check_suffix(kind: str, path: str | Path, what: str) -> None:
    """Raise ValueError unless ``path`` names a file (not an existing folder) with an extension that ``kind`` is
    written as (``what``: the flag)."""
    spec = OUTPUTS[kind]
    if Path(path).is_dir():  # before the model is known, the main output may be either medium
        kinds = MEDIA if kind in MEDIA else (kind,)
        names = {f"NAME{OUTPUTS[k].suffixes[0]}": ("an " if k[0] in "aeiou" else "a ") + k for k in kinds}
        raise ValueError(folder_given(path, what, names))
    suffix = Path(path).suffix.lower()
    if suffix not in spec.suffixes:
        right = Path(path).with_suffix(spec.suffixes[0]) if suffix else Path(f"{path}{spec.suffixes[0]}")
        raise ValueError(f"{what} {path}: k5 writes the {kind} as {' or '.join(spec.suffixes)} ({spec.describe}), "
                         f"not {suffix or 'a file without extension'}; use {right}")


def output_name(value: str, kind: str = "video") -> str:
    """A prompt file's ``output`` field as a plain file name in the job folder: the kind's extension kept, added
    when the name has none of it, refused when the name ends in another media format's."""
    if not value or "/" in value or "\\" in value or value.startswith(".") or value != value.strip():
        raise ValueError(f"'output' must be a plain file name like \"cat{OUTPUTS[kind].suffixes[0]}\" (no folder, "
                         f"not starting with '.', no surrounding spaces), got {value!r}")
    spec = OUTPUTS[kind]
    suffix = Path(value).suffix.lower()
    if suffix in spec.suffixes:
        return value
    if suffix in OTHER_MEDIA:
        raise ValueError(f"'output' {value!r}: k5 writes the {kind} as {' or '.join(spec.suffixes)} "
                         f"({spec.describe}); use {value[: -len(suffix)]}{spec.suffixes[0]}")
    return value + spec.suffixes[0]


# ---- writing ---------------------------------------------------------------------------------------------------------

PARTIAL_MARK = ".partial"  # every temporary output here and in engine.media.mp4 is ".<name>.<random>.partial[...]"


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def temp_path(path: str | Path) -> Path:
    """A fresh temporary name next to ``path`` that ``clean_partials`` recognises."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=PARTIAL_MARK)
    os.close(fd)
    return Path(tmp)


def write_outputs(targets: dict[str, Path], data: dict[str, Any],
                  commit: Callable[[dict], None] | None = None) -> dict[str, dict]:
    """Write ``data[kind]`` to ``targets[kind]`` for every kind; return {kind: {name, bytes, sha256, ...}}.

    All files are written and checked under temporary names first, then published together, then ``commit``
    (the manifest record) is called with the file entries. On any error nothing stays: the temporary files are
    deleted and the files already published in this call are unlinked (they were never recorded)."""
    tmps: dict[str, Path] = {}
    published: list[Path] = []
    try:
        files = {}
        for kind, target in targets.items():
            tmps[kind] = temp_path(target)
            expect = OUTPUTS[kind].write(data[kind], tmps[kind])
            with open(tmps[kind], "rb") as f:
                os.fsync(f.fileno())
            files[kind] = {"name": Path(target).name, "bytes": tmps[kind].stat().st_size,
                           "sha256": sha256_file(tmps[kind]), "checked": expect}
        for kind, target in targets.items():
            publish(tmps[kind], target)
            published.append(Path(target))
        if commit is not None:
            commit(files)
    except BaseException:
        for tmp in tmps.values():
            tmp.unlink(missing_ok=True)
        for path in published:
            path.unlink(missing_ok=True)
        raise
    return files


def check_output(kind: str, path: Path, expect: dict) -> str | None:
    """None if ``path`` still holds what ``write_outputs`` checked it held, else what is wrong."""
    try:
        OUTPUTS[kind].check(path, expect)
    except Exception as e:  # an unplayable video, an unreadable file
        return str(e)
    return None


# ---- before anything runs -----------------------------------------------------------------------------------------

def folder_given(path: str | Path, what: str, names: dict[str, str]) -> str:
    """The message for a flag that takes a file name but was given an existing folder; ``names``: example file
    name -> what it is for (said only where there are several)."""
    if len(names) == 1:
        example = f"such as {Path(path) / next(iter(names))}"
    else:
        example = "(" + ", ".join(f"{Path(path) / name} for {use}" for name, use in names.items()) + ")"
    job = f", or --output-dir {path} to make it a job folder (files named by the job, a manifest, resume)"
    return f"{what} {path} is a folder; give a file name {example}" + (job if what == "--output" else "")


def refuse_existing(*paths: str | Path | None) -> None:
    """Raise before any work is done if an output would replace a finished file (or is an existing folder)."""
    for p in paths:
        if p is not None and Path(p).is_dir():
            raise FileExistsError(f"output {p} is a folder; give a file name (a new one: finished outputs are never "
                                  f"overwritten)")
        if p is not None and Path(p).exists():
            raise FileExistsError(f"output {p} already exists; finished outputs are never overwritten: choose "
                                  f"another name or move the old file away")


def check_writable(path: str | Path, what: str, folder: bool = False) -> None:
    """Raise ValueError unless a file can be created in ``path``'s folder (``path`` itself with ``folder``), or,
    where that folder does not exist yet, in the nearest folder above it that does, where it will be made. Tried
    with a real file, not guessed from permission bits (root, ACLs, read-only mounts and quotas all differ from what
    the bits say)."""
    folder = Path(path).absolute() if folder else Path(path).absolute().parent
    while not folder.exists():
        folder = folder.parent
    if not folder.is_dir():
        raise ValueError(f"{what} {path}: {folder} is not a folder")
    try:
        fd, probe = tempfile.mkstemp(dir=folder, prefix=".k5-write-test.", suffix=PARTIAL_MARK)
    except OSError as e:
        raise ValueError(f"{what} {path}: cannot create files in {folder} ({e.strerror}); choose a folder you "
                         f"can write to") from None
    os.close(fd)
    os.unlink(probe)


# ---- batch jobs: temporary files left by a killed run, records appended in one write --------------------------------

def is_partial(name: str) -> bool:
    return name.startswith(".") and PARTIAL_MARK in name


def clean_partials(folder: str | Path) -> list[Path]:
    """Delete the temporary files a killed run left in ``folder`` (not its subfolders); return them.

    Only call this while no other process writes into ``folder`` (the job lock says so): a live writer's temporary
    file looks the same as a dead one's.
    """
    removed = []
    for p in Path(folder).iterdir():
        if is_partial(p.name) and p.is_file():
            p.unlink(missing_ok=True)
            removed.append(p)
    return removed


def append_line(path: str | Path, line: str) -> None:
    """Append one line with a single write() on an O_APPEND descriptor.

    Each write lands at the end of the file as a whole: two processes appending at once on one machine (or on
    Lustre/GPFS) never interleave their lines. NFS does not honour O_APPEND across clients; readers of the
    manifest therefore check every line's own checksum and treat a damaged line as missing.
    """
    data = (line.rstrip("\n") + "\n").encode()
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        written = os.write(fd, data)
        if written != len(data):
            raise OSError(f"short write to {path}: {written} of {len(data)} bytes (disk full?)")
        os.fsync(fd)
    finally:
        os.close(fd)


def replace_atomically(path: str | Path, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary file and rename(): readers see the old or the new file."""
    path = Path(path)
    tmp = temp_path(path)
    try:
        tmp.write_text(text)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        shareable(tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
