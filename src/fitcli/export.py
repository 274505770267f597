"""Static images (PNG, SVG, PDF) of plotly figures, drawn by plotly's exporter, kaleido, in a
Chrome or Chromium installed on this machine.

kaleido (>= 1) draws a figure in a headless browser that it drives through choreographer. fitcli
finds the browser itself (`find_browser`: BROWSER_PATH, then Chrome or Chromium on PATH, then
the usual install locations) and hands kaleido its path, so kaleido never searches for one and
never downloads one (`kaleido.get_chrome` is never called); MathJax is off and plotly.js comes
from the installed plotly package, so nothing is fetched from the network. One browser session
draws every image of a call (`render`): the browser takes seconds to start, each image after it
a fraction of one.

Sizes: `width` and `height` are CSS pixels (1/96 inch), the figure's size in the SVG and PDF (a
700 x 500 figure is 7.29 x 5.21 in). `dpi` is the PNG's resolution: it is drawn at scale
dpi/96, so that printed at its dpi (written in its pHYs chunk) it has the PDF's size.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import struct
import threading
import time
import zlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from fitcli.errors import BrowserNotFoundError, FigureExportError

FORMATS = ("png", "svg", "pdf")
WIDTH, HEIGHT, DPI = 700, 500, 300  # defaults: a 7.29 x 5.21 in figure, PNG at 300 dpi
CSS_DPI = 96  # a CSS pixel is 1/96 inch
TIMEOUT_S = 90  # the most one image may take to draw
INSTALL_HINT = (
    "install chromium (apt-get install chromium) or Google Chrome, or set BROWSER_PATH to the "
    "browser's executable"
)
# Executables searched for on PATH, in this order (Chrome and Chromium under their usual names).
NAMES = (
    "google-chrome",
    "google-chrome-stable",
    "chromium",
    "chromium-browser",
    "chrome",
    "msedge",
)
# Where the browsers install themselves off PATH (macOS applications, Windows' Program Files).
TYPICAL_PATHS: tuple[str, ...] = (
    "/Applications/Google Chrome.app/Contents/MacOS/Google Chrome",
    "/Applications/Chromium.app/Contents/MacOS/Chromium",
    *(
        os.path.join(root, *tail)
        for root in filter(None, (os.environ.get("PROGRAMFILES"), os.environ.get("LOCALAPPDATA")))
        for tail in (
            ("Google", "Chrome", "Application", "chrome.exe"),
            ("Chromium", "Application", "chrome.exe"),
        )
    ),
)


def _executable(path: str) -> bool:
    return os.path.isfile(path) and os.access(path, os.X_OK)


def find_browser(environ: dict[str, str] | None = None) -> str:
    """The Chrome or Chromium to draw with: BROWSER_PATH when set (it must be an executable
    file), else the first of NAMES on PATH, else the first of TYPICAL_PATHS that exists.
    BrowserNotFoundError (exit 2), saying how to install one, when there is none."""
    env = os.environ if environ is None else environ
    given = env.get("BROWSER_PATH")
    if given:
        if _executable(given):
            return given
        raise BrowserNotFoundError(
            f"static figures need Chrome or Chromium, and BROWSER_PATH={given!r} is not an "
            f"executable file: {INSTALL_HINT}"
        )
    for name in NAMES:
        found = shutil.which(name, path=env.get("PATH", os.defpath))
        if found:
            return found
    for path in TYPICAL_PATHS:
        if _executable(path):
            return path
    raise BrowserNotFoundError(
        "static figures need Chrome or Chromium, and none was found (BROWSER_PATH is not set, "
        f"none of {', '.join(NAMES)} is on PATH, none is in the usual places): {INSTALL_HINT}"
    )


@dataclass(frozen=True)
class Image:
    """One image to draw: a plotly figure (a dict) in a format, its size and, for PNG, dpi."""

    figure: dict
    format: str
    width: int = WIDTH
    height: int = HEIGHT
    dpi: int = DPI

    def opts(self) -> dict[str, Any]:
        """kaleido's layout options: PNG at scale dpi/96, SVG and PDF (vector) at scale 1."""
        scale = self.dpi / CSS_DPI if self.format == "png" else 1
        return {"format": self.format, "width": self.width, "height": self.height, "scale": scale}


@dataclass
class Rendered:
    """The images' bytes, in order, with how long the browser took to start and each image."""

    images: list[bytes]
    start_s: float
    each_s: list[float] = field(default_factory=list)


async def _draw(images: Sequence[Image], browser: str) -> Rendered:
    import kaleido

    t0 = time.perf_counter()
    async with kaleido.Kaleido(path=browser, mathjax=False, timeout=TIMEOUT_S) as k:
        done = Rendered([], time.perf_counter() - t0)
        for image in images:
            t = time.perf_counter()
            data = await k.calc_fig(image.figure, opts=image.opts())
            if image.format == "png":
                data = with_dpi(data, image.dpi)
            done.images.append(data)
            done.each_s.append(time.perf_counter() - t)
    return done


def _run(images: Sequence[Image], browser: str) -> Rendered:
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(_draw(images, browser))
    # Called from a running event loop (a notebook): draw on a loop of its own in a thread.
    result: list[Any] = []

    def work() -> None:
        try:
            result.append(asyncio.run(_draw(images, browser)))
        except BaseException as exc:  # re-raised in the caller's thread
            result.append(exc)

    thread = threading.Thread(target=work, name="fitcli-export")
    thread.start()
    thread.join()
    if isinstance(result[0], BaseException):
        raise result[0]
    return result[0]


def render(images: Sequence[Image], browser: str | None = None) -> Rendered:
    """Draw every image in one browser session (`find_browser` unless `browser` is given).
    FigureExportError (exit 1) when the browser cannot draw them."""
    for image in images:
        if image.format not in FORMATS:
            raise ValueError(f"unknown image format {image.format!r}")
    path = browser if browser is not None else find_browser()
    if not images:
        return Rendered([], 0.0)
    try:
        return _run(images, path)
    except (KeyboardInterrupt, BrowserNotFoundError):
        raise
    except Exception as exc:
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        raise FigureExportError(
            f"the browser {path} could not draw the figures: {type(exc).__name__}"
            + (f": {reason}" if reason else "")
        ) from None


def with_dpi(png: bytes, dpi: int) -> bytes:
    """The PNG with its resolution set to `dpi` (a pHYs chunk after IHDR, replacing any)."""
    sig, ihdr_end = png[:8], 8 + 8 + 13 + 4
    if sig != b"\x89PNG\r\n\x1a\n" or png[12:16] != b"IHDR":
        raise FigureExportError("the browser returned a PNG without its header")
    chunks, i = [], ihdr_end
    while i < len(png):
        (n,) = struct.unpack(">I", png[i : i + 4])
        if png[i + 4 : i + 8] != b"pHYs":
            chunks.append(png[i : i + 12 + n])
        i += 12 + n
    per_m = round(dpi / 0.0254)
    body = b"pHYs" + struct.pack(">IIB", per_m, per_m, 1)  # unit 1: per metre
    phys = struct.pack(">I", 9) + body + struct.pack(">I", zlib.crc32(body))
    return png[:ihdr_end] + phys + b"".join(chunks)


__all__ = ["FORMATS", "Image", "Rendered", "find_browser", "render", "with_dpi"]
