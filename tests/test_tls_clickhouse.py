"""ClickHouse TLS options against an https server in a thread (there is no ClickHouse server here): the
server is verified against clickhouse_ca, mutual TLS, and every store opener passes the settings."""

from __future__ import annotations

import argparse
import base64
import http.server
import ssl
import threading
from pathlib import Path

import pytest

from marketprism.settings import load
from marketprism.store.client import StoreError, connect

from test_tls import _finish, _run
from tls_support import Pki

CH_SECRET = "chPw-5c1e90"


# ---- ClickHouse over TLS: an https server in a thread ---------------------------------------------------
class FakeClickHouse:
    """An https server presenting the test server certificate (optionally requiring a client certificate
    from the CA). Every request is recorded and answered like a ClickHouse that refuses the query (HTTP
    500, code 497): an answer at the HTTP level, so the TLS handshake is known to have passed."""

    REPLY = b"Code: 497. DB::Exception: fake ClickHouse behind TLS. (ACCESS_DENIED)\n"

    def __init__(self, pki: Pki, client_ca: str | None = None) -> None:
        requests = self.requests = []
        reply = self.REPLY

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                self.rfile.read(int(self.headers.get("Content-Length") or 0))
                requests.append((self.command, self.path, dict(self.headers)))
                self.send_response(500)
                self.send_header("X-ClickHouse-Exception-Code", "497")
                self.send_header("Content-Length", str(len(reply)))
                self.end_headers()
                self.wfile.write(reply)

            do_GET = do_POST

            def log_message(self, *args) -> None:
                pass

        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.load_cert_chain(pki.server_cert, pki.server_key)
        if client_ca:
            ctx.verify_mode = ssl.CERT_REQUIRED
            ctx.load_verify_locations(client_ca)
        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.socket = ctx.wrap_socket(self.httpd.socket, server_side=True)
        self.port = self.httpd.server_address[1]
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def url(self, user: str = "bob", password: str = CH_SECRET) -> str:
        return f"https://{user}{':' + password if password else ''}@127.0.0.1:{self.port}"

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join(5)


@pytest.fixture
def fake_clickhouse(pki):
    made: list[FakeClickHouse] = []

    def make(client_ca: str | None = None) -> FakeClickHouse:
        made.append(FakeClickHouse(pki, client_ca))
        return made[-1]
    yield make
    for server in made:
        server.close()


def _open(url: str, **env) -> str:
    """The one-line StoreError of opening `url` with these settings (the fake server never lets it open)."""
    settings = load(environ={"MARKETPRISM_CLICKHOUSE_URL": url,
                             **{f"MARKETPRISM_{k.upper()}": v for k, v in env.items()}})
    with pytest.raises(StoreError) as e:
        connect(settings.store_url, settings=settings)
    return str(e.value)


REACHED = "Received ClickHouse exception, code: 497"
UNVERIFIED = "[SSL: CERTIFICATE_VERIFY_FAILED] certificate verify failed"


@pytest.mark.filterwarnings("ignore::urllib3.exceptions.InsecureRequestWarning")  # clickhouse_tls_verify=false
def test_clickhouse_https_verifies_the_server_against_clickhouse_ca(pki, fake_clickhouse):
    """The client built for an https URL on a non-standard port speaks TLS (the server only speaks TLS),
    verifies the server against clickhouse_ca (passes, and the request reaches the server with its Basic
    credentials), and fails with a certificate-verify error and no request for another CA or none (the
    system's CAs); clickhouse_tls_verify=false accepts the certificate unverified."""
    ch = fake_clickhouse()
    url = ch.url()
    message = _open(url, clickhouse_ca=pki.ca)
    assert REACHED in message and CH_SECRET not in message, message
    assert len(ch.requests) >= 1 and {m for m, _, _ in ch.requests} == {"POST"}
    assert ch.requests[0][2]["Authorization"] == "Basic " + base64.b64encode(f"bob:{CH_SECRET}".encode()).decode()
    for env in ({"clickhouse_ca": pki.other_ca}, {}):
        ch.requests.clear()
        message = _open(url, **env)
        assert message.startswith(f"cannot open store https://bob:***@127.0.0.1:{ch.port}: {UNVERIFIED}"), message
        assert ch.requests == []
    assert REACHED in _open(url, clickhouse_ca=pki.other_ca, clickhouse_tls_verify="false")


def test_clickhouse_mutual_tls(pki, fake_clickhouse):
    """A server that requires a client certificate from the CA: refused without clickhouse_tls_cert (no
    request arrives); with it, the request arrives, authenticated by the URL's password (tls_mode strict)
    or, without a password, by the certificate (X-ClickHouse-SSL-Certificate-Auth for the URL's user)."""
    ch = fake_clickhouse(client_ca=pki.ca)
    message = _open(ch.url(), clickhouse_ca=pki.ca)
    assert REACHED not in message and ch.requests == [], message
    cert = dict(clickhouse_ca=pki.ca, clickhouse_tls_cert=pki.client_cert, clickhouse_tls_key=pki.client_key)
    assert REACHED in _open(ch.url(), **cert)
    assert ch.requests[-1][2]["Authorization"].startswith("Basic ")
    assert "X-ClickHouse-SSL-Certificate-Auth" not in ch.requests[-1][2]
    assert REACHED in _open(ch.url(password=""), **cert)
    headers = ch.requests[-1][2]
    assert headers["X-ClickHouse-SSL-Certificate-Auth"] == "on" and headers["X-ClickHouse-User"] == "bob"
    assert "Authorization" not in headers
    other = dict(cert, clickhouse_tls_cert=pki.other_client_cert, clickhouse_tls_key=pki.other_client_key)
    count = len(ch.requests)
    assert REACHED not in _open(ch.url(), **other) and len(ch.requests) == count


def test_every_store_opener_passes_the_tls_settings(tmp_path, pki, fake_clickhouse, monkeypatch):
    """Each path that opens ClickHouse reaches the https server through clickhouse_ca (an HTTP-level answer,
    not a certificate error): the storage roles, query, status, integrity, the cold archiver, and
    `marketprism init --schema` as a process (wrong CA: one certificate-verify line, exit 1)."""
    from marketprism.ops import cli, integrity, roles, status
    from marketprism.store import cold

    ch = fake_clickhouse()
    settings = load(environ={"MARKETPRISM_CLICKHOUSE_URL": ch.url(), "MARKETPRISM_CLICKHOUSE_CA": pki.ca,
                             "MARKETPRISM_DATA_DIR": str(tmp_path / "data")})
    openers = {"roles._store": lambda: roles._store(settings),
               "cli._query": lambda: cli._query(settings, "SELECT 1"),
               "integrity.main": lambda: integrity.main(argparse.Namespace(), settings),
               "cold.Archiver.open": lambda: cold.Archiver.open(settings)}
    for name, opener in openers.items():
        with pytest.raises(StoreError) as e:
            opener()
        assert REACHED in str(e.value), (name, str(e.value))
    info = status.clickhouse_info(settings, None, 5)
    assert info["up"] is False and REACHED in info["error"], info

    # a separate cold server: the archiver and integrity open both stores with the settings
    two = load(environ={"MARKETPRISM_CLICKHOUSE_URL": ch.url(), "MARKETPRISM_COLD_CLICKHOUSE_URL": ch.url("cold"),
                        "MARKETPRISM_CLICKHOUSE_CA": pki.ca, "MARKETPRISM_DATA_DIR": str(tmp_path / "data")})
    seen = []

    def record(url, readonly=False, settings=None):
        seen.append((url, settings))
        if url == two.cold_clickhouse_url:
            raise StoreError("recorded", url)
        return object()
    monkeypatch.setattr(cold, "connect", record)
    monkeypatch.setattr("marketprism.store.client.connect", record)
    for opener in (lambda: cold.Archiver.open(two), lambda: integrity.main(argparse.Namespace(), two)):
        seen.clear()
        with pytest.raises(StoreError, match="^recorded$"):
            opener()
        assert seen == [(two.store_url, two), (two.cold_clickhouse_url, two)]
    monkeypatch.undo()
    for ca, expected in ((pki.ca, REACHED), (pki.other_ca, UNVERIFIED)):
        code, out, err = _finish(_run(tmp_path / Path(ca).stem, "init", "--schema", clickhouse_url=ch.url(),
                                      clickhouse_ca=ca), timeout=60)
        last = err.strip().splitlines()[-1]
        assert code == 1 and "Traceback" not in err and CH_SECRET not in out + err, err[-2000:]
        assert last.startswith("marketprism: ") and expected in last, last
        assert f"cannot open store https://bob:***@127.0.0.1:{ch.port}: " in last, last
