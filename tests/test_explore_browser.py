"""The model explorer in a real browser: headless Chromium, driven by Selenium, against the real server.

The page is served by uvicorn on 127.0.0.1 (conftest's `loopback_server`) for a tiny two-checkpoint run, and
every check reads what the page drew against what Python computes: the tokenizer's tokens, the API's arrays,
softmax(logits / T) for the temperature slider. Screenshots land in $BINARYLM_EXPLORER_ARTIFACTS (default
test-artifacts/explorer/) for a person to look at when something fails.

Chromium and its driver come from the system (`make browser`, which `make test` runs, installs Debian's
chromium and chromium-driver); the module is skipped, saying so, only when no Chromium can be found.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
from pathlib import Path
from urllib.parse import quote

import pytest

ROOT = Path(__file__).resolve().parent.parent
DEMO_RUN = ROOT / "runs" / "demo-base"  # what `make demo` trains: 4 layers, 256 wide, 8192 tokens


def find_chromium() -> tuple[str, str] | None:
    """(browser, driver) paths: $BINARYLM_CHROMIUM / $BINARYLM_CHROMEDRIVER, else the system's; None if absent."""
    browser = os.environ.get("BINARYLM_CHROMIUM") or next(
        (found for name in ("chromium", "chromium-browser", "google-chrome") if (found := shutil.which(name))), None)
    driver = os.environ.get("BINARYLM_CHROMEDRIVER") or shutil.which("chromedriver")
    if browser is None or driver is None or not Path(browser).exists() or not Path(driver).exists():
        return None
    return browser, driver


CHROMIUM = find_chromium()
pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="no Chromium and ChromeDriver found (`make browser` installs "
                                                         "Debian's chromium and chromium-driver; or set "
                                                         "BINARYLM_CHROMIUM and BINARYLM_CHROMEDRIVER)")
webdriver = pytest.importorskip("selenium.webdriver", reason="selenium is not installed (pip install -e '.[dev]')")
fastapi = pytest.importorskip("fastapi")

from selenium.common.exceptions import TimeoutException  # noqa: E402
from selenium.webdriver.chrome.service import Service  # noqa: E402
from selenium.webdriver.common.action_chains import ActionChains  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.common.keys import Keys  # noqa: E402
from selenium.webdriver.support.ui import Select, WebDriverWait  # noqa: E402

# Without the background-networking switches Chromium keeps calling home, which a closed network refuses.
CHROMIUM_FLAGS = ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--disable-dev-shm-usage", "--hide-scrollbars", "--force-device-scale-factor=1")


def start_chromium(profile_dir: str | Path, width: int = 1400, height: int = 1000):
    """A headless Chromium with a fresh profile in `profile_dir`, its console log kept."""
    browser, driver = CHROMIUM
    options = webdriver.ChromeOptions()
    options.binary_location = browser
    for flag in (*CHROMIUM_FLAGS, f"--user-data-dir={profile_dir}", f"--window-size={width},{height}"):
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    return webdriver.Chrome(service=Service(driver), options=options)


def artifacts_dir() -> Path:
    folder = Path(os.environ.get("BINARYLM_EXPLORER_ARTIFACTS", ROOT / "test-artifacts" / "explorer"))
    folder.mkdir(parents=True, exist_ok=True)
    return folder


# ------------------------------------------------------------------ the page, as the tests drive it

VISIBLE = {" ": "·", "\n": "↵", "\t": "→", "\r": "␍"}  # how the page shows whitespace inside a token


def visible(text: str) -> str:
    return "∅" if text == "" else "".join(VISIBLE.get(c, c) for c in text)


# Counts the page's busy -> idle transitions (one per finished computation) and notes when the frame after each
# one was painted, so a test knows that *its* click was answered and how long the answer took to draw.
WATCH_BUSY = """
if (!window.__explorerWatch) {
  const watch = window.__explorerWatch = {done: 0, paintedAt: null};
  new MutationObserver((records) => {
    for (const record of records) {
      if ((record.oldValue || '').split(/\\s+/).includes('busy') && !document.body.classList.contains('busy')) {
        watch.done += 1;
        requestAnimationFrame(() => setTimeout(() => { watch.paintedAt = performance.now(); }, 0));
      }
    }
  }).observe(document.body, {attributes: true, attributeFilter: ['class'], attributeOldValue: true});
}
return window.__explorerWatch.done;
"""


class ExplorerPage:
    """The explorer page open in a browser, with the moves a person makes on it."""

    def __init__(self, driver, base_url: str, timeout: float = 60.0):
        self.driver, self.base_url, self.timeout = driver, base_url, timeout
        self.expected_console: tuple[str, ...] = ()  # words of console errors a test provokes on purpose

    def open(self, query: str = "") -> ExplorerPage:
        self.driver.get(f"{self.base_url}/explore{query}")
        self.wait_for("the page's first analysis", lambda: self.idle() and (self.tokens() or self.error()))
        self.wait_for("the embedding map", lambda: not self.text("embedding-info").startswith("loading"))
        self.driver.execute_script(WATCH_BUSY)
        return self

    def element(self, element_id: str):
        return self.driver.find_element(By.ID, element_id)

    def text(self, element_id: str) -> str:
        return self.element(element_id).get_attribute("textContent")

    def idle(self) -> bool:
        return not self.driver.execute_script("return document.body.classList.contains('busy')")

    def error(self) -> str:
        """The message in #error, or '' while it is hidden."""
        box = self.element("error")
        return "" if box.get_attribute("hidden") is not None else box.get_attribute("textContent")

    def wait_for(self, what: str, condition, timeout: float | None = None):
        try:
            return WebDriverWait(self.driver, timeout or self.timeout, poll_frequency=0.05).until(lambda _: condition())
        except TimeoutException:
            raise AssertionError(f"the page never showed {what} (error box: {self.error()!r}, "
                                 f"status: {self.text('status')!r})") from None

    def answered(self, action) -> None:
        """Do `action` (a click that makes the page compute) and wait until the page has drawn the answer."""
        before = self.driver.execute_script(WATCH_BUSY)
        action()
        self.wait_for("the answer drawn", lambda: self.driver.execute_script(WATCH_BUSY) > before and self.idle())

    def type_prompt(self, prompt: str) -> None:
        box = self.element("prompt")
        box.clear()
        box.send_keys(prompt)  # typed key by key, newlines included (Enter in a textarea is a new line)
        assert box.get_attribute("value") == prompt

    def analyze(self, prompt: str) -> None:
        self.type_prompt(prompt)
        self.answered(self.element("analyze").click)

    def tokens(self) -> list[dict]:
        """The token chips: id, bytes (hex), shown text and classes."""
        return self.driver.execute_script("""
            return Array.from(document.querySelectorAll('#tokens .token'), (chip) => ({
              id: Number(chip.dataset.id), bytes: chip.dataset.bytes, text: chip.textContent,
              classes: Array.from(chip.classList)}));""")

    def bars(self, container: str = "#next-token") -> list[dict]:
        """The next-token bars: id, label, shown percentage, fill width (% of the top bar), removed or not."""
        return self.driver.execute_script("""
            return Array.from(document.querySelectorAll(arguments[0] + ' > .bar'), (bar) => ({
              id: Number(bar.dataset.id), label: bar.querySelector('.label').textContent,
              value: bar.querySelector('.value').textContent,
              width: parseFloat(bar.querySelector('.fill').style.width),
              removed: bar.classList.contains('removed')}));""", container)

    def choose(self, select_id: str, value: str) -> None:
        Select(self.element(select_id)).select_by_value(value)

    def slide(self, slider_id: str, key: str, times: int = 1) -> None:
        """Move a range input with the keyboard (key: ARROW_LEFT, ARROW_RIGHT, HOME, END), as a person would."""
        self.element(slider_id).send_keys(getattr(Keys, key) * times)

    def canvas_fingerprint(self, canvas_id: str) -> str:
        return self.driver.execute_script("return document.getElementById(arguments[0]).toDataURL()", canvas_id)

    def pixel(self, canvas_id: str, x: float, y: float) -> list[int]:
        """[r, g, b, a] at CSS pixel (x, y) of a canvas."""
        return self.driver.execute_script("""
            const canvas = document.getElementById(arguments[0]);
            const ratio = canvas.width / canvas.getBoundingClientRect().width;
            return Array.from(canvas.getContext('2d').getImageData(
              Math.floor(arguments[1] * ratio), Math.floor(arguments[2] * ratio), 1, 1).data);""",
                                          canvas_id, x, y)

    def hover(self, element, x: float, y: float) -> None:
        """Put the mouse at CSS pixel (x, y) from the element's top-left corner."""
        self.driver.execute_script("arguments[0].scrollIntoView({block: 'center'})", element)
        box = element.rect
        ActionChains(self.driver).move_to_element_with_offset(
            element, round(x - box["width"] / 2), round(y - box["height"] / 2)).perform()

    def shoot(self, folder: Path, name: str, element_id: str | None = None) -> Path:
        """A PNG of one section (or the whole page) under folder/name.png."""
        path = folder / f"{name}.png"
        if element_id is None:
            full_page(self.driver, path)
        else:
            element = self.element(element_id)
            self.driver.execute_script("arguments[0].scrollIntoView({block: 'start'}); window.scrollBy(0, -8)",
                                       element)
            element.screenshot(str(path))
        return path

    def console_errors(self, allow: tuple[str, ...] = ()) -> list[str]:
        """Severe messages the page logged since the last call, less those naming any of `allow`."""
        logged = self.driver.get_log("browser")
        return [entry["message"] for entry in logged if entry["level"] == "SEVERE"
                and "favicon.ico" not in entry["message"] and not any(word in entry["message"] for word in allow)]


def full_page(driver, path: Path) -> None:
    """A screenshot of the whole page, beyond the window's height (Chrome DevTools' capture)."""
    import base64

    size = driver.execute_script("return [document.documentElement.scrollWidth, document.documentElement.scrollHeight]")
    shot = driver.execute_cdp_cmd("Page.captureScreenshot", {
        "format": "png", "captureBeyondViewport": True,
        "clip": {"x": 0, "y": 0, "width": size[0], "height": size[1], "scale": 1}})
    path.write_bytes(base64.b64decode(shot["data"]))


def time_to_render(page: ExplorerPage, prompt: str) -> float:
    """Milliseconds from the click on Analyze to the painted frame showing every view of `prompt`'s answer."""
    page.driver.execute_script("""
        const box = document.getElementById('prompt');
        box.value = arguments[0];
        box.dispatchEvent(new Event('input'));""", prompt)
    before = page.driver.execute_script(WATCH_BUSY)
    started = page.driver.execute_script(
        "const t = performance.now(); document.getElementById('analyze').click(); return t;")
    page.wait_for("the answer painted", lambda: page.driver.execute_script(
        "const w = window.__explorerWatch; return w.done > arguments[0] && w.paintedAt !== null "
        "&& w.paintedAt > arguments[1]", before, started))
    assert page.error() == "", page.error()
    return page.driver.execute_script("return window.__explorerWatch.paintedAt") - started


def prompt_of_length(tokenizer, count: int, source: str) -> str:
    """The shortest prefix of `source` that encodes to exactly `count` tokens."""
    for end in range(1, len(source) + 1):
        if len(tokenizer.encode(source[:end])) == count:
            return source[:end]
    raise ValueError(f"no prefix of the text encodes to {count} tokens")


# ------------------------------------------------------------------ the guided tour (tests and docs screenshots)

TOUR_SHOTS = ("overview", "tokens", "attention", "attention-masked", "logit-lens", "residual-mlp", "next-token",
              "step", "embeddings", "compare", "curves")


def take_tour(page: ExplorerPage, folder: Path, steps: int = 2) -> list[Path]:
    """Walk the page as docs/explorer.md does and save one PNG per stop under `folder` (names: TOUR_SHOTS).

    `page` must be open on a prompt; the tour picks the run's other checkpoint for comparison when it has one."""
    folder.mkdir(parents=True, exist_ok=True)
    shots = []
    others = [o.get_attribute("value") for o in Select(page.element("compare-checkpoint")).options
              if o.get_attribute("value")]
    if others:  # the comparison is fetched without the page's busy state: wait for its two sides
        page.choose("compare-checkpoint", others[0])
        page.wait_for("the comparison", lambda: len(page.driver.find_elements(By.CSS_SELECTOR, "#compare .side")) == 2)
    T = len(page.tokens())
    shots.append(page.shoot(folder, "overview"))
    shots.append(page.shoot(folder, "tokens", "prompt-view"))

    n_layer = len(Select(page.element("layer")).options)
    page.choose("layer", str(n_layer - 1))
    page.choose("attention-mode", "softmax")
    hover_attention_cell(page, T, T - 1, max(0, T - 4))
    shots.append(page.shoot(folder, "attention", "attention-view"))
    page.choose("attention-mode", "masked")
    hover_attention_cell(page, T, max(0, T - 4), T - 1)
    shots.append(page.shoot(folder, "attention-masked", "attention-view"))
    page.choose("attention-mode", "softmax")

    cell = page.driver.find_element(By.CSS_SELECTOR, f"#logit-lens td.cell[data-layer='{n_layer - 1}']"
                                                     f"[data-position='{T - 1}']")
    page.hover(cell, 5, 5)
    shots.append(page.shoot(folder, "logit-lens", "lens-view"))

    mlp = page.element("mlp-canvas")
    page.hover(mlp, mlp.rect["width"] / 3, mlp.rect["height"] - 4)
    shots.append(page.shoot(folder, "residual-mlp", "residual-view"))

    page.slide("temperature", "ARROW_LEFT", 6)  # 1.00 -> 0.70
    page.slide("top-k", "ARROW_RIGHT", 10)  # off -> 10
    shots.append(page.shoot(folder, "next-token", "next-view"))
    page.slide("temperature", "HOME")  # 0: greedy, so the steps are the same on every run
    for _ in range(steps):
        page.answered(page.element("step").click)
    shots.append(page.shoot(folder, "step", "prompt-view"))
    page.slide("temperature", "ARROW_RIGHT", 20)  # back to 1.00 and top-k off: the plain distribution
    page.slide("top-k", "HOME")

    page.element("embedding-search").send_keys("def")
    shots.append(page.shoot(folder, "embeddings", "embedding-view"))
    shots.append(page.shoot(folder, "compare", "compare-view"))
    shots.append(page.shoot(folder, "curves", "curves"))
    return shots


def attention_layout(T: int) -> tuple[int, int]:
    """(margin, cell) of the attention grid in CSS pixels, as views/attention.js lays it out."""
    margin = 70 if T <= 40 else 8
    return margin, max(2, min(28, (620 - margin) // T))


def hover_attention_cell(page: ExplorerPage, T: int, query: int, key: int) -> str:
    """Point at (query row, key column) of the heatmap; the readout it shows."""
    margin, cell = attention_layout(T)
    page.hover(page.element("attention-canvas"), margin + (key + 0.5) * cell, margin + (query + 0.5) * cell)
    readout = page.text("attention-info")
    assert readout.startswith(f"query {query} ") and f"→ key {key} " in readout, (
        f"hovering cell ({query}, {key}) read {readout!r}: the grid's layout is not what attention_layout() assumes")
    return readout


# ------------------------------------------------------------------ a tiny run, served, and a browser on it

PROMPT = "def add(a, b):\n    return a + b\n\n\nclass Point:\n    def __init__(self, x):"


@pytest.fixture(scope="module")
def tiny_run(base, val_texts, tmp_path_factory) -> Path:
    """The `base` checkpoint (random, step 0) and the same model after 40 real training steps (step 40, the
    served one), with the steps' losses in metrics.jsonl: two checkpoints that predict differently."""
    import torch

    from binarylm.checkpoint import load_checkpoint, save_checkpoint

    run = tmp_path_factory.mktemp("browser") / "tiny-run"
    shutil.copytree(base, run)
    saved = load_checkpoint(run / "ckpt-000000")
    model, T = saved.model.train(), saved.config.model.context_length
    data = torch.tensor(saved.tokenizer.encode("".join(val_texts)[:120_000]))  # (N,)
    torch.manual_seed(0)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # matrices this small gain nothing from threads, and lose a lot on a busy machine
    try:
        records = _train(model, optimizer, data, T)
    finally:
        torch.set_num_threads(threads)
    records.append({"step": 40, "split": "val", "loss": records[-1]["loss"] + 0.1, "tokens": 40 * 16 * T})
    save_checkpoint(run, 40, model.eval(), saved.tokenizer, saved.config)
    (run / "metrics.jsonl").write_text("".join(json.dumps(record) + "\n" for record in records))
    return run


def _train(model, optimizer, data, T: int) -> list[dict]:
    """40 AdamW steps on random windows of `data`, warm-up then a linear decay; the log records of each."""
    import torch

    records = []
    for step in range(1, 41):
        lr = 3e-3 * min(1.0, step / 8) * (1 - 0.7 * max(0, step - 8) / 32)  # warm-up, then a linear decay
        for group in optimizer.param_groups:
            group["lr"] = lr
        starts = torch.randint(0, len(data) - T - 1, (16,)).tolist()
        x = torch.stack([data[s:s + T] for s in starts])  # (16, T)
        y = torch.stack([data[s + 1:s + T + 1] for s in starts])  # (16, T)
        _, loss = model(x, y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        records.append({"step": step, "split": "train", "loss": loss.item(), "lr": lr, "tokens": step * 16 * T})
    return records


@contextlib.contextmanager
def serving(checkpoint: Path, loopback_server, name: str):
    """The checkpoint behind the real app (completions and explorer) on 127.0.0.1: (base URL, loaded checkpoint)."""
    from binarylm.checkpoint import load_checkpoint
    from binarylm.infer.engine import Engine
    from binarylm.serve.app import create_app
    from binarylm.serve.explorer import ExplorerSettings
    from binarylm.serve.runner import EngineRunner

    saved = load_checkpoint(checkpoint)
    runner = EngineRunner(Engine(saved.model, saved.tokenizer, max_batch=2)).start()
    app = create_app(runner, saved.tokenizer, name, explorer=ExplorerSettings(checkpoint=saved.path))
    try:
        with loopback_server(app) as base_url:
            yield base_url, saved
    finally:
        runner.stop()


@pytest.fixture(scope="module")
def tiny(tiny_run, loopback_server):
    with serving(tiny_run, loopback_server, "tiny-run") as served:
        yield served


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    driver = start_chromium(tmp_path_factory.mktemp("chromium-profile"))
    driver.set_script_timeout(60)
    yield driver
    driver.quit()


@pytest.fixture
def page(browser, tiny, request):
    """The explorer open on PROMPT. The page's last state is kept as a screenshot (to look at when the test
    failed), and the test fails if the page logged an error it did not expect."""
    base_url, _ = tiny
    explorer = ExplorerPage(browser, base_url).open("?prompt=" + quote(PROMPT))
    explorer.console_errors()  # start from a clean log
    yield explorer
    explorer.shoot(artifacts_dir(), "last-" + re.sub(r"[^\w-]+", "-", request.node.name))  # kept for a failure
    assert explorer.console_errors(allow=explorer.expected_console) == [], "the page logged errors"


@pytest.fixture
def api(tiny):
    """Python's view of the same server: POST /v1/internals and the GET routes, arrays decoded."""
    httpx = pytest.importorskip("httpx")
    base_url, _ = tiny
    with httpx.Client(base_url=base_url, timeout=60) as client:
        yield client


def internals(api, **body) -> dict:
    reply = api.post("/v1/internals", json=body)
    assert reply.status_code == 200, reply.text
    return reply.json()


def decoded(payload: dict):
    from binarylm.explore.arrays import decode_array

    return decode_array(payload)


def shown_percent(text: str) -> tuple[float, float]:
    """The probability range a label like '23%', '4.5%' or '<0.1%' stands for (format.js rounds)."""
    if text == "<0.1%":
        return 0.0, 0.001
    value = float(text.rstrip("%")) / 100
    half = 0.005 if "." not in text else 0.0005
    return value - half - 1e-9, value + half + 1e-9


# ------------------------------------------------------------------ the tests


def test_the_page_shows_the_tokenizers_tokens_and_draws_every_view(page, tiny, api):
    _, saved = tiny
    ids = saved.tokenizer.encode(PROMPT)
    chips = page.tokens()
    assert [chip["id"] for chip in chips] == ids
    assert [chip["bytes"] for chip in chips] == [saved.tokenizer.decode_bytes([i]).hex() for i in ids]
    assert [chip["text"] for chip in chips] == [visible(saved.tokenizer.decode_bytes([i]).decode("utf-8", "replace"))
                                                for i in ids]
    assert page.text("status").startswith(f"{len(ids)} tokens · computed in ")
    assert page.error() == ""
    config = saved.config.model
    assert f"{config.n_layer} layers × {config.n_head} heads" in page.text("model")
    assert "serving ckpt-000040 · 2 checkpoints" in page.text("run")

    # every view drew something for these tokens
    T = len(ids)
    margin, cell = attention_layout(T)
    assert page.element("attention-canvas").rect["width"] == margin + cell * T + 4
    cells = page.driver.find_elements(By.CSS_SELECTOR, "#logit-lens table.lens td.cell")
    assert len(cells) == config.n_layer * T
    assert page.driver.find_elements(By.CSS_SELECTOR, "#residual svg polyline")
    assert page.driver.execute_script("return document.getElementById('mlp-canvas').width") == config.d_ff
    assert len(page.bars()) == 15
    assert "1024 tokens; the axes explain" in page.text("embedding-info")
    series = {line.get_attribute("data-series") for line in
              page.driver.find_elements(By.CSS_SELECTOR, "#curves svg polyline")}
    assert series == {"train loss", "val loss", "learning rate"}
    assert [o.get_attribute("value") for o in Select(page.element("compare-checkpoint")).options] == ["",
                                                                                                       "ckpt-000000"]

    # the logit lens's top layer is the model's own next-token guess, and says so on hover
    reply = internals(api, prompt=PROMPT)
    top = reply["layers"][-1]["logit_lens"]
    last = page.driver.find_element(By.CSS_SELECTOR, f"#logit-lens td.cell[data-layer='{config.n_layer - 1}']"
                                                     f"[data-position='{T - 1}']")
    assert last.find_element(By.CLASS_NAME, "guess").get_attribute("textContent").rstrip("…") in visible(
        top["texts"][T - 1][0])
    assert page.bars()[0]["id"] == top["ids"][T - 1][0] == reply["next_token"]["ids"][0]
    page.hover(last, 4, 4)
    assert f"after position {T - 1}" in page.text("lens-info") and f"layer {config.n_layer - 1}" in page.text(
        "lens-info")


def test_layer_head_and_stage_redraw_the_heatmap_and_hovering_reads_the_value(page, tiny, api):
    _, saved = tiny
    reply = internals(api, prompt=PROMPT)
    T, D = len(reply["tokens"]), reply["config"]["head_dim"]
    shown = {}
    for layer, head in [(0, 0), (0, 1), (1, 1)]:
        page.choose("layer", str(layer))
        page.choose("head", str(head))
        shown[layer, head] = page.canvas_fingerprint("attention-canvas")
    assert len(set(shown.values())) == 3, "changing the layer or the head left the heatmap as it was"
    vectors = page.driver.execute_script(  # the chosen head's q, k and v, a pixel per (position, dimension)
        "return [...document.querySelectorAll('#qkv canvas')].map(c => [c.dataset.vector, c.width, c.height])")
    assert vectors == [[name, D, T] for name in ("q", "k", "v")]

    def readout(query: int, key: int) -> str:
        shown = hover_attention_cell(page, T, query, key)  # 'query 3 “a” → key 1 “b”: VALUE'
        return shown[shown.index("”: ", shown.index(f"→ key {key} “")) + 3:]

    layer, head, query, key = 1, 1, T - 1, 2
    stages = {name: decoded(reply["layers"][layer]["attention"][name])[head] for name in
              ("raw", "scaled", "masked", "softmax")}  # (T, T) each
    assert float(readout(query, key)) == pytest.approx(stages["softmax"][query, key], abs=6e-4)
    page.choose("attention-mode", "raw")
    raw = float(readout(query, key))
    assert raw == pytest.approx(stages["raw"][query, key], rel=2e-3, abs=6e-4)
    page.choose("attention-mode", "scaled")
    assert float(readout(query, key)) == pytest.approx(raw / D ** 0.5, rel=5e-3, abs=1e-3)
    page.choose("attention-mode", "masked")
    assert readout(1, 3).startswith("−∞")  # a query never sees a later key
    assert float(readout(query, key)) == pytest.approx(stages["scaled"][query, key], rel=2e-3, abs=6e-4)

    # the drawing itself: masked cells are left blank, visible ones are coloured
    margin, cell = attention_layout(T)
    centre = lambda q, k: (margin + (k + 0.5) * cell, margin + (q + 0.5) * cell)  # noqa: E731
    assert page.pixel("attention-canvas", *centre(1, 3))[3] == 0
    assert page.pixel("attention-canvas", *centre(3, 1))[3] == 255
    page.choose("attention-mode", "softmax")
    assert readout(1, 3) == "0 (masked)"
    assert min(page.pixel("attention-canvas", *centre(1, 3))) >= 245  # a weight of 0: (near) white
    row = stages["softmax"][query]
    assert abs(row.sum() - 1) < 1e-5 and (row[query + 1:] == 0).all()


def test_the_sliders_recompute_the_next_token_bars_from_the_logits(page, api):
    import numpy as np

    logits = decoded(internals(api, prompt=PROMPT)["next_token"]["logits"]).astype(np.float64)  # (V,)
    order = np.argsort(-logits, kind="stable")

    def expected(temperature: float) -> np.ndarray:
        scaled = logits / temperature
        p = np.exp(scaled - scaled.max())
        return p / p.sum()

    def check(temperature: float) -> list[dict]:
        bars = page.bars()
        assert [bar["id"] for bar in bars] == order[:15].tolist()
        probs = expected(temperature)
        low, high = shown_percent(bars[0]["value"])
        assert low <= probs[order[0]] <= high, (bars[0]["value"], probs[order[0]])
        for bar in bars[1:]:  # each bar's length is its probability relative to the top one
            assert bar["width"] == pytest.approx(100 * probs[bar["id"]] / probs[order[0]], rel=1e-3, abs=1e-3)
        return bars

    at_one = check(1.0)
    page.slide("temperature", "ARROW_LEFT", 10)  # step 0.05: 1.00 -> 0.50
    assert page.text("temperature-value") == "0.50"
    sharper = check(0.5)
    assert sharper[0]["value"] != at_one[0]["value"] and sharper[1]["width"] < at_one[1]["width"]
    page.slide("temperature", "ARROW_RIGHT", 30)  # -> 2.00, the slider's end
    assert page.text("temperature-value") == "2.00"
    flatter = check(2.0)
    assert flatter[1]["width"] > at_one[1]["width"]

    page.slide("top-k", "ARROW_RIGHT", 3)
    assert page.text("top-k-value") == "3"
    bars = page.bars()
    assert [bar["removed"] for bar in bars] == [False] * 3 + [True] * 12
    kept = expected(2.0)[order[:3]]
    low, high = shown_percent(bars[0]["value"])
    assert low <= kept[0] / kept.sum() <= high  # renormalised over the three kept
    assert all(bar["value"] == "0%" for bar in bars[3:])
    assert page.text("next-token").startswith("3 of 1024 tokens can be drawn")


def test_step_appends_the_likeliest_token_and_the_tokens_view_grows(page, tiny, api):
    _, saved = tiny
    ids = saved.tokenizer.encode(PROMPT)
    page.slide("temperature", "HOME")
    assert page.text("temperature-value") == "0 (greedy)"
    for n in (1, 2):
        greedy = internals(api, ids=ids)["next_token"]["ids"][0]
        page.answered(page.element("step").click)
        chips = page.tokens()
        assert len(chips) == len(ids) + 1
        assert chips[-1]["id"] == greedy and "sampled" in chips[-1]["classes"]
        assert sum("sampled" in chip["classes"] for chip in chips) == n
        assert f"(id {greedy})" in page.text("step-info") and "probability 100%" in page.text("step-info")
        ids.append(greedy)
    assert page.text("status").startswith(f"{len(ids)} tokens")
    assert page.element("prompt").get_attribute("value") == saved.tokenizer.decode(ids)
    assert len(page.driver.find_elements(By.CSS_SELECTOR, "#logit-lens td.cell")) == len(ids) * 2

    page.slide("temperature", "ARROW_RIGHT", 20)  # 1.00: a draw from the whole distribution
    page.answered(page.element("step").click)
    assert len(page.tokens()) == len(ids) + 1
    assert [chip["id"] for chip in page.tokens()[:-1]] == ids


def test_searching_the_embedding_map_marks_the_matching_tokens(page, api):
    texts = api.get("/v1/explore/embeddings").json()["texts"]
    matching = sum("def" in text.lower() for text in texts)
    assert matching > 0
    before = page.canvas_fingerprint("embedding-canvas")
    page.element("embedding-search").send_keys("def")
    assert page.text("embedding-count") == f"{matching} token{'s' if matching != 1 else ''} match"
    assert page.canvas_fingerprint("embedding-canvas") != before
    page.element("embedding-search").clear()
    page.element("embedding-search").send_keys(" ")
    spaces = sum(" " in text for text in texts)
    assert page.text("embedding-count").startswith(f"{spaces} token")


def test_an_empty_or_oversized_prompt_gets_a_message_not_a_blank_page(page, tiny):
    _, saved = tiny
    drawn = page.tokens()
    page.element("prompt").clear()
    page.element("analyze").click()
    page.wait_for("the empty-prompt message", lambda: "empty" in page.error())
    assert page.element("error").is_displayed()
    assert page.tokens() == drawn  # the last answer stays on screen
    page.shoot(artifacts_dir(), "error-empty-prompt")

    page.expected_console = ("status of 400",)
    limit = saved.config.model.context_length  # the explorer's limit: 256, capped by the tiny model's context
    long_prompt = "x = 1\n" * 60
    count = len(saved.tokenizer.encode(long_prompt))
    assert count > limit
    page.type_prompt(long_prompt)
    page.element("analyze").click()
    page.wait_for("the oversized-prompt message", lambda: f"at most {limit}" in page.error())
    assert f"the prompt is {count} tokens" in page.error()
    assert page.element("error").is_displayed() and page.tokens() == drawn
    assert page.text("status") == "no answer"
    page.shoot(artifacts_dir(), "error-oversized-prompt")

    page.analyze(PROMPT)  # a good prompt clears the message
    assert page.error() == "" and not page.element("error").is_displayed()


def test_comparing_checkpoints_and_an_unknown_one(browser, tiny, api):
    base_url, _ = tiny
    page = ExplorerPage(browser, base_url).open("?compare=ckpt-000000&prompt=" + quote(PROMPT))
    page.wait_for("two sides", lambda: len(browser.find_elements(By.CSS_SELECTOR, "#compare .side")) == 2)
    sides = browser.find_elements(By.CSS_SELECTOR, "#compare .side")
    assert [side.get_attribute("data-checkpoint") for side in sides] == ["ckpt-000040", "ckpt-000000"]
    random_guess = internals(api, prompt=PROMPT, checkpoint="ckpt-000000")["next_token"]["ids"][0]
    assert page.bars("#compare .side[data-side='right'] .next-token")[0]["id"] == random_guess
    assert page.bars("#compare .side[data-side='left'] .next-token")[0]["id"] == page.bars()[0]["id"]
    page.shoot(artifacts_dir(), "compare")
    page.console_errors()

    page = ExplorerPage(browser, base_url).open("?compare=ckpt-999999")
    page.wait_for("the unknown-checkpoint message", lambda: "ckpt-999999" in page.error())
    assert "not in run 'tiny-run'" in page.error() and "ckpt-000000, ckpt-000040" in page.error()
    assert "No comparison" in page.text("compare")
    assert page.tokens(), "the served checkpoint's views are still drawn"
    page.shoot(artifacts_dir(), "error-unknown-checkpoint")
    assert page.console_errors(allow=("status of 404",)) == []


def test_the_guided_tour_saves_its_screenshots(page):
    folder = artifacts_dir() / "tour"
    shots = take_tour(page, folder)
    assert [shot.stem for shot in shots] == list(TOUR_SHOTS)
    for shot in shots:
        data = shot.read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5_000, shot
    assert page.error() == ""


def test_a_64_token_prompt_is_drawn_in_under_a_second(page, tiny, val_texts, record_property):
    _, saved = tiny
    prompt = prompt_of_length(saved.tokenizer, 64, val_texts[0][:2000])
    times = sorted(time_to_render(page, prompt) for _ in range(3))
    assert len(page.tokens()) == 64
    record_property("render_ms_tiny_64", times[1])
    write_figure("tiny 64-token prompt", times)
    assert times[1] < 1000, f"drawing every view of a 64-token answer took {times} ms"


@pytest.mark.slow
@pytest.mark.skipif(not (DEMO_RUN / "latest").exists(), reason="no demo-size run at runs/demo-base (`make demo`)")
def test_the_demo_model_draws_a_64_token_prompt_in_under_a_second(browser, loopback_server, val_texts,
                                                                  record_property):
    with serving(DEMO_RUN, loopback_server, "demo-base") as (base_url, saved):
        page = ExplorerPage(browser, base_url).open("?prompt=" + quote("import os"))
        prompt = prompt_of_length(saved.tokenizer, 64, val_texts[0][:2000])
        time_to_render(page, prompt)  # a first pass warms the caches
        times = sorted(time_to_render(page, prompt) for _ in range(5))
        assert len(page.tokens()) == 64 and page.error() == ""
        page.shoot(artifacts_dir(), "demo-64-tokens")
    record_property("render_ms_demo_64", times[2])
    write_figure("demo-base 64-token prompt", times)
    assert times[2] < 1000, f"the demo-size model's 64-token answer took {times} ms to draw (median over 5)"


def write_figure(name: str, times: list[float]) -> None:
    """Keep a render time in artifacts/render-times.json (name -> median and all runs, in ms)."""
    path = artifacts_dir() / "render-times.json"
    figures = json.loads(path.read_text()) if path.exists() else {}
    figures[name] = {"median_ms": round(times[len(times) // 2], 1), "runs_ms": [round(t, 1) for t in times]}
    path.write_text(json.dumps(figures, indent=2) + "\n")
