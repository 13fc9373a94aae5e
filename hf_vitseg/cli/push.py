"""`hf-vitseg push FOLDER REPO_ID`: upload a saved model folder to the Hub with a generated model card.

The files are listed before anything is sent; `--dry-run` only lists them. See `hf_vitseg.hub.push_to_hub` for
what is uploaded (only what hf-vitseg wrote for the model) and what is never overwritten.

    hf-vitseg push runs/nuclei username/nuclei-seg --space username/nuclei-seg-demo

`--space SPACE_ID` then writes a Gradio Space serving the model with `hf-vitseg app`'s page: `app.py` (loads the
model repo with trust_remote_code=True), `requirements.txt`, its card, and the source of this hf-vitseg (the Space
does not need hf-vitseg installed); see `hf_vitseg.hub.space`. A file of the Space that hf-vitseg did not write
stops that part of the push.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path


def configure_parser(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("folder", type=Path,
                        help="a folder written by model.save_pretrained (and processor.save_pretrained)")
    parser.add_argument("repo_id", help="the Hub repo, e.g. username/dinov2-small-upernet-ade20k")
    parser.add_argument("--private", action="store_true", help="create the repo private")
    parser.add_argument("--token", default=None, help="Hub token (default: the logged-in one)")
    parser.add_argument("--commit-message", default=None, help="commit message")
    parser.add_argument("--revision", default=None, help="branch to commit to (default: main)")
    parser.add_argument("--license", default=None,
                        help="license id for the card, e.g. apache-2.0, mit, other (default: the backbone "
                             "weights' licence, from where they came from)")
    parser.add_argument("--dataset", dest="datasets", action="append", default=None, metavar="DATASET_ID",
                        help="Hub id of a training / evaluation dataset (repeatable; the first is the evaluation's)")
    parser.add_argument("--dataset-name", default=None, help="display name of the evaluation dataset")
    parser.add_argument("--dataset-split", default=None, help="split the evaluation ran on, e.g. validation")
    parser.add_argument("--base-model", default=None,
                        help="the backbone's Hub id (default: config.backbone_name_or_path when it is one)")
    parser.add_argument("--tag", dest="tags", action="append", default=None, help="extra tag (repeatable)")
    parser.add_argument("--eval-results", type=Path, default=None,
                        help="JSON file of evaluation metrics (mean_iou or eval_mean_iou required); default: the "
                             "folder's eval_results.json / all_results.json / trainer_state.json")
    parser.add_argument("--overwrite-card", action="store_true",
                        help="replace a README.md on the Hub that hf-vitseg did not write, or that was edited")
    parser.add_argument("--space", default=None, metavar="SPACE_ID",
                        help="also write a Gradio Space serving the model, e.g. username/my-model-demo")
    parser.add_argument("--dry-run", action="store_true",
                        help="list the files that would be uploaded and send nothing (no network)")


def run(args: argparse.Namespace) -> int:
    """Run `push`; returns 0 on success, 1 (with the reason on stderr, one line) on bad input or when the Hub
    cannot be reached."""
    from huggingface_hub.errors import HfHubHTTPError

    from ..hub.push import DEFAULT_COMMIT_MESSAGE, HubUnreachableError, check_repo_id, push_to_hub

    card_data = {
        key: value
        for key, value in {
            "license": args.license,
            "datasets": args.datasets,
            "dataset_name": args.dataset_name,
            "dataset_split": args.dataset_split,
            "base_model": args.base_model,
            "tags": args.tags,
        }.items()
        if value is not None
    }
    try:
        if args.space is not None:  # before anything is sent: a bad Space id must not leave the model pushed alone
            try:
                check_repo_id(args.space)
            except ValueError as error:
                raise ValueError(f"--space: {error}") from None
            if args.space == args.repo_id:
                raise ValueError(f"--space {args.space}: give the Space its own id (the model repo is {args.repo_id}).")
        if args.eval_results is not None:
            try:
                card_data["eval_results"] = json.loads(args.eval_results.read_text(encoding="utf-8"))
            except (OSError, json.JSONDecodeError) as error:
                raise ValueError(f"--eval-results {args.eval_results}: not a readable JSON file ({error}).") from error
        result = push_to_hub(
            args.folder,
            args.repo_id,
            card_data=card_data,
            commit_message=args.commit_message or DEFAULT_COMMIT_MESSAGE,
            private=args.private or None,
            token=args.token,
            overwrite_card=args.overwrite_card,
            revision=args.revision,
            dry_run=args.dry_run,
            on_plan=lambda files: _print_plan(files, args.repo_id, args.dry_run),
        )
    except (ValueError, FileNotFoundError, HubUnreachableError) as error:
        print(f"hf-vitseg push: error: {error}", file=sys.stderr)
        return 1
    except HfHubHTTPError as error:
        reason = str(error).strip().splitlines()[0]
        print(f"hf-vitseg push: error: the Hub refused the push ({reason}). Log in with `hf auth login` or pass "
              "--token with write access to the repo.", file=sys.stderr)
        return 1
    for path, reason in result.skipped.items():
        print(f"Not uploaded: {path}: {reason}")
    if not result.dry_run:
        print(f"Uploaded {len(result.uploaded)} files to {result.repo_id}: {', '.join(result.uploaded)}")
        commit_url = getattr(result.commit, "commit_url", None)
        if commit_url:
            print(commit_url)
    if args.space is not None:
        status = _push_space(args, result.repo_id)
        if status:
            return status
    if result.dry_run:
        print("Dry run: nothing was sent.")
    return 0


def _push_space(args: argparse.Namespace, model_id: str) -> int:
    """`--space`: write the Space serving `model_id` (pushed just before); 1 with a one-line error."""
    from huggingface_hub.errors import HfHubHTTPError

    from ..hub.push import HubUnreachableError
    from ..hub.space import push_space

    try:
        space = push_space(model_id, args.space, private=args.private or None, token=args.token,
                           dry_run=args.dry_run, on_plan=lambda files: _print_plan(files, f"Space {args.space}",
                                                                                    args.dry_run, brief=True))
    except (ValueError, FileNotFoundError, HubUnreachableError) as error:
        print(f"hf-vitseg push: error: {error}" + ("" if args.dry_run else f" The model is on {model_id}."),
              file=sys.stderr)
        return 1
    except HfHubHTTPError as error:
        reason = str(error).strip().splitlines()[0]
        print(f"hf-vitseg push: error: the Hub refused the Space {args.space} ({reason}); the model is on {model_id}. "
              "Pass --token with write access.", file=sys.stderr)
        return 1
    if not space.dry_run:
        print(f"Wrote the Space {space.space_id}: https://huggingface.co/spaces/{space.space_id}")
    return 0


def _print_plan(files: dict[str, str], repo_id: str, dry_run: bool, brief: bool = False) -> None:
    """List `files`; with `brief`, the `hf_vitseg/` source files as one line (their count and folder)."""
    print(f"{'Would upload' if dry_run else 'Uploading'} {len(files)} files to {repo_id}:")
    package = {name: source for name, source in files.items() if brief and name.startswith("hf_vitseg/")}
    listed = {name: source for name, source in files.items() if name not in package}
    width = max(map(len, listed), default=0)
    for name, source in listed.items():
        print(f"  {name:<{width}}  from {source}")
    if package:
        folder = os.path.commonpath(list(package.values()))
        print(f"  hf_vitseg/ ({len(package)} Python files)  from {folder} and its subfolders (hf-vitseg's own source)")
