"""simzmq.web without a browser: the page's CSP allows exactly its import map,
and a gate without the npm library says so instead of serving a broken page."""

import base64
import hashlib
import re
from types import SimpleNamespace

import simzmq.web as web
from simzmq.wire.handshake import public_key


def test_csp_hash_is_the_import_maps():
    page, csp = web.render_page({"libsodium-wrappers-sumo": "/vendor/x@1/a.mjs", "libsodium-sumo": "/vendor/y@1/b.mjs"})
    scripts = re.findall(rb'<script type="importmap">(.*?)</script>', page)
    assert len(scripts) == 1 and b"/vendor/x@1/a.mjs" in scripts[0]
    digest = base64.b64encode(hashlib.sha256(scripts[0]).digest()).decode()
    assert f"script-src 'self' 'sha256-{digest}' 'wasm-unsafe-eval'" in csp
    assert "'unsafe-inline'" not in csp and "default-src 'none'" in csp
    # Every other inline script would be refused: the page has none.
    assert page.count(b"<script") == 2 and b'<script type="module" src="/static/js/app.js">' in page


def test_routes_carry_the_gate_key_and_a_missing_library_is_a_clear_503(tmp_path, monkeypatch):
    gate = SimpleNamespace(static_sk=bytes(range(32)))
    routes = {r[0]: r[2] for r in web.web_routes(gate)}
    assert public_key(gate.static_sk).hex().encode() in routes[r"/web/config\.json"]["config"]
    assert routes[r"/"]["page"] is not None and routes[r"/vendor/(.*)"]["files"]

    monkeypatch.setattr(web, "VENDOR_DIRS", (tmp_path,))
    routes = {r[0]: r[2] for r in web.web_routes(gate)}
    assert routes[r"/"]["page"] is None and "npm ci" in routes[r"/"]["problem"]
    assert routes[r"/vendor/(.*)"]["files"] == {}
