"""Regenerate docs/report.png, the README's picture of the seed report.

    make screenshot          # or: .venv/bin/python tools/screenshot.py [OUT.png]

Trains configs/seed.yaml into a temporary folder, runs `fitcli plot` on it and photographs
report.html in Debian's headless Chromium (/usr/bin/chromium, /usr/bin/chromedriver), opened
from disk with no network.
"""

from __future__ import annotations

import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FITCLI = [sys.executable, "-m", "fitcli.cli"]


def main() -> None:
    out = Path(sys.argv[1]) if len(sys.argv) > 1 else ROOT / "docs" / "report.png"
    sys.path.insert(0, str(ROOT / "tests"))
    from test_browser import make_driver, wait_rendered

    with tempfile.TemporaryDirectory() as tmp:
        run = Path(tmp) / "seed-sine"
        subprocess.run(
            [*FITCLI, "train", str(ROOT / "configs/seed.yaml"), "--run-dir", str(run)]
            + ["--progress", "none"],
            check=True,
            stdout=subprocess.DEVNULL,
        )
        subprocess.run([*FITCLI, "plot", str(run)], check=True, stdout=subprocess.DEVNULL)
        driver = make_driver(Path(tmp) / "profile", width=1280, height=900)
        try:
            driver.get((run / "report.html").as_uri())
            wait_rendered(driver, ["fitcli-fit", "fitcli-loss", "fitcli-params"])
            # The whole page in one picture: grow the window to the document's height.
            height = driver.execute_script("return document.documentElement.scrollHeight")
            driver.set_window_size(1280, min(int(height) + 100, 6000))
            wait_rendered(driver, ["fitcli-fit", "fitcli-residuals"])
            out.parent.mkdir(parents=True, exist_ok=True)
            driver.save_screenshot(str(out))
        finally:
            driver.quit()
    print(out)


if __name__ == "__main__":
    main()
