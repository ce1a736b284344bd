"""The labelling page's web app: FastAPI over a :class:`~flan_rlhf.label_store.LabelStore`.

FastAPI rather than Gradio: the page needs keyboard shortcuts, undo and a per-tab lease, which in
Gradio would be custom JavaScript anyway, and every request body is validated by a pydantic model
(an unknown field, a wrong type or a too-long note is a 422 with one line, nothing written).
FastAPI, uvicorn and SQLAlchemy are small, and already in the ML stack users have (MLflow's server
uses the same three); Gradio would add a large front-end bundle and its own pins on
huggingface_hub and pydantic.

Routes: ``GET /`` the page (it holds no data); ``GET /api/next?client=ID`` the pair that page
should judge (leased to it) and the progress; ``POST /api/label`` one judgement; ``POST /api/undo``
the page's latest judgement taken back. Errors are ``{"error": "<one line>"}`` with 401 (token),
404 (unknown pair), 409 (a replayed label, a pair another page holds, nothing to undo) or 422
(a malformed body, or a body not sent as ``application/json``, which a cross-site form cannot send),
or 503 when the database fails (a full disk, a lost server: the transaction is rolled back).
With a token set, every ``/api`` request must carry it in ``X-Label-Token``; the page asks for it.
Served on loopback, only requests naming a loopback host are answered (400 otherwise).
"""
from __future__ import annotations

import hmac
import ipaddress
from importlib import resources
from typing import Literal

import sqlalchemy as sa
from fastapi import FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse
from pydantic import BaseModel, ConfigDict, Field

from flan_rlhf.label_store import LabelRefused, LabelStore

#: a page's client id: random letters and digits the page draws once per tab
CLIENT_PATTERN = r"^[A-Za-z0-9_-]{8,64}$"
TOKEN_HEADER = "X-Label-Token"
#: the names a page served on loopback may be opened by
LOOPBACK_NAMES = frozenset({"127.0.0.1", "localhost", "::1"})


class LabelBody(BaseModel):
    """``POST /api/label``: one judgement of the pair the page holds."""

    model_config = ConfigDict(extra="forbid")
    pair_id: int
    client: str = Field(pattern=CLIENT_PATTERN)
    choice: Literal["left", "right", "tie", "both_unacceptable"]
    labeller: str = Field(min_length=1, max_length=128)
    note: str = Field(default="", max_length=4000)


class UndoBody(BaseModel):
    """``POST /api/undo``: take back this page's latest label."""

    model_config = ConfigDict(extra="forbid")
    client: str = Field(pattern=CLIENT_PATTERN)


def is_loopback(host: str) -> bool:
    """Whether ``host`` (an address or ``localhost``) is reachable only from this machine."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def page_html(default_labeller: str) -> str:
    """The labelling page (``flan_rlhf/assets/label_page.html``) with the default labeller name filled in,
    as a JSON string whose ``<``, ``>`` and ``&`` are escaped (nothing in it can close the script)."""
    import json

    page = resources.files("flan_rlhf").joinpath("assets/label_page.html").read_text(encoding="utf-8")
    name = json.dumps(default_labeller).replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")
    return page.replace("__DEFAULT_LABELLER__", name)


def host_name(header: str) -> str:
    """The host of a ``Host`` header, without its port: ``127.0.0.1:8765`` -> ``127.0.0.1``, ``[::1]:80`` -> ``::1``."""
    if header.startswith("["):
        return header[1:header.find("]")]
    return header.rsplit(":", 1)[0] if header.count(":") == 1 else header


def create_app(store: LabelStore, default_labeller: str = "labeller", token: str | None = None,
               allowed_hosts: frozenset[str] | None = None) -> FastAPI:
    """The labelling app over ``store``.

    Args:
        token: required in ``X-Label-Token`` on every ``/api`` request.
        allowed_hosts: the only ``Host`` names answered (``None``: any). Served on loopback these are
            ``LOOPBACK_NAMES``, so a web page that rebinds its own domain to 127.0.0.1 (DNS rebinding)
            cannot read or write labels through the visitor's browser.
    """
    app = FastAPI(title="flan-rlhf labelling", docs_url=None, redoc_url=None, openapi_url=None)
    page = page_html(default_labeller)

    @app.middleware("http")
    async def require_host_and_token(request: Request, call_next):
        if allowed_hosts is not None and host_name(request.headers.get("host", "")) not in allowed_hosts:
            return JSONResponse({"error": f"this labelling server answers only to {', '.join(sorted(allowed_hosts))} "
                                          "- open it by that name"}, status_code=400)
        if token is not None and request.url.path.startswith("/api/"):
            given = request.headers.get(TOKEN_HEADER, "")
            if not hmac.compare_digest(given.encode(), token.encode()):
                return JSONResponse({"error": "this labelling server needs its token - enter the token its owner "
                                              "gave you"}, status_code=401)
        return await call_next(request)

    @app.exception_handler(RequestValidationError)
    async def malformed(_request: Request, err: RequestValidationError):
        problems = "; ".join(f"{'.'.join(str(part) for part in e['loc'] if part != 'body')}: {e['msg']}"
                             for e in err.errors()[:3])
        return JSONResponse({"error": f"malformed request ({problems}) - nothing was written"}, status_code=422)

    @app.exception_handler(sa.exc.SQLAlchemyError)
    async def store_failed(_request: Request, err: sa.exc.SQLAlchemyError):  # a full disk, a lost database server
        reason = str(getattr(err, "orig", None) or err).splitlines()[0]
        return JSONResponse({"error": f"the label store could not be used ({reason}) - its transaction was rolled "
                                      "back, nothing was written; press again once it is fixed"}, status_code=503)

    @app.exception_handler(LabelRefused)
    async def refused(_request: Request, err: LabelRefused):
        return JSONResponse({"error": f"{err} - nothing was written"}, status_code=err.status)

    @app.get("/", response_class=HTMLResponse)
    def index() -> str:
        return page

    @app.get("/api/next")
    def next_pair(client: str = Query(pattern=CLIENT_PATTERN)) -> dict:
        pair = store.next_pair(client)
        return {"pair": None if pair is None else pair.as_json(), "progress": store.progress()}

    @app.post("/api/label")
    def label(body: LabelBody) -> dict:
        store.add_label(body.pair_id, body.client, body.choice, body.labeller, body.note)
        return {"stored": body.pair_id, "progress": store.progress()}

    @app.post("/api/undo")
    def undo(body: UndoBody) -> dict:
        pair_id = store.undo_last(body.client)
        return {"undone": pair_id, "progress": store.progress()}

    return app
