"""What every request passes before a route: the API key, and the size of a POST body."""

from __future__ import annotations

import hmac

from fastapi.responses import JSONResponse

from k5.serve.fields import BodyTooLarge, error_json

OPEN_PATHS = ("/", "/health")  # no API key needed: the page itself holds no data, health is for load balancers


def too_large(limit: int) -> JSONResponse:
    return error_json(413, f"the upload is larger than this server takes ({limit / 2**20:g} MiB, k5 serve "
                           f"--max-upload-mb); send a smaller image", "upload_too_large")


class Guard:
    """ASGI middleware before every route: the API key (when the server has one; not for the page and /health), and
    the size of a POST body: refused at once by its Content-Length, or cut off while it streams (a chunked upload
    has none), so no oversized upload is ever held in full."""

    def __init__(self, app, ctx):  # ctx: k5.serve.app.Context
        self.app, self.ctx = app, ctx

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        ctx = self.ctx
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        if ctx.api_key is not None and scope["path"] not in OPEN_PATHS:
            given = headers.get("authorization", "")
            token = given[7:].strip() if given.lower().startswith("bearer ") else ""
            if not hmac.compare_digest(token.encode(), ctx.api_key.encode()):
                response = error_json(401, "missing or wrong API key: send the server's key (k5 serve --api-key) as "
                                           "'Authorization: Bearer KEY'", "invalid_api_key")
                return await response(scope, receive, send)
        if scope["method"] != "POST":
            return await self.app(scope, receive, send)
        limit = ctx.max_upload + 64 * 1024  # the image plus the form's text fields
        length = headers.get("content-length", "")
        if length.isdigit() and int(length) > limit:
            return await too_large(ctx.max_upload)(scope, receive, send)
        seen = 0

        async def counted():
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > limit:
                    raise BodyTooLarge()
            return message

        return await self.app(scope, counted, send)
