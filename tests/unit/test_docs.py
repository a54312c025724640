"""The README and docs/ say what the code does: links resolve, the reference tables name only
real flags, metrics and failure reasons (the reasons in their order of precedence), and the
architecture page covers every part of the package."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from ntp_probe.cli.main import serve_parser
from ntp_probe.engine.result import Reason
from ntp_probe.exposition.families import declared
from tests.unit.test_examples import internal_names

ROOT = Path(__file__).resolve().parents[2]
README = ROOT / "README.md"
DOCS = sorted((ROOT / "docs").glob("*.md"))
PACKAGE = ROOT / "ntp_probe"


def anchors(markdown: str) -> set[str]:
    """GitHub's heading anchors: lower case, punctuation dropped, spaces as dashes."""
    out = set()
    for line in markdown.splitlines():
        m = re.match(r"#{1,6} (.+)", line)
        if m and not line.startswith("#!"):
            out.add(re.sub(r"[^\w\- ]", "", m.group(1).strip().lower()).replace(" ", "-"))
    return out


def prose(markdown: str) -> str:
    """The text outside fenced code blocks (a `# comment` in a shell block is no heading)."""
    return re.sub(r"^```.*?^```", "", markdown, flags=re.S | re.M)


@pytest.mark.parametrize("path", [README, *DOCS], ids=lambda p: p.name)
def test_relative_links_resolve(path: Path) -> None:
    text = prose(path.read_text())
    for target in re.findall(r"\]\(([^)\s]+)\)", text):
        if re.match(r"[a-z]+:", target):
            continue
        file, _, anchor = target.partition("#")
        linked = (path.parent / file).resolve() if file else path
        assert linked.exists(), f"{path.name}: {target}"
        if anchor:
            assert anchor in anchors(prose(linked.read_text())), f"{path.name}: {target}"


def test_readme_links_the_docs_and_keeps_them_out() -> None:
    text = README.read_text()
    for name in ("architecture.md", "performance.md", "reliability.md"):
        assert f"(docs/{name})" in text, name
        assert (ROOT / "docs" / name).is_file()
    headings = [line for line in prose(text).splitlines() if line.startswith("## ")]
    assert "## Contents" in headings
    assert not {"## Performance", "## Reliability", "## Layout"} & set(headings)


def section(text: str, heading: str) -> str:
    start = text.index(heading + "\n")
    end = text.find("\n#", start + len(heading))
    return text[start:end if end != -1 else None]


def test_failure_reasons_table_lists_every_reason_in_precedence_order() -> None:
    table = section(README.read_text(), "### Failure reasons")
    listed = [code for row in re.findall(r"^\| (`[^|]+) \|", table, flags=re.M)
              for code in re.findall(r"`([a-z0-9_]+)`", row)]
    assert listed == [r.value for r in Reason]


def test_readme_names_only_real_metrics() -> None:
    known = {f.name for f in declared()} | internal_names()
    named = set(re.findall(r"`((?:probe|ntp_probe)_[a-z0-9_]+)", README.read_text()))
    assert "probe_ntp_offset_seconds" in named
    assert not named - known, sorted(named - known)


def test_readme_names_only_real_flags() -> None:
    flags = {o for a in serve_parser()._actions for o in a.option_strings if o.startswith("--")}
    table = section(README.read_text(), "### Command line")
    named = set(re.findall(r"^\| `(--[a-z.\-]+)`", table, flags=re.M))
    assert "--web.listen-address" in named
    assert not named - flags, sorted(named - flags)


def test_architecture_covers_every_subpackage_and_codec() -> None:
    text = (ROOT / "docs" / "architecture.md").read_text()
    tree = section(text, "## The tree")
    for init in sorted(PACKAGE.rglob("__init__.py")):
        part = init.parent.relative_to(PACKAGE)
        if part.parts:
            assert f"{part.name}/" in tree, part
    for path in sorted(PACKAGE.rglob("*.py")):
        if path.name not in ("__init__.py", "__main__.py"):
            assert path.name in tree, path.relative_to(PACKAGE)
