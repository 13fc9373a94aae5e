"""`hf-vitseg` command line: train, evaluate, predict, push, demo.

Each command lives in its own module exposing `configure_parser(parser)` and `run(args) -> int`, its module
docstring the help text (first line: what it does; the rest: shown after the options); only the chosen command's
module is imported, so `hf-vitseg --help` stays fast.
"""

from __future__ import annotations

import argparse
import importlib
import sys

COMMANDS = {
    "train": ("hf_vitseg.cli.train", "fine-tune a model with transformers.Trainer"),
    "evaluate": ("hf_vitseg.cli.evaluate", "report mIoU and accuracy of a saved model on a dataset"),
    "predict": ("hf_vitseg.cli.predict", "write label maps and colour overlays for images"),
    "push": ("hf_vitseg.cli.push", "upload a saved model folder to the Hugging Face Hub with a model card"),
    "bench": ("hf_vitseg.cli.bench", "speed, FLOPs and memory of heads on a backbone, and of one prediction"),
    "demo": ("hf_vitseg.cli.demo", "fine-tune and evaluate on the embedded nuclei sample (offline, CPU)"),
    "compare": ("hf_vitseg.cli.compare", "train every head on one frozen backbone under one budget: which to use"),
    "app": ("hf_vitseg.cli.app", "serve a web page to segment uploaded images with a model (Gradio)"),
}


class _Parser(argparse.ArgumentParser):
    """An argument error is one line on stderr (exit status 2), pointing at `--help` instead of the usage."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    from .args import add_verbose

    parser = _Parser(prog="hf-vitseg", description=__doc__.splitlines()[0])
    # -v before the command as after it (`hf-vitseg -v predict ...`); its own dest: a subcommand's default would
    # overwrite a shared one
    parser.add_argument("-v", "--verbose", dest="verbose_before_command", action="store_true",
                        help="show transformers' own progress bars and logs (also accepted after the command)")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (module, help_text) in COMMANDS.items():
        sub = subparsers.add_parser(name, help=help_text, description=help_text)
        if name == command:
            command_module = importlib.import_module(module)
            # the command's --help ends with its module docstring after the first line: examples and notes
            sub.formatter_class = argparse.RawDescriptionHelpFormatter
            sub.epilog = (command_module.__doc__ or "").partition("\n\n")[2] or None
            command_module.configure_parser(sub)
            add_verbose(sub)
    parser.command_parsers = subparsers.choices
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    command = next((a for a in argv if not a.startswith("-")), None)
    parser = build_parser(command if command in COMMANDS else None)
    args, unknown = parser.parse_known_args(argv)
    if args.command is None:
        if unknown:
            parser.error(f"unrecognized arguments: {' '.join(unknown)}")
        parser.print_help()
        return 2
    if unknown:  # named under the command, whose --help lists what it takes
        parser.command_parsers[args.command].error(f"unrecognized arguments: {' '.join(unknown)}")
    from .args import transformers_progress

    with transformers_progress(getattr(args, "verbose", False) or args.verbose_before_command):
        return int(importlib.import_module(COMMANDS[args.command][0]).run(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
