"""An HTML template for `dvc plots show/diff` that renders with no network.

DVC's default page loads Vega, Vega-Lite and vega-embed from a CDN, so offline it renders
blank. This writes a template with the three libraries inlined, taken from their npm packages:

    python -m kd.report.plots_html                     # installs them under .cache/vega once, via npm
    dvc plots diff --html-template .cache/vega/offline.html
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
from pathlib import Path

from kd.core import cli

# The majors DVC's renderer writes specs for (dvc_render/vega.py pins vega 5, vega-lite 5, embed 6).
PACKAGES = {"vega": "5", "vega-lite": "5", "vega-embed": "6"}
BUILDS = {"vega": "build/vega.min.js", "vega-lite": "build/vega-lite.min.js",
          "vega-embed": "build/vega-embed.min.js"}

PAGE = """<!DOCTYPE html>
<html>
<head>
    {refresh_tag}
    <meta charset="utf-8">
    <title>DVC Plot (offline)</title>
    <style>table { border-spacing: 15px; }</style>
{inline}
</head>
<body>
    {plot_divs}
</body>
</html>
"""


def ensure_packages(prefix: Path) -> Path:
    modules = prefix / "node_modules"
    if all((modules / name / build).exists() for name, build in BUILDS.items()):
        return modules
    npm = shutil.which("npm")
    if npm is None:
        raise SystemExit(
            "npm is needed once to fetch vega, vega-lite and vega-embed: install Node.js, or "
            "pass --node-modules pointing at a node_modules folder that has them"
        )
    specs = [f"{name}@{major}" for name, major in PACKAGES.items()]
    subprocess.run([npm, "install", "--no-audit", "--no-fund", "--prefix", str(prefix), *specs],
                   check=True)
    return modules


def render(modules: Path) -> str:
    scripts = []
    for name, build in BUILDS.items():
        js = (modules / name / build).read_text(encoding="utf-8")
        # An inline script ends at the first "</script", wherever it appears.
        js = js.replace("</script", "<\\/script")
        scripts.append("<script>\n" + js + "\n</script>")
    return PAGE.replace("{inline}", "\n".join(scripts))


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--node-modules", type=Path, help="a node_modules folder with the packages")
    ap.add_argument("--prefix", type=Path, default=Path(".cache/vega"))
    ap.add_argument("--out", type=Path, default=Path(".cache/vega/offline.html"))
    args = ap.parse_args(argv)
    modules = args.node_modules or ensure_packages(args.prefix)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(render(modules), encoding="utf-8")
    print(f"wrote {args.out}; use: dvc plots diff --html-template {args.out}")


if __name__ == "__main__":
    cli.run(main)
