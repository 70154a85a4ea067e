"""Every shell command of README.md and docs/*.md runs (docs/experiments.md, a lab record, aside).

The commands are the lines of the fenced ``bash`` blocks (continuations joined, comments
dropped, ``&&`` splitting a line into commands, ``cd DIR`` moving the rest of the line into
DIR). Each must match one rule of :data:`RULES`, which says how it runs here:

- DVC commands run on one tiny study, built and reproduced once for the module from
  ``TINY_STUDY_PARAMS`` as a preset of the project's ``conf/`` (so ``dvc exp run -S ...``
  composes it as it composes ``params.yaml``): ``dvc repro`` as it is at the top (the study
  is then up to date) and with ``--dry`` elsewhere (the toy check takes 10 minutes);
  ``dvc exp run`` with ``--dry``; ``dvc metrics show`` and ``dvc plots show`` as they are;
- ``dvc exp run`` of Inria cities needs the network and the dataset: its overrides are
  composed as DVC composes them and loaded by every stage's config, and the fetch stage's
  ``--help`` runs;
- ``pip install``: the pinned packages and the extras are those of pyproject.toml;
- ``pytest``: the suite is collected; ``python -m cadalign.presets show|list`` runs as it is,
  any other ``python -m cadalign.X``, ``python bench/X.py``, ``bench/X.sh`` and ``mlflow ui``
  run with ``--help``, which must list every option the command uses;
- ``dvc remote add``, ``dvc push``, ``dvc pull``, ``dvc status`` and ``mlflow server`` (docs/team.md)
  run with ``--help`` likewise; tests/test_team.py runs them against servers on 127.0.0.1.

A command no rule matches fails the test: new docs cannot add an untested command.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import tomllib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml
from conftest import TINY_STUDY_PARAMS, make_dvc_project

from cadalign.config import load_cities
from cadalign.presets import compose, load_all

REPO = Path(__file__).resolve().parents[1]
DOCS = [REPO / "README.md", *sorted(p for p in (REPO / "docs").glob("*.md") if p.name != "experiments.md")]

# The tiny study as a preset of conf/: TINY_STUDY_PARAMS on top of the default (so every key a
# `-S` may name exists), one 192 px tile per city (the cities of the gpu preset, so that
# `-S preset=gpu --dry` finds their folders), realignment in few windows and passes.
DOCS_PRESET_EXTRA = """
cities: {synthville: {tiles: [1]}}
synthetic: {size: 192}
draw: {window: [0, 0, 192, 192]}
train: {cascade: false, optim: {lr_drop_step: 2}}
realign: {refine: 0, window: {output_size: 48, symmetries: 1, smooth_px: 0}}  # 1/9 of the windows of 16 px
"""


Study = Callable[[], Path]  # the tiny study's project folder, built on first call


@dataclass(frozen=True)
class Command:
    doc: str
    cwd: str  # relative to the project or repository root ("" for the root)
    argv: tuple[str, ...]

    def __str__(self) -> str:
        where = f"(in {self.cwd}) " if self.cwd else ""
        return f"{self.doc}: {where}{shlex.join(self.argv)}"


def doc_commands(path: Path) -> list[Command]:
    """The commands of the ``bash`` blocks of one markdown file."""
    return commands_of(path.read_text(), path.relative_to(REPO).as_posix())


def commands_of(text: str, doc: str) -> list[Command]:
    """The commands of the ``bash`` blocks of markdown ``text``."""
    blocks = re.findall(r"^```bash\n(.*?)^```", text, flags=re.MULTILINE | re.DOTALL)
    found = []
    for block in blocks:
        for line in block.replace("\\\n", " ").splitlines():
            words = shlex.split(line, comments=True)
            cwd = ""
            while words:
                end = words.index("&&") if "&&" in words else len(words)
                argv, words = words[:end], words[end + 1 :]
                if argv[0] == "cd":
                    cwd = argv[1]
                else:
                    found.append(Command(doc, cwd, tuple(argv)))
    return found


def all_commands() -> list[Command]:
    return [c for doc in DOCS for c in doc_commands(doc)]


def distinct_commands() -> list[Command]:
    """Each command once (the first doc that has it): the same command runs the same way."""
    seen: set[tuple[str, tuple[str, ...]]] = set()
    distinct = []
    for cmd in all_commands():
        if (cmd.cwd, cmd.argv) not in seen:
            seen.add((cmd.cwd, cmd.argv))
            distinct.append(cmd)
    return distinct


# ---- how each command runs ----------------------------------------------------------------


def run(argv: list[str], cwd: Path, env: dict[str, str] | None = None) -> str:
    done = subprocess.run(argv, cwd=cwd, env=env, capture_output=True, text=True, check=False)
    assert done.returncode == 0, f"{shlex.join(argv)} in {cwd}:\n{done.stdout[-3000:]}{done.stderr[-3000:]}"
    return done.stdout + done.stderr


def python(argv: tuple[str, ...]) -> list[str]:
    return [sys.executable, *argv[1:]] if argv[0] in ("python", "python3") else list(argv)


def options(argv: tuple[str, ...]) -> list[str]:
    return [word.split("=")[0] for word in argv if word.startswith("--")]


def check_help(argv: list[str], used: list[str]) -> None:
    """``argv --help`` runs from the repository and lists every option in ``used``."""
    text = run([*argv, "--help"], REPO)
    assert all(opt in text for opt in used), f"{shlex.join(argv)} --help lacks some of {used}:\n{text}"


def check_pip(cmd: Command, study: Study, tmp: Path) -> None:
    spec = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    pins = set(spec["dependencies"])
    args = list(cmd.argv[4:])
    while args:
        word = args.pop(0)
        if word == "-e":
            target = args.pop(0)
            base, _, extras = target.partition("[")
            assert (REPO / base / "pyproject.toml").is_file(), target
            for extra in filter(None, extras.rstrip("]").split(",")):
                assert extra in spec["optional-dependencies"], f"{cmd}: no extra {extra!r} in pyproject.toml"
        else:
            assert word in pins, f"{cmd}: {word} is not pinned in pyproject.toml ({sorted(pins)})"


def check_pytest(cmd: Command, study: Study, tmp: Path) -> None:
    out = run([sys.executable, "-m", "pytest", "--collect-only", *cmd.argv[3:]], REPO)
    assert re.search(r"^\d+ tests collected", out, flags=re.MULTILINE), out[-2000:]


def check_dvc(cmd: Command, study: Study, tmp: Path) -> None:
    root = study()
    argv = list(cmd.argv)
    if argv[1:3] == ["exp", "run"]:
        # --dry runs in a temporary copy of the commit without checking out the cached
        # outputs (DVC 3.67), so the stages would miss their deps: copy those in (-C)
        argv[3:3] = ["--dry", *(w for path in cached_outputs(root) for w in ("-C", path))]
    elif argv[1] == "repro" and cmd.cwd:
        argv.insert(2, "--dry")
    out = run(argv, root / cmd.cwd, dvc_env(root))
    if "--dry" in argv:
        assert "Running stage" in out, out[-2000:]
    elif argv[1] == "repro":
        assert "up to date" in out, out[-2000:]  # the fixture reproduced the study
    elif argv[1] == "plots":
        assert "failed to load" not in out and (root / "dvc_plots" / "index.html").is_file(), out[-2000:]
    else:
        assert "data/metrics/round3.json" in out, out[-2000:]


def cached_outputs(root: Path) -> list[str]:
    """The outputs of dvc.lock that live in the DVC cache (not in git)."""
    tracked = run(["git", "ls-files"], root).split()
    stages = yaml.safe_load((root / "dvc.lock").read_text())["stages"]
    outs = [out["path"] for stage in stages.values() for out in stage.get("outs", [])]
    return [p for p in outs if not any(t == p or t.startswith(p + "/") for t in tracked)]


def check_inria_exp(cmd: Command, study: Study, tmp: Path) -> None:
    overrides = [cmd.argv[i + 1] for i, word in enumerate(cmd.argv) if word == "-S"]
    params = tmp / "params.yaml"
    params.write_text(yaml.safe_dump(compose(REPO / "conf", None, tuple(overrides)), sort_keys=False))
    load_all(params)  # every stage's config loads the composed parameters
    assert any(city.source == "inria" for city in load_cities(params).values()), cmd
    check_help([sys.executable, "-m", "cadalign.stages.fetch"], [])


def check_module(cmd: Command, study: Study, tmp: Path) -> None:
    argv = python(cmd.argv)
    if cmd.argv[2] == "cadalign.presets" and cmd.argv[3] in ("show", "list"):
        assert run(argv, REPO).strip()
    else:
        check_help(argv[:3], options(cmd.argv))


def check_script(cmd: Command, study: Study, tmp: Path) -> None:
    script, argv = _script(cmd), python(cmd.argv)
    assert (REPO / script).is_file(), f"{cmd}: no {script}"
    check_help(argv[: argv.index(script) + 1], options(cmd.argv))


def check_mlflow_ui(cmd: Command, study: Study, tmp: Path) -> None:
    check_help(["mlflow", "ui"], options(cmd.argv))


def check_team(cmd: Command, study: Study, tmp: Path) -> None:
    check_help(list(cmd.argv[: 3 if cmd.argv[1] == "remote" else 2]), options(cmd.argv))


def _is(*prefix: str) -> Callable[[Command], bool]:
    return lambda c: c.argv[: len(prefix)] == prefix


def _script(c: Command) -> str:
    return c.argv[1] if c.argv[0] in ("python", "python3") and len(c.argv) > 1 else c.argv[0]


INRIA_CITY = re.compile(r"source:\s*inria")
DVC_COMMANDS = (["repro"], ["exp", "run"], ["metrics", "show"], ["plots", "show"])
TEAM_COMMANDS = (("dvc", "remote", "add"), ("dvc", "push"), ("dvc", "pull"), ("dvc", "status"), ("mlflow", "server"))
# (name, matches, check), the first that matches runs the command
RULES: list[tuple[str, Callable[[Command], bool], Callable[[Command, Study, Path], None]]] = [
    ("pip install", lambda c: _is("python3", "-m", "pip", "install")(c) or _is("pip", "install")(c),
     check_pip),
    ("pytest", _is("python3", "-m", "pytest"), check_pytest),
    ("dvc exp run of Inria cities",
     lambda c: _is("dvc", "exp", "run")(c) and any(map(INRIA_CITY.search, c.argv)), check_inria_exp),
    ("dvc", lambda c: any(_is("dvc", *w)(c) for w in DVC_COMMANDS), check_dvc),
    ("python -m cadalign.*", lambda c: c.argv[0] in ("python", "python3") and c.argv[1:2] == ("-m",)
     and c.argv[2].startswith("cadalign."), check_module),
    ("bench script", lambda c: re.fullmatch(r"bench/\w+\.(py|sh)", _script(c)) is not None, check_script),
    ("mlflow ui", _is("mlflow", "ui"), check_mlflow_ui),
    ("team: dvc remote, push, pull, status; mlflow server",
     lambda c: any(_is(*w)(c) for w in TEAM_COMMANDS), check_team),
]


def rule_of(cmd: Command) -> tuple[str, Callable[[Command, Study, Path], None]] | None:
    for name, matches, check in RULES:
        if matches(cmd):
            return name, check
    return None


def dvc_env(root: Path) -> dict[str, str]:
    return {
        **os.environ,
        "PYTHONPATH": str(root / "src"),
        "MLFLOW_TRACKING_URI": f"sqlite:///{root / 'mlflow.db'}",
        "CADALIGN_LOG_LEVEL": "WARNING",
        **{f"GIT_{who}_{what}": "t" for who in ("AUTHOR", "COMMITTER") for what in ("NAME", "EMAIL")},
    }


def _merge(base: dict, extra: dict) -> dict:
    for key, value in extra.items():
        nested = isinstance(value, dict) and isinstance(base.get(key), dict)
        base[key] = _merge(base[key], value) if nested else value
    return base


def build_study(root: Path) -> Path:
    """The project (src, dvc.yaml, conf, the toy pipeline) in a git repository with DVC's Hydra on,
    its default preset the tiny study, reproduced once."""
    proj, _ = make_dvc_project(root, "")
    shutil.copytree(REPO / "conf", proj / "conf")
    for name in run(["git", "ls-files", "pipelines/toy"], REPO).split():  # its committed outputs too
        (proj / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(REPO / name, proj / name)
    preset = _merge(yaml.safe_load(TINY_STUDY_PARAMS), yaml.safe_load(DOCS_PRESET_EXTRA))
    text = yaml.safe_dump({"defaults": ["cpu", "_self_"], **preset}, sort_keys=False)
    (proj / "conf" / "preset" / "docs.yaml").write_text("# @package _global_\n" + text)
    (proj / "conf" / "config.yaml").write_text("defaults:\n  - preset: docs\n  - _self_\n")
    (proj / "params.yaml").write_text(yaml.safe_dump(compose(proj / "conf"), sort_keys=False))
    shutil.copy(REPO / ".dvc" / "config", proj / ".dvc" / "config")  # hydra on; no_scm off
    (proj / ".gitignore").write_text("mlflow.db\nmlartifacts/\n")
    env = dvc_env(proj)
    run(["git", "init", "-q"], proj, env)
    run(["git", "add", "-A"], proj, env)
    run(["git", "commit", "-qm", "tiny study"], proj, env)
    run(["dvc", "repro"], proj, env)
    run(["git", "add", "-A"], proj, env)  # dvc.lock: `dvc exp run --dry` works on a copy of the commit
    run(["git", "commit", "-qm", "reproduced"], proj, env)
    return proj


@pytest.fixture(scope="module")
def study(tmp_path_factory: pytest.TempPathFactory) -> Study:
    """The tiny study, built on first use (commands that need none do not wait for it)."""
    built: list[Path] = []

    def get() -> Path:
        if not built:
            built.append(build_study(tmp_path_factory.mktemp("docs")))
        return built[0]

    return get


def test_docs_have_commands_and_each_matches_a_rule() -> None:
    commands = all_commands()
    assert {c.doc for c in commands} >= {"README.md", "docs/gpu.md", "docs/real-data.md", "docs/results.md"}
    unmatched = [str(c) for c in commands if rule_of(c) is None]
    assert unmatched == [], "commands no rule of tests/test_docs.py runs:\n" + "\n".join(unmatched)


def test_the_readme_starts_with_the_two_commands_ci_runs() -> None:
    lines = (REPO / "README.md").read_text().splitlines()
    assert lines[2] == "```bash" and lines[3].startswith("# 1. run the study")
    assert lines[5] == "# 2. run the tests"  # .ci/run runs the line after it
    assert lines[6] == 'python3 -m pip install torch==2.13.0 -e ".[dev]" && python3 -m pytest -q'


def test_command_parsing_and_rules() -> None:
    text = "```bash\ncd pipelines/toy && dvc repro   # comment\n"
    text += "dvc exp run \\\n  -S 'a=[1, 2]'\nrm -rf data\n```\n"
    cmds = [Command("x", cwd, argv) for cwd, argv in [("pipelines/toy", ("dvc", "repro")),
                                                      ("", ("dvc", "exp", "run", "-S", "a=[1, 2]")),
                                                      ("", ("rm", "-rf", "data"))]]
    assert commands_of(text + "```yaml\nnot: run\n```\n", "x") == cmds
    assert [rule_of(c) and rule_of(c)[0] for c in cmds] == ["dvc", "dvc", None]


@pytest.mark.slow
@pytest.mark.parametrize("cmd", distinct_commands(), ids=str)
def test_docs_command_runs(cmd: Command, study: Study, tmp_path: Path) -> None:
    rule = rule_of(cmd)
    assert rule is not None, f"no rule runs {cmd}"
    rule[1](cmd, study, tmp_path)


def test_the_readme_headline_table_is_the_committed_metrics() -> None:
    """Each row of the README's headline table reads what `dvc metrics show` reads, to its printed digits."""
    readme = (REPO / "README.md").read_text()
    rows = re.findall(r"^\| (round\d+)[^|]* \| ([^\n]+) \|$", readme, flags=re.M)
    assert [name for name, _ in rows] == ["round0", "round1", "round2", "round3"]
    for name, cells in rows:
        median, interval, auc, f2, f4, f8, ns = (c.strip() for c in cells.split("|"))
        m = json.loads((REPO / "data" / "metrics" / f"{name}.json").read_text())
        low, high = interval.split("-")
        assert (median, low, high) == (f"{m['median_px']:.2f}", f"{m['ci_low']:.2f}", f"{m['ci_high']:.2f}"), name
        assert (auc, f2, f4, f8) == tuple(f"{m[k]:.3f}" for k in ("auc", "frac_2px", "frac_4px", "frac_8px")), name
        assert ns == ("" if m.get("median_ns") is None else f"{m['median_ns']:.1f}"), name
