"""The README and docs/ stay true to the program: commands, flags, config paths, files and links."""
from __future__ import annotations

import functools
import re
from pathlib import Path

import pytest

from flan_rlhf.cli import COMMANDS
from flan_rlhf.tools.options_reference import known_options, normalise_option, options_reference

ROOT = Path(__file__).resolve().parents[1]
OPTIONS_PAGE = ROOT / "docs" / "options.md"
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
WRITTEN_PAGES = [page for page in PAGES if page != OPTIONS_PAGE]  # options.md is generated and compared whole

#: Flags the docs use as placeholders when they describe the option syntax itself.
PLACEHOLDER_FLAGS = {"--name", "--flag", "--param.option", "--name_with_underscores", "--model.help",
                     "--data.help"}
#: Programs other than flan-rlhf whose own flags appear in the docs (not checked here).
OTHER_PROGRAMS = ("python", ".venv/bin/python", "pip", "torchrun", "hf", "make", "srun", "tensorboard",
                  "bash", "git", "/usr/bin/time", "#SBATCH", "pytest", "wandb", "mlflow")
FLAG = re.compile(r"(?<![\w-])--[a-z][\w.-]*")
COMMAND = re.compile(r"(?:flan-rlhf|flan_rlhf\.cli)\s+([a-z][a-z_-]*)")
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")
CONFIG_PATH = re.compile(r"configs/[\w/.-]*\w\.yaml")
REPO_FILE = re.compile(r"(?<![\w/.])(?:flan_rlhf|tests|benchmarks|docs)/[\w/.-]*\w\.(?:py|md|yaml)(?:::\w+)?")


def fenced_and_prose(text: str) -> tuple[list[str], list[str]]:
    """``(code lines, prose lines)`` of a markdown page; code lines joined across trailing backslashes."""
    code, prose, fenced = [], [], False
    for line in text.splitlines():
        if line.lstrip().startswith("```"):
            fenced = not fenced
            continue
        (code if fenced else prose).append(line)
    joined = "\n".join(code).replace("\\\n", " ")
    return joined.splitlines(), prose


def snippets(text: str) -> list[str]:
    """Every code line and every inline code span of a page: the places a command or flag is quoted."""
    code, prose = fenced_and_prose(text)
    spans = [span for line in prose for span in re.findall(r"``?([^`]+)``?", line)]
    return code + spans


def is_known(flag: str, options: set[str]) -> bool:
    """``flag`` as documented is one of ``options``; ``--model.init_args.generation.*`` stands for a group."""
    option = normalise_option(flag)
    if flag.endswith((".", ".*")):
        return any(known.startswith(option.rstrip("*")) for known in options)
    return option in options


def flag_problems(text: str, known: dict[str, set[str]]) -> list[str]:
    """One line per command or flag quoted in ``text`` that the parsers do not have."""
    every_option = set().union(*known.values())
    problems = []
    for snippet in snippets(text):
        commands = list(COMMAND.finditer(snippet))
        if not commands:
            if snippet.lstrip().split(" ", 1)[0] in OTHER_PROGRAMS:
                continue
            for flag in FLAG.findall(snippet):
                if not is_known(flag, every_option | PLACEHOLDER_FLAGS):
                    problems.append(f"{flag}: no command has this option ({snippet.strip()!r})")
            continue
        for position, match in enumerate(commands):
            name = match.group(1)
            if name not in COMMANDS:
                if snippet.lstrip().startswith(match.group(0)):  # a command line, not prose ("flan-rlhf did not")
                    problems.append(f"flan-rlhf {name}: no such command ({snippet.strip()!r})")
                continue
            end = commands[position + 1].start() if position + 1 < len(commands) else len(snippet)
            for flag in FLAG.findall(snippet[match.end():end]):
                if not is_known(flag, known[name] | {"--help"}):
                    problems.append(f"flan-rlhf {name} {flag}: not an option of {name} ({snippet.strip()!r})")
    return problems


def github_anchor(heading: str) -> str:
    """The fragment GitHub gives a heading: lower case, punctuation dropped, spaces to hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


@functools.lru_cache(maxsize=None)
def anchors(page: Path) -> set[str]:
    _, prose = fenced_and_prose(page.read_text())
    seen: dict[str, int] = {}
    result = set()
    for line in prose:
        if re.match(r"#{1,6} ", line):
            anchor = github_anchor(line.lstrip("#"))
            result.add(anchor if anchor not in seen else f"{anchor}-{seen[anchor]}")
            seen[anchor] = seen.get(anchor, 0) + 1
    return result


def link_problems(page: Path) -> list[str]:
    problems = []
    _, prose = fenced_and_prose(page.read_text())
    for target in LINK.findall("\n".join(prose)):
        if re.match(r"[a-z]+:", target):
            continue  # http(s), mailto: not checked offline
        path_part, _, fragment = target.partition("#")
        linked = (page.parent / path_part).resolve() if path_part else page
        if not linked.exists():
            problems.append(f"{page.name}: link {target} -> {path_part} does not exist")
        elif fragment and linked.suffix == ".md" and fragment not in anchors(linked):
            problems.append(f"{page.name}: link {target} -> no heading #{fragment} in {linked.name}")
    return problems


@pytest.fixture(scope="module")
def known():
    return known_options()


def test_options_page_is_what_the_parsers_print():
    assert OPTIONS_PAGE.read_text() == options_reference(), (
        "docs/options.md is stale: python -m flan_rlhf.tools.options_reference > docs/options.md")


def test_every_documented_command_and_flag_exists(known):
    problems = [f"{page.name}: {problem}" for page in WRITTEN_PAGES
                for problem in flag_problems(page.read_text(), known)]
    assert not problems, "\n".join(problems)


def test_a_removed_flag_is_caught(known):
    """The checker itself: a flag a command lacks, under a command and on its own, and an unknown command."""
    text = ("```bash\nflan-rlhf generate --model m --input p.txt --prompt_columns x\n```\n"
            "Use `--model.init_args.ppo.learnin_rate` or `flan-rlhf trian --config c.yaml`.\n"
            "Fine: `flan-rlhf fit --model.init_args.ppo.learning_rate 1e-4 --trainer.max_steps 3`.")
    problems = flag_problems(text, known)
    assert len(problems) == 3, problems
    assert problems[0].startswith("flan-rlhf generate --prompt_columns: not an option of generate")
    assert problems[1].startswith("--model.init_args.ppo.learnin_rate: no command has this option")
    assert problems[2].startswith("flan-rlhf trian: no such command")
    generate_without = {**known, "generate": known["generate"] - {"--prompt_column"}}
    assert flag_problems("`flan-rlhf generate --prompt_column dialogue`", known) == []
    assert flag_problems("`flan-rlhf generate --prompt_column dialogue`", generate_without)


@pytest.mark.parametrize("page", PAGES, ids=lambda page: page.name)
def test_links_and_anchors_resolve(page):
    assert not link_problems(page)


def test_a_broken_link_or_anchor_is_caught(tmp_path):
    (tmp_path / "a.md").write_text("# Title\n\n## Atomic checkpoints and `--ckpt_path`\n")
    page = tmp_path / "b.md"
    page.write_text("[ok](a.md#atomic-checkpoints-and---ckpt_path) [x](a.md#nope) [y](missing.md) "
                    "[z](#here)\n\n## Here\n```bash\n# not a heading\n```\n")
    assert link_problems(page) == ["b.md: link a.md#nope -> no heading #nope in a.md",
                                   "b.md: link missing.md -> missing.md does not exist"]


def test_every_named_config_and_repository_file_exists():
    missing = []
    for page in PAGES:
        text = page.read_text()
        missing += [f"{page.name}: {path}" for path in CONFIG_PATH.findall(text) if not (ROOT / path).is_file()]
        for reference in REPO_FILE.findall(text):
            path, _, test_name = reference.partition("::")
            if not (ROOT / path).is_file():
                missing.append(f"{page.name}: {path}")
            elif test_name and f"def {test_name}(" not in (ROOT / path).read_text():
                missing.append(f"{page.name}: {reference} (no such test)")
    assert not missing, "\n".join(missing)


def test_every_shipped_config_is_described():
    described = (ROOT / "docs" / "configs.md").read_text()
    shipped = sorted(str(path.relative_to(ROOT)) for path in (ROOT / "configs").rglob("*.yaml"))
    assert [path for path in shipped if f"`{path}`" not in described] == []


def test_every_docs_page_is_linked_from_the_index():
    index = (ROOT / "docs" / "README.md").read_text()
    pages = sorted(page.name for page in PAGES if page.parent.name == "docs" and page.name != "README.md")
    assert [name for name in pages if f"]({name})" not in index] == []


def test_readme_is_a_front_page():
    lines = (ROOT / "README.md").read_text().splitlines()
    assert len(lines) < 250
    head = "\n".join(lines[:40])  # the two commands of a fresh machine come first
    assert "make demo" in head and "make test" in head


def test_the_layout_names_every_module_and_folder():
    layout = (ROOT / "docs" / "development.md").read_text()
    package = ROOT / "flan_rlhf"
    names = [path.name for path in package.glob("*.py") if path.name != "__init__.py"]
    names += [f"{path.name}/" for path in package.iterdir() if path.is_dir() and path.name != "__pycache__"]
    names += [f"{path.name}" for path in (ROOT / "benchmarks").glob("*.py")]
    assert [name for name in sorted(names) if name not in layout] == []


def readme_command_lines() -> list[list[str]]:
    """The ``flan-rlhf ...`` lines of the README's code blocks, as argv lists (comments dropped)."""
    import shlex

    code, _ = fenced_and_prose((ROOT / "README.md").read_text())
    return [shlex.split(line, comments=True)[1:] for line in code if line.startswith("flan-rlhf ")]


def test_the_readme_recipe_parses_as_written(capsys, monkeypatch):
    """Every command of the README's code blocks is accepted by its parser, values included."""
    from flan_rlhf.cli import main

    monkeypatch.chdir(ROOT)  # its config paths are relative to the checkout
    commands = readme_command_lines()
    assert {argv[0] for argv in commands} >= {"fit", "compare", "export"}
    for argv in commands:
        with pytest.raises(SystemExit) as exit_info:
            main([*argv, "--print_config"])
        assert exit_info.value.code == 0, (argv, capsys.readouterr().err)
        capsys.readouterr()


@pytest.mark.parametrize("page", WRITTEN_PAGES, ids=lambda page: page.name)
def test_no_inline_code_span_crosses_a_line(page):
    """The flag check reads inline code line by line, so a span broken across lines would hide its flags."""
    _, prose = fenced_and_prose(page.read_text())
    assert [line for line in prose if line.replace("``", "").count("`") % 2] == []


def cited_tests_missing(text: str, test_sources: str, test_files: set[str]) -> list[str]:
    """The ``test_*`` functions and ``tests/...py`` files ``text`` names that the suite does not hold."""
    cited = re.findall(r"(?:`|::)(test_\w+)", text)  # `test_x` or tests/f.py::test_x (not option names)
    missing = [name for name in sorted(set(cited))
               if f"def {name}(" not in test_sources and f"{name}.py" not in test_files]
    return missing + [path for path in sorted(set(re.findall(r"\btests/[\w/]+\.py\b", text))) if not (ROOT / path).is_file()]


def test_every_cited_test_exists():
    """A guarantee the docs back with a test names one that runs (renamed tests leave no stale names)."""
    files = {path.name for path in (ROOT / "tests").rglob("*.py")}
    sources = "\n".join(path.read_text() for path in (ROOT / "tests").rglob("*.py"))
    problems = {page.name: cited_tests_missing(page.read_text(), sources, files) for page in PAGES}
    assert not {page: names for page, names in problems.items() if names}
    assert cited_tests_missing("`tests/test_nope.py::test_gone`, `test_gone_too` and --data.test_split", sources,
                               files) == ["test_gone", "test_gone_too", "tests/test_nope.py"]
