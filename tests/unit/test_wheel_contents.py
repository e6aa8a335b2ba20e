"""The wheel carries the files servelm reads at run time besides Python modules: the web
playground's static files and the C kernels' sources (built on first use, not at install)."""

from __future__ import annotations

import re
import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_wheel_has_the_playground_and_the_kernel_sources(tmp_path):
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
                    str(ROOT), "-w", str(tmp_path)], check=True, timeout=300)
    (wheel,) = tmp_path.glob("servelm-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    static = ROOT / "servelm" / "server" / "static"
    for page in ("index.html", "dashboard.html"):
        # every file the pages load from /static/ is in the wheel
        for used in re.findall(r'"/static/([\w.-]+)"', (static / page).read_text()):
            assert f"servelm/server/static/{used}" in names
        assert f"servelm/server/static/{page}" in names
    for source in (ROOT / "servelm" / "ops" / "csrc").glob("*.c"):
        assert f"servelm/ops/csrc/{source.name}" in names
