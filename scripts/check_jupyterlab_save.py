"""Open notebooks in a real JupyterLab in headless Chromium, save them, and compare the bytes.

The unit test `test_open_and_save_in_jupyterlab_leaves_the_file_unchanged` compares every notebook
with `nbtools.jupyterlab_saved_text`, a Python rendering of what JupyterLab does on open and save.
This script checks that rendering against JupyterLab itself (with JupyterLab 4.6.6 it found one
change, the kernel spec's display name; stream outputs are saved as they are, merged or not):

    apt-get install chromium    # Debian's package; not needed by `make test`
    .venv/bin/python scripts/check_jupyterlab_save.py notebooks/*.ipynb

For each notebook (a copy in a temporary folder) it starts JupyterLab, opens the notebook, waits
for the kernel, records whether JupyterLab marked the document modified, saves it with
JupyterLab's own `docmanager:save` command, and reports whether the saved file equals the
original byte for byte. Exit status 1 if any notebook changed.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_http(url: str, seconds: float = 60) -> str:
    deadline = time.time() + seconds
    while True:
        try:
            with urllib.request.urlopen(url, timeout=2) as r:
                return r.read().decode()
        except OSError:
            if time.time() > deadline:
                raise
            time.sleep(0.5)


class Page:
    """The smallest Chrome DevTools Protocol client: evaluate JavaScript in one page."""

    def __init__(self, ws):
        self.ws, self.next_id = ws, 0

    async def evaluate(self, expression: str):
        self.next_id += 1
        message = {"id": self.next_id, "method": "Runtime.evaluate",
                   "params": {"expression": expression, "awaitPromise": True, "returnByValue": True}}
        await self.ws.write_message(json.dumps(message))
        while True:
            reply = json.loads(await self.ws.read_message())
            if reply.get("id") == self.next_id:
                result = reply["result"]
                if "exceptionDetails" in result:
                    raise RuntimeError(result["exceptionDetails"])
                return result["result"].get("value")

    async def until(self, expression: str, seconds: float = 90):
        deadline = time.time() + seconds
        while not await self.evaluate(expression):
            if time.time() > deadline:
                raise TimeoutError(expression)
            await asyncio.sleep(0.5)


async def _open_and_save(page: Page, name: str) -> bool:
    """Open `name`, wait until its kernel is idle, return whether it was dirty, then save it."""
    await page.until("!!(window.jupyterapp && window.jupyterapp.commands.hasCommand('docmanager:open'))")
    await page.evaluate("window.jupyterapp.restored.then(() => true)")
    await page.evaluate(f"window.jupyterapp.commands.execute('docmanager:open', {{path: {json.dumps(name)}}})"
                        ".then(() => true)")
    widget = "window.jupyterapp.shell.currentWidget"
    await page.until(f"!!({widget} && {widget}.context && {widget}.context.isReady)")
    await page.until(f"{widget}.sessionContext.session?.kernel?.status === 'idle'")
    await asyncio.sleep(3)  # let kernel-info metadata (language_info, kernelspec) reach the model
    dirty = await page.evaluate(f"{widget}.context.model.dirty")
    await page.evaluate("window.jupyterapp.commands.execute('docmanager:save').then(() => true)")
    await page.until(f"!{widget}.context.model.dirty")
    await page.evaluate(f"{widget}.sessionContext.shutdown().then(() => true)")
    return bool(dirty)


async def _check(notebooks: list[Path], chromium: str) -> int:
    from tornado.websocket import websocket_connect

    work = Path(tempfile.mkdtemp())
    for nb in notebooks:
        shutil.copy(nb, work / nb.name)
    lab_port, cdp_port, token = _free_port(), _free_port(), "check"
    settings = work / "settings"
    settings.mkdir()
    # User settings of this check only: render every cell at once (no windowing), as if a reader
    # had scrolled through the whole notebook, and no news pop-up.
    for plugin, values in {"notebook-extension/tracker": {"windowingMode": "none"},
                           "apputils-extension/notification": {"fetchNews": "false"}}.items():
        file = settings / "@jupyterlab" / f"{plugin}.jupyterlab-settings"
        file.parent.mkdir(parents=True, exist_ok=True)
        file.write_text(json.dumps(values))
    env = dict(os.environ, JUPYTERLAB_SETTINGS_DIR=str(settings))
    lab = subprocess.Popen(
        [str(BIN / "jupyter"), "lab", "--no-browser", f"--port={lab_port}", f"--notebook-dir={work}",
         f"--IdentityProvider.token={token}", "--LabApp.expose_app_in_browser=True", "--allow-root"],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    browser = subprocess.Popen(
        [chromium, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         f"--user-data-dir={work / 'chrome'}", f"--remote-debugging-port={cdp_port}",
         f"http://127.0.0.1:{lab_port}/lab?token={token}"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    changed = 0
    try:
        _wait_http(f"http://127.0.0.1:{lab_port}/api/status?token={token}")
        targets = json.loads(_wait_http(f"http://127.0.0.1:{cdp_port}/json/list"))
        ws_url = next(t["webSocketDebuggerUrl"] for t in targets if t["type"] == "page")
        page = Page(await websocket_connect(ws_url, max_message_size=1 << 28))
        for nb in notebooks:
            before, copy = nb.read_bytes(), work / nb.name
            stamp = copy.stat().st_mtime_ns
            dirty = await _open_and_save(page, nb.name)
            if copy.stat().st_mtime_ns == stamp:
                raise RuntimeError(f"{nb.name}: JupyterLab did not write the file")
            same = copy.read_bytes() == before
            changed += not same
            print(f"{nb.name}: {'marked modified on open' if dirty else 'not modified on open'}; "
                  f"{'saved byte-identical' if same else 'SAVED DIFFERENTLY'}", flush=True)
            if not same:
                (work / nb.name).rename(work / f"{nb.stem}.saved.ipynb")
                print(f"  JupyterLab's version kept at {work / (nb.stem + '.saved.ipynb')}")
    finally:
        browser.terminate()
        lab.terminate()
    return 1 if changed else 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("notebooks", nargs="+", type=Path)
    parser.add_argument("--chromium", default=shutil.which("chromium") or "chromium")
    args = parser.parse_args()
    return asyncio.run(_check([p.resolve() for p in args.notebooks], args.chromium))


if __name__ == "__main__":
    sys.exit(main())
