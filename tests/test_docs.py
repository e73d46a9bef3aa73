"""The README and the docs site stay true to the code and to each other.

* every dotted ``gradtrace.x.y`` name they mention is a module or an attribute that exists;
* every relative link (and image) points to a file that exists, every snippet include
  (``--8<-- "file:section"``, which mkdocs expands) to a file and a section it has;
* every page under docs/ is in mkdocs.yml's nav, and the nav names no missing page.

``mkdocs build --strict`` itself runs in .ci/run (it needs the [docs] extra).
"""
import importlib
import re
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
DOCUMENTS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]

# `gradtrace.x.y`, not inside a path (`gradtraces/gradtrace.json`, `docs/gradtrace.x`) nor followed
# by more of a word or a placeholder (`gradtrace.rank<k>.json`).
DOTTED = re.compile(r"(?<![\w/.\-])gradtrace(?:\.[A-Za-z_]\w*)+(?![\w<])")
FILE_SUFFIXES = {"json", "py", "png", "md", "txt", "yml", "yaml"}
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")
SNIPPET = re.compile(r"^--8<-- \"([^\"]+)\"$", flags=re.M)


def _rel(path: Path) -> str:
    return str(path.relative_to(ROOT))


def dotted_names():
    found = {}
    for document in DOCUMENTS:
        for name in DOTTED.findall(document.read_text()):
            if name.rsplit(".", 1)[1] in FILE_SUFFIXES:  # a file name such as gradtrace.json
                continue
            found.setdefault(name, _rel(document))
    return sorted(found.items())


def resolve(name: str):
    """The object ``name`` names: its longest importable prefix, then attributes."""
    parts = name.split(".")
    for i in range(len(parts), 0, -1):
        module_name = ".".join(parts[:i])
        try:
            obj = importlib.import_module(module_name)
        except ModuleNotFoundError as error:
            if not (module_name + ".").startswith(f"{error.name}."):  # a dependency missing, not a name
                raise                                                  # that is no module
            continue
        for attribute in parts[i:]:
            obj = getattr(obj, attribute)
        return obj
    raise AssertionError(f"no module for {name}")


def test_the_documents_mention_dotted_names():
    names = dict(dotted_names())
    assert {"gradtrace.watch", "gradtrace.load", "gradtrace.testing.assert_grads_flow",
            "gradtrace.render.text.safe"} <= set(names)


@pytest.mark.parametrize(("name", "document"), dotted_names())
def test_every_dotted_gradtrace_name_resolves(name, document):
    try:
        resolve(name)
    except (AttributeError, ModuleNotFoundError) as error:
        pytest.fail(f"{document} mentions {name}, which does not resolve: {error}")


def test_resolve_rejects_a_name_that_is_not_there():
    with pytest.raises(AttributeError):
        resolve("gradtrace.text.safe")  # moved to gradtrace.render.text long ago
    assert resolve("gradtrace.render.text.safe") is importlib.import_module("gradtrace.render.text").safe


def relative_links(document: Path):
    text = re.sub(r"```.*?```", "", document.read_text(), flags=re.S)  # code blocks hold no links
    for target in LINK.findall(text):
        if re.match(r"[a-z][a-z0-9+.-]*:", target) or target.startswith("#"):  # a URL, or this page
            continue
        yield target


@pytest.mark.parametrize("document", DOCUMENTS, ids=_rel)
def test_every_relative_link_points_to_a_file(document):
    links = list(relative_links(document))
    missing = [t for t in links if not (document.parent / t.split("#", 1)[0]).exists()]
    assert not missing, f"{_rel(document)} links to files that do not exist: {missing}"


def test_the_link_check_sees_links():
    assert "docs/reference.md" in set(relative_links(ROOT / "README.md"))
    assert "images/flow.png" in set(relative_links(ROOT / "docs" / "plain-loop.md"))


@pytest.mark.parametrize("document", sorted((ROOT / "docs").glob("*.md")), ids=_rel)
def test_every_snippet_include_has_its_file_and_section(document):
    for include in SNIPPET.findall(document.read_text()):
        path, _, section = include.partition(":")
        assert (ROOT / path).is_file(), f"{_rel(document)} includes {path}, which does not exist"
        if section:
            text = (ROOT / path).read_text()
            for edge in ("start", "end"):
                assert f"<!-- --8<-- [{edge}:{section}] -->" in text, f"{path} has no {edge} of {section!r}"


def _pages(nav):
    for entry in nav:
        value = next(iter(entry.values())) if isinstance(entry, dict) else entry
        if isinstance(value, list):
            yield from _pages(value)
        else:
            yield value


def test_the_mkdocs_nav_lists_every_page():
    config = yaml.safe_load((ROOT / "mkdocs.yml").read_text())
    listed = list(_pages(config["nav"]))
    pages = sorted(p.name for p in (ROOT / "docs").glob("*.md"))
    assert sorted(listed) == pages, "mkdocs.yml's nav and the pages under docs/ differ"
    assert len(listed) == len(set(listed))


def test_the_readme_stays_a_landing_page():
    """Issue 25: pitch, quick start, worked example, core API, verdict table and links; detail goes to docs/."""
    lines = (ROOT / "README.md").read_text().count("\n")
    assert lines <= 250, f"README.md has {lines} lines (at most 250): move the new detail to a page under docs/"
