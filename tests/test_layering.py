"""The engine never loads the UI: `import remote` (and its engine) must not pull in textual."""

from __future__ import annotations

import subprocess
import sys

from tests.conftest import REPO


def test_import_remote_does_not_load_textual() -> None:
    code = (
        "import sys, remote, remote.engine, remote.journal, remote.scheduler, remote.recipe_loader, "
        "remote.transport.local\n"
        "bad = sorted(m for m in sys.modules if m == 'textual' or m.startswith(('textual.', 'console')))\n"
        "print(','.join(bad))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=REPO)
    assert out.stdout.strip() == ""


def test_remote_sources_never_import_textual() -> None:
    offenders = [p for p in (REPO / "remote").rglob("*.py")
                 if "import textual" in p.read_text() or "from textual" in p.read_text()
                 or "from console" in p.read_text() or "import console" in p.read_text()]
    assert offenders == []
