"""The README and docs/ stay true: every measurement table is what its JSON renders to (scripts/docs.py), and
every relative link, `make` target and variable, `python -m` module, file path, test named in the claims map and
config key (`key=value` overrides) that the pages name exists."""

from __future__ import annotations

import importlib.util
import re
from functools import cache
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig, OmegaConf

REPO = Path(__file__).resolve().parents[1]


def _docs_module():
    spec = importlib.util.spec_from_file_location("psvit_docs", REPO / "scripts" / "docs.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


docs = _docs_module()
PAGES = docs.PAGES


def _page_id(p: Path) -> str:
    return str(p.relative_to(REPO))


# ----------------------------------------------------------------------------- tables


def test_every_table_is_what_its_json_renders_to() -> None:
    assert docs.stale() == [], "run `make docs` (scripts/docs.py render) and commit the pages"


def test_every_table_has_a_place_and_every_place_a_table() -> None:
    placed = {name for p in PAGES for name, _ in docs.blocks(p.read_text())}
    assert placed == set(docs.TABLES)


def test_a_typed_figure_in_a_table_is_caught(tmp_path: Path) -> None:
    """The check itself: a page whose table holds one figure changed is stale, and `render` restores it."""
    page = tmp_path / "page.md"
    good = f"text\n<!-- table:demo -->\n{docs.demo().rstrip()}\n<!-- /table:demo -->\nmore\n"
    figure = re.search(r"\| (0\.\d{4}) \|", good)[1]
    page.write_text(good.replace(f"| {figure} |", f"| {float(figure) + 0.001:.4f} |"))
    assert docs.stale([page]) == [f"{page}: table:demo"]
    docs.render([page])
    assert page.read_text() == good and docs.stale([page]) == []


def test_the_suite_row_says_whether_the_install_was_timed(tmp_path: Path, monkeypatch) -> None:
    """`record suite` keeps pytest's own time and, when given, the whole `make test`'s; the README's row says
    which one it shows."""
    xml = tmp_path / "suite.xml"
    xml.write_text('<testsuites><testsuite tests="3" failures="0" errors="0" skipped="0" time="120.0" '
                   'timestamp="2026-12-07T10:00:00"/></testsuites>')
    with_make, bare = docs.record_suite(xml, make_seconds=300.0), docs.record_suite(xml)
    assert with_make["seconds"] == bare["seconds"] == 120.0 and "make_seconds" not in bare
    demo = docs.load("demo")
    for rec, said in ((with_make, "5.0 min with the install (pytest 2.0 min)"),
                      (bare, "pytest 2.0 min (the install not timed)")):
        monkeypatch.setattr(docs, "load", lambda name, rec=rec: rec if name == "suite" else demo)
        assert said in docs.setup_readme() and "3 passed, 0 failed, 0 skipped" in docs.setup_readme()
    with pytest.raises(SystemExit, match="--make-seconds: only for `record suite`"):
        docs.main(["record", "demo", str(xml), "--make-seconds", "1"])


# ----------------------------------------------------------------------------- what the pages name


def _code(text: str) -> list[str]:
    """The code a page shows: fenced blocks (but program output, ```text) and inline spans, backslash-continued
    lines joined."""
    out = []
    for lang, body in re.findall(r"^```(\w*)\n(.*?)^```", text, re.S | re.M):
        if lang != "text":
            out += body.replace("\\\n", " ").splitlines()
    prose = re.sub(r"^```.*?^```", "", text, flags=re.S | re.M)
    out += re.findall(r"`([^`\n]+)`", prose)
    return out


@cache
def _makefile() -> tuple[set[str], set[str]]:
    text = (REPO / "Makefile").read_text()
    targets = set(re.findall(r"^([a-z][a-z-]*):", text, re.M))
    variables = set(re.findall(r"^([A-Z_]+) *[?:]?=", text, re.M))
    return targets, variables


def test_relative_links_resolve() -> None:
    bad = []
    for page in PAGES:
        for target in re.findall(r"\]\(([^)\s]+)\)", page.read_text()):
            if re.match(r"[a-z]+:", target):
                continue
            path, _, anchor = target.partition("#")
            dest = (page.parent / path).resolve() if path else page
            if not dest.exists():
                bad.append(f"{_page_id(page)}: {target}: no such file")
            elif anchor and dest.suffix == ".md" and anchor not in _anchors(dest):
                bad.append(f"{_page_id(page)}: {target}: no such heading in {dest.name}")
    assert not bad, "\n".join(bad)


def _anchors(page: Path) -> set[str]:
    """GitHub's heading anchors: lower case, punctuation dropped, spaces to hyphens."""
    heads = re.findall(r"^#+ (.+)$", re.sub(r"^```.*?^```", "", page.read_text(), flags=re.S | re.M), re.M)
    return {re.sub(r"[^\w\- ]", "", h.strip().lower()).replace(" ", "-") for h in heads}


def test_named_make_targets_and_variables_exist() -> None:
    targets, variables = _makefile()
    bad = []
    for page in PAGES:
        for line in _code(page.read_text()):
            for args in re.findall(r"(?:^|[\s;(])make((?: +[^\s;|&)]+)*)", line):
                words = args.split()
                if words and not words[0].startswith("-") and "=" not in words[0] and words[0] not in targets:
                    bad.append(f"{_page_id(page)}: `{line}`: no make target {words[0]!r}")
                bad += [f"{_page_id(page)}: `{line}`: no Makefile variable {v!r}"
                        for v in re.findall(r"(?:^| )([A-Z][A-Z0-9_]*)=", args) if v not in variables]
    assert not bad, "\n".join(bad)


def _module_exists(name: str) -> bool:
    parts = name.split(".")
    if parts[0] in ("space", "supernet", "search", "bench", "scripts", "tests"):
        base = REPO.joinpath(*parts)
        return base.with_suffix(".py").is_file() or (base / "__main__.py").is_file()
    return importlib.util.find_spec(name) is not None


def test_named_modules_scripts_and_paths_exist() -> None:
    bad = []
    for page in PAGES:
        for line in _code(page.read_text()):
            for mod in re.findall(r"(?<!pytest )-m +([A-Za-z_][\w.]*)", line):
                if not _module_exists(mod):
                    bad.append(f"{_page_id(page)}: `{line}`: no module {mod}")
            for path in re.findall(r"(?<![\w/.])((?:conf|space|supernet|search|bench|scripts|tests|docs)/[\w./*-]*)",
                                   line):
                path = path.rstrip(".")
                if not (any(REPO.glob(path)) if "*" in path else (REPO / path).exists()):
                    bad.append(f"{_page_id(page)}: `{line}`: no file {path}")
    assert not bad, "\n".join(bad)


def test_tests_named_in_the_claims_map_exist() -> None:
    bad = []
    for page in PAGES:
        for file, name, star in set(re.findall(r"(test_\w+\.py)::(test_\w+)(\*?)", page.read_text())):
            src = REPO / "tests" / file  # test_x.py::test_prefix_* names every test of that prefix
            pattern = rf"^def {name}" + ("" if star else r"\(")
            if not src.is_file() or not re.search(pattern, src.read_text(), re.M):
                bad.append(f"{_page_id(page)}: {file}::{name}{star}")
    assert not bad, "\n".join(bad)


# ----------------------------------------------------------------------------- config keys

APPS = {"supernet.train": "supernet", "search.evolve": "evolve", "supernet.retrain": "retrain",
        "search.fidelity": "fidelity", "space.info": "info", "supernet.latency": "latency",
        "supernet.export": "export", "supernet.convert": "convert", "supernet.prepare": "prepare"}
MAKE_APPS = {"supernet": "supernet", "search": "evolve", "fidelity": "fidelity", "retrain": "retrain",
             "info": "info", "latency": "latency", "export": "export"}
DEMO_STAGES = {"supernet": "supernet", "search": "evolve", "retrain": "retrain"}
NOT_HYDRA = ("space.baselines", "bench", "torch.distributed.run")  # argparse and the like: no key=value


def _keys(cfg: DictConfig) -> set[str]:
    out = set()

    def walk(node: object, prefix: str) -> None:
        if isinstance(node, dict):
            for k, v in node.items():
                out.add(prefix + str(k))
                walk(v, f"{prefix}{k}.")
    walk(OmegaConf.to_container(cfg, resolve=False), "")
    return out


@cache
def _groups() -> dict[str, set[str]]:
    return {d.name: {f.stem for f in d.glob("*.yaml")} for d in (REPO / "conf").iterdir() if d.is_dir()
            and any(d.glob("*.yaml"))}


@cache
def _app_keys(app: str) -> frozenset[str]:
    """Every key the app's config has with its default groups or with any one other option of a group."""
    keys: set[str] = set()
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        base = compose(app)
        keys |= _keys(base)
        for group, options in _groups().items():
            if group in base:
                for opt in options:
                    keys |= _keys(compose(app, overrides=[f"{group}={opt}"]))
    return frozenset(keys)


def _overrides(line: str) -> list[tuple[str, str, str]]:
    """(app or '', key, value) of each lower-case `key=value` in a line of code."""
    mod = re.search(r"-m +([\w.]+)", line)
    mk = re.search(r"(?:^|\s)make +([a-z-]+)", line)
    if mod and mod[1] in NOT_HYDRA or mk and mk[1] in ("bench", "gpu-check", "test"):
        return []
    app = APPS.get(mod[1], "") if mod else MAKE_APPS.get(mk[1], "demo" if mk[1] == "demo" else "") if mk else ""
    out = []
    for group, value in re.findall(r"(?<![\w./(,-])([a-z_]+)@[a-z0-9_.]+=([a-z0-9_]+)", line):
        out.append((app, group, value))  # a group placed at another package: its option file must exist
    for key, value in re.findall(r"(?<![\w./(,@-])([a-z_][a-z0-9_]*(?:\.[a-z0-9_]+)*)=(?!=)([^\s\"']*)", line):
        if (key, value) == ("key", "value"):  # the docs' name for any override
            continue
        if app == "demo":
            stage, _, rest = key.partition(".")
            out.append((DEMO_STAGES.get(stage, "?"), rest, value))
        else:
            out.append((app, key, value))
    return out


def test_config_keys_named_in_the_docs_exist() -> None:
    every = frozenset().union(*(_app_keys(a) for a in APPS.values()))
    groups = _groups()
    bad = []
    for page in PAGES:
        for line in _code(page.read_text()):
            for app, key, value in _overrides(line):
                known = every if not app else _app_keys(app) if app != "?" else frozenset()
                if key not in known:
                    bad.append(f"{_page_id(page)}: `{line}`: no key {key!r} in "
                               f"{'conf/' + app + '.yaml' if app else 'any app config'}")
                elif key in groups and re.fullmatch(r"[a-z0-9_]+", value) and value not in groups[key]:
                    bad.append(f"{_page_id(page)}: `{line}`: no conf/{key}/{value}.yaml")
    assert not bad, "\n".join(bad)


@pytest.mark.parametrize("line, wrong", [
    ("make supernet ARGS=\"space=fmnist_2d train.epochs=2\"", "train.epochs"),
    ("python -m search.evolve checkpoint=x flops_maxx=4e6", "flops_maxx"),
    ("make demo ARGS=\"supernet.optim.epoch=1\"", "optim.epoch"),
])
def test_the_key_check_catches_a_wrong_key(line: str, wrong: str) -> None:
    found = [(app, key) for app, key, _ in _overrides(line)
             if key not in (_app_keys(app) if app else frozenset().union(*map(_app_keys, APPS.values())))]
    assert [k for _, k in found] == [wrong]

