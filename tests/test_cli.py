"""The CLI never lists a command it cannot run, and `hf-vitseg --help` does not pay for torch."""

from __future__ import annotations

import importlib
import re
import subprocess
import sys
from pathlib import Path

import pytest

from hf_vitseg.cli import COMMANDS, main

# The console script pip installs next to this interpreter (the dev install, `pip install -e .`).
CONSOLE_SCRIPT = Path(sys.executable).with_name("hf-vitseg")


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_every_listed_command_module_imports_and_has_configure_parser_and_run(command):
    module = importlib.import_module(COMMANDS[command][0])
    assert callable(getattr(module, "configure_parser", None)), f"{module.__name__} has no configure_parser"
    assert callable(getattr(module, "run", None)), f"{module.__name__} has no run"


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_every_listed_command_answers_help(command, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main([command, "--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith(f"usage: hf-vitseg {command} ")
    # after the options: the module docstring's examples and notes, verbatim (one place sets that up for all)
    notes = importlib.import_module(COMMANDS[command][0]).__doc__.partition("\n\n")[2]
    assert all(line in out for line in notes.splitlines()), out


def test_the_console_script_lists_exactly_the_commands_and_imports_no_torch_for_help():
    assert CONSOLE_SCRIPT.is_file(), f"{CONSOLE_SCRIPT} missing: install the package with pip install -e ."
    # -X importtime writes every imported module to stderr: --help must not import torch (it takes 5x as long as
    # `import transformers`, which is what the command's start-up is measured against).
    result = subprocess.run([sys.executable, "-X", "importtime", str(CONSOLE_SCRIPT), "--help"],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    listed = re.findall(r"^ {4}(\S+)", result.stdout, flags=re.MULTILINE)
    assert listed == list(COMMANDS), result.stdout
    imported = {line.rsplit("|", 1)[-1].strip() for line in result.stderr.splitlines() if "|" in line}
    assert "hf_vitseg.cli" in imported
    assert not {m for m in imported if m == "torch" or m.startswith("torch.")}, "hf-vitseg --help imported torch"



def test_a_command_help_imports_no_torch_either():
    # As the console script runs it (its path in argv[0]), with the modules it loaded printed afterwards.
    probe = (
        f"import sys; sys.argv = [{str(CONSOLE_SCRIPT)!r}, 'train', '--help']\n"
        "from hf_vitseg.cli import main\n"
        "try:\n    main()\nexcept SystemExit as exit:\n    assert exit.code == 0, exit.code\n"
        "print(sorted(m for m in sys.modules if m in ('torch', 'hf_vitseg.cli.train')))\n"
    )
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and result.stdout.startswith("usage: hf-vitseg train"), result.stderr
    assert result.stdout.strip().splitlines()[-1] == "['hf_vitseg.cli.train']"
