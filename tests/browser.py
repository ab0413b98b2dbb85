"""Headless Chromium helpers for tests that look at pages as a person would.

Chromium comes from Debian's package ``chromium``; :func:`chromium_path` installs it with
apt-get when it is missing and the tests run as root (CI does), and returns None if it cannot.
Pages are checked with ``--dump-dom`` after an injected script has inspected the loaded page.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import tempfile
from functools import lru_cache
from pathlib import Path

FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--disable-dev-shm-usage"]

PROBE = """<script>
window.addEventListener('load', function () {
  var imgs = Array.from(document.images).map(function (i) {
    return {alt: i.alt, complete: i.complete, w: i.naturalWidth, h: i.naturalHeight}; });
  var tables = Array.from(document.querySelectorAll('table')).map(function (t) {
    return {caption: t.caption ? t.caption.textContent : '', rows: t.tBodies.length ? t.tBodies[0].rows.length : 0}; });
  var pre = document.createElement('pre'); pre.id = 'foveal-probe';
  pre.textContent = JSON.stringify({images: imgs, tables: tables});
  document.body.appendChild(pre);
});
</script>"""


@lru_cache(maxsize=1)
def chromium_path() -> str | None:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        found = shutil.which(name)
        if found:
            return found
    if os.geteuid() != 0 or not shutil.which("apt-get"):
        return None
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    try:
        subprocess.run(["apt-get", "update", "-qq"], check=True, capture_output=True, env=env, timeout=600)
        subprocess.run(["apt-get", "install", "-y", "-qq", "--no-install-recommends", "chromium", "fonts-dejavu-core"],
                       check=True, capture_output=True, env=env, timeout=900)
    except (subprocess.SubprocessError, OSError):
        return None
    return shutil.which("chromium")


def _run(args: list[str], timeout: int = 120) -> subprocess.CompletedProcess:
    with tempfile.TemporaryDirectory() as profile:
        return subprocess.run([chromium_path(), *FLAGS, f"--user-data-dir={profile}", *args],
                              capture_output=True, text=True, timeout=timeout)


def inspect_page(html_file: str | Path) -> dict:
    """Load the page in Chromium; return {"images": [{alt, complete, w, h}], "tables": [{caption, rows}]}."""
    html_file = Path(html_file)
    probe = html_file.with_name(html_file.stem + ".probe.html")
    probe.write_text(html_file.read_text(encoding="utf-8").replace("</body>", PROBE + "</body>"), encoding="utf-8")
    try:
        proc = _run(["--virtual-time-budget=10000", "--dump-dom", probe.resolve().as_uri()])
    finally:
        probe.unlink(missing_ok=True)
    m = re.search(r'<pre id="foveal-probe">(.*?)</pre>', proc.stdout, flags=re.S)
    if not m:
        raise AssertionError(f"page probe did not run; chromium said: {proc.stderr[-2000:]}")
    import html as _html

    return json.loads(_html.unescape(m.group(1)))


def screenshot(html_file: str | Path, png: str | Path, width: int = 1280, height: int = 2400) -> Path:
    png = Path(png)
    _run([f"--screenshot={png.resolve()}", f"--window-size={width},{height}", "--hide-scrollbars",
          Path(html_file).resolve().as_uri()])
    if not png.exists() or png.stat().st_size == 0:
        raise AssertionError(f"chromium wrote no screenshot to {png}")
    return png
