"""Every command in a ```bash block of README.md and docs/*.md is one this project accepts.

``python train.py``, ``torchrun ... train.py`` and ``make train ARGS=...``: the overrides compose with Hydra as
train.py composes them, and ``check_config`` passes (a sweep: each of its values once). ``hydra.*`` overrides
are Hydra's own and left out, but ``hydra/launcher=NAME`` must name a file in configs/hydra/launcher/.
``python scripts/NAME.py``: the script exists and its own parser accepts the arguments, stopped before the
script does any work. Nothing is trained and no file named in a command is read.
"""
import argparse
import ast
import contextlib
import importlib.util
import inspect
import io
import re
import shlex
import sys
import textwrap
from pathlib import Path
from unittest import mock

import pytest
from hydra.core.override_parser.overrides_parser import OverridesParser

from engine.config import check_config
from tests.helpers import CONFIG_DIR, ROOT, compose_config

PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
ENV_ASSIGNMENT = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*=")
SHELL_OPERATORS = {"&", "&&", ";", "|", "||"}
# What a script's main may call before it parses its arguments: building the parser, nothing that works.
PARSER_BUILDING = {"ArgumentParser", "add_argument", "add_subparsers", "add_parser", "add_argument_group",
                   "add_mutually_exclusive_group", "set_defaults", "index", "len", "list", "str", "int", "float",
                   "Path"}


def bash_commands(page: Path) -> list[tuple[int, str]]:
    """(line, command) for each command in the page's ```bash blocks: continued lines joined, blank lines and
    comment lines left out."""
    commands, fence, pending, start = [], None, "", 0
    for number, line in enumerate(page.read_text().splitlines(), 1):
        stripped = line.strip()
        if stripped.startswith("```"):
            assert not pending, f"{page.name}:{start}: a continued line runs into the end of its block"
            fence = (stripped[3:].strip() or "text") if fence is None else None
            continue
        if fence != "bash" or (not pending and (not stripped or stripped.startswith("#"))):
            continue
        if not pending:
            start = number
        if stripped.endswith("\\"):
            pending += stripped[:-1] + " "
            continue
        commands.append((start, pending + stripped))
        pending = ""
    return commands


def words(command: str) -> list[str]:
    """The command's words as the shell splits them, up to a ``# comment`` or a control operator (``&``, ``;``,
    ...) and without leading ``VAR=value``s."""
    lexer = shlex.shlex(command, posix=True)
    lexer.whitespace_split, lexer.commenters = True, ""  # a '#' inside a word is no comment to the shell
    tokens = []
    while (token := lexer.get_token()) is not None and not token.startswith("#"):  # the comment is not lexed
        if token in SHELL_OPERATORS:  # `... &` runs it in the background: the command ends there
            break
        tokens.append(token)
    while tokens and ENV_ASSIGNMENT.match(tokens[0]):
        tokens = tokens[1:]
    return tokens


CASES = [pytest.param(page, line, command, id=f"{page.relative_to(ROOT)}:{line}")
         for page in PAGES for line, command in bash_commands(page)]


def test_the_pages_have_commands():
    """The parser finds the README's commands (a renamed fence or a moved README would silently check nothing)."""
    readme = [c for c in CASES if c.values[0].name == "README.md"]
    assert any("train.py" in c.values[2] for c in readme) and any("scripts/" in c.values[2] for c in readme)


@pytest.mark.parametrize("page, line, command", CASES)
def test_command(page: Path, line: int, command: str):
    """The command names what exists and passes the checks train.py or the script would make first."""
    tokens = words(command)
    if not tokens:
        return
    program, args = Path(tokens[0]).name, tokens[1:]
    if program == "make":
        check_make(args)
    elif program == "torchrun":
        scripts = [i for i, a in enumerate(args) if a.endswith(".py")]
        assert scripts and args[scripts[0]] == "train.py", f"torchrun runs train.py here, not {args}"
        check_train(args[scripts[0] + 1:])
    elif program.startswith("python") and args and not args[0].startswith("-"):
        target = args[0]
        assert (ROOT / target).is_file(), f"{target} does not exist"
        if target == "train.py":
            check_train(args[1:])
        elif target.startswith("scripts/"):
            check_script(target, args[1:])
    # anything else (tensorboard, python -m pytest, pip) is not this project's command line


def check_make(args: list[str]) -> None:
    """``make TARGET [VAR=value ...]``: the target exists; ``make train``'s ARGS compose."""
    targets = set(re.findall(r"^([\w-]+):", (ROOT / "Makefile").read_text(), re.MULTILINE))
    names = [a for a in args if "=" not in a]
    variables = dict(a.split("=", 1) for a in args if "=" in a)
    assert names and set(names) <= targets, f"make {' '.join(names)}: the Makefile has {sorted(targets)}"
    if "train" in names:
        check_train(shlex.split(variables.get("ARGS", "")))


def check_train(argv: list[str]) -> None:
    """train.py's command line: Hydra's ``-m`` and overrides; each sweep value composed once, the others at their
    first value."""
    multirun = any(a in ("-m", "--multirun") for a in argv)
    flags = [a for a in argv if a.startswith("-") and a not in ("-m", "--multirun")]
    assert not flags, f"train.py flags this test does not know: {flags}"
    overrides = OverridesParser.create().parse_overrides([a for a in argv if not a.startswith("-")])
    fixed, sweeps = [], []  # sweeps: (where in fixed, the values after the first)
    for o in overrides:
        key = o.key_or_group
        if key == "hydra/launcher":
            launcher = o.get_value_element_as_str()
            assert (CONFIG_DIR / "hydra" / "launcher" / f"{launcher}.yaml").is_file(), \
                f"hydra/launcher={launcher}: no configs/hydra/launcher/{launcher}.yaml"
        if key == "hydra" or key.startswith(("hydra.", "hydra/")):
            continue  # Hydra's own: run and sweep directories, launcher settings
        if o.is_sweep_override():
            assert multirun, f"{o.input_line} is a sweep: it needs -m"
            values = [f"{o.get_key_element()}={v}" for v in o.sweep_string_iterator()]
            sweeps.append((len(fixed), values[1:]))
            fixed.append(values[0])
        else:
            fixed.append(o.input_line)
    variants = [fixed] + [fixed[:i] + [value] + fixed[i + 1:] for i, values in sweeps for value in values]
    for variant in variants:
        compose_and_check(variant)


def compose_and_check(overrides: list[str]) -> None:
    """The config train.py would run with, through the checks it makes before importing torch."""
    cfg = compose_config(*overrides)
    check_config(cfg)


_modules: dict[str, object] = {}


def load_script(path: str):
    """The script's module, imported once, without running its ``__main__`` block."""
    if path not in _modules:
        if str(ROOT / "scripts") not in sys.path:
            sys.path.insert(0, str(ROOT / "scripts"))  # where the scripts find _config and _inputs
        spec = importlib.util.spec_from_file_location(f"readme_{Path(path).stem}", ROOT / path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        _modules[path] = module
    return _modules[path]


def check_script(path: str, argv: list[str]) -> None:
    """Parse ``argv`` the way the script does, without running it."""
    module = load_script(path)
    source = inspect.getsource(module.main)
    if "split_args(argv, DEFAULTS)" in source:  # key=value arguments of its own, the rest train.py's overrides
        _, overrides = module.split_args(argv, module.DEFAULTS)
        compose_and_check(overrides)
    elif "compose_from_argv(argv)" in source:  # train.py's overrides only
        compose_and_check(argv)
    elif "argparse" in source:
        rest = parse_only(module, argv)
        if rest:  # parse_known_args: the rest go to train.py's composition
            compose_and_check(rest)
    else:
        pytest.fail(f"{path}: this test does not know how its main parses arguments")


class _Parsed(Exception):
    """Raised in place of returning from the script's outermost parse: what was left for train.py's overrides."""

    def __init__(self, rest: list[str]):
        super().__init__()
        self.rest = rest


def parse_only(module, argv: list[str]) -> list[str]:
    """Run the script's ``main`` up to its argparse call, which parses ``argv`` and then stops it; returns the
    arguments a ``parse_known_args`` left over. A refused argument fails with argparse's message."""
    body = ast.parse(textwrap.dedent(inspect.getsource(module.main))).body[0].body
    called = set()
    for statement in body:
        names = {c.func.attr if isinstance(c.func, ast.Attribute) else getattr(c.func, "id", "?")
                 for c in ast.walk(statement) if isinstance(c, ast.Call)}
        if names & {"parse_args", "parse_known_args"}:
            break
        called |= names
    assert called <= PARSER_BUILDING, f"main calls {called - PARSER_BUILDING} before parsing: not run here"
    depth = 0
    originals = {"parse_args": argparse.ArgumentParser.parse_args,
                 "parse_known_args": argparse.ArgumentParser.parse_known_args}

    def stopping(name):
        def parse(parser, args=None, namespace=None):
            nonlocal depth
            depth += 1  # parse_args calls parse_known_args, and so does each sub-command's parser
            try:
                result = originals[name](parser, args, namespace)
            finally:
                depth -= 1
            if depth == 0:
                raise _Parsed(result[1] if name == "parse_known_args" else [])
            return result
        return parse

    err = io.StringIO()
    with mock.patch.object(argparse.ArgumentParser, "parse_args", stopping("parse_args")), \
            mock.patch.object(argparse.ArgumentParser, "parse_known_args", stopping("parse_known_args")), \
            mock.patch.object(sys, "argv", [module.__file__, *argv]), contextlib.redirect_stderr(err):
        try:
            module.main(list(argv)) if inspect.signature(module.main).parameters else module.main()
        except _Parsed as parsed:
            return parsed.rest
        except SystemExit:
            pytest.fail(f"the script refuses its arguments: {err.getvalue().strip()}")
    pytest.fail("main returned without parsing its arguments")
