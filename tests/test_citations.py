"""Everything the code cites is in the repository.

A citation is `docs/NAME.md §ID` (several ids may follow: `docs/reference.md §3.1, §4.1`, `§1.5-1.7`): the file
must exist and every id must be the first word of one of its headings (`## 3.2 Optimizer, ...`, `### B.18 ...`).
A `§` with no file before it on the same line is an error (outside docs/, where it means the page itself), and so
is any `*.md` or repository path (`tests/...py`, `configs/...json`, `tests/x.py::test_name`) that does not exist
(docs/ pages cite other repositories' files, so only their `.md` references and links are checked there).
Markdown links in README.md and docs/ must point at files that exist.
"""
from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SCANNED_DIRS = ("dimscale", "tools", "launchers", "tests", "configs", "docs")
SCANNED_FILES = ("README.md", "setup.cfg", "Makefile", "pyproject.toml")
SUFFIXES = {".py", ".c", ".h", ".json", ".cfg", ".toml", ".sh", ".md", ".txt"}

URL = re.compile(r"\w+://\S+")
MD_REF = re.compile(r"(?<![\w/.-])((?:[\w-]+/)*[\w.-]+\.md)\b")
# §3, §1.2.1, §B.18, §C, §1.5-1.7, §B.8-B.12
SECTION = re.compile(r"§\s?([A-Z](?:\.\d+)*|\d+(?:\.\d+)*)(?:-([A-Z](?:\.\d+)+|\d+(?:\.\d+)*))?")
# a path inside the repository; a segment in capitals (tools/benchmarks/NAME.py, configs/X.json) is a placeholder
REPO_PATH = re.compile(r"(?<![\w/.-])((?:dimscale|tools|launchers|tests|configs|docs)/[\w./-]*\w\.(?:py|c|json|sh|png))\b"
                       r"(?:::(\w+))?")
PLACEHOLDER = re.compile(r"/[A-Z]+\.")
BARE_NOTE = re.compile(r"(?<![§\w.-])[A-E]\.\d+\b")  # B.18 without its §, as the old notes were cited
LINK = re.compile(r"\]\(([^)\s]+)\)")


def scanned_files() -> list[Path]:
    files = [ROOT / f for f in SCANNED_FILES if (ROOT / f).is_file()]
    for d in SCANNED_DIRS:
        files += sorted(p for p in (ROOT / d).rglob("*") if p.is_file() and p.suffix in SUFFIXES
                        and "__pycache__" not in p.parts)
    return [p for p in files if p != Path(__file__).resolve()]  # this file's examples are broken on purpose


def heading_ids(path: Path) -> set[str]:
    """First word of every markdown heading outside code fences: '## 3.2 Optimizer' -> '3.2'."""
    ids, fenced = set(), False
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.startswith("```"):
            fenced = not fenced
        elif not fenced and re.match(r"#+ \S", line):
            ids.add(line.split()[1].rstrip(".:"))
    return ids


def citation_errors(path: Path) -> list[str]:
    """'file:line: problem' for every citation in `path` that does not resolve."""
    rel = path.relative_to(ROOT).as_posix()
    in_docs = rel.startswith("docs/") and path.suffix == ".md"
    errors = []
    for no, raw in enumerate(path.read_text(encoding="utf-8", errors="replace").splitlines(), 1):
        where = f"{rel}:{no}"
        line = URL.sub("", raw)
        refs = [(m.start(), m.group(1)) for m in MD_REF.finditer(line)]
        for _, name in refs:
            if not (ROOT / name).is_file():
                errors.append(f"{where}: '{name}' is not a file of the repository (cite docs/reference.md or "
                              f"docs/engineering-notes.md by their path from the repository root)")
        for m in REPO_PATH.finditer("" if in_docs else line):
            name, func = m.groups()
            if PLACEHOLDER.search(name):
                continue
            if not (ROOT / name).exists():
                errors.append(f"{where}: '{name}' does not exist in the repository")
            elif func and not re.search(rf"^\s*(?:async )?def {func}\(", (ROOT / name).read_text(), re.M):
                errors.append(f"{where}: '{name}' has no function '{func}'")
        for m in BARE_NOTE.finditer("" if path.suffix == ".md" and re.match(r"#+ ", line) else line):
            errors.append(f"{where}: '{m.group(0)}' is not a citation; write 'docs/engineering-notes.md §{m.group(0)}'")
        for m in SECTION.finditer(line):
            before = [name for pos, name in refs if pos < m.start()]
            target = before[-1] if before else (rel if in_docs else None)
            if target is None:
                errors.append(f"{where}: '{m.group(0)}' names no file; write it as 'docs/reference.md "
                              f"{m.group(0)}' (or docs/engineering-notes.md) on the same line")
                continue
            if not (ROOT / target).is_file():
                continue  # reported above
            ids = heading_ids(ROOT / target)
            for sec in filter(None, m.groups()):
                if sec not in ids:
                    errors.append(f"{where}: {target} has no heading '§{sec}'")
    return errors


def link_errors(path: Path) -> list[str]:
    """Relative markdown links of `path` that point at nothing."""
    rel, errors = path.relative_to(ROOT).as_posix(), []
    for no, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        for m in LINK.finditer(line):
            target = m.group(1).split("#")[0]
            if target and not URL.match(m.group(1)) and not target.startswith("mailto:"):
                if not (path.parent / target).exists():
                    errors.append(f"{rel}:{no}: link to '{target}', which does not exist")
    return errors


def test_every_citation_resolves_to_a_heading_of_a_file_in_the_repository():
    files = scanned_files()
    assert any(p.name == "train.py" for p in files)  # the scan sees the code
    errors = [e for p in files for e in citation_errors(p)]
    assert not errors, f"{len(errors)} unresolved citation(s):\n" + "\n".join(errors)


def test_links_in_readme_and_docs_point_at_files():
    pages = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]
    errors = [e for p in pages for e in link_errors(p)]
    assert not errors, "\n".join(errors)


def test_the_checker_catches_each_kind_of_broken_citation(tmp_path, monkeypatch):
    """The rules above can fail: a bare §, a missing file, a missing heading, a missing repo path, a dead link."""
    monkeypatch.setitem(globals(), "ROOT", tmp_path)
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "reference.md").write_text("# Ref\n## 3 Recipe\n### 3.2 Optimizer\n```\n## 9 fenced\n```\n")
    (tmp_path / "README.md").write_text("[ok](docs/reference.md) [dead](docs/gone.md) [web](https://x.org/a.md)\n")
    src = tmp_path / "mod.py"
    src.write_text("# docs/reference.md §3.2, §3 and §3-3.2\n"           # fine
                   "# bare §3.2\n"                                       # no file
                   "# notes.md §1\n"                                     # not a repo file
                   "# docs/reference.md §3.3 and §9\n"                   # no such headings (9 is inside a fence)
                   "# see tests/test_gone.py and configs/X.json\n"       # missing path; X is a placeholder
                   "# tests/t.py::test_there, tests/t.py::test_gone\n"   # a test that is not in its file
                   "# as field-notes B.24 says\n")                       # a note id with no file and no §
    (tmp_path / "tests").mkdir()
    (tmp_path / "tests" / "t.py").write_text("def test_there():\n    pass\n")
    errors = citation_errors(src)
    assert [e.split(":")[1] for e in errors] == ["2", "3", "4", "4", "5", "6", "7"], errors
    assert "names no file" in errors[0] and "'notes.md'" in errors[1] and "'§3.3'" in errors[2]
    assert "'§9'" in errors[3] and "tests/test_gone.py" in errors[4] and "no function 'test_gone'" in errors[5]
    assert "'B.24' is not a citation" in errors[6]
    assert [e.split(": ")[1] for e in link_errors(tmp_path / "README.md")] == [
        "link to 'docs/gone.md', which does not exist"]
