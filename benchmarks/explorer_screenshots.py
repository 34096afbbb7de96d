"""The explorer's screenshots for docs/explorer.md, and the time it takes to draw a 64-token prompt.

    python benchmarks/explorer_screenshots.py                      # runs/demo-base -> docs/images/explorer/
    python benchmarks/explorer_screenshots.py --checkpoint runs/demo --out /tmp/shots

Starts `binarylm explore --no-browser` on a free 127.0.0.1 port for the checkpoint (the demo-size run that
`make demo` trains; without one, a tiny random model is made on the spot, which shows the page but not what a
trained model has learned), opens /explore in headless Chromium (the system's, as the browser tests use it),
times a 64-token prompt from the click on Analyze to the painted frame, then walks the guided tour of
docs/explorer.md and writes one PNG per stop. The last line is JSON: the render times, the server's share of
them, and the files written.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import quote

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

DOCS_PROMPT = ("class Point:\n    def __init__(self, x, y):\n        self.x = x\n        self.y = y\n\n"
               "    def __repr__(self):\n        return")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", default=str(ROOT / "runs" / "demo-base"),
                        help="a run or checkpoint directory (default: runs/demo-base)")
    parser.add_argument("--out", default=str(ROOT / "docs" / "images" / "explorer"), help="where the PNGs go")
    parser.add_argument("--prompt", default=DOCS_PROMPT, help="the prompt the tour explains")
    parser.add_argument("--runs", type=int, default=5, help="timed renders of the 64-token prompt")
    parser.add_argument("--full-colour", action="store_true",
                        help="keep Chromium's PNGs as they are (by default they are reduced to 256 colours, "
                             "a third of the size, for the repository)")
    args = parser.parse_args()

    try:
        import test_explore_browser as page_driver  # the browser tests' page driver: one copy of those moves
    except BaseException as error:  # pytest's importorskip raises a BaseException when selenium is missing
        sys.exit(f"cannot drive a browser: {error} (pip install -e '.[dev]')")
    if page_driver.CHROMIUM is None:
        sys.exit("no Chromium and ChromeDriver found: `make browser` installs Debian's chromium and chromium-driver")

    with tempfile.TemporaryDirectory() as scratch:
        checkpoint = Path(args.checkpoint)
        if not checkpoint.exists():
            print(f"{checkpoint} does not exist; making a tiny random model instead (`make demo` trains the "
                  "demo-size one)", file=sys.stderr)
            checkpoint = tiny_checkpoint(Path(scratch) / "tiny-run")
        with explorer_server(checkpoint) as base_url:
            driver = page_driver.start_chromium(Path(scratch) / "profile")
            try:
                figures = time_renders(page_driver, driver, base_url, checkpoint, args.runs)
                page = page_driver.ExplorerPage(driver, base_url).open("?prompt=" + quote(args.prompt))
                shots = page_driver.take_tour(page, Path(args.out))
                errors = page.console_errors()
            finally:
                driver.quit()
    if errors:
        sys.exit(f"the page logged errors during the tour: {errors}")
    if not args.full_colour:
        for shot in shots:
            reduce_colours(shot)
    for shot in shots:
        print(f"wrote {shot} ({shot.stat().st_size // 1024} KiB)", file=sys.stderr)
    print(f"64-token prompt on {checkpoint}: drawn in {figures['render_ms_median']:.0f} ms (median of "
          f"{args.runs}), of which the server computed {figures['server_ms_median']:.0f} ms", file=sys.stderr)
    print(json.dumps({"checkpoint": str(checkpoint), **figures, "screenshots": [str(s) for s in shots]}))


def time_renders(page_driver, driver, base_url: str, checkpoint: Path, runs: int) -> dict:
    """Median time to draw every view of a 64-token prompt's answer, and the server's part of it."""
    from binarylm.checkpoint import resolve_checkpoint
    from binarylm.data.sources import read_texts, stdlib_files
    from binarylm.tokenizer.formats import load

    tokenizer = load(resolve_checkpoint(checkpoint) / "tokenizer.json")
    text = next(iter(read_texts(stdlib_files("val"))))[:4000]
    prompt = page_driver.prompt_of_length(tokenizer, 64, text)
    page = page_driver.ExplorerPage(driver, base_url).open("?prompt=" + quote("import os"))
    page_driver.time_to_render(page, prompt)  # warm-up
    totals, server = [], []
    for _ in range(runs):
        totals.append(page_driver.time_to_render(page, prompt))
        server.append(float(page.text("status").split("computed in ")[1].split(" ms")[0]))
    assert len(page.tokens()) == 64
    median = statistics.median(totals)
    return {"render_ms_median": round(median, 1), "render_ms_runs": [round(t, 1) for t in totals],
            "server_ms_median": statistics.median(server),
            "browser_share": round(1 - statistics.median(server) / median, 3)}


@contextlib.contextmanager
def explorer_server(checkpoint: Path) -> Iterator[str]:
    """`binarylm explore --no-browser` for `checkpoint` on a free loopback port; yields its base URL."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    process = subprocess.Popen([sys.executable, "-m", "binarylm", "explore", "--checkpoint", str(checkpoint),
                                "--port", str(port), "--no-browser"])
    base_url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 300
        while not healthy(base_url):
            if process.poll() is not None or time.monotonic() > deadline:
                sys.exit(f"`binarylm explore --checkpoint {checkpoint}` did not come up")
            time.sleep(0.25)
        yield base_url
    finally:
        process.terminate()
        try:
            process.wait(30)
        except subprocess.TimeoutExpired:
            process.kill()


def healthy(base_url: str) -> bool:
    try:
        with urllib.request.urlopen(f"{base_url}/health", timeout=2) as reply:
            return reply.status == 200
    except OSError:
        return False


def reduce_colours(path: Path) -> None:
    """Rewrite a screenshot with a 256-colour palette (no dithering): the same picture in a third of the bytes."""
    try:
        from PIL import Image
    except ImportError:  # Pillow comes with matplotlib (the eval extra); without it the PNGs stay as they are
        return
    with Image.open(path) as image:
        reduced = image.convert("RGB").quantize(256, method=Image.Quantize.MEDIANCUT, dither=Image.Dither.NONE)
    reduced.save(path, optimize=True)


def tiny_checkpoint(run: Path) -> Path:
    """A random `tiny` model with a 1024-token tokenizer trained on the built-in corpus, saved as a run."""
    import torch

    from binarylm.checkpoint import save_checkpoint
    from binarylm.config import build_config
    from binarylm.data.sources import read_texts, stdlib_files
    from binarylm.model import Transformer
    from binarylm.tokenizer import train_bpe

    tokenizer = train_bpe(read_texts(stdlib_files("val")), vocab_size=1024, progress=False)
    config = build_config({"model": {"preset": "tiny", "vocab_size": tokenizer.vocab_size}})
    torch.manual_seed(0)
    save_checkpoint(run, 0, Transformer(config.model), tokenizer, config)
    return run


if __name__ == "__main__":
    main()
