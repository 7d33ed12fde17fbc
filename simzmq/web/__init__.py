"""The web chat: a page the gate serves at ``/`` that speaks the client
protocol over ``/ws`` from the browser (docs/web.md).

``web_routes(gate)`` gives the gate's Tornado application its handlers:

* ``/`` the page, ``/static/...`` its own files (revalidated on every load:
  ``Cache-Control: no-cache`` with an ETag), ``/vendor/NAME@VERSION/...`` the
  crypto library from npm (immutable: its URL changes with its version);
* ``/web/config.json``: the gate's public key and the paths the page needs.
  The page pins the key for its session; it comes from the server that
  serves the page, so TLS (or a TLS proxy) in front protects both alike.

Every answer carries a strict Content-Security-Policy: scripts only from this
origin plus the page's one inline import map (by its hash), WebAssembly for
libsodium, connections only to this origin (``/ws``, ``/v1/history``).
"""

from __future__ import annotations

import base64
import hashlib
import json
import logging
from pathlib import Path

from tornado import web

from simzmq.wire.handshake import public_key

log = logging.getLogger("simzmq.web")

HERE = Path(__file__).resolve().parent
STATIC = HERE / "static"
# Where the npm packages are: copied beside this module by a package build
# (setup.py), else the repository's node_modules (`npm ci`, run by bin/run and bin/test).
VENDOR_DIRS = (HERE / "vendor", HERE.parent.parent / "node_modules")
# (import name, npm package, file in the package) for the page's import map.
VENDOR_MODULES = (
    ("libsodium-wrappers-sumo", "libsodium-wrappers-sumo", "dist/modules-sumo-esm/libsodium-wrappers.mjs"),
    ("libsodium-sumo", "libsodium-sumo", "dist/modules-sumo-esm/libsodium-sumo.mjs"),
)
JS = "text/javascript; charset=utf-8"
IMPORTMAP_MARK = "{IMPORTMAP}"


class MissingLibrary(Exception):
    pass


def find_vendor_file(package: str, file: str) -> tuple[Path, str]:
    """The path of one npm package's file and the package's version."""
    for base in VENDOR_DIRS:
        pkg = base / package
        if (pkg / file).is_file() and (pkg / "package.json").is_file():
            version = json.loads((pkg / "package.json").read_text())["version"]
            return pkg / file, version
    raise MissingLibrary(f"npm package {package} not found in {' or '.join(map(str, VENDOR_DIRS))}: run `npm ci`")


def load_vendor() -> dict[str, bytes]:
    """URL path -> content of every library file the page imports."""
    files = {}
    for _, package, file in VENDOR_MODULES:
        path, version = find_vendor_file(package, file)
        files[f"/vendor/{package}@{version}/{Path(file).name}"] = path.read_bytes()
    return files


def render_page(vendor_urls: dict[str, str]) -> tuple[bytes, str]:
    """The page with its import map filled in, and the CSP that allows exactly that map."""
    importmap = json.dumps({"imports": vendor_urls}, separators=(",", ":"))
    html = (STATIC / "index.html").read_text().replace(IMPORTMAP_MARK, importmap)
    digest = base64.b64encode(hashlib.sha256(importmap.encode()).digest()).decode()
    return html.encode(), content_security_policy(f"'sha256-{digest}'")


def content_security_policy(script_hash: str = "") -> str:
    return "; ".join([
        "default-src 'none'",
        f"script-src 'self' {script_hash} 'wasm-unsafe-eval'".replace("  ", " "),
        "style-src 'self'",
        "img-src 'self'",
        "connect-src 'self'",
        "base-uri 'none'",
        "form-action 'none'",
        "frame-ancestors 'none'",
    ])


class _Secured:
    """Headers every web answer carries."""

    csp = content_security_policy()

    def set_default_headers(self):
        self.set_header("Content-Security-Policy", self.csp)
        self.set_header("X-Content-Type-Options", "nosniff")
        self.set_header("Referrer-Policy", "no-referrer")
        self.set_header("X-Frame-Options", "DENY")
        self.set_header("Cross-Origin-Opener-Policy", "same-origin")


class PageHandler(_Secured, web.RequestHandler):
    def initialize(self, page: bytes | None, page_csp: str, problem: str):
        self.page = page
        self.problem = problem
        self.page_csp = page_csp

    def get(self):
        if self.page is None:
            self.set_status(503)
            self.set_header("Content-Type", "text/plain; charset=utf-8")
            return self.finish(f"The web chat is not installed on this gate: {self.problem}\n")
        self.set_header("Content-Security-Policy", self.page_csp)  # with the import map's hash
        self.set_header("Content-Type", "text/html; charset=utf-8")
        self.set_header("Cache-Control", "no-cache")
        self.finish(self.page)


class ConfigHandler(_Secured, web.RequestHandler):
    def initialize(self, config: bytes):
        self.config = config

    def get(self):
        self.set_header("Content-Type", "application/json")
        self.set_header("Cache-Control", "no-store")
        self.finish(self.config)


class StaticHandler(_Secured, web.StaticFileHandler):
    def set_extra_headers(self, path):
        # Revalidate every time (cheap: an ETag answer), so a new release is
        # picked up by the next load and never mixed with old modules.
        self.set_header("Cache-Control", "no-cache")

    def get_content_type(self):
        if self.absolute_path.endswith((".js", ".mjs")):
            return JS
        return super().get_content_type()


class VendorHandler(_Secured, web.RequestHandler):
    def initialize(self, files: dict[str, bytes]):
        self.files = files

    def get(self, _path):
        content = self.files.get(self.request.path)
        if content is None:
            raise web.HTTPError(404)
        self.set_header("Content-Type", JS)
        self.set_header("Cache-Control", "public, max-age=31536000, immutable")
        self.finish(content)


def web_routes(gate) -> list:
    """The web chat's handlers for the gate's Tornado application."""
    try:
        files = load_vendor()
    except MissingLibrary as exc:
        log.error("web chat disabled: %s", exc)
        files, page, csp, problem = {}, None, content_security_policy(), str(exc)
    else:
        urls = {name: next(u for u in files if u.startswith(f"/vendor/{package}@"))
                for name, package, _ in VENDOR_MODULES}
        page, csp = render_page(urls)
        problem = ""
        log.info("web chat at / (library %s)", ", ".join(u.split("/")[2] for u in files))
    config = json.dumps({
        "gate_pk": public_key(gate.static_sk).hex(),
        "ws_path": "/ws",
        "history_path": "/v1/history/",
    }).encode()
    return [
        (r"/", PageHandler, {"page": page, "page_csp": csp, "problem": problem}),
        (r"/web/config\.json", ConfigHandler, {"config": config}),
        (r"/static/(.*)", StaticHandler, {"path": str(STATIC)}),
        (r"/vendor/(.*)", VendorHandler, {"files": files}),
    ]

