"""The command grammar (docs/cli.md): one spelling per idea, old spellings deprecated with one line,
a help line for every option, one-line errors whose suggested flags the printing command accepts."""

from __future__ import annotations

import re
from pathlib import Path

import lightning.pytorch  # noqa: F401 - imported before any test captures the output: its loggers keep the stream
import pytest
import yaml

from offbench import grammar
from offbench.cli import main
from offbench.errors import UserError

REPO = Path(__file__).resolve().parents[1]
BC = str(REPO / "configs/algorithms/bc.yaml")


class _Built(Exception):
    """Raised instead of parsing: carries the parser a command built."""


def parser_of(command: list[str], monkeypatch) -> grammar.Parser:
    """The parser `offbench COMMAND` builds, taken when it is about to parse (nothing runs)."""
    def capture(self, args=None, namespace=None):
        raise _Built(self)

    with monkeypatch.context() as m:
        m.setattr(grammar.Parser, "parse_known_args", capture)
        with pytest.raises(_Built) as built:
            main([*command])
    return built.value.args[0]


PLAIN = [["bench", "grid.yaml"], ["table", "results"], ["data", "info", "x"], ["perf"], ["toy"], ["gpu-check"],
         ["gpu-check", "--worker", "data"]]


def _all_parsers(parser):
    yield parser
    for action in parser._actions:
        for sub in (getattr(action, "choices", None) or {}).values() if action.nargs == "A..." else ():
            yield from _all_parsers(sub)


@pytest.mark.parametrize("command", PLAIN, ids=lambda c: " ".join(c))
def test_every_option_of_every_plain_command_has_a_help_line(command, monkeypatch):
    parser = parser_of(command, monkeypatch)
    for each in _all_parsers(parser):
        missing = [a.option_strings or a.dest for a in each._actions
                   if a.help != "==SUPPRESS==" and not (a.help or "").strip() and a.dest != "help"]
        assert not missing, f"{each.prog}: no help for {missing}"
        assert each.description, f"{each.prog}: no description"


def test_fit_help_lists_the_algorithms_with_their_configs_and_no_optimiser_options(capsys):
    with pytest.raises(SystemExit) as done:
        main(["fit", "--help"])
    assert done.value.code == 0
    out = capsys.readouterr().out
    assert "usage: offbench" in out and "algorithms.bc.BC" in out and "configs/algorithms/bc.yaml" in out
    assert "algorithms.diffusion_ql.DiffusionQL" in out and "configs/algorithms/diffusion_ql.yaml" in out
    assert "--optimizer" not in out and "--lr_scheduler" not in out


# ---------------------------------------------------------------- one spelling per idea; old ones deprecated
DEPRECATED = [  # (command, old words, new words)
    (["perf"], ["--accelerator", "cpu"], ["--device", "cpu"]),
    (["toy"], ["--accelerator", "cpu"], ["--device", "cpu"]),
    (["bench", "grid.yaml"], ["--devices", "cpu"], ["--device", "cpu"]),
    (["bench", "grid.yaml"], ["--output", "runs/mine"], ["--out", "runs/mine"]),
    (["bench", "grid.yaml"], ["--output=runs/mine"], ["--out", "runs/mine"]),
    (["gpu-check"], ["--cpu"], ["--device", "cpu"]),
    (["data", "info", "x"], ["--env-id", "Hopper-v4"], ["--env", "Hopper-v4"]),
]


@pytest.mark.parametrize(("command", "old", "new"), DEPRECATED, ids=lambda x: " ".join(x))
def test_an_old_spelling_works_with_a_one_line_deprecation_naming_the_new(command, old, new, monkeypatch, capsys):
    parser = parser_of(command, monkeypatch)
    words = command[1:]
    assert vars(parser.parse_args([*words, *old])) == vars(parser.parse_args([*words, *new]))
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "is deprecated" in err[0] and f"use {' '.join(new[:1])}" in err[0], err


@pytest.mark.parametrize(("command", "fit_spelling", "plain"), [
    (["perf"], ["--block_size", "10"], ["--block-size", "10"]),
    (["perf"], ["--eval_episodes=3"], ["--eval-episodes", "3"]),
    (["data", "info", "x"], ["--max_episode_steps", "7"], ["--max-episode-steps", "7"]),
    (["bench", "grid.yaml"], ["--dry_run", "--rerun_stale"], ["--dry-run", "--rerun-stale"]),
    (["perf"], ["--compile", "true"], ["--compile"]),  # fit's form of a switch
    (["perf"], ["--compile=true"], ["--compile"]),
    (["perf"], ["--compile", "false"], []),
    (["table", "results"], ["--latex", "false"], []),
])
def test_plain_commands_take_fits_spelling_too(command, fit_spelling, plain, monkeypatch):
    parser = parser_of(command, monkeypatch)
    words = command[1:]
    assert vars(parser.parse_args([*words, *fit_spelling])) == vars(parser.parse_args([*words, *plain]))


def test_fit_takes_the_shared_flags_and_the_plain_spelling():
    from offbench.run.arguments import fit_argv

    assert fit_argv(["--dataset", "d", "--env", "Hopper-v4", "--seed", "3", "--device", "cpu", "--out", "runs/x",
                     "--ckpt-path", "last", "--data.block-size=5", "--compile", "--accept-changes", "false"]) == [
        "--data.dataset", "d", "--data.env_id", "Hopper-v4", "--seed_everything", "3", "--trainer.accelerator", "cpu",
        "--trainer.default_root_dir", "runs/x", "--ckpt_path", "last", "--data.block_size=5", "--compile=true",
        "--accept_changes", "false"]


# ---------------------------------------------------------------- mistakes: one line, a fix the command accepts
def _accepted_by_fit(flag: str) -> bool:
    from offbench.run.arguments import fit_argv

    try:
        fit_argv(["--model", "algorithms.bc.BC", flag, "1"])
    except UserError:
        return False
    return True


def _suggested_flags(message: str, typed: list[str]) -> set[str]:
    """The flags a message names that the user did not type (the fixes it suggests)."""
    named = set(re.findall(r"(?<![\w-])--[a-z][\w.-]*\w", message))
    return named - {t.partition("=")[0] for t in typed}


MISTAKES = [  # (argv, a piece of the one-line message)
    (["fit", "--config", BC, "--updats", "10"], "did you mean `--updates`"),
    (["fit", "--config", BC, "--updates", "10", "--data.eval_evry", "2"], "did you mean `eval_every`"),
    (["fit", "--config", BC, "--updates", "10", "--trainer.max_epoch", "3"], "did you mean `max_epochs`"),
    (["fit", "--config", BC, "--updates", "10", "--trainer.max_epochs", "3"], "it is --updates / --data.eval_every"),
    (["fit", "--config", BC, "--updates", "10", "--optimizer", "Adam"], "the algorithms own their optimisers"),
    (["fit", "--config", BC, "--updates", "10", "--lr_scheduler", "StepLR"], "the algorithms own their optimisers"),
    (["fit", "--config", BC, "--updates", "abc"], "--updates: expected type int, got abc"),
    (["fit", "--config", BC, "--updates", "10", "--model.init_args.actor_lr", "x"], "expected type float, got x"),
    (["fit", "--model", "algorithms.bc.BCC", "--updates", "10"], "algorithms.bc has no class BCC: did you mean `BC`?"),
    (["fit", "--model", "algorithmz.bc.BC", "--updates", "10"], "no module algorithmz.bc"),
    (["fit", "--config", BC, "--updates", "10", "--model.init_args.lr", "0.1"],
     "`lr` (in the command line) is now called `actor_lr`: --model.init_args.actor_lr 0.1"),
    (["fit", "--config", BC, "--updates", "250", "--data.eval_every", "100"], "is not a multiple of --data.eval_every 100"),
    (["fit", "--config", BC, "--updates", "10", "--data.eval_every", "5", "--device", "cuda"], "sees no CUDA device"),
    (["fit", "--config", BC, "--updates", "10", "--data.eval_every", "5", "--out", "{tmp}/none", "--ckpt_path", "last"],
     "nothing to resume"),
    (["perf", "--updats", "5"], "did you mean --updates?"),
    (["perf", "--device", "tpu"], "invalid choice: 'tpu'"),
    (["perf", "--device", "cuda"], "sees no CUDA device: use --device cpu"),
    (["toy", "--device", "cuda"], "sees no CUDA device: use --device cpu"),
    (["toy", "--methods", "bc", "--configs", "{tmp}/none"], "no folder of toy configs"),
    (["bench", "{tmp}/grid.yaml", "--gpus-per-cell", "0.5"], "only with --launcher ray"),
    (["bench", "{tmp}/grid.yaml", "--workrs", "2"], "did you mean --workers?"),
    (["gpu-check", "--out", "{tmp}/report"], "no GPU here"),
    (["data", "synth", "--env", "Hoper-v4", "--out", "{tmp}/x.hdf5"], "Did you mean Hopper-v4"),
    (["data", "synth", "--env", "Pendulum-v1", "--out", "{tmp}/x.hdf5", "--ref-min", "0"], "pass both --ref-min"),
    (["data", "info", "{tmp}/norefs.hdf5"], "--env"),
    (["data", "info", "synthetic/hopper-random-v0", "--env", "Hoper-v4"], "Did you mean Hopper-v4"),
    (["table", "{tmp}/none"], "name a results directory"),
]


@pytest.fixture
def no_refs(tmp_path) -> Path:
    from offbench.data.synthetic import write_random_dataset

    write_random_dataset("Pendulum-v1", tmp_path / "norefs.hdf5", episodes=2, seed=0)
    return tmp_path / "norefs.hdf5"


@pytest.mark.parametrize(("argv", "message"), MISTAKES, ids=lambda x: " ".join(x)[:70] if isinstance(x, list) else "")
def test_a_mistake_is_one_line_whose_suggested_flags_the_command_accepts(argv, message, tmp_path, monkeypatch, capsys,
                                                                          no_refs):
    import torch

    if "cuda" in argv and torch.cuda.is_available() or argv[0] == "gpu-check" and torch.cuda.is_available():
        pytest.skip("a CUDA machine accepts it")
    (tmp_path / "grid.yaml").write_text(yaml.safe_dump({"name": "g", "datasets": ["synthetic/pendulum-random-v0"],
                                                        "algorithms": [{"name": "bc", "config": BC}]}))
    argv = [a.replace("{tmp}", str(tmp_path)) for a in argv]
    monkeypatch.chdir(tmp_path)
    assert main(argv) == 2
    err = capsys.readouterr().err
    lines = [line for line in err.strip().splitlines() if "warn" not in line.lower() and "AdroitHand" not in line]
    assert len(lines) == 1 and lines[0].startswith("offbench: error: ") and message in lines[0], err
    assert "usage:" not in err and "Traceback" not in err
    suggested = _suggested_flags(lines[0], argv)
    if argv[0] == "fit":
        rejected = [f for f in suggested if not _accepted_by_fit(f)]
    else:
        parser = parser_of(argv[:2] if argv[0] in ("data", "bench", "table") else argv[:1], monkeypatch)
        known = {o for p in _all_parsers(parser) for a in p._actions for o in a.option_strings}
        rejected = sorted(suggested - known)
    assert not rejected, f"{lines[0]}: suggests {rejected}, which `offbench {argv[0]}` does not take"
    assert not list(tmp_path.glob("report*")) and not (tmp_path / "x.hdf5").exists()  # nothing written


def test_a_config_file_typo_names_the_file_and_line(tmp_path, capsys):
    config = tmp_path / "mine.yaml"
    config.write_text("model:\n  class_path: algorithms.bc.BC\n  init_args:\n    actor_lrr: 0.001\n")
    assert main(["fit", "--config", str(config), "--updates", "10"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == (f"offbench: error: --model.init_args.actor_lrr (in {config}:4) is not a setting of "
                   "algorithms.bc.BC: did you mean `actor_lr`?")


def test_a_class_given_later_replaces_the_settings_checked(tmp_path):
    """`--config bc.yaml --model my.Class`: the config's BC settings are LightningCLI's to drop, not typos."""
    from offbench.run.arguments import check_settings

    check_settings(["--config", BC, "--model", "offbench.module.OfflineRLModule"])
    with pytest.raises(UserError, match="is not a setting of offbench.module.OfflineRLModule"):
        check_settings(["--config", BC, "--model", "offbench.module.OfflineRLModule", "--model.init_args.actor_lr", "1"])


def test_a_grid_naming_a_class_that_does_not_exist_fails_before_any_cell(tmp_path):
    from offbench.bench import GridError, load_grid

    config = tmp_path / "algo.yaml"
    config.write_text("model:\n  class_path: algorithms.bc.BCC\ndata:\n  class_path: offbench.pgd.PGDDataModul\n")
    grid = tmp_path / "grid.yaml"
    grid.write_text(yaml.safe_dump({"name": "g", "datasets": ["synthetic/pendulum-random-v0"], "seeds": [0],
                                    "algorithms": [{"name": "x", "config": str(config)}], "updates": 10, "eval_every": 5}))
    with pytest.raises(GridError) as error:
        load_grid(grid)
    assert "model.class_path: algorithms.bc has no class BCC: did you mean `BC`?" in str(error.value)
    assert "data.class_path: offbench.pgd has no class PGDDataModul: did you mean `PGDDataModule`?" in str(error.value)


def test_docs_cli_md_names_every_flag_of_every_plain_command_and_every_deprecated_one(monkeypatch):
    text = (REPO / "docs/cli.md").read_text()
    for command in PLAIN[:-1]:  # gpu-check --worker is internal
        for each in _all_parsers(parser_of(command, monkeypatch)):
            if all(a.dest == "help" or a.nargs == "A..." for a in each._actions):
                continue  # `offbench data`, `offbench data pgd`: subcommands only
            section = text.split(f"### `{each.prog}`", 1)
            assert len(section) == 2, f"docs/cli.md has no section for {each.prog}"
            body = section[1].split("\n### ", 1)[0]
            flags = [o for a in each._actions for o in a.option_strings if o.startswith("--") and a.dest != "help"]
            assert not [f for f in flags if f"`{f}" not in body], f"docs/cli.md, {each.prog}: flags missing"
    for _command, old, new in DEPRECATED:
        assert f"`{old[0].partition('=')[0]}" in text and f"`{new[0]}" in text


def test_an_unknown_command_is_one_line_with_the_closest(capsys):
    assert main(["bnech"]) == 2
    assert capsys.readouterr().err.strip() == ("offbench: error: unknown command 'bnech': did you mean bench? "
                                               "(commands: fit, data, perf, bench, table, gpu-check, toy)")
