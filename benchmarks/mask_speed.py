"""Speed of the mask transformers: our `eomt` against transformers' `EomtForUniversalSegmentation`, and `pmt` against
the backbone alone, as ratios of medians measured in one process.

    python benchmarks/mask_speed.py                                  # ViT-S widths, 512 and 640, CPU
    python benchmarks/mask_speed.py --sizes 512 640 --repeats 7 --json benchmarks/results/mask_speed.json

Models (random weights: speed does not depend on them):
- transformers' `EomtForUniversalSegmentation` built from an `EomtConfig` of `--hidden-size` / `--layers` / `--heads`
  (default ViT-S: 384, 12, 6; patch 16, 4 registers), `--num-blocks` query blocks and `--num-queries` queries;
- ours, `hf_vitseg.convert.convert_eomt` of that very model: the same widths, blocks, queries and weights, on a
  `dinov2_with_registers` backbone (its outputs equal transformers' within 1e-5, tests/test_convert_eomt.py);
- `pmt` on the same backbone config (`--num-blocks` decoder layers, the same queries), timed against its own
  backbone adapter alone (`model.backbone(pixel_values)`, the last tap).

Measurements, per input size (square, batch `--batch-size`): the forward pass in eval mode without gradients
(masked attention off, `attn_mask_probs` 0, as after annealing: inference) and a training step in train mode
(masked attention on in every query block, `attn_mask_probs` 1, as at the start of training; forward with
`--num-targets` random box masks per image, loss, backward, AdamW step). The two models of a pair alternate, one
call each per repeat after `--warmup` untimed calls; the result is the ratio of their medians (ours / theirs;
< 1 means ours is faster). The machine is shared with other jobs: read ratios, not seconds.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch


def eomt_pair(args, size: int):
    """`(transformers' EoMT, ours converted from it)` for `size` x `size` inputs, the same weights (transformers'
    EoMT runs only at its config's `image_size`: no position-embedding interpolation)."""
    from transformers import EomtConfig, EomtForUniversalSegmentation

    from hf_vitseg.convert import convert_eomt

    torch.manual_seed(0)
    config = EomtConfig(
        hidden_size=args.hidden_size, num_hidden_layers=args.layers, num_attention_heads=args.heads,
        intermediate_size=4 * args.hidden_size, patch_size=16, image_size=size, num_register_tokens=4,
        num_blocks=args.num_blocks, num_queries=args.num_queries, num_labels=args.num_labels,
    )
    theirs = EomtForUniversalSegmentation(config)
    return theirs, convert_eomt(theirs)


def pmt_model(ours):
    """`pmt` on our converted eomt's backbone config (same widths), `--num-blocks` layers, the same queries."""
    from hf_vitseg import ViTSegConfig
    from hf_vitseg.modeling import ViTSegForUniversalSegmentation

    config = ours.config
    head_kwargs = {k: config.head_kwargs[k] for k in ("num_queries", "num_blocks")}
    pmt_config = ViTSegConfig(backbone_config=config.backbone_config, head="pmt", num_labels=config.num_labels,
                              head_kwargs=head_kwargs)
    return ViTSegForUniversalSegmentation(pmt_config)


def targets(batch_size: int, size: int, count: int, num_labels: int, seed: int = 0):
    """Random box masks and classes: `mask_labels` `(count, size, size)` and `class_labels` `(count,)` per image."""
    generator = torch.Generator().manual_seed(seed)
    masks, classes = [], []
    for _ in range(batch_size):
        image_masks = torch.zeros(count, size, size)
        for k in range(count):
            top, left = torch.randint(0, size // 2, (2,), generator=generator).tolist()
            height, width = torch.randint(size // 8, size // 2, (2,), generator=generator).tolist()
            image_masks[k, top : top + height, left : left + width] = 1
        masks.append(image_masks)
        classes.append(torch.randint(0, num_labels, (count,), generator=generator))
    return masks, classes


def set_probs(model, value: float) -> None:
    with torch.no_grad():
        model.attn_mask_probs.fill_(value)


def forward_call(model, pixel_values):
    def call():
        with torch.no_grad():
            model(pixel_values=pixel_values)

    return call


def train_call(model, pixel_values, masks, classes):
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-6)

    def call():
        loss = model(pixel_values=pixel_values, mask_labels=masks, class_labels=classes).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    return call


def backbone_call(model, pixel_values):
    def call():
        with torch.no_grad():
            model.backbone(pixel_values)

    return call


def interleaved_medians(calls: dict, repeats: int, warmup: int) -> dict:
    """Median seconds of each call, the calls alternating within every repeat."""
    for call in calls.values():
        for _ in range(warmup):
            call()
    times = {name: [] for name in calls}
    for _ in range(repeats):
        for name, call in calls.items():
            started = time.perf_counter()
            call()
            times[name].append(time.perf_counter() - started)
    return {name: statistics.median(values) for name, values in times.items()}


def measure(args) -> dict:
    results = {"sizes": {}}
    for size in args.sizes:
        theirs, ours = eomt_pair(args, size)
        pmt = pmt_model(ours)
        pixel_values = torch.randn(args.batch_size, 3, size, size, generator=torch.Generator().manual_seed(size))
        masks, classes = targets(args.batch_size, size, args.num_targets, args.num_labels)
        for model in (theirs, ours, pmt):
            model.eval()
            set_probs(model, 0.0)
        forward = interleaved_medians(
            {"transformers eomt": forward_call(theirs, pixel_values), "ours eomt": forward_call(ours, pixel_values),
             "pmt": forward_call(pmt, pixel_values), "pmt backbone alone": backbone_call(pmt, pixel_values)},
            args.repeats, args.warmup,
        )
        for model in (theirs, ours):
            model.train()
            set_probs(model, 1.0)
        train = interleaved_medians(
            {"transformers eomt": train_call(theirs, pixel_values, masks, classes),
             "ours eomt": train_call(ours, pixel_values, masks, classes)},
            args.repeats, args.warmup,
        )
        row = {
            "forward_seconds": forward,
            "train_step_seconds": train,
            "eomt_forward_ratio": forward["ours eomt"] / forward["transformers eomt"],
            "eomt_train_step_ratio": train["ours eomt"] / train["transformers eomt"],
            "pmt_forward_over_backbone": forward["pmt"] / forward["pmt backbone alone"],
        }
        results["sizes"][str(size)] = row
        print(f"{size}x{size}: eomt forward {row['eomt_forward_ratio']:.2f}x, train step "
              f"{row['eomt_train_step_ratio']:.2f}x of transformers'; pmt forward "
              f"{row['pmt_forward_over_backbone']:.2f}x the backbone alone", flush=True)
    return results


def format_table(results: dict) -> str:
    lines = ["| input | eomt forward, ours / transformers | eomt train step, ours / transformers | "
             "pmt forward / backbone alone | transformers forward s | transformers train step s |",
             "|---|---|---|---|---|---|"]
    for size, row in results["sizes"].items():
        lines.append(
            f"| {size}x{size} | {row['eomt_forward_ratio']:.2f} | {row['eomt_train_step_ratio']:.2f} | "
            f"{row['pmt_forward_over_backbone']:.2f} | {row['forward_seconds']['transformers eomt']:.2f} | "
            f"{row['train_step_seconds']['transformers eomt']:.2f} |"
        )
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[512, 640], help="square input sizes (multiples of 16)")
    parser.add_argument("--hidden-size", type=int, default=384)
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--heads", type=int, default=6)
    parser.add_argument("--num-blocks", type=int, default=4)
    parser.add_argument("--num-queries", type=int, default=100)
    parser.add_argument("--num-labels", type=int, default=10)
    parser.add_argument("--num-targets", type=int, default=8, help="target masks per image in the training step")
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--json", default=None)
    return parser


def main(argv: list[str] | None = None) -> dict:
    args = build_parser().parse_args(argv)
    if any(size % 16 for size in args.sizes):
        raise SystemExit(f"--sizes must be multiples of the patch size 16, got {args.sizes}")
    if args.threads:
        torch.set_num_threads(args.threads)
    results = {"command": "python benchmarks/mask_speed.py " + " ".join(argv if argv is not None else sys.argv[1:]),
               "settings": vars(args), "torch_threads": torch.get_num_threads(), **measure(args)}
    print("\n" + format_table(results))
    if args.json:
        path = Path(args.json)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(results, indent=1))
    return results


if __name__ == "__main__":
    main()
