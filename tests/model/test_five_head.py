"""Model and backbone tests on a randomly initialised ViT-S/14 at tiny image sizes (CPU, seconds)."""
from __future__ import annotations

import hashlib
import socket

import pytest
import torch
from safetensors.torch import save_file
from timm.layers import resample_abs_pos_embed

from biomass5head.fileio import file_sha256
from biomass5head.model import backbone as backbone_mod
from biomass5head.model.backbone import WeightsUnavailable, create_backbone
from biomass5head.model.five_head import FiveHeadModel, describe

NAME = "vit_small_patch14_reg4_dinov2.lvd142m"
B, T, S = 2, 4, 28


def make_model(**kwargs) -> FiveHeadModel:
    torch.manual_seed(0)
    return FiveHeadModel(create_backbone(NAME, S, pretrained=False), **kwargs)


def views(b: int = B, t: int = T, s: int = S) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return torch.randn(b, t, 3, s, s, generator=g), torch.randn(b, t, 3, s, s, generator=g)


def backbone_state(model: FiveHeadModel) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.backbone.state_dict().items()}


def test_forward_backward_shapes_and_finite():
    model = make_model()
    out = model(*views())
    assert set(out) == {"reg"}
    assert out["reg"].shape == (B, 5)
    assert torch.isfinite(out["reg"]).all() and (out["reg"] >= 0).all()
    out["reg"].sum().backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert model.backbone.patch_embed.proj.weight.grad.abs().sum() > 0


def test_all_tiles_in_one_backbone_call(monkeypatch):
    model = make_model()
    calls = []
    original = model.backbone.forward_features

    def spy(x):
        calls.append(x.shape[0])
        return original(x)

    monkeypatch.setattr(model.backbone, "forward_features", spy)
    model(*views())
    assert calls == [2 * B * T]


def test_left_and_right_tiles_reach_their_own_view():
    model = make_model(use_film=False, attention_pool=False).eval()
    left, right = views()
    seen = {}
    original = model.forward_features

    def capture(lf, rf):
        seen["lf"], seen["rf"] = lf, rf
        return original(lf, rf)

    model.forward_features = capture
    with torch.no_grad():
        model(left, right)
        assert torch.allclose(seen["lf"][1, 2], model.encode(left[1, 2:3])[0], atol=1e-5)
        assert torch.allclose(seen["rf"][0, 3], model.encode(right[0, 3:4])[0], atol=1e-5)


def test_no_film_and_mean_pool_remove_parameters():
    names = {n for n, _ in make_model().named_parameters()}
    assert any(n.startswith("film.") for n in names) and any(n.startswith("pool.") for n in names)
    names = {n for n, _ in make_model(use_film=False, attention_pool=False).named_parameters()}
    assert not any(n.startswith(("film.", "pool.")) for n in names)
    out = make_model(use_film=False, attention_pool=False)(*views())
    assert out["reg"].shape == (B, 5)


def test_film_identity_at_init_then_learns():
    model = make_model()
    lf, rf = torch.randn(B, T, model.feat_dim), torch.randn(B, T, model.feat_dim)
    assert torch.equal(model.film(lf, rf), lf)
    opt = torch.optim.SGD(model.film.parameters(), lr=0.1)
    model.forward_features(lf, rf)["reg"].sum().backward()
    assert model.film.mlp[-1].weight.grad.abs().sum() > 0  # zero-init layer still receives gradient
    opt.step()
    assert not torch.allclose(model.film(lf, rf), lf)


def test_attention_pool_is_a_convex_combination():
    model = make_model()
    x = torch.randn(B, T, model.feat_dim)
    same = x[:, :1].expand(B, T, model.feat_dim)
    assert torch.allclose(model.pool(same), same[:, 0], atol=1e-5)
    assert model.pool(x).shape == (B, model.feat_dim)


def test_aux_heads_shapes():
    model = make_model(use_aux_heads=True)
    out = model(*views())
    assert out["reg"].shape == (B, 5)
    assert out["state"].shape == (B, 4) and out["month"].shape == (B, 10) and out["species"].shape == (B, 8)
    sum(v.sum() for v in out.values()).backward()
    assert model.aux_heads["species"][-1].weight.grad is not None


def test_frozen_backbone_is_untouched_and_stays_in_eval():
    model = make_model(dropout=0.1)
    model.set_backbone_trainable(False)
    model.train()
    assert not model.backbone_trainable
    assert not model.backbone.training and model.proj.training
    before = backbone_state(model)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    out = model(*views())
    out["reg"].sum().backward()
    opt.step()
    assert all(p.grad is None for p in model.backbone_parameters())
    after = model.backbone.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert any(p.grad is not None for p in model.head_parameters())
    model.set_backbone_trainable(True)
    assert model.backbone.training and all(p.requires_grad for p in model.backbone_parameters())


def test_parameter_groups_and_describe():
    model = make_model(use_aux_heads=True)
    head_ids = {id(p) for p in model.head_parameters()}
    backbone_ids = {id(p) for p in model.backbone_parameters()}
    assert not head_ids & backbone_ids
    assert head_ids | backbone_ids == {id(p) for p in model.parameters()}
    text = describe(model)
    assert "total" in text and "backbone" in text and "heads" in text
    model.set_backbone_trainable(False)
    assert "frozen" in describe(model)


def test_grad_checkpointing_reaches_timm():
    model = make_model(grad_ckpt=True).train()
    assert model.backbone.grad_checkpointing is True
    model(*views())["reg"].sum().backward()
    assert model.backbone.blocks[0].attn.qkv.weight.grad is not None


def test_img_size_must_be_multiple_of_patch():
    with pytest.raises(ValueError, match="--img-size"):
        create_backbone(NAME, 30, pretrained=False)
    assert create_backbone(NAME, 56, pretrained=False).patch_embed.grid_size == (4, 4)


def test_non_register_dinov2_name():
    bb = create_backbone("vit_small_patch14_dinov2.lvd142m", S, pretrained=False)
    out = FiveHeadModel(bb)(*views(b=1, t=2))
    assert out["reg"].shape == (1, 5)


def test_unknown_backbone_name():
    with pytest.raises(ValueError, match="--backbone"):
        create_backbone("vit_no_such_model_patch14", S, pretrained=False)


# --- weights files -------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def reference_state() -> dict[str, torch.Tensor]:
    torch.manual_seed(3)
    bb = create_backbone(NAME, 42, pretrained=False)
    return {k: v.detach().clone().contiguous() for k, v in bb.state_dict().items()}


def assert_same_weights(model: torch.nn.Module, state: dict[str, torch.Tensor]) -> None:
    loaded = model.state_dict()
    assert set(loaded) == set(state)
    assert all(torch.equal(loaded[k], v) for k, v in state.items())


def to_dinov2_layout(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename a timm reg4 state dict the way facebookresearch/dinov2 stores it (what timm's filter undoes)."""
    out = dict(state)
    out["register_tokens"] = out.pop("reg_token")
    # DINOv2 keeps a position for the class token in pos_embed; timm folds it into cls_token. A zero position
    # keeps the round trip exact.
    pos = out.pop("pos_embed")
    out["pos_embed"] = torch.cat([torch.zeros_like(pos[:, :1]), pos], dim=1)
    out["mask_token"] = torch.zeros(1, pos.shape[-1])
    return out


@pytest.mark.parametrize("suffix", ["safetensors", "pth"])
def test_weights_file_timm_layout(tmp_path, reference_state, suffix):
    path = tmp_path / f"bb.{suffix}"
    save_file(reference_state, path) if suffix == "safetensors" else torch.save(reference_state, path)
    assert_same_weights(create_backbone(NAME, 42, weights_path=path), reference_state)
    resized = create_backbone(NAME, 28, weights_path=path)  # position embeddings resampled 3x3 -> 2x2
    expected = resample_abs_pos_embed(reference_state["pos_embed"], new_size=[2, 2], old_size=[3, 3],
                                      num_prefix_tokens=0)  # timm's own resampling; registers hold no positions
    torch.testing.assert_close(resized.pos_embed.detach(), expected, rtol=0, atol=1e-6)
    assert torch.equal(resized.blocks[1].mlp.fc1.weight, reference_state["blocks.1.mlp.fc1.weight"])


def test_weights_file_original_dinov2_layout(tmp_path, reference_state):
    path = tmp_path / "dinov2_vits14_reg4_pretrain.pth"
    orig = to_dinov2_layout(reference_state)
    assert "reg_token" not in orig and "mask_token" in orig
    torch.save(orig, path)
    assert_same_weights(create_backbone(NAME, 42, weights_path=path), reference_state)


def test_weights_file_original_dinov2_layout_no_registers(tmp_path):
    torch.manual_seed(4)
    name = "vit_small_patch14_dinov2.lvd142m"
    state = {k: v.clone() for k, v in create_backbone(name, 28, pretrained=False).state_dict().items()}
    path = tmp_path / "dinov2_vits14_pretrain.safetensors"
    save_file({**state, "mask_token": torch.zeros(1, state["cls_token"].shape[-1])}, path)
    assert_same_weights(create_backbone(name, 28, weights_path=path), state)


def test_weights_file_errors(tmp_path, reference_state):
    missing = tmp_path / "nope.safetensors"
    with pytest.raises(FileNotFoundError, match="nope.safetensors") as err:
        create_backbone(NAME, 28, weights_path=missing)
    assert "--backbone-weights" in str(err.value)
    wrong = tmp_path / "small.pth"
    torch.save(reference_state, wrong)
    with pytest.raises(ValueError, match="--backbone-weights") as err:
        create_backbone("vit_base_patch14_reg4_dinov2.lvd142m", 28, weights_path=wrong)
    assert "small.pth" in str(err.value)
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"not a weights file")
    with pytest.raises(ValueError, match="garbage.safetensors"):
        create_backbone(NAME, 28, weights_path=garbage)


def test_weights_digest(tmp_path):
    path = tmp_path / "w.bin"
    path.write_bytes(b"abc" * 1000)
    assert file_sha256(path)[:16] == hashlib.sha256(b"abc" * 1000).hexdigest()[:16]


# --- pretrained weights without a network ----------------------------------------------------------------------
@pytest.fixture
def empty_hf_home(tmp_path, monkeypatch):
    for var in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE", "HF_HUB_OFFLINE", "HF_ENDPOINT"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    return tmp_path / "hf"


def test_pretrained_offline_fails_fast(empty_hf_home, monkeypatch):
    """Offline, no connection is even attempted (a patched socket fails the test if one is)."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")

    def no_network(*a, **kw):
        raise AssertionError(f"network call {a} while HF_HUB_OFFLINE is set")

    monkeypatch.setattr(socket, "create_connection", no_network)
    monkeypatch.setattr(socket.socket, "connect", no_network)
    with pytest.raises(WeightsUnavailable) as err:
        create_backbone(NAME, 28, pretrained=True)
    for hint in ("--backbone-weights", "--no-pretrained", "import-imgfocus", "HF_HUB_OFFLINE"):
        assert hint in str(err.value)


def test_pretrained_unreachable_hub_fails_fast(empty_hf_home, monkeypatch):
    monkeypatch.setattr(backbone_mod, "_reachable", lambda host, **kw: False)
    with pytest.raises(WeightsUnavailable, match="--no-pretrained") as err:
        create_backbone(NAME, 28, pretrained=True)
    assert "huggingface.co" in str(err.value) and "--backbone-weights" in str(err.value)


def test_pretrained_from_hf_cache(empty_hf_home, monkeypatch, reference_state):
    """A model already in the Hugging Face cache loads with no network at all."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    repo = empty_hf_home / "hub" / f"models--timm--{NAME}"
    snapshot = repo / "snapshots" / "0123abc"
    snapshot.mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("0123abc")
    save_file(reference_state, snapshot / "model.safetensors")
    monkeypatch.setattr(backbone_mod, "_reachable", lambda host, **kw: pytest.fail("network probed"))
    assert_same_weights(create_backbone(NAME, 42, pretrained=True), reference_state)


def test_tile_weights_are_the_attention_pools_and_uniform_without_it():
    torch.manual_seed(0)
    lf, rf = torch.randn(3, 4, 384), torch.randn(3, 4, 384)
    model = make_model().eval()
    w = model.tile_weights(lf, rf)
    assert w.shape == (3, 2, 4)
    torch.testing.assert_close(w.sum(-1), torch.ones(3, 2))
    filmed = model.film(lf, rf)  # what the pool sees of the left view: FiLM-conditioned on the right one
    torch.testing.assert_close(w[:, 0], model.pool.weights(filmed)[..., 0])
    assert not torch.allclose(w[:, 0], torch.full((3, 4), 0.25))
    flat = make_model(attention_pool=False).eval().tile_weights(lf, rf)
    torch.testing.assert_close(flat, torch.full((3, 2, 4), 0.25))
