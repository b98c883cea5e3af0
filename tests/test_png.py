"""write_png: what PIL reads back, no clobbering, and no partial file whatever fails; check_png refuses a truncated
file, another size and other pixels."""

import numpy as np
import pytest
import torch
from PIL import Image

import k5.engine.media.mp4 as video_module
from k5.engine.media.png import UnreadableImage, check_png, encode_png, write_png


def image(h=24, w=40, seed=0):
    return (np.random.default_rng(seed).random((h, w, 3)) * 255).astype(np.uint8)


def test_round_trip_and_metadata(tmp_path):
    img = image()
    path = write_png(torch.from_numpy(img)[None], tmp_path / "out" / "fox.png", metadata={"prompt": "a fox", "seed": 3})
    with Image.open(path) as im:
        assert im.format == "PNG" and im.mode == "RGB" and im.size == (40, 24)
        assert np.array_equal(np.asarray(im), img)  # lossless
        assert im.text == {"prompt": "a fox", "seed": "3"}
    assert [p.name for p in path.parent.iterdir()] == ["fox.png"]  # no temporary file left


def test_never_overwrites(tmp_path):
    path = write_png(image(seed=1), tmp_path / "a.png")
    before = path.read_bytes()
    with pytest.raises(FileExistsError, match="a.png exists"):
        write_png(image(seed=2), path)
    assert path.read_bytes() == before
    write_png(image(seed=2), path, overwrite=True)
    assert path.read_bytes() != before


def test_a_file_appearing_meanwhile_is_kept(tmp_path, monkeypatch):
    path = tmp_path / "race.png"
    real_link = video_module.os.link

    def someone_else_first(src, dst):
        Image.fromarray(image(seed=9)).save(dst)  # another writer finishes first
        return real_link(src, dst)

    monkeypatch.setattr(video_module.os, "link", someone_else_first)
    with pytest.raises(FileExistsError, match="appeared while this run was writing"):
        write_png(image(), path)
    with Image.open(path) as im:
        assert np.array_equal(np.asarray(im), image(seed=9))
    assert [p.name for p in tmp_path.iterdir()] == ["race.png"]


def test_failed_encode_leaves_nothing(tmp_path, monkeypatch):
    def full_disk(self, fp, *args, **kwargs):
        fp.write(b"\x89PNG partial")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(Image.Image, "save", full_disk)
    with pytest.raises(OSError, match="No space left"):
        write_png(image(), tmp_path / "x.png")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("bad, match", [
    (np.zeros((4, 4), np.uint8), r"RGB image \[H, W, 3\]"),
    (np.zeros((2, 4, 4, 3), np.uint8), r"RGB image"),
    (np.zeros((4, 4, 3), np.float32), "uint8"),
])  # fmt: skip
def test_bad_arrays(tmp_path, bad, match):
    with pytest.raises(ValueError, match=match):
        write_png(bad, tmp_path / "x.png")
    assert list(tmp_path.iterdir()) == []


def test_check_png_decodes_the_whole_file(tmp_path):
    img = image(h=32, w=48)
    path = tmp_path / "a.png"
    expect = encode_png(img, path)
    assert (expect["width"], expect["height"]) == (48, 32)
    check_png(path, **expect)
    data = path.read_bytes()
    (tmp_path / "cut.png").write_bytes(data[: len(data) // 2])  # cut in the pixel data
    with pytest.raises(UnreadableImage, match="cut.png is not a readable PNG image"):
        check_png(tmp_path / "cut.png", **expect)
    with pytest.raises(UnreadableImage, match=r"width 48 \(written 40\)"):
        check_png(path, 40, 32)
    other = img.copy()
    other[5, 7, 1] ^= 1  # one channel of one pixel, one level
    with pytest.raises(UnreadableImage, match="its pixels differ"):
        check_png(path, 48, 32, encode_png(other, tmp_path / "b.png")["pixels_sha256"])
