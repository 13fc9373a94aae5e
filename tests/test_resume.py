"""Fault tolerance: a training run killed with SIGKILL mid-epoch resumes from its last complete checkpoint and
ends with the same weights as an uninterrupted run with the same seed.

The runs are subprocesses of this file (`python tests/test_resume.py ...`, see `worker`), so the kill is a real
SIGKILL of a real process: nothing is flushed, no handler runs. Training uses the seeded augmentation (random
scale, crop, flip, colour jitter), so the resumed run must also get the data order, the position inside the
epoch and each sample's augmentation right, not only the weights, optimizer and scheduler.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import save_tiny_backbone, tiny_model
from test_train import make_image_folder

# 6 images in batches of 2: 3 steps per epoch; checkpoints every 2 steps. The kill comes at step 5, in the
# middle of the second epoch (steps 4-6), after checkpoint-4 (itself taken after the epoch's first batch).
STEPS, SAVE_STEPS, KILL_AT_STEP = 8, 2, 5
TIMEOUT_S = 240


def worker(argv: list[str]) -> None:
    """One training run; with --kill-at-step it announces that step in --ready-file and waits to be killed."""
    from transformers import TrainerCallback

    from hf_vitseg.data.datasets import load_image_folder
    from hf_vitseg.training import train

    parser = argparse.ArgumentParser()
    for flag in ("--backbone", "--images", "--masks", "--output-dir"):
        parser.add_argument(flag, required=True)
    parser.add_argument("--resume", action="store_true")
    parser.add_argument("--kill-at-step", type=int)
    parser.add_argument("--ready-file")
    args = parser.parse_args(argv)
    Path(args.output_dir).mkdir(parents=True, exist_ok=True)

    class Steps(TrainerCallback):
        """Records the steps this process trained; stops at --kill-at-step until the test kills it."""

        def __init__(self):
            self.trained = []

        def on_step_end(self, training_args, state, control, **kwargs):
            self.trained.append(state.global_step)
            Path(args.output_dir, "steps_trained.json").write_text(json.dumps(self.trained))
            if state.global_step == args.kill_at_step:
                Path(args.ready_file).write_text(str(state.global_step))
                time.sleep(TIMEOUT_S)  # killed here, checkpoint-4 complete on disk, step 5 done in memory only

    train(
        tiny_model(backbone=Path(args.backbone)), load_image_folder(args.images, args.masks),
        output_dir=args.output_dir,
        crop_size=16, max_steps=STEPS, batch_size=2, lr=1e-3, head_lr=1e-2, warmup_ratio=0.25, save_steps=SAVE_STEPS,
        logging_steps=1, seed=7, resume=args.resume, callbacks=[Steps()], use_cpu=True, disable_tqdm=True,
    )


def _command(assets: dict, output_dir: Path, *extra: str) -> list[str]:
    return [
        sys.executable, __file__, "--backbone", str(assets["backbone"]), "--images", str(assets["images"]),
        "--masks", str(assets["masks"]), "--output-dir", str(output_dir), *extra,
    ]


def _run(command: list[str]) -> None:
    result = subprocess.run(command, capture_output=True, text=True, timeout=TIMEOUT_S, env=_env())
    assert result.returncode == 0, result.stderr[-3000:]


def _env() -> dict:
    # same threads in every run: CPU kernels then reduce in the same order and the comparison can be tight
    return {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": "", "PYTHONPATH": str(Path(__file__).parent)}


def _weights(folder: Path) -> dict[str, torch.Tensor]:
    from transformers import AutoModelForSemanticSegmentation

    import hf_vitseg  # noqa: F401  (registers the model with the Auto classes)

    return AutoModelForSemanticSegmentation.from_pretrained(folder).state_dict()


@pytest.mark.slow
def test_sigkill_mid_epoch_then_resume_matches_an_uninterrupted_run(tmp_path):
    images, masks = make_image_folder(tmp_path / "data", 6)
    assets = {"backbone": save_tiny_backbone(tmp_path / "backbone"), "images": images, "masks": masks}
    killed_dir, reference_dir, ready = tmp_path / "killed", tmp_path / "reference", tmp_path / "ready"

    victim = subprocess.Popen(
        _command(assets, killed_dir, "--kill-at-step", str(KILL_AT_STEP), "--ready-file", str(ready)),
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=_env(),
    )
    try:
        deadline = time.monotonic() + TIMEOUT_S
        while not ready.exists():
            assert victim.poll() is None, f"the run ended before step {KILL_AT_STEP}: {victim.stderr.read()[-3000:]}"
            assert time.monotonic() < deadline, "the run never reached the kill step"
            time.sleep(0.2)
        victim.send_signal(signal.SIGKILL)
        victim.wait(timeout=30)
    finally:
        if victim.poll() is None:
            victim.kill()
    assert victim.returncode == -signal.SIGKILL

    # Killed mid-epoch: checkpoints 2 and 4 are complete, no final model; step 5 was trained but is lost.
    assert sorted(p.name for p in killed_dir.glob("checkpoint-*")) == ["checkpoint-2", "checkpoint-4"]
    assert not (killed_dir / "config.json").exists()
    assert json.loads((killed_dir / "steps_trained.json").read_text()) == [1, 2, 3, 4, 5]
    epoch_at_checkpoint = json.loads((killed_dir / "checkpoint-4" / "trainer_state.json").read_text())["epoch"]
    assert 1 < epoch_at_checkpoint < 2  # inside the second epoch
    # A kill during a save leaves a checkpoint folder without its trainer state: resume must pass it over.
    # (The model inside is complete or absent, save_pretrained moves it in whole; Trainer's own files may be cut.)
    (killed_dir / "checkpoint-6").mkdir()
    (killed_dir / "checkpoint-6" / "optimizer.pt").write_bytes(b"truncated")

    _run(_command(assets, killed_dir, "--resume"))
    assert json.loads((killed_dir / "steps_trained.json").read_text()) == [5, 6, 7, 8]  # resumed after step 4

    _run(_command(assets, reference_dir))
    assert json.loads((reference_dir / "steps_trained.json").read_text()) == list(range(1, STEPS + 1))

    resumed, reference = _weights(killed_dir), _weights(reference_dir)
    assert resumed.keys() == reference.keys()
    initial = tiny_model(backbone=assets["backbone"]).state_dict()
    assert any(not torch.equal(reference[k], initial[k]) for k in reference if k.startswith("backbone."))
    for name in reference:
        torch.testing.assert_close(resumed[name], reference[name], rtol=0, atol=1e-6, msg=name)


if __name__ == "__main__":
    worker(sys.argv[1:])
