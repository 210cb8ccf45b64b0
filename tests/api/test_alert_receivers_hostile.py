"""A tenant's alert receiver is hostile (issue 21): each attack first, then what the relay does about it.

Raw-socket receivers on loopback (the relay allows private addresses only where a test says so), deliveries written
straight into the outbox."""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import socket
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from fastapi.testclient import TestClient

from modelmeter import clock
from modelmeter.billing.alert_relay import AlertRelay
from modelmeter.billing.alerts import private_address, secret_sealer
from modelmeter.billing.destinations import canonical_host, forbidden, pin
from modelmeter.billing.tables import AlertDelivery, AlertEvent, AlertSetting
from modelmeter.gateway.services import Services
from tests.conftest import ADMIN_TOKEN, bearer


class RawReceiver:
    """Accepts connections and runs ``behave(conn)`` on each; counts the bytes it managed to send."""

    def __init__(self, behave: Callable[[socket.socket, RawReceiver], None]) -> None:
        self.behave = behave
        self.sent = 0
        self.requests: list[bytes] = []
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(16)
        self.port = self.sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}/hook"
        self.closed = False
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while not self.closed:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            threading.Thread(target=self._one, args=(conn,), daemon=True).start()

    def _one(self, conn: socket.socket) -> None:
        with conn:
            conn.settimeout(5)
            try:
                self.requests.append(conn.recv(65536))
                self.behave(conn, self)
            except OSError:
                pass  # the relay hung up: what these tests want

    def send(self, conn: socket.socket, data: bytes) -> None:
        conn.sendall(data)
        self.sent += len(data)

    def close(self) -> None:
        self.closed = True
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_RDWR)  # wakes the accept() a close alone would leave blocked
        self.sock.close()


@pytest.fixture
def receivers() -> Iterator[Callable[..., RawReceiver]]:
    made: list[RawReceiver] = []

    def make(behave: Callable[[socket.socket, RawReceiver], None]) -> RawReceiver:
        made.append(RawReceiver(behave))
        return made[-1]

    yield make
    for r in made:
        r.close()


def _deliveries(services: Services, tenant_id: str, url: str, count: int = 1) -> None:
    now = clock.now_s()
    with services.sessions() as session:
        if session.get(AlertSetting, tenant_id) is None:
            session.add(AlertSetting(tenant_id=tenant_id, thresholds=[50], url=url,
                                     secret=secret_sealer(ADMIN_TOKEN).seal_text("whsec_test", tenant_id),
                                     created=now, updated=now))
        for n in range(count):
            event = AlertEvent(id=f"evt_{tenant_id[-8:]}_{n}_{time.monotonic_ns()}", tenant_id=tenant_id,
                               period="2026-12", resource="budget", threshold_percent=50 + n, value=1, limit_value=2,
                               created=now)
            session.add(event)
            session.flush()
            session.add(AlertDelivery(event_id=event.id, tenant_id=tenant_id, url=url, next_attempt_at=now,
                                      created=now))
        session.commit()


def _relay(services: Services, **kw: Any) -> AlertRelay:
    return AlertRelay(sessions=services.sessions, backoff_base_s=60,
                      **{"allow_private": True, "sealer": secret_sealer(ADMIN_TOKEN), **kw})


def test_an_endless_answer_is_never_read(client: TestClient, make_tenant: Any, services: Services,
                                         receivers: Callable[..., RawReceiver]) -> None:
    """Before: the relay read the whole answer (600 MiB added ~1.1 GiB to the gateway). Now only the headers."""

    def endless(conn: socket.socket, receiver: RawReceiver) -> None:
        receiver.send(conn, b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nContent-Encoding: gzip\r\n\r\n")
        chunk = b"%x\r\n%s\r\n" % (1 << 16, b"\0" * (1 << 16))
        while receiver.sent < 1 << 30:  # would be 1 GiB
            receiver.send(conn, chunk)

    hook = receivers(endless)
    tenant = make_tenant()["id"]
    _deliveries(services, tenant, hook.url)
    [outcome] = _relay(services, timeout_s=10).run_once().rows
    assert outcome.result == "done"
    assert outcome.status == 200
    time.sleep(0.2)
    assert hook.sent < 32 << 20, hook.sent  # what the kernel's buffers took before the relay hung up
    request_head = hook.requests[0].split(b"\r\n\r\n")[0].lower()
    assert b"accept-encoding: identity" in request_head


def test_a_receiver_dripping_its_headers_is_cut_at_the_deadline(
        client: TestClient, make_tenant: Any, services: Services, receivers: Callable[..., RawReceiver]) -> None:
    """Before: each byte within the read timeout kept the attempt alive for as long as the receiver liked."""

    def drip(conn: socket.socket, receiver: RawReceiver) -> None:
        receiver.send(conn, b"HTTP/1.1 200 OK\r\nX-Slow: ")
        for _ in range(600):
            receiver.send(conn, b"a")
            time.sleep(0.05)

    hook = receivers(drip)
    tenant = make_tenant()["id"]
    _deliveries(services, tenant, hook.url)
    [outcome] = _relay(services, timeout_s=0.5).run_once().rows
    assert outcome.result == "retry"
    assert outcome.error == "no answer within 0.5 s"
    assert hook.sent < 600  # cut long before the receiver finished


def test_one_tenants_backlog_takes_one_attempt_per_round(
        client: TestClient, make_tenant: Any, services: Services) -> None:
    noisy, quiet = make_tenant()["id"], make_tenant()["id"]
    _deliveries(services, noisy, "https://noisy.example.com/hook", count=50)
    _deliveries(services, quiet, "https://quiet.example.com/hook")
    due = _relay(services)._due()
    assert sorted(row.tenant_id for row in due) == sorted([noisy, quiet])


def test_the_connection_goes_to_the_address_that_was_checked(
        client: TestClient, make_tenant: Any, services: Services, receivers: Callable[..., RawReceiver],
        monkeypatch: pytest.MonkeyPatch) -> None:
    """DNS rebinding: the name answers a public address to the check, then loopback to the connect. Before, the
    POST reached the loopback receiver; now there is no second lookup."""
    hook = receivers(lambda conn, r: r.send(conn, b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n"))
    answers = iter(["192.0.2.10", "127.0.0.1", "127.0.0.1", "127.0.0.1"])  # TEST-NET-1, then loopback
    lookups: list[str] = []

    def rebinding(host: str, port: Any, *args: Any, **kw: Any) -> list[Any]:
        lookups.append(host)
        return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", (next(answers), port or 0))]

    monkeypatch.setattr(socket, "getaddrinfo", rebinding)
    monkeypatch.setattr(ipaddress.IPv4Address, "is_global", property(lambda self: str(self) == "192.0.2.10"))
    tenant = make_tenant()["id"]
    url = f"http://hooks.example.net:{hook.port}/hook"
    _deliveries(services, tenant, url)
    [outcome] = _relay(services, timeout_s=0.5, allow_private=False).run_once().rows
    assert outcome.result == "retry"
    assert hook.requests == []  # loopback never saw the POST
    assert lookups == ["hooks.example.net"]  # resolved once


def test_pin_keeps_the_name_for_host_and_sni(monkeypatch: pytest.MonkeyPatch) -> None:
    public = [(socket.AF_INET, socket.SOCK_STREAM, 6, "", ("93.184.216.34", 0))]
    monkeypatch.setattr(socket, "getaddrinfo", lambda host, port, *a, **kw: public)
    target = asyncio.run(pin("https://user:p%40ss@Hooks.Example.net:8443/a/b?c=1", allow_private=False))
    assert target.connect_url == "https://93.184.216.34:8443/a/b?c=1"
    assert target.host == "Hooks.Example.net:8443"  # never the credentials
    assert target.sni_hostname == "hooks.example.net"
    assert target.credentials == ("user", "p@ss")  # sent as Basic authentication, as before pinning
    with pytest.raises(PermissionError):
        asyncio.run(pin("http://localhost/x", allow_private=False))


@pytest.mark.parametrize("literal", [
    "::ffff:127.0.0.1", "::ffff:10.0.0.1", "64:ff9b::7f00:1", "64:ff9b::a9fe:a9fe", "64:ff9b:1::c0a8:1",
    "2002:7f00:1::", "2002:a00:1::1", "::127.0.0.1", "::169.254.169.254",
])
def test_ipv4_inside_ipv6_is_judged_by_the_ipv4(literal: str) -> None:
    assert forbidden(ipaddress.ip_address(literal))
    assert private_address(f"http://[{literal}]/hook")


@pytest.mark.parametrize("literal", ["64:ff9b::808:808", "2002:808:808::1", "2606:4700:4700::1111"])
def test_public_ipv6_and_public_embedded_ipv4_pass(literal: str) -> None:
    assert not forbidden(ipaddress.ip_address(literal))


@pytest.mark.parametrize("host", ["2130706433", "0x7f.1", "0177.0.0.1", "127.1", "0x7f000001", "1.2.3.04",
                                  "example.123"])
def test_other_ipv4_spellings_are_refused(host: str) -> None:
    with pytest.raises(ValueError, match="four decimal numbers"):
        canonical_host(host)


@pytest.mark.parametrize("host", ["1.2.3.4", "example.com", "hooks.0x.example", "[::1]", "a1b2.dev"])
def test_canonical_hosts_pass(host: str) -> None:
    canonical_host(host)


@pytest.mark.parametrize("url", ["http://2130706433/hook", "http://0x7f.1/hook", "http://0177.0.0.1/hook",
                                 "http://[::ffff:127.0.0.1]/hook", "http://[64:ff9b::7f00:1]/hook",
                                 "http://example.com:99999/hook"])
def test_the_settings_put_refuses_them(client: TestClient, make_tenant: Any, make_key: Any, url: str) -> None:
    tenant = make_tenant()
    key = make_key(tenant["id"])["key"]
    response = client.put("/v1/billing/alerts", json={"thresholds": [50], "url": url}, headers=bearer(key))
    assert response.status_code == 422, response.text
    assert response.json()["error"]["param"] == "url"
