"""The tenant dashboard: signed links' life cycle, the page's content (credits included), the CLI verb, and the page
in Chromium."""

from __future__ import annotations

import html
import json
import os
import re
import shutil
import struct
import subprocess
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import httpx
import pytest
from click.testing import CliRunner
from fastapi.testclient import TestClient

from modelmeter.billing.ledger import UsageRecord, record_usage
from modelmeter.cli import main
from modelmeter.errors import AuthenticationError
from modelmeter.gateway.dashboard import issue_token, load_page, verify_token
from modelmeter.gateway.services import services_of
from modelmeter.money import MICRO_PER_CENT
from modelmeter.settings import Settings
from tests.binaries import require_binary
from tests.conftest import ADMIN, ADMIN_TOKEN, FakeClock, assert_envelope, bearer
from tests.support.live_server import LiveServer

DAY = 86_400


def ts(*args: int) -> int:
    return int(datetime(*args, tzinfo=UTC).timestamp())  # type: ignore[misc]


@pytest.fixture
def acme(make_tenant: Any, make_key: Any) -> tuple[dict[str, Any], dict[str, str]]:
    tenant = make_tenant(name="Acme Reviews", plan="pro")
    return tenant, bearer(make_key(tenant["id"], scopes=["billing:read"])["key"])


def new_link(client: TestClient, headers: dict[str, str]) -> dict[str, Any]:
    response = client.post("/v1/dashboard/links", headers=headers)
    assert response.status_code == 200, response.text
    return dict(response.json())


def page_path(url: str) -> str:
    parts = urlsplit(url)
    return f"{parts.path}?{parts.query}"


def token_of(url: str) -> str:
    return parse_qs(urlsplit(url).query)["token"][0]


def refused(client: TestClient, token: str, secret_text: str, status: int = 401) -> None:
    response = client.get("/dashboard", params={"token": token})
    assert_envelope(response, status)
    assert secret_text not in response.text


def test_a_forged_host_header_does_not_set_the_links_host(client: TestClient, acme: Any,
                                                          live_server: Any) -> None:
    """The attack (issue 21): with MODELMETER_PUBLIC_URL unset, the Host header set the link's host, so a link
    requested with Host: evil.example carried the tenant's token to evil.example."""
    import httpx

    _, headers = acme
    link = httpx.post(f"{live_server.url}/v1/dashboard/links", headers={**headers, "Host": "evil.example"},
                      timeout=30).json()
    assert link["url"].startswith(f"{live_server.url}/dashboard?token="), link["url"]
    forwarded = client.post("/v1/dashboard/links", headers={**headers, "Host": "evil.example",
                                                             "X-Forwarded-Host": "evil.example"}).json()
    assert "evil.example" not in forwarded["url"]


def test_link_opens_the_tenants_page(client: TestClient, acme: Any, fake_clock: FakeClock) -> None:
    _, headers = acme
    link = new_link(client, headers)
    assert link["object"] == "dashboard_link"
    assert link["expires_at"] == fake_clock.t // 1 + services_of(client.app).settings.dashboard_link_ttl_s
    assert link["url"].startswith("http://testserver/dashboard?token=")
    page = client.get(page_path(link["url"]))
    assert page.status_code == 200
    assert page.headers["content-type"].startswith("text/html")
    assert "Acme Reviews" in page.text
    assert "Pro plan" in page.text
    assert "<svg" in page.text
    assert page.headers["cache-control"] == "no-store"
    assert page.headers["referrer-policy"] == "no-referrer"
    assert "default-src 'none'" in page.headers["content-security-policy"]
    # Self-contained: no script, no stylesheet or image fetched from anywhere.
    assert "<script" not in page.text
    assert "<link" not in page.text
    assert 'src="' not in page.text


def test_link_expires(client: TestClient, acme: Any, fake_clock: FakeClock) -> None:
    _, headers = acme
    link = new_link(client, headers)
    fake_clock.t = link["expires_at"] - 1
    assert client.get(page_path(link["url"])).status_code == 200
    fake_clock.t = link["expires_at"]
    expired = client.get(page_path(link["url"]))
    assert_envelope(expired, 401, type_="authentication_error", code="dashboard_link_expired")
    assert "Acme Reviews" not in expired.text


def test_forged_and_malformed_tokens_show_nothing(client: TestClient, acme: Any) -> None:
    _, headers = acme
    token = token_of(new_link(client, headers)["url"])
    tenant_id, expires, signature = token.split(".")
    flipped = signature[:-1] + ("A" if signature[-1] != "A" else "B")
    for forged in (f"{tenant_id}.{expires}.{flipped}", f"{tenant_id}.{int(expires) + 3600}.{signature}",
                   f"{tenant_id}.{expires}", "", "garbage", token + "x", f"{tenant_id}..{signature}",
                   f"{tenant_id}.{expires}.{signature}=", ADMIN_TOKEN):
        refused(client, forged, "Acme Reviews")
    assert_envelope(client.get("/dashboard"), 401)


def test_another_tenants_token_shows_only_that_tenant(client: TestClient, acme: Any, make_tenant: Any,
                                                      make_key: Any) -> None:
    _, headers = acme
    other = make_tenant(name="Globex Sentiment")
    other_link = new_link(client, bearer(make_key(other["id"])["key"]))
    page = client.get(page_path(other_link["url"])).text
    assert "Globex Sentiment" in page
    assert "Acme Reviews" not in page
    _, expires, signature = token_of(new_link(client, headers)["url"]).split(".")
    refused(client, f"{other['id']}.{expires}.{signature}", "Globex Sentiment")


def test_links_need_a_billing_key(client: TestClient, acme: Any, make_key: Any) -> None:
    tenant, _ = acme
    inference_only = bearer(make_key(tenant["id"], scopes=["inference"])["key"])
    assert_envelope(client.post("/v1/dashboard/links", headers=inference_only), 403, code="insufficient_scope")
    assert_envelope(client.post("/v1/dashboard/links"), 401)
    assert_envelope(client.post("/v1/dashboard/links", headers=ADMIN), 401)


def test_suspended_tenants_page_is_refused(client: TestClient, acme: Any) -> None:
    tenant, headers = acme
    link = new_link(client, headers)
    client.patch(f"/admin/tenants/{tenant['id']}", json={"status": "suspended"}, headers=ADMIN)
    refused(client, token_of(link["url"]), "Acme Reviews", status=403)


def test_tokens_are_bound_to_the_server_secret(settings: Settings, fake_clock: FakeClock) -> None:
    token, expires_at = issue_token(settings, "ten_abc", ttl_s=60)
    assert verify_token(settings, token) == ("ten_abc", expires_at)
    with pytest.raises(AuthenticationError):
        verify_token(settings.model_copy(update={"dashboard_secret": "another secret"}), token)
    with pytest.raises(AuthenticationError):
        verify_token(settings.model_copy(update={"admin_token": "mmadmin_rotated"}), token)


def seed_usage(client: TestClient, tenant_id: str, model: str, start: int, days: int) -> int:
    """One ledger row per hour-ish block, with a weekly rhythm; returns the tokens recorded."""
    services = services_of(client.app)
    records = []
    for d in range(days):
        weekday = (start // DAY + d + 4) % 7  # 1970-01-01 was a Thursday
        per_day = 160_000 + 25_000 * (d % 5) - (90_000 if weekday >= 5 else 0)
        for block in range(8):
            records.append(UsageRecord(request_id=f"seed_{tenant_id}_{d}_{block}", tenant_id=tenant_id,
                                       model_id=model, created=start + d * DAY + block * 3 * 3600 + 600,
                                       plan="pro", tokens=per_day // 8, requests=40 + d % 7, inputs=40,
                                       compute_us=9_000_000))
    with services.sessions() as session:
        record_usage(session=session, records=records)
        session.commit()
    return sum(r.tokens for r in records)


def test_page_shows_usage_spend_and_invoices(client: TestClient, make_tenant: Any, make_key: Any,
                                             fake_clock: FakeClock) -> None:
    fake_clock.t = ts(2026, 9, 1)
    tenant = make_tenant(name="Acme Reviews", plan="pro")
    client.patch(f"/admin/tenants/{tenant['id']}", json={"monthly_budget_cents": 10_000}, headers=ADMIN)
    headers = bearer(make_key(tenant["id"])["key"])
    seed_usage(client, tenant["id"], "all-MiniLM-L6-v2", ts(2026, 9, 1), 50)
    fake_clock.t = ts(2026, 10, 2)
    assert client.post("/admin/billing/close", json={"period": "2026-09"}, headers=ADMIN).status_code == 200
    fake_clock.t = ts(2026, 10, 20, 12)
    (september,) = client.get("/v1/billing/invoices", headers=headers).json()["data"]
    upcoming = client.get("/v1/billing/invoices/upcoming", headers=headers).json()
    used = client.get("/v1/billing/subscription", headers=headers).json()["used"]

    page = client.get(page_path(new_link(client, headers)["url"])).text
    assert september["id"] in page
    assert "2026-09" in page
    assert f"${september['total'] // 100:,}.{september['total'] % 100:02d}" in page
    assert f"${upcoming['total'] // 100:,}.{upcoming['total'] % 100:02d}" in page
    assert f"{used['tokens']:,}" in page
    assert "$100.00 monthly budget" in page
    assert page.count("<rect") == 3 * 30  # three charts of thirty days


def seed_credits(client: TestClient, tenant_id: str, at: int, description: str = "Launch <promo> & co"
                 ) -> dict[str, Any]:
    """A $25.00 grant expiring 2026-12-31, $7.345 of it drawn by one usage row, and a used-up $1.00 grant."""
    services = services_of(client.app)
    body = {"amount_cents": 2500, "description": description, "expires_at": ts(2026, 12, 31)}
    grant = client.post(f"/admin/tenants/{tenant_id}/credits", json=body, headers=ADMIN).json()
    small = client.post(f"/admin/tenants/{tenant_id}/credits", json={"amount_cents": 100}, headers=ADMIN).json()
    record = UsageRecord(request_id=f"credit_{tenant_id}", tenant_id=tenant_id, model_id="all-MiniLM-L6-v2",
                         created=at, plan="pro", tokens=1000, requests=1,
                         credits=((grant["id"], 734_500_000), (small["id"], 100 * MICRO_PER_CENT)))
    with services.sessions() as session:
        record_usage(session=session, records=[record])
        session.commit()
    return dict(grant)


def test_page_data_and_page_show_credits(client: TestClient, acme: Any, fake_clock: FakeClock) -> None:
    tenant, headers = acme
    fake_clock.t = ts(2026, 10, 20, 12)
    grant = seed_credits(client, tenant["id"], ts(2026, 10, 20, 11))
    services = services_of(client.app)
    with services.sessions() as session:
        data = load_page(session=session, catalog=services.plans, tenant_id=tenant["id"], expires_at=0).credits
    # $25.00 - $7.345 leaves $17.655: shown rounded down, as the API shows it.
    assert data.model_dump(mode="json") == client.get("/v1/billing/credits", headers=headers).json()
    assert data.balance_cents == 1765
    (used, first) = data.data
    assert (first.id, first.source, first.amount_cents, first.remaining_cents, first.status,
            first.expires_at) == (grant["id"], "granted", 2500, 1765, "active", ts(2026, 12, 31))
    assert (used.amount_cents, used.remaining_cents, used.status) == (100, 0, "used")

    page = client.get(page_path(new_link(client, headers)["url"])).text
    assert '<span class="value" id="credit-balance">$17.65</span>' in page
    row = page[page.index(f'<tr class="grant"><td>{grant["id"]}'):]
    row = row[:row.index("</tr>")]
    for cell in ("Launch &lt;promo&gt; &amp; co", "Granted", "$25.00", "$17.65", "2026-12-31 00:00 UTC", "active"):
        assert cell in row
    assert "<promo>" not in page  # the operator's description is escaped like every other string
    assert page.count('<tr class="grant">') == 2

    fake_clock.t = ts(2026, 12, 31)  # the grant lapses: nothing left, and the page says why
    page = client.get(page_path(new_link(client, headers)["url"])).text
    assert '<span class="value" id="credit-balance">$0.00</span>' in page
    assert '<span class="pill expired">expired</span>' in page


def test_page_without_credits_says_so(client: TestClient, acme: Any) -> None:
    _, headers = acme
    page = client.get(page_path(new_link(client, headers)["url"])).text
    assert '<span class="value" id="credit-balance">$0.00</span>' in page
    assert "No credits yet." in page


def test_cli_prints_a_working_link(client: TestClient, acme: Any, settings: Settings,
                                   monkeypatch: pytest.MonkeyPatch) -> None:
    tenant, _ = acme
    for name, value in (("DATA_DIR", str(settings.data_dir)), ("DATABASE_URL", settings.database_url or ""),
                        ("ADMIN_TOKEN", ADMIN_TOKEN)):
        monkeypatch.setenv(f"MODELMETER_{name}", value)
    result = CliRunner().invoke(main, ["dashboard-link", tenant["id"], "--base-url", "https://gw.example/"])
    assert result.exit_code == 0, result.output
    url = result.output.strip()
    assert url.startswith("https://gw.example/dashboard?token=")
    assert "Acme Reviews" in client.get(page_path(url)).text
    as_json = json.loads(CliRunner().invoke(main, ["dashboard-link", tenant["id"], "--ttl", "60", "--json"]).stdout)
    assert as_json["url"].startswith("http://127.0.0.1:8000/dashboard?token=")
    assert as_json["expires_at"] > 0
    missing = CliRunner().invoke(main, ["dashboard-link", "ten_nope"])
    assert missing.exit_code == 1
    assert "No tenant" in missing.output


def png_size(path: Path) -> tuple[int, int]:
    header = path.read_bytes()[:24]
    assert header[:8] == b"\x89PNG\r\n\x1a\n", "not a PNG"
    width, height = struct.unpack(">II", header[16:24])
    return width, height


CHROMIUM_FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync")


def screenshot(url: str, target: Path, profile: Path) -> None:
    chromium = require_binary("chromium")
    command = [chromium, *CHROMIUM_FLAGS, "--hide-scrollbars", f"--user-data-dir={profile}",
               f"--screenshot={target}", "--window-size=1280,1600", url]
    done = subprocess.run(command, capture_output=True, timeout=120, check=False)
    assert done.returncode == 0, done.stderr.decode(errors="replace")[-2000:]
    assert target.exists(), done.stderr.decode(errors="replace")[-2000:]


def rendered_text(url: str, profile: Path) -> str:
    """The page's DOM as Chromium parsed and laid it out, without markup: what a reader sees."""
    chromium = require_binary("chromium")
    done = subprocess.run([chromium, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", "--dump-dom", url],
                          capture_output=True, timeout=120, check=False)
    assert done.returncode == 0, done.stderr.decode(errors="replace")[-2000:]
    dom = done.stdout.decode()
    body = dom[dom.index("<body"):]
    return " ".join(html.unescape(re.sub(r"<[^>]+>", " ", body)).split())


def test_page_in_headless_chromium(client: TestClient, live_server: LiveServer, make_tenant: Any, make_key: Any,
                                   fake_clock: FakeClock, tmp_path: Path) -> None:
    fake_clock.t = ts(2026, 9, 1)
    tenant = make_tenant(name="Acme Reviews", email="ops@acme.test", plan="pro")
    client.patch(f"/admin/tenants/{tenant['id']}", json={"monthly_budget_cents": 10_000}, headers=ADMIN)
    key = make_key(tenant["id"])["key"]
    seed_usage(client, tenant["id"], "all-MiniLM-L6-v2", ts(2026, 9, 1), 50)
    fake_clock.t = ts(2026, 10, 2)
    assert client.post("/admin/billing/close", json={"period": "2026-09"}, headers=ADMIN).status_code == 200
    fake_clock.t = ts(2026, 10, 20, 12)
    grant = seed_credits(client, tenant["id"], ts(2026, 10, 20, 11), "Launch credit")
    link = httpx.post(f"{live_server.url}/v1/dashboard/links", headers=bearer(key), timeout=30).json()
    assert link["url"].startswith(live_server.url)

    target = tmp_path / "dashboard.png"
    screenshot(link["url"], target, tmp_path / "profile")
    assert png_size(target) == (1280, 1600)
    assert target.stat().st_size > 40_000, "the screenshot looks blank"
    if os.environ.get("MODELMETER_UPDATE_SCREENSHOT"):
        docs = Path(__file__).resolve().parents[2] / "docs"
        docs.mkdir(exist_ok=True)
        shutil.copy(target, docs / "dashboard.png")

    text = rendered_text(link["url"], tmp_path / "profile-dom")
    assert "Prepaid credits" in text
    assert "Balance $17.65" in text
    assert f"{grant['id']} Launch credit Granted $25.00 $17.65 2026-12-31 00:00 UTC active" in text

    forged = tmp_path / "forged.png"
    screenshot(link["url"][:-2] + "xx", forged, tmp_path / "profile2")
    assert forged.stat().st_size < target.stat().st_size // 4, "a forged link must render nothing like the page"


def significant_digits(number: str) -> int:
    digits = number.replace(",", "").replace(".", "").lstrip("-").lstrip("0")
    return len(digits)


def unit_cells(page: str) -> list[tuple[str, str, str, str]]:
    """The upcoming invoice's rows as (line, qty, unit, amount) texts, the total row left out."""
    table = page[page.index("<th>Line</th>"):]
    table = table[:table.index("</table>")]
    rows = re.findall(r'<tr><td>(.*?)</td><td class="num">(.*?)</td><td class="num">(.*?)</td>'
                      r'<td class="num">(.*?)</td></tr>', table)
    return [(html.unescape(a), b, html.unescape(c), html.unescape(d)) for a, b, c, d in rows]


def test_page_shows_money_in_the_display_form(client: TestClient, make_tenant: Any, make_key: Any,
                                              fake_clock: FakeClock) -> None:
    """A prorated base fee on two plans (a change mid-month at an odd second), tokens on each, scale's token tiers
    and credits applied: every amount has two decimals, every sub-cent unit price at most 6 significant digits."""
    fake_clock.t = ts(2026, 10, 3, 13, 17) + 29
    tenant = make_tenant(name="Odd Seconds", plan="pro")
    headers = bearer(make_key(tenant["id"])["key"])
    fake_clock.t = ts(2026, 10, 11, 7, 41) + 13
    assert client.patch(f"/admin/tenants/{tenant['id']}", json={"plan": "scale"}, headers=ADMIN).status_code == 200
    grant = client.post(f"/admin/tenants/{tenant['id']}/credits", json={"amount_cents": 2500}, headers=ADMIN).json()
    services = services_of(client.app)
    records = [
        UsageRecord(request_id="odd_pro", tenant_id=tenant["id"], model_id="all-MiniLM-L6-v2",
                    created=ts(2026, 10, 5), plan="pro", tokens=5_123_457, requests=7, inputs=7),
        UsageRecord(request_id="odd_scale", tenant_id=tenant["id"], model_id="all-MiniLM-L6-v2",
                    created=ts(2026, 10, 12), plan="scale", tokens=123_456_789, requests=9, inputs=9,
                    credits=((grant["id"], 25 * MICRO_PER_CENT),)),
    ]
    with services.sessions() as session:
        record_usage(session=session, records=records)
        session.commit()
    fake_clock.t = ts(2026, 10, 20, 12)
    upcoming = client.get("/v1/billing/invoices/upcoming", headers=headers).json()
    exact = {x["description"]: x["unit_amount_decimal"] for x in upcoming["lines"]["data"]}
    assert max(significant_digits(u) for u in exact.values()) > 6  # the API keeps the exact prices

    page = client.get(page_path(new_link(client, headers)["url"])).text
    rows = unit_cells(page)
    assert [r[0] for r in rows] == [x["description"] for x in upcoming["lines"]["data"]]
    by_line = {line: (qty, unit, amount) for line, qty, unit, amount in rows}
    for line, (qty, unit, amount) in by_line.items():
        if "base fee" in line:  # prorated: quantity 1, the unit price reads as the amount
            assert "days)" in line
            assert qty == "1"
            assert unit == amount, line
            assert significant_digits(exact[line]) > 6
    assert by_line["Credits applied"][1:] == ("-$0.25", "-$0.25")
    tier_units = [unit for line, _, unit, _ in rows if "(tier" in line]
    assert tier_units == ["0.0008¢", "0.0005¢"]  # scale: 0.8¢ and 0.5¢ per 1k tokens
    assert "0.8¢; 100,000,001\u20131,000,000,000 at 0.5¢" in page  # the plan's tiers in the same form

    text = html.unescape(re.sub(r"<[^>]+>", " ", page[page.index("<body"):]))
    cents = re.findall(r"(-?[0-9][0-9,]*(?:\.[0-9]+)?)¢", text)
    assert cents, "no sub-cent price on the page"
    assert all(significant_digits(c) <= 6 for c in cents), cents
    amounts = re.findall(r"\$[0-9][0-9,]*(?:\.[0-9]*)?", text)
    assert amounts
    assert all(re.fullmatch(r"\$[0-9]{1,3}(,[0-9]{3})*\.[0-9]{2}", a) for a in amounts), amounts
    assert " USD" not in text  # prices carry the currency's symbol, not its code


def test_page_shows_batch_usage_apart(client: TestClient, make_tenant: Any, make_key: Any,
                                      fake_clock: FakeClock) -> None:
    """Batch API lines are counted in the period's tokens and requests, shown on a card of their own, and priced
    on their own invoice lines at the plan's batch discount."""
    fake_clock.t = ts(2026, 10, 20)
    tenant = make_tenant(name="Bulk Tagging", plan="payg")
    headers = bearer(make_key(tenant["id"])["key"])
    rows = [UsageRecord(request_id=f"breq_dash{i}", tenant_id=tenant["id"], model_id="all-MiniLM-L6-v2",
                        created=fake_clock.t, plan="payg", kind="batch", tokens=1000, requests=1) for i in range(3)]
    rows.append(UsageRecord(request_id="req_dash", tenant_id=tenant["id"], model_id="all-MiniLM-L6-v2",
                            created=fake_clock.t, plan="payg", tokens=500, requests=1))
    with services_of(client.app).sessions() as session:
        record_usage(session=session, records=rows)
        session.commit()
    page = client.get(page_path(new_link(client, headers)["url"])).text
    assert "Batch API this period" in page
    assert "3 lines" in page
    assert "3,000 tokens · 50% batch discount" in page
    assert "3,500" in page  # the period's tokens count both
    assert "Tokens (batch): 3,000 used, 50% batch discount" in page
    assert "Tokens: 500 used" in page
