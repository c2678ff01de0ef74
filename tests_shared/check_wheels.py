"""Check built wheels: six distributions, PEP 420 namespace (no fattn/__init__.py), the right package inside.

Usage: python tests_shared/check_wheels.py DIST_DIR
"""

from __future__ import annotations

import sys
import zipfile
from pathlib import Path

EXPECTED = {"core", "deform", "msda", "swba", "rope2d", "fp8"}


def main(dist: Path) -> int:
    wheels = sorted(dist.glob("*.whl"))
    found: dict[str, Path] = {}
    problems = []
    for wheel in wheels:
        name = wheel.name.split("-")[0].replace("_", "-")
        sub = name.removeprefix("fattn-")
        found[sub] = wheel
        files = zipfile.ZipFile(wheel).namelist()
        if "fattn/__init__.py" in files:
            problems.append(f"{wheel.name}: ships fattn/__init__.py (fattn must stay a PEP 420 namespace)")
        code = [f for f in files if f.startswith("fattn/") and f.endswith(".py")]
        if not code or any(not f.startswith(f"fattn/{sub}/") for f in code):
            problems.append(f"{wheel.name}: expected only fattn/{sub}/*.py, got {code[:5]}")
        if not any(f.endswith("LICENSE") for f in files):
            problems.append(f"{wheel.name}: no LICENSE in the wheel")
    missing = EXPECTED - set(found)
    if missing:
        problems.append(f"missing wheels for: {', '.join(sorted(missing))}")
    for p in problems:
        print("ERROR:", p)
    print(f"{len(wheels)} wheels checked: " + ", ".join(w.name for w in wheels))
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main(Path(sys.argv[1])))
