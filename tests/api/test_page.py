"""The live typing page and the operations view, in headless Chromium (Playwright) against a
real `nextword serve` with the bundled models.

Skipped without the `playwright` package or a Chromium binary (`apt-get install chromium`;
no browser download: Playwright drives the system's Chromium). Every test fails on a
console error or an uncaught exception in the page. The typing test writes the
documentation's screenshot of the page, docs/page.png; the operations view test writes
docs/ops.png.
"""

from __future__ import annotations

import asyncio
import hashlib
import io
import os
import re
import shutil
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest
from websockets.asyncio.server import ServerConnection
from websockets.asyncio.server import serve as ws_serve
from websockets.datastructures import Headers
from websockets.http11 import Request, Response

from service.api.routes import STATIC_DIR as STATIC
from service.client import Client
from tests.live_server import BUNDLED_MODELS, ROOT, LiveServer
from tests.redis_server import REDIS_SERVER, RedisServer, needs_redis
from tests.system.test_client import RestartingServer

try:
    from playwright.sync_api import Browser, Page, expect, sync_playwright
except ImportError:  # pragma: no cover - depends on the environment
    sync_playwright = None

CHROMIUM = os.environ.get("NEXTWORD_CHROMIUM") or shutil.which("chromium") or "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
    "--num-raster-threads=1",  # the same pixels every run: the screenshot file only changes with the page
]
SCREENSHOT = ROOT / "docs" / "page.png"
OPS_SCREENSHOT = ROOT / "docs" / "ops.png"
# What the operations view is drawn from: its screenshot is redone when one of them changes.
OPS_SOURCES = [
    ROOT / "service" / "api" / "static" / name for name in ("ops.html", "ops.js", "style.css")
]
OPS_KEY = "nextword-ops-sources"  # the PNG text chunk holding their digest
VIEWPORT = {"width": 960, "height": 720}
# What the browser itself logs while the server is down; nothing the page could avoid.
REFUSED_WEBSOCKET = r"^WebSocket connection to 'ws://127\.0\.0\.1:\d+/v1/stream\?.*' failed"

pytestmark = [
    pytest.mark.browser,
    pytest.mark.slow,
    pytest.mark.skipif(sync_playwright is None, reason="the playwright package is not installed"),
    pytest.mark.skipif(
        not Path(CHROMIUM).exists(), reason=f"no Chromium at {CHROMIUM} (apt-get install chromium)"
    ),
]


# --- fixtures ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    expect.set_options(timeout=15_000)
    with sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield chromium
        chromium.close()


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    live = LiveServer(BUNDLED_MODELS, tmp_path_factory.mktemp("page") / "serve.log")
    live.start()
    try:
        yield live
    finally:
        live.stop()


class Tab:
    """A page in a fresh browser context, with the console errors it logged."""

    def __init__(self, browser: Browser, **context: Any) -> None:
        self.context = browser.new_context(**{"viewport": VIEWPORT, **context})
        self.page: Page = self.context.new_page()
        self.errors: list[str] = []
        self.allowed: list[str] = []  # patterns of console errors a test expects
        self.page.on("console", lambda m: m.type == "error" and self.errors.append(m.text))
        self.page.on("pageerror", lambda exc: self.errors.append(f"uncaught: {exc}"))

    def unexpected_errors(self) -> list[str]:
        return [e for e in self.errors if not any(re.search(p, e) for p in self.allowed)]


@pytest.fixture
def tab(browser: Browser) -> Iterator[Tab]:
    tab = Tab(browser)
    yield tab
    tab.context.close()
    assert tab.unexpected_errors() == [], "console errors in the page"


# --- helpers -------------------------------------------------------------------------------


def open_page(page: Page, url: str) -> None:
    page.goto(url + "/")
    expect(page.locator("#connection")).to_have_attribute("data-state", "open")
    expect(page.locator("#suggestions .chip").first).to_be_visible()


def words(page: Page) -> Any:
    return page.locator("#suggestions .chip .word")


def expect_suggestions(page: Page, expected: list[str]) -> None:
    """The chips show `expected`, in order, and no answer is pending."""
    expect(words(page)).to_have_text(expected)
    expect(page.locator("#suggestions")).to_have_attribute("aria-busy", "false")


def capitalised(words: list[str]) -> list[str]:
    """The words, which the server sends capitalised at a sentence start (the page shows
    the server's forms as they come); checked here, not redone."""
    assert words and all(w[:1] == w[:1].upper() for w in words), words
    return words


def predicted(server: LiveServer, text: str, **options: Any) -> list[str]:
    with Client(server.url) as client:
        return client.predict(text, **options).words


# --- the typing page -----------------------------------------------------------------------


def test_typing_shows_suggestions_and_a_prefix_narrows_them(tab: Tab, server: LiveServer) -> None:
    page = tab.page
    open_page(page, server.url)
    text = page.locator("#text")
    expect(text).to_be_focused()  # ready to type, no click needed
    # The start of a text: the words a keyboard would offer, capitalised.
    expect_suggestions(page, capitalised(predicted(server, "")))

    text.press_sequentially("I am coming ")
    expect_suggestions(page, predicted(server, "I am coming"))
    expect(page.locator("#tokens")).to_have_text("3")
    expect(page.locator("#latency")).to_have_text(re.compile(r"^\d+\.\d ms$"))
    expect(page.locator("#session-model")).to_have_text("lstm")
    expect(page.locator(".chip .bar").first).to_be_visible()  # probability bars
    expect(page.locator(".chip .probability").first).to_have_text(re.compile(r"^\d+(\.\d+)?%$"))
    live = page.locator("#suggestions-live")
    expect(live).to_have_attribute("aria-live", "polite")
    expect(live).to_have_text("Suggestions: " + ", ".join(predicted(server, "I am coming")))

    # A partly typed word is a prefix: it narrows the suggestions and is not fed.
    text.press_sequentially("h")
    with_h = predicted(server, "I am coming", prefix="h")
    assert with_h and all(w.lower().startswith("h") for w in with_h)
    expect_suggestions(page, with_h)
    expect(page.locator("#tokens")).to_have_text("3")
    write_screenshot(page)

    text.press_sequentially("o")
    with_ho = predicted(server, "I am coming", prefix="ho")
    with Client(server.url) as client:
        answer = client.predict("I am coming", prefix="ho").predictions
    # Words starting with "ho", or a slip away from it ("now": n is next to h), marked.
    assert with_ho != with_h and all(p.word.startswith("ho") or p.corrected for p in answer)
    expect_suggestions(page, with_ho)
    corrected = [p.word for p in answer if p.corrected]
    expect(page.locator("#suggestions .chip.corrected .word")).to_have_text(corrected)
    expect(page.locator("#tokens")).to_have_text("3")

    # Backspace widens them again; the session is unchanged.
    text.press("Backspace")
    expect_suggestions(page, with_h)
    expect(page.locator("#tokens")).to_have_text("3")


def test_a_name_typed_twice_is_suggested_until_forgotten(tab: Tab, server: LiveServer) -> None:
    page = tab.page
    open_page(page, server.url)
    text = page.locator("#text")
    # Long enough for the memory to mix (it waits for ~20 words), the name a few words back
    # (the words just typed are never raised).
    typed = (
        "Say hello to Zorblax. Zorblax said hi to the team and the team said hi to Zorblax. "
        "Then we all went home and said hi to"
    )
    text.press_sequentially(typed + " ")
    adapted = predicted(server, typed)
    assert "Zorblax" in adapted and "Zorblax" not in predicted(server, typed, adapt=False)
    expect_suggestions(page, adapted)  # the writer's own word, as typed, among the chips
    page.locator("#adapt").uncheck()  # the model alone
    expect_suggestions(page, predicted(server, typed, adapt=False))
    page.locator("#adapt").check()
    expect_suggestions(page, adapted)
    text.press_sequentially("zo")  # prefix completion finds it too
    expect(words(page).first).to_have_text("Zorblax")
    page.locator("#forget").click()
    expect(words(page).filter(has_text="Zorblax")).to_have_count(0)
    expect(page.locator("#tokens")).to_have_text(str(len(typed.replace(".", " .").split())))


def write_screenshot(page: Page) -> None:
    """docs/page.png: the page down to the suggestions (the session id and latency, which
    change every run, stay out of it, so an unchanged page gives the same file)."""
    SCREENSHOT.parent.mkdir(exist_ok=True)
    box = page.locator(".suggestions").bounding_box()
    assert box is not None
    clip = {"x": 0, "y": 0, "width": VIEWPORT["width"], "height": box["y"] + box["height"] + 16}
    page.screenshot(path=str(SCREENSHOT), clip=clip, animations="disabled", caret="hide")
    assert SCREENSHOT.stat().st_size > 10_000


def test_accepting_a_suggestion_inserts_it_and_new_suggestions_arrive(
    tab: Tab, server: LiveServer
) -> None:
    page = tab.page
    open_page(page, server.url)
    text = page.locator("#text")
    text.press_sequentially("I am coming h")
    first = predicted(server, "I am coming", prefix="h")[0]
    expect_suggestions(page, predicted(server, "I am coming", prefix="h"))

    # Tab accepts the first suggestion: the word, a space, and the next word's suggestions.
    text.press("Tab")
    expect(text).to_have_value(f"I am coming {first} ")
    expect(text).to_be_focused()
    expect(page.locator("#tokens")).to_have_text("4")
    after_first = predicted(server, f"I am coming {first}")
    expect_suggestions(page, after_first)

    # A click accepts any chip.
    second = after_first[1]
    page.locator("#suggestions .chip").nth(1).click()
    expect(text).to_have_value(f"I am coming {first} {second} ")
    expect(page.locator("#tokens")).to_have_text("5")
    expect_suggestions(page, predicted(server, f"I am coming {first} {second}"))

    # Punctuation after an accepted word attaches to it, as on a phone keyboard.
    text.press_sequentially(",")
    expect(text).to_have_value(f"I am coming {first} {second}, ")
    expect(page.locator("#tokens")).to_have_text("6")
    expect_suggestions(page, predicted(server, f"I am coming {first} {second} ,"))

    # Keyboard only: Esc releases Tab, which then moves to the chips; Enter picks one.
    page.keyboard.press("Escape")
    page.keyboard.press("Tab")
    expect(page.locator("#suggestions .chip").first).to_be_focused()
    page.keyboard.press("Tab")
    chosen = page.locator("#suggestions .chip").nth(1).get_attribute("data-word")
    page.keyboard.press("Enter")
    expect(text).to_be_focused()
    expect(text).to_have_value(f"I am coming {first} {second}, {chosen} ")
    expect(page.locator("#tokens")).to_have_text("7")

    # A sentence end: the mark attaches, the next suggestions are capitalised.
    text.press_sequentially(".")
    expect(text).to_have_value(f"I am coming {first} {second}, {chosen}. ")
    expect(page.locator("#tokens")).to_have_text("8")  # "." is one end-of-sentence token
    typed = f"I am coming {first} {second}, {chosen}."
    expect_suggestions(page, capitalised(predicted(server, typed)))

    # Enter right after an accepted word ends the line there (no trailing space).
    page.keyboard.press("Tab")
    accepted = capitalised(predicted(server, typed))[0]
    page.keyboard.press("Enter")
    expect(text).to_have_value(f"{typed} {accepted}\n")
    expect(page.locator("#tokens")).to_have_text("9")


def test_editing_earlier_words_the_model_picker_and_k(tab: Tab, server: LiveServer) -> None:
    page = tab.page
    open_page(page, server.url)
    text = page.locator("#text")
    text.press_sequentially("I am coming home ")
    expect(page.locator("#tokens")).to_have_text("4")
    lstm_session = page.locator("#session-id").inner_text()

    # Rewriting the text: the session starts afresh with the new words.
    text.press("Control+a")
    text.press_sequentially("You are ")
    expect(page.locator("#tokens")).to_have_text("2")
    expect_suggestions(page, predicted(server, "You are"))
    expect(page.locator("#session-id")).to_have_text(lstm_session)

    # The model picker lists /v1/models; another model is another session, fed the text.
    expect(page.locator("#model option")).to_have_count(2)
    page.locator("#model").select_option("gru")
    expect(page.locator("#session-model")).to_have_text("gru")
    expect(page.locator("#session-id")).not_to_have_text(lstm_session)
    expect(page.locator("#tokens")).to_have_text("2")
    expect_suggestions(page, predicted(server, "You are", model="gru"))

    # k: how many suggestions.
    page.locator("#k").fill("3")
    expect_suggestions(page, predicted(server, "You are", model="gru", k=3))
    page.locator("#k").fill("12")
    expect_suggestions(page, predicted(server, "You are", model="gru", k=12))

    page.locator("#clear").click()
    expect(text).to_have_value("")
    expect(page.locator("#tokens")).to_have_text("0")
    expect_suggestions(page, capitalised(predicted(server, "", model="gru", k=12)))


def test_the_page_is_readable_at_phone_width(browser: Browser, server: LiveServer) -> None:
    tab = Tab(browser, viewport={"width": 360, "height": 740}, is_mobile=True, has_touch=True)
    page = tab.page
    try:
        open_page(page, server.url)
        page.locator("#text").press_sequentially("I am coming h")
        expect_suggestions(page, predicted(server, "I am coming", prefix="h"))
        layout = page.evaluate(
            """() => ({
                overflow: document.documentElement.scrollWidth - window.innerWidth,
                text: document.querySelector('#text').getBoundingClientRect().width,
                font: parseFloat(getComputedStyle(document.querySelector('#text')).fontSize),
                chips: [...document.querySelectorAll('.chip')].map(c => c.getBoundingClientRect().right),
            })"""
        )
        assert layout["overflow"] <= 0, layout  # no sideways scrolling
        assert layout["text"] >= 320 and layout["font"] >= 16, layout
        assert layout["chips"] and max(layout["chips"]) <= 360, layout
        page.locator("#suggestions .chip").first.tap()
        expect(page.locator("#tokens")).to_have_text("4")
    finally:
        tab.context.close()
    assert tab.unexpected_errors() == []


def test_the_page_tokenizer_matches_the_server_one(tab: Tab, server: LiveServer) -> None:
    """nextword.js counts tokens to resume a session: it must split texts as the server does."""
    from service.contract.tokenizer import tokenize

    texts = [
        "I am coming home.",
        "Don\u2019t stop... well-known, isn't it?! Yes; no: maybe\u2026",
        "\uff28\uff45\uff4c\uff4c\uff4f \u00c9COLE caf\u00e9 na\u00efve 123 4th",
        "quotes \"here\" (and) [there] \U0001f600 emoji_under_score -dash- 'lead trail'",
        "\u041f\u0440\u0438\u0432\u0435\u0442 \u043c\u0438\u0440 \u4f60\u597d \u0645\u0631\u062d\u0628\u0627",
        "a--b a''b end. . . and?! !?",
    ]
    page = tab.page
    page.goto(server.url + "/")
    got = page.evaluate(
        "async (texts) => { const m = await import('/static/nextword.js');"
        " return texts.map((t) => m.tokenize(t)); }",
        texts,
    )
    assert got == [tokenize(t) for t in texts]
    typing = page.evaluate(
        """async () => {
            const m = await import('/static/nextword.js');
            return {
                split: m.splitTyping('I am co'),
                splitAfterSpace: m.splitTyping('I am '),
                merged: m.typingDelta('Hi.', 'Hi.. '),
                next: m.typingDelta('I am ', 'I am coming, '),
                edited: m.typingDelta('I am ', 'You '),
            };
        }"""
    )
    assert typing == {
        "split": {"complete": "I am ", "partial": "co"},
        "splitAfterSpace": {"complete": "I am ", "partial": ""},
        "merged": "",  # ".." after "." is still one end of sentence
        "next": "coming,",
        "edited": None,  # not a continuation: the page resets the session
    }


# --- reconnecting ---------------------------------------------------------------------------


def type_then_restart(tab: Tab, live: LiveServer) -> str:
    """Type, stop the server, type while it is down, start it again; the session id before."""
    page = tab.page
    tab.allowed.append(REFUSED_WEBSOCKET)
    open_page(page, live.url)
    text = page.locator("#text")
    text.press_sequentially("I am coming ")
    expect(page.locator("#tokens")).to_have_text("3")
    session_id = page.locator("#session-id").inner_text()

    live.stop()
    connection = page.locator("#connection")
    expect(connection).to_have_attribute("data-state", "reconnecting")
    expect(connection).to_have_text(re.compile("Server unreachable: reconnecting"))
    text.press_sequentially("home ")  # typed while the server is away
    expect(page.locator("#suggestions")).to_have_attribute("aria-busy", "true")

    live.start()
    expect(connection).to_have_attribute("data-state", "open")
    expect(connection).to_have_text("Connected")
    return session_id


@needs_redis
def test_a_restart_with_redis_continues_the_session(tab: Tab, tmp_path: Path) -> None:
    redis = RedisServer()
    redis.start()
    live = LiveServer(BUNDLED_MODELS, tmp_path / "serve.log", NEXTWORD_SESSION_STORE=redis.url)
    try:
        live.start()
        session_id = type_then_restart(tab, live)
        page = tab.page
        # The same session, holding the words from before the restart and those typed during it.
        expect(page.locator("#session-id")).to_have_text(session_id)
        expect(page.locator("#tokens")).to_have_text("4")
        expect_suggestions(page, predicted(live, "I am coming home"))
        with Client(live.url) as client:
            assert client.session(session_id).tokens == 4
    finally:
        live.stop()
        redis.stop()


def test_a_restart_without_redis_starts_a_new_session_with_the_text(
    tab: Tab, tmp_path: Path
) -> None:
    live = LiveServer(BUNDLED_MODELS, tmp_path / "serve.log")
    try:
        live.start()
        session_id = type_then_restart(tab, live)
        page = tab.page
        # The server forgot the session (4404): the page opens a new one and feeds it the text.
        expect(page.locator("#session-id")).not_to_have_text(session_id)
        expect(page.locator("#tokens")).to_have_text("4")
        expect_suggestions(page, predicted(live, "I am coming home"))
    finally:
        live.stop()


def kill_engine(live: LiveServer) -> None:
    """SIGKILL the engine process: the child of `nextword serve` not listening on its port."""
    assert live.proc is not None
    for child in psutil.Process(live.proc.pid).children():
        if "--multiprocessing-fork" not in " ".join(child.cmdline()):
            continue
        if not any(c.laddr and c.laddr.port == live.port for c in child.net_connections()):
            child.kill()
            return
    pytest.fail("no engine process")


@pytest.mark.parametrize("store", ["redis", "memory"])
def test_an_engine_crash_shows_reconnecting_and_typing_continues(
    tab: Tab, tmp_path: Path, store: str
) -> None:
    if store == "redis" and REDIS_SERVER is None:
        pytest.skip("no redis-server binary")
    redis = RedisServer()
    env = {"NEXTWORD_ENGINE_RESTART_WAIT_S": "0"}  # answered engine_restarting at once
    if store == "redis":
        redis.start()
        env["NEXTWORD_SESSION_STORE"] = redis.url
    live = LiveServer(BUNDLED_MODELS, tmp_path / "serve.log", **env)
    tab.allowed.append(REFUSED_WEBSOCKET)  # once the test stops the server, not before
    try:
        live.start()
        page = tab.page
        open_page(page, live.url)
        text = page.locator("#text")
        text.press_sequentially("I am coming ")
        expect(page.locator("#tokens")).to_have_text("3")
        session_id = page.locator("#session-id").inner_text()

        kill_engine(live)
        text.press_sequentially("home ")  # typed while the engine restarts
        connection = page.locator("#connection")
        expect(connection).to_have_attribute("data-state", "reconnecting")
        expect(connection).to_have_text(re.compile("The server is restarting: reconnecting"))
        expect(connection).to_have_attribute("data-state", "open")
        expect(page.locator("#tokens")).to_have_text("4")
        expect_suggestions(page, predicted(live, "I am coming home"))
        if store == "redis":  # the same session, every word once
            expect(page.locator("#session-id")).to_have_text(session_id)
            with Client(live.url) as client:
                assert client.session(session_id).tokens == 4
        else:  # the session died with the engine: a new one, fed the whole text
            expect(page.locator("#session-id")).not_to_have_text(session_id)
    finally:
        live.stop()
        redis.stop()


class ScriptedOrigin:
    """A scripted WebSocket server (`RestartingServer`) that also serves a blank page and
    nextword.js over HTTP, so that the page and its stream share one origin."""

    def __init__(self, scripted: RestartingServer) -> None:
        self.scripted = scripted
        self.port = 0
        self._loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._stop: asyncio.Future[None] | None = None
        self._thread = threading.Thread(target=self._loop.run_until_complete, args=(self._serve(),))

    def _respond(self, connection: ServerConnection, request: Request) -> Response | None:
        if request.headers.get("Upgrade", "").lower() == "websocket":
            return None
        if request.path == "/nextword.js":
            body, kind = (STATIC / "nextword.js").read_bytes(), "text/javascript"
        else:
            body, kind = b"<!doctype html><title>scripted</title>", "text/html"
        headers = Headers([("Content-Type", kind), ("Content-Length", str(len(body)))])
        return Response(200, "OK", headers, body)

    async def _serve(self) -> None:
        self._stop = self._loop.create_future()
        async with ws_serve(
            self.scripted.handler, "127.0.0.1", 0, process_request=self._respond
        ) as server:
            self.port = server.sockets[0].getsockname()[1]
            self._ready.set()
            await self._stop

    def __enter__(self) -> ScriptedOrigin:
        self._thread.start()
        assert self._ready.wait(10)
        return self

    def __exit__(self, *exc_info: object) -> None:
        assert self._stop is not None
        self._loop.call_soon_threadsafe(self._stop.set_result, None)
        self._thread.join(10)
        self._loop.close()


@pytest.mark.parametrize(
    ("maybe_applied", "applied", "texts"),
    [
        (False, False, ["coming home", "coming home"]),
        (True, False, ["coming home", "", "coming home"]),
        (True, True, ["coming home", ""]),
    ],
    ids=["not applied: sent again", "maybe, was not: probed, sent again", "maybe, was: probed"],
)
def test_the_browser_client_retries_engine_restarting_without_feeding_twice(
    tab: Tab, maybe_applied: bool, applied: bool, texts: list[str]
) -> None:
    scripted = RestartingServer(maybe_applied, applied)
    with ScriptedOrigin(scripted) as origin:
        tab.page.goto(f"http://127.0.0.1:{origin.port}/")
        result = tab.page.evaluate(
            """async () => {
                const { NextwordStream } = await import("/nextword.js");
                const stream = new NextwordStream(location.origin);
                const states = [];
                stream.addEventListener("state", (e) => states.push(e.detail.reason || e.detail.state));
                await stream.open();
                const answer = await stream.send({ text: "coming home", prefix: "t" });
                stream.close();
                return { tokens: answer.tokens, reconnects: stream.reconnects, states };
            }"""
        )
    assert [m["text"] for m in scripted.received] == texts
    assert all(m["prefix"] == "t" for m in scripted.received)
    assert result["tokens"] == 4 and result["reconnects"] == 0, result
    assert "engine_restarting" in result["states"], result  # shown as reconnecting


# --- the operations view ---------------------------------------------------------------------


def test_the_operations_view_shows_live_figures(tab: Tab, server: LiveServer) -> None:
    page = tab.page
    page.goto(server.url + "/ops")
    expect(page.locator("#connection")).to_have_attribute("data-state", "open")
    updated = page.locator("#updated").inner_text()
    expect(page.locator("#updated")).not_to_have_text(updated)  # refreshed every second

    with Client(server.url) as client, client.stream() as stream:
        for n in range(30):
            client.predict("I am coming", k=3)
            stream.send("word" if n % 2 else "", prefix="h")
        expect(page.locator("#requests-rate")).to_have_text(
            re.compile(r"^(?:[1-9]\d*(?:\.\d)?|0\.[1-9])$")
        )
        expect(page.locator("#steps-rate")).to_have_text(
            re.compile(r"^(?:[1-9]\d*(?:\.\d)?|0\.[1-9])$")
        )
        expect(page.locator("#latency-p50")).to_have_text(re.compile(r"^\d+\.\d+ ms$"))
        expect(page.locator("#latency-p99")).to_have_text(re.compile(r"^\d+\.\d+ ms$"))
        expect(page.locator("#batch-mean")).to_have_text(re.compile(r"^\d+\.\d$"))
        expect(page.locator("#active-sessions")).to_have_text(re.compile(r"^[1-9]\d*$"))
        expect(page.locator("#ws-connections")).to_have_text(re.compile(r"^[1-9]\d*$"))
        expect(page.locator("#batches .bar").first).to_be_visible()
        expect(page.locator("#engine-restarts")).to_have_text("0")
        write_ops_screenshot(page)


def write_ops_screenshot(page: Page) -> None:
    """docs/ops.png: the operations view under the load above. Its figures are live, so
    the file is rewritten only when it is missing or the view's sources changed (their
    digest is kept in the PNG), not on every run."""
    from PIL import Image, PngImagePlugin

    digest = hashlib.sha256(b"".join(path.read_bytes() for path in OPS_SOURCES)).hexdigest()
    if OPS_SCREENSHOT.exists():
        with Image.open(OPS_SCREENSHOT) as old:
            if getattr(old, "text", {}).get(OPS_KEY) == digest:
                return
    box = page.locator("#updated").bounding_box()  # the view ends with its "Updated" line
    assert box is not None
    clip = {"x": 0, "y": 0, "width": VIEWPORT["width"], "height": box["y"] + box["height"] + 16}
    shot = page.screenshot(clip=clip, animations="disabled", caret="hide")
    info = PngImagePlugin.PngInfo()
    info.add_text(OPS_KEY, digest)
    with Image.open(io.BytesIO(shot)) as image:
        image.save(OPS_SCREENSHOT, pnginfo=info, optimize=True)
    assert OPS_SCREENSHOT.stat().st_size > 10_000
