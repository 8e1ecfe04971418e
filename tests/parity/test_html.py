"""The HTML report: self-contained, and rendered with its images in headless Chromium.

Needs a Chromium binary (Debian/Ubuntu: ``apt-get install -y chromium``; or set
UGSEP_CHROMIUM to one). Without one the browser test FAILS, on purpose, so CI cannot
silently skip it; set UGSEP_ALLOW_NO_BROWSER=1 to skip it on a machine without one.
"""

from __future__ import annotations

import base64
import os
import re
import shutil
import struct
import subprocess

import numpy as np
import pytest

from exporter.steps.parity import check_bundle, write_html_report
from tests.parity.faults import scale_weight

PROBE = """<script>
window.addEventListener('load', () => {
  for (const img of document.images) {
    const r = img.getBoundingClientRect();
    img.setAttribute('data-natural', img.naturalWidth + 'x' + img.naturalHeight);
    img.setAttribute('data-box', Math.round(r.width) + 'x' + Math.round(r.height));
  }
  document.body.setAttribute('data-probe', 'done');
});
</script></body>"""
MPL_BLUE = np.array([31, 119, 180])  # the plots' colour (#1f77b4); the page's CSS never uses it


def chromium() -> str | None:
    exe = os.environ.get("UGSEP_CHROMIUM")
    if exe:
        return exe
    for name in ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable"):
        if shutil.which(name):
            return shutil.which(name)
    return None


def _browser_args(exe: str, profile) -> list[str]:
    return [
        exe,
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--hide-scrollbars",
        f"--user-data-dir={profile}",
        "--window-size=1280,2400",
    ]


@pytest.fixture(scope="module")
def html_report(split_bundle_master, split_model, tmp_path_factory):
    d = tmp_path_factory.mktemp("html")
    bundle = shutil.copytree(split_bundle_master, d / "bundle")
    scale_weight(bundle, "group.onnx", "group.cross", 1.5)  # one failing, localised stage
    report = check_bundle(bundle, split_model, n_rows=300, progress=False)
    return write_html_report(report, d / "out" / "report.html"), report


def _png_size(data: bytes) -> tuple[int, int]:
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR"
    return struct.unpack(">II", data[16:24])


def test_page_is_self_contained_with_plots_per_stage(html_report):
    path, report = html_report
    text = path.read_text()
    assert not re.search(r"""(src|href)=['"](?!data:)""", text), "the page must not load anything"
    images = re.findall(r"src='data:image/png;base64,([^']+)'", text)
    ran = [s for s in report.stages if s.status in ("passed", "failed")]
    assert len(images) == 2 * len(ran)  # a scatter and a histogram per stage that ran
    for b64 in images:
        w, h = _png_size(base64.b64decode(b64))
        assert w > 100 and h > 100
    assert "group.cross" in text and "FAILED" in text  # localisation and verdict are on the page


def test_report_renders_in_headless_chromium(html_report, tmp_path):
    exe = chromium()
    if exe is None:
        if os.environ.get("UGSEP_ALLOW_NO_BROWSER") == "1":
            pytest.skip("no Chromium and UGSEP_ALLOW_NO_BROWSER=1")
        pytest.fail("no Chromium found: apt-get install -y chromium (or set UGSEP_CHROMIUM)")
    path, report = html_report
    probe = tmp_path / "probe.html"
    probe.write_text(path.read_text().replace("</body>", PROBE))
    dom = subprocess.run(
        [
            *_browser_args(exe, tmp_path / "p1"),
            "--virtual-time-budget=10000",
            "--dump-dom",
            probe.as_uri(),
        ],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    ).stdout
    assert 'data-probe="done"' in dom
    natural = re.findall(r'data-natural="(\d+)x(\d+)"', dom)
    boxes = re.findall(r'data-box="(\d+)x(\d+)"', dom)
    ran = [s for s in report.stages if s.status in ("passed", "failed")]
    assert len(natural) == len(boxes) == 2 * len(ran) >= 4
    assert all(int(w) > 0 and int(h) > 0 for w, h in natural + boxes), (natural, boxes)

    shot = tmp_path / "shot.png"
    subprocess.run(
        [*_browser_args(exe, tmp_path / "p2"), f"--screenshot={shot}", path.as_uri()],
        capture_output=True,
        timeout=120,
        check=True,
    )
    from matplotlib.image import imread

    pixels = (imread(str(shot))[..., :3] * 255).round().astype(int)
    assert pixels.shape[0] > 0 and pixels.shape[1] > 0
    blue = np.all(np.abs(pixels - MPL_BLUE) <= 8, axis=-1)
    assert blue.sum() > 2000, "the plots did not render on the page"
