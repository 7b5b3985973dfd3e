"""One command grammar for every `offbench` command (docs/cli.md).

The plain commands (bench, table, data, perf, toy, gpu-check) build their parsers from `Parser`:

- flags are spelled with hyphens (`--block-size`); the underscore spelling of fit's LightningCLI
  (`--block_size`) is accepted too, so a flag copied from one command works in the other;
- a switch is on when given alone (`--compile`), and takes fit's explicit form too: `--compile true`,
  `--compile false`, `--compile=true`;
- the same idea has the same flag in every command: `--dataset`, `--env`, `--device {auto,cpu,cuda}`,
  `--workers`, `--out` (where the command writes), `--compile`, `--seed`;
- a flag renamed for this grammar keeps working for one release, with a one-line warning naming the
  new spelling (`Parser.renamed`);
- a mistyped flag is one line with the closest flags ("did you mean"), not the usage: offbench's
  UserError (exit status 2).
"""

from __future__ import annotations

import argparse
import difflib
import re
import sys
from collections.abc import Sequence
from typing import Any

from offbench.errors import UserError

DEVICES = ("auto", "cpu", "cuda")
DEVICE_HELP = "where it runs: auto (CUDA when available, else CPU), cpu or cuda"


def boolean(text: str) -> bool:
    """`true`/`false` (and yes/no, 1/0), as fit's LightningCLI spells its booleans."""
    value = text.strip().lower()
    if value in ("true", "yes", "1"):
        return True
    if value in ("false", "no", "0"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


class Parser(argparse.ArgumentParser):
    """argparse with the grammar above. `renamed` maps an old flag to the words that replace it (a flag,
    or a flag and its value: `{"--cpu": ["--device", "cpu"]}`)."""

    def __init__(self, *args: Any, renamed: dict[str, list[str]] | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.renamed = dict(renamed or {})

    def parse_known_args(self, args: Sequence[str] | None = None, namespace: Any = None) -> Any:
        words = list(sys.argv[1:] if args is None else args)
        return super().parse_known_args(self._canonical(words), namespace)

    def _canonical(self, words: list[str]) -> list[str]:
        actions = {option: action for action in self._actions for option in action.option_strings}
        out: list[str] = []
        i = 0
        while i < len(words):
            word = words[i]
            i += 1
            if word == "--":
                return out + words[i - 1:]
            if not word.startswith("--"):
                out.append(word)
                continue
            flag, eq, value = word.partition("=")
            if flag not in actions and flag not in self.renamed and flag.replace("_", "-") in {*actions, *self.renamed}:
                flag = flag.replace("_", "-")  # fit's spelling of a flag of this command
            if flag in self.renamed:
                new = self.renamed[flag]
                print(f"{self.prog}: {flag} is deprecated (removed in the next release): use {' '.join(new)}",
                      file=sys.stderr)
                out.extend([new[0] + (eq + value if eq and len(new) == 1 else ""), *new[1:]])
                continue
            action = actions.get(flag)
            if isinstance(action, (argparse._StoreTrueAction, argparse._StoreFalseAction)):
                if not eq and i < len(words) and words[i].lower() in ("true", "false"):
                    eq, value = "=", words[i]  # fit's form: --compile true
                    i += 1
                if eq:
                    if value.lower() not in ("true", "false", "yes", "no", "1", "0"):
                        self.error(f"argument {flag}: expected true or false, got {value!r}")
                    if boolean(value):
                        out.append(flag)
                    continue  # --compile false: the switch is off, as when it is not given
            out.append(flag + eq + value)
        return out

    def error(self, message: str) -> None:  # type: ignore[override]
        """One line (no usage): the problem, the closest flags of a mistyped one, and where the help is."""
        hint = ""
        if message.startswith("unrecognized arguments:"):
            options = sorted({o[2:] for action in self._actions for o in action.option_strings
                              if o.startswith("--") and action.help != argparse.SUPPRESS})
            guesses = []
            for word in message.removeprefix("unrecognized arguments:").split():
                if word.startswith("--"):
                    close = difflib.get_close_matches(word[2:].partition("=")[0], options, n=2, cutoff=0.7)
                    if close:
                        guesses.append(f"{word.partition('=')[0]}: did you mean {' or '.join('--' + c for c in close)}?")
            hint = ("; " + "; ".join(guesses)) if guesses else ""
        raise UserError(f"{self.prog}: {message}{hint} (see {self.prog} --help)")


# fit's --data.* settings that the plain commands take under their own flag (`data info`, `data synth`)
_DATA_FLAGS = {"env_id": "--env"}


def plain_flags(message: str) -> str:
    """A message naming fit's data flags, in a plain command's spelling: `--data.ref_min` -> `--ref-min`,
    `--data.env_id` -> `--env` (the grammar: a plain command's flag is fit's data key with hyphens)."""
    return re.sub(r"--data\.(\w+)", lambda m: _DATA_FLAGS.get(m.group(1), "--" + m.group(1).replace("_", "-")), message)


def require_device(device: str, flag: str = "--device") -> None:
    """A UserError, before anything runs, when `device` asks for CUDA and torch sees none (instead of
    Lightning's "No supported gpu backend found!" or a MisconfigurationException deep in a run)."""
    if device not in ("cuda", "gpu"):
        return
    import torch

    if not torch.cuda.is_available():
        raise UserError(f"{flag} {device}, but torch {torch.__version__} sees no CUDA device: use {flag} cpu (or auto), "
                        "or run on a machine with CUDA and a CUDA build of torch")
