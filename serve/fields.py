"""The fields of a request to k5 serve: the body read (JSON or a form, with its uploads), each OpenAI or k5 field
read by its type, and OpenAI-shaped errors. The values for the engine are left as sent: it checks them with the
CLI's rules (k5.serve.engine.Engine.check)."""

from __future__ import annotations

import math
from pathlib import Path

from fastapi import Request
from fastapi.responses import JSONResponse
from starlette.datastructures import UploadFile


class BodyTooLarge(Exception):
    """The request body went past the upload limit while it was read."""


class APIError(Exception):
    def __init__(self, status: int, message: str, code: str | None = None, param: str | None = None,
                 kind: str = "invalid_request_error", headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.code, self.param, self.kind = status, message, code, param, kind
        self.headers = headers or {}


def error_json(status: int, message: str, code: str | None = None, param: str | None = None,
               kind: str = "invalid_request_error", headers: dict | None = None) -> JSONResponse:
    return JSONResponse({"error": {"message": message, "type": kind, "param": param, "code": code}}, status,
                        headers=headers)


async def read_body(request: Request, known: set[str]) -> tuple[dict, dict, bool]:
    """(fields, uploaded files, from_text): a JSON object, or a multipart / urlencoded form (strings, lists sent as
    ``key[]``, files). Unknown fields are refused, naming the known ones."""
    ctype = request.headers.get("content-type", "")
    files: dict[str, UploadFile] = {}
    if ctype.startswith(("multipart/form-data", "application/x-www-form-urlencoded")):
        try:
            form = await request.form(max_files=4, max_fields=64)
        except BodyTooLarge:
            raise
        except Exception as e:  # python-multipart's parse errors
            raise APIError(400, f"the form could not be read: {e}") from None
        fields: dict = {}
        for key, value in form.multi_items():
            name = key[:-2] if key.endswith("[]") else key
            if isinstance(value, UploadFile):
                if name in files:
                    raise APIError(400, f"'{name}': send one file", param=name)
                files[name] = value
            elif key.endswith("[]"):
                fields.setdefault(name, []).append(value)
            else:
                fields[name] = value
        from_text = True
    elif ctype.startswith("application/json") or not ctype:
        try:
            fields = await request.json()
        except ValueError as e:  # a body past the limit raises BodyTooLarge, which goes on to its handler
            raise APIError(400, f"the body is not valid JSON: {e}") from None
        if not isinstance(fields, dict):
            raise APIError(400, "the body must be a JSON object like {\"prompt\": \"a cat\"}")
        from_text = False
    else:
        raise APIError(400, f"Content-Type {ctype!r}: send application/json or multipart/form-data")
    unknown = sorted(set(fields) - known) + sorted(set(files) - known)
    if unknown:
        raise APIError(400, f"unknown field(s) {', '.join(repr(u) for u in unknown)}; this endpoint takes "
                            f"{', '.join(sorted(known))}", param=unknown[0])
    return fields, files, from_text


def text_value(fields: dict, name: str) -> str | None:
    value = fields.get(name)
    if value is None or (isinstance(value, str) and not value.strip() and name != "prompt"):
        return None
    if not isinstance(value, str):
        raise APIError(400, f"'{name}' must be a string, got {value!r}", param=name)
    return value


def int_value(fields: dict, name: str, low: int, high: int) -> int | None:
    value = fields.get(name)
    if value is None or value == "":
        return None
    try:
        if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
            raise ValueError
        number = int(value)
    except (TypeError, ValueError):
        raise APIError(400, f"'{name}' must be an integer, got {value!r}", param=name) from None
    if not low <= number <= high:
        raise APIError(400, f"'{name}' must be between {low} and {high}, got {number}", param=name)
    return number


def bool_value(fields: dict, name: str) -> bool | None:
    value = fields.get(name)
    if value is None or value == "":
        return None
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.strip().lower() in ("true", "1", "yes", "on", "false", "0", "no", "off"):
        return value.strip().lower() in ("true", "1", "yes", "on")
    raise APIError(400, f"'{name}' must be true or false, got {value!r}", param=name)


def parse_size(value: str | None, what: str = "size") -> tuple[int, int] | None:
    """'WIDTHxHEIGHT' -> (height, width)."""
    if value is None or value == "auto":
        return None
    parts = value.lower().split("x")
    if len(parts) != 2 or not all(p.strip().isdigit() for p in parts):
        raise APIError(400, f"'{what}' must be WIDTHxHEIGHT in pixels like 768x512, got {value!r}", param=what)
    width, height = (int(p) for p in parts)
    return height, width


def engine_fields(fields: dict, from_text: bool) -> dict:
    """The request's fields under the CLI's prompt-file names (values left as sent: the engine coerces and checks
    them as it does a prompt file's)."""
    out = {}
    for api, name in (("prompt", "prompt"), ("negative_prompt", "negative_prompt"), ("seed", "seed"),
                      ("num_inference_steps", "steps"), ("guidance_scale", "guidance_scale"), ("shift", "shift"),
                      ("num_frames", "num_frames")):
        value = fields.get(api)
        if value is not None and not (from_text and value == "" and api != "prompt"):
            out[name] = value
    if "prompt" not in out:
        raise APIError(400, "missing 'prompt'; every request needs a text describing the video or image",
                       param="prompt")
    return out


def lora_choice(value, lora_dir: Path | None) -> tuple | None:
    """The request's ``lora`` as (path, scale) pairs from the server's LoRA folder: ``NAME[:SCALE]``, a list of them,
    or ``none`` (the base weights); None when the field is absent (the server's --lora). A name is matched against
    the folder's listing, never joined to a path as sent."""
    if value is None or value == "":
        return None
    specs = value if isinstance(value, list) else [value]
    if not all(isinstance(s, str) and s.strip() for s in specs):
        raise APIError(400, f"'lora' must be \"NAME[:SCALE]\", a list of them, or \"none\", got {value!r}",
                       param="lora")
    if [s.strip().lower() for s in specs] == ["none"]:
        return ()
    if lora_dir is None:
        raise APIError(400, "'lora': this server has no LoRA folder; LoRAs are chosen by name from the folder given "
                            "at start-up (k5 serve --lora-dir DIR)", param="lora")
    available = {p.name: p for p in sorted(lora_dir.iterdir()) if not p.name.startswith(".")}
    out = []
    for spec in specs:
        name, scale = spec.strip(), 1.0
        if ":" in name:
            head, tail = name.rsplit(":", 1)
            try:
                scale, name = float(tail), head
            except ValueError:
                pass
        if not math.isfinite(scale):
            raise APIError(400, f"'lora' {spec!r}: the scale must be a finite number", param="lora")
        if name not in available:
            raise APIError(400, f"'lora' {name!r} is not one of this server's LoRAs: "
                                f"{', '.join(available) or '(the folder is empty)'}", param="lora")
        out.append((str(available[name]), scale))
    return tuple(out)
