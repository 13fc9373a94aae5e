"""Plots of `benchmarks/accuracy.py` results: accuracy against training time, and test predictions per row.

    python benchmarks/plots.py benchmarks/results/accuracy.json              # PNGs beside the JSON
    python benchmarks/plots.py results.json --out-dir figures --window 384
    python benchmarks/plots.py frozen.json finetune.json --table             # merge runs, print their table

Per scale in the JSON it writes
- `accuracy_vs_time_<scale>x.png`: test foreground IoU against training seconds, one point per trained row
  (frozen heads, probes, fine-tuned and LoRA rows), error bars over seeds on both axes; Otsu and the
  patch-grid ceiling as horizontal lines;
- `predictions_<scale>x.png`: a window of the test half with its ground truth, then every row's seed-0
  prediction (from the `.npz` beside the JSON), each titled with its foreground IoU. Green: true positive,
  red: false positive, blue: missed foreground.

matplotlib only, with the Agg backend (no display needed).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import numpy as np

KIND_STYLE = {  # marker and colour per kind of row
    "frozen": ("o", "tab:blue"),
    "probe": ("s", "tab:gray"),
    "finetune": ("^", "tab:red"),
    "lora": ("D", "tab:purple"),
}


def _repo_on_path() -> None:
    """Make `benchmarks.*` importable when this file runs as a script."""
    root = str(Path(__file__).resolve().parent.parent)
    if root not in sys.path:
        sys.path.insert(0, root)


def _matplotlib():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def load_results(*json_paths: str | Path) -> tuple[dict, dict[str, np.ndarray]]:
    """The results JSON(s) and the predictions `.npz` beside each (none: no predictions). Several files (e.g. a
    frozen-head run and a `--finetune-only` run completing it, or a re-run of some rows) merge per scale: a row
    name seen before is replaced, in place, by the later file's row (and its predictions)."""
    merged, predictions = None, {}
    for json_path in map(Path, json_paths):
        results = json.loads(json_path.read_text())
        npz = json_path.with_suffix(".npz")
        if npz.is_file():
            with np.load(npz, allow_pickle=False) as data:
                predictions.update({key: data[key] for key in data.files})
        if merged is None:
            merged = results
            merged["commands"] = [results.get("command")]
            continue
        merged["commands"].append(results.get("command"))
        for scale, scale_results in results["scales"].items():
            target = merged["scales"].setdefault(scale, {**scale_results, "rows": []})
            position = {r["name"]: i for i, r in enumerate(target["rows"])}
            for row in scale_results["rows"]:
                if row["name"] in position:
                    target["rows"][position[row["name"]]] = row
                else:
                    target["rows"].append(row)
    return merged, predictions


def short_name(name: str) -> str:
    """A row name short enough to label a point: "upernet + full fine-tune, layer decay" -> "upernet FT"."""
    for long, short in ((" + full fine-tune, layer decay", " FT"), (" + LoRA", " LoRA"),
                        (" + connected components", " + CC"), (" (fine-tuned, layer decay)", ""),
                        (" (frozen backbone)", ""), ("Otsu + distance-transform watershed", "watershed"),
                        ("connected components of the true foreground (pixel heads' ceiling)",
                         "true foreground + CC (ceiling)")):
        name = name.replace(long, short)
    return name


def plot_accuracy_vs_time(scale_results: dict, scale: str, path: Path, backbone: str = "") -> Path:
    """Foreground IoU vs training seconds, one point per trained row with error bars over seeds."""
    plt = _matplotlib()
    fig, ax = plt.subplots(figsize=(7.5, 5), dpi=110)
    rows = [r for r in scale_results["rows"] if "fg_iou_mean" in r]
    points = []
    for row in rows:
        if row["kind"] in ("baseline", "ceiling"):
            style = "--" if row["kind"] == "ceiling" else ":"
            ax.axhline(row["fg_iou_mean"], color="black", linestyle=style, linewidth=1)
            ax.annotate(f"{row['name']} {row['fg_iou_mean']:.3f}", (0.01, row["fg_iou_mean"]),
                        xycoords=("axes fraction", "data"), va="bottom", fontsize=8)
            continue
        marker, colour = KIND_STYLE.get(row["kind"], ("x", "black"))
        x = max(row.get("train_seconds_mean", 0.0), 1e-2)
        ax.errorbar(x, row["fg_iou_mean"], xerr=row.get("train_seconds_std", 0.0), yerr=row.get("fg_iou_std", 0.0),
                    fmt=marker, color=colour, capsize=3, markersize=6)
        points.append((x, row["fg_iou_mean"], short_name(row["name"])))
    # labels of points that lie close together alternate above and below them
    for i, (x, y, label) in enumerate(sorted(points, key=lambda p: (p[1], p[0]))):
        ax.annotate(label, (x, y), textcoords="offset points", xytext=(5, 4 if i % 2 else -10), fontsize=7,
                    annotation_clip=True)
    ax.set_xscale("log")
    if points:
        xs = [p[0] for p in points]
        ax.set_xlim(min(xs) / 1.5, max(xs) * 2.5)
    from matplotlib.ticker import LogLocator, NullFormatter, ScalarFormatter

    ax.xaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
    ax.xaxis.set_major_formatter(ScalarFormatter())
    ax.xaxis.set_minor_formatter(NullFormatter())
    ax.set_xlabel("training time, seconds (log; frozen rows train on cached backbone features; FT = full "
                  "fine-tune with layer decay)", fontsize=8)
    ax.set_ylabel("test foreground IoU (right half)")
    seeds = max((len(r["runs"]) for r in rows if r["kind"] == "frozen"), default=1)
    short = backbone.split(" (")[0] or "ViT-S/14"  # the description's name, without its notes
    ax.set_title(f"Nuclei at {scale}x, {short}, frozen unless marked; mean ± std over {seeds} seed(s)", fontsize=9)
    handles = [plt.Line2D([], [], marker=m, color=c, linestyle="", label=k) for k, (m, c) in KIND_STYLE.items()
               if any(r["kind"] == k for r in rows)]
    if handles:
        ax.legend(handles=handles, loc="lower right", fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def error_overlay(gray: np.ndarray, prediction: np.ndarray, truth: np.ndarray) -> np.ndarray:
    """RGB uint8: the image in gray, true positives green, false positives red, missed foreground blue."""
    rgb = np.repeat(gray[..., None].astype(np.float32), 3, axis=-1) * 0.6
    prediction, truth = prediction > 0, truth > 0
    for selector, colour in ((prediction & truth, (40, 200, 40)), (prediction & ~truth, (230, 40, 40)),
                             (~prediction & truth, (40, 90, 255))):
        rgb[selector] = 0.4 * rgb[selector] + 0.6 * np.array(colour, np.float32)
    return rgb.clip(0, 255).astype(np.uint8)


def test_image(scale: str, region: int | None = None) -> np.ndarray:
    """The test half as `benchmarks/accuracy.py` saw it, uint8 (rebuilt: the split is deterministic)."""
    _repo_on_path()
    from benchmarks.data import nuclei_split

    return (nuclei_split(float(scale), region=region).test_image * 255).round().astype(np.uint8)


def central_window(image: np.ndarray, truth: np.ndarray, scale: str, window: int) -> tuple[slice, slice]:
    """The central `window` x `window` crop (or less) of the test half, after checking that `image` and the saved
    ground truth `truth` have the same shape."""
    if image.shape != truth.shape:
        raise ValueError(f"The test image at {scale}x is {image.shape} but the saved ground truth {truth.shape}; "
                         "were the results made from other data?")
    height, width = truth.shape
    size_h, size_w = min(window, height), min(window, width)
    top, left = (height - size_h) // 2, (width - size_w) // 2
    return slice(top, top + size_h), slice(left, left + size_w)


def save_panel_grid(panels: list[tuple[np.ndarray, str]], title: str, path: Path, dpi: int = 80,
                    fontsize: float = 7) -> Path:
    """Images (gray or RGB) with their titles, five to a row, and a title over them, saved as `path`."""
    plt = _matplotlib()
    columns = min(5, len(panels))
    grid_rows = math.ceil(len(panels) / columns)
    fig, axes = plt.subplots(grid_rows, columns, figsize=(2.3 * columns, 2.8 * grid_rows), dpi=dpi, squeeze=False)
    for ax in axes.ravel():
        ax.axis("off")
    for ax, (panel, panel_title) in zip(axes.ravel(), panels):
        ax.imshow(panel, cmap="gray" if panel.ndim == 2 else None, interpolation="nearest")
        ax.set_title(panel_title, fontsize=fontsize)
    fig.suptitle(title, fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def plot_predictions(scale_results: dict, scale: str, predictions: dict[str, np.ndarray], path: Path,
                     window: int = 256, region: int | None = None) -> Path | None:
    """A grid: the test window, its ground truth, then every row's prediction (seed 0) with its fg IoU."""
    truth = predictions.get(f"{scale}|truth")
    if truth is None:
        return None
    image = test_image(scale, region)
    crop = central_window(image, truth, scale, window)
    rows = [r for r in scale_results["rows"] if f"{scale}|{r['name']}" in predictions and "fg_iou_mean" in r]
    panels = [(image[crop], "test window"), (error_overlay(image[crop], truth[crop], truth[crop]), "ground truth")]
    panels += [(error_overlay(image[crop], predictions[f"{scale}|{r['name']}"][crop], truth[crop]),
                f"{r['name']}\nfg IoU {r['runs'][0]['fg_iou']:.3f}") for r in rows]
    size_h, size_w = image[crop].shape
    return save_panel_grid(panels, f"Test half at {scale}x, central {size_h}x{size_w} window (seed 0). "
                           "green: correct, red: false positive, blue: missed", path)


def make_plots(json_paths, out_dir: str | Path | None = None, window: int = 256) -> list[Path]:
    """Every PNG for every scale in the results (one JSON path or several to merge); returns their paths."""
    json_paths = [json_paths] if isinstance(json_paths, (str, Path)) else list(json_paths)
    results, predictions = load_results(*json_paths)
    out_dir = Path(out_dir) if out_dir else Path(json_paths[0]).parent
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for scale, scale_results in results["scales"].items():
        written.append(plot_accuracy_vs_time(scale_results, scale, out_dir / f"accuracy_vs_time_{scale}x.png",
                                             results.get("backbone", "")))
        grid = plot_predictions(scale_results, scale, predictions, out_dir / f"predictions_{scale}x.png", window,
                                region=results.get("settings", {}).get("region"))
        if grid is not None:
            written.append(grid)
    return written


INSTANCE_KIND_COLOURS = {"watershed": "tab:gray", "ceiling": "black", "semantic": "tab:blue", "eomt": "tab:red",
                         "pmt": "tab:purple"}


def plot_instance_pq(rows: list[dict], scale: str, path: Path) -> Path:
    """`benchmarks/instances.py` rows as horizontal bars: mean PQ ± std over seeds, each seed's PQ a dot, AP50 a
    cross; the watershed's PQ a dashed line."""
    plt = _matplotlib()
    rows = [r for r in rows if "pq_mean" in r]
    fig, ax = plt.subplots(figsize=(8, 0.42 * len(rows) + 1.4), dpi=110)
    for y, row in enumerate(rows):
        colour = INSTANCE_KIND_COLOURS.get(row["kind"], "black")
        ax.barh(y, row["pq_mean"], xerr=row["pq_std"], color=colour, alpha=0.55, capsize=3)
        ax.plot([run["pq"] for run in row["runs"]], [y] * len(row["runs"]), "o", color=colour, markersize=3)
        if "ap50_mean" in row:
            ax.plot(row["ap50_mean"], y, "x", color="black", markersize=5)
        ax.annotate(f"{row['pq_mean']:.3f} ({len(row['runs'])} seed{'s' if len(row['runs']) > 1 else ''})",
                    (0.005, y), xycoords=("axes fraction", "data"), va="center", fontsize=7, color="white")
        if row["kind"] == "watershed":
            ax.axvline(row["pq_mean"], color="black", linestyle="--", linewidth=1)
    ax.set_yticks(range(len(rows)), [short_name(r["name"]) for r in rows], fontsize=7)
    ax.invert_yaxis()
    ax.set_xlim(0, 1)
    ax.set_xlabel("panoptic quality of the nuclei on the test half (bar: mean ± std; dots: seeds; x: AP50; "
                  "dashed: watershed)", fontsize=8)
    ax.set_title(f"Instance segmentation of the nuclei at {scale}x", fontsize=9)
    ax.grid(axis="x", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def plot_instance_maps(rows: list[dict], scale: str, maps: dict[str, np.ndarray], image: np.ndarray, path: Path,
                       window: int = 256) -> Path | None:
    """A grid: a window of the test half `image` (float in [0, 1] or uint8), its true nuclei, then each row's
    instances (its first seed), every instance in its own colour with its contour
    (`hf_vitseg.inference.overlay_instances`), titled with that seed's PQ on the whole test half."""
    from hf_vitseg.inference import overlay_instances

    truth = maps.get("truth")
    if truth is None:
        return None
    if image.dtype != np.uint8:
        image = (np.clip(image, 0, 1) * 255).round().astype(np.uint8)
    crop = central_window(image, truth, scale, window)
    panels = [(image[crop], "test window"),
              (np.asarray(overlay_instances(image[crop], truth[crop])), f"ground truth ({int(truth.max())} nuclei)")]
    for row in rows:
        if row["name"] in maps and "pq_mean" in row:
            seed = row["runs"][0].get("seed")
            panels.append((np.asarray(overlay_instances(image[crop], maps[row["name"]][crop])),
                           f"{short_name(row['name'])}\nPQ {row['runs'][0]['pq']:.3f}"
                           + (f" (seed {seed})" if seed is not None else "")))
    size_h, size_w = image[crop].shape
    return save_panel_grid(panels, f"Test half at {scale}x, central {size_h}x{size_w} window: one colour per instance",
                           path, dpi=90, fontsize=6.5)

def main(argv: list[str] | None = None) -> list[Path]:
    parser = argparse.ArgumentParser(description="PNGs from benchmarks/accuracy.py results.")
    parser.add_argument("json", nargs="+", help="--json file(s) of benchmarks/accuracy.py (several are merged)")
    parser.add_argument("--out-dir", default=None, help="where the PNGs go (default: beside the JSON)")
    parser.add_argument("--window", type=int, default=256, help="side of the test window shown in the grid")
    parser.add_argument("--table", action="store_true", help="also print the (merged) markdown table")
    args = parser.parse_args(argv)
    for path in args.json:
        if not Path(path).is_file():
            raise SystemExit(f"{path} does not exist; run benchmarks/accuracy.py --json {path} first.")
    written = make_plots(args.json, args.out_dir, args.window)
    if args.table:
        _repo_on_path()
        from benchmarks.accuracy import check_targets, format_table

        results, _ = load_results(*args.json)
        for scale, scale_results in results["scales"].items():
            print(format_table(scale_results["rows"], float(scale)) + "\n")
            for target in check_targets(scale_results["rows"]):
                print(f"- {'met' if target['met'] else 'MISSED'}: {target['target']} ({target['evidence']})")
            print()
    for path in written:
        print(f"wrote {path} ({path.stat().st_size / 1024:.0f} KB)")
    return written


if __name__ == "__main__":
    main()
