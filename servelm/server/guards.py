"""Edges of the HTTP server: API-key auth, body size limit, and admission control."""

from __future__ import annotations

import hmac
from dataclasses import dataclass

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse


@dataclass
class ServerOptions:
    api_key: str | None = None
    admin_key: str | None = None  # /admin endpoints; off without one
    max_body_bytes: int = 4 * 2**20
    max_num_waiting: int = 1024  # queued requests beyond this get 503 + Retry-After


def error(status: int, message: str, err_type: str = "invalid_request_error",
          param: str | None = None, headers: dict[str, str] | None = None) -> JSONResponse:
    """OpenAI's error body."""
    return JSONResponse(status_code=status, headers=headers, content={
        "error": {"message": message, "type": err_type, "param": param, "code": None}})


def install_guards(app: FastAPI, options: ServerOptions) -> None:
    expected = f"Bearer {options.api_key}".encode() if options.api_key else None
    admin = f"Bearer {options.admin_key}".encode() if options.admin_key else None

    @app.middleware("http")
    async def guard(request: Request, call_next):
        given = request.headers.get("authorization", "").encode()
        if request.url.path.startswith("/admin"):
            if admin is None:
                return error(403, "admin endpoints are off; start the server with --admin-key KEY",
                             err_type="permission_error")
            if not hmac.compare_digest(given, admin):  # constant time
                return error(401, "invalid or missing admin key (Authorization: Bearer ...)",
                             err_type="authentication_error")
        if expected is not None and request.url.path.startswith("/v1"):
            if not hmac.compare_digest(given, expected):
                return error(401, "invalid or missing API key (Authorization: Bearer ...)",
                             err_type="authentication_error")
        length = request.headers.get("content-length")
        if length is not None and length.isdigit() and int(length) > options.max_body_bytes:
            return error(413, f"request body of {length} bytes exceeds the limit of "
                              f"{options.max_body_bytes} bytes")
        if length is None and request.method in ("POST", "PUT", "PATCH"):
            # Chunked: no length up front, so count while reading, and stop at the limit.
            body = bytearray()
            async for chunk in request.stream():
                body += chunk
                if len(body) > options.max_body_bytes:
                    return error(413, f"request body exceeds the limit of {options.max_body_bytes} bytes")
            request._body = bytes(body)  # what the route then reads (Starlette's cached body)
        return await call_next(request)


def overloaded(num_waiting: int, options: ServerOptions) -> JSONResponse | None:
    if num_waiting >= options.max_num_waiting:
        return error(503, f"server overloaded: {num_waiting} requests waiting; retry later",
                     err_type="server_overloaded", headers={"Retry-After": "1"})
    return None
