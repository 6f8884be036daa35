"""The README and docs/ stay true to the repository: the README is a front door (at most 12 KB), every
relative link and anchor resolves, every file, test and config key a page names exists, every `fastcifar`
command a page shows uses real sub-commands and flags, and no docstring or comment cites a `*.md` file that
is not in the repository (docs/design.md, "Documentation")."""
from __future__ import annotations

import ast
import io
import os
import re
import shlex
import tokenize
from pathlib import Path


ROOT = Path(__file__).resolve().parents[1]
README_LIMIT = 12 * 1024
# The seeds' record lives beside the repository; configs named after a seed cite it by convention
# (docs/design.md, "Conventions"), and so do the tests that check those configs against it.
SEEDS_RECORD = "../shared/seeds.md"
SKIP_DIRS = {".venv", ".git", "data", "runs", "build", "dist", "__pycache__"}
MD_PATH = re.compile(r"(?<![\w./-])((?:\.\.?/)*[\w-][\w./-]*\.md)\b")
REPO_PATH = re.compile(r"^(?:beton|fastloader|train|analysis|tests|configs|scripts|docs)/[\w./-]*$")


def pages() -> list[Path]:
    return [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def repo_files(suffix: str) -> list[Path]:
    found = []
    for folder, dirs, files in os.walk(ROOT):
        dirs[:] = sorted(d for d in dirs
                         if d not in SKIP_DIRS and not d.startswith(".") and not d.endswith(".egg-info"))
        found += [Path(folder) / f for f in sorted(files) if f.endswith(suffix)]
    return found


def prose(text: str) -> str:
    """The text outside fenced code blocks."""
    return re.sub(r"^```.*?^```", "", text, flags=re.S | re.M)


def code_blocks(text: str) -> list[str]:
    return re.findall(r"^```[^\n]*\n(.*?)^```", text, flags=re.S | re.M)


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return text.replace(" ", "-")


def anchors(page: Path) -> set[str]:
    seen: dict[str, int] = {}
    out = set()
    for heading in re.findall(r"^#{1,6} (.+)$", prose(page.read_text()), flags=re.M):
        base = slug(heading)
        n = seen.get(base, 0)
        seen[base] = n + 1
        out.add(base if n == 0 else f"{base}-{n}")
    return out


def test_the_readme_is_a_front_door_of_at_most_12_kb():
    size = (ROOT / "README.md").stat().st_size
    assert size <= README_LIMIT, f"README.md is {size:,} bytes; move detail into docs/ (limit {README_LIMIT:,})"


def test_the_readme_opens_with_the_two_commands_and_links_every_docs_page():
    text = (ROOT / "README.md").read_text()
    first_block = code_blocks(text)[0]
    assert first_block.startswith("make run") and "\nmake test" in first_block
    linked = {Path(target).name for target in re.findall(r"\]\(docs/([^)#\s]+)", text)}
    missing = sorted(p.name for p in (ROOT / "docs").glob("*.md") if p.name not in linked)
    assert not missing, f"docs pages the README does not link: {missing}"


def test_every_relative_link_and_anchor_in_the_readme_and_docs_resolves():
    broken = []
    for page in pages():
        for target in re.findall(r"\]\(([^)\s]+)\)", prose(page.read_text())):
            if re.match(r"[a-z]+:", target):
                continue  # http(s), mailto
            path, _, anchor = target.partition("#")
            dest = (page.parent / path).resolve() if path else page
            if not dest.exists() or ROOT not in (dest, *dest.parents):
                broken.append(f"{page.relative_to(ROOT)}: {target} (no such file in the repository)")
            elif anchor and dest.suffix == ".md" and anchor not in anchors(dest):
                broken.append(f"{page.relative_to(ROOT)}: {target} (no such heading)")
    assert not broken, "\n".join(broken)


def test_every_file_and_test_the_pages_name_exists():
    tests_text = "\n".join(p.read_text() for p in (ROOT / "tests").glob("*.py"))
    # `test_...` names a test unless the package code uses the name itself (test_loss, data.test_subset)
    package_names = set(re.findall(r"\btest_\w+", "\n".join(
        p.read_text() for d in ("beton", "fastloader", "train", "analysis") for p in (ROOT / d).rglob("*.py"))))
    missing = []
    for page in pages():
        text = page.read_text()
        spans = re.findall(r"`([^`\n]+)`", prose(text)) + [t for b in code_blocks(text) for t in b.split()]
        for span in spans:
            span = span.strip().rstrip(",;:)")
            if (REPO_PATH.match(span) and not any(c in span for c in "*<{") and "__pycache__" not in span
                    and not (ROOT / span).exists()):
                missing.append(f"{page.relative_to(ROOT)}: {span}")
            if (re.fullmatch(r"test_\w+", span) and span not in package_names
                    and not re.search(rf"def {span}\(", tests_text)):
                missing.append(f"{page.relative_to(ROOT)}: {span} (no such test)")
    assert not missing, "\n".join(missing)


def _cited_md(path: Path) -> tuple[list[tuple[int, str]], set[str]]:
    """(line, *.md path) cited in docstrings and comments; and the *.md names the code itself uses as strings
    (files it writes, like report.md), which a docstring may name without their being in the repository."""
    source = path.read_text()
    if ".md" not in source:
        return [], set()
    tree = ast.parse(source)
    docstrings = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) and node.body:
            first = node.body[0]
            if (isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant)
                    and isinstance(first.value.value, str)):
                docstrings.add(id(first.value))
    cited, used = [], set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Constant) and isinstance(node.value, str):
            names = MD_PATH.findall(node.value)
            if id(node) in docstrings:
                cited += [(node.lineno, n) for n in names]
            else:
                used.update(names)
    for tok in tokenize.generate_tokens(io.StringIO(source).readline):
        if tok.type == tokenize.COMMENT:
            cited += [(tok.start[0], n) for n in MD_PATH.findall(tok.string)]
    return cited, used


def _in_repo(citation: str, where: Path) -> bool:
    for base in (ROOT, where.parent):
        target = (base / citation).resolve()
        if target.is_file() and ROOT in target.parents:
            return True
    return False


def test_no_docstring_or_comment_cites_a_markdown_file_outside_the_repository():
    scanned = {path: _cited_md(path) for path in repo_files(".py")}
    # names the package code uses as strings: files it writes (report.md, results.md), which its docstrings name
    written = set().union(*(used for path, (_, used) in scanned.items()
                            if path.relative_to(ROOT).parts[0] in ("beton", "fastloader", "train", "analysis")))
    bad = []
    for path, (cited, _) in scanned.items():
        for line, citation in cited:
            if _in_repo(citation, path) or citation == SEEDS_RECORD or Path(citation).name in written:
                continue
            if citation == Path(SEEDS_RECORD).name:
                continue  # the seeds' record by its name
            bad.append(f"{path.relative_to(ROOT)}:{line}: {citation}")
    for path in repo_files(".yaml"):
        for line, text in enumerate(path.read_text().splitlines(), 1):
            comment = text.partition("#")[2]
            for citation in MD_PATH.findall(comment):
                if not (_in_repo(citation, path) or citation == SEEDS_RECORD):
                    bad.append(f"{path.relative_to(ROOT)}:{line}: {citation}")
    assert not bad, "cited but not in the repository (point at a docs/ page):\n" + "\n".join(bad)


def _config_fields() -> dict[str, set[str]]:
    """Section -> keys, read from the config dataclasses' source (no import: torch stays out of this test)."""
    sections = {"ModelConfig": "model", "DataConfig": "data", "OptimizerConfig": "optimizer",
                "SchedulerConfig": "scheduler", "TrainConfig": "train", "EvalConfig": "eval",
                "ExperimentConfig": "top level"}
    fields: dict[str, set[str]] = {}
    for source in ("train/config.py", "fastloader/config.py"):
        for node in ast.parse((ROOT / source).read_text()).body:
            if isinstance(node, ast.ClassDef) and node.name in sections:
                fields[sections[node.name]] = {s.target.id for s in node.body if isinstance(s, ast.AnnAssign)}
    fields["top level"] -= set(sections.values())
    return fields


def _documented_keys() -> dict[str, set[str]]:
    """Section -> keys in the first column of the configuration page's tables, per `## ` section."""
    documented: dict[str, set[str]] = {}
    section = None
    for line in prose((ROOT / "docs" / "configuration.md").read_text()).splitlines():
        heading = re.match(r"^## `?([\w ]+?):?`?$", line)
        if heading:
            section = heading.group(1).lower()
            documented.setdefault(section, set())
        elif section and line.startswith("| `"):
            documented[section].update(re.findall(r"`(\w+)`", line.split("|")[1]))
    return documented


def test_the_configuration_page_documents_every_config_key_and_no_other():
    fields, documented = _config_fields(), _documented_keys()
    assert set(fields) == set(documented), f"sections: code {sorted(fields)}, page {sorted(documented)}"
    problems = [f"{section}: undocumented {sorted(keys - documented[section])}, "
                f"stale {sorted(documented[section] - keys)}"
                for section, keys in fields.items() if keys != documented[section]]
    assert not problems, "\n".join(problems)


def _commands(text: str) -> list[list[str]]:
    """Each `fastcifar ...` invocation in the code blocks and inline code of a page, as its argument list."""
    lines = []
    for block in code_blocks(text):
        lines += block.replace("\\\n", " ").splitlines()
    lines += re.findall(r"`([^`\n]*fastcifar[^`\n]*)`", prose(text))
    out = []
    for line in lines:
        try:
            words = shlex.split(line, comments=True)
        except ValueError:
            continue
        for i, word in enumerate(words):
            if word in ("fastcifar", "fastcifar)", "fastcifar_cli") or word.endswith("/fastcifar"):
                out.append(words[i + 1:])
                break
    return out


def _is_group(command) -> bool:
    return hasattr(command, "commands")  # typer may vendor its own click: no isinstance on click's classes


def test_every_fastcifar_command_in_the_pages_uses_real_subcommands_and_flags():
    import typer

    from fastcifar_cli import app

    root = typer.main.get_command(app)
    bad = []
    for page in pages():
        for words in _commands(page.read_text()):
            command, path = root, []
            for word in words:
                if not _is_group(command) or word.startswith("-"):
                    break
                if word not in command.commands:
                    bad.append(f"{page.relative_to(ROOT)}: fastcifar {' '.join(words)} (no command {word!r})")
                    command = None
                    break
                command = command.commands[word]
                path.append(word)
            if command is None or _is_group(command):
                continue
            known = {opt for p in command.params for opt in (*p.opts, *p.secondary_opts)} | {"--help", "--debug"}
            for word in words:
                flag = word.split("=", 1)[0]
                if flag.startswith("--") and flag not in known and flag != "--":
                    bad.append(f"{page.relative_to(ROOT)}: fastcifar {' '.join(path)} has no {flag}")
    assert not bad, "\n".join(bad)


def test_every_yaml_block_in_the_pages_is_a_valid_config():
    """A config a page shows (the reference's, the speed recipe's options, a recipe to paste) validates as one:
    a renamed or removed key, or a wrong type, fails here before it fails a reader."""
    import yaml

    from train.config import build_config
    from train.models import create_model

    blocks = [(page.name, block) for page in pages()
              for block in re.findall(r"^```yaml\n(.*?)^```", page.read_text(), flags=re.S | re.M)]
    assert len(blocks) >= 3
    for name, block in blocks:
        cfg = build_config(yaml.safe_load(block))  # raises UserError naming the key
        create_model(cfg.model, num_classes=10)  # the model's own options (airnet's activation, ...) are its to check
