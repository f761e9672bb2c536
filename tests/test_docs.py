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


def _documented(doc: str) -> set[str]:
    """Names listed in a Google-style docstring's `Args:` and `Attributes:` sections."""
    import re

    names: set[str] = set()
    for section in ("Args", "Attributes"):
        found = re.search(rf"^{section}:\n((?:[ \t]+.*\n?|\n)*)", doc, re.M)
        if found:
            names |= set(re.findall(r"^    (\*{0,2}\w+)(?: \(.*?\))?:", found.group(1), re.M))
    return names


def _parameters(function) -> list[str]:
    import inspect

    prefix = {inspect.Parameter.VAR_POSITIONAL: "*", inspect.Parameter.VAR_KEYWORD: "**"}
    return [
        prefix.get(p.kind, "") + p.name
        for p in inspect.signature(function).parameters.values()
        if p.name not in ("self", "cls")
    ]


def _overrides_m3(cls: type, name: str) -> bool:
    """Whether a method overrides one of an m3 base class (whose docstring then applies)."""
    return any(
        name in base.__dict__ and base.__module__.startswith("m3") for base in cls.__mro__[1:]
    )


def docstring_gaps(module_name: str) -> list[str]:
    """Public classes, functions and methods of a module without a docstring, or whose
    docstring does not name every argument under `Args:` (classes: `Args:` or `Attributes:`).
    """
    import dataclasses
    import importlib
    import inspect

    gaps = []

    def check(where: str, function, owner: type | None = None, name: str = "") -> None:
        inherited = owner is not None and _overrides_m3(owner, name)
        doc = inspect.getdoc(function) if function.__doc__ else None
        if not doc:
            if not inherited:
                gaps.append(f"{where}: no docstring")
            return
        if inherited and "Args:" not in doc:
            return
        missing = [p for p in _parameters(function) if p not in _documented(doc)]
        if missing:
            gaps.append(f"{where}: Args does not describe {', '.join(missing)}")

    module = importlib.import_module(module_name)
    for name, obj in vars(module).items():
        if name.startswith("_") or getattr(obj, "__module__", None) != module_name:
            continue
        where = f"{module_name}.{name}"
        if inspect.isfunction(obj):
            check(where, obj)
        elif inspect.isclass(obj):
            doc = obj.__dict__.get("__doc__")
            if not doc:
                gaps.append(f"{where}: no docstring")
                continue
            if issubclass(obj, tuple):
                arguments = list(getattr(obj, "_fields", ()))
            elif "__init__" in obj.__dict__ or dataclasses.is_dataclass(obj):
                arguments = _parameters(obj)
            else:
                arguments = []
            missing = [a for a in arguments if a not in _documented(inspect.cleandoc(doc))]
            if missing:
                gaps.append(f"{where}: Args/Attributes does not describe {', '.join(missing)}")
            for member_name, member in obj.__dict__.items():
                if member_name.startswith("_"):
                    continue
                if isinstance(member, property):
                    if not member.fget.__doc__:
                        gaps.append(f"{where}.{member_name}: no docstring")
                    continue
                if isinstance(member, (staticmethod, classmethod)):
                    member = member.__func__
                if inspect.isfunction(member):
                    check(f"{where}.{member_name}", member, obj, member_name)
    return gaps


def test_every_public_function_and_class_documents_its_arguments():
    gaps = []
    for module in public_modules():
        gaps += docstring_gaps(module)
    assert not gaps, "\n".join(gaps)


def test_python_in_the_docs_comes_from_files_the_tests_run():
    # A ```python block holds only `--8<--` includes of files under docs/examples or tests,
    # so the code a page shows is code that runs; every docs/examples script is named by a
    # test. (YAML, console and output blocks are checked elsewhere or not code.)
    import re

    inline = []
    for path in sorted((ROOT / "docs").rglob("*.md")):
        text = path.read_text(encoding="utf-8")
        for block in re.finditer(r"^```python\n(.*?)^```", text, re.M | re.S):
            lines = [line for line in block.group(1).splitlines() if line.strip()]
            if not lines or not all(re.fullmatch(r'--8<-- "[^"]+"', line) for line in lines):
                number = text[: block.start()].count("\n") + 1
                inline.append(f"{path.relative_to(ROOT)}:{number}")
    assert not inline, f"inline Python, move it to docs/examples: {inline}"
    tests = "\n".join(p.read_text(encoding="utf-8") for p in (ROOT / "tests").glob("*.py"))
    unrun = [
        path.name
        for path in sorted((ROOT / "docs" / "examples").glob("*.py"))
        if not re.search(rf"\b{path.stem}\b", tests)
    ]
    assert not unrun, f"docs/examples scripts no test runs: {unrun}"


def test_nothing_cites_the_team_notes():
    # The team's notes are not part of the repository: cite the paper or the docs' pages.
    import subprocess

    files = subprocess.run(
        ["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True
    ).stdout.split()
    needle = "SPEC" + " §"
    found = [
        name
        for name in files
        if (ROOT / name).is_file()
        and needle in (ROOT / name).read_text(encoding="utf-8", errors="ignore")
    ]
    assert not found, f"{needle!r} appears in: {', '.join(found)}"
