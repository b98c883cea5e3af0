"""The HTTP API on rank 0: OpenAI's videos and images endpoints, health, metrics, and the web page.

    POST   /v1/videos                 create (JSON, or a multipart form with `input_reference` for I2V)
    GET    /v1/videos                 list (after, limit, order)
    GET    /v1/videos/{id}            status, progress (% of denoising steps, the decode counted as one), error
    GET    /v1/videos/{id}/content    the MP4 (variant=latents: the final latents, when the server keeps them)
    DELETE /v1/videos/{id}            queued: removed; running: stopped at the next step (failed, code cancelled)
    POST   /v1/images/generations     Image Lite text-to-image, b64_json; waits for the image
    POST   /v1/images/edits           Image Lite editing (multipart `image`), b64_json; waits for the image
    GET    /v1/models, /health, /metrics (Prometheus text), / (the page)
    GET    /v1/k5/jobs, POST /v1/k5/jobs, GET /v1/k5/jobs/{id}/content    the page's queue (videos and images)

k5's extensions travel as extra fields (the SDK's ``extra_body``): negative_prompt, num_inference_steps,
guidance_scale, seed, num_frames, shift, variant, magcache, lora (names from --lora-dir), priority.

Every request is checked by the CLI's rules (k5.serve.engine.Engine.check) before its row is committed; errors are
OpenAI-shaped JSON: ``{"error": {"message", "type", "param", "code"}}``.
"""

from __future__ import annotations

import base64
import math
import os
import secrets
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, HTMLResponse, JSONResponse, PlainTextResponse
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException as StarletteHTTPException

from k5.serve.dispatch import remove_files
from k5.serve.fields import (APIError, BodyTooLarge, bool_value, engine_fields, error_json, int_value, lora_choice,
                             parse_size, read_body, text_value)
from k5.serve.guard import Guard, too_large
from k5.serve.prometheus import render
from k5.serve.store import QueueFull

PAGE = Path(__file__).with_name("page.html")
VIDEO_FIELDS = {"prompt", "model", "seconds", "size", "input_reference", "negative_prompt", "num_inference_steps",
                "guidance_scale", "seed", "num_frames", "shift", "variant", "magcache", "lora", "priority"}
IMAGE_FIELDS = {"prompt", "model", "n", "size", "response_format", "image", "negative_prompt", "num_inference_steps",
                "guidance_scale", "seed", "shift", "variant", "lora", "priority", "user", "quality", "output_format",
                "background", "moderation", "style"}
MAX_IMAGES = 4  # `n` per images request
FPS = 24


@dataclass
class Context:
    """What the handlers need (rank 0)."""

    engine: object  # k5.serve.engine.Engine
    store: object  # k5.serve.store.JobStore
    board: object  # k5.serve.dispatch.Board
    jobs_dir: Path
    uploads_dir: Path
    api_key: str | None
    max_upload: int  # bytes of one uploaded image
    lora_dir: Path | None
    poll_after_ms: int
    world: int
    stopping: Callable[[], bool]


def copy_upload(upload: Path, i: int) -> Path:
    import shutil

    copy = upload.with_name(f"{upload.stem}_{i}{upload.suffix}")
    shutil.copyfile(upload, copy)
    return copy


# ---- the app -------------------------------------------------------------------------------------------------------

def create_app(ctx: Context) -> FastAPI:
    app = FastAPI(title="k5 serve", docs_url=None, redoc_url=None, openapi_url=None)
    engine, store, board = ctx.engine, ctx.store, ctx.board
    media = "image" if engine.image else "video"
    suffix = ".png" if engine.image else ".mp4"

    @app.exception_handler(APIError)
    async def api_error(request, e: APIError):
        if e.status == 400:
            board.count("invalid")
        return error_json(e.status, e.message, e.code, e.param, e.kind, e.headers)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request, e: RequestValidationError):
        board.count("invalid")
        first = e.errors()[0] if e.errors() else {}
        where = ".".join(str(x) for x in first.get("loc", ())[1:]) or None
        return error_json(400, f"{where or 'request'}: {first.get('msg', 'invalid')}", param=where)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request, e: StarletteHTTPException):
        return error_json(e.status_code, str(e.detail), "not_found" if e.status_code == 404 else None)

    @app.exception_handler(BodyTooLarge)
    async def body_too_large(request, e: BodyTooLarge):
        return too_large(ctx.max_upload)

    app.add_middleware(Guard, ctx=ctx)

    # ---- the page, health, models, metrics ----

    @app.get("/", response_class=HTMLResponse)
    async def page():
        return HTMLResponse(PAGE.read_text())

    @app.get("/health")
    async def health():
        if board.stopping or ctx.stopping():
            return JSONResponse({"status": "stopping"}, 503)
        if not board.ready:
            return JSONResponse({"status": "loading", "model": engine.model_id}, 503)
        return {"status": "ok", "model": engine.model_id, "kind": media, "ranks": ctx.world,
                "groups": engine.groups}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [model_object()]}

    @app.get("/v1/models/{model_id:path}")
    async def model(model_id: str):
        if model_id not in engine.names():
            raise APIError(404, f"no model {model_id!r}; this server runs {engine.model_id}", "model_not_found")
        return model_object()

    def model_object() -> dict:
        g = engine.gargs
        defaults = {"steps": g.steps, "guidance_scale": g.guidance_scale, "seed": g.seed, "height": g.height,
                    "width": g.width}
        if not engine.image:
            defaults["num_frames"] = g.num_frames
        return {"id": engine.model_id, "object": "model", "created": 0, "owned_by": "k5",
                "k5": {"kind": media, "variant": engine.variant, "edits": engine.edits, "defaults": defaults,
                       "loras": sorted(p.name for p in ctx.lora_dir.iterdir() if not p.name.startswith("."))
                       if ctx.lora_dir else []}}

    @app.get("/metrics")
    async def metrics():
        counts = await run_in_threadpool(store.counts)
        return PlainTextResponse(render(board, counts, ctx.world), media_type="text/plain; version=0.0.4")

    # ---- creating jobs ----

    def submit(kind: str, fields: dict, from_text: bool, upload: Path | None, task: str | None,
               n: int = 1) -> list[dict]:
        """Check, then commit ``n`` jobs (seeds seed, seed+1, ...) or none: QueueFull -> 429."""
        if ctx.stopping() or board.stopping:
            raise APIError(503, "the server is stopping; send the request again once it is back",
                           "server_stopping", kind="server_error", headers={"Retry-After": "30"})
        model_name = text_value(fields, "model")
        if model_name is not None and model_name not in engine.names():
            raise APIError(400, f"'model' {model_name!r}: this server runs {engine.model_id} (GET /v1/models); "
                                f"leave 'model' out or name it", param="model")
        base = engine_fields(fields, from_text)
        size = parse_size(text_value(fields, "size"))
        if size is not None:
            base["height"], base["width"] = size
        if kind == "video":
            seconds = text_value(fields, "seconds") if isinstance(fields.get("seconds"), str) else fields.get("seconds")
            if seconds is not None:
                try:
                    frames = float(seconds) * FPS + 1
                except (TypeError, ValueError):
                    raise APIError(400, f"'seconds' must be a number of seconds, got {seconds!r}",
                                   param="seconds") from None
                if not math.isfinite(frames) or not frames.is_integer() or frames < 1:
                    raise APIError(400, f"'seconds' {seconds!r} is not a whole number of frames at {FPS} fps; give "
                                        f"'num_frames' (4k+1) instead", param="seconds")
                if "num_frames" in base and str(base["num_frames"]).strip() != str(int(frames)):
                    raise APIError(400, f"'seconds' {seconds} means {int(frames)} frames at {FPS} fps, but "
                                        f"'num_frames' is {base['num_frames']}; give one of them", param="seconds")
                base["num_frames"] = int(frames) if not from_text else str(int(frames))
        for name in ("height", "width"):
            if name in base and from_text:
                base[name] = str(base[name])
        priority = int_value(fields, "priority", -1000, 1000) or 0
        loras = lora_choice(fields.get("lora"), ctx.lora_dir)
        variant = text_value(fields, "variant")
        magcache = bool_value(fields, "magcache")
        uploads = [upload] + [copy_upload(upload, i) for i in range(1, n)] if upload is not None else [None] * n
        try:
            rows = commit(kind, base, from_text, uploads, task, priority, loras, variant, magcache)
        except BaseException:
            for copy in uploads[1:]:  # the first is the caller's to delete
                if copy is not None:
                    copy.unlink(missing_ok=True)
            raise
        board.count("accepted", len(rows))
        board.wake.set()
        return rows

    def commit(kind: str, base: dict, from_text: bool, uploads: list, task, priority: int, loras, variant,
               magcache) -> list[dict]:
        """One checked spec per job (seed, seed+1, ... for several images), then all committed or none."""
        specs = []
        for i, upload in enumerate(uploads):
            job_id = f"{'video' if kind == 'video' else 'img'}_{secrets.token_hex(12)}"
            item_fields = dict(base)
            if i:
                seed = item_fields.get("seed", engine.gargs.seed)
                try:
                    item_fields["seed"] = int(seed) + i
                except (TypeError, ValueError):
                    pass  # the engine names the bad seed
            try:
                spec = engine.check(item_fields, from_text=from_text, image=None if upload is None else str(upload),
                                    loras=loras, variant=variant, magcache=magcache, task=task,
                                    output=f"{job_id}{suffix}")
            except ValueError as e:
                raise APIError(400, str(e)) from None
            specs.append((job_id, spec))
        try:
            return store.add_many([(job_id, kind, spec, priority) for job_id, spec in specs])
        except QueueFull as e:
            board.count("rejected_queue_full")
            retry = max(1, math.ceil(board.typical_job_s()))
            raise APIError(429, f"{e}; try again in about {retry} s", "queue_full", kind="rate_limit_error",
                           headers={"Retry-After": str(retry)}) from None

    async def save_upload(upload: UploadFile, name: str, what: str) -> Path:
        """The uploaded image under a server-made name, checked to be an image Pillow can read (the CLI's check)."""
        from k5.launch.prompts import check_image

        data = await upload.read()
        if len(data) > ctx.max_upload:
            raise BodyTooLarge()
        if not data:
            raise APIError(400, f"'{what}' is empty; upload an image file", param=what)
        ctx.uploads_dir.mkdir(parents=True, exist_ok=True)
        tmp = ctx.uploads_dir / f".{name}.upload.partial"
        tmp.write_bytes(data)
        try:
            check_image(str(tmp), f"'{what}'")
            from PIL import Image

            with Image.open(tmp) as im:
                ext = (im.format or "img").lower()
        except ValueError as e:
            tmp.unlink(missing_ok=True)
            shown = upload.filename or "the upload"
            raise APIError(400, str(e).replace(str(tmp), shown), "invalid_image", what) from None
        final = ctx.uploads_dir / f"{name}.{ext}"
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, final)
        return final

    async def create(request: Request, kind: str, known: set[str], image_field: str, task: str | None = None,
                     many: bool = False) -> list[dict]:
        """Read, check and commit a request's job(s). Images: ``task`` t2i or i2i (None: i2i when an image comes),
        ``many``: the request's ``n`` images."""
        fields, files, from_text = await read_body(request, known)
        if image_field in fields:
            raise APIError(400, f"'{image_field}' must be an uploaded image file (multipart/form-data); k5 fetches "
                                f"no URLs and reads no server paths", param=image_field)
        n = 1
        if kind == "image":
            fmt = text_value(fields, "response_format") or "b64_json"
            if fmt != "b64_json":
                raise APIError(400, f"'response_format' {fmt!r}: k5 answers with the image itself (b64_json); it "
                                    f"keeps no public URLs", param="response_format")
            out_format = text_value(fields, "output_format") or "png"
            if out_format != "png":
                raise APIError(400, f"'output_format' {out_format!r}: k5 writes PNG images (lossless)",
                               param="output_format")
            if many:
                n = int_value(fields, "n", 1, MAX_IMAGES) or 1
            if task == "i2i" and image_field not in files:
                raise APIError(400, f"'{image_field}': an edit needs the source image as an uploaded file "
                                    f"(multipart)", param=image_field)
            if task == "t2i" and image_field in files:
                raise APIError(400, f"'{image_field}': text-to-image takes no source image; use POST "
                                    f"/v1/images/edits to edit one", param=image_field)
        upload = None
        if image_field in files:
            upload = await save_upload(files[image_field], f"upload_{secrets.token_hex(12)}", image_field)
        if kind == "image" and task is None:
            task = "i2i" if upload is not None else "t2i"
        try:
            return await run_in_threadpool(submit, kind, fields, from_text, upload, task, n)
        except BaseException:
            if upload is not None:
                upload.unlink(missing_ok=True)
            raise

    @app.post("/v1/videos")
    async def create_video(request: Request):
        if engine.image:
            raise APIError(400, f"this server runs the Image Lite model {engine.model_id}; use POST "
                                f"/v1/images/generations (or /v1/images/edits)")
        rows = await create(request, "video", VIDEO_FIELDS, "input_reference")
        return JSONResponse(await run_in_threadpool(video_object, rows[0]), headers=poll_header(rows[0]))

    @app.post("/v1/k5/jobs")
    async def create_job(request: Request):
        """The page's form: a video job, or an image job (an edit when it brings `image`), answered at once."""
        if engine.image:
            rows = await create(request, "image", IMAGE_FIELDS, "image")
        else:
            rows = await create(request, "video", VIDEO_FIELDS, "input_reference")
        return JSONResponse(await run_in_threadpool(video_object, rows[0]))

    async def images(request: Request, task: str):
        if not engine.image:
            raise APIError(400, f"this server runs the video model {engine.model_id}; use POST /v1/videos")
        if task == "i2i" and not engine.edits:
            raise APIError(400, "this server's checkpoint makes images from text (t2i) and cannot edit; use POST "
                                "/v1/images/generations, or a server started on an I2I checkpoint")
        rows = await create(request, "image", IMAGE_FIELDS, "image", task, many=True)
        data = []
        for row in rows:
            final = await wait_done(row["id"])
            if final["status"] != "completed":
                error = final.get("error") or {}
                raise APIError(500, f"image {row['id']} failed: {error.get('message', final['status'])}",
                               error.get("code"), kind="server_error")
            path = ctx.jobs_dir / row["id"] / final["result"]["files"]["image"]["name"]
            entry = {"b64_json": base64.b64encode(path.read_bytes()).decode()}
            expansion = (final["result"].get("metrics") or {}).get("prompt_expansion")
            if expansion:
                entry["revised_prompt"] = expansion.get("encoded")
            data.append(entry)
        return {"created": rows[0]["created_at"], "data": data, "output_format": "png",
                "size": rows[0]["spec"]["size"]}

    @app.post("/v1/images/generations")
    async def image_generations(request: Request):
        return await images(request, "t2i")

    @app.post("/v1/images/edits")
    async def image_edits(request: Request):
        return await images(request, "i2i")

    async def wait_done(job_id: str) -> dict:
        import asyncio

        event = board.waiter(job_id)
        while True:
            row = await run_in_threadpool(store.get, job_id)
            if row is None:
                raise APIError(404, f"job {job_id} was deleted", "not_found")
            if row["status"] in ("completed", "failed"):
                return row
            await run_in_threadpool(event.wait, 1.0)
            await asyncio.sleep(0)

    # ---- reading, downloading, deleting ----

    def progress_of(row: dict) -> int:
        if row["status"] == "completed":
            return 100
        if row["status"] == "queued":
            return 0
        with board.lock:
            done, total = board.progress.get(row["id"], (0, 1))
        return min(99, 100 * done // total)

    def video_object(row: dict) -> dict:
        spec = row["spec"]
        req = spec["request"]
        status = row["status"]
        return {
            "id": row["id"], "object": "video" if row["kind"] == "video" else "image", "model": engine.model_id,
            "status": status, "progress": progress_of(row), "created_at": row["created_at"],
            "completed_at": row["completed_at"], "expires_at": row["expires_at"], "error": row["error"],
            "seconds": f"{(spec['frames'] - 1) / FPS:g}", "size": spec["size"], "prompt": req["prompt"],
            "remixed_from_video_id": None,
            "k5": {"kind": row["kind"], "steps": req["steps"], "seed": req["seed"], "num_frames": spec["frames"],
                   "guidance_scale": req["guidance_scale"], "variant": spec["variant"], "magcache": spec["magcache"],
                   "priority": row["priority"], "attempts": row["attempts"],
                   "queue_position": store.position(row["id"]) if status == "queued" else None,
                   "lora": [lora_name(p) for p, _ in spec["lora"]],
                   # the job's own time on its ranks (text, denoising, decode, checked write), once completed
                   "generate_s": ((row["result"] or {}).get("metrics") or {}).get("total_s")},
        }

    def lora_name(path: str) -> str:
        """An adapter as the request named it: its entry in --lora-dir (else, a --lora of the command line, its
        file's name)."""
        p = Path(path)
        if ctx.lora_dir is not None and p.is_relative_to(ctx.lora_dir):
            return p.relative_to(ctx.lora_dir).parts[0]
        return p.name

    def poll_header(row: dict) -> dict:
        return {"openai-poll-after-ms": str(ctx.poll_after_ms)} if row["status"] in ("queued", "in_progress") else {}

    async def job_row(job_id: str, kind: str | None = "video") -> dict:
        row = await run_in_threadpool(store.get, job_id)
        if row is None or (kind is not None and row["kind"] != kind):
            what = "video" if kind == "video" else "job"
            raise APIError(404, f"no {what} {job_id!r} (unknown, deleted, or expired)", "not_found", "video_id")
        return row

    @app.get("/v1/videos/{video_id}")
    async def retrieve(video_id: str):
        row = await job_row(video_id)
        return JSONResponse(await run_in_threadpool(video_object, row), headers=poll_header(row))

    @app.get("/v1/videos")
    async def list_videos(after: str | None = None, limit: int = 20, order: str = "desc"):
        return await listing("video", after, limit, order)

    @app.get("/v1/k5/jobs")
    async def list_jobs(after: str | None = None, limit: int = 20, order: str = "desc"):
        return await listing(None, after, limit, order)

    async def listing(kind, after, limit, order):
        if order not in ("asc", "desc"):
            raise APIError(400, f"'order' must be asc or desc, got {order!r}", param="order")
        if not 1 <= limit <= 100:
            raise APIError(400, f"'limit' must be between 1 and 100, got {limit}", param="limit")
        try:
            rows = await run_in_threadpool(store.list, kind, after, limit + 1, order)
        except KeyError:
            raise APIError(404, f"'after' {after!r} is no job of this server", "not_found", "after") from None
        data = [await run_in_threadpool(video_object, r) for r in rows[:limit]]
        return {"object": "list", "data": data, "first_id": data[0]["id"] if data else None,
                "last_id": data[-1]["id"] if data else None, "has_more": len(rows) > limit}

    @app.get("/v1/videos/{video_id}/content")
    async def content(video_id: str, variant: str = "video"):
        return await download(await job_row(video_id), variant)

    @app.get("/v1/k5/jobs/{job_id}/content")
    async def job_content(job_id: str, variant: str = "video"):
        return await download(await job_row(job_id, None), variant)

    async def download(row: dict, variant: str):
        if row["status"] != "completed":
            raise APIError(404 if row["status"] == "failed" else 409,
                           f"{row['id']} is {row['status']}: its content exists once it is completed",
                           "not_ready" if row["status"] != "failed" else "failed", "video_id")
        files = row["result"]["files"]
        wanted = {"video": "video" if row["kind"] == "video" else "image", "latents": "latents"}.get(variant)
        if wanted is None or wanted not in files:
            have = ["video"] + (["latents"] if "latents" in files else [])
            raise APIError(400, f"'variant' {variant!r}: this job has {', '.join(have)} (k5 makes no thumbnail or "
                                f"spritesheet; 'latents' needs k5 serve --save-latents)", param="variant")
        entry = files[wanted]
        path = ctx.jobs_dir / row["id"] / entry["name"]
        if not path.is_file() or path.stat().st_size != entry["bytes"]:
            raise APIError(500, f"{row['id']}: {entry['name']} is missing or not the file the job wrote",
                           "output_lost", kind="server_error")
        types = {".mp4": "video/mp4", ".png": "image/png", ".safetensors": "application/octet-stream"}
        return FileResponse(path, media_type=types.get(path.suffix, "application/octet-stream"),
                            filename=entry["name"])

    @app.post("/v1/videos/{video_id}/remix")
    async def remix(video_id: str):
        raise APIError(400, "k5 does not remix videos; send a new POST /v1/videos with the prompt you want",
                       "unsupported", "video_id")

    @app.delete("/v1/videos/{video_id}")
    async def delete_video(video_id: str):
        return await delete(video_id, "video")

    @app.delete("/v1/k5/jobs/{job_id}")
    async def delete_job(job_id: str):
        return await delete(job_id, None)

    async def delete(job_id: str, kind: str | None):
        row = await job_row(job_id, kind)
        what = await run_in_threadpool(store.request_cancel, row["id"])
        if what is None:
            raise APIError(404, f"no video {job_id!r}", "not_found", "video_id")
        if what in ("removed", "finished"):
            if what == "finished":
                await run_in_threadpool(store.remove, row["id"])
            await run_in_threadpool(remove_files, ctx.jobs_dir, ctx.uploads_dir, row)
            board.settle(row["id"])
        else:  # running: answer once its group has been told (it stops at the step boundary it reaches next)
            told = board.cancel_waiter(row["id"])
            board.wake.set()
            await run_in_threadpool(told.wait, 10.0)
            now = await run_in_threadpool(store.get, row["id"])
            if now is not None and now["status"] == "completed":  # it finished before the cancel reached it: kept
                return {"id": row["id"], "object": "video.deleted", "deleted": False,
                        "k5": {"was": row["status"], "cancelling": False, "completed": True}}
        board.wake.set()
        return {"id": row["id"], "object": "video.deleted", "deleted": True,
                "k5": {"was": row["status"], "cancelling": what == "cancelling"}}

    return app
