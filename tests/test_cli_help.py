"""Every setting of every algorithm has a help line in `offbench fit --model.help CLASS`.

jsonargparse takes an argument's help from the `Args:` section of the class's `__init__` docstring
(through docstring_parser); an argument left out there shows only its type and default. The classes
are found by walking the algorithms package, so an algorithm added later is covered without editing
this file.
"""

from __future__ import annotations

import importlib
import inspect
import pkgutil
import re

import docstring_parser
import lightning.pytorch  # noqa: F401 - imported before any test captures the output: its loggers keep the stream
import pytest

import algorithms
from offbench.cli import main
from offbench.module import OfflineRLModule


def algorithm_classes() -> list[type[OfflineRLModule]]:
    """The public OfflineRLModule subclasses defined in the modules of the algorithms package."""
    found = []
    for info in pkgutil.iter_modules(algorithms.__path__):
        if info.name.startswith("_"):
            continue
        module = importlib.import_module(f"algorithms.{info.name}")
        for name, cls in vars(module).items():
            if (inspect.isclass(cls) and issubclass(cls, OfflineRLModule) and cls.__module__ == module.__name__
                    and not name.startswith("_")):
                found.append(cls)
    return sorted(found, key=lambda c: f"{c.__module__}.{c.__qualname__}")


CLASSES = algorithm_classes()


def path_of(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


def arguments(cls: type) -> list[str]:
    return [p for p in inspect.signature(cls.__init__).parameters if p != "self"]


def test_the_walk_finds_the_algorithms():
    names = {path_of(c) for c in CLASSES}
    known = {"algorithms.bc.BC", "algorithms.td3bc.TD3BC", "algorithms.iql.IQL", "algorithms.cql.CQL",
             "algorithms.diffcps.DiffCPS", "algorithms.qgpo.QGPO"}
    assert known <= names, f"not found: {known - names}"


@pytest.mark.parametrize("cls", CLASSES, ids=path_of)
def test_the_args_section_names_exactly_the_arguments(cls):
    doc = docstring_parser.parse(cls.__init__.__doc__ or "")
    described = {p.arg_name: (p.description or "").strip() for p in doc.params}
    args = arguments(cls)
    missing = [a for a in args if not described.get(a)]
    stale = sorted(set(described) - set(args))
    assert not missing, f"{path_of(cls)}.__init__: no `Args:` line for {missing}"
    assert not stale, f"{path_of(cls)}.__init__: `Args:` lines for arguments it does not take: {stale}"


def model_help(cls: type, capsys) -> str:
    with pytest.raises(SystemExit) as done:
        main(["fit", "--model.help", path_of(cls)])
    assert done.value.code == 0
    return capsys.readouterr().out


def help_texts(out: str) -> dict[str, str]:
    """Each `--model.NAME` option of the help output -> its help text, without the type/default note and
    with all whitespace removed (argparse rewraps the text, breaking lines at spaces and hyphens)."""
    texts = {}
    for chunk in re.split(r"\n(?=  --model\.)", out.split("\nHelp for --model.help=", 1)[1])[1:]:
        name, rest = re.match(r"  --model\.(\w+)(?: \S+)?(.*)", chunk, re.S).groups()
        note = max(rest.rfind("(type:"), rest.rfind("(required, type:"))
        texts[name] = "".join(rest[:note].split())
    return texts


@pytest.mark.parametrize("cls", CLASSES, ids=path_of)
def test_model_help_shows_every_arguments_docstring_line(cls, capsys):
    texts = help_texts(model_help(cls, capsys))
    assert sorted(texts) == sorted(arguments(cls))
    described = {p.arg_name: p.description or "" for p in docstring_parser.parse(cls.__init__.__doc__ or "").params}
    empty = [a for a in arguments(cls) if not texts[a]]
    assert not empty, f"offbench fit --model.help {path_of(cls)}: no help text for {empty}"
    for a in arguments(cls):
        assert texts[a] == "".join(described[a].split()), a
