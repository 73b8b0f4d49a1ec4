"""SegFormer checkpoints in the NVlabs (mmseg) and Hugging Face layouts load into vitpe's MiT.

The reference state dicts are built here with random weights in each layout, and a plain-torch
forward of the NVlabs layout (written from SegFormer's code) checks that the loaded model computes
the same thing, not only that the keys fit.
"""
import pytest
import timm
import torch
import torch.nn.functional as F

import vitpe  # noqa: F401  (registers the models)
from vitpe.models.mit import checkpoint_filter_fn
from vitpe.models.mit_convert import convert_segformer_state_dict

B0 = dict(dims=(32, 64, 160, 256), depths=(2, 2, 2, 2), heads=(1, 2, 5, 8), srs=(8, 4, 2, 1))


def nvlabs_state_dict(dims, depths, srs, num_classes=1000, **_) -> dict:
    """A randomly initialised MiT state dict in NVlabs' layout (mix_transformer.py)."""
    sd, chans = {}, 3
    g = torch.Generator().manual_seed(0)

    def put(key, *shape, ones=False):
        t = torch.randn(*shape, generator=g) * 0.05
        sd[key] = t + 1 if ones else t

    for n, (c, depth, sr) in enumerate(zip(dims, depths, srs), start=1):
        k = 7 if n == 1 else 3
        put(f"patch_embed{n}.proj.weight", c, chans, k, k), put(f"patch_embed{n}.proj.bias", c)
        put(f"patch_embed{n}.norm.weight", c, ones=True), put(f"patch_embed{n}.norm.bias", c)
        for i in range(depth):
            p = f"block{n}.{i}."
            for norm in ("norm1", "norm2") + (("attn.norm",) if sr > 1 else ()):
                put(p + norm + ".weight", c, ones=True), put(p + norm + ".bias", c)
            for name, out, inp in [("attn.q", c, c), ("attn.kv", 2 * c, c), ("attn.proj", c, c),
                                   ("mlp.fc1", 4 * c, c), ("mlp.fc2", c, 4 * c)]:
                put(p + name + ".weight", out, inp), put(p + name + ".bias", out)
            if sr > 1:
                put(p + "attn.sr.weight", c, c, sr, sr), put(p + "attn.sr.bias", c)
            put(p + "mlp.dwconv.dwconv.weight", 4 * c, 1, 3, 3), put(p + "mlp.dwconv.dwconv.bias", 4 * c)
        put(f"norm{n}.weight", c, ones=True), put(f"norm{n}.bias", c)
        chans = c
    put("head.weight", num_classes, dims[-1]), put("head.bias", num_classes)
    return sd


def nvlabs_forward(sd, x, dims, depths, heads, srs) -> list:
    """SegFormer's MixVisionTransformer.forward_features, in plain torch on the state dict."""
    outs = []
    ln = lambda t, key, eps: F.layer_norm(t, t.shape[-1:], sd[key + ".weight"], sd[key + ".bias"], eps)  # noqa: E731
    lin = lambda t, key: F.linear(t, sd[key + ".weight"], sd[key + ".bias"])  # noqa: E731
    for n, (c, depth, nh, sr) in enumerate(zip(dims, depths, heads, srs), start=1):
        k, s = (7, 4) if n == 1 else (3, 2)
        x = F.conv2d(x, sd[f"patch_embed{n}.proj.weight"], sd[f"patch_embed{n}.proj.bias"], s, k // 2)
        B, _, H, W = x.shape
        x = ln(x.flatten(2).transpose(1, 2), f"patch_embed{n}.norm", 1e-5)
        for i in range(depth):
            p = f"block{n}.{i}."
            h = ln(x, p + "norm1", 1e-6)
            q = lin(h, p + "attn.q").reshape(B, H * W, nh, c // nh).permute(0, 2, 1, 3)
            if sr > 1:
                h = F.conv2d(h.transpose(1, 2).reshape(B, c, H, W), sd[p + "attn.sr.weight"], sd[p + "attn.sr.bias"], sr)
                h = ln(h.reshape(B, c, -1).transpose(1, 2), p + "attn.norm", 1e-5)
            kv = lin(h, p + "attn.kv").reshape(B, -1, 2, nh, c // nh).permute(2, 0, 3, 1, 4)
            attn = (q @ kv[0].transpose(-2, -1) * (c // nh) ** -0.5).softmax(-1)
            x = x + lin((attn @ kv[1]).transpose(1, 2).reshape(B, H * W, c), p + "attn.proj")
            h = lin(ln(x, p + "norm2", 1e-6), p + "mlp.fc1")
            h = F.conv2d(h.transpose(1, 2).reshape(B, 4 * c, H, W), sd[p + "mlp.dwconv.dwconv.weight"],
                         sd[p + "mlp.dwconv.dwconv.bias"], padding=1, groups=4 * c)
            x = x + lin(F.gelu(h.flatten(2).transpose(1, 2)), p + "mlp.fc2")
        x = ln(x, f"norm{n}", 1e-6).reshape(B, H, W, c).permute(0, 3, 1, 2)
        outs.append(x)
    return outs


def _hugging_face_layout(sd: dict, patch: str, block: str, final: str, names: dict, kv: tuple) -> dict:
    """``sd`` (NVlabs' layout) renamed: stage ``s``'s patch embedding to ``patch.format(s=s)`` (its
    ``proj`` and ``layer_norm``), block ``i`` to ``block.format(s=s).i`` (modules renamed by
    ``names``, ``attn.kv`` split into the two names ``kv``), its norm to ``final.format(s=s)``; the
    classifier ``head`` to ``classifier``."""
    out = {}
    for key, value in sd.items():
        head, *rest = key.split(".")
        s = int(head[-1]) - 1 if head[-1].isdigit() else None
        if head.startswith("patch_embed"):
            out[f"{patch.format(s=s)}.{'proj' if rest[0] == 'proj' else 'layer_norm'}.{rest[1]}"] = value
        elif head.startswith("block"):
            base, module, param = f"{block.format(s=s)}.{rest[0]}.", ".".join(rest[1:-1]), rest[-1]
            if module == "attn.kv":
                c = value.shape[0] // 2
                out[base + f"{kv[0]}.{param}"], out[base + f"{kv[1]}.{param}"] = value[:c], value[c:]
            else:
                out[base + f"{names.get(module, module)}.{param}"] = value
        elif head.startswith("norm"):
            out[f"{final.format(s=s)}.{rest[0]}"] = value
        else:
            out[f"classifier.{rest[0]}"] = value
    return out


def to_hugging_face(sd: dict, prefix: str = "segformer.") -> dict:
    """The same weights in Hugging Face's SegformerForImageClassification layout (its files')."""
    names = {"norm1": "layer_norm_1", "norm2": "layer_norm_2", "attn.q": "attention.self.query",
             "attn.sr": "attention.self.sr", "attn.norm": "attention.self.layer_norm",
             "attn.proj": "attention.output.dense", "mlp.fc1": "mlp.dense1", "mlp.fc2": "mlp.dense2"}
    enc = prefix + "encoder."
    return _hugging_face_layout(sd, enc + "patch_embeddings.{s}", enc + "block.{s}", enc + "layer_norm.{s}", names,
                                ("attention.self.key", "attention.self.value"))


def to_mmseg(sd: dict) -> dict:
    """The same weights in mmseg's MiT layout (its tools/model_converters/mit2mmseg.py's mapping)."""
    out = {}
    for key, value in sd.items():
        head, *rest = key.split(".")
        if head.startswith("patch_embed"):
            out[f"layers.{int(head[-1]) - 1}.0.{'projection' if rest[0] == 'proj' else 'norm'}.{rest[1]}"] = value
        elif head.startswith("block"):
            base, module, param = f"layers.{int(head[-1]) - 1}.1.{rest[0]}.", ".".join(rest[1:-1]), rest[-1]
            if module == "attn.q":
                out[base + f"attn.attn.in_proj_{param}"] = torch.cat([value, sd[key.replace(".q.", ".kv.")]])
            elif module == "attn.proj":
                out[base + f"attn.attn.out_proj.{param}"] = value
            elif module.startswith("mlp."):
                layer = {"mlp.fc1": 0, "mlp.dwconv.dwconv": 1, "mlp.fc2": 4}[module]
                conv = value.reshape(*value.shape, 1, 1) if param == "weight" and layer != 1 else value
                out[base + f"ffn.layers.{layer}.{param}"] = conv
            elif module != "attn.kv":
                out[base + f"{module}.{param}"] = value
        elif head.startswith("norm"):
            out[f"layers.{int(head[-1]) - 1}.2.{rest[0]}"] = value
    return out


def to_transformers5(sd: dict) -> dict:
    """The same weights under transformers 5's module names (``SegformerModel.state_dict()``)."""
    names = {"norm1": "layernorm_before", "norm2": "layernorm_after", "attn.q": "attention.q_proj",
             "attn.proj": "attention.o_proj", "attn.sr": "attention.sequence_reduction.sequence_reduction",
             "attn.norm": "attention.sequence_reduction.layer_norm"}
    stage = "segformer.stages.{s}."
    return _hugging_face_layout({k: v for k, v in sd.items() if not k.startswith("head.")}, stage + "patch_embeddings",
                                stage + "blocks", stage + "layer_norm", names, ("attention.k_proj", "attention.v_proj"))


@pytest.fixture(scope="module")
def reference():
    return nvlabs_state_dict(**B0)


def test_nvlabs_checkpoint_computes_segformers_features(reference, tmp_path):
    path = tmp_path / "mit_b0.pth"
    torch.save(reference, path)
    m = timm.create_model("vitpe_mit_b0", pretrained=True,
                          pretrained_cfg_overlay=dict(file=str(path))).eval()
    x = torch.randn(1, 3, 75, 98)  # no multiple of 32: the remainder rows of the sr convolution are dropped alike
    with torch.no_grad():
        ours = m.forward_intermediates(x, intermediates_only=True)
        ref = nvlabs_forward(reference, x, **B0)
        for a, b in zip(ours, ref):
            assert a.shape == b.shape and (a - b).abs().max() < 1e-4
        assert torch.allclose(m(x), F.linear(ref[-1].mean((2, 3)), reference["head.weight"], reference["head.bias"]),
                              atol=1e-4)


@pytest.mark.parametrize("prefix", ["segformer.", ""])
def test_hugging_face_layout_converts_to_the_same_weights(reference, prefix):
    from_nvlabs = convert_segformer_state_dict(reference)
    from_hf = convert_segformer_state_dict(to_hugging_face(reference, prefix))
    assert from_hf.keys() == from_nvlabs.keys()
    assert all(torch.equal(from_hf[k], from_nvlabs[k]) for k in from_hf)
    m = timm.create_model("vitpe_mit_b0")
    m.load_state_dict(checkpoint_filter_fn(to_hugging_face(reference, prefix), m))  # strict


def test_mmseg_checkpoint_splits_backbone_and_decode_head(reference):
    wrapped = {"meta": {}, "state_dict": {**{f"backbone.{k}": v for k, v in reference.items() if "head" not in k},
                                          "decode_head.linear_c1.proj.weight": torch.zeros(256, 32),
                                          "decode_head.linear_fuse.conv.weight": torch.zeros(256, 1024, 1, 1),
                                          "decode_head.linear_fuse.bn.running_mean": torch.zeros(256),
                                          "decode_head.linear_pred.bias": torch.zeros(150),
                                          "decode_head.conv_seg.weight": torch.zeros(150, 256, 1, 1)}}
    sd = convert_segformer_state_dict(wrapped)
    assert "backbone.stages.0.blocks.1.attn.kv.weight" in sd and "backbone.stages.3.norm.bias" in sd
    assert {k for k in sd if k.startswith("decode_head.")} == {
        "decode_head.linear_c.0.proj.weight", "decode_head.fuse.weight", "decode_head.norm.running_mean",
        "decode_head.classifier.bias"}
    m = timm.create_model("vitpe_mit_b0", num_classes=0)
    missing, unexpected = m.load_state_dict(checkpoint_filter_fn(wrapped, m), strict=False)
    assert missing == [] and unexpected == []


@pytest.mark.parametrize("layout", [to_mmseg, to_transformers5])
def test_mmseg_and_transformers5_layouts_convert_to_the_same_weights(reference, layout):
    backbone = {k: v for k, v in reference.items() if not k.startswith("head.")}
    from_nvlabs = convert_segformer_state_dict(backbone)
    converted = convert_segformer_state_dict(layout(backbone))
    assert converted.keys() == from_nvlabs.keys()
    assert all(torch.equal(converted[k], from_nvlabs[k]) for k in converted)
    m = timm.create_model("vitpe_mit_b0", num_classes=0)
    m.load_state_dict(checkpoint_filter_fn({"state_dict": layout(backbone)}, m))  # strict


def test_a_segmentation_checkpoint_of_transformers5_converts_its_head(reference):
    sd = {**to_transformers5(reference), "decode_head.linear_projections.2.proj.weight": torch.zeros(256, 160),
          "decode_head.linear_fuse.weight": torch.zeros(256, 1024, 1, 1),
          "decode_head.batch_norm.bias": torch.zeros(256),
          "decode_head.classifier.weight": torch.zeros(150, 256, 1, 1)}
    sd = {k: v for k, v in sd.items() if "head." not in k or k.startswith("decode_head.")}
    out = convert_segformer_state_dict(sd)
    assert {k for k in out if k.startswith("decode_head.")} == {
        "decode_head.linear_c.2.proj.weight", "decode_head.fuse.weight", "decode_head.norm.bias",
        "decode_head.classifier.weight"}
    assert "backbone.stages.3.blocks.1.attn.kv.weight" in out


def test_an_mmseg_segformer_head_is_refused_by_name_and_its_backbone_loads(reference):
    """mmseg's SegformerHead (conv + BN + ReLU per stage) is not the All-MLP head vitpe builds."""
    wrapped = {"meta": {}, "state_dict": {
        **{f"backbone.{k}": v for k, v in to_mmseg(reference).items()},
        "decode_head.convs.0.conv.weight": torch.zeros(256, 32, 1, 1), "decode_head.convs.0.bn.weight": torch.ones(256),
        "decode_head.fusion_conv.conv.weight": torch.zeros(256, 1024, 1, 1),
        "decode_head.conv_seg.weight": torch.zeros(150, 256, 1, 1)}}
    with pytest.raises(KeyError, match=r"mmseg's SegformerHead \(decode_head.convs.0.bn.weight"):
        convert_segformer_state_dict(wrapped)
    m = timm.create_model("vitpe_mit_b0", num_classes=0)
    m.load_state_dict(checkpoint_filter_fn(wrapped, m))  # strict: the backbone alone
    x = torch.randn(1, 3, 64, 96)
    ref = nvlabs_forward(reference, x, **B0)
    with torch.no_grad():
        assert (m.eval().forward_intermediates(x, intermediates_only=True)[-1] - ref[-1]).abs().max() < 1e-4


def test_mixffn_checkpoint_refuses_a_model_without_mixffn(reference):
    m = timm.create_model("vitpe_mit_b0", pos="peg")
    with pytest.raises(ValueError, match="pos='mixffn'"):
        checkpoint_filter_fn(reference, m)
    both = timm.create_model("vitpe_mit_b0", pos="mixffn+rope_axial")
    both.load_state_dict(checkpoint_filter_fn(reference, both))


def test_unknown_keys_are_named():
    with pytest.raises(KeyError, match="attention.weird.weight"):
        convert_segformer_state_dict({"encoder.block.0.0.attention.weird.weight": torch.zeros(1)})
    with pytest.raises(KeyError, match="pos_embed"):
        convert_segformer_state_dict({"patch_embed1.proj.weight": torch.zeros(1), "pos_embed": torch.zeros(1)})


def test_vitpe_keys_pass_through(reference):
    sd = convert_segformer_state_dict(reference)
    assert convert_segformer_state_dict(sd).keys() == sd.keys()
