"""Prompt files: the three formats parse to the items worked out by hand, and every malformed line is refused with
its file, line number, field and what is expected, before any model loads and without writing anything."""

import json
import os
from pathlib import Path

import pytest
from PIL import Image

from k5.engine.pipelines.video import Kandinsky5Pipeline, check_request
from k5.engine.encoders.text import DEFAULT_NEGATIVE_PROMPT
from k5.engine.catalogue.tiny import tiny_checkpoint
from k5.launch.prompts import FIELDS, PromptFileError, read_prompts
from k5.engine.checkpoints.dit import locate

DEFAULTS = dict(negative_prompt=None, height=64, width=64, num_frames=1, steps=2, guidance_scale=5.0, shift=None,
                seed=100, image=None)


@pytest.fixture(scope="module")
def check():
    cfg = locate(tiny_checkpoint()).config  # config only: no weight is read
    return lambda req: check_request(req, cfg, nabla=False)


def write(tmp_path, name, text):
    p = tmp_path / name
    p.write_text(text)
    return p


def jsonl(*objs) -> str:
    return "\n".join(o if isinstance(o, str) else json.dumps(o) for o in objs) + "\n"


def test_jsonl_items_take_defaults_seeds_and_names(tmp_path, check):
    Image.new("RGB", (8, 8), "red").save(tmp_path / "cat.png")
    p = write(tmp_path, "p.jsonl", jsonl(
        {"prompt": "a fox", "seed": 3, "height": 128, "output": "fox"},
        "",
        {"prompt": "a cat", "image": "cat.png", "negative_prompt": "blurry", "guidance_scale": 1, "shift": None},
        {"prompt": "a dog", "num_frames": 5.0, "steps": 4, "output": "dog.mp4"},
    ))
    items = read_prompts(p, DEFAULTS, check)
    assert [(i.index, i.line, i.output) for i in items] == [(0, 1, "fox.mp4"), (1, 3, "00001.mp4"), (2, 4, "dog.mp4")]
    fox, cat, dog = (i.request for i in items)
    assert (fox.prompt, fox.seed, fox.height, fox.width, fox.num_frames, fox.steps) == ("a fox", 3, 128, 64, 1, 2)
    assert fox.negative_prompt == DEFAULT_NEGATIVE_PROMPT and fox.shift is None
    assert (cat.seed, cat.negative_prompt, cat.guidance_scale) == (101, "blurry", 1.0)  # seed: --seed + index
    assert cat.image == str(tmp_path / "cat.png")  # relative to the prompt file's folder
    assert (dog.seed, dog.num_frames, dog.steps) == (102, 5, 4)
    assert items[0].latents_name == "fox.safetensors" and items[0].where == f"{p} line 1"


def test_csv_with_header_and_empty_cells(tmp_path, check):
    p = write(tmp_path, "p.csv", 'prompt,seed,steps,output\n"a fox, running",7,,fox\n\n"two\nlines",,3,\n')
    items = read_prompts(p, DEFAULTS, check)
    assert [(i.line, i.request.prompt, i.request.seed, i.request.steps, i.output) for i in items] == [
        (2, "a fox, running", 7, 2, "fox.mp4"), (4, "two\nlines", 101, 3, "00001.mp4")]


def test_plain_text_one_prompt_a_line(tmp_path, check):
    p = write(tmp_path, "p.txt", "a fox\n\n  a cat in a hat \r\n")
    items = read_prompts(p, DEFAULTS, check)
    assert [(i.line, i.request.prompt, i.request.seed, i.output) for i in items] == [
        (1, "a fox", 100, "00000.mp4"), (3, "  a cat in a hat ", 101, "00001.mp4")]


BAD_JSONL = [
    ('{"prompt": "a cat"}\n{"prompt": "a dog",}', 2, "not valid JSON (Expecting property name enclosed in double "
                                                   "quotes at column 20); each line must be one JSON object"),
    ('{"prompt": "a cat", "sed": 3}', 1, "unknown field 'sed' (did you mean 'seed'?); known fields: "
                                         + ", ".join(FIELDS)),
    ('{"prompt": "a cat"}\n{"prompt": "  "}', 2, "the prompt is empty"),
    ('{"prompt": "a cat", "seed": "3"}', 1, "'seed' must be an integer, got '3'"),
    ('{"prompt": "a cat", "steps": 2.5}', 1, "'steps' must be an integer, got 2.5"),
    ('{"prompt": "a cat", "height": true}', 1, "'height' must be an integer, got True"),
    ('{"prompt": 7}', 1, "'prompt' must be a string, got 7"),
    ('{"prompt": "a cat", "guidance_scale": "high"}', 1, "'guidance_scale' must be a number, got 'high'"),
    ('{"prompt": "a cat", "guidance_scale": NaN}', 1, "'guidance_scale' must be a finite number, got nan"),
    ('{"prompt": "a cat", "shift": Infinity}', 1, "'shift' must be a finite number, got inf"),
    ('{"prompt": "a cat", "output": "cat.avi"}', 1, "'output' 'cat.avi': k5 writes the video as .mp4 (H.264 MP4 "
                                                    "video (24 fps, yuv420p)); use cat.mp4"),
    ('{"prompt": "a cat", "num_frames": 10}', 1, "num_frames 10 is not of the form 4k+1 (the VAE compresses time "
                                                 "4x); try 9"),
    ('{"prompt": "a cat", "width": 100}', 1, "width 100 is not a positive multiple of 16"),
    ('{"prompt": "a cat", "image": "missing.png"}', 1, "is not a readable file"),
    ('{"prompt": "a cat", "image": "notes.txt"}', 1, "is not an image file Pillow can read"),
    ('{"seed": 1}', 1, "missing 'prompt'"),
    ('["a cat"]', 1, "must be a JSON object like"),
    ('{"prompt": "a cat", "output": "../x.mp4"}', 1, "'output' must be a plain file name"),
    ('{"prompt": "a", "output": "x"}\n{"prompt": "b", "output": "x.mp4"}', 2,
     "output x.mp4 is also the output of line 1; every item needs its own file"),
    ('{"prompt": "a"}\n{"prompt": "b", "output": "00000"}', 2, "output 00000.mp4 is also the output of line 1"),
]


@pytest.mark.parametrize("text, line, message", BAD_JSONL)
def test_bad_jsonl_line(tmp_path, check, text, line, message):
    (tmp_path / "notes.txt").write_text("not an image")
    p = write(tmp_path, "prompts.jsonl", text + "\n")
    with pytest.raises(PromptFileError) as e:
        read_prompts(p, DEFAULTS, check)
    assert str(e.value).startswith(f"{p} line {line}: "), str(e.value)
    assert message in str(e.value)
    assert "\n" not in str(e.value)  # one clear error, not a list


@pytest.mark.parametrize("name, text, message", [
    ("p.csv", "prompt,sed\na cat,3\n", "p.csv line 1: CSV header has unknown field 'sed' (did you mean 'seed'?)"),
    ("p.csv", "seed\n3\n", "p.csv line 1: the CSV header needs a 'prompt' column"),
    ("p.csv", "prompt,seed\na cat,3\na dog,x\n", "p.csv line 3: 'seed' must be an integer, got 'x'"),
    ("p.csv", "prompt,seed\na cat,3,4\n", "p.csv line 2: has 3 cells but the header has 2 columns"),
    ("p.csv", "prompt,steps\n,3\n", "p.csv line 2: the prompt is empty"),
    ("p.csv", "prompt,guidance_scale\na cat,nan\n", "p.csv line 2: 'guidance_scale' must be a finite number"),
    ("p.csv", "prompt,shift\na cat,-inf\n", "p.csv line 2: 'shift' must be a finite number, got '-inf'"),
    ("p.json", '[{"prompt": "a cat"}]', "p.json: a .json file is not a prompt file"),
    ("p.txt", "\n\n", "p.txt has no prompts"),
])
def test_bad_csv_and_text_files(tmp_path, check, name, text, message):
    p = write(tmp_path, name, text)
    with pytest.raises(PromptFileError) as e:
        read_prompts(p, DEFAULTS, check)
    assert str(e.value).startswith(str(tmp_path)) and message in str(e.value), str(e.value)


def test_not_utf8_names_the_line(tmp_path, check):
    p = tmp_path / "p.txt"
    p.write_bytes(b"a cat\na \xff dog\n")
    with pytest.raises(PromptFileError, match=r"p.txt line 2: not UTF-8 text"):
        read_prompts(p, DEFAULTS, check)


def test_every_bad_line_is_listed_in_one_error(tmp_path, check):
    p = write(tmp_path, "p.jsonl", jsonl({"prompt": "ok"}, {"prompt": ""}, {"prompt": "ok", "seed": "x"}, "{"))
    with pytest.raises(PromptFileError) as e:
        read_prompts(p, DEFAULTS, check)
    msg = str(e.value)
    assert msg.startswith(f"{p}: 3 bad lines, nothing was run:")
    assert [ln.split(":")[0].strip() for ln in msg.splitlines()[1:]] == ["line 2", "line 3", "line 4"]


# ---- through the CLI: exit 2, one message, nothing written, no model loaded --------------------------------------

@pytest.mark.parametrize("text, match", [
    ('{"prompt": "a cat"}\n{"prompt": "a dog" "seed": 1}\n', "prompts.jsonl line 2: not valid JSON"),
    ('{"prompt": "a cat", "colour": "red"}\n', "prompts.jsonl line 1: unknown field 'colour'"),
    ('{"prompt": "a cat"}\n{"prompt": ""}\n', "prompts.jsonl line 2: the prompt is empty"),
    ('{"prompt": "a cat", "num_frames": "9"}\n', "prompts.jsonl line 1: 'num_frames' must be an integer, got '9'"),
    ('{"prompt": "a cat", "image": "/nonexistent/cat.png"}\n',
     "prompts.jsonl line 1: 'image' /nonexistent/cat.png is not a readable file"),
])
def test_cli_refuses_a_bad_prompt_file_before_loading(tmp_path, capsys, monkeypatch, text, match):
    from k5.launch.generate import main

    def no_loading(*a, **k):
        raise AssertionError("a model was loaded for a job that must not run")

    monkeypatch.setattr(Kandinsky5Pipeline, "from_pretrained", no_loading)
    p = write(tmp_path, "prompts.jsonl", text)
    out = tmp_path / "job"
    with pytest.raises(SystemExit) as e:
        main(["--model", "tiny", "--prompts", str(p), "--output-dir", str(out), "--height", "64", "--width", "64"])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert err.count("error:") == 1 and match in err, err
    assert not out.exists()


def test_cli_refuses_bad_defaults_for_the_items(tmp_path, capsys):
    from k5.launch.generate import main

    p = write(tmp_path, "prompts.txt", "a cat\n")
    with pytest.raises(SystemExit) as e:
        main(["--model", "tiny", "--prompts", str(p), "--output-dir", str(tmp_path / "job"), "--num-frames", "4"])
    assert e.value.code == 2
    assert "the command-line defaults for the items: num_frames 4 is not of the form 4k+1" in capsys.readouterr().err
    assert not (tmp_path / "job").exists()


@pytest.mark.parametrize("args, match", [
    (["--prompt", "a cat", "--prompts", "p.txt", "--output-dir", "d"], "not both"),
    (["--prompts", "p.txt"], "--prompts needs --output-dir DIR"),
    (["--prompts", "p.txt", "--output-dir", "d", "--output", "x.mp4"], "--output: in a batch job every file goes"),
    (["--prompt", "a cat", "--save-latents"], "--save-latents needs a PATH for a single video"),
])
def test_cli_flag_combinations(capsys, args, match):
    from k5.launch.generate import main

    with pytest.raises(SystemExit) as e:
        main(["--model", "tiny", *args])
    assert e.value.code == 2 and match in capsys.readouterr().err


def test_unreadable_image_is_refused(tmp_path, check):
    if os.geteuid() == 0:
        # root reads any file: a directory stands for the unreadable path
        image = tmp_path / "photo.png"
        image.mkdir()
    else:
        image = tmp_path / "photo.png"
        Image.new("RGB", (8, 8)).save(image)
        image.chmod(0)
    p = write(tmp_path, "p.jsonl", jsonl({"prompt": "a cat", "image": str(image)}))
    with pytest.raises(PromptFileError, match=r"line 1: 'image' .*photo.png (is not a readable file|cannot be read)"):
        read_prompts(p, DEFAULTS, check)
    assert Path(image).exists()


def test_lora_field_shapes(tmp_path, check):
    """'lora': one PATH[:SCALE], a list (JSON Lines), "none" / [] for none; absent: the command line's adapters.
    The opener (in the CLI: open_lora + check_fits, once per file) is given each spec and the prompt file's folder."""
    opened = []

    def open_adapter(spec, folder):
        opened.append((spec, folder))
        return f"adapter({spec})"

    p = write(tmp_path, "p.jsonl", jsonl({"prompt": "a"}, {"prompt": "b", "lora": "x.safetensors:0.5"},
                                         {"prompt": "c", "lora": ["x", "y:2"]}, {"prompt": "d", "lora": "none"},
                                         {"prompt": "e", "lora": []}, {"prompt": "f", "lora": None}))
    items = read_prompts(p, DEFAULTS, check, ("cli",), open_adapter)
    assert [i.adapters for i in items] == [("cli",), ("adapter(x.safetensors:0.5)",), ("adapter(x)", "adapter(y:2)"),
                                           (), (), ("cli",)]
    assert opened == [("x.safetensors:0.5", tmp_path), ("x", tmp_path), ("y:2", tmp_path)]
    c = write(tmp_path, "p.csv", "prompt,lora\na,x:3\nb,\nc,NONE\n")
    assert [i.adapters for i in read_prompts(c, DEFAULTS, check, ("cli",), open_adapter)] == [
        ("adapter(x:3)",), ("cli",), ()]
    bad = write(tmp_path, "bad.jsonl", jsonl({"prompt": "a", "lora": ["x", 2]}, {"prompt": "b", "lora": "x"}))
    with pytest.raises(PromptFileError, match=r"2 bad lines.*\n  line 1: 'lora' must be \"PATH\[:SCALE\]\", a list "
                                              r"of them or \"none\" \(no adapter\), got \['x', 2\]\n  line 2: 'lora' "
                                              r"is not taken by this run"):
        read_prompts(bad, DEFAULTS, check)
