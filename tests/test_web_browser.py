"""`ledger ui` in a real headless Chromium (Debian's `chromium`): the command serves a ledger
with edits, evaluations, a branch and a revert; the browser loads the history, a revision, a
diff, the metrics and the playground; the test reads the DOM Chromium built and takes a
screenshot of each page.

Screenshots go to the test's temporary directory, or to $LEDGER_SCREENSHOTS when set (the
README's images: `LEDGER_SCREENSHOTS=docs/screenshots`). $LEDGER_UI_DB serves that ledger
instead of building the tiny one (the README's images come from a SmolLM2 ledger).

Without a `chromium` on PATH the test skips, saying so; under CI=true it fails instead
(.ci/run installs Chromium first)."""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from html.parser import HTMLParser
from pathlib import Path
from urllib.parse import quote

import pytest

ROOT = Path(__file__).resolve().parents[1]
CHROMIUM = next((p for p in (shutil.which(n) for n in ("chromium", "chromium-browser")) if p), None)

pytestmark = pytest.mark.skipif(
    CHROMIUM is None and os.environ.get("CI", "").lower() != "true",
    reason="no `chromium` on PATH (apt-get install chromium; .ci/run installs it)")
pytest.importorskip("starlette", reason="the web extra is not installed (pip install -e '.[web]')")


class Dom(HTMLParser):
    """What the test checks of a page: element ids, classes counted, and each table's rows."""

    def __init__(self):
        super().__init__()
        self.ids: set[str] = set()
        self.classes: dict[str, int] = {}
        self.rows: dict[str, int] = {}
        self._table: list[str] = []
        self.text: list[str] = []

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if a.get("id"):
            self.ids.add(a["id"])
        for c in (a.get("class") or "").split():
            self.classes[c] = self.classes.get(c, 0) + 1
        if tag == "table":
            self._table.append(a.get("id") or "")
        if tag == "tr" and self._table and self._table[-1]:
            self.rows[self._table[-1]] = self.rows.get(self._table[-1], 0) + 1

    def handle_endtag(self, tag):
        if tag == "table" and self._table:
            self._table.pop()

    def handle_data(self, data):
        self.text.append(data)


def chromium(*args: str, profile: Path) -> subprocess.CompletedProcess:
    assert CHROMIUM, "CI=true needs chromium on PATH"
    flags = ["--headless", "--disable-gpu", "--hide-scrollbars", "--no-first-run", "--disable-extensions",
             "--disable-background-networking", "--disable-component-update", "--disable-sync",
             f"--user-data-dir={profile}", "--window-size=1280,900"]
    if hasattr(os, "geteuid") and os.geteuid() == 0:
        flags.append("--no-sandbox")          # Chromium refuses to run its sandbox as root
    return subprocess.run([CHROMIUM, *flags, *args], capture_output=True, text=True, timeout=120)


def load(url: str, profile: Path) -> Dom:
    out = chromium("--dump-dom", url, profile=profile)
    assert out.returncode == 0 and "<html" in out.stdout, out.stderr[-2000:]
    d = Dom()
    d.feed(out.stdout)
    return d


def screenshot(url: str, path: Path, profile: Path) -> None:
    out = chromium(f"--screenshot={path}", url, profile=profile)
    assert out.returncode == 0 and path.is_file(), out.stderr[-2000:]
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000, f"{path} looks empty ({len(data)} bytes)"


def tiny_ledger(url: str, model: Path) -> dict:
    """The ledger the pages show: three edits, two evaluations, a branch, a tag, a revert.
    Returns what the pages are asked for."""
    from ledger import BaftConfig, Ledger, parse_facts_text
    from support import FACT, FACT2, FACT3, FAST
    with Ledger.init(url, model=str(model), wordings=False, author="tester") as lg:
        facts = parse_facts_text(json.dumps([FACT, FACT2, FACT3]))
        for f in facts:
            lg.add([f], BaftConfig(**FAST))
        lg.evaluate(facts, "rev-2", generation=False, label="three facts")
        lg.evaluate(facts, "rev-4", generation=False, label="three facts")
        lg.branch("experiment", "rev-2")
        lg.tag("v1", "rev-3")
        lg.revert("rev-3", message="undo the Carol edit")
        lg.evaluate(facts, "HEAD", generation=False, label="three facts")
    return {"diff": ("rev-1", "HEAD"), "revision": "rev-4", "prompt": FACT["prompt"], "edit": "edit-1"}


def test_pages_in_chromium(tmp_path, tiny_llama):
    shots = Path(os.environ.get("LEDGER_SCREENSHOTS") or tmp_path / "shots")
    shots.mkdir(parents=True, exist_ok=True)
    url = os.environ.get("LEDGER_UI_DB")
    if url:
        from ledger import Ledger
        with Ledger.open(url) as lg:
            head = lg.head()["revision"]
            first_edit = next((r.added[0] for r in reversed(lg.log("HEAD", 200)) if r.added), None)
            ask = {"diff": ("rev-1", "HEAD"), "revision": head, "edit": first_edit,
                   "prompt": os.environ.get("LEDGER_UI_PROMPT", "The mother tongue of Danielle Darrieux is")}
    else:
        url = f"sqlite:///{tmp_path / 'ledger.db'}"
        ask = tiny_ledger(url, tiny_llama)
    profile = Path(tempfile.mkdtemp(prefix="chromium-", dir=tmp_path))
    env = {**os.environ, "TQDM_DISABLE": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "cli.main", "ui", "--db", url, "--port", "0"], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        line = proc.stdout.readline()
        m = re.match(r"ledger ui: (http://127\.0\.0\.1:\d+)/", line)
        assert m, line + (proc.stdout.read() if proc.poll() is not None else "")
        base = m.group(1)

        history = load(base + "/", profile)
        assert {"history", "head"} <= history.ids
        assert history.rows["history"] >= 2                  # header row + revisions
        assert history.classes.get("ref", 0) >= 2           # branch and tag labels
        screenshot(base + "/", shots / "history.png", profile)

        a, b = ask["diff"]
        diff_url = f"{base}/diff?a={quote(a)}&b={quote(b)}"
        diff = load(diff_url, profile)
        assert {"added", "layers"} <= diff.ids and diff.rows["added"] >= 2 and diff.rows["layers"] >= 2
        screenshot(diff_url, shots / "diff.png", profile)

        rev_url = f"{base}/rev/{quote(ask['revision'], safe='')}"
        rev = load(rev_url, profile)
        assert {"changes", "active"} <= rev.ids
        screenshot(rev_url, shots / "revision.png", profile)

        if ask["edit"]:
            edit = load(f"{base}/edit/{ask['edit']}", profile)
            assert {"fact", "tensors"} <= edit.ids and edit.rows["tensors"] >= 5

        metrics = load(base + "/metrics", profile)
        assert metrics.classes.get("pygal-chart", 0) >= 1
        screenshot(base + "/metrics", shots / "metrics.png", profile)

        play_url = f"{base}/playground?prompt={quote(ask['prompt'])}&n=12"
        play = load(play_url, profile)
        assert {"side-1", "side-2"} <= play.ids
        assert play.classes.get("completion", 0) == 2
        assert play.classes.get("tok", 0) > 2                # the explain heatmap, one span per token
        assert sum(n for c, n in play.classes.items() if re.fullmatch(r"heat-[1-9]", c)) >= 1   # an edit fires
        screenshot(play_url, shots / "playground.png", profile)
    finally:
        proc.terminate()
        proc.wait(timeout=30)
