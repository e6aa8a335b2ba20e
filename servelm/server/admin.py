"""Operator endpoints, behind their own key (`--admin-key`, sent as `Authorization: Bearer
KEY`); off when no key is set. They act on replicated models: list the requests each is
serving, and live-migrate one to another replica (servelm/cluster/migration.py)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Literal

from fastapi import FastAPI
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field

from servelm.server.guards import error
from servelm.server.models import ServedModel
from servelm.server.openapi import ADMIN_ERRORS


class MigrateRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    request_id: str
    model: str | None = None
    to: str | None = None  # a replica's name (see /health); default: the least loaded other one
    # stages of copying while it runs; 0: stop, then copy everything (a baseline)
    max_stages: int = Field(64, ge=0, le=1024)
    # how the K/V at the stop travels (default: the server's); "none": recomputed (a baseline)
    transport: Literal["shm", "ray", "none"] | None = None


def install_admin(app: FastAPI, models: list[ServedModel],
                  find: Callable[[str | None], ServedModel | JSONResponse]) -> None:
    @app.get("/admin/requests", responses=ADMIN_ERRORS)
    async def running() -> dict[str, Any]:
        return {"models": {m.name: m.running() for m in models if hasattr(m, "running")}}

    @app.post("/admin/migrate", responses=ADMIN_ERRORS)
    async def migrate(body: MigrateRequest) -> Any:
        model = find(body.model)
        if isinstance(model, JSONResponse):
            return model
        if not hasattr(model, "migrate"):
            return error(400, f"model {model.name!r} runs on one engine; live migration moves "
                              "requests between replicas (servelm serve --replicas N)", param="model")
        try:
            return await model.migrate(body.request_id, body.to, max_stages=body.max_stages,
                                       transport=body.transport)
        except KeyError as exc:
            return error(404, exc.args[0], err_type="not_found_error", param="request_id")
        except ValueError as exc:
            return error(409, str(exc), err_type="conflict_error", param="request_id")
        except TimeoutError as exc:
            return error(504, f"the move did not finish: {exc!r}", err_type="server_error")
