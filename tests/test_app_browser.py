"""The real app in a real browser: `streamlit run` on the demo registry, every page opened in headless
Chromium (Debian's, through playwright), waited on until its charts have drawn, screenshotted, and
failed on any exception box or request that leaves the machine.

Screenshots go to a temporary folder, and also to $NANOCHAT_SCREENSHOT_DIR when it is set (to look at
them). Skips with a message where Chromium or playwright is missing (under CI=true a skip fails).
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from tests.appserver import serve

CHROMIUM = Path("/usr/bin/chromium")
ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--disable-background-networking", "--disable-component-update",
        "--disable-sync"]
# page url path -> what must be drawn on it besides the header
PAGES = {
    "": ("Runs", 2),
    "checkpoints": ("Checkpoints", 1),
    "resume": ("Resume", 1),
    "integrity": ("Integrity", 1),
    "generate": ("Generate", 3),
    "compare": ("Compare", 1),
    "chat": ("Chat", 0),  # no conversation yet: the tiles and the chat input
    "builder": ("Conversation builder", 0),  # no conversation file in the demo yet: the editor, no histogram
    "calculator": ("Model calculator", 3),
    "tokenizer": ("Tokenizer", 1),
    "dataset": ("Dataset", 1),
    "attention": ("Attention", 6),  # grid, one head, one token, entropy, look-back, logit lens
    "lr-finder": ("LR finder", 0),  # no find in the demo: the empty state with the command
    "sweeps": ("Sweeps", 1),  # the demo's d1 and d2 runs differ in depth
}
CHART = '[data-testid="stVegaLiteChart"] :is(canvas, svg.marks)'

pytestmark = pytest.mark.browser


@pytest.fixture
def app_url(demo_base, tmp_path):
    """The app served on 127.0.0.1 over a private copy of the demo registry; stopped afterwards."""
    if not CHROMIUM.exists():
        pytest.skip(f"browser test needs Debian's chromium at {CHROMIUM} (apt-get install chromium; bash .ci/run does)")
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        pytest.skip("browser test needs playwright (pip install playwright; never `playwright install`)")
    reg = tmp_path / "reg"
    reg.mkdir()
    for f in demo_base.glob("registry.sqlite*"):
        shutil.copy(f, reg / f.name)
    env = {**os.environ, "NANOCHAT_REGISTRY_URL": str(reg / "registry.sqlite")}
    env.pop("NANOCHAT_BASE_DIR", None)
    # from another directory and with no address or usage-statistics flags: the app's own config must keep it
    # local (loopback, nothing sent off the machine; the test fails on any outside request)
    with serve(tmp_path, env) as served:
        yield served.url


def settle(page, charts: int) -> None:
    """Wait as BROWSER.md says: the script has finished, the charts have drawn, nothing is still loading."""
    page.wait_for_selector('[data-testid="stApp"][data-test-script-state="notRunning"]', timeout=90_000)
    page.wait_for_function(f"() => document.querySelectorAll('{CHART}').length >= {charts}", timeout=90_000)
    page.wait_for_function("() => !document.querySelector('[data-testid=stSkeleton]')"
                           " && !document.querySelector('[data-testid=stStatusWidget]')", timeout=90_000)
    page.wait_for_timeout(500)  # the last chart can draw just after the script state flips


def test_every_page_renders_in_chromium(app_url, tmp_path):
    from playwright.sync_api import sync_playwright

    out = tmp_path / "shots"
    out.mkdir()
    keep = Path(os.environ["NANOCHAT_SCREENSHOT_DIR"]) if os.environ.get("NANOCHAT_SCREENSHOT_DIR") else None
    external: list[str] = []
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), args=ARGS)
        page = browser.new_page(viewport={"width": 1400, "height": 1000})
        page.on("request", lambda r: external.append(r.url)
                if not r.url.startswith(("http://127.0.0.1", "data:", "blob:", "ws://127.0.0.1")) else None)
        try:
            for path, (title, charts) in PAGES.items():
                page.goto(f"{app_url}/{path}")
                settle(page, charts)
                name = path or "runs"
                page.screenshot(path=str(out / f"{name}.png"))
                if keep is not None:
                    keep.mkdir(parents=True, exist_ok=True)
                    shutil.copy(out / f"{name}.png", keep / f"{name}.png")
                errors = page.locator('[data-testid="stException"]')
                assert errors.count() == 0, f"{name}: {errors.first.inner_text()[:500]}"
                assert page.locator("h1").first.inner_text().strip() == title
                assert page.locator(CHART).count() >= charts, name
            # a click on a cell of the alternatives grid selects that step for inspection and branching
            page.goto(f"{app_url}/generate?n=12&prompt=KING+HENRY.")  # 12 generated steps: 12 columns (test_app_pages)
            settle(page, PAGES["generate"][1])
            grid = page.locator('[data-testid="stVegaLiteChart"]').first
            grid.scroll_into_view_if_needed()
            page.wait_for_timeout(300)
            box = grid.locator(":is(canvas, svg.marks)").first.bounding_box()
            # x: the 64 px label column, then 12 equal columns (step 3's centre); y: the top axis, then 32 px rows (#2)
            page.mouse.click(box["x"] + 64 + (box["width"] - 64) / 12 * 2.5, box["y"] + 20 + 32 * 2.5)
            page.wait_for_function("() => { const i = [...document.querySelectorAll('[data-testid=stNumberInput] input')].pop();"
                                   " return i && i.value === '3'; }", timeout=60_000)
            settle(page, PAGES["generate"][1])
            assert page.locator('[data-testid="stException"]').count() == 0
            # a click on a token of the text selects its step too
            page.locator('[data-step="5"]').first.click()
            page.wait_for_function("() => { const i = [...document.querySelectorAll('[data-testid=stNumberInput] input')].pop();"
                                   " return i && i.value === '5'; }", timeout=60_000)
            settle(page, PAGES["generate"][1])
            # the chat page: a message gets a streamed reply, then its token view (grid, entropy, the step's distribution)
            page.goto(f"{app_url}/chat?n=8")
            settle(page, 0)
            box = page.locator('[data-testid="stChatInput"] textarea')
            box.fill("Good morrow, my lord.")
            box.press("Enter")
            settle(page, 3)
            assert page.locator('[data-testid="stChatMessage"]').count() >= 2
            assert page.locator('[data-testid="stException"]').count() == 0
            page.screenshot(path=str(out / "chat-reply.png"), full_page=True)
            if keep is not None:
                shutil.copy(out / "chat-reply.png", keep / "chat-reply.png")
            # the sidebar says which registry is open
            assert "registry.sqlite" in page.locator('[data-testid="stSidebar"]').inner_text()
        finally:
            browser.close()
    assert not external, f"requests left the machine: {sorted(set(external))[:5]}"
    assert all((out / f"{p or 'runs'}.png").stat().st_size > 20_000 for p in PAGES)
