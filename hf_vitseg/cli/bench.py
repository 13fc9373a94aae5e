"""`hf-vitseg bench`: speed, FLOPs and memory of heads on your backbone, as ratios to the backbone alone.

examples:
  hf-vitseg bench                                         # every head on a DINOv2-S/14, 518x518, batch 1
  hf-vitseg bench --backbone facebook/dinov2-base --heads linear upernet dpt --image-size 448 --batch-size 4
  hf-vitseg bench --backbone ./my_backbone --heads linear --image-size 518 1036 --memory --json bench.json

For each head: parameters outside the backbone, GFLOPs of the forward pass, and the median forward and
training-step times (forward, backward, AdamW step) divided by the same measurement of the backbone alone
(the same adapter tapping the same layers), taken in the same process and interleaved with it; a shared
machine's noise hits both, so ratios of medians, not seconds, are the result. `--memory` adds the peak
memory growth of a training step as a ratio to the backbone's (each model in a fresh process; Linux, CPU).
Then the end-to-end cost of one prediction of one image of --image-size: the image processor, the model's
forward and the post-processing (`post_process_semantic_segmentation` back onto the image), in
milliseconds and, for the post-processing, as a share of the forward.
Only the backbone's config is read (weights do not change speed): a Hub id downloads config.json alone.
The default backbone is DINOv2-S/14 (`dinov2-small`, built from its config, nothing downloaded). Same
measurements as `benchmarks/heads.py` (`hf_vitseg.bench`).
"""

from __future__ import annotations

import argparse
import json
import os

from .args import CliError, check_device, loading, model_source, positive_int, report, size_pair


def configure_parser(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--backbone", default="dinov2-small",
                        help="'dinov2-small' (DINOv2-S/14, the default) or a Hub id / local folder of an HF vision "
                             "backbone (or of a saved hf-vitseg model: its backbone); only the config is read")
    parser.add_argument("--heads", nargs="+", default=None, metavar="HEAD",
                        help="registered head names (default: every registered head)")
    parser.add_argument("--image-size", type=positive_int, nargs="+", default=[518], metavar="N",
                        help="input size N (square) or H W; a multiple of the backbone's patch size (default 518)")
    parser.add_argument("--batch-size", type=positive_int, default=1)
    parser.add_argument("--repeats", type=positive_int, default=5, help="measurements per number (median taken)")
    parser.add_argument("--num-labels", type=positive_int, default=150, help="classes (default 150, ADE20K's)")
    parser.add_argument("--memory", action="store_true",
                        help="also the peak memory of a training step (a fresh process per model; Linux, CPU)")
    parser.add_argument("--no-prediction", action="store_true", help="skip the end-to-end prediction costs")
    parser.add_argument("--threads", type=positive_int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument("--device", default="cpu", help="cpu (default), cuda, cuda:1, mps")
    parser.add_argument("--json", default=None, metavar="FILE", help="also write the rows here (JSON)")


def backbone_config(name: str):
    """The backbone config `--backbone` names: DINOv2-S/14 for 'dinov2-small', else read from the folder or Hub id
    (a saved hf-vitseg model gives its backbone's)."""
    from transformers import AutoConfig

    from ..bench import dinov2_small_config

    if name == "dinov2-small":
        return dinov2_small_config()
    source = model_source(name, "--backbone")
    import hf_vitseg  # noqa: F401  (registers the vitseg config with AutoConfig)

    with loading("--backbone", name, (OSError, ValueError, KeyError)):
        config = AutoConfig.from_pretrained(source)
    if getattr(config, "model_type", None) == "vitseg":
        return config.backbone_config
    return config


def run(args: argparse.Namespace) -> int:
    """Run the benchmark; returns the exit status."""
    from .. import list_heads

    try:
        heads = args.heads or list_heads()
        from ..modeling.head_base import MASK_HEAD_NAMES

        masks = [h for h in heads if h in MASK_HEAD_NAMES]
        if masks:
            raise CliError(f"--heads {' '.join(masks)}: mask transformers (ViTSegForUniversalSegmentation) are not "
                           "benchmarked yet; bench measures the pixel heads: " + ", ".join(list_heads()) + ".")
        unknown = [h for h in heads if h not in list_heads()]
        if unknown:
            raise CliError(f"--heads {' '.join(unknown)}: not a registered head; choose from "
                           f"{', '.join(list_heads())}.")
        size = size_pair(args.image_size, "--image-size")
        device = check_device(args.device)
        if args.memory and not os.path.exists("/proc/self/statm"):
            raise CliError("--memory samples /proc/self/statm, which only Linux has; drop --memory.")
        if args.memory and device != "cpu":
            raise CliError("--memory measures CPU memory; use it with --device cpu.")
        if args.json and os.path.isdir(args.json):
            raise CliError(f"--json {args.json}: is a folder; give a file name.")
        config = backbone_config(args.backbone)
        rows = _bench(args, config, heads, size, device)
    except CliError as error:
        return report("bench", error)
    if args.json:
        from ..bench import write_json

        write_json(args.json, rows)
    return 0


def _bench(args, config, heads, size, device) -> list[dict]:
    import torch

    from ..bench import (
        BackboneOnly,
        build_model,
        gflops,
        measure_head,
        peak_training_memory_mb,
        prediction_cost,
        random_image,
    )

    if args.threads:
        torch.set_num_threads(args.threads)
    from ..modeling import ViTSegConfig

    for head in heads:  # every head's config is checked before anything is measured; models are built one by one
        try:
            ViTSegConfig(backbone_config=config, head=head, num_labels=args.num_labels)
        except ValueError as error:
            raise CliError(f"--heads {head}: {error}") from error
    first = build_model(config, heads[0], args.num_labels)
    divisor = first.size_divisor
    if size[0] % divisor or size[1] % divisor:
        raise CliError(f"--image-size {size[0]} {size[1]}: height and width must be multiples of {divisor} (the "
                       f"backbone's size divisor), e.g. {max(divisor, size[0] // divisor * divisor)}.")
    channels = first.backbone.num_channels
    pixel_values = torch.randn(args.batch_size, channels, *size, device=device)
    reference = BackboneOnly(first).to(device)
    reference_optimizer = torch.optim.AdamW(reference.parameters(), lr=1e-4)
    reference_flops = gflops(reference, pixel_values)
    spec = {"config": config.to_dict(), "num_labels": args.num_labels}

    def memory_of(head: str | None) -> float:  # head None: the backbone alone
        return peak_training_memory_mb("hf_vitseg.bench:model_from_spec", json.dumps({**spec, "head": head}),
                                       tuple(pixel_values.shape))

    reference_memory = memory_of(None) if args.memory else None

    print(f"backbone: {args.backbone} ({config.model_type}), input {size[0]}x{size[1]}, batch {args.batch_size}, "
          f"{args.num_labels} classes, {device}, {torch.get_num_threads()} threads, median of {args.repeats}")
    header = f"{'head':<12}{'params M':>9}{'GFLOPs':>9}{'fwd x':>8}{'train x':>9}"
    header += f"{'mem x':>8}" if args.memory else ""
    header += "" if args.no_prediction else f"{'proc ms':>9}{'model ms':>10}{'post ms':>9}{'post/fwd':>10}"
    print(header)
    rows = []
    for position, head in enumerate(heads):
        model = (first if position == 0 else build_model(config, head, args.num_labels)).to(device)
        row = {"head": head}
        row.update(measure_head(model, reference, pixel_values, repeats=args.repeats,
                                reference_optimizer=reference_optimizer, reference_gflops=reference_flops))
        line = f"{head:<12}{row['head_params_m']:>9}{row['gflops']:>9}{row['forward_ratio']:>8}" \
               f"{row['train_step_ratio']:>9}"
        if args.memory:
            row["memory_ratio"] = round(memory_of(head) / reference_memory, 2)
            line += f"{row['memory_ratio']:>8}"
        if not args.no_prediction:
            from ..modeling import ViTSegImageProcessor

            processor = ViTSegImageProcessor.for_model(model, check_labels=False)
            cost = prediction_cost(model, processor, random_image(size, channels), repeats=args.repeats)
            row.update({key: round(value, 4) for key, value in cost.items()})
            line += f"{cost['processor_s'] * 1e3:>9.1f}{cost['model_s'] * 1e3:>10.1f}" \
                    f"{cost['post_process_s'] * 1e3:>9.1f}{cost['post_process_ratio']:>10.3f}"
        rows.append(row)
        print(line, flush=True)
        del model
        first = None  # the reference keeps the first model's backbone alone
    memory = f", peak training-step memory {reference_memory:.0f} MB" if reference_memory else ""
    print(f"backbone alone: {reference_flops:.1f} GFLOPs{memory}")
    if not args.no_prediction:
        print("prediction: one image of --image-size through the processor, the model (batch 1) and "
              "post_process_semantic_segmentation; post/fwd = post-processing / model forward. The heads have "
              "random weights, whose flat logits are post-processing's hard case (about 6 of 150 classes can win each "
              "band of rows); a trained model's leave 1-2 and cost less (benchmarks/postprocess.py)")
    return rows
