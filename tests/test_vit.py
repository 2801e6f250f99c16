"""The path ViT: layout and counts, parity with timm, no-copy sharing, backward stop, roots, FLOPs."""
from __future__ import annotations

import dataclasses
import math
import os
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch

import agents  # noqa: F401  (before timm)
import timm
from safetensors.torch import save_file
from timm.layers import resample_abs_pos_embed
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from agents.roots import (CheckpointError, root_from_timm_checkpoint, root_random, timm_state_dict)
from agents.vit import (VIT_CONFIGS, PathModel, adapter_ids, component_names, count_flops, count_params,
                        init_component, param_shapes, resize_posemb, vit_config)

TI3 = vit_config("ti", depth=3)


def hparams(layers: int = 3, size: int = 32, classes: int = 2, adapters: str = "", adapter_dim: int = 16) -> dict:
    return dict(num_layers=layers, adapter_layers=adapters, adapter_dim=adapter_dim, ds_image_size=size,
                num_classes=classes)


def random_params(cfg, hp, seed: int = 0, noise: float = 0.05) -> dict:
    """Fresh components plus noise everywhere, so that zero-initialised heads/biases/adapters are
    exercised too (a zero head would make every output comparison trivially true)."""
    gen = torch.Generator().manual_seed(seed)
    params = {}
    for name in component_names(hp):
        fresh = init_component(name, cfg, hp, gen)
        params[name] = {t: v + noise * torch.randn(v.shape, generator=gen) for t, v in fresh.items()}
    return params


def images(batch: int, size: int, seed: int = 1) -> torch.Tensor:
    return torch.rand(batch, 3, size, size, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def timm_vit(layers: int, size: int, classes: int) -> torch.nn.Module:
    return timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=size, num_classes=classes,
                             depth=layers, class_token=True, global_pool="token", act_layer="gelu_tanh").eval()


# ---------------------------------------------------------------------------------------------- layout


def test_component_names_follow_forward_order_and_skip_unreachable_adapters():
    hp = hparams(layers=3, adapters="2_0_7")
    assert adapter_ids(hp) == [0, 2, 7]
    assert component_names(hp) == ["cls", "embedding", "posembed_input", "residual_adapter_0", "encoderblock_0",
                                   "encoderblock_1", "residual_adapter_2", "encoderblock_2", "encoder_norm", "head"]
    assert component_names(hparams(layers=0)) == ["cls", "embedding", "posembed_input", "encoder_norm", "head"]
    with pytest.raises(ValueError, match="adapter_layers"):
        adapter_ids(hparams(adapters="0-2"))
    with pytest.raises(ValueError, match="multiple of the patch"):
        param_shapes("posembed_input", TI3, hparams(size=40))


def test_param_counts_match_the_method_reference_sizes():
    # docs/method.md 3.7: P_ref of T3 (Ti/16, 3 layers, 32 px, 2 classes) and of B (B/16, 2x2 grid, 2 classes).
    assert sum(count_params(TI3, hparams()).values()) == 1_484_162
    b = VIT_CONFIGS["b"]
    assert sum(count_params(b, hparams(layers=12)).values()) == 85_652_738
    with_adapter = count_params(TI3, hparams(adapters="1", adapter_dim=32))
    assert with_adapter["residual_adapter_1"] == 2 * 192 + 192 * 32 + 32 + 32 * 192 + 192


def test_fresh_init_follows_the_vit_jax_defaults():
    gen = torch.Generator().manual_seed(0)
    hp = hparams(adapters="0", adapter_dim=32)
    block = init_component("encoderblock_0", TI3, hp, gen)
    bound = math.sqrt(6 / (192 + 192))  # q, k, v are separate D x D kernels in flax
    assert block["attn.qkv.weight"].abs().max() <= bound
    assert block["attn.qkv.weight"].std() == pytest.approx(bound / math.sqrt(3), rel=0.02)
    assert torch.count_nonzero(block["attn.qkv.bias"]) == 0 and torch.count_nonzero(block["attn.proj.bias"]) == 0
    assert 0 < block["mlp.fc1.bias"].std() < 1e-5
    assert torch.equal(block["norm1.weight"], torch.ones(192)) and torch.count_nonzero(block["norm2.bias"]) == 0
    adapter = init_component("residual_adapter_0", TI3, hp, gen)
    assert adapter["down.weight"].abs().max() <= 2 / math.sqrt(192) / 0.8796 + 1e-6  # truncated at 2 sigma
    assert adapter["down.weight"].std() == pytest.approx(1 / math.sqrt(192), rel=0.05)
    assert torch.count_nonzero(adapter["up.weight"]) == 0 and torch.count_nonzero(adapter["up.bias"]) == 0
    assert all(torch.count_nonzero(v) == 0 for v in init_component("head", TI3, hp, gen).values())
    assert torch.count_nonzero(init_component("cls", TI3, hp, gen)["token"]) == 0
    posemb = init_component("posembed_input", TI3, hparams(size=112), gen)["pos_embedding"]
    assert posemb.shape == (1, 50, 192) and posemb.std() == pytest.approx(0.02, rel=0.1)
    again = init_component("encoderblock_0", TI3, hp, torch.Generator().manual_seed(0))
    assert torch.equal(again["mlp.fc2.weight"], block["mlp.fc2.weight"])


# ---------------------------------------------------------------------------------------------- parity


@pytest.mark.parametrize("layers", [0, 1, 3])
@pytest.mark.parametrize("size", [32, 48])
def test_path_model_equals_timm_vision_transformer(layers, size):
    hp = hparams(layers=layers, size=size, classes=5)
    params = random_params(TI3, hp, seed=layers * 100 + size)
    ours = PathModel(TI3, hp, params, trainable={"encoder_norm", "head"})
    reference = timm_vit(layers, size, 5)
    assert all(m.eps == 1e-6 for m in reference.modules() if isinstance(m, torch.nn.LayerNorm))
    reference.load_state_dict(timm_state_dict(params, hp), strict=True)
    x = images(4, size)
    with torch.no_grad():
        expected = reference(x)
        got = ours(x)
    assert expected.abs().max() > 0.1  # a meaningful comparison, not zeros against zeros
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ours.forward_features(x), reference.forward_head(reference.forward_features(x),
                                                                                pre_logits=True))
    assert len(ours.blocks) == layers


def test_fresh_adapter_is_exactly_the_identity():
    base_hp = hparams(layers=3)
    params = random_params(TI3, base_hp, seed=3)
    x = images(4, 32)
    before = PathModel(TI3, base_hp, params, trainable={"head"})(x)
    adapted_hp = hparams(layers=3, adapters="0_2", adapter_dim=8)
    gen = torch.Generator().manual_seed(9)
    for i in (0, 2):
        params[f"residual_adapter_{i}"] = init_component(f"residual_adapter_{i}", TI3, adapted_hp, gen)
    after = PathModel(TI3, adapted_hp, params, trainable={"residual_adapter_0", "residual_adapter_2", "head"})(x)
    assert before.abs().max() > 0.1 and torch.equal(before, after)


# ---------------------------------------------------------------------------------------------- sharing


def _sgd_steps(model: PathModel, x: torch.Tensor, steps: int = 2) -> None:
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    target = torch.arange(x.shape[0]) % model.hparams["num_classes"]
    for _ in range(steps):
        optimizer.zero_grad()
        torch.nn.functional.cross_entropy(model(x), target).backward()
        optimizer.step()


@pytest.mark.parametrize("layers", [0, 3])
def test_training_writes_into_trainable_tensors_and_never_touches_frozen_ones(layers):
    hp = hparams(layers=layers)
    params = random_params(TI3, hp, seed=4)
    trainable = {"encoder_norm", "head"} | ({"encoderblock_2"} if layers else {"posembed_input"})
    frozen = [n for n in component_names(hp) if n not in trainable]
    before = {(c, t): v.clone() for c in params for t, v in params[c].items()}
    model = PathModel(TI3, hp, params, trainable)
    # Only trainable tensors are registered; they share the caller's storage.
    assert {n.split(".")[0] for n, _ in model.named_parameters()} <= {"encoder_norm", "head", "posembed_input",
                                                                        "blocks"}
    assert len(list(model.parameters())) == sum(len(params[c]) for c in trainable) == len(model.state_dict())
    for (component, tensor_name), param in model.trainable_tensors().items():
        assert param.data_ptr() == params[component][tensor_name].data_ptr()
    _sgd_steps(model, images(8, 32))
    for component in frozen:
        for tensor_name, tensor in params[component].items():
            assert tensor.grad is None and not tensor.requires_grad
            assert torch.equal(tensor, before[(component, tensor_name)]), (component, tensor_name)
    for component in trainable:
        changed = [not torch.equal(v, before[(component, t)]) for t, v in params[component].items()]
        assert any(changed), component  # the optimizer wrote into the caller's tensors


def test_models_built_on_the_same_frozen_tensors_share_their_memory():
    hp = hparams(layers=2)
    params = random_params(TI3, hp, seed=5)
    first = PathModel(TI3, hp, params, trainable={"encoderblock_1", "encoder_norm", "head"})
    second = PathModel(TI3, hp, params, trainable={"head"})
    for model in (first, second):
        assert model.blocks[0].attn.qkv.weight.data_ptr() == params["encoderblock_0"]["attn.qkv.weight"].data_ptr()
        assert model.embedding.weight.data_ptr() == params["embedding"]["weight"].data_ptr()
        assert model.posembed_input.pos_embedding.data_ptr() == params["posembed_input"]["pos_embedding"].data_ptr()
    assert "blocks.0.attn.qkv.weight" not in first.state_dict()
    assert second.blocks[1].mlp.fc1.weight.data_ptr() == first.blocks[1].mlp.fc1.weight.data_ptr()
    assert not second.blocks[1].mlp.fc1.weight.requires_grad and first.blocks[1].mlp.fc1.weight.requires_grad


def test_a_published_parameter_reused_as_frozen_gets_no_gradient():
    # A component trained by one model (so its tensors are nn.Parameters with requires_grad=True) and then
    # published is shared frozen by the next model: training that model must leave it alone.
    hp = hparams(layers=1)
    params = random_params(TI3, hp, seed=6)
    trainer = PathModel(TI3, hp, params, trainable={"encoderblock_0", "encoder_norm", "head"})
    published = {c: {t: p for (cc, t), p in trainer.trainable_tensors().items() if cc == c}
                 for c in ("encoderblock_0", "encoder_norm")}
    reuser_params = dict(params, **published, head=init_component("head", TI3, hp, torch.Generator()))
    snapshot = {(c, t): v.detach().clone() for c in published for t, v in published[c].items()}
    reuser = PathModel(TI3, hp, reuser_params, trainable={"head"})
    assert reuser.frozen_prefix[-1] == "encoder_norm"
    _sgd_steps(reuser, images(8, 32))
    for (component, tensor_name), before in snapshot.items():
        tensor = published[component][tensor_name]
        assert tensor.grad is None and torch.equal(tensor, before)
    assert any(torch.count_nonzero(v) for v in reuser_params["head"].values())


def test_bad_params_are_one_line_value_errors():
    hp = hparams(layers=1)
    params = random_params(TI3, hp)
    with pytest.raises(ValueError, match=r"missing for components \['encoderblock_0'\]"):
        PathModel(TI3, hp, {k: v for k, v in params.items() if k != "encoderblock_0"}, trainable={"head"})
    with pytest.raises(ValueError, match="not part of this model"):
        PathModel(TI3, hp, params, trainable={"encoderblock_5"})
    wrong = dict(params, head={"weight": torch.zeros(3, 192), "bias": torch.zeros(3)})
    with pytest.raises(ValueError, match=r"head.weight has shape \(3, 192\), expected \(2, 192\)") as info:
        PathModel(TI3, hp, wrong, trainable={"head"})
    assert "\n" not in str(info.value)


# ---------------------------------------------------------------------------------------------- backward stop


def _graph_ops(output: torch.Tensor) -> list[str]:
    seen, stack, names = set(), [output.grad_fn], []
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        names.append(type(node).__name__)
        stack.extend(next_fn for next_fn, _ in node.next_functions)
    return names


def test_backward_stops_at_the_first_trainable_component():
    hp = hparams(layers=3)
    params = random_params(TI3, hp, seed=6)
    x = images(4, 32)
    block_inputs = []
    top_only = PathModel(TI3, hp, params, trainable={"encoder_norm", "head"})
    for block in top_only.blocks:
        block.register_forward_hook(lambda module, args, out: block_inputs.append((args[0], out)))
    ops = _graph_ops(top_only(x).sum())
    assert top_only.frozen_prefix[-1] == "encoderblock_2"
    assert all(inp.grad_fn is None and out.grad_fn is None and not out.requires_grad for inp, out in block_inputs)
    assert not any("Attention" in op or "Gelu" in op or "Convolution" in op for op in ops), ops

    full_ops = _graph_ops(PathModel(TI3, hp, params, trainable=set(component_names(hp)))(x).sum())
    assert sum("Attention" in op for op in full_ops) == 3 and any("Convolution" in op for op in full_ops)
    top_block_ops = _graph_ops(PathModel(TI3, hp, params, trainable={"encoderblock_2", "head"})(x).sum())
    assert sum("Attention" in op for op in top_block_ops) == 1 and not any("Convolution" in op for op in top_block_ops)


def test_gradients_of_trainable_tensors_do_not_depend_on_what_else_trains():
    hp = hparams(layers=3)
    params = random_params(TI3, hp, seed=7)
    x, target = images(6, 32), torch.tensor([0, 1, 0, 1, 1, 0])
    grads = []
    for trainable in ({"encoderblock_2", "encoder_norm", "head"}, set(component_names(hp))):
        model = PathModel(TI3, hp, params, trainable)
        torch.nn.functional.cross_entropy(model(x), target).backward()
        grads.append({k: p.grad for k, p in model.trainable_tensors().items() if k[0] in ("encoderblock_2", "head")})
    for key, grad in grads[0].items():
        torch.testing.assert_close(grad, grads[1][key], rtol=1e-5, atol=1e-7)


def _train_step_cost(model: PathModel, x: torch.Tensor, target: torch.Tensor) -> tuple[int, float]:
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        torch.nn.functional.cross_entropy(model(x), target).backward()
        optimizer.step()

    step()  # warm-up (allocator, optimizer state)
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        step()
    best = math.inf
    for _ in range(5):
        start = time.perf_counter()
        step()
        best = min(best, time.perf_counter() - start)
    return counter.get_total_flops(), best


def test_top_block_training_is_cheaper_than_full_training():
    hp = hparams(layers=3)
    params = random_params(TI3, hp, seed=8)
    x, target = images(64, 32), torch.arange(64) % 2
    full_flops, full_seconds = _train_step_cost(PathModel(TI3, hp, params, set(component_names(hp))), x, target)
    top_flops, top_seconds = _train_step_cost(
        PathModel(TI3, hp, params, {"encoderblock_2", "encoder_norm", "head"}), x, target)
    # Deterministic: backward skips 2 of 3 blocks and the patch conv (about 3 + 1 units of 9 per block).
    assert top_flops < 0.6 * full_flops
    print(f"\ntop-block/full training step: flops ratio {top_flops / full_flops:.3f}, "
          f"time ratio {top_seconds / full_seconds:.3f} (best of 5, batch 64)")


# ---------------------------------------------------------------------------------------------- flops


@pytest.mark.parametrize("hp", [hparams(), hparams(layers=0, size=48, classes=10),
                                hparams(layers=3, size=64, adapters="0_2", adapter_dim=32)])
def test_count_flops_matches_torch_flop_counter(hp):
    model = PathModel(TI3, hp, random_params(TI3, hp), trainable=())
    with torch.no_grad(), sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        model(images(1, hp["ds_image_size"]))
    assert count_flops(TI3, hp) == counter.get_total_flops()


def test_ti3_root_flops_are_close_to_the_method_reference():
    assert count_flops(TI3, hparams()) == 14_509_056  # docs/method.md 3.7 F_ref ~ 15,000,000 (XLA also counts norms)


# ---------------------------------------------------------------------------------------------- roots


def test_resize_posemb_identity_shape_and_values():
    posemb = torch.randn(1, 1 + 4, 8)
    assert resize_posemb(posemb, 2) is posemb
    ramp = torch.tensor([0.0, 1.0]).repeat(2).reshape(1, 4, 1)  # grid [[0, 1], [0, 1]]
    resized = resize_posemb(torch.cat([torch.full((1, 1, 1), 7.0), ramp], dim=1), 4)
    assert resized.shape == (1, 17, 1) and resized[0, 0, 0] == 7.0
    torch.testing.assert_close(resized[0, 1:5, 0], torch.tensor([0.0, 0.25, 0.75, 1.0]))  # align_corners=False
    big = torch.randn(1, 1 + 49, 16)
    torch.testing.assert_close(resize_posemb(big, 3), resample_abs_pos_embed(
        big, (3, 3), (7, 7), num_prefix_tokens=1, interpolation="bilinear", antialias=False))
    with pytest.raises(ValueError, match="1\\+G\\*G"):
        resize_posemb(torch.randn(1, 6, 8), 2)


def test_root_random_is_deterministic_headless_and_full_depth():
    cfg = dataclasses.replace(TI3, depth=4)
    root = root_random(cfg, hparams(layers=2, size=48), seed=11)
    assert list(root) == ["cls", "embedding", "posembed_input"] + [f"encoderblock_{i}" for i in range(4)] + [
        "encoder_norm"]
    assert root["posembed_input"]["pos_embedding"].shape == (1, 10, 192)
    again = root_random(cfg, hparams(layers=2, size=48), seed=11)
    other = root_random(cfg, hparams(layers=2, size=48), seed=12)
    assert torch.equal(root["encoderblock_3"]["mlp.fc1.weight"], again["encoderblock_3"]["mlp.fc1.weight"])
    assert not torch.equal(root["encoderblock_3"]["mlp.fc1.weight"], other["encoderblock_3"]["mlp.fc1.weight"])


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_root_imported_from_a_timm_checkpoint_matches_timm(tmp_path, suffix):
    torch.manual_seed(0)
    source = timm_vit(layers=4, size=64, classes=7)  # 4x4 grid, 4 blocks, a head to be dropped
    path = tmp_path / f"vit{suffix}"
    state = {k: v.contiguous() for k, v in source.state_dict().items()}
    save_file(state, str(path)) if suffix == ".safetensors" else torch.save(state, path)

    hp = hparams(layers=3, size=32, classes=3)
    root = root_from_timm_checkpoint(path, TI3, hp)
    assert "head" not in root and "encoderblock_3" not in root
    assert torch.equal(root["encoderblock_1"]["attn.qkv.weight"], state["blocks.1.attn.qkv.weight"])

    # Reference: timm at the new size, with timm's own bilinear posemb resampling and the same head.
    reference = timm_vit(layers=3, size=32, classes=3)
    ref_state = {k: v for k, v in state.items() if not k.startswith(("blocks.3.", "head."))}
    ref_state["pos_embed"] = resample_abs_pos_embed(state["pos_embed"], (2, 2), (4, 4), num_prefix_tokens=1,
                                                    interpolation="bilinear", antialias=False)
    head = {"weight": torch.randn(3, 192), "bias": torch.randn(3)}
    reference.load_state_dict(dict(ref_state, **{"head." + k: v for k, v in head.items()}), strict=True)
    model = PathModel(TI3, hp, dict(root, head=head), trainable={"head"})
    x = images(3, 32)
    with torch.no_grad():
        torch.testing.assert_close(model(x), reference(x))
        zero_head = PathModel(TI3, hp, dict(root, head=init_component("head", TI3, hp, torch.Generator())), ())
        torch.testing.assert_close(zero_head.forward_features(x), reference.forward_head(
            reference.forward_features(x), pre_logits=True))


def test_root_import_errors_are_clear(tmp_path):
    with pytest.raises(CheckpointError, match="not found") as info:
        root_from_timm_checkpoint(tmp_path / "absent.pth", TI3, hparams())
    assert isinstance(info.value, ValueError) and "\n" not in str(info.value)
    torch.manual_seed(0)
    small = timm_vit(layers=2, size=32, classes=2)
    path = tmp_path / "two_blocks.pth"
    torch.save(small.state_dict(), path)
    with pytest.raises(CheckpointError, match="lacks components"):
        root_from_timm_checkpoint(path, TI3, hparams())  # TI3 wants 3 blocks
    with pytest.raises(CheckpointError, match="does not fit ViT config 'b'"):
        root_from_timm_checkpoint(path, vit_config("b", depth=2), hparams(layers=2))
    (tmp_path / "junk.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="cannot read"):
        root_from_timm_checkpoint(tmp_path / "junk.pth", TI3, hparams())
