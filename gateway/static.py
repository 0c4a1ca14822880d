"""The player shell and the partner dashboard over HTTP (PROTOCOL.md §6).

`GET /` is the player shell (`index.html`), `GET /partner/` the partner
dashboard (`partner.html`, issue 12), and `GET /static/<hashed name>` their
assets. The directory (`gateway/shell/`) is read once, when the worker starts,
and every response is prepared then: each asset is named by a hash of its
content (`app.js` is served as `app.<hash>.js`), the pages are rewritten to
refer to those names, and gzip bodies and ETags are computed. A request costs
a dict lookup and a few headers.

The two pages share one protocol client: the dashboard's module imports the
shell's (`import ... from "/static/app.js"`). Such an import is rewritten to
the hashed name like a page's reference, so the importing module's own hash
covers what it imports: a new app.js gives partner.js a new name too, and an
immutable cached partner.js can never load against a stale client. Assets
are therefore hashed in import order (a cycle is refused at load).

Caching: a hashed asset never changes under its name, so it is served
`public, max-age=31536000, immutable` and a browser never asks for it again; a
change to the script changes its URL. The HTML is `no-cache`: revalidated on
every visit (a 304 when its ETag still matches), so a deploy reaches players on
their next load. Unknown names are 404, never a fallback to another version.

The page's Content-Security-Policy allows scripts of its own origin, plus the
inline scripts of index.html (the bootstrap that opens the WebSocket while the
script loads) by their sha256, taken from the HTML as served: an edit to the
bootstrap changes its hash with it, never silently breaks the page. It lets the
page connect to its own origin, plus the other regions' frontends the operator
names (OG_SHELL_CONNECT_SRC), for the shell's `?regions=`: a link naming any
other server cannot make a player's page show that server's odds.

A worker answers plain HTTP inside the WebSocket handshake, one request per
connection (`Connection: close`), GET and HEAD only (README: "HTTP on a
worker"); that suits a page of two files.
"""

from __future__ import annotations

import base64
import email.utils
import gzip
import hashlib
import http
import re
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from websockets.datastructures import Headers
from websockets.http11 import Response

from gateway.http import response

SHELL_DIR = Path(__file__).with_name("shell")
INDEX = "index.html"
PARTNER_PAGE = "partner.html"
# URL path -> the page's file in the directory. Every other file is a hashed asset.
PAGES = {"/": INDEX, "/partner/": PARTNER_PAGE}
STATIC_PREFIX = "/static/"

# The shell's budgets (issue 6): first paint on a mobile network. Tests assert them
# on what a worker serves.
HTML_MAX_BYTES = 50 * 1024
HTML_MAX_GZIP_BYTES = 14 * 1024
SCRIPT_MAX_BYTES = 200 * 1024

HASHED_CACHE_CONTROL = "public, max-age=31536000, immutable"
HTML_CACHE_CONTROL = "no-cache"
HASH_HEX_DIGITS = 16

CONTENT_TYPES = {
    ".html": "text/html; charset=utf-8",
    ".js": "text/javascript; charset=utf-8",
    ".mjs": "text/javascript; charset=utf-8",
    ".css": "text/css; charset=utf-8",
    ".svg": "image/svg+xml",
    ".json": "application/json",
    ".png": "image/png",
    ".ico": "image/x-icon",
    ".woff2": "font/woff2",
}
COMPRESSIBLE = frozenset({".html", ".js", ".mjs", ".css", ".svg", ".json"})

# The page talks to its own origin ('self' covers ws:/wss: of the same host) and to
# the other regions' frontends it is configured with (OG_SHELL_CONNECT_SRC, checked as
# ws/wss origins by gateway.config.ws_origins). No frame-ancestors: operators embed it
# in iframes. Scripts: its own origin, and the inline scripts of index.html (the
# bootstrap that opens the WebSocket early) by the hashes of what is served, computed
# at load time.
CSP_TEMPLATE = (
    "default-src 'none'; script-src 'self'{inline}; style-src 'self' 'unsafe-inline'; "
    "connect-src 'self'{connect}; img-src 'self' data:; base-uri 'none'; form-action 'none'"
)
REFERRER_POLICY = ("Referrer-Policy", "no-referrer")  # the page URL may carry ?token=

# An inline script of index.html: a <script> without src, and its text.
_INLINE_SCRIPT = re.compile(r"<script\b(?![^>]*\bsrc=)[^>]*>(.*?)</script>",
                            re.DOTALL | re.IGNORECASE)

# A reference to an asset in a page: /static/<source name>.
_STATIC_REF = re.compile(r"/static/([A-Za-z0-9_][A-Za-z0-9_.\-]*)")
# A static import in a module: `from "/static/<name>"` (or `import "/static/<name>"`).
_MODULE_IMPORT = re.compile(
    r"""(\b(?:from|import)\s*)(["'])/static/([A-Za-z0-9_][A-Za-z0-9_.\-]*)\2""")
MODULE_SUFFIXES = frozenset({".js", ".mjs"})


def content_hash(body: bytes) -> str:
    """The hex digest that names `body` (sha256, truncated)."""
    return hashlib.sha256(body).hexdigest()[:HASH_HEX_DIGITS]


def hashed_name(name: str, body: bytes) -> str:
    """`app.js` -> `app.<hash>.js`: the name changes whenever the content does."""
    stem, dot, ext = name.partition(".")
    return f"{stem}.{content_hash(body)}{dot}{ext}"


def script_hash(source: str) -> str:
    """The CSP source expression allowing one inline script: `'sha256-<base64>'` of its
    text as the browser hashes it (UTF-8, after the HTML parser's newline normalisation)."""
    text = source.replace("\r\n", "\n").replace("\r", "\n")
    digest = base64.b64encode(hashlib.sha256(text.encode()).digest()).decode()
    return f"'sha256-{digest}'"


def security_headers(html: str,
                     connect_origins: Iterable[str] = ()) -> tuple[tuple[str, str], ...]:
    """The page's CSP and Referrer-Policy, allowing exactly the inline scripts of `html`,
    and WebSockets to its own origin and `connect_origins` (already checked origins)."""
    inline = "".join(f" {script_hash(m.group(1))}" for m in _INLINE_SCRIPT.finditer(html))
    connect = "".join(f" {origin}" for origin in connect_origins)
    csp = CSP_TEMPLATE.format(inline=inline, connect=connect)
    return (("Content-Security-Policy", csp), REFERRER_POLICY)


def accepts_gzip(values: Iterable[str]) -> bool:
    """Whether the Accept-Encoding header(s) allow gzip (RFC 9110 §12.5.3).

    `gzip` (or `x-gzip`) with a non-zero q, or `*` with a non-zero q when gzip
    is not named; `gzip;q=0` refuses it whatever `*` says.
    """
    star = False
    for value in values:
        for part in value.split(","):
            coding, _, params = part.partition(";")
            coding = coding.strip().lower()
            q = 1.0
            for param in params.split(";"):
                key, _, raw = param.partition("=")
                if key.strip().lower() == "q":
                    try:
                        q = float(raw.strip())
                    except ValueError:
                        q = 0.0
            if coding in ("gzip", "x-gzip"):
                return q > 0
            if coding == "*":
                star = q > 0
    return star


def etag_matches(values: Iterable[str], etags: Iterable[str]) -> bool:
    """If-None-Match against our tags, with the weak comparison RFC 9110 §13.1.2 asks."""
    ours = {tag.removeprefix("W/") for tag in etags}
    for value in values:
        for candidate in value.split(","):
            candidate = candidate.strip()
            if candidate == "*" or candidate.removeprefix("W/") in ours:
                return True
    return False


@dataclass(frozen=True, slots=True)
class Asset:
    """One served file, with everything its responses need, computed once."""

    name: str  # the URL path it is served at
    body: bytes
    gzipped: bytes | None  # None when gzip would not make it smaller
    content_type: str
    cache_control: str
    etag: str  # of `body`; the gzip body's is `etag` with "-gz" inside the quotes
    extra_headers: tuple[tuple[str, str], ...] = ()

    @classmethod
    def build(cls, name: str, body: bytes, suffix: str, cache_control: str,
              extra_headers: tuple[tuple[str, str], ...] = ()) -> Asset:
        gzipped = None
        if suffix in COMPRESSIBLE:
            packed = gzip.compress(body, compresslevel=9, mtime=0)
            if len(packed) < len(body):
                gzipped = packed
        return cls(
            name=name,
            body=body,
            gzipped=gzipped,
            content_type=CONTENT_TYPES.get(suffix, "application/octet-stream"),
            cache_control=cache_control,
            etag=f'"{content_hash(body)}"',
            extra_headers=extra_headers,
        )

    @property
    def gzip_etag(self) -> str:
        return self.etag[:-1] + '-gz"'

    def respond(self, headers: Headers) -> Response:
        """200 (gzip when accepted) or 304 when the client's copy is current."""
        use_gzip = self.gzipped is not None and accepts_gzip(headers.get_all("Accept-Encoding"))
        etag = self.gzip_etag if use_gzip else self.etag
        common = [("Cache-Control", self.cache_control), ("ETag", etag)]
        if self.gzipped is not None:
            common.append(("Vary", "Accept-Encoding"))
        if etag_matches(headers.get_all("If-None-Match"), (self.etag, self.gzip_etag)):
            return _not_modified(common)
        body = self.gzipped if use_gzip else self.body
        assert body is not None
        extra = [*common, ("X-Content-Type-Options", "nosniff"), *self.extra_headers]
        if use_gzip:
            extra.append(("Content-Encoding", "gzip"))
        return response(200, body, self.content_type, extra)


def _not_modified(headers: list[tuple[str, str]]) -> Response:
    # Built by hand: a 304 carries no body and no Content-Length (RFC 9110 §15.4.5).
    status = http.HTTPStatus.NOT_MODIFIED
    all_headers = Headers([("Date", email.utils.formatdate(usegmt=True)),
                           ("Connection", "close"), *headers])
    return Response(status.value, status.phrase, all_headers, b"")


class StaticSite:
    """The pages as a worker serves them (`/`, `/partner/`) and the hashed assets
    under `/static/`."""

    def __init__(self, index: Asset, assets: dict[str, Asset], urls: dict[str, str],
                 pages: dict[str, Asset] | None = None) -> None:
        self.index = index  # the player shell, `/`
        self.pages = pages if pages is not None else {"/": index}  # URL path -> page
        self.assets = assets  # hashed name -> asset
        self.urls = urls  # source name -> URL path, e.g. "app.js" -> "/static/app.<hash>.js"

    @classmethod
    def load(cls, directory: Path = SHELL_DIR,
             connect_origins: Iterable[str] = ()) -> StaticSite:
        """Read the pages and assets, hash the assets and rewrite every reference to
        their names; `connect_origins` are the other regions' frontends the pages may
        connect to.

        Raises ValueError when a page or a module refers to a /static/ file the
        directory lacks, or modules import each other in a cycle (a broken page
        must stop the worker at start, not be served), and OSError when the
        directory cannot be read. A page other than index.html may be absent.
        """
        sources: dict[str, Path] = {}
        for path in sorted(directory.iterdir()):
            if path.name in PAGES.values() or not path.is_file() or path.name.startswith("."):
                continue
            sources[path.name] = path
        assets: dict[str, Asset] = {}
        urls: dict[str, str] = {}
        resolving: list[str] = []

        def url_of(name: str, referrer: str) -> str:
            """The hashed URL of asset `name`, hashing it (and its imports) first."""
            if name in urls:
                return urls[name]
            if name not in sources:
                raise ValueError(f"{referrer} refers to /static/{name}, not a file of {directory}")
            if name in resolving:
                cycle = " -> ".join([*resolving, name])
                raise ValueError(f"modules import each other in a cycle: {cycle}")
            resolving.append(name)
            path = sources[name]
            body = path.read_bytes()
            if path.suffix in MODULE_SUFFIXES:
                text = _MODULE_IMPORT.sub(
                    lambda m: f"{m.group(1)}{m.group(2)}{url_of(m.group(3), name)}{m.group(2)}",
                    body.decode("utf-8"))
                body = text.encode("utf-8")
            resolving.pop()
            served = hashed_name(name, body)
            assets[served] = Asset.build(STATIC_PREFIX + served, body, path.suffix,
                                         HASHED_CACHE_CONTROL)
            urls[name] = STATIC_PREFIX + served
            return urls[name]

        for name in sources:
            url_of(name, name)
        pages: dict[str, Asset] = {}
        for route, filename in PAGES.items():
            page_path = directory / filename
            if filename != INDEX and not page_path.exists():
                continue
            html = _STATIC_REF.sub(lambda m, f=filename: url_of(m.group(1), f),
                                   page_path.read_text(encoding="utf-8"))
            pages[route] = Asset.build(route, html.encode(), ".html", HTML_CACHE_CONTROL,
                                       security_headers(html, connect_origins))
        return cls(pages["/"], assets, urls, pages)

    def respond(self, path: str, headers: Headers) -> Response:
        """The answer to GET `path`: a page, an asset, or 404."""
        page = self.pages.get(path)
        if page is not None:
            return page.respond(headers)
        if path.startswith(STATIC_PREFIX):
            asset = self.assets.get(path[len(STATIC_PREFIX):])
            if asset is not None:
                return asset.respond(headers)
            # Not cached: a name unknown here may exist on a newer worker.
            return response(404, "not found\n", headers=[("Cache-Control", "no-store")])
        return response(404, "not found\n")
