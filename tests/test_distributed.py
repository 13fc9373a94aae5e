"""Multi-process training: `accelerate launch` starts two CPU processes (gloo) running
`examples/accelerate_train.py` (the plain Accelerate loop); both end with identical weights, equal to one process
trained on the same global batch.

Why the equality is exact in theory (and only float rounding separates the runs): two processes with 2 images
each average their gradients (DDP), one process with 4 images averages over all 4. The two agree when
- the loss of each process is a mean over the same number of pixels: every crop is 32x32 from an image scaled by
  at least 1 (no padding) and the masks hold no `ignore_index`, so each process's 2 images carry 2048 labelled
  pixels and the mean of the two per-process means is the mean over all 4 images;
- nothing normalises with batch statistics: the DINOv2 backbone uses LayerNorm only and the head is a plain 1x1
  classifier (`BatchNormFreeLinearHead` below, registered like any user's head); the built-in `linear` head's
  BatchNorm would normalise over 2 images per process against 4 in one process;
- nothing random differs: no dropout or drop-path (all 0 in the tiny config and the head), the same seeded
  data order (a process takes every other batch of 2 from the shuffled order, one process takes them 4 at a
  time), and the seeded augmentation gives each sample the same crop, flip and jitter whichever process loads it.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import save_tiny_backbone
from test_train import make_image_folder

from hf_vitseg import BaseHead, register_head

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "accelerate_train.py"
TIMEOUT_S = 300


@register_head("batch_norm_free_linear")
class BatchNormFreeLinearHead(BaseHead):
    """A 1x1 conv classifier on the last tap: the `linear` head without its BatchNorm."""

    def __init__(self, in_channels, in_strides, num_labels, num_prefix_tokens=0):
        super().__init__(in_channels, in_strides, num_labels, num_prefix_tokens, channels=None, dropout=0.0,
                         input_transform=None)
        self.build_classifier(self.selected_channels)

    def forward(self, features):
        return self.classify(self.select_inputs(features.feature_maps))


def worker(argv: list[str]) -> None:
    """Run the example with the arguments after --out DIR, then save this process's weights to DIR/rank<i>.*"""
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    args, example_argv = parser.parse_known_args(argv)
    spec = importlib.util.spec_from_file_location("accelerate_train", EXAMPLE)
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    accelerator, model, metrics = example.main(example_argv)

    from safetensors.torch import save_file

    out, rank = Path(args.out), accelerator.process_index
    out.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous().clone() for k, v in model.state_dict().items()}
    save_file(state, out / f"rank{rank}.safetensors")
    backend = torch.distributed.get_backend() if torch.distributed.is_initialized() else None
    info = {"num_processes": accelerator.num_processes, "backend": backend, "metrics": metrics}
    (out / f"rank{rank}.json").write_text(json.dumps(info))


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _run(command: list[str]) -> None:
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).parent)}
    result = subprocess.run(command, capture_output=True, text=True, timeout=TIMEOUT_S, env=env)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]


def _load(out: Path, rank: int) -> tuple[dict[str, torch.Tensor], dict]:
    from safetensors.torch import load_file

    return load_file(out / f"rank{rank}.safetensors"), json.loads((out / f"rank{rank}.json").read_text())


@pytest.mark.slow
def test_two_gloo_processes_agree_and_match_one_process_with_the_global_batch(tmp_path):
    from transformers import AutoModelForSemanticSegmentation, set_seed

    from hf_vitseg import ViTSegForSemanticSegmentation

    backbone = save_tiny_backbone(tmp_path / "backbone")
    train_images, train_masks = make_image_folder(tmp_path / "train", 8, seed=0)
    eval_images, eval_masks = make_image_folder(tmp_path / "eval", 3, seed=1)  # shards of 2 and 1 images
    common = [
        "--backbone", str(backbone), "--head", "batch_norm_free_linear", "--num-labels", "3",
        "--train-images", str(train_images), "--train-masks", str(train_masks),
        "--eval-images", str(eval_images), "--eval-masks", str(eval_masks),
        "--crop-size", "32", "--scale-range", "1.0", "1.5", "--max-steps", "3", "--lr", "1e-3", "--seed", "3",
        "--logging-steps", "1", "--cpu",
    ]
    two, one = tmp_path / "two", tmp_path / "one"
    _run([
        sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
        "--num_machines", "1",
        "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(_free_port()),
        __file__, "--out", str(two), "--batch-size", "2", "--output-dir", str(two / "model"), *common,
    ])
    _run([sys.executable, __file__, "--out", str(one), "--batch-size", "4", *common])

    rank0, info0 = _load(two, 0)
    rank1, info1 = _load(two, 1)
    single, info_single = _load(one, 0)
    assert (info0["num_processes"], info0["backend"]) == (2, "gloo")
    assert info_single["num_processes"] == 1

    # Both processes hold the same weights, bit for bit (DDP applies the same averaged gradients).
    assert rank0.keys() == rank1.keys() == single.keys()
    for name in rank0:
        assert torch.equal(rank0[name], rank1[name]), name

    # They equal one process trained on the same global batch, far closer than training moved them.
    set_seed(3)
    initial = ViTSegForSemanticSegmentation.from_pretrained_backbone(
        backbone, head="batch_norm_free_linear", num_labels=3
    ).state_dict()
    moved = max((single[k] - initial[k]).abs().max().item() for k in single)
    difference = max((rank0[k] - single[k]).abs().max().item() for k in single)
    assert moved > 1e-3, moved
    assert difference < 1e-5, (difference, moved)

    # Evaluation shards the 3 images over the processes and sums their confusion matrices: same metrics.
    for key in ("eval_mean_iou", "eval_pixel_accuracy"):
        assert info0["metrics"][key] == info1["metrics"][key] == pytest.approx(info_single["metrics"][key], abs=1e-6)
    assert info0["metrics"]["train_loss"] == pytest.approx(info_single["metrics"]["train_loss"], abs=1e-5)

    # The example saved the model once (main process), loadable with the Auto classes.
    saved = AutoModelForSemanticSegmentation.from_pretrained(two / "model").state_dict()
    for name in rank0:
        assert torch.equal(saved[name], rank0[name]), name


if __name__ == "__main__":
    worker(sys.argv[1:])
