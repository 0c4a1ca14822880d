"""gateway.static: the player shell's hashed names, caching headers, gzip and budgets.

Unit tests load the shell (the real one, or a copy changed in a temp dir) and
call `StaticSite.respond` with the headers a browser sends; the last tests ask
a real worker over HTTP, so the budgets and headers are checked on the bytes
players get.
"""

from __future__ import annotations

import base64
import gzip
import hashlib
import re
import shutil
from html.parser import HTMLParser
from pathlib import Path

import pytest
from websockets.datastructures import Headers

from gateway.static import (
    HASHED_CACHE_CONTROL,
    HTML_CACHE_CONTROL,
    HTML_MAX_BYTES,
    HTML_MAX_GZIP_BYTES,
    SCRIPT_MAX_BYTES,
    SHELL_DIR,
    StaticSite,
    accepts_gzip,
    etag_matches,
    hashed_name,
)
from tests.conftest import http_get

HASHED_SCRIPT = re.compile(r"/static/app\.[0-9a-f]{16}\.js")


@pytest.fixture(scope="module")
def site() -> StaticSite:
    return StaticSite.load()


def _copy_shell(tmp_path: Path) -> Path:
    shell = tmp_path / "shell"
    shutil.copytree(SHELL_DIR, shell)
    return shell


def _get(site: StaticSite, path: str, **headers: str):
    return site.respond(path, Headers([(k.replace("_", "-"), v) for k, v in headers.items()]))


class _InlineScripts(HTMLParser):
    """The text of every <script> without src, as a browser's parser sees it."""

    def __init__(self, html: str) -> None:
        super().__init__()
        self.scripts: list[str] = []
        self._inside = False
        self.feed(html)
        self.close()

    def handle_starttag(self, tag, attrs) -> None:
        if tag == "script" and "src" not in dict(attrs):
            self._inside = True
            self.scripts.append("")

    def handle_endtag(self, tag) -> None:
        if tag == "script":
            self._inside = False

    def handle_data(self, data) -> None:
        if self._inside:
            self.scripts[-1] += data


def _script_src(csp: str) -> list[str]:
    directives = dict(d.strip().split(" ", 1) for d in csp.split(";"))
    return directives["script-src"].split()


def _sha256(script: str) -> str:
    return "'sha256-" + base64.b64encode(hashlib.sha256(script.encode()).digest()).decode() + "'"


# -- names --------------------------------------------------------------------


def test_html_refers_to_the_hashed_script(site) -> None:
    url = site.urls["app.js"]
    assert HASHED_SCRIPT.fullmatch(url), url
    html = site.index.body.decode()
    assert f'<script type="module" src="{url}"></script>' in html
    assert "/static/app.js" not in html


def test_a_change_to_the_script_changes_its_url(site, tmp_path) -> None:
    shell = _copy_shell(tmp_path)
    assert StaticSite.load(shell).urls == site.urls  # same bytes, same name
    with (shell / "app.js").open("a") as f:
        f.write("\n// changed\n")
    changed = StaticSite.load(shell)
    assert changed.urls["app.js"] != site.urls["app.js"]
    assert changed.urls["app.js"] in changed.index.body.decode()
    assert _get(changed, site.urls["app.js"]).status_code == 404  # the old name is gone
    assert changed.index.etag != site.index.etag  # the page changed with it


def test_hashed_name_keeps_the_extension() -> None:
    assert re.fullmatch(r"app\.[0-9a-f]{16}\.js", hashed_name("app.js", b"x"))
    assert hashed_name("app.js", b"x") != hashed_name("app.js", b"y")


def test_html_referring_to_a_missing_asset_stops_the_load(tmp_path) -> None:
    shell = _copy_shell(tmp_path)
    (shell / "index.html").write_text('<script src="/static/nope.js"></script>')
    with pytest.raises(ValueError, match=r"nope\.js"):
        StaticSite.load(shell)


# -- the inline bootstrap and the CSP ------------------------------------------------


def test_csp_allows_exactly_the_inline_bootstrap_by_its_hash(site) -> None:
    scripts = _InlineScripts(site.index.body.decode()).scripts
    assert len(scripts) == 1  # the bootstrap that opens the WebSocket early
    assert "new WebSocket(" in scripts[0] and "__ogEarly" in scripts[0]
    csp = _get(site, "/").headers["Content-Security-Policy"]
    assert _script_src(csp) == ["'self'", _sha256(scripts[0])]
    assert "unsafe-inline" not in " ".join(_script_src(csp))
    assert "unsafe-eval" not in csp


def test_a_change_to_the_bootstrap_changes_its_hash_in_the_csp(site, tmp_path) -> None:
    shell = _copy_shell(tmp_path)
    index = shell / "index.html"
    index.write_text(index.read_text().replace("(() => {", "(() => { // changed", 1))
    changed = StaticSite.load(shell)
    [script] = _InlineScripts(changed.index.body.decode()).scripts
    assert "// changed" in script
    old = _get(site, "/").headers["Content-Security-Policy"]
    new = _get(changed, "/").headers["Content-Security-Policy"]
    assert _script_src(new) == ["'self'", _sha256(script)]
    assert _script_src(new) != _script_src(old)


def test_no_inline_script_no_hash_and_crlf_hashed_as_the_browser_does(tmp_path) -> None:
    shell = _copy_shell(tmp_path)
    index = shell / "index.html"
    index.write_text('<script type="module" src="/static/app.js"></script>')
    csp = _get(StaticSite.load(shell), "/").headers["Content-Security-Policy"]
    assert _script_src(csp) == ["'self'"]
    # The HTML parser turns CRLF into LF before the browser hashes a script.
    index.write_bytes(b"<script>\r\nlet a = 1;\r\n</script>")
    csp = _get(StaticSite.load(shell), "/").headers["Content-Security-Policy"]
    assert _script_src(csp) == ["'self'", _sha256("\nlet a = 1;\n")]


def test_csp_lets_the_page_connect_to_the_regions_it_is_given() -> None:
    """The shell's ?regions= reaches other origins only where the operator allows it."""
    regions = StaticSite.load(connect_origins=("ws://127.0.0.1:8001", "wss://eu.example.com"))
    csp = _get(regions, "/").headers["Content-Security-Policy"]
    assert "connect-src 'self' ws://127.0.0.1:8001 wss://eu.example.com;" in csp
    assert "connect-src 'self';" in _get(StaticSite.load(), "/").headers["Content-Security-Policy"]


# -- responses ------------------------------------------------------------------


def test_page_is_revalidated_on_every_load(site) -> None:
    resp = _get(site, "/")
    assert resp.status_code == 200
    assert resp.headers["Cache-Control"] == HTML_CACHE_CONTROL
    assert resp.headers["Content-Type"] == "text/html; charset=utf-8"
    assert "connect-src 'self'" in resp.headers["Content-Security-Policy"]
    assert resp.body == site.index.body
    again = _get(site, "/", If_None_Match=resp.headers["ETag"])
    assert again.status_code == 304
    assert again.body == b""
    assert "Content-Length" not in again.headers
    assert again.headers["ETag"] == resp.headers["ETag"]


def test_hashed_script_is_immutable(site) -> None:
    resp = _get(site, site.urls["app.js"])
    assert resp.status_code == 200
    assert resp.headers["Cache-Control"] == HASHED_CACHE_CONTROL
    assert resp.headers["Content-Type"] == "text/javascript; charset=utf-8"
    assert resp.headers["X-Content-Type-Options"] == "nosniff"
    assert resp.body == (SHELL_DIR / "app.js").read_bytes()
    assert _get(site, site.urls["app.js"], If_None_Match=resp.headers["ETag"]).status_code == 304


@pytest.mark.parametrize("path", ["/", "script"])
def test_gzip_when_accepted(site, path) -> None:
    path = site.urls["app.js"] if path == "script" else path
    plain = _get(site, path)
    packed = _get(site, path, Accept_Encoding="gzip, deflate, br")
    assert "Content-Encoding" not in plain.headers
    assert packed.headers["Content-Encoding"] == "gzip"
    assert packed.headers["Vary"] == plain.headers["Vary"] == "Accept-Encoding"
    assert gzip.decompress(packed.body) == plain.body
    assert int(packed.headers["Content-Length"]) == len(packed.body) < len(plain.body)
    assert packed.headers["ETag"] != plain.headers["ETag"]  # two representations
    # A browser holding either copy revalidates to a 304.
    for tag in (plain.headers["ETag"], packed.headers["ETag"], "W/" + plain.headers["ETag"]):
        cond = _get(site, path, Accept_Encoding="gzip", If_None_Match=f'"other", {tag}')
        assert cond.status_code == 304


def test_unknown_names_are_404(site) -> None:
    for path in ("/static/app.js", "/static/app.0000000000000000.js", "/static/",
                 "/static/../server.py", "/index.html", "/nope"):
        resp = _get(site, path)
        assert resp.status_code == 404, path
    assert _get(site, "/static/app.js").headers["Cache-Control"] == "no-store"


@pytest.mark.parametrize(
    ("header", "ok"),
    [
        ("gzip", True),
        ("br, gzip;q=0.5", True),
        ("GZIP", True),
        ("x-gzip", True),
        ("*", True),
        ("deflate, br", False),
        ("gzip;q=0", False),
        ("gzip;q=0.000, *", False),
        ("*;q=0", False),
        ("identity", False),
        ("", False),
    ],
)
def test_accept_encoding(header, ok) -> None:
    assert accepts_gzip([header]) is ok


def test_if_none_match() -> None:
    assert etag_matches(['"a", "b"'], ['"b"'])
    assert etag_matches(['W/"b"'], ['"b"'])
    assert etag_matches(["*"], ['"b"'])
    assert not etag_matches(['"c"'], ['"b"'])
    assert not etag_matches([], ['"b"'])


# -- budgets, on what a real worker serves ---------------------------------------------


def test_worker_serves_the_shell_within_budget(worker) -> None:
    status, headers, html = http_get(worker.http + "/?token=x&topics=odds:1:39:1")
    assert status == 200
    assert headers["Cache-Control"] == HTML_CACHE_CONTROL
    assert len(html) <= HTML_MAX_BYTES
    status, headers, packed = http_get(worker.http + "/", {"Accept-Encoding": "gzip"})
    assert headers["Content-Encoding"] == "gzip"
    assert len(packed) <= HTML_MAX_GZIP_BYTES
    assert gzip.decompress(packed) == html
    [bootstrap] = _InlineScripts(html.decode()).scripts
    assert _script_src(headers["Content-Security-Policy"]) == ["'self'", _sha256(bootstrap)]

    match = HASHED_SCRIPT.search(html.decode())
    assert match, html[:500]
    status, headers, script = http_get(worker.http + match.group(0))
    assert status == 200
    assert headers["Cache-Control"] == HASHED_CACHE_CONTROL
    assert headers["ETag"]
    assert len(script) <= SCRIPT_MAX_BYTES
    assert script.startswith(b"// The oddsgate player shell")
    status, _, _ = http_get(worker.http + match.group(0), {"If-None-Match": headers["ETag"]})
    assert status == 304
    assert http_get(worker.http + "/static/app.js")[0] == 404


# -- the partner dashboard (/partner/, issue 12) ------------------------------------------

HASHED_PARTNER = re.compile(r"/static/partner\.[0-9a-f]{16}\.js")


def test_partner_page_refers_to_its_hashed_module_which_imports_the_hashed_client(site) -> None:
    page = _get(site, "/partner/")
    assert page.status_code == 200
    assert page.headers["Cache-Control"] == HTML_CACHE_CONTROL
    html = page.body.decode()
    url = site.urls["partner.js"]
    assert HASHED_PARTNER.fullmatch(url)
    assert f'<script type="module" src="{url}"></script>' in html
    # No inline script: the CSP allows its own origin's scripts only.
    assert _InlineScripts(html).scripts == []
    assert _script_src(page.headers["Content-Security-Policy"]) == ["'self'"]
    assert "connect-src 'self'" in page.headers["Content-Security-Policy"]
    module = _get(site, url)
    assert module.headers["Cache-Control"] == HASHED_CACHE_CONTROL
    source = (SHELL_DIR / "partner.js").read_text()
    # The one shared client: the import names app.js's hashed URL, nothing else changes.
    assert module.body.decode() == source.replace('from "/static/app.js"',
                                                  f'from "{site.urls["app.js"]}"')
    assert 'from "/static/app.js"' in source


def test_a_change_to_the_shared_client_renames_the_dashboard_module(site, tmp_path) -> None:
    """An immutable partner.js must never import a client other than the one it was
    hashed with: the import is part of its bytes, so a new app.js renames it."""
    shell = _copy_shell(tmp_path)
    with (shell / "app.js").open("a") as f:
        f.write("\n// changed\n")
    changed = StaticSite.load(shell)
    assert changed.urls["partner.js"] != site.urls["partner.js"]
    assert changed.urls["partner.js"] in _get(changed, "/partner/").body.decode()
    assert changed.urls["app.js"] in _get(changed, changed.urls["partner.js"]).body.decode()
    # The shell's own page is untouched by the dashboard's module changing.
    with (shell / "partner.js").open("a") as f:
        f.write("\n// changed\n")
    again = StaticSite.load(shell)
    assert again.urls["app.js"] == changed.urls["app.js"]
    assert again.index.etag == changed.index.etag


def test_imports_of_missing_modules_or_cycles_stop_the_load(tmp_path) -> None:
    shell = _copy_shell(tmp_path)
    (shell / "extra.js").write_text('import { x } from "/static/nope.js";\n')
    with pytest.raises(ValueError, match=r"extra\.js refers to /static/nope\.js"):
        StaticSite.load(shell)
    (shell / "extra.js").write_text('import "/static/other.js";\n')
    (shell / "other.js").write_text('export { y } from "/static/extra.js";\n')
    with pytest.raises(ValueError, match="cycle"):
        StaticSite.load(shell)


def test_pages_and_unknown_paths(site) -> None:
    assert _get(site, "/partner/").body == site.pages["/partner/"].body
    for path in ("/partner", "/partner/index.html", "/static/partner.js", "/partner.html"):
        assert _get(site, path).status_code == 404, path


def test_worker_serves_the_partner_dashboard_within_budget(worker) -> None:
    status, headers, html = http_get(worker.http + "/partner/?token=x")
    assert status == 200
    assert headers["Cache-Control"] == HTML_CACHE_CONTROL
    assert _script_src(headers["Content-Security-Policy"]) == ["'self'"]
    assert len(html) <= HTML_MAX_BYTES
    status, headers, packed = http_get(worker.http + "/partner/", {"Accept-Encoding": "gzip"})
    assert headers["Content-Encoding"] == "gzip"
    assert len(packed) <= HTML_MAX_GZIP_BYTES
    assert gzip.decompress(packed) == html

    match = HASHED_PARTNER.search(html.decode())
    assert match, html[:500]
    status, module_headers, module = http_get(worker.http + match.group(0))
    assert status == 200
    assert module_headers["Cache-Control"] == HASHED_CACHE_CONTROL
    assert module.startswith(b"// The oddsgate partner dashboard")
    imported = HASHED_SCRIPT.search(module.decode())
    assert imported, "partner.js imports the hashed client"
    status, headers, client = http_get(worker.http + imported.group(0))
    assert status == 200 and headers["Cache-Control"] == HASHED_CACHE_CONTROL
    # Both scripts together within the one script budget of the shell.
    assert len(module) + len(client) <= SCRIPT_MAX_BYTES
    status, _, _ = http_get(worker.http + match.group(0),
                            {"If-None-Match": module_headers["ETag"]})
    assert status == 304
