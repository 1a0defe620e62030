"""mkdocs hooks: the front page comes from README.md, and links out of docs/ are checked.

- `docs/index.md` holding only `<!-- include: README.md -->` becomes README.md, its links rewritten
  from the repository root to docs/.
- A relative link that leaves docs/ (to `benchmarks/results/...`, `examples/...`) must name an
  existing file or folder of the repository, else a warning fails `mkdocs build --strict`. Files
  that are not Markdown (plots, JSON) are copied into the site under `_repo/` and the link follows
  them; a link to a Markdown file or a folder keeps its text (it works on the repository's own
  pages, where the docs are read as Markdown).
"""

from __future__ import annotations

import logging
import os
import posixpath
import re
import shutil
from pathlib import Path

from mkdocs.plugins import event_priority
from mkdocs.structure.files import File

log = logging.getLogger("mkdocs.hooks.repo_links")
INCLUDE = "<!-- include: README.md -->"
LINK = re.compile(r"(!?)\[([^\]]*)\]\(([^)\s]+)\)")
FENCE = re.compile(r"^(```|~~~)")


def _repo(config) -> Path:
    return Path(config["docs_dir"]).resolve().parent


def _readme_as_index(repo: Path) -> str:
    text = (repo / "README.md").read_text(encoding="utf-8")

    def sub(m: re.Match) -> str:
        bang, label, target = m.groups()
        if re.match(r"^[a-z]+:|^#|^/", target):
            return m.group(0)
        target = target[len("docs/") :] if target.startswith("docs/") else "../" + target
        return f"{bang}[{label}]({target})"

    return _outside_code(text, sub)


def _outside_code(text: str, sub) -> str:
    out, in_fence = [], False
    for line in text.split("\n"):
        if FENCE.match(line.strip()):
            in_fence = not in_fence
        out.append(line if in_fence else LINK.sub(sub, line))
    return "\n".join(out)


def _markdown(path: Path, repo: Path) -> str:
    text = path.read_text(encoding="utf-8")
    return _readme_as_index(repo) if text.strip() == INCLUDE else text


def _outside_targets(markdown: str, src_uri: str, docs: Path, repo: Path):
    """(match, repo-relative target or None when missing) for each link that leaves docs/."""
    found = []

    def sub(m: re.Match) -> str:
        target = m.group(3)
        if re.match(r"^[a-z]+:|^#|^/", target):
            return m.group(0)
        path = target.split("#", 1)[0]
        resolved = Path(os.path.normpath(docs / posixpath.dirname(src_uri) / path))
        if resolved == docs or docs in resolved.parents:
            return m.group(0)
        rel = resolved.relative_to(repo).as_posix() if repo in resolved.parents else None
        found.append((m.group(0), rel if rel and resolved.exists() else None, target))
        return m.group(0)

    _outside_code(markdown, sub)
    return found


@event_priority(100)  # before mkdocstrings reads its paths
def on_config(config):
    """The installed layout for the API reference: `radixkv.integrations` lives in its own folder
    (pyproject's package-dir), so griffe reads a copy of the sources, `build/api-src/radixkv/`,
    that puts it where the import system does."""
    repo = _repo(config)
    tree = repo / "build" / "api-src" / "radixkv"
    shutil.rmtree(tree, ignore_errors=True)
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    shutil.copytree(repo / "radixkv", tree, ignore=ignore)
    shutil.copytree(repo / "integrations", tree / "integrations", ignore=ignore)
    return config


def on_files(files, config):
    docs, repo = Path(config["docs_dir"]).resolve(), _repo(config)
    copied = set()
    for f in list(files.documentation_pages()):
        text = _markdown(Path(f.abs_src_path), repo)
        for _, rel, _ in _outside_targets(text, f.src_uri, docs, repo):
            if rel and (repo / rel).is_file() and not rel.endswith(".md") and rel not in copied:
                copied.add(rel)
                files.append(
                    File(rel, str(repo), config["site_dir"], config["use_directory_urls"], dest_uri=f"_repo/{rel}")
                )
    return files


def on_page_markdown(markdown, page, config, files):
    docs, repo = Path(config["docs_dir"]).resolve(), _repo(config)
    if markdown.strip() == INCLUDE:
        markdown = _readme_as_index(repo)
    targets = {}
    for whole, rel, target in _outside_targets(markdown, page.file.src_uri, docs, repo):
        if rel is None:
            log.warning("%s: the link %r names no file or folder of the repository", page.file.src_uri, target)
        targets[whole] = rel

    def sub(m: re.Match) -> str:
        if m.group(0) not in targets or targets[m.group(0)] is None:
            return m.group(0)
        bang, label, rel = m.group(1), m.group(2), targets[m.group(0)]
        if (repo / rel).is_file() and not rel.endswith(".md"):
            up = "../" * page.file.src_uri.count("/")
            return f"{bang}[{label}]({up}{rel})"
        return label if label.startswith("`") else f"{label} (`{rel}`)"

    return _outside_code(markdown, sub)
