"""The gateway's chat page in a real headless browser: Debian's chromium (installed by `make setup`), driven by
Playwright's Python package through `executable_path` (Playwright's own browser download needs a CDN these
machines cannot reach). Log in with a token, send a prompt and see the answer stream in chunk by chunk, stop a
long answer, switch the alias, reload a saved conversation; rate and correct an answer, and vote in the arena."""
from __future__ import annotations

import subprocess
import time
from pathlib import Path

import httpx
import pytest

from conftest import make_bundle
from serving.gateway.app import create_app
from serving.gateway.db import GatewayDb, database_url
from serving.registry import promote
from upstream_double import ServeApp, Upstream
from workspace.config import load_config
from workspace.paths import ROOT
from workspace.setup_env import BROWSER
from workspace.tracking import configure, stage_run


@pytest.fixture(scope="module")
def page_env(tmp_path_factory):
    if not Path(BROWSER).exists():
        pytest.fail(f"no Chromium at {BROWSER}: `make setup` installs it as root (apt-get install chromium); "
                    "otherwise run `sudo apt-get install -y --no-install-recommends chromium`")
    tmp = tmp_path_factory.mktemp("page")
    loaded = load_config(overrides=[f"tracking.uri=sqlite:///{tmp}/mlflow.db", f"tracking.artifact_root={tmp}/artifacts",
                                    "tracking.registered_model=page-test", f"serving.gateway.database_url=sqlite:///{tmp}/gw.db"])
    configure(loaded)
    for tag in ("one", "two"):
        with stage_run(loaded, "promote") as run:
            promote("page-test", run.info.run_id, make_bundle(tmp, tag), {})
    from mlflow import MlflowClient

    MlflowClient().set_registered_model_alias("page-test", "candidate", "1")  # the arena: champion v2 vs candidate v1
    db = GatewayDb(database_url(loaded))
    token = db.create_token("pat", "user")
    with Upstream() as up, ServeApp(create_app(loaded, upstreams=[up.base_url])) as gw:
        gw.db = db
        yield gw, up, token


@pytest.fixture(autouse=True)
def healthy_upstream(page_env):
    """Each test starts on a healthy upstream that the gateway sees as healthy: the tests run in random order,
    and one that makes the upstream fail leaves its replica marked down until the health loop brings it back."""
    gw, up, _ = page_env
    up.state.fail = False
    deadline = time.monotonic() + 30
    while httpx.get(gw.url + "/healthz", timeout=5).json()["status"] != "ok":
        assert time.monotonic() < deadline, "the gateway did not see the upstream healthy again within 30 s"
        time.sleep(0.2)
    yield
    up.state.fail = False


def test_chat_page_login_stream_stop_switch_and_reload(page_env):
    from playwright.sync_api import expect, sync_playwright

    gw, up, token = page_env
    up.state.token_delay_s = 0.01
    up.state.max_model_len = 100_000  # the page sends the whole history
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=BROWSER, args=["--no-sandbox", "--disable-gpu"])
        try:
            page = browser.new_page()
            page.goto(gw.url + "/")
            page.fill("#token", "llmops-wrong")
            page.click("#login-btn")
            expect(page.locator("#login-error")).to_contain_text("unknown, revoked or expired")
            page.fill("#token", token)
            page.click("#login-btn")
            expect(page.locator("#model option")).to_have_count(3)
            page.select_option("#model", "champion")
            page.fill("#system", "짧게 답하세요")
            page.fill("#prompt", "회원 목록 화면을 만들어줘")
            page.click("#send")
            answer = page.locator(".msg.assistant").last
            expect(answer).to_contain_text("weights-two-0")  # v2 is champion; tokens arrive while it streams
            expect(page.locator("#status")).to_have_text("done", timeout=30_000)
            assert int(answer.get_attribute("data-chunks")) > 5  # streamed: many chunks, not one block
            assert "weights-two-255" in answer.inner_text()  # max_tokens 256 from the page

            # stop: a long answer is cut, and the gateway cancels it upstream
            up.state.token_delay_s = 0.2
            cut_before = up.state.cut
            page.fill("#prompt", "천천히 길게")
            page.click("#send")
            expect(page.locator(".msg.assistant").last).to_contain_text("weights-two-1")
            page.click("#stop")
            expect(page.locator("#status")).to_have_text("stopped")
            up.state.token_delay_s = 0.0

            # switch the alias: the next answer comes from v1
            page.select_option("#model", "previous")
            page.fill("#prompt", "다른 모델로")
            page.click("#send")
            expect(page.locator(".msg.assistant").last).to_contain_text("weights-one-0")
            expect(page.locator("#status")).to_have_text("done")

            # the conversation is saved: a reload of the page lists it and opens it with its messages
            page.reload()
            expect(page.locator("#conversations li")).to_have_count(1)
            page.click("#conversations li >> nth=0")
            expect(page.locator(".msg.user")).to_have_count(2)  # the stopped exchange is not saved
            expect(page.locator(".msg.user").first).to_contain_text("회원 목록 화면을 만들어줘")
            expect(page.locator("#system")).to_have_value("짧게 답하세요")
            expect(page.locator(".msg.assistant").last).to_contain_text("weights-one-0")
        finally:
            browser.close()
    assert up.state.cut > cut_before


def test_chat_page_rates_corrects_and_votes_in_the_arena(page_env):
    from playwright.sync_api import expect, sync_playwright

    gw, up, _ = page_env
    token = gw.db.create_token("rater", "user")  # its own token: the other test counts its own conversations
    up.state.token_delay_s = 0.0
    up.state.max_model_len = 100_000
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=BROWSER, args=["--no-sandbox", "--disable-gpu"])
        try:
            page = browser.new_page()
            page.goto(gw.url + "/")
            page.fill("#token", token)
            page.click("#login-btn")
            page.select_option("#model", "champion")
            page.click("#new-conv")
            page.fill("#prompt", "주문 목록 화면")
            page.click("#send")
            expect(page.locator("#status")).to_have_text("done", timeout=30_000)
            page.locator(".fb-up").last.click()
            expect(page.locator(".fb-status").last).to_contain_text("rating recorded")
            [fb] = gw.db.feedback()
            assert (fb["rating"], fb["version"], fb["messages"][-1]["content"]) == (1, "2", "주문 목록 화면")
            page.locator(".fb-correct").last.click()
            page.locator(".fb-text").last.fill('<Screen id="orderList"/>')
            page.locator(".fb-save").last.click()
            expect(page.locator(".fb-status").last).to_contain_text("correction recorded")
            [fb] = gw.db.feedback()
            assert fb["correction"] == '<Screen id="orderList"/>'

            # arena: two blind answers, a vote, then the reveal names what A and B were
            page.check("#arena")
            page.fill("#prompt", "재고 화면")
            page.click("#send")
            expect(page.locator(".arena-answer")).to_have_count(2)
            a_text = page.locator(".arena-answer").first.inner_text()
            page.click(".vote-A")
            expect(page.locator(".reveal")).to_contain_text("you picked A")
            [m] = gw.db.matches()
            expect(page.locator(".reveal")).to_contain_text(f"A = {m['model_a']} v{m['version_a']}")
            assert m["winner"] == "A" and {m["version_a"], m["version_b"]} == {"1", "2"}
            assert ("weights-two" in a_text) == (m["version_a"] == "2")  # the page showed A's own answer as A
            assert page.locator(".vote-B").is_disabled()  # one vote per match
        finally:
            browser.close()


SHOTS = ROOT / ".cache" / "test-artifacts"  # the page as a reviewer sees it, rewritten by every run (docs/ has a copy)


def test_chat_page_desktop_and_phone_width_with_korean_fonts_version_and_clear_errors(page_env):
    from playwright.sync_api import expect, sync_playwright

    fonts = subprocess.run(["fc-list", ":lang=ko", "family"], capture_output=True, text=True).stdout
    assert fonts.strip(), "no Korean font: `make setup` installs Debian's fonts-noto-cjk (apt-get install fonts-noto-cjk)"
    gw, up, _ = page_env
    token = gw.db.create_token("looker", "user")
    up.state.token_delay_s = 0.0
    up.state.max_model_len = 100_000
    SHOTS.mkdir(parents=True, exist_ok=True)
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=BROWSER, args=["--no-sandbox", "--disable-gpu"])
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 800})
            page.goto(gw.url + "/")
            page.fill("#token", token)
            page.click("#login-btn")
            expect(page.locator("#version")).to_have_text("v2")  # the served version, shown from the start
            page.select_option("#model", "previous")
            expect(page.locator("#version")).to_have_text("v1")
            page.select_option("#model", "champion")
            page.fill("#system", "XML만 답하세요")
            page.fill("#prompt", "회원 목록 화면을 만들어 주세요. 항목: 이름, 이메일, 가입일")
            page.click("#send")
            expect(page.locator("#status")).to_have_text("done", timeout=30_000)
            expect(page.locator(".fb-up").last).to_have_text("Good")  # labelled, not bare icons
            # an error: the message alone, no empty answer bubble above it
            up.state.fail = True
            answers = page.locator(".msg.assistant").count()
            page.fill("#prompt", "오류가 나는 요청")
            page.click("#send")
            expect(page.locator(".msg.error").last).to_contain_text("error")
            assert page.locator(".msg.assistant").count() == answers
            up.state.fail = False
            side = page.locator("#side").bounding_box()
            assert side["width"] == 260 and side["height"] >= 700  # a side column on a desktop
            page.screenshot(path=str(SHOTS / "chat-desktop.png"))

            page.set_viewport_size({"width": 420, "height": 860})
            side, main = page.locator("#side").bounding_box(), page.locator("#main").bounding_box()
            assert side["width"] == 420 and main["y"] >= side["y"] + side["height"] - 1  # stacked above the chat
            assert page.evaluate("document.documentElement.scrollWidth") <= 420  # nothing wider than a phone
            page.screenshot(path=str(SHOTS / "chat-narrow.png"))
        finally:
            browser.close()
    for name in ("chat-desktop.png", "chat-narrow.png"):
        assert (SHOTS / name).stat().st_size > 10_000, name
