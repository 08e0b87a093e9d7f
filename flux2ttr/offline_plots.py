"""An HTML page template that makes ``dvc plots show`` work without internet.

DVC's page loads Vega, Vega-Lite and Vega-Embed from a CDN, so it is blank offline. DVC accepts a page
template of its own (``plots.html_template``, a path relative to ``.dvc/``; the template must hold
``{plot_divs}``; without ``{scripts}`` DVC adds no script tags). :func:`install` writes one that carries
those three libraries inline, bundled by the ``vl-convert-python`` package (installed, never downloaded at
run time), and points the repository's local DVC config at it. Every ``dvc plots show`` then writes a
self-contained ``index.html``.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from flux2ttr.atomic import atomic_write_text
from flux2ttr.config import Flux2TTRError

TEMPLATE = Path("plots") / "offline.html"  # relative to .dvc/, as DVC reads plots.html_template
VEGA_LITE_VERSION = "5.21"  # DVC's plot templates (and .dvc/plots/*.json) are Vega-Lite v5 specs
_BUNDLE_MARK = "/*flux2ttr:vega-bundle*/"

PAGE = """<!DOCTYPE html>
<html>
<head>
    <meta charset="utf-8">
    <title>flux2ttr plots</title>
    <script type="text/javascript">/*flux2ttr:vega-bundle*/</script>
    <style>
        table { border-spacing: 15px; }
    </style>
</head>
<body>
    {plot_divs}
</body>
</html>
"""


class OfflinePlotsError(Flux2TTRError):
    """The offline template cannot be made here (package missing, not a DVC repository, dvc failed)."""


def page(vl_version: str = VEGA_LITE_VERSION) -> str:
    """The template text: :data:`PAGE` with Vega-Embed, Vega-Lite ``vl_version`` and Vega inline."""
    try:
        import vl_convert  # noqa: PLC0415 - optional: only this command needs it
    except ImportError:
        raise OfflinePlotsError('the offline plot page needs vl-convert-python: pip install "flux2ttr[pipeline]"'
                                ) from None
    bundle = vl_convert.javascript_bundle(vl_version=vl_version)
    # inside <script>, "</script" would end the element; "<\/" is the same text to JavaScript
    return PAGE.replace(_BUNDLE_MARK, bundle.replace("</script", "<\\/script"))


def install(repo: Path = Path("."), vl_version: str = VEGA_LITE_VERSION) -> Path:
    """Write ``repo/.dvc/plots/offline.html`` and set ``plots.html_template`` in the repository's local DVC
    config (``.dvc/config.local``, not committed). Returns the template's path."""
    dvc_dir = Path(repo) / ".dvc"
    if not dvc_dir.is_dir():
        raise OfflinePlotsError(f"{Path(repo).resolve()} is not a DVC repository (no .dvc/); run this in the "
                                "project's root")
    path = dvc_dir / TEMPLATE
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, page(vl_version))
    cmd = [sys.executable, "-m", "dvc", "config", "--local", "plots.html_template", TEMPLATE.as_posix()]
    res = subprocess.run(cmd, cwd=repo, capture_output=True, text=True)
    if res.returncode:
        raise OfflinePlotsError(f"`dvc config --local plots.html_template {TEMPLATE.as_posix()}` failed: "
                                f"{res.stderr.strip() or res.stdout.strip()}")
    return path
