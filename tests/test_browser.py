"""The demo page in real headless Chromium (Debian's chromium, driven by Playwright): answer
two fields, SIGKILL the gateway and start it again; the page reconnects on its own and shows
the restored answers; a reload resumes again. The screenshot is kept in test-artifacts/."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

from tests.support.gateway_process import GatewayProcess
from tests.support.redis_server import RedisServer
from tests.support.tools import ensure

pytestmark = pytest.mark.slow

ARTIFACTS = Path(__file__).parent.parent / "test-artifacts"
TIMEOUT = 15_000  # ms, for each wait on the page


@pytest.fixture
async def browser() -> AsyncIterator[Any]:
    playwright = pytest.importorskip("playwright.async_api")
    executable = ensure("chromium", "chromium")  # Debian's; no browser download
    if executable is None:
        pytest.skip("chromium not found: apt-get install chromium")
    async with playwright.async_playwright() as pw:
        chromium = await pw.chromium.launch(
            executable_path=executable,
            args=["--no-sandbox", "--disable-background-networking"],
        )
        try:
            yield chromium
        finally:
            await chromium.close()


@contextmanager
def restartable(tmp_path: Path, *args: str) -> Iterator[tuple[GatewayProcess, GatewayProcess]]:
    """A gateway, started, and the one that takes its port when the test restarts it."""
    first = GatewayProcess(tmp_path / "first.log", *args)
    first.start()
    second = GatewayProcess(tmp_path / "second.log", *args, port=first.port)
    try:
        yield first, second
    finally:
        if second.proc is not None:
            second.terminate()
        elif first.proc is not None and first.proc.poll() is None:
            first.kill()


async def answer(page: Any, text: str, count: int) -> None:
    """Type an answer and wait until the page lists ``count`` answers."""
    from playwright.async_api import expect

    await page.fill("#text", text)
    await page.press("#text", "Enter")
    await expect(page.locator("#answers dt")).to_have_count(count, timeout=TIMEOUT)


async def test_demo_page_survives_a_gateway_restart_and_a_reload(
    browser: Any, tmp_path: Path, own_redis: RedisServer
) -> None:
    """Two answers given, then SIGKILL and restart: the page shows reconnecting, then open
    with "restored 2 answers" and both answers; after a reload, the same again."""
    from playwright.async_api import expect

    args = ["--redis-url", own_redis.url, "--downstream", "demo"]
    with restartable(tmp_path, *args) as (first, second):
        page = await browser.new_page()
        status = page.locator("#status")
        try:
            await page.goto(f"http://127.0.0.1:{first.port}/")
            await expect(status).to_have_text("open", timeout=TIMEOUT)
            await expect(page.locator("#log .agent").first).to_contain_text("name", timeout=TIMEOUT)
            await answer(page, "Ada Lovelace", 1)
            await answer(page, "Friday", 2)

            await asyncio.to_thread(first.kill)
            await expect(status).to_have_text("reconnecting", timeout=TIMEOUT)
            await asyncio.to_thread(second.start)
            await expect(status).to_have_text("open", timeout=TIMEOUT)
            await expect(page.locator("#restored")).to_have_text(
                "Reconnected: restored 2 answers.", timeout=TIMEOUT
            )
            await expect(page.locator("#answers")).to_contain_text("Ada Lovelace")
            ARTIFACTS.mkdir(exist_ok=True)
            await page.screenshot(path=str(ARTIFACTS / "demo-page-after-restart.png"))

            before = await page.locator("#log p").all_inner_texts()
            await page.reload()
            await expect(status).to_have_text("open", timeout=TIMEOUT)
            await expect(page.locator("#restored")).to_have_text(
                "Reconnected: restored 2 answers.", timeout=TIMEOUT
            )
            await expect(page.locator("#answers dt")).to_have_count(2)
            # The transcript is kept, and nothing the gateway replays is shown twice.
            after = await page.locator("#log p").all_inner_texts()
            assert after[: len(before)] == before and "Ada Lovelace" in before
            assert sum("What name" in line for line in after) == 1
            await answer(page, "a check-up", 3)
            await page.screenshot(path=str(ARTIFACTS / "demo-page-after-reload.png"))
        finally:
            await page.close()


async def test_demo_page_says_when_the_call_was_lost(browser: Any, tmp_path: Path) -> None:
    """On the memory store a restart loses the call: the page says so and starts the new one
    on a clean page, so that an answer cannot land on the old call's question."""
    from playwright.async_api import expect

    with restartable(tmp_path, "--downstream", "demo") as (first, second):
        page = await browser.new_page()
        try:
            await page.goto(f"http://127.0.0.1:{first.port}/")
            await answer(page, "Ada Lovelace", 1)
            await asyncio.to_thread(first.kill)
            await asyncio.to_thread(second.start)
            await expect(page.locator("#restored")).to_contain_text("was lost", timeout=TIMEOUT)
            await expect(page.locator("#log .agent")).to_have_count(1, timeout=TIMEOUT)
            await expect(page.locator("#log p")).to_have_count(1)  # the new greeting, alone
            await expect(page.locator("#log .agent")).to_contain_text("What name")
            await expect(page.locator("#answers dt")).to_have_count(0)
        finally:
            await page.close()


@pytest.mark.parametrize("width", [1280, 390], ids=["desktop", "phone"])
async def test_demo_page_ends_the_call_and_starts_another(
    browser: Any, tmp_path: Path, width: int
) -> None:
    """Booked and confirmed, the page hangs up: status closed, "The call is over.", and a
    button that starts a new call. No console error on the way (a favicon 404 was one)."""
    from playwright.async_api import expect

    gw = GatewayProcess(tmp_path / "gw.log", "--downstream", "demo")
    gw.start()
    page = await browser.new_page(viewport={"width": width, "height": 844})
    errors: list[str] = []
    page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
    try:
        await page.goto(f"http://127.0.0.1:{gw.port}/")
        for n, text in enumerate(["Ada Lovelace", "Friday", "a check-up", "yes"], start=1):
            await answer(page, text, n)
        await expect(page.locator("#status")).to_have_text("closed", timeout=TIMEOUT)
        await expect(page.locator("#log p").last).to_have_text("The call is over.")
        await expect(page.locator("#log")).to_contain_text("Booked: Ada Lovelace on Friday")
        await expect(page.locator("#text")).to_be_disabled()
        ARTIFACTS.mkdir(exist_ok=True)
        await page.screenshot(path=str(ARTIFACTS / f"demo-page-call-over-{width}.png"))
        await page.click("#again")
        await expect(page.locator("#status")).to_have_text("open", timeout=TIMEOUT)
        await expect(page.locator("#log p")).to_have_count(1, timeout=TIMEOUT)
        await expect(page.locator("#answers dt")).to_have_count(0)
        await expect(page.locator("#again")).to_be_hidden()
    finally:
        await page.close()
        gw.terminate()
    assert errors == []


async def test_browser_passes_its_token_as_a_subprotocol_or_in_the_query(
    browser: Any, tmp_path: Path
) -> None:
    """In Chromium, a token offered as a subprotocol beside hangon.v1 (answered hangon.v1)
    or in the query string opens the session; a page from an origin not allowed is refused
    at the upgrade."""
    from tests.support.authkeys import keys_document, token

    keys = tmp_path / "keys.json"
    keys.write_text(keys_document())
    gw = GatewayProcess(tmp_path / "gw.log", "--auth-keys", str(keys), "--downstream", "off")
    gw.start()
    caller = {"user_id": "browser-1", "call_id": "c1"}
    jwt = token(caller)
    script = """async ([url, protocols, caller]) => {
        const ws = new WebSocket(url, protocols);
        const opened = await new Promise((resolve) => {
            ws.onopen = () => resolve(true);
            ws.onclose = () => resolve(false);
        });
        if (!opened) return {opened};
        ws.send(JSON.stringify({type: "hello", tenant: "acme", caller}));
        const frame = await new Promise((resolve) => { ws.onmessage = (e) => resolve(e.data); });
        ws.close();
        return {opened, protocol: ws.protocol, frame: JSON.parse(frame)};
    }"""
    page = await browser.new_page()
    try:
        await page.goto(f"http://127.0.0.1:{gw.port}/")
        ws_url = f"ws://127.0.0.1:{gw.port}/ws"
        by_protocol = await page.evaluate(
            script, [ws_url, ["hangon.v1", f"hangon.token.{jwt}"], caller]
        )
        assert by_protocol["protocol"] == "hangon.v1"
        assert by_protocol["frame"]["type"] == "welcome"
        by_query = await page.evaluate(script, [f"{ws_url}?token={jwt}", [], caller])
        assert by_query["frame"]["type"] == "welcome" and by_query["frame"]["resumed"] is True
        none = await page.evaluate(script, [ws_url, [], caller])
        assert none["frame"]["code"] == "auth_failed"
    finally:
        await page.close()
        gw.terminate()
    strict = GatewayProcess(
        tmp_path / "strict.log",
        "--auth-keys",
        str(keys),
        "--allowed-origins",
        "https://app.example.com",
        "--downstream",
        "off",
    )
    strict.start()
    page = await browser.new_page()
    try:
        await page.goto(f"http://127.0.0.1:{strict.port}/")
        refused = await page.evaluate(
            script,
            [f"ws://127.0.0.1:{strict.port}/ws", ["hangon.v1", f"hangon.token.{jwt}"], caller],
        )
        assert refused == {"opened": False}
    finally:
        await page.close()
        strict.terminate()
    assert "upgrade refused: origin not allowed" in (tmp_path / "strict.log").read_text()
