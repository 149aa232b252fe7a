"""The console's web app: its pages, the event stream that keeps them current, and the
door every request passes (:mod:`ca.console.access`).

Every page is one or two admin API calls rendered by a Jinja2 template; asked with
``X-Console-Fragment: 1`` (as the page's script does when an event says its data
changed) only the page's content is rendered. ``/live``, ``/ready`` and ``/metrics``
answer without a session, as on every Tessera process.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, quote, urlencode

import jinja2
from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import (
    HTMLResponse,
    PlainTextResponse,
    RedirectResponse,
    Response,
    StreamingResponse,
)
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles

from ca.console import topology, views
from ca.console.access import COOKIE, Access, AdminCheck
from ca.console.live import Changes, TooManyStreams
from ca.console.sources import AdminSource, PrometheusSource, SourceError

log = logging.getLogger(__name__)

PAGE_SIZE = 100
MAX_AGENTS_SHOWN = 1000
EXPIRY_WINDOWS = {"1h": 3600, "6h": 6 * 3600, "24h": 86400, "7d": 7 * 86400}
ACTIONS = {"evict": "Evict", "ban": "Ban", "unban": "Unban"}
MAX_FORM_BYTES = 64 * 1024
PUBLIC = frozenset({"/live", "/ready", "/metrics"})

Handler = Callable[[Request, str], Awaitable[Response]]


@dataclass(frozen=True)
class Settings:
    trust_domain: str
    admin: AdminSource
    access: Access
    prometheus: PrometheusSource | None = None
    write: bool = False
    rate_window: str = "1m"
    metrics_interval: float = 5.0
    admin_check: AdminCheck | None = None
    """mTLS mode: whether the caller's SPIFFE ID is registered as admin."""
    secure_cookie: bool = False
    now: Callable[[], float] = time.time


class Console:
    """The console's ASGI app (:attr:`app`) over ``settings``' sources."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.changes = Changes(
            settings.admin,
            metrics_interval=settings.metrics_interval if settings.prometheus else None,
        )
        self.registry = CollectorRegistry()
        self._requests = Counter("tessera_console_requests", "Console requests answered",
                                 ["page", "code"], registry=self.registry)
        self._seconds = Histogram("tessera_console_page_seconds", "Time to render a page",
                                  ["page"], registry=self.registry)
        here = Path(__file__).parent
        self.templates = jinja2.Environment(
            loader=jinja2.FileSystemLoader(here / "templates"),
            autoescape=True, undefined=jinja2.StrictUndefined,
        )
        self.templates.filters.update(when=_when, ago=self._ago, until=self._until,
                                      short=_short, percent=_percent)
        self.templates.globals.update(split_source=views.split_source, ttl=_ttl)
        page = self._page
        self.app = Starlette(
            routes=[
                Route("/live", self.live),
                Route("/ready", self.ready),
                Route("/metrics", self.metrics),
                Route("/", page("home", self.home)),
                Route("/trust-domain", page("trust-domain", self.trust_domain)),
                Route("/agents", page("agents", self.agents)),
                Route("/agents/confirm", page("agents", self.confirm)),
                Route("/agents/act", page("agents", self.act), methods=["POST"]),
                Route("/entries", page("entries", self.entries)),
                Route("/entries/{entry_id}", page("entries", self.entry)),
                Route("/svids", page("svids", self.svids)),
                Route("/audit", page("audit", self.audit)),
                Route("/audit/chain", page("audit", self.audit_chain)),
                Route("/mesh", page("mesh", self.mesh)),
                Route("/mesh/services/{service}", page("mesh", self.service)),
                Route("/explain", page("explain", self.explain), methods=["GET", "POST"]),
                Route("/events", page("events", self.events)),
                Mount("/static", StaticFiles(directory=here / "static"), name="static"),
            ],
            lifespan=self._lifespan,
        )

    @contextlib.asynccontextmanager
    async def _lifespan(self, app: Starlette) -> AsyncIterator[None]:
        self.changes.start()
        try:
            yield
        finally:
            await self.changes.stop()
            await self.settings.admin.close()
            if self.settings.prometheus is not None:
                await self.settings.prometheus.close()

    # -- the door ---------------------------------------------------------------------

    def _page(self, name: str, handler: Handler) -> Callable[[Request], Awaitable[Response]]:
        async def endpoint(request: Request) -> Response:
            started = time.perf_counter()
            answer = await self._guarded(request, handler)
            self._seconds.labels(name).observe(time.perf_counter() - started)
            self._requests.labels(name, str(answer.status_code)).inc()
            return answer

        return endpoint

    async def _guarded(self, request: Request, handler: Handler) -> Response:
        access = self.settings.access
        if not access.host_allowed(request.headers.get("host")):
            return self._refused(request, 400, "This console answers only on its own "
                                 "loopback address; open the URL 'tessera server console' "
                                 "printed.")
        if self.settings.admin_check is not None:
            refusal = self._peer_refusal(request)
            if refusal is not None:
                return self._refused(request, 403, refusal)
            return await self._answer(request, handler, session="mtls")
        token = request.query_params.get("token")
        if token is not None:
            session = access.exchange(token)
            if session is None:
                return self._refused(request, 403, "That token is not valid or was used "
                                     "already: each token opens one browser session. Run "
                                     "'tessera server console' again for a new one.")
            query = [(k, v) for k, v in request.query_params.multi_items() if k != "token"]
            target = request.url.path + ("?" + urlencode(query) if query else "")
            answer: Response = RedirectResponse(target, status_code=303)
            answer.set_cookie(COOKIE, session, httponly=True, samesite="strict",
                              secure=self.settings.secure_cookie, path="/")
            return answer
        session = request.cookies.get(COOKIE)
        if session is None or not access.session_valid(session):
            return self._refused(request, 403, "Open the URL that 'tessera server console' "
                                 "printed: the console needs its one-time token.")
        return await self._answer(request, handler, session=session)

    def _peer_refusal(self, request: Request) -> str | None:
        from ca.api.tls import peer_spiffe_id
        from sdk.errors import Unauthenticated

        assert self.settings.admin_check is not None
        try:
            spiffe_id, _ = peer_spiffe_id(request.scope)
        except Unauthenticated as err:
            return str(err)
        if not self.settings.admin_check(str(spiffe_id)):
            return f"{spiffe_id} is not registered as admin (an entry with --admin)."
        return None

    async def _answer(self, request: Request, handler: Handler, *, session: str) -> Response:
        try:
            return await handler(request, session)
        except SourceError as err:
            status = err.answered if err.answered is not None and 400 <= err.answered < 500 else 502
            return self._render(request, "problem.html", {"problem": str(err)},
                                page="problem", session=session, status=status)

    def _refused(self, request: Request, status: int, reason: str) -> Response:
        if request.url.path == "/events" or "application/json" in request.headers.get(
                "accept", ""):
            return PlainTextResponse(reason + "\n", status_code=status)
        html = self.templates.get_template("refused.html").render(reason=reason)
        return HTMLResponse(html, status_code=status)

    # -- rendering --------------------------------------------------------------------

    def _render(self, request: Request, template: str, context: dict[str, Any], *,
                page: str, session: str, status: int = 200) -> Response:
        chosen = self.templates.get_template(template)
        values = {
            **context,
            "page": page,
            "trust_domain": self.settings.trust_domain,
            "write": self.settings.write,
            "form_token": self.settings.access.form_token(session),
            "problem_following": self.changes.problem,
            "now": self.settings.now(),
        }
        if request.headers.get("x-console-fragment") == "1":
            block = chosen.blocks["content"]
            html = "".join(block(chosen.new_context(values)))
        else:
            html = chosen.render(values)
        return HTMLResponse(html, status_code=status,
                            headers={"cache-control": "no-store",
                                     "content-security-policy": _CSP,
                                     "x-frame-options": "DENY",
                                     "referrer-policy": "no-referrer"})

    def _ago(self, ts: Any) -> str:
        if ts is None:
            return "never"
        return _duration(self.settings.now() - float(ts)) + " ago"

    def _until(self, ts: Any) -> str:
        if ts is None:
            return "-"
        left = float(ts) - self.settings.now()
        return ("in " + _duration(left)) if left >= 0 else (_duration(-left) + " ago")

    def _form_ok(self, session: str, form: dict[str, str]) -> bool:
        return self.settings.access.form_token_valid(session, str(form.get("form_token", "")))

    # -- health -----------------------------------------------------------------------

    async def live(self, request: Request) -> Response:
        return PlainTextResponse("ok\n")

    async def ready(self, request: Request) -> Response:
        if self.changes.token is None or self.changes.problem is not None:
            reason = self.changes.problem or "has not reached the server's admin API yet"
            return PlainTextResponse(f"not ready: {reason}\n", status_code=503)
        return PlainTextResponse("ready\n")

    async def metrics(self, request: Request) -> Response:
        return Response(generate_latest(self.registry), media_type=CONTENT_TYPE_LATEST)

    # -- pages ------------------------------------------------------------------------

    async def home(self, request: Request, session: str) -> Response:
        return RedirectResponse("/trust-domain", status_code=303)

    async def trust_domain(self, request: Request, session: str) -> Response:
        found = await self.settings.admin.get("/v1/trustdomain")
        now = self.settings.now()
        lines = {kind: views.timeline(found["authorities"].get(kind, []),
                                      found.get("next_rotation", {}).get(kind), now)
                 for kind in ("x509", "jwt")}
        return self._render(request, "trust_domain.html",
                            {"found": found, "timelines": lines},
                            page="trust-domain", session=session)

    async def agents(self, request: Request, session: str) -> Response:
        text = request.query_params.get("q", "")[:2048]
        state = request.query_params.get("state", "")
        if state not in ("", "active", "quiet", "expired", "banned"):
            state = ""
        every = (await self.settings.admin.get("/v1/agents"))["agents"]
        chosen = views.filter_agents(every, text, state, self.settings.now())
        return self._render(request, "agents.html", {
            "agents": chosen[:MAX_AGENTS_SHOWN], "matched": len(chosen), "total": len(every),
            "q": text, "state": state, "done": request.query_params.get("done", "")[:300],
        }, page="agents", session=session)

    async def confirm(self, request: Request, session: str) -> Response:
        action = request.query_params.get("action", "")
        spiffe_id = request.query_params.get("spiffe_id", "")[:2048]
        if not self.settings.write or action not in ACTIONS:
            return self._not_writable(request, session)
        return self._render(request, "confirm.html",
                            {"action": action, "verb": ACTIONS[action], "spiffe_id": spiffe_id},
                            page="agents", session=session)

    async def act(self, request: Request, session: str) -> Response:
        try:
            form = await _form(request)
        except FormTooLarge as err:
            return self._render(request, "problem.html", {"problem": str(err)},
                                page="agents", session=session, status=413)
        action = str(form.get("action", ""))
        if not self.settings.write or action not in ACTIONS:
            return self._not_writable(request, session)
        if not self._form_ok(session, form):
            return self._render(request, "problem.html", {
                "problem": "This form has expired; go back, reload the page and try again."},
                page="agents", session=session, status=403)
        spiffe_id = str(form.get("spiffe_id", ""))
        await self.settings.admin.post(f"/v1/agents/{action}", {"spiffe_id": spiffe_id})
        done = f"{ACTIONS[action]}: {spiffe_id}"
        return RedirectResponse("/agents?" + urlencode({"done": done}), status_code=303)

    def _not_writable(self, request: Request, session: str) -> Response:
        return self._render(request, "problem.html", {
            "problem": "The console is read-only; start it with 'tessera server console "
                       "--write' to evict or ban agents."},
            page="agents", session=session, status=403)

    async def entries(self, request: Request, session: str) -> Response:
        query = request.query_params
        text, parent = query.get("q", "")[:2048].strip(), query.get("parent_id", "")[:2048]
        selector = query.get("selector", "")[:2048].strip()
        offset = _int(query.get("offset"), 0, 0, 10_000_000)
        params = {"q": text, "parent_id": parent.strip(), "selector": selector or None,
                  "limit": PAGE_SIZE, "offset": offset}
        problem, found = None, {"entries": [], "total": 0}
        if "\x00" in text + parent + selector:
            problem = "Search text cannot hold a NUL character."
        else:
            try:
                found = await self.settings.admin.get("/v1/entries/search", params)
            except SourceError as err:
                if err.answered != 400:
                    raise
                problem = str(err)
        return self._render(request, "entries.html", {
            "entries": found["entries"], "total": found["total"], "offset": offset,
            "page_size": PAGE_SIZE, "q": text, "parent_id": parent, "selector": selector,
            "problem": problem,
            "more": urlencode({"q": text, "parent_id": parent, "selector": selector,
                               "offset": offset + PAGE_SIZE}),
            "less": urlencode({"q": text, "parent_id": parent, "selector": selector,
                               "offset": max(offset - PAGE_SIZE, 0)}),
            "first": urlencode({"q": text, "parent_id": parent, "selector": selector}),
        }, page="entries", session=session)

    async def entry(self, request: Request, session: str) -> Response:
        entry_id = request.path_params["entry_id"][:128]
        found = await self.settings.admin.get(f"/v1/entries/{quote(entry_id, safe='')}")
        issued = await self.settings.admin.get(
            "/v1/svids", {"spiffe_id": found["spiffe_id"], "limit": 20})
        return self._render(request, "entry.html", {"entry": found, "issued": issued["svids"]},
                            page="entries", session=session)

    async def svids(self, request: Request, session: str) -> Response:
        window = request.query_params.get("within", "24h")
        if window not in EXPIRY_WINDOWS:
            window = "24h"
        found = await self.settings.admin.get(
            "/v1/svids", {"expiring_within": EXPIRY_WINDOWS[window], "limit": 500})
        return self._render(request, "svids.html", {
            "svids": found["svids"], "total": found["total"], "within": window,
            "windows": list(EXPIRY_WINDOWS)}, page="svids", session=session)

    async def audit(self, request: Request, session: str) -> Response:
        found = await self.settings.admin.get("/v1/audit", {"limit": 200})
        return self._render(request, "audit.html", {"events": found["events"]},
                            page="audit", session=session)

    async def audit_chain(self, request: Request, session: str) -> Response:
        result = await self.settings.admin.post("/v1/audit/verify")
        return self._render(request, "audit_chain.html", {"chain": result},
                            page="audit", session=session)

    async def mesh(self, request: Request, session: str) -> Response:
        registered, configured = await asyncio.gather(
            self.settings.admin.get("/v1/mesh/services"),
            self.settings.admin.get("/v1/mesh/Service"),
        )
        instances = registered["instances"]
        names = [str(r["name"]) for r in configured["resources"]]
        figures: dict[str, list[tuple[dict[str, str], float]]] = {}
        metrics_problem = None
        prometheus = self.settings.prometheus
        if prometheus is None:
            metrics_problem = ("No request metrics: start the console with --prometheus URL "
                               "(a Prometheus scraping the sidecars) to see traffic.")
        else:
            queries = topology.edge_queries(self.settings.rate_window)
            try:
                answers = await asyncio.gather(*(prometheus.query(q) for q in queries.values()))
                figures = dict(zip(queries, answers, strict=True))
            except SourceError as err:
                metrics_problem = str(err)
        graph = topology.build(names, instances, figures)
        by_service: dict[str, list[dict[str, Any]]] = {name: [] for name in names}
        for instance in instances:
            by_service.setdefault(instance["service"], []).append(instance)
        return self._render(request, "mesh.html", {
            "graph": graph, "by_service": by_service, "metrics_problem": metrics_problem,
            "window": self.settings.rate_window, "revision": registered["revision"],
            "node_width": topology.NODE_WIDTH, "node_height": topology.NODE_HEIGHT,
        }, page="mesh", session=session)

    async def service(self, request: Request, session: str) -> Response:
        name = request.path_params["service"][:63]
        found = await self.settings.admin.get(f"/v1/mesh/describe/{quote(name, safe='')}")
        return self._render(request, "service.html", {"service": name, "found": found},
                            page="mesh", session=session)

    async def explain(self, request: Request, session: str) -> Response:
        form: dict[str, str] = {"from": "", "to": "", "method": "GET", "path": "/",
                                "headers": "", "port": ""}
        result, decision, problem = None, None, None
        if request.method == "POST":
            try:
                posted = await _form(request)
            except FormTooLarge as err:
                posted, problem = {}, str(err)
            form.update({k: str(posted.get(k, ""))[:8192] for k in form})
            if problem is None and not self._form_ok(session, posted):
                problem = ("This form has expired (or was not sent by this console's page); "
                           "reload the page and try again.")
            elif problem is None:
                try:
                    body = _explain_body(form)
                    result = await self.settings.admin.post("/v1/mesh/explain", body)
                    decision = views.deciding_rule(result)
                except ValueError as err:
                    problem = str(err)
                except SourceError as err:
                    if err.answered is None or err.answered >= 500:
                        raise
                    problem = str(err)
        return self._render(request, "explain.html", {
            "form": form, "result": result, "decision": decision, "problem": problem,
        }, page="explain", session=session, status=400 if problem else 200)

    async def events(self, request: Request, session: str) -> Response:
        try:
            stream = await self.changes.stream()
        except TooManyStreams:
            return PlainTextResponse("too many open console pages\n", status_code=503)
        return StreamingResponse(stream, media_type="text/event-stream",
                                 headers={"cache-control": "no-store"})


_CSP = ("default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
        "connect-src 'self'; frame-ancestors 'none'; form-action 'self'; base-uri 'none'")


class FormTooLarge(ValueError):
    """A posted form beyond :data:`MAX_FORM_BYTES`."""

    def __init__(self) -> None:
        super().__init__(f"The form is larger than {MAX_FORM_BYTES // 1024} KiB; "
                         "send fewer or shorter headers.")


def _explain_body(form: dict[str, str]) -> dict[str, Any]:
    """The admin API's explain request from the explain form; ValueError with a sentence
    for a field the form's user can fix."""
    caller, service = form["from"].strip(), form["to"].strip()
    if not caller or not service:
        raise ValueError("Both the caller's SPIFFE ID and the service called are needed.")
    body: dict[str, Any] = {
        "from": caller, "to": service,
        "method": form["method"].strip() or "GET",
        "path": form["path"].strip() or "/",
        "headers": views.parse_headers(form["headers"]),
    }
    port = form["port"].strip()
    if port:
        if not port.isdigit() or not 1 <= int(port) <= 65535:
            raise ValueError(f"port {port[:16]!r} is not a port: a number from 1 to 65535.")
        body["port"] = int(port)
    return body


async def _form(request: Request) -> dict[str, str]:
    """A urlencoded form's fields (the console's forms are nothing else), its body read
    within :data:`MAX_FORM_BYTES` (:class:`FormTooLarge` beyond); empty for anything
    else."""
    if not request.headers.get("content-type", "").startswith(
            "application/x-www-form-urlencoded"):
        return {}
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > MAX_FORM_BYTES:
            raise FormTooLarge
    try:
        fields = parse_qsl(body.decode(), keep_blank_values=True, max_num_fields=32)
    except (UnicodeDecodeError, ValueError):
        return {}
    return dict(fields)


def _int(value: str | None, default: int, low: int, high: int) -> int:
    try:
        number = int(value) if value is not None else default
    except ValueError:
        return default
    return min(max(number, low), high)


def _when(ts: Any) -> str:
    if ts is None:
        return "-"
    if isinstance(ts, str):
        return ts.replace("T", " ")[:19] + " UTC"
    return datetime.fromtimestamp(float(ts), UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


def _duration(seconds: float) -> str:
    seconds = int(seconds)
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            whole, rest = divmod(seconds, size)
            smaller = {"d": ("h", 3600), "h": ("m", 60), "m": ("s", 1)}[unit]
            part = rest // smaller[1]
            return f"{whole}{unit} {part}{smaller[0]}" if part else f"{whole}{unit}"
    return f"{max(seconds, 0)}s"


def _ttl(seconds: Any) -> str:
    """An entry's TTL: 0 means the server's default."""
    return "default" if not seconds else _duration(float(seconds))


def _short(text: Any, length: int = 28) -> str:
    value = str(text)
    return value if len(value) <= length else "…" + value[-(length - 1):]


def _percent(value: float) -> str:
    return f"{value:.1%}"
