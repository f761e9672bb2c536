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


def test_the_recipes_table_lists_every_shipped_recipe():
    import importlib.util

    from m3.recipes import shipped_recipes

    spec = importlib.util.spec_from_file_location("docs_hooks", ROOT / "docs" / "hooks.py")
    hooks = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(hooks)
    table = hooks.recipes_table()
    shipped = shipped_recipes()
    assert len(table.splitlines()) == 2 + len(shipped)
    for recipe in shipped:
        assert f"`{recipe.path.relative_to(ROOT).as_posix()}`" in table
        assert f"`{recipe.command.replace('|', chr(92) + '|')}`" in table
    page = (ROOT / "docs" / "recipes.md").read_text()
    assert hooks.MARKER in page
    assert hooks.on_page_markdown(page, None, None, None).count("\n| `recipes/") == len(shipped)


def test_snippet_lines_are_not_reformatted():
    # `ruff format` rewrites `--8<-- "file"` in a ```python block into `--8 < --"file"`,
    # which mkdocs then shows as code instead of including the file: wrap such blocks in
    # <!-- fmt: off --> / <!-- fmt: on -->.
    broken = [
        f"{path.relative_to(ROOT)}:{number}"
        for path in sorted((ROOT / "docs").rglob("*.md"))
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1)
        if line.lstrip().startswith("--8 <")
    ]
    assert not broken, broken


def test_the_recipe_sections_table_lists_every_key():
    import dataclasses
    import importlib.util

    from m3.recipes import Recipe

    spec = importlib.util.spec_from_file_location("docs_hooks", ROOT / "docs" / "hooks.py")
    hooks = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(hooks)
    rows = hooks.sections_table().splitlines()[2:]
    assert [row.split("`")[1] for row in rows] == [f.name for f in dataclasses.fields(Recipe)]
    assert all(not row.endswith("|  |") for row in rows), "a Recipe attribute lacks its docstring"
    assert hooks.SECTIONS_MARKER in (ROOT / "docs" / "guides" / "recipes.md").read_text()
