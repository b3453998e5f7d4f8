"""The guides in docs/ keep up with the code.

- every key of the default configuration (as the server loads it) is in docs/reference.md;
- every command of the `funnel` CLI has a section there naming each of its options and
  arguments;
- every route of the Flask app is in docs/reference.md;
- every relative link in docs/*.md and README.md points at a file that exists, and an
  anchor in a link to a Markdown file (or within one) at one of its headings;
- every `funnel_hpc.<package>.<module>` named in docs/*.md exists;
- the README stays a front door (a screen or two, its two set-up commands, links to the
  API's rules and the sandbox section) and docs/benchmarks.md keeps the markers that
  `benchmarks/run --update-docs` rewrites between.
"""

from __future__ import annotations

import configparser
import importlib
import re
from pathlib import Path

import click
import pytest

from funnel_hpc.core import config as config_mod

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
REFERENCE = DOCS / "reference.md"
GUIDES = sorted(DOCS.glob("*.md"))
LINKED_FILES = [*GUIDES, ROOT / "README.md"]
# the wheel maps each top-level folder to funnel_hpc.<folder> (setup.cfg, package_dir)
PACKAGES = {"core", "gateway", "backends", "worker", "proto", "templates", "conf"}
README = ROOT / "README.md"
README_MAX_LINES = 250

LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")
FENCE = re.compile(r"^(```|~~~).*?^\1", re.MULTILINE | re.DOTALL)
HEADING = re.compile(r"^(#+)\s+(.*)$", re.MULTILINE)
LINK_ANCHORS = re.compile(r"\[[^\]]*\]\(#([^)\s]+)\)")  # [text](#heading) in the same file
MODULE = re.compile(r"\bfunnel_hpc((?:\.[A-Za-z_][A-Za-z0-9_]*)+)")


def reference_text() -> str:
    return REFERENCE.read_text()


# ---- configuration ----

def config_keys(node: dict, prefix: str = "") -> list[str]:
    keys = []
    for key, value in node.items():
        dotted = f"{prefix}.{key}" if prefix else str(key)
        keys.append(dotted)
        if isinstance(value, dict):
            keys += config_keys(value, dotted)
    return keys


def test_every_config_key_is_in_the_reference(tmp_path):
    # as `funnel server run` loads it (cli_common.load_config -> config.load), without
    # this machine's FUNNEL_ variables
    defaults = config_mod.load(environ={}, overrides={"work_dir": str(tmp_path)})
    text = reference_text()
    effective = config_mod.plain(defaults)
    assert isinstance(effective, dict)
    # backends.<name> is derived at load (no `backends:`: one instance named after
    # backend.name, its options backend.<kind>'s): only `backends` itself is a key
    effective["backends"] = {}
    missing = [key for key in config_keys(effective) if f"`{key}`" not in text]
    assert not missing, f"configuration keys not in docs/reference.md: {missing}"


# ---- command line ----

def cli_commands() -> list[tuple[str, click.Command]]:
    from funnel_hpc.gateway.cli.main import main

    found: list[tuple[str, click.Command]] = []

    def walk(command: click.Command, path: str) -> None:
        found.append((path, command))
        if isinstance(command, click.Group):
            for name, sub in sorted(command.commands.items()):
                walk(sub, f"{path} {name}")

    walk(main, "funnel")
    return found[1:]  # `funnel` itself has no options of its own


def section(text: str, title: str) -> str | None:
    """The text under the heading whose title is exactly `title` (in backticks), up to
    the next heading of the same or a higher level."""
    headings = list(HEADING.finditer(text))
    for index, match in enumerate(headings):
        if match.group(2).strip() != f"`{title}`":
            continue
        level = len(match.group(1))
        end = len(text)
        for later in headings[index + 1:]:
            if len(later.group(1)) <= level:
                end = later.start()
                break
        return text[match.end():end]
    return None


COMMANDS = cli_commands()


@pytest.mark.parametrize("path,command", COMMANDS, ids=[path for path, _ in COMMANDS])
def test_every_cli_command_and_option_is_in_the_reference(path, command):
    body = section(FENCE.sub("", reference_text()), path)
    assert body is not None, f"docs/reference.md has no heading `{path}`"
    if isinstance(command, click.Group):
        return
    missing = []
    for param in command.params:
        if isinstance(param, click.Option):
            names = [*param.opts, *param.secondary_opts]
            missing += [name for name in names if f"`{name}`" not in body]
        elif param.human_readable_name not in body:
            missing.append(param.human_readable_name)
    assert not missing, f"{path}: not in its section of docs/reference.md: {missing}"


# ---- HTTP routes ----

def test_every_route_is_in_the_reference(tmp_path):
    from funnel_hpc.gateway.web.app import create_app

    config = config_mod.load(environ={}, overrides={"work_dir": str(tmp_path)})
    app = create_app(config)
    text = reference_text()
    missing = []
    for rule in app.url_map.iter_rules():
        pattern = re.escape(re.sub(r"<[^>]+>", "\0", rule.rule)).replace("\0", r"\{\w+\}")
        if not re.search(rf"`(GET|POST)[^`]*? {pattern}`", text):
            missing.append(rule.rule)
    assert not missing, f"routes not in docs/reference.md: {missing}"


# ---- links and module paths ----

def relative_links(path: Path) -> list[str]:
    text = FENCE.sub("", path.read_text())
    links = []
    for target in LINK.findall(text):
        if re.match(r"[A-Za-z][A-Za-z0-9+.-]*:", target) or target.startswith("#"):
            continue  # a URL (https:, mailto:) or an anchor in the same file
        links.append(target)
    return links


def test_docs_exist():
    assert {p.name for p in GUIDES} >= {"admin.md", "user.md", "reference.md"}


def anchors(path: Path) -> set[str]:
    """GitHub's ids of a Markdown file's headings: lower case, punctuation but - and _
    dropped, spaces as -, a repeated id suffixed -1, -2..."""
    seen: dict[str, int] = {}
    ids = set()
    for match in HEADING.finditer(FENCE.sub("", path.read_text())):
        slug = re.sub(r"[^\w\- ]", "", match.group(2).strip().lower()).replace(" ", "-")
        count = seen.get(slug, 0)
        seen[slug] = count + 1
        ids.add(f"{slug}-{count}" if count else slug)
    return ids


@pytest.mark.parametrize("path", LINKED_FILES, ids=lambda p: p.relative_to(ROOT).as_posix())
def test_relative_links_point_at_files(path):
    broken = []
    for target in relative_links(path) + [f"#{a}" for a in LINK_ANCHORS.findall(
            FENCE.sub("", path.read_text()))]:
        file_part, _, anchor = target.partition("#")
        linked = (path.parent / file_part) if file_part else path
        if not linked.exists():
            broken.append(target)
        elif anchor and linked.suffix == ".md" and anchor not in anchors(linked):
            broken.append(target)
    assert not broken, f"{path.name}: links to missing files or headings: {broken}"


def module_exists(dotted: str) -> bool:
    """funnel_hpc.<package>[.<module or sub-package>...][.<attribute>...]: the package
    and every name up to the first module exist (a name of a package's __init__.py
    counts as an attribute)."""
    parts = dotted.strip(".").split(".")
    if parts[0] not in PACKAGES:
        return False
    here = ROOT / parts[0]
    for part in parts[1:]:
        if (here / part).is_dir():
            here = here / part
        elif (here / f"{part}.py").is_file():
            return True
        else:
            init = here / "__init__.py"
            return init.is_file() and bool(re.search(rf"\b{re.escape(part)}\b", init.read_text()))
    return True


@pytest.mark.parametrize("path", GUIDES, ids=lambda p: p.name)
def test_module_paths_exist(path):
    named = set(MODULE.findall(path.read_text()))
    missing = [f"funnel_hpc{dotted}" for dotted in sorted(named) if not module_exists(dotted)]
    assert not missing, f"{path.name} names modules that do not exist: {missing}"


def test_packages_are_the_folders_setup_cfg_maps():
    setup = configparser.ConfigParser()
    setup.read(ROOT / "setup.cfg")
    mapped = dict(line.split("=") for line in
                  setup["options"]["package_dir"].strip().splitlines())
    assert {name.strip(): folder.strip() for name, folder in mapped.items()} == \
        {f"funnel_hpc.{folder}": folder for folder in PACKAGES}


# ---- the README and the benchmarks page ----

def test_readme_is_a_front_door():
    text = README.read_text()
    lines = text.splitlines()
    assert len(lines) <= README_MAX_LINES, f"README.md has {len(lines)} lines"
    commands = [line.strip() for line in lines if line.startswith("    ./scripts/")]
    assert commands == ["./scripts/quickstart.sh", "./scripts/test.sh"], commands
    for link in ("docs/reference.md#api-rules", "docs/admin.md#the-sandbox-and-images",
                 "docs/user.md", "docs/benchmarks.md"):
        assert f"]({link})" in text, f"README.md does not link {link}"


def test_benchmarks_page_has_the_table_markers():
    # by name: a static import would make mypy check the benchmark scripts as tests
    suite = importlib.import_module("benchmarks.suite")
    text = suite.BENCH_PAGE.read_text()
    assert text.count(suite.BENCH_START) == 1 and text.count(suite.BENCH_END) == 1
    assert text.index(suite.BENCH_START) < text.index(suite.BENCH_END)
