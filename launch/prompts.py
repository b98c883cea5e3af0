"""Prompt files for batch jobs, every line checked before any model loads.

Three formats, chosen by the file name:

- ``.jsonl`` / ``.ndjson``: one JSON object per line, e.g. ``{"prompt": "a cat", "seed": 3, "output": "cat.mp4"}``;
- ``.csv``: a header row naming the fields, then one item per row (an empty cell means "use the default");
- anything else: plain text, one prompt per line.

Blank lines are skipped. Fields an item leaves out take the command-line value (``--height``, ``--steps``, ...);
the seed defaults to ``--seed`` plus the item's index, so the items of a plain-text file get different noise. A
relative ``image`` path is taken relative to the prompt file's folder (for a video model the I2V image, for an
Image Lite model the source image of an edit). ``output`` names the video (Image Lite: the PNG image) inside
``--output-dir`` (``.mp4``, resp. ``.png``, is appended when the name has no extension; another video or image
format's extension is refused); by default it is the item's index, ``00007.mp4`` (``00007.png``). ``lora`` names
the item's LoRA adapters instead of ``--lora``'s: ``"PATH[:SCALE]"``, a list of such strings (JSON Lines), or
``"none"`` (also ``[]``) for the base model; a relative PATH is taken relative to the prompt file's folder.

A bad line stops the job before anything runs, with the file, the line number, the field and what is expected.
The value rules themselves (sizes, 4k+1 frames, ...) are ``check_request``'s, passed in as ``check``; the request
type (a video Request or an Image Lite ImageRequest) is built by ``make``.
"""

from __future__ import annotations

import csv
import difflib
import io
import json
import math
import re
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable

from k5.engine.pipelines.video import Request
from k5.launch.outputs import OUTPUTS, output_name

FIELDS: dict[str, type] = {
    "prompt": str, "negative_prompt": str, "seed": int, "image": str, "height": int, "width": int,
    "num_frames": int, "steps": int, "guidance_scale": float, "shift": float, "output": str, "lora": list,
}
NO_LORA = "none"  # the 'lora' value for "no adapter" (a file named none: ./none)
TYPE_NAMES = {str: "a string", int: "an integer", float: "a number"}
MAX_LISTED = 20  # bad lines listed in one error; the rest are counted


class PromptFileError(ValueError):
    """A prompt file that cannot run: the message names the file, the line(s) and what is wrong."""


@dataclass(frozen=True)
class Item:
    index: int  # position among the file's items (0-based): names the default output and deals it to a dp group
    line: int  # 1-based line in the file (0 for a --prompt given on the command line)
    source: str  # the file's name as given, for messages
    request: Request  # or engine.pipelines.image_request.ImageRequest (Image Lite)
    output: str  # video (or image) file name inside the output directory
    adapters: tuple = ()  # the item's LoRA adapters (k5.engine.checkpoints.lora.LoraAdapter), merged while it runs

    @property
    def where(self) -> str:
        return f"{self.source} line {self.line}" if self.line else self.source

    @property
    def latents_name(self) -> str:
        return str(Path(self.output).with_suffix(".safetensors"))


def default_output(index: int, kind: str = "video") -> str:
    return f"{index:05d}{OUTPUTS[kind].suffixes[0]}"


def _coerce(field: str, value, from_text: bool):
    """The value as the field's type; CSV cells arrive as strings and are parsed."""
    kind = FIELDS[field]
    bad = ValueError(f"'{field}' must be {TYPE_NAMES[kind]}, got {value!r}")
    if kind is str:
        if not isinstance(value, str):
            raise bad
        return value
    if from_text:
        value = value.strip()
        if kind is int:
            if not re.fullmatch(r"[+-]?\d+", value):
                raise bad
            return int(value)
        try:
            number = float(value)
        except ValueError:
            raise bad from None
    else:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise bad
        number = value
        if kind is int:
            if isinstance(value, float) and not value.is_integer():
                raise bad
            return int(value)
    if not math.isfinite(number):
        raise ValueError(f"'{field}' must be a finite number, got {value!r}")
    return float(number)


def _unknown(field: str) -> ValueError:
    close = difflib.get_close_matches(field, FIELDS, n=1)
    hint = f" (did you mean '{close[0]}'?)" if close else ""
    return ValueError(f"unknown field {field!r}{hint}; known fields: {', '.join(FIELDS)}")


def _decode(path: Path) -> str:
    data = path.read_bytes()
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = data[: e.start].count(b"\n") + 1
        raise PromptFileError(f"{path} line {line}: not UTF-8 text ({e.reason} at byte {e.start})") from None


def _jsonl_rows(text: str):
    for n, line in enumerate(text.split("\n"), 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            yield n, ValueError(f"not valid JSON ({e.msg} at column {e.colno}); each line must be one JSON object "
                                f"like {{\"prompt\": \"a cat\", \"seed\": 3}}")
            continue
        if not isinstance(obj, dict):
            yield n, ValueError(f"must be a JSON object like {{\"prompt\": \"a cat\"}}, got {type(obj).__name__}")
            continue
        # JSON null means "use the default", like an empty CSV cell.
        yield n, {k: v for k, v in obj.items() if v is not None}


def _csv_rows(text: str, name: str):
    reader = csv.reader(io.StringIO(text, newline=""))
    header, header_line = None, 0
    for row in reader:
        if any(cell.strip() for cell in row):
            header, header_line = [cell.strip() for cell in row], reader.line_num
            break
    if header is None:
        return
    for field in header:
        if field not in FIELDS:
            raise PromptFileError(f"{name} line {header_line}: CSV header has {_unknown(field)}")
    if "prompt" not in header:
        raise PromptFileError(f"{name} line {header_line}: the CSV header needs a 'prompt' column, got "
                              f"{', '.join(header)}")
    dupes = sorted({f for f in header if header.count(f) > 1})
    if dupes:
        raise PromptFileError(f"{name} line {header_line}: column(s) {', '.join(dupes)} appear twice in the header")
    start = reader.line_num
    for row in reader:
        n, start = start + 1, reader.line_num  # a quoted cell may span lines: report where the row starts
        if not any(cell.strip() for cell in row):
            continue
        if len(row) != len(header):
            yield n, ValueError(f"has {len(row)} cells but the header has {len(header)} columns "
                                f"({', '.join(header)})")
            continue
        yield n, {k: v for k, v in zip(header, row) if v.strip() or k == "prompt"}


def _text_rows(text: str):
    for n, line in enumerate(text.split("\n"), 1):
        line = line.rstrip("\r")
        if line.strip():
            yield n, {"prompt": line}


def read_prompts(path: str | Path, defaults: dict, check: Callable, adapters: tuple = (),
                 open_adapter: Callable[[str, Path], object] | None = None, make: Callable = Request,
                 kind: str = "video") -> list[Item]:
    """All items of a prompt file, or one PromptFileError naming every bad line (the first MAX_LISTED).

    ``defaults`` holds the command-line values of the Request fields (``seed`` is the base seed); ``check`` raises
    ValueError for a request that cannot run (``check_request`` with the checkpoint's config) and may return the
    request as it will run (an image request resolved to its bucket), which the item then holds. ``adapters``: the
    LoRA adapters of an item without a ``lora`` field (``--lora``); ``open_adapter(spec, folder)`` opens and checks
    one ``PATH[:SCALE]`` of a ``lora`` field (ValueError if it cannot be used), a relative PATH being in ``folder``.
    ``make`` builds the request from the fields (ValueError for a field the request type does not take); ``kind``
    is the MEDIA kind of the item's file ("video" or "image").
    """
    path = Path(path)
    name = str(path)
    if not path.is_file():
        raise PromptFileError(f"prompt file {name} does not exist or is not a file")
    suffix = path.suffix.lower()
    if suffix == ".json":
        raise PromptFileError(f"{name}: a .json file is not a prompt file; use JSON Lines (.jsonl, one object per "
                              f"line), CSV with a header (.csv) or plain text (one prompt per line)")
    text = _decode(path)
    from_text = suffix not in (".jsonl", ".ndjson")
    rows = (_jsonl_rows(text) if not from_text else _csv_rows(text, name) if suffix == ".csv" else _text_rows(text))

    items: list[Item] = []
    errors: list[str] = []
    owner: dict[str, int] = {}  # output name -> line
    for n, row in rows:
        try:
            if isinstance(row, Exception):
                raise row
            item = _item(row, len(items), n, name, path.parent, defaults, check, from_text, adapters, open_adapter,
                         make, kind)
            if item.output in owner:
                raise ValueError(f"output {item.output} is also the output of line {owner[item.output]}; "
                                 f"every item needs its own file")
        except ValueError as e:
            errors.append(f"line {n}: {e}")
            items.append(None)  # keep counting indices, so later default names do not shift
            continue
        owner[item.output] = n
        items.append(item)
    if errors:
        if len(errors) == 1:
            raise PromptFileError(f"{name} {errors[0]}")
        listed = "\n".join(f"  {e}" for e in errors[:MAX_LISTED])
        more = f"\n  ... and {len(errors) - MAX_LISTED} more" if len(errors) > MAX_LISTED else ""
        raise PromptFileError(f"{name}: {len(errors)} bad lines, nothing was run:\n{listed}{more}")
    if not items:
        raise PromptFileError(f"{name} has no prompts (blank lines are skipped)")
    return items


def _lora_specs(value, from_text: bool) -> list[str]:
    """The 'lora' field as a list of PATH[:SCALE] strings ([] for no adapter)."""
    if isinstance(value, str):
        value = value.strip()
        if value.lower() == NO_LORA:
            return []
        if value:
            return [value]
    elif isinstance(value, list) and not from_text and all(isinstance(v, str) and v.strip() for v in value):
        return [v.strip() for v in value]
    raise ValueError(f"'lora' must be \"PATH[:SCALE]\"{', a list of them' if not from_text else ''} or "
                     f"\"{NO_LORA}\" (no adapter), got {value!r}")


def _item(row: dict, index: int, line: int, source: str, folder: Path, defaults: dict, check: Callable,
          from_text: bool, adapters: tuple = (), open_adapter: Callable[[str, Path], object] | None = None,
          make: Callable = Request, kind: str = "video") -> Item:
    values = {}
    for field, value in row.items():
        if field not in FIELDS:
            raise _unknown(field)
        if field == "lora":
            specs = _lora_specs(value, from_text)
            if specs and open_adapter is None:
                raise ValueError("'lora' is not taken by this run")
            adapters = tuple(open_adapter(spec, folder) for spec in specs)
            continue
        values[field] = _coerce(field, value, from_text)
    if "prompt" not in values:
        raise ValueError("missing 'prompt'; every item needs a text describing the video")
    output = output_name(values.pop("output"), kind) if "output" in values else default_output(index, kind)
    fields = {k: v for k, v in defaults.items() if v is not None}
    fields["seed"] = defaults.get("seed", 0) + index
    fields.update(values)
    if "image" in values:
        image = Path(values["image"]).expanduser()
        fields["image"] = str(image if image.is_absolute() else folder / image)
    if fields.get("image") is not None:
        check_image(fields["image"])
    req = make(**fields)
    req = check(req) or req
    return Item(index, line, source, req, output, adapters)


def check_image(path: str, what: str = "'image'") -> None:
    """Raise ValueError unless ``path`` is an image file this process can read (``what``: the field or flag)."""
    p = Path(path)
    if not p.is_file():
        raise ValueError(f"{what} {path} is not a readable file")
    try:
        from PIL import Image, UnidentifiedImageError

        with Image.open(p) as im:
            im.verify()
    except OSError as e:  # PermissionError, UnidentifiedImageError, truncated files
        kind = "is not an image file Pillow can read" if isinstance(e, UnidentifiedImageError) else "cannot be read"
        raise ValueError(f"{what} {path} {kind} ({e})") from None


def single_item(request: Request, output: str | None = None, kind: str = "video") -> Item:
    """A --prompt from the command line as a one-item job."""
    return Item(0, 0, "--prompt", request, output_name(output, kind) if output else default_output(0, kind))


def with_request(item: Item, **changes) -> Item:
    return replace(item, request=replace(item.request, **changes))
