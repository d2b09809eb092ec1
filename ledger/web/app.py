"""The `ledger ui` application: routes, page rendering, errors, and the guarded writes.

Pages are rendered on the server from Jinja2 templates with autoescaping on for every
template, so every stored string (facts are user input) is shown as text. Each page calls
the `Ledger` facade and nothing else: the web view has no second path to the data.

Writes (tag, branch, checkout, revert) exist only when the app is created with
`allow_writes`. A write is a POST whose form carries the token printed at start-up and the
CSRF value of the page it came from (a double-submit cookie, SameSite=Strict), from a page
of this server (Origin, when the browser sends one); anything else is refused with 403
before the library is called, so a refused write changes nothing. The library records each
write in the audit log with the ledger's author as the actor.
"""
from __future__ import annotations

import hmac
import json
import logging
import secrets
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable
from urllib.parse import quote, urlencode, urlsplit

import jinja2
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.middleware.trustedhost import TrustedHostMiddleware
from starlette.requests import Request
from starlette.responses import HTMLResponse, RedirectResponse, Response
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles

from ..errors import InputError, LedgerError, NotFoundError
from ..names import rev_name
from . import charts

if TYPE_CHECKING:
    from ..api import Ledger

HERE = Path(__file__).resolve().parent
log = logging.getLogger("ledger.web")

CSRF_COOKIE = "ledger_csrf"
HISTORY_PAGE = 50            # revisions per history page, unless ?n= says otherwise
HISTORY_MAX = 500
EDITS_PAGE = 100             # active edits per page of a revision
DIFF_SHOWN = 200             # edits listed per side of a diff, unless ?all=1
AUDIT_DEFAULT, AUDIT_MAX = 100, 1000
PLAYGROUND_TOKENS, PLAYGROUND_MAX_TOKENS = 20, 200
PROMPT_MAX = 2000
WRITE_ACTIONS = ("tag", "branch", "checkout", "revert")

# No script runs and nothing loads from elsewhere: styles are the package's stylesheet and
# the inline <style> of pygal's SVG charts.
SECURITY_HEADERS = [
    (b"content-security-policy", b"default-src 'none'; style-src 'self' 'unsafe-inline'; img-src 'self' data:; "
                                 b"form-action 'self'; frame-ancestors 'none'; base-uri 'none'"),
    (b"x-content-type-options", b"nosniff"),
    (b"referrer-policy", b"same-origin"),
    (b"x-frame-options", b"DENY"),
]


def new_token() -> str:
    """A write token: 128 random bits, URL-safe."""
    return secrets.token_urlsafe(16)


class _SecurityHeaders:
    """ASGI middleware adding SECURITY_HEADERS to every HTTP response."""

    def __init__(self, app: Any):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)

        async def send_with_headers(message):
            if message["type"] == "http.response.start":
                message["headers"] = list(message.get("headers", [])) + SECURITY_HEADERS
            await send(message)
        await self.app(scope, receive, send_with_headers)


# --- template helpers -------------------------------------------------------------------------------

def _q(value: Any) -> str:
    """A path segment or query value, percent-encoded (revision names may hold / and ~)."""
    return quote(str(value), safe="")


def _fmt(value: Any) -> str:
    if isinstance(value, bool) or value is None:
        return "-" if value is None else str(value).lower()
    if isinstance(value, float):
        return f"{value:.4g}" if abs(value) >= 1e4 or (value and abs(value) < 1e-3) else f"{value:.3f}"
    return str(value)


def _signed(value: Any) -> str:
    return f"{value:+.3f}" if isinstance(value, (int, float)) else _fmt(value)


def _json(value: Any) -> str:
    return json.dumps(value, indent=2, ensure_ascii=False, sort_keys=True)


def _environment() -> jinja2.Environment:
    env = jinja2.Environment(loader=jinja2.FileSystemLoader(HERE / "templates"), autoescape=True,
                             undefined=jinja2.StrictUndefined, trim_blocks=True, lstrip_blocks=True)
    env.filters.update(q=_q, fmt=_fmt, signed=_signed, tojson_pretty=_json)
    env.globals["query"] = lambda **kw: urlencode({k: v for k, v in kw.items() if v not in (None, "")})
    return env


def _int(request: Request, name: str, default: int, lo: int, hi: int) -> int:
    raw = request.query_params.get(name)
    if raw in (None, ""):
        return default
    try:
        value = int(raw)
    except ValueError:
        raise InputError(f"{name} must be a whole number, not {raw!r}") from None
    if not lo <= value <= hi:
        raise InputError(f"{name} must be between {lo} and {hi}")
    return value


def _text(request: Request, name: str, default: str | None = None) -> str | None:
    value = request.query_params.get(name, "").strip()
    return value or default


# --- the application -----------------------------------------------------------------------------------

class LedgerUI:
    """The pages of one open ledger."""

    def __init__(self, lg: Ledger, *, allow_writes: bool = False, token: str | None = None):
        if allow_writes and not token:
            raise ValueError("allow_writes needs a token")
        self.lg = lg
        self.allow_writes = allow_writes
        self.token = token
        self.env = _environment()
        # The ledger holds one composed model: generating and explaining at two revisions,
        # and a revert (which measures), take turns.
        self.model_lock = threading.Lock()

    # --- rendering ----------------------------------------------------------------------------------

    def render(self, request: Request, template: str, status: int = 200, **context: Any) -> HTMLResponse:
        csrf, new_cookie = None, False
        if self.allow_writes:
            csrf = request.cookies.get(CSRF_COOKIE)
            if not csrf or len(csrf) > 100:
                csrf, new_cookie = secrets.token_urlsafe(32), True
        try:
            head = self.lg.head()
        except LedgerError:
            head = None
        t0 = time.perf_counter()
        html = self.env.get_template(template).render(
            request=request, head=head, allow_writes=self.allow_writes, csrf=csrf, **context)
        response = HTMLResponse(html, status_code=status)
        response.headers["server-timing"] = f"render;dur={(time.perf_counter() - t0) * 1000:.1f}"
        if new_cookie:
            response.set_cookie(CSRF_COOKIE, csrf, httponly=True, samesite="strict", path="/")
        return response

    def error_page(self, request: Request, status: int, message: str) -> HTMLResponse:
        titles = {400: "Bad request", 403: "Refused", 404: "Not found", 405: "Method not allowed",
                  500: "Error"}
        return self.render(request, "error.html", status=status, title=titles.get(status, "Error"),
                           message=message)

    # --- pages ----------------------------------------------------------------------------------------

    def history(self, request: Request) -> Response:
        rev = _text(request, "rev", "HEAD")
        n = _int(request, "n", HISTORY_PAGE, 1, HISTORY_MAX)
        rows = self.lg.log(rev, n)
        older = rows[-1].parent if len(rows) == n else None
        return self.render(request, "history.html", title="History", rows=rows, rev=rev, n=n, older=older,
                           refs=self.lg.refs())

    def revision(self, request: Request) -> Response:
        name = request.path_params["name"]
        info = self.lg.show(name)
        pages = max(1, -(-info.n_active // EDITS_PAGE))
        page = _int(request, "page", 1, 1, pages)
        active = self.lg.active_edits(info.revision, offset=(page - 1) * EDITS_PAGE, limit=EDITS_PAGE)
        return self.render(request, "revision.html", title=info.revision, name=name, info=info, active=active,
                           page=page, pages=pages, page_size=EDITS_PAGE)

    def edit(self, request: Request) -> Response:
        name = request.path_params["name"]
        info = self.lg.edit(name)
        return self.render(request, "edit.html", title=info.id, e=info, tensors=self.lg.edit_tensors(name),
                           events=self.lg.audit(edit=name, limit=20))

    def diff(self, request: Request) -> Response:
        a, b = _text(request, "a"), _text(request, "b")
        result = None
        if a or b:
            if not (a and b):
                raise InputError("a diff needs two revisions, a and b")
            result = self.lg.diff(a, b)
        show_all = request.query_params.get("all") == "1"
        return self.render(request, "diff.html", title="Diff", a=a or "", b=b or "", d=result,
                           shown=None if show_all else DIFF_SHOWN)

    def audit(self, request: Request) -> Response:
        filters = {k: _text(request, k) for k in ("rev", "edit", "actor", "command", "since", "until")}
        n = _int(request, "n", AUDIT_DEFAULT, 1, AUDIT_MAX)
        events = self.lg.audit(limit=n, **filters)
        return self.render(request, "audit.html", title="Audit", events=events, filters=filters, n=n)

    def verify(self, request: Request) -> Response:
        t0 = time.perf_counter()
        problems = self.lg.verify()
        return self.render(request, "verify.html", title="Verify", problems=problems,
                           seconds=time.perf_counter() - t0)

    def metrics(self, request: Request) -> Response:
        reports = self.lg.evaluation_history()
        datasets: dict[str, dict[str, Any]] = {}
        for r in reports:
            d = datasets.setdefault(r.dataset_sha256, {"sha": r.dataset_sha256, "n": r.n, "labels": [],
                                                       "reports": [], "metrics": set()})
            if r.label and r.label not in d["labels"]:
                d["labels"].append(r.label)
            d["reports"].append(r)
            d["metrics"].update(k for k, v in r.means.items() if isinstance(v, (int, float)))
        asked = [m for m in request.query_params.getlist("metric") if m]
        for d in datasets.values():
            chosen = [m for m in (asked or charts.DEFAULT_METRICS) if m in d["metrics"]] or sorted(d["metrics"])[:4]
            d["chosen"] = chosen
            d["metrics"] = sorted(d["metrics"])
            title = ", ".join(d["labels"]) or f"dataset {d['sha'][:12]}"
            d["svg"] = charts.means_chart(f"{title} ({d['n']} facts)",
                                          [(int(r.revision.split("-")[1]), r.means) for r in d["reports"]], chosen)
        return self.render(request, "metrics.html", title="Metrics", datasets=list(datasets.values()),
                           asked=asked)

    def playground(self, request: Request) -> Response:
        prompt = request.query_params.get("prompt", "")
        a = _text(request, "a", rev_name(1))
        b = _text(request, "b", "HEAD")
        n = _int(request, "n", PLAYGROUND_TOKENS, 1, PLAYGROUND_MAX_TOKENS)
        if len(prompt) > PROMPT_MAX:
            raise InputError(f"the prompt is longer than {PROMPT_MAX} characters")
        sides = []
        if prompt.strip():
            names = {a: self.lg.resolve(a), b: self.lg.resolve(b)}   # a name that does not exist: 404 first
            with self.model_lock:
                for rev in (a, b):
                    sides.append(self._run(prompt, rev, rev_name(names[rev]), n))
        return self.render(request, "playground.html", title="Playground", prompt=prompt, a=a, b=b, n=n,
                           sides=sides)

    def _run(self, prompt: str, rev: str, resolved: str, n: int) -> dict[str, Any]:
        """One side of the playground: the greedy continuation and, where the library has
        `explain`, which edits fire at which token."""
        out: dict[str, Any] = {"rev": rev, "revision": resolved,
                               "completion": self.lg.generate(prompt, rev=resolved, max_new_tokens=n)}
        explain = getattr(self.lg, "explain", None)
        out["explanation"] = explain(prompt, rev=resolved, max_new_tokens=n) if explain else None
        if out["explanation"] is not None:
            weights = [sum(f.weight for f in t.firings) for t in out["explanation"].tokens]
            top = max(weights, default=0.0) or 1.0
            # Ten shades: the token's summed gate weight against the strongest token's.
            out["heat"] = [min(9, int(round(9 * w / top))) if w > 0 else 0 for w in weights]
        return out

    # --- writes ----------------------------------------------------------------------------------------

    async def write(self, request: Request) -> Response:
        action = request.path_params["action"]
        if action not in WRITE_ACTIONS:
            raise HTTPException(404, f"no write {action!r}")
        if not self.allow_writes:
            return self.error_page(request, 403, "this ui is read-only: start it with `ledger ui --allow-writes` "
                                                 "to tag, branch, check out or revert from the page")
        origin = request.headers.get("origin")
        if origin is not None and urlsplit(origin).netloc != request.headers.get("host"):
            return self.error_page(request, 403, "refused: the form was not sent from a page of this server")
        form = await request.form()
        cookie, sent = request.cookies.get(CSRF_COOKIE, ""), str(form.get("csrf", ""))
        if not cookie or not hmac.compare_digest(cookie.encode(), sent.encode()):
            return self.error_page(request, 403, "refused: the form's CSRF value does not match this browser's; "
                                                 "reload the page and send it again")
        if not hmac.compare_digest(str(form.get("token", "")).encode(), self.token.encode()):
            return self.error_page(request, 403, "refused: wrong or missing write token (printed by `ledger ui` "
                                                 "at start-up)")
        field = lambda k: (str(form.get(k, "")).strip() or None)   # noqa: E731
        call: Callable[[], Any]
        if action == "tag":
            call = lambda: self.lg.tag(field("name") or "", field("rev") or "")   # noqa: E731
        elif action == "branch":
            call = lambda: self.lg.branch(field("name") or "", field("rev"))   # noqa: E731
        elif action == "checkout":
            call = lambda: self.lg.checkout(field("rev") or "")   # noqa: E731
        else:
            def call():
                with self.model_lock:
                    return self.lg.revert(field("target") or "", message=field("message"))
        result = await run_in_threadpool(call)
        data = result.to_dict() if hasattr(result, "to_dict") else result
        target = data.get("revision") if isinstance(data, dict) else None
        return self.render(request, "done.html", title=f"{action} done", action=action, result=data,
                           target=target)


def create_app(lg: Ledger, *, allow_writes: bool = False, token: str | None = None,
               allowed_hosts: list[str] | None = None) -> Starlette:
    """The ASGI app over an open ledger. `allow_writes` (with its `token`) enables the write
    forms; `allowed_hosts` restricts the Host header (against DNS rebinding; None: any)."""
    ui = LedgerUI(lg, allow_writes=allow_writes, token=token)

    async def not_found(request: Request, exc: Exception) -> Response:
        return ui.error_page(request, 404, str(exc))

    async def bad_input(request: Request, exc: Exception) -> Response:
        return ui.error_page(request, 400, str(exc))

    async def state_error(request: Request, exc: Exception) -> Response:
        return ui.error_page(request, 500, str(exc))

    async def http_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, HTTPException)
        detail = exc.detail if exc.status_code != 404 or exc.detail != "Not Found" else f"no page {request.url.path}"
        return ui.error_page(request, exc.status_code, str(detail))

    async def internal(request: Request, exc: Exception) -> Response:
        log.exception("unexpected error on %s", request.url.path, exc_info=exc)
        return HTMLResponse("<!doctype html><title>Error</title><h1>Internal error</h1>"
                            "<p>The server logged the details.</p>", status_code=500)

    def favicon(request: Request) -> Response:
        return Response(status_code=204)

    routes = [
        Route("/", ui.history, name="history"),
        Route("/rev/{name:path}", ui.revision, name="revision"),
        Route("/edit/{name}", ui.edit, name="edit"),
        Route("/diff", ui.diff, name="diff"),
        Route("/audit", ui.audit, name="audit"),
        Route("/verify", ui.verify, name="verify"),
        Route("/metrics", ui.metrics, name="metrics"),
        Route("/playground", ui.playground, name="playground"),
        Route("/write/{action}", ui.write, methods=["POST"], name="write"),
        Route("/favicon.ico", favicon),
        Mount("/static", app=StaticFiles(directory=HERE / "static"), name="static"),
    ]
    middleware = [Middleware(_SecurityHeaders)]
    if allowed_hosts:
        middleware.append(Middleware(TrustedHostMiddleware, allowed_hosts=allowed_hosts))
    app = Starlette(routes=routes, middleware=middleware, exception_handlers={
        NotFoundError: not_found, InputError: bad_input, LedgerError: state_error,
        HTTPException: http_error, Exception: internal})
    app.state.ui = ui
    return app


LOOPBACK = ("127.0.0.1", "localhost", "::1")


def listen(host: str, port: int):
    """A listening socket on host:port, or an InputError naming why not (a port in use, a
    host that does not resolve): refused before anything is served."""
    import socket
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
    except socket.gaierror as e:
        raise InputError(f"--host {host!r}: {e.strerror}") from None
    sock = socket.socket(family, kind, proto)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(address)
        sock.listen(128)
    except OSError as e:
        sock.close()
        raise InputError(f"cannot listen on {host}:{port}: {e.strerror}") from None
    return sock


def serve(lg: Ledger, *, host: str = "127.0.0.1", port: int = 8000, allow_writes: bool = False,
          echo: Callable[[str], None] = print) -> None:
    """Run the ui with uvicorn until interrupted; says where it listens, whether it takes
    writes and, when it does, the write token. Port 0 takes a free port (and says which)."""
    import uvicorn
    sock = listen(host, port)
    port = sock.getsockname()[1]
    token = new_token() if allow_writes else None
    loopback = host in LOOPBACK
    hosts = ([host, "127.0.0.1", "localhost", "[::1]"] if loopback else ["*"])
    app = create_app(lg, allow_writes=allow_writes, token=token, allowed_hosts=hosts)
    shown = f"[{host}]" if ":" in host else host
    echo(f"ledger ui: http://{shown}:{port}/  ({'writes enabled' if allow_writes else 'read-only'}; Ctrl-C stops it)")
    if loopback:
        echo(f"bound to {host} only: reachable from this machine alone (--host to change)")
    else:
        echo(f"warning: bound to {host}: reachable from other machines; pages show every stored fact")
    if allow_writes:
        echo(f"write token: {token}  (the tag, branch, checkout and revert forms ask for it; "
             f"writes are recorded in the audit log as {lg.author})")
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
    server.run(sockets=[sock])
