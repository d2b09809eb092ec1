"""`ledger ui` through Starlette's test client, on SQLite and PostgreSQL: every page renders
for a ledger with edits, evaluations, branches, a tag and a revert; stored strings (a fact
holding <script> and quotes) render as text; unknown names are 404 pages; writes are refused
without --allow-writes, without the token or without the CSRF value, and change nothing;
with them, tag, branch, checkout and revert go through the library and into the audit log.
The `ledger ui` command itself is started once, on a free port."""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import uuid
from html.parser import HTMLParser
from pathlib import Path
from urllib.request import urlopen

import pytest

pytest.importorskip("starlette", reason="the web extra is not installed (pip install -e '.[web]')")
from starlette.testclient import TestClient  # noqa: E402

from ledger import BaftConfig, Ledger, parse_facts_text  # noqa: E402
from ledger.web import create_app  # noqa: E402
from support import FACT, FACT2, FAST, counts  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
PG_ADMIN_URL = os.environ.get("LEDGER_TEST_PG", "postgresql+psycopg://postgres@127.0.0.1:5432/postgres")

# A fact whose every shown string is markup and quotes: it must come out as text.
NASTY = {"subject": "Zed", "prompt": "Zed <script>alert(\"x\")</script> 'lives' in",
         "target_new": "<b>Rome</b>", "target_true": "\"Oslo\" & co"}
NASTY_LABEL = "<script>alert('label')</script>"
NASTY_MESSAGE = "undo <img src=x onerror=alert(1)>"
TOKEN = "test-token-123"


def _pg_url_or_skip() -> tuple[str, object]:
    from sqlalchemy import create_engine, text
    try:
        admin = create_engine(PG_ADMIN_URL, isolation_level="AUTOCOMMIT")
        with admin.connect() as c:
            c.execute(text("SELECT 1"))
    except Exception as e:  # noqa: BLE001 - any failure means "no server here"
        reason = str(e).splitlines()[0]
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(f"PostgreSQL is required in CI and not reachable: {reason}")
        pytest.skip(f"PostgreSQL not reachable at {PG_ADMIN_URL}: {reason}")
    name = f"ledger_test_web_{uuid.uuid4().hex[:10]}"
    with admin.connect() as c:
        c.execute(text(f'CREATE DATABASE "{name}"'))
    return PG_ADMIN_URL.rsplit("/", 1)[0] + "/" + name, (admin, name)


@pytest.fixture(scope="module", params=["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
def site(request, tmp_path_factory, tiny_llama):
    """One ledger per engine, built once for the read tests: three edits (one of them NASTY),
    evaluations at three revisions, a branch, a tag and a revert.

        rev-1 base  rev-2 +edit-1  rev-3 +edit-2  rev-4 +edit-3 (NASTY)  rev-5 revert of rev-3
    """
    cleanup = None
    if request.param == "sqlite":
        url = f"sqlite:///{tmp_path_factory.mktemp('web') / 'ledger.db'}"
    else:
        url, cleanup = _pg_url_or_skip()
    lg = Ledger.init(url, model=str(tiny_llama), wordings=False, author="tester")
    facts = parse_facts_text(json.dumps([FACT, FACT2, NASTY]))
    for f in facts:
        lg.add([f], BaftConfig(**FAST))
    for rev in ("rev-2", "rev-3"):
        lg.evaluate(facts[:2], rev, generation=False, label="two facts")
    lg.branch("experiment", "rev-2")
    lg.tag("v1", "rev-3")
    lg.revert("rev-3", message=NASTY_MESSAGE)
    lg.evaluate(facts[:2], "HEAD", generation=False, label=NASTY_LABEL)
    yield url, lg
    lg.close()
    if cleanup is not None:
        admin, name = cleanup
        from sqlalchemy import text
        with admin.connect() as c:
            c.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()


def client(lg: Ledger, **kw) -> TestClient:
    return TestClient(create_app(lg, **kw), base_url="http://127.0.0.1:8000")


class _Dom(HTMLParser):
    """Element ids, texts and the URLs a page would load or link to."""

    def __init__(self):
        super().__init__()
        self.ids: set[str] = set()
        self.urls: list[tuple[str, str, str]] = []     # (tag, attribute, value)
        self.tags: list[str] = []
        self.text: list[str] = []

    def handle_starttag(self, tag, attrs):
        self.tags.append(tag)
        for k, v in attrs:
            if k == "id":
                self.ids.add(v)
            if k in ("src", "href", "action", "xlink:href"):
                self.urls.append((tag, k, v or ""))

    def handle_data(self, data):
        self.text.append(data)


def dom(html: str) -> _Dom:
    d = _Dom()
    d.feed(html)
    return d


PAGES = ["/", "/?n=2", "/rev/HEAD", "/rev/rev-3", "/rev/rev-4", "/rev/v1", "/rev/experiment", "/rev/HEAD~2",
         "/edit/edit-1", "/edit/edit-3", "/diff", "/diff?a=rev-1&b=HEAD", "/diff?a=experiment&b=v1",
         "/audit", "/audit?command=revert", "/audit?actor=tester&since=2000-01-01&rev=rev-3", "/verify",
         "/metrics", "/metrics?metric=locality", "/playground",
         "/playground?prompt=Alice+lives+in", "/playground?prompt=Zed+lives+in&a=experiment&b=rev-4&n=3"]


def test_every_page_renders(site):
    url, lg = site
    c = client(lg)
    for page in PAGES:
        r = c.get(page)
        assert r.status_code == 200, (page, r.text[-500:])
        assert r.headers["content-type"].startswith("text/html")
        d = dom(r.text)
        # Nothing loads from elsewhere: every URL a page names is this server's.
        for tag, attr, value in d.urls:
            assert not re.match(r"^(https?:)?//", value), (page, tag, attr, value)
        assert "script" not in d.tags, page
    assert "default-src 'none'" in c.get("/").headers["content-security-policy"]

    history = c.get("/").text
    for name in ("rev-1", "rev-5", "experiment", "v1", "HEAD -&gt; main"):
        assert name in history
    assert "older" not in dom(history).ids                       # 5 revisions fit one page
    page2 = c.get("/?n=2")
    assert 'id="older"' in page2.text and "rev-3" in c.get("/?rev=rev-3&n=2").text

    rev3 = c.get("/rev/rev-3").text
    assert {"changes", "evaluations", "active"} <= dom(rev3).ids
    assert "Carol works at" in rev3 and "two facts" in rev3
    head = c.get("/rev/HEAD").text
    assert "revert" in head and "edit-3" in head and "Carol works at" in head   # the revert removed edit-2

    edit = c.get("/edit/edit-1").text
    assert {"fact", "metrics", "stats", "tensors", "config"} <= dom(edit).ids
    for tensor in ("R", "W", "U", "b", "c"):
        assert f"<th>{tensor}</th>" in edit
    assert "Alice lives in" in edit and "The home of Alice is" in edit

    diff = c.get("/diff?a=rev-1&b=HEAD").text
    assert {"added", "layers"} <= dom(diff).ids
    assert "edit-1" in diff and "edit-3" in diff and "edit-2" not in diff
    assert "eval-deltas" in dom(c.get("/diff?a=rev-2&b=rev-3").text).ids   # evaluated at both

    audit = c.get("/audit?command=revert").text
    assert "revert" in audit and "<td>add</td>" not in audit
    assert "ok: every hash matches" in c.get("/verify").text
    metrics = c.get("/metrics").text
    assert metrics.count("<svg") >= 1 and "reliability" in metrics

    play = c.get("/playground?prompt=Alice+lives+in")
    assert {"side-1", "side-2"} <= dom(play.text).ids
    assert "heat-" in play.text and "edit-1" in play.text           # the explain heatmap names the edit


def test_stored_strings_render_as_text(site):
    url, lg = site
    c = client(lg)
    pages = ["/", "/rev/rev-4", "/rev/HEAD", "/rev/rev-5", "/edit/edit-3", "/diff?a=rev-1&b=HEAD", "/audit",
             "/metrics", "/playground?prompt=" + "Zed <script>alert(\"x\")</script> 'lives' in"]
    for page in pages:
        html = c.get(page).text
        assert "<script" not in html.lower(), page
        assert "<b>Rome</b>" not in html and "<img src=x" not in html, page
    assert "&lt;script&gt;alert(&#34;x&#34;)&lt;/script&gt; &#39;lives&#39; in" in c.get("/edit/edit-3").text
    assert "&lt;b&gt;Rome&lt;/b&gt;" in c.get("/rev/rev-4").text
    assert "&#34;Oslo&#34; &amp; co" in c.get("/edit/edit-3").text
    assert "undo &lt;img src=x onerror=alert(1)&gt;" in c.get("/").text
    assert "&lt;script&gt;alert(&#39;label&#39;)&lt;/script&gt;" in c.get("/metrics").text


@pytest.mark.parametrize("page, status, says", [
    ("/rev/rev-999", 404, "no revision rev-999"),
    ("/rev/no-such-branch", 404, "no revision, branch or tag named"),
    ("/rev/HEAD~99", 404, "goes past the first revision"),
    ("/edit/edit-999", 404, "no edit edit-999"),
    ("/edit/bogus", 400, "invalid edit name"),
    ("/diff?a=rev-1&b=rev-999", 404, "no revision rev-999"),
    ("/diff?a=rev-1", 400, "two revisions"),
    ("/?rev=nowhere", 404, "no revision, branch or tag named"),
    ("/?n=0", 400, "n must be between"),
    ("/audit?since=yesterday", 400, "is not an ISO-8601"),
    ("/playground?prompt=hi&b=rev-999", 404, "no revision rev-999"),
    ("/rev/HEAD?page=99", 400, "page must be between"),
    ("/no/such/page", 404, "no page /no/such/page"),
])
def test_bad_names_are_error_pages(site, page, status, says):
    url, lg = site
    r = client(lg).get(page)
    assert r.status_code == status, r.text[-400:]
    d = dom(r.text)
    assert "error" in d.ids and says in r.text
    assert "Traceback" not in r.text


def _csrf(c: TestClient, page: str = "/rev/rev-2") -> str:
    html = c.get(page).text
    return re.search(r'name="csrf" value="([^"]+)"', html).group(1)


def test_writes_refused_change_nothing(site):
    url, lg = site
    before = counts(url)
    ro = client(lg)
    assert 'method="post"' not in ro.get("/rev/rev-2").text            # no write forms when read-only
    for action, form in (("tag", {"name": "t1", "rev": "rev-2"}), ("branch", {"name": "b1", "rev": "rev-2"}),
                         ("checkout", {"rev": "rev-2"}), ("revert", {"target": "rev-2"})):
        r = ro.post(f"/write/{action}", data={**form, "token": TOKEN})
        assert r.status_code == 403 and "read-only" in r.text

    rw = client(lg, allow_writes=True, token=TOKEN)
    csrf = _csrf(rw)
    form = {"name": "t1", "rev": "rev-2"}
    refused = [
        rw.post("/write/tag", data={**form, "csrf": csrf}),                                   # no token
        rw.post("/write/tag", data={**form, "csrf": csrf, "token": "wrong"}),                 # wrong token
        rw.post("/write/tag", data={**form, "token": TOKEN}),                                 # no CSRF value
        rw.post("/write/tag", data={**form, "token": TOKEN, "csrf": "forged"}),               # wrong CSRF value
        rw.post("/write/tag", data={**form, "token": TOKEN, "csrf": csrf},                    # another site's page
                headers={"origin": "http://evil.example"}),
    ]
    for r in refused:
        assert r.status_code == 403 and "refused" in r.text, r.text[-300:]
    fresh = client(lg, allow_writes=True, token=TOKEN)        # a browser without the cookie
    assert fresh.post("/write/tag", data={**form, "token": TOKEN, "csrf": csrf}).status_code == 403
    assert rw.post("/write/nothing", data={**form, "token": TOKEN, "csrf": csrf}).status_code == 404
    assert rw.get("/write/tag").status_code == 405
    assert counts(url) == before
    assert "t1" not in [r["name"] for r in lg.refs()]


def test_writes_with_token_go_through_the_library(ledger, db_url):
    """Tag, branch, checkout and revert from the page: each lands in the ledger and in the
    audit log with the actor; a bad name is a 400 page that writes nothing."""
    [fact] = parse_facts_text(json.dumps([FACT]))
    ledger.add([fact], BaftConfig(**FAST))
    c = client(ledger, allow_writes=True, token=TOKEN)
    csrf = _csrf(c, "/rev/rev-2")

    def post(action, **form):
        return c.post(f"/write/{action}", data={**form, "token": TOKEN, "csrf": csrf},
                      headers={"origin": "http://127.0.0.1:8000"})
    assert post("tag", name="release", rev="rev-2").status_code == 200
    assert post("branch", name="side", rev="rev-1").status_code == 200
    before = counts(db_url)
    bad = post("tag", name="rev-7", rev="rev-2")
    assert bad.status_code == 400 and "invalid ref name" in bad.text and counts(db_url) == before
    assert post("checkout", rev="side").status_code == 200
    assert ledger.head() == {"revision": "rev-1", "branch": "side", "detached": False}
    assert post("checkout", rev="main").status_code == 200
    r = post("revert", target="rev-2", message="not this one")
    assert r.status_code == 200 and "rev-3" in r.text
    assert ledger.active_edits() == []
    refs = {x["name"]: x["revision"] for x in ledger.refs()}
    assert refs["release"] == "rev-2" and refs["side"] == "rev-1" and refs["main"] == "rev-3"
    events = ledger.audit(actor="tester", limit=10)
    assert [e["command"] for e in events][:5] == ["revert", "checkout", "checkout", "branch", "tag"]


def test_ledger_help_loads_no_web_stack():
    code = ("import sys; from click.testing import CliRunner; from cli.main import cli; "
            "r = CliRunner().invoke(cli, ['ui', '--help']); assert r.exit_code == 0, r.output; "
            "print(sorted(m for m in ('starlette', 'jinja2', 'uvicorn', 'pygal', 'torch') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=True)
    assert out.stdout.strip() == "[]"


def test_cli_ui_serves_read_only_on_loopback(tmp_path, tiny_llama):
    url = f"sqlite:///{tmp_path / 'ledger.db'}"
    Ledger.init(url, model=str(tiny_llama), wordings=False).close()
    proc = subprocess.Popen([sys.executable, "-m", "cli.main", "ui", "--db", url, "--port", "0"], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        first, second = proc.stdout.readline(), proc.stdout.readline()
        m = re.match(r"ledger ui: (http://127\.0\.0\.1:\d+/)\s+\(read-only", first)
        assert m, first + second
        assert "bound to 127.0.0.1 only" in second
        with urlopen(m.group(1)) as r:
            assert r.status == 200 and b"rev-1" in r.read()
        # the port taken: one line, exit 2
        port = m.group(1).rsplit(":", 1)[1].strip("/")
        busy = subprocess.run([sys.executable, "-m", "cli.main", "ui", "--db", url, "--port", port], cwd=ROOT,
                              capture_output=True, text=True, timeout=60)
        assert busy.returncode == 2 and busy.stderr.startswith(f"error: cannot listen on 127.0.0.1:{port}")
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def test_library_reads_the_pages_use(site):
    """The facade functions added for the pages: a page of the active edits, an edit's tensor
    norms (their root sum of squares is the norm recorded at creation), and the evaluation
    means over the history."""
    url, lg = site
    everything = lg.active_edits("rev-4")
    assert [e.id for e in everything] == ["edit-1", "edit-2", "edit-3"]
    assert [e.id for e in lg.active_edits("rev-4", offset=1, limit=1)] == ["edit-2"]
    assert [e.id for e in lg.active_edits("rev-4", offset=2, limit=5)] == ["edit-3"]
    assert lg.active_edits("rev-4", offset=3, limit=5) == []
    tensors = lg.edit_tensors("edit-1")
    assert set(tensors) >= {"R", "W", "b", "U", "c"} and tensors["R"]["shape"] == [FAST["rank"], 64]
    total = sum(t["norm"] ** 2 for t in tensors.values()) ** 0.5
    assert total == pytest.approx(lg.edit("edit-1").stats["tensor_norm"], rel=1e-6)
    history = lg.evaluation_history()
    assert [(e.revision, e.label) for e in history] == [("rev-2", "two facts"), ("rev-3", "two facts"),
                                                        ("rev-5", NASTY_LABEL)]
    assert history[0].per_fact == [] and "reliability" in history[0].means
    assert [e.revision for e in lg.evaluation_history(limit=1)] == ["rev-5"]
    from ledger.errors import NotFoundError
    with pytest.raises(NotFoundError):
        lg.edit_tensors("edit-99")
