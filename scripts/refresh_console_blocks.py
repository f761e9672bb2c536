"""Re-run every ```console block of the CLI and recipes guides and paste the real output.

tests/test_cli.py checks that these blocks show exactly what the commands print; run this
after changing a command's output, then read the diff:

    python scripts/refresh_console_blocks.py && git diff docs/guides
"""

from __future__ import annotations

import os
import shlex
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
GUIDES = [ROOT / "docs" / "guides" / name for name in ("cli.md", "recipes.md")]


def output_of(command: str) -> str:
    args = shlex.split(command)[2:]  # "$ m3 ..."
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    done = subprocess.run(
        [sys.executable, "-m", "m3", *args], cwd=ROOT, env=env, capture_output=True, text=True
    )
    return done.stdout + done.stderr


def refresh(path: Path) -> None:
    head, *blocks = path.read_text(encoding="utf-8").split("```console\n")
    out = [head]
    for block in blocks:
        body, rest = block.split("\n```", 1)
        command = body.partition("\n")[0]
        out.append(f"{command}\n{output_of(command).rstrip(chr(10))}\n```{rest}")
    path.write_text("```console\n".join(out), encoding="utf-8")


if __name__ == "__main__":
    for guide in GUIDES:
        refresh(guide)
