"""The built book as a reader's browser shows it: headless Chromium from the system's packages,
driven by Playwright (no browser download). Every page loads without console errors, its figures'
images have loaded, no glue placeholder or unresolved reference shows, every internal link resolves,
the search page finds a chapter, and nothing is wider than a phone's screen. A screenshot of each
chapter, at 1280 px and at a phone's width, goes to ``results/browser/`` (``QDIAG_BROWSER_RESULTS``).

By default the smoke book (the notebooks' defaults) is executed and rendered; ``QDIAG_BOOK_HTML``
points the test at a book already built (``book/_build/html`` after ``make book``)."""

from __future__ import annotations

import functools
import http.server
import os
import re
import shutil
import threading
from pathlib import Path
from urllib.parse import urldefrag, urljoin
from urllib.request import urlopen

import pytest

pytestmark = [pytest.mark.browser, pytest.mark.integration]

ROOT = Path(__file__).resolve().parents[1]
CHROMIUM = os.environ.get("QDIAG_CHROMIUM") or next(
    filter(None, map(shutil.which, ["chromium", "chromium-browser", "google-chrome"])), None)
PHONE = {"width": 390, "height": 844}
DESKTOP = {"width": 1280, "height": 900}
# what a reader must never see: glue that did not resolve, a raw role, Sphinx's marks for a missing reference
LEFTOVERS = re.compile(r"\{glue:|\{doc\}|\{numref\}|\{ref\}|\?\?\?|glue:text|glue:figure")


def _browser_or_skip():
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.skip("Playwright is not installed: pip install playwright (it drives the system's Chromium)")
    if not CHROMIUM:
        pytest.skip("no Chromium on this machine: install Debian's chromium package (make browser), "
                    "or set QDIAG_CHROMIUM to a Chromium or Chrome binary")
    return sync_playwright


@pytest.fixture(scope="module")
def site(request):
    """The book's HTML served on localhost (the search page fetches its index, which file:// refuses)."""
    sync_playwright = _browser_or_skip()
    given = os.environ.get("QDIAG_BOOK_HTML")
    html = Path(given) if given else request.getfixturevalue("smoke_book").html()
    if not (html / "index.html").exists():
        pytest.fail(f"no built book at {html}: run `make book` (or unset QDIAG_BOOK_HTML for the smoke book)")
    handler = functools.partial(_QuietHandler, directory=str(html))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    base = f"http://127.0.0.1:{server.server_address[1]}/"
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=[
            "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
            "--disable-component-update", "--disable-sync"])
        yield {"html": html, "base": base, "browser": browser}
        browser.close()
    server.shutdown()
    server.server_close()


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


def _pages(html: Path) -> list[str]:
    """Every page of the book, as paths relative to its root (Sphinx's own folders left out)."""
    return sorted(str(p.relative_to(html)) for p in html.rglob("*.html")
                  if not p.relative_to(html).parts[0].startswith("_"))


def _chapters(html: Path) -> list[str]:
    return [p for p in _pages(html) if p.startswith("notebooks/")]


def _open(browser, url: str, viewport: dict, base: str):
    """A page loaded with its console errors, page errors and failed local requests collected.
    Requests that leave the machine (MathJax's CDN, launch buttons' services) are refused, as offline."""
    page = browser.new_page(viewport=viewport)
    problems: list[str] = []
    # a refused external request logs a console error located at that request: not the book's
    page.on("console", lambda m: problems.append(f"console error: {m.text} ({m.location.get('url')})")
            if m.type == "error" and (m.location.get("url") or base).startswith(base) else None)
    page.on("pageerror", lambda e: problems.append(f"page error: {e}"))
    page.on("requestfailed", lambda r: problems.append(f"failed: {r.url}") if r.url.startswith(base) else None)
    external: list[str] = []

    def route(r):
        if r.request.url.startswith(base):
            r.continue_()
        else:
            external.append(r.request.url)
            r.abort()

    page.route("**/*", route)
    page.goto(url, wait_until="load")
    page.wait_for_load_state("networkidle")
    return page, problems, external


def test_every_page_loads_cleanly_with_its_figures(site):
    html, base = site["html"], site["base"]
    pages = _pages(html)
    assert len(pages) >= 10, pages
    figures = 0
    for rel in pages:
        page, problems, _ = _open(site["browser"], base + rel, DESKTOP, base)
        assert not problems, f"{rel}: {problems}"
        broken = page.eval_on_selector_all("img", "imgs => imgs.filter(i => !(i.complete && i.naturalWidth > 0))"
                                                  ".map(i => i.getAttribute('src'))")
        assert not broken, f"{rel}: images that did not load: {broken}"
        figures += page.eval_on_selector_all("main img", "imgs => imgs.length")
        text = page.inner_text("main")
        left = LEFTOVERS.findall(text)
        assert not left, f"{rel}: unresolved markup in the text: {sorted(set(left))}"
        page.close()
    assert figures >= len(_chapters(html)), "every chapter has at least one figure"
    print(f"{len(pages)} pages, {figures} figures loaded")


def test_every_internal_link_resolves(site):
    html, base = site["html"], site["base"]
    ids: dict[str, set[str]] = {}

    def anchors(url: str) -> set[str]:
        if url not in ids:
            with urlopen(url) as r:  # raises for a missing page (404)
                body = r.read().decode("utf-8", "replace")
            ids[url] = set(re.findall(r'\bid="([^"]+)"', body)) | set(re.findall(r'\bname="([^"]+)"', body))
        return ids[url]

    links, bad = 0, []
    for rel in _pages(html):
        body = (html / rel).read_text()
        for href in re.findall(r'<a\b[^>]*\bhref="([^"]*)"', body):
            target = urljoin(base + rel, href.replace("&amp;", "&"))
            if not target.startswith(base):
                continue
            links += 1
            page_url, frag = urldefrag(target)
            try:
                found = anchors(page_url) if page_url.endswith(".html") or page_url.endswith("/") else None
                if found is None:
                    urlopen(page_url).close()  # a download: it must exist
                elif frag and frag not in found:
                    bad.append(f"{rel}: {href} (no #{frag} there)")
            except OSError as e:
                bad.append(f"{rel}: {href} ({e})")
    assert links > 50
    assert not bad, "\n".join(bad[:20])
    print(f"{links} internal links resolve")


def test_search_finds_a_chapter(site):
    page, problems, _ = _open(site["browser"], site["base"] + "search.html?q=perplexity", DESKTOP, site["base"])
    page.wait_for_selector("ul.search li a", timeout=30_000)
    hits = page.eval_on_selector_all("ul.search li a", "as => as.map(a => a.getAttribute('href'))")
    assert any("01_cliff" in h for h in hits), hits
    assert not problems, problems


def test_pages_fit_a_phone_and_chapters_are_captured(site):
    html, base = site["html"], site["base"]
    shots = Path(os.environ.get("QDIAG_BROWSER_RESULTS") or ROOT / "results" / "browser")
    shots.mkdir(parents=True, exist_ok=True)
    for rel in _pages(html):
        page, _, _ = _open(site["browser"], base + rel, PHONE, base)
        width = page.evaluate("() => [document.documentElement.scrollWidth, window.innerWidth]")
        assert width[0] <= width[1] + 1, f"{rel} is {width[0]} px wide on a {width[1]} px screen"
        if rel.startswith("notebooks/"):
            name = Path(rel).stem
            page.screenshot(path=str(shots / f"{name}-phone.png"))
            wide, _, _ = _open(site["browser"], base + rel, DESKTOP, base)
            wide.screenshot(path=str(shots / f"{name}.png"), full_page=True)
            wide.close()
        page.close()
    assert len(list(shots.glob("*-phone.png"))) >= len(_chapters(html))
