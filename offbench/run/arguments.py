"""`offbench fit`'s command line before LightningCLI parses it (docs/cli.md).

- The grammar's common flags: `--dataset`, `--env`, `--seed`, `--device`, `--out` stand for
  `--data.dataset`, `--data.env_id`, `--seed_everything`, `--trainer.accelerator`,
  `--trainer.default_root_dir`; the plain commands' hyphen spelling is accepted (`--ckpt-path`,
  `--data.block-size`); `--compile` and `--accept_changes` alone mean `true`.
- Every setting given (on the command line or in a --config file) is checked against what the classes
  take: a mistyped one is one line with the closest names and where it was given (the file and line),
  a renamed one names its new name, `--optimizer`/`--lr_scheduler` are refused (the algorithms own
  their optimisers: offbench/module.py).
- Class paths are checked to name a class, without importing its module (`class_path_problem`, also
  used by the grid checks before any cell starts).

Kept free of heavy imports at module level: the grid checks import it.
"""

from __future__ import annotations

import ast
import difflib
import importlib
import importlib.util
import inspect
import textwrap
from pathlib import Path
from typing import Any

import yaml

from offbench.errors import UserError
from offbench.settings import RENAMED as RENAMED_HPARAMS

REPO = Path(__file__).resolve().parents[2]
TOP_LEVEL = ("config", "print_config", "seed_everything", "trainer", "model", "data", "updates", "compile",
             "accept_changes", "eval", "logger", "wandb", "ckpt_path", "weights_only", "help")
SHORTHANDS = {"--dataset": "--data.dataset", "--env": "--data.env_id", "--seed": "--seed_everything",
              "--device": "--trainer.accelerator", "--out": "--trainer.default_root_dir"}
SWITCHES = ("--compile", "--accept_changes")  # alone: true
OWN_OPTIMISERS = ("optimizer", "lr_scheduler")
LINKED = {"trainer.max_epochs": "it is --updates / --data.eval_every: set --updates",
          **{f"model.{k}": "it is taken from the data" for k in ("obs_dim", "act_dim", "max_action")}}


def renamed_message(owner: str, key: str, new: str, where: str, value: Any = None) -> str:
    """The one message of a setting under its old name, wherever it was used (config, command line,
    a subclass's code)."""
    fix = f": --model.init_args.{new} {value}" if value is not None else f": pass `{new}`"
    return f"{owner}: `{key}` (in {where}) is now called `{new}`{fix}"


def fit_argv(argv: list[str]) -> list[str]:
    """`argv` in LightningCLI's spelling (shorthands, hyphens, bare switches), after the checks above."""
    out: list[str] = []
    for i, word in enumerate(argv):
        if word.startswith("--") and word != "--":
            key, eq, value = word.partition("=")
            key = "--" + key[2:].replace("-", "_")
            key = SHORTHANDS.get(key, key)
            word = key + eq + value
            if key in SWITCHES and not eq and (i + 1 == len(argv) or argv[i + 1].startswith("-")):
                word += "=true"
        out.append(word)
    check_settings(out)
    return out


def _given(argv: list[str]) -> tuple[list[tuple[str, Any, str]], dict[str, str | None]]:
    """(dotted key, value, where) of every setting in `argv` and its --config files, and the class paths
    of `model` and `data` (None: not given). A class given later replaces the settings given for the one
    before (as LightningCLI keeps only those the new class takes), so those are not checked."""
    given: list[tuple[str, Any, str]] = []
    classes: dict[str, str | None] = {"model": None, "data": "offbench.data.datamodule.OfflineDataModule"}

    def set_class(section: str, class_path: str) -> None:
        if class_path != classes[section]:
            given[:] = [g for g in given if not g[0].startswith(f"{section}.")]
        classes[section] = class_path

    for i, word in enumerate(argv):
        if not (word.startswith("--") or word in ("-c", "-h")) or word == "--":
            continue  # a value (a negative number too)
        key, eq, inline = word.lstrip("-").partition("=")
        key = {"c": "config", "h": "help"}.get(key, key).removesuffix("+")
        value = inline if eq else (argv[i + 1] if i + 1 < len(argv) and not argv[i + 1].startswith("--") else None)
        if key == "config" and value and Path(value).is_file():
            settings, config_classes = _config_settings(Path(value))
            for section, class_path in config_classes.items():
                set_class(section, class_path)
            given += settings
        elif key in ("model", "data", "model.class_path", "data.class_path") and value and not Path(value).is_file():
            set_class(key.split(".")[0], value)
        given.append((key, value, "the command line"))
    return given, classes


def _config_settings(path: Path) -> tuple[list[tuple[str, Any, str]], dict[str, str]]:
    """The settings of a config file (as _given has them) and the classes it names for model and data."""
    try:
        text = path.read_text()
        config = yaml.safe_load(text)
        lines = _key_lines(yaml.compose(text))
    except (OSError, yaml.YAMLError):
        return [], {}  # LightningCLI reports it
    if not isinstance(config, dict):
        return [], {}
    settings, classes = [], {}
    for section, body in config.items():
        if isinstance(body, dict) and section in ("model", "data", "trainer", "eval", "wandb"):
            if section in ("model", "data") and isinstance(body.get("class_path"), str):
                classes[section] = body["class_path"]
            for key, value in body.items():
                if key == "init_args" and isinstance(value, dict):
                    settings += [(f"{section}.init_args.{k}", v, f"{path}:{lines.get((section, key, k), '?')}")
                                 for k, v in value.items()]
                else:
                    settings.append((f"{section}.{key}", value, f"{path}:{lines.get((section, key), '?')}"))
        else:
            if section in ("model", "data") and isinstance(body, str):
                classes[section] = body
            settings.append((str(section), body, f"{path}:{lines.get((section,), '?')}"))
    return settings, classes


def _key_lines(node: Any, prefix: tuple[str, ...] = ()) -> dict[tuple[str, ...], int]:
    """The line of every mapping key of a composed YAML document, by its path of keys."""
    lines: dict[tuple[str, ...], int] = {}
    if isinstance(node, yaml.MappingNode):
        for key, value in node.value:
            path = (*prefix, str(key.value))
            lines[path] = key.start_mark.line + 1
            lines.update(_key_lines(value, path))
    return lines


def _parameters(class_path: str | None) -> dict[str, inspect.Parameter] | None:
    """The settings a class takes (its __init__'s parameters, and its parents' where it passes **kwargs
    on), or None when they cannot be known here (unknown class: reported by the class path check)."""
    if not class_path or "." not in class_path:
        return None
    module_name, _, name = class_path.rpartition(".")
    try:
        cls = getattr(importlib.import_module(module_name), name)
    except Exception:  # noqa: BLE001 - reported by class_path_problem / LightningCLI
        return None
    params: dict[str, inspect.Parameter] = {}
    for klass in inspect.getmro(cls) if inspect.isclass(cls) else [cls]:
        init = klass.__init__ if inspect.isclass(klass) else klass
        if init is object.__init__:
            break
        try:
            own = inspect.signature(init).parameters
        except (TypeError, ValueError):
            return None
        params.update({k: v for k, v in own.items() if k != "self" and v.kind not in (v.VAR_KEYWORD, v.VAR_POSITIONAL)})
        if not any(v.kind == v.VAR_KEYWORD for v in own.values()):
            return params
    return params


def _close(name: str, names: Any, prefix: str = "") -> str:
    close = difflib.get_close_matches(name, sorted(names), n=2, cutoff=0.7)
    return f": did you mean {' or '.join(f'`{prefix}{c}`' for c in close)}?" if close else ""


def check_settings(argv: list[str]) -> None:
    """Every setting given names a setting that exists (see the module's docstring); else one UserError."""
    given, classes = _given(argv)
    for section in ("model", "data"):
        problem = class_path_problem(classes[section]) if classes[section] else None
        if problem:
            raise UserError(f"--{section}: {problem}")
    known: dict[str, dict[str, Any] | None] = {
        "model": _parameters(classes["model"]), "data": _parameters(classes["data"]),
        "trainer": _parameters("lightning.pytorch.Trainer"), "eval": _parameters("offbench.evaluation.EvalCallback"),
        "wandb": _parameters("offbench.wandb_logging.WandbOptions"),
    }
    for key, value, where in given:
        parts = key.split(".")
        if parts[0] in OWN_OPTIMISERS:
            raise UserError(
                f"--{parts[0]} (in {where}) is not an option of offbench fit: the algorithms own their optimisers "
                "(configure_optimizers, the contract in offbench/module.py); set their learning rates and schedules "
                "with --model.init_args.* (e.g. --model.init_args.actor_lr)"
            )
        if parts[0] not in TOP_LEVEL:
            names = [*TOP_LEVEL, *(s.removeprefix("--") for s in SHORTHANDS)]
            raise UserError(f"--{key} (in {where}) is not an option of offbench fit{_close(parts[0], names, '--')} "
                            "(offbench fit --help lists them)")
        if len(parts) < 2 or parts[0] not in known:
            continue
        dotted = ".".join(p for p in parts[:3] if p != "init_args")
        if dotted in LINKED:
            raise UserError(f"--{key} (in {where}) is not set by hand: {LINKED[dotted]}")
        if parts[0] in ("model", "data"):
            if parts[1] in ("class_path", "dict_kwargs", "help") or (parts[1] == "init_args" and len(parts) == 2):
                continue
            name = parts[2] if parts[1] == "init_args" and len(parts) > 2 else parts[1]
        else:
            name = parts[1]
        params = known[parts[0]]
        if params is None or name in params:
            continue
        owner = classes.get(parts[0]) or {"trainer": "Lightning's Trainer", "eval": "the evaluation (EvalCallback)",
                                          "wandb": "the W&B options"}[parts[0]]
        new = RENAMED_HPARAMS.get(name)
        if parts[0] == "model" and new in params:
            raise UserError(renamed_message(owner, name, new, where, value))
        flag = f"--{parts[0]}.init_args.{name}" if parts[0] == "model" else f"--{parts[0]}.{name}"
        hint = _close(name, params) or f"; its settings: {', '.join(sorted(params))}"
        raise UserError(f"{flag} (in {where}) is not a setting of {owner}{hint}")
    _check_hidden(given, known["model"], classes["model"])


def _check_hidden(given: list[tuple[str, Any, str]], params: dict[str, Any] | None, class_path: str | None) -> None:
    """`hidden` as one width (the old form) where the class takes a list of layer widths."""
    hidden = (params or {}).get("hidden")
    if hidden is None or "tuple" not in str(hidden.annotation):
        return
    for key, value, where in given:
        if key.split(".")[-1] == "hidden" and key.startswith("model."):
            width = yaml.safe_load(value) if isinstance(value, str) else value
            if isinstance(width, int):
                raise UserError(f"{class_path}: `hidden` (in {where}) is now a list of layer widths, e.g. "
                                f"[{width}, {width}, {width}] for three layers of that width")


def class_path_problem(class_path: Any) -> str | None:
    """What is wrong with a `class_path` (module.Class), found without importing the module (its source
    is read): None when the module exists and defines or imports that name."""
    if not isinstance(class_path, str) or "." not in class_path.strip("."):
        return f"`{class_path}` is not an import path of a class (module.Class, e.g. algorithms.bc.BC)"
    module, _, name = class_path.rpartition(".")
    try:
        spec = importlib.util.find_spec(module)
    except (ImportError, ValueError):
        spec = None
    if spec is None:
        return (f"no module {module} for the class path {class_path}: check its spelling; a module of your own must be "
                "importable (a file in the working directory, or on PYTHONPATH)")
    if not spec.origin or not spec.origin.endswith(".py"):
        return None
    try:
        tree = ast.parse(Path(spec.origin).read_text())
    except (OSError, SyntaxError, ValueError):
        return None  # the import reports it
    names, exported = set(), None
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(isinstance(t, ast.Name) and t.id == "__all__" for t in node.targets):
            try:
                exported = set(ast.literal_eval(node.value))
            except ValueError:
                pass
        if isinstance(node, (ast.ClassDef, ast.FunctionDef)):
            names.add(node.name)
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            names |= {(a.asname or a.name).split(".")[0] for a in node.names}
        elif isinstance(node, ast.Assign):
            names |= {t.id for t in node.targets if isinstance(t, ast.Name)}
        elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            names.add(node.target.id)
    if name in names or ("__getattr__" in names and (exported is None or name in exported)):
        return None  # a module-level __getattr__ (a lazy import) provides what its __all__ says
    names |= exported or set()
    return f"{module} has no class {name}{_close(name, names)}"


def algorithms_help() -> str:
    """The algorithm classes and their config files, for `offbench fit --help`."""
    rows: dict[str, list[str]] = {}
    for path in sorted((REPO / "configs/algorithms").glob("*.yaml")):
        try:
            model = (yaml.safe_load(path.read_text()) or {}).get("model") or {}
        except (OSError, yaml.YAMLError, AttributeError):
            continue
        if isinstance(model, dict) and isinstance(model.get("class_path"), str):
            rows.setdefault(model["class_path"], []).append(str(path.relative_to(REPO)))
    width = max((len(c) for c in rows), default=0)
    lines = [f"  {c:{width}}  {', '.join(files)}" for c, files in sorted(rows.items())]
    notes = textwrap.fill(
        "Shorthands of the grammar shared with the other commands: --dataset (--data.dataset), --env (--data.env_id), "
        "--seed (--seed_everything), --device (--trainer.accelerator), --out (--trainer.default_root_dir); hyphens may "
        "replace underscores (--ckpt-path). An algorithm's settings: offbench fit --model.help CLASS. The algorithms "
        "own their optimisers: their learning rates are --model.init_args.* settings. Several seeds in one process: "
        "--seeds 0,1,2,3 (or 0-3) in place of --seed trains one run per seed, each in its own run directory as if run "
        "alone, their updates one batched computation (docs/seeds.md; with --out, put {seed} in it).", 100)
    return ("Train one algorithm on one dataset (LightningCLI; docs/cli.md). The algorithms, by class (--model CLASS)\n"
            "and with the paper's settings (--config FILE):\n\n" + "\n".join(lines) + "\n\n" + notes)
