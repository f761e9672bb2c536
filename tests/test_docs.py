"""The API reference covers every public module, so docstrings cannot go unpublished."""

from __future__ import annotations

from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def public_modules() -> list[str]:
    names = []
    for path in sorted((ROOT / "m3").rglob("*.py")):
        parts = path.relative_to(ROOT).with_suffix("").parts
        if any(part.startswith("_") for part in parts):
            continue
        names.append(".".join(parts))
    return names


def test_every_public_module_has_an_api_page_in_the_nav():
    nav = (ROOT / "mkdocs.yml").read_text()
    missing = []
    for module in public_modules():
        page = ROOT / "docs" / "api" / (module.removeprefix("m3.").replace(".", "/") + ".md")
        if not page.exists() or f"::: {module}" not in page.read_text():
            missing.append(f"{module}: no {page.relative_to(ROOT)} with '::: {module}'")
        elif str(page.relative_to(ROOT / "docs")) not in nav:
            missing.append(f"{module}: {page.relative_to(ROOT)} is not in the mkdocs nav")
    assert not missing, "\n".join(missing)
