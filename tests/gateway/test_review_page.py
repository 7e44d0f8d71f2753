"""The operators' review page in a real browser: Debian's chromium, headless, driven by Playwright,
against a real gateway (uvicorn on loopback, embedded ONNX backend, embedded record store)."""

from __future__ import annotations

import os
import time
from pathlib import Path

import httpx
import pytest

from onnx_fixtures import make_card, write_contract_model
from slsg.contract import model_path
from slsg_gateway.server import BackgroundGateway
from slsg_gateway.settings import Settings
from slsg_gateway.ui.routes import parse_time
from slsg_gateway.ui.session import Operator, cookie_value, operator_from_cookie
from test_gateway_api import PATCH, encode, frame

CHROMIUM = "/usr/bin/chromium"
KEY = "operator-key"
SCRAPE_KEY = "prometheus-key"  # /metrics is closed once API keys are set
SCREENSHOTS = Path(__file__).resolve().parents[2] / "reports" / "review-page"  # git-ignored


@pytest.fixture(scope="module")
def gateway(tmp_path_factory):
    root = tmp_path_factory.mktemp("review")
    write_contract_model(model_path(root / "repo", "toy", 1), make_card("toy", size=64))
    settings = Settings(repository=root / "repo", port=0, api_keys=[KEY], metrics_keys=[SCRAPE_KEY],
                        lines=["line-1", "line-2"],
                        records=str(root / "records"), records_normal_sample=0.0)
    with BackgroundGateway(settings) as gw:
        yield gw


def post(gw, line: str, patch: tuple | None, colour=(255, 0, 0)) -> dict:
    r = httpx.post(gw.url + "/v1/models/toy/inspect", content=encode(frame(patch=patch, colour=colour)),
                   headers={"Content-Type": "image/png", "X-API-Key": KEY, "X-Line-Id": line, "X-Camera-Id": "cam-1"})
    assert r.status_code == 200, r.text
    return r.json()


def wait_recorded(gw, ids: list[str]) -> None:
    """The writer is asynchronous: wait (bounded) until every record is readable."""
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        r = httpx.get(gw.url + "/v1/inspections", params={"limit": 500}, headers={"X-API-Key": KEY})
        if set(ids) <= {x["id"] for x in r.json()["records"]}:
            return
        time.sleep(0.1)
    raise AssertionError("records were not written within 20 s")


def test_session_cookie_is_signed_and_expires():
    settings = Settings(api_keys=[KEY])
    value = cookie_value(settings, Operator("key-x", "anna"), now=1000.0)
    assert operator_from_cookie(settings, value, now=1001.0) is None  # fingerprint of no configured key
    from slsg_gateway.ui.session import fingerprint
    value = cookie_value(settings, Operator(fingerprint(KEY), "anna"), now=1000.0)
    assert operator_from_cookie(settings, value, now=1001.0) == Operator(fingerprint(KEY), "anna")
    assert operator_from_cookie(settings, value, now=1000.0 + 13 * 3600) is None  # expired
    payload, signature = value.rsplit(".", 1)
    assert operator_from_cookie(settings, payload + "." + "0" * len(signature), now=1001.0) is None
    assert operator_from_cookie(Settings(api_keys=["rotated"]), value, now=1001.0) is None


def test_time_filters_read_grafana_and_iso_and_relative():
    assert parse_time("1700000000000") == 1_700_000_000.0
    assert parse_time("2h", now=10_000.0) == 10_000.0 - 7200
    assert parse_time("2026-01-02T00:00:00") == parse_time("2026-01-02T00:00:00+00:00")
    with pytest.raises(Exception, match="not 1h/7d"):
        parse_time("yesterday")


def test_page_needs_a_session_and_refuses_a_wrong_key(gateway):
    r = httpx.get(gateway.url + "/ui/", follow_redirects=False)
    assert r.status_code == 303 and r.headers["location"].startswith("/ui/login")
    r = httpx.get(gateway.url + "/ui/", params={"api_key": "wrong"}, follow_redirects=False)
    assert r.status_code == 403 and "not valid" in r.text and "set-cookie" not in r.headers
    rid = post(gateway, "line-1", PATCH)["id"]
    wait_recorded(gateway, [rid])
    r = httpx.get(f"{gateway.url}/ui/inspections/{rid}/frame", follow_redirects=False)
    assert r.status_code == 303  # images too sit behind the session


@pytest.mark.skipif(not os.path.exists(CHROMIUM), reason=f"{CHROMIUM} missing (Debian package 'chromium'; "
                                                         "`make test` installs it)")
def test_operator_reviews_a_flagged_frame_in_a_real_browser(gateway):
    sync_api = pytest.importorskip("playwright.sync_api", reason="playwright not installed (pip install -e .[dev])")
    flagged = [post(gateway, "line-1", PATCH), post(gateway, "line-1", (20, 20, 90, 80)),
               post(gateway, "line-2", (100, 120, 160, 180), colour=(250, 30, 30))]
    normal = [post(gateway, "line-1", None), post(gateway, "line-2", None)]
    assert all(a["is_anomalous"] for a in flagged) and not any(a["is_anomalous"] for a in normal)
    wait_recorded(gateway, [a["id"] for a in flagged + normal])
    target = flagged[1]["id"]
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)

    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True,
                                    args=["--no-sandbox", "--disable-background-networking"])
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 900})
            page.goto(gateway.url + "/ui/")
            assert "/ui/login" in page.url  # not signed in yet
            page.goto(f"{gateway.url}/ui/?api_key={KEY}")
            assert "api_key" not in page.url  # the key leaves the address bar for a cookie
            cookie = next(c for c in page.context.cookies() if c["name"] == "slsg_ui")
            assert cookie["httpOnly"] and KEY not in cookie["value"]

            headings = page.locator("h2").all_inner_texts()
            assert [h.split(" (")[0] for h in headings] == ["Line line-1", "Line line-2"]
            cards = page.locator("a.card")
            assert {cards.nth(i).get_attribute("data-record") for i in range(cards.count())} >= \
                {a["id"] for a in flagged}  # every flagged frame is there, no normal one
            assert not {a["id"] for a in normal} & {cards.nth(i).get_attribute("data-record")
                                                   for i in range(cards.count())}
            page.screenshot(path=str(SCREENSHOTS / "grid.png"), full_page=True)

            page.locator(f'a.card[data-record="{target}"]').click()
            page.wait_for_url(f"**/ui/inspections/{target}*")
            images = page.locator(".panels img")
            assert images.count() == 4  # frame; frame + heat map; frame under the region boxes
            assert all(images.nth(i).evaluate("img => img.complete && img.naturalWidth > 0")
                       for i in range(images.count()))
            assert page.locator(".panels svg rect").count() == len(flagged[1]["regions"]) >= 1
            page.fill("textarea[name=note]", "scratch on the lid")
            page.fill("input[name=reviewer]", "anna")
            page.click("button.defect")
            page.wait_for_selector("#current-review")
            assert "defect confirmed" in page.inner_text("#current-review")
            assert "anna" in page.inner_text("#current-review")
            page.screenshot(path=str(SCREENSHOTS / "reviewed.png"), full_page=True)

            page.click("text=back to the list")  # pending only: the reviewed frame has left the grid
            page.wait_for_selector("a.card")
            left = {page.locator("a.card").nth(i).get_attribute("data-record")
                    for i in range(page.locator("a.card").count())}
            assert target not in left and flagged[0]["id"] in left
            page.select_option("select[name=line]", "line-2")
            page.click("form.filters button")
            page.wait_for_url("**line=line-2**")
            assert [page.locator("a.card").nth(i).get_attribute("data-record")
                    for i in range(page.locator("a.card").count())] == [flagged[2]["id"]]
        finally:
            browser.close()

    record = httpx.get(f"{gateway.url}/v1/inspections/{target}", headers={"X-API-Key": KEY}).json()
    assert record["review"]["verdict"] == "defect" and record["review"]["note"] == "scratch on the lid"
    assert record["review"]["reviewer"] == "anna"
    metrics = httpx.get(gateway.url + "/metrics", headers={"X-API-Key": SCRAPE_KEY}).text
    assert 'slsg_reviews_total{line="line-1",model="toy",verdict="defect",version="1"} 1.0' in metrics


def test_line_overview_links_each_line_to_its_review_page(gateway):
    """The Grafana panel's data link, filled in as Grafana does, opens that line's flagged frames in that window."""
    import json
    from urllib.parse import urlsplit

    dashboard = json.loads((Path(__file__).resolve().parents[2] / "docker" / "grafana" / "dashboards" /
                            "line-overview.json").read_text())
    panel = next(p for p in dashboard["panels"] if p["title"] == "Reviews pending by line")
    (link,) = panel["fieldConfig"]["defaults"]["links"]
    assert "line:slsg_review_pending:max" in panel["targets"][0]["expr"]
    line2 = post(gateway, "line-2", PATCH)["id"]
    line1 = post(gateway, "line-1", PATCH)["id"]
    wait_recorded(gateway, [line1, line2])
    now_ms = int(time.time() * 1000)
    url = (link["url"].replace("${__field.labels.line}", "line-2").replace("${__from}", str(now_ms - 600_000))
           .replace("${__to}", str(now_ms + 60_000)))
    parts = urlsplit(url)
    assert parts.path == "/ui/"
    with httpx.Client(base_url=gateway.url) as client:
        client.get("/ui/", params={"api_key": KEY})  # the session cookie
        page = client.get(f"{parts.path}?{parts.query}")
    assert page.status_code == 200
    assert f'data-record="{line2}"' in page.text and f'data-record="{line1}"' not in page.text
