"""vitpe models through timm's own entry points: registry, data config, checkpoint files, features."""
import pytest
import timm
import torch

import vitpe  # noqa: F401  (registers the models)
from script_modules import load_script

NAMES = ["vitpe_vit_tiny_patch16_224", "vitpe_vit_small_patch16_224", "vitpe_vit_base_patch16_224",
         "vitpe_vit_tiny_patch4_32", "vitpe_vit_small_patch4_32"]


def test_list_models_lists_them():
    assert set(NAMES) <= set(timm.list_models("vitpe_*"))


@pytest.mark.parametrize("name", NAMES)
def test_create_model_with_any_strategy(name):
    m = timm.create_model(name, pos="peg", num_classes=10, depth=1)
    size = m.pretrained_cfg["input_size"][-1]
    assert m(torch.randn(1, 3, size, size)).shape == (1, 10)
    assert m.pos.name == "peg"


def test_widths_are_deits():
    for name, width, heads in [("tiny", 192, 3), ("small", 384, 6), ("base", 768, 12)]:
        m = timm.create_model(f"vitpe_vit_{name}_patch16_224", depth=1)
        assert m.embed_dim == width and m.blocks[0].attn.num_heads == heads


def test_resolve_data_config():
    cfg = timm.data.resolve_data_config({}, model=timm.create_model("vitpe_vit_tiny_patch4_32", depth=1))
    assert cfg["input_size"] == (3, 32, 32)
    assert cfg["mean"] == pytest.approx((0.4914, 0.4822, 0.4465))
    cfg = timm.data.resolve_data_config({}, model=timm.create_model("vitpe_vit_small_patch16_224", depth=1))
    assert cfg["input_size"] == (3, 224, 224) and cfg["mean"] == timm.data.IMAGENET_DEFAULT_MEAN
    cfg = timm.data.resolve_data_config({}, model=timm.create_model("vitpe_vit_small_patch16_224", depth=1,
                                                                      img_size=288))
    assert cfg["input_size"] == (3, 288, 288)


def timm_checkpoint(tmp_path, global_pool="token"):
    ref = timm.create_model("vit_tiny_patch16_224", depth=2, global_pool=global_pool).eval()
    with torch.no_grad():
        for p in ref.parameters():  # move off the init so that every weight matters
            p.add_(torch.randn_like(p) * 0.05)
    path = tmp_path / "vit_tiny.pth"
    torch.save(ref.state_dict(), path)
    return ref, str(path)


@pytest.mark.parametrize("global_pool", ["token", "avg"])
def test_timm_checkpoint_gives_timm_logits(tmp_path, global_pool):
    ref, path = timm_checkpoint(tmp_path, global_pool)
    m = timm.create_model("vitpe_vit_tiny_patch16_224", pos="learned", depth=2, global_pool=global_pool,
                          pretrained=True, pretrained_cfg_overlay=dict(file=path)).eval()
    x = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        assert (m(x) - ref(x)).abs().max() < 1e-4


@pytest.mark.parametrize("img_size", [288, (160, 256)])
def test_timm_checkpoint_at_other_img_size_resamples_like_timm(tmp_path, img_size):
    _, path = timm_checkpoint(tmp_path)
    kw = dict(depth=2, img_size=img_size, pretrained=True, pretrained_cfg_overlay=dict(file=path))
    ref = timm.create_model("vit_tiny_patch16_224", **kw).eval()
    m = timm.create_model("vitpe_vit_tiny_patch16_224", pos="learned", **kw).eval()
    size = (img_size, img_size) if isinstance(img_size, int) else img_size
    x = torch.randn(2, 3, *size)
    with torch.no_grad():
        assert (m(x) - ref(x)).abs().max() < 1e-4


def test_patch_size_argument_resamples_a_checkpoint_like_timm(tmp_path):
    _, path = timm_checkpoint(tmp_path)  # 16x16 patches
    kw = dict(depth=2, patch_size=8, img_size=112, pretrained=True, pretrained_cfg_overlay=dict(file=path))
    ref = timm.create_model("vit_tiny_patch16_224", **kw).eval()
    m = timm.create_model("vitpe_vit_tiny_patch16_224", pos="learned", **kw).eval()
    assert m.patch_embed.proj.weight.shape[-2:] == (8, 8)
    x = torch.randn(2, 3, 112, 112)
    with torch.no_grad():
        assert (m(x) - ref(x)).abs().max() < 1e-4


@pytest.mark.parametrize("img_size", [224, (160, 256)])
def test_table_without_class_row_loads_into_the_default_model(tmp_path, img_size):
    """timm's no_embed_class tables (DeiT III, the RoPE ViTs' "ape") have no class-token row: zero
    prefix rows add no position to the class token, as the checkpoint's model did."""
    ref = timm.create_model("vit_tiny_patch16_224", depth=2, no_embed_class=True, img_size=img_size).eval()
    with torch.no_grad():
        for p in ref.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    path = tmp_path / "deit3_style.pth"
    torch.save(ref.state_dict(), path)
    m = timm.create_model("vitpe_vit_tiny_patch16_224", pos="learned", depth=2, img_size=img_size,
                          pretrained=True, pretrained_cfg_overlay=dict(file=str(path))).eval()
    assert m.pos.pos_embed[0, 0].abs().max() == 0
    size = (img_size, img_size) if isinstance(img_size, int) else img_size
    x = torch.randn(2, 3, *size)
    with torch.no_grad():
        assert (m(x) - ref(x)).abs().max() < 1e-4


@pytest.mark.parametrize("img_size", [(112, 448), (208, 240)])
def test_table_without_class_row_is_resampled_to_a_grid_of_as_many_or_one_fewer_cells(tmp_path, img_size):
    """A 224-px no_embed_class table (196 rows) into the default model at 7x28 (196 cells) or 13x15
    (195): by its row count alone it would pass for the model's own grid, or for a class row and
    that grid; the checkpoint's image size says it is 14x14, to be resampled, as timm does."""
    src = timm.create_model("vit_tiny_patch16_224", depth=2, no_embed_class=True).eval()
    with torch.no_grad():
        for p in src.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    path = tmp_path / "deit3_style.pth"
    torch.save(src.state_dict(), path)
    kw = dict(depth=2, img_size=img_size, pretrained=True, pretrained_cfg_overlay=dict(file=str(path)))
    ref = timm.create_model("vit_tiny_patch16_224", no_embed_class=True, **kw).eval()
    m = timm.create_model("vitpe_vit_tiny_patch16_224", pos="learned", **kw).eval()
    assert m.pos.pos_embed[0, 0].abs().max() == 0
    x = torch.randn(2, 3, *img_size)
    with torch.no_grad():
        assert (m(x) - ref(x)).abs().max() < 1e-4


def test_table_with_class_row_into_a_model_without_one_names_the_option(tmp_path):
    _, path = timm_checkpoint(tmp_path)  # 1 + 14 * 14 rows
    with pytest.raises(ValueError, match="pos_embed has 197 patch positions, neither.*prefix_pos"):
        timm.create_model("vitpe_vit_tiny_patch16_224", pos="learned", depth=2, pretrained=True,
                          pos_kwargs={"learned": {"prefix_pos": False}}, pretrained_cfg_overlay=dict(file=path))


def test_timm_checkpoint_with_new_classifier_and_combined_strategy(tmp_path):
    ref, path = timm_checkpoint(tmp_path)
    m = timm.create_model("vitpe_vit_tiny_patch16_224", pos="learned+rope_axial", depth=2, num_classes=7,
                          pretrained=True, pretrained_cfg_overlay=dict(file=path))
    torch.testing.assert_close(m.pos.learned.pos_embed, ref.pos_embed)
    torch.testing.assert_close(m.blocks[1].mlp.fc2.weight, ref.blocks[1].mlp.fc2.weight)
    assert m.head.out_features == 7


def test_forward_intermediates_and_features_only():
    m = timm.create_model("vitpe_vit_tiny_patch16_224", pos="rope_mixed", depth=4).eval()
    x = torch.randn(1, 3, 160, 224)
    with torch.no_grad():
        final, feats = m.forward_intermediates(x, indices=[1, 3])
        torch.testing.assert_close(final, m.forward_features(x))
        assert [f.shape for f in feats] == [(1, 192, 10, 14)] * 2
        nlc = m.forward_intermediates(x, indices=2, output_fmt="NLC", intermediates_only=True)
        assert [f.shape for f in nlc] == [(1, 140, 192)] * 2
    fm = timm.create_model("vitpe_vit_tiny_patch16_224", pos="peg", depth=4, features_only=True, out_indices=(1, 3))
    with torch.no_grad():
        outs = fm(x)
    assert [o.shape for o in outs] == [(1, 192, 10, 14)] * 2
    assert fm.feature_info.channels() == [192, 192] and fm.feature_info.reduction() == [16, 16]


def test_forward_head_and_reset_classifier():
    m = timm.create_model("vitpe_vit_tiny_patch16_224", depth=1, num_classes=4).eval()
    x = torch.randn(2, 3, 64, 64)
    feats = m.forward_features(x)
    torch.testing.assert_close(m.forward_head(feats), m(x))
    assert m.forward_head(feats, pre_logits=True).shape == (2, 192)
    m.reset_classifier(3, "avg")
    assert m(x).shape == (2, 3)
    m.reset_classifier(0)
    assert m(x).shape == (2, 192)
    assert "cls_token" in m.no_weight_decay() and "pos.pos_embed" in m.no_weight_decay()


def test_training_checkpoint_at_other_resolution_loads(tmp_path):
    """A vitpe checkpoint trained at 32 px loads into the same model built for 64 px."""
    small = timm.create_model("vitpe_vit_tiny_patch4_32", pos="learned+rpb", depth=2)
    path = tmp_path / "small.pth"
    torch.save({"model": small.state_dict()}, path)
    big = timm.create_model("vitpe_vit_tiny_patch4_32", pos="learned+rpb", depth=2, img_size=64,
                            pretrained=True, pretrained_cfg_overlay=dict(file=str(path))).eval()
    from vitpe.pos.functional import resample_map, resample_table

    expected = resample_table(small.pos.learned.pos_embed[:, 1:].detach(), (8, 8), (16, 16))
    torch.testing.assert_close(big.pos.learned.pos_embed[:, 1:], expected)
    torch.testing.assert_close(big.pos.learned.pos_embed[:, :1], small.pos.learned.pos_embed[:, :1])
    torch.testing.assert_close(big.pos.rpb.tables, resample_map(small.pos.rpb.tables.detach(), (31, 31)))
    assert torch.isfinite(big(torch.randn(1, 3, 64, 64))).all()


def test_under_bf16_autocast_the_residual_stream_stays_float32_and_matches_timm(tmp_path):
    ref, path = timm_checkpoint(tmp_path)
    m = timm.create_model("vitpe_vit_tiny_patch16_224", pos="learned", depth=2, pretrained=True,
                          pretrained_cfg_overlay=dict(file=path)).eval()
    dtypes = []
    m.blocks[1].register_forward_hook(lambda mod, args, out: dtypes.append(out.dtype))
    x = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        exact = ref(x)  # float32
        with torch.autocast("cpu", dtype=torch.bfloat16):
            ours, theirs = m(x).float(), ref(x).float()
    assert dtypes == [torch.float32]
    # as close to the float32 logits as timm's autocast is (the patch embedding's product sums in
    # another order than timm's convolution, so single bfloat16 roundings can differ)
    err_ours, err_theirs = (ours - exact).abs().mean(), (theirs - exact).abs().mean()
    assert err_ours <= 1.1 * err_theirs and (ours - theirs).abs().max() <= 2 ** -6 * theirs.abs().max()


def _perturbed(name: str, **kw) -> torch.nn.Module:
    ref = timm.create_model(name, **kw).eval()
    with torch.no_grad():
        for p in ref.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return ref


@pytest.mark.parametrize("kw", [dict(reg_tokens=4, no_embed_class=True, global_pool="avg"),
                                dict(reg_tokens=2, global_pool="max"),
                                dict(reg_tokens=1, global_pool="avgmax", class_token=False)])
def test_register_tokens_and_pooling_give_timms_logits(tmp_path, kw):
    ref = _perturbed("vit_tiny_patch16_224", depth=2, img_size=64, dynamic_img_size=True, **kw)
    path = tmp_path / "ref.pth"
    torch.save(ref.state_dict(), path)
    m = timm.create_model("vitpe_vit_tiny_patch16_224", pos="learned", depth=2, img_size=64, pretrained=True,
                          pretrained_cfg_overlay=dict(file=str(path)), **kw).eval()
    assert m.num_prefix_tokens == ref.num_prefix_tokens
    for size in [(64, 64), (48, 80)]:
        x = torch.randn(2, 3, *size)
        with torch.no_grad():
            assert (m(x) - ref(x)).abs().max() < 1e-4, size


def test_dynamic_img_pad_pads_like_timm(tmp_path):
    ref = _perturbed("vit_tiny_patch16_224", depth=2, img_size=64, dynamic_img_size=True, dynamic_img_pad=True)
    path = tmp_path / "ref.pth"
    torch.save(ref.state_dict(), path)
    kw = dict(pos="learned", depth=2, img_size=64, dynamic_img_size=True, pretrained=True,
              pretrained_cfg_overlay=dict(file=str(path)))
    m = timm.create_model("vitpe_vit_tiny_patch16_224", dynamic_img_pad=True, **kw).eval()
    x = torch.randn(2, 3, 50, 70)
    with torch.no_grad():
        assert (m(x) - ref(x)).abs().max() < 1e-4
    with pytest.raises(ValueError, match="not a multiple of the patch size"):
        timm.create_model("vitpe_vit_tiny_patch16_224", **kw)(x)


def test_set_input_size_resamples_like_timm(tmp_path):
    ref = _perturbed("vit_tiny_patch16_224", depth=2)
    path = tmp_path / "ref.pth"
    torch.save(ref.state_dict(), path)
    m = timm.create_model("vitpe_vit_tiny_patch16_224", pos="learned", depth=2, pretrained=True,
                          pretrained_cfg_overlay=dict(file=str(path))).eval()
    ref.set_input_size(img_size=(96, 128), patch_size=8)
    m.set_input_size(img_size=(96, 128), patch_size=8)
    assert m.pos.native_grid == (12, 16) and m.pos.pos_embed.shape == ref.pos_embed.shape
    assert timm.data.resolve_data_config({}, model=m)["input_size"] == (3, 96, 128)
    x = torch.randn(2, 3, 96, 128)
    with torch.no_grad():
        assert (m(x) - ref(x)).abs().max() < 1e-4
    rpb = timm.create_model("vitpe_vit_tiny_patch16_224", pos="rpb", depth=1, img_size=64).eval()
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        before = rpb(x)
        rpb.set_input_size(img_size=32)  # the tables resampled once give what resampling at run time gave
        assert rpb.pos.tables.shape[-2:] == (3, 3)
        torch.testing.assert_close(rpb(x), before)


def test_deit3_checkpoint_with_layer_scale_gives_timms_logits(tmp_path):
    """DeiT III: no class row in the table and layer scale (``ls1.gamma``, ``ls2.gamma``), folded
    into ``attn.proj`` and ``mlp.fc2``."""
    ref = _perturbed("deit3_small_patch16_224", depth=2, img_size=64)
    with torch.no_grad():
        for name, p in ref.named_parameters():
            if name.endswith("gamma"):
                p.copy_(torch.rand_like(p) + 0.5)  # away from the 1e-6 init, so that folding them matters
    path = tmp_path / "deit3.pth"
    torch.save(ref.state_dict(), path)
    m = timm.create_model("vitpe_vit_small_patch16_224", pos="learned", depth=2, img_size=64, no_embed_class=True,
                          pretrained=True, pretrained_cfg_overlay=dict(file=str(path))).eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert (m(x) - ref(x)).abs().max() < 1e-4


def test_a_square_table_goes_to_a_grid_of_as_many_cells_resampled_like_timm(tmp_path):
    """14x14 rows into a 7x28 model (196 cells both): resampled as timm does, not reshaped."""
    _, path = timm_checkpoint(tmp_path)
    kw = dict(depth=2, img_size=(112, 448), pretrained=True, pretrained_cfg_overlay=dict(file=path))
    ref = timm.create_model("vit_tiny_patch16_224", **kw).eval()
    m = timm.create_model("vitpe_vit_tiny_patch16_224", pos="learned", **kw).eval()
    torch.testing.assert_close(m.pos.pos_embed, ref.pos_embed, atol=1e-5, rtol=0)
    x = torch.randn(2, 3, 112, 448)
    with torch.no_grad():
        assert (m(x) - ref(x)).abs().max() < 1e-4


@pytest.mark.parametrize("img_size", [(64, 256), (32, 128)])
def test_a_non_square_checkpoint_with_a_square_cell_count_loads_as_timms_loader_keeps_it(tmp_path, img_size):
    """4x16 (64 rows, a square count) saved by a model trained at 64x256, loaded at that size: timm
    keeps the table as it is (its cell count matches, and 224 px accounts for 196 rows, not 64)."""
    src = timm.create_model("vit_tiny_patch16_224", depth=2, img_size=img_size).eval()
    with torch.no_grad():
        for p in src.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    torch.save(src.state_dict(), tmp_path / "wide.pth")
    kw = dict(depth=2, img_size=img_size, pretrained=True, pretrained_cfg_overlay=dict(file=str(tmp_path / "wide.pth")))
    ref = timm.create_model("vit_tiny_patch16_224", **kw).eval()
    m = timm.create_model("vitpe_vit_tiny_patch16_224", pos="learned", **kw).eval()
    assert torch.equal(ref.pos_embed, src.pos_embed) and torch.equal(m.pos.pos_embed, src.pos_embed)
    x = torch.randn(2, 3, *img_size)
    with torch.no_grad():
        assert (m(x) - ref(x)).abs().max() < 1e-4


@pytest.mark.parametrize("pos", ["rope_axial", "sincos2d+rope_axial"])
def test_set_input_size_keeps_a_strategy_of_buffers_on_the_models_device(pos):
    m = timm.create_model("vitpe_vit_tiny_patch16_224", pos=pos, depth=1, img_size=64).to("meta")
    m.set_input_size(img_size=96)
    assert {t.device.type for t in (*m.pos.parameters(), *m.pos.buffers())} == {"meta"}
    assert m.pos.native_grid == (6, 6)


def test_layer_decay_groups_match_timms_vit():
    """timm's layer-wise learning-rate decay reads ``group_matcher``: the stem, then each block."""
    from timm.optim import param_groups_layer_decay

    def scales(model):
        name = {id(p): n for n, p in model.named_parameters()}
        return {name[id(p)]: g["lr_scale"] for g in param_groups_layer_decay(model, layer_decay=0.65)
                for p in g["params"]}

    ours = scales(timm.create_model("vitpe_vit_tiny_patch16_224", pos="learned", depth=3))
    ref = scales(timm.create_model("vit_tiny_patch16_224", depth=3))
    for name, scale in ref.items():
        assert ours[name if name != "pos_embed" else "pos.pos_embed"] == pytest.approx(scale), name
    rope = scales(timm.create_model("vitpe_vit_tiny_patch16_224", pos="rope_mixed+rpb", depth=3))
    assert {n for n, s in rope.items() if s == pytest.approx(rope["patch_embed.proj.weight"])} >= {
        n for n in rope if n.startswith("pos.")}
    assert rope["blocks.2.mlp.fc2.weight"] > rope["blocks.0.attn.qkv.weight"] > rope["patch_embed.proj.weight"]


def test_no_embed_class_reads_the_strategy_with_spaces():
    m = timm.create_model("vitpe_vit_tiny_patch16_224", pos="learned + rope_axial", depth=1, no_embed_class=True)
    assert m.pos.find("learned").pos_embed.shape[1] == 14 * 14


def test_a_rope_checkpoint_into_a_model_without_rotary_warns(tmp_path, caplog):
    import logging

    ref = timm.create_model("vit_small_patch16_rope_224", depth=1)
    path = tmp_path / "rope.pth"
    torch.save(ref.state_dict(), path)
    with caplog.at_level(logging.WARNING):
        timm.create_model("vitpe_vit_small_patch16_224", pos="sincos2d", depth=1, pretrained=True,
                          pretrained_cfg_overlay=dict(file=str(path)))
    assert "has no rotary embedding" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        timm.create_model("vitpe_vit_small_patch16_224", pos="rope_axial", depth=1, pretrained=True,
                          pretrained_cfg_overlay=dict(file=str(path)))
    assert "rotary" not in caplog.text


@pytest.mark.parametrize("name, pos", [("vitpe_vit_tiny_patch16_224", "rope_mixed"), ("vitpe_vit_tiny_patch16_224", "rpb"),
                                       ("vitpe_vit_tiny_patch16_224", "learned+peg"),
                                       ("vitpe_vit_tiny_patch16_224", "mixffn"), ("vitpe_mit_b0", "mixffn")])
def test_grad_checkpointing_gives_the_same_gradients(name, pos):
    """timm's --grad-checkpointing: each block recomputed in the backward, drop path replayed."""
    kw = dict(drop_path_rate=0.5) if "mit" in name else dict(depth=2, drop_path_rate=0.5)
    torch.manual_seed(0)
    model = timm.create_model(name, pos=pos, num_classes=3, **kw).train()
    x = torch.randn(2, 3, 64, 96)

    def grads():
        torch.manual_seed(1)  # the same drop-path draws
        model.zero_grad()
        model(x).square().sum().backward()
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    calls = []
    next(b for b in model.modules() if hasattr(b, "attn")).attn.register_forward_hook(lambda *_: calls.append(1))
    plain = grads()
    model.set_grad_checkpointing(True)
    assert model.grad_checkpointing and all(b.grad_checkpointing for b in model.modules() if hasattr(b, "attn"))
    again = grads()
    assert len(calls) == 3  # once without, twice with: the backward ran the block again
    assert plain.keys() == again.keys() and len(plain) > 10
    for n in plain:
        torch.testing.assert_close(again[n], plain[n], atol=1e-5, rtol=1e-4, msg=n)
    # what it is for: autograd keeps the blocks' inputs only, not their activations
    saved_activation_bytes = load_script("benchmarks/checkpoint_memory.py").saved_activation_bytes
    model.set_grad_checkpointing(False)
    kept = saved_activation_bytes(model, x)
    model.set_grad_checkpointing(True)
    assert saved_activation_bytes(model, x) < 0.35 * kept



def test_bad_model_arguments_are_named_before_anything_runs():
    kw = dict(depth=1, num_classes=3)
    for pos, opts, match in (("rope_axial", {"theta": 0}, "rope_axial: theta must be a positive number"),
                             ("rope_mixed", {"theta": -10}, "rope_mixed: theta must be a positive"),
                             ("sincos2d", {"temperature": 0}, "sincos2d: temperature must be a positive")):
        with pytest.raises(ValueError, match=match):  # these gave NaN logits
            timm.create_model("vitpe_vit_tiny_patch4_32", pos=pos, pos_kwargs={pos: opts}, **kw)
    with pytest.raises(ValueError, match="embed_dim 192 must be a multiple of num_heads 5"):
        timm.create_model("vitpe_vit_tiny_patch4_32", pos="rope_axial", num_heads=5, **kw)
    model = timm.create_model("vitpe_vit_tiny_patch4_32", pos="learned", patch_size=(4, 4), **kw)  # as timm takes it
    assert model.patch_embed.patch_size == (4, 4) and model.feature_info[0]["reduction"] == 4
    mit = timm.create_model("vitpe_mit_b0", num_classes=3)
    with pytest.raises(ValueError, match="global_pool must be 'avg' or ''"):
        mit.reset_classifier(3, "max")
    feats = model.forward_intermediates(torch.randn(0, 3, 32, 32), intermediates_only=True)
    assert feats[0].shape == (0, 192, 8, 8)


def test_set_input_size_checks_first_and_keeps_the_strategys_state():
    model = timm.create_model("vitpe_vit_tiny_patch4_32", pos="learned", depth=1, num_classes=3)
    with pytest.raises(ValueError, match="img_size 32x32 is not a multiple of the patch size 5"):
        model.set_input_size(patch_size=5)
    assert model.patch_embed.patch_size == (4, 4) and model.patch_embed.proj.kernel_size == (4, 4)  # unchanged
    model.pos.pos_embed.requires_grad_(False)
    model.eval().set_input_size(48)
    assert model.pos.native_grid == (12, 12) and not model.pos.pos_embed.requires_grad and not model.pos.training


def test_own_no_embed_class_checkpoints_load_into_the_default_model():
    """The README's promise for vitpe's own files too, which carry a grid entry."""
    kw = dict(pos="learned", depth=1, num_classes=3)
    src = timm.create_model("vitpe_vit_tiny_patch4_32", no_embed_class=True, **kw).eval()
    dst = timm.create_model("vitpe_vit_tiny_patch4_32", **kw).eval()
    dst.load_state_dict(src.state_dict())
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(dst(x), src(x))
    assert dst.pos.pos_embed[0, 0].abs().sum() == 0  # the class token's row: no position, as before


def test_strategy_options_that_do_not_fit_are_named_with_the_strategy():
    kw = dict(pos="peg", depth=2, num_classes=3)
    for opts, exc, match in (({"peg": {"kernel": 5}}, TypeError, r"peg: unknown option\(s\) \['kernel'\] in pos_kwargs; "
                                                                  r"its options: \['after', 'kernel_size'\]"),
                             ({"peg": 5}, TypeError, r"pos_kwargs\['peg'\] must be a mapping"),
                             ({"peg": {"after": "01"}}, ValueError, "peg: after must be block indices"),
                             ({"peg": {"kernel_size": 3.0}}, ValueError, "kernel_size must be a positive odd")):
        with pytest.raises(exc, match=match):
            timm.create_model("vitpe_vit_tiny_patch4_32", pos_kwargs=opts, **kw)
    model = timm.create_model("vitpe_vit_tiny_patch4_32", pos_kwargs={"peg": {"after": 1}}, **kw)
    assert model.pos.after == [1]
