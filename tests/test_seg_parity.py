"""vitpe's MiT segmentor trains like SegFormer: the same loss and gradients as Hugging Face's
SegformerForSemanticSegmentation from the same weights, an All-MLP head whose composed form equals
SegFormer's concatenate-and-fuse one, a bf16 loss equal to cross-entropy on float32 logits, and a
compiled training step on CPU."""
import re

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import vitpe  # noqa: F401
from vitpe.engine.segmentation import pixel_loss
from vitpe.models.mit_convert import convert_segformer_state_dict
from vitpe.models.segmentor import AllMLPHead, build_segmentor

DIMS, HEADS, CLASSES, WIDTH = (8, 16, 40, 64), (1, 2, 5, 8), 5, 16
# transformers 5 names its modules differently from the checkpoints on the hub (and from 4.x):
# back to the checkpoints' names, which vitpe's converter reads
TO_CHECKPOINT = [(r"stages\.(\d+)\.patch_embeddings\.", r"encoder.patch_embeddings.\1."),
                 (r"stages\.(\d+)\.blocks\.", r"encoder.block.\1."),
                 (r"stages\.(\d+)\.layer_norm\.", r"encoder.layer_norm.\1."),
                 (r"attention\.q_proj", "attention.self.query"), (r"attention\.k_proj", "attention.self.key"),
                 (r"attention\.v_proj", "attention.self.value"), (r"attention\.o_proj", "attention.output.dense"),
                 (r"attention\.sequence_reduction\.sequence_reduction", "attention.self.sr"),
                 (r"attention\.sequence_reduction\.layer_norm", "attention.self.layer_norm"),
                 (r"mlp\.fc1", "mlp.dense1"), (r"mlp\.fc2", "mlp.dense2"), (r"layernorm_before", "layer_norm_1"),
                 (r"layernorm_after", "layer_norm_2"), (r"linear_projections", "linear_c")]


def checkpoint_names(sd: dict) -> dict:
    out = {}
    for key, value in sd.items():
        for pattern, repl in TO_CHECKPOINT:
            key = re.sub(pattern, repl, key)
        out[key] = value
    return out


def same_eps(*models: nn.Module) -> None:
    """SegFormer's blocks use eps 1e-6 (vitpe, NVlabs), Hugging Face's 1e-5: one value for the comparison."""
    for model in models:
        for m in model.modules():
            if isinstance(m, nn.LayerNorm):
                m.eps = 1e-5


def test_training_step_matches_hugging_face_segformer():
    transformers = pytest.importorskip("transformers")
    config = transformers.SegformerConfig(hidden_sizes=list(DIMS), depths=[2, 2, 2, 2], decoder_hidden_size=WIDTH,
                                          num_labels=CLASSES, semantic_loss_ignore_index=255, drop_path_rate=0.0,
                                          classifier_dropout_prob=0.0)
    theirs = transformers.SegformerForSemanticSegmentation(config).train()
    ours = build_segmentor("vitpe_mit_b0", CLASSES, img_size=64, head_dim=WIDTH, dropout=0.0,
                           embed_dims=DIMS).train()
    ours.load_state_dict(convert_segformer_state_dict(checkpoint_names(theirs.state_dict())))  # strict
    same_eps(ours, theirs)
    x = torch.randn(2, 3, 64, 96)
    labels = torch.randint(0, CLASSES, (2, 64, 96))
    labels[:, :5] = 255
    loss = pixel_loss(ours(x), labels, 255)
    ref = theirs(pixel_values=x, labels=labels).loss
    torch.testing.assert_close(loss, ref, rtol=1e-5, atol=1e-5)
    loss.backward()
    ref.backward()
    grads = convert_segformer_state_dict(checkpoint_names({k: p.grad for k, p in theirs.named_parameters()}))
    for name, p in ours.named_parameters():
        torch.testing.assert_close(p.grad, grads[name], rtol=1e-3, atol=1e-5, msg=lambda m: f"{name}: {m}")


def concat_fuse(head: AllMLPHead, feats: list[torch.Tensor]) -> torch.Tensor:
    """SegFormer's own order of operations: project, upsample, concatenate (deepest first), fuse."""
    size = feats[0].shape[-2:]
    maps = [F.interpolate(p(f), size=size, mode="bilinear", align_corners=False) for p, f in zip(head.linear_c, feats)]
    return head.classifier(head.dropout(head.act(head.norm(head.fuse(torch.cat(maps[::-1], dim=1))))))


def test_composed_head_equals_concatenate_and_fuse():
    head = AllMLPHead(DIMS, CLASSES, WIDTH, dropout=0.0).double().train()
    # odd sizes: upsampling by non-integer factors, edges included
    feats = [torch.randn(2, c, s, s + 3, dtype=torch.float64, requires_grad=True)
             for c, s in zip(DIMS, (15, 8, 4, 2))]
    params = [*feats, *head.parameters()]
    out = head(feats)
    grads = torch.autograd.grad(out.square().sum(), params)
    ref = concat_fuse(head, feats)
    ref_grads = torch.autograd.grad(ref.square().sum(), params)
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-12)
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g, r, rtol=1e-10, atol=1e-12)


def test_bf16_loss_equals_cross_entropy_on_float32_logits():
    logits = torch.randn(2, 7, 30, 40).bfloat16().requires_grad_()
    target = torch.randint(0, 7, (2, 30, 40))
    target[0, :3] = 255
    loss = pixel_loss(logits, target, 255)
    ref = F.cross_entropy(logits.float(), target, ignore_index=255)
    assert loss.dtype == torch.float32 and loss.item() == ref.item()
    (grad,), (ref_grad,) = torch.autograd.grad(loss, logits), torch.autograd.grad(ref, logits)
    assert grad.dtype == torch.bfloat16 and torch.equal(grad, ref_grad)


def test_compiled_training_step_equals_eager():
    """train_seg.py's compile call (``segmentation.compile_model``) on a tiny MiT, with a CPU backend."""
    from vitpe.engine.segmentation import compile_model

    model = build_segmentor("vitpe_mit_b0", CLASSES, img_size=32, head_dim=WIDTH, dropout=0.0, embed_dims=DIMS,
                            depths=(1, 1, 1, 1)).train()
    x, labels = torch.randn(2, 3, 32, 32), torch.randint(0, CLASSES, (2, 32, 32))
    eager = pixel_loss(model(x), labels, 255)
    eager_grads = torch.autograd.grad(eager, list(model.parameters()))
    net = compile_model(model, backend="aot_eager")
    loss = pixel_loss(net(x), labels, 255)
    grads = torch.autograd.grad(loss, list(model.parameters()))
    torch.testing.assert_close(loss, eager, rtol=1e-5, atol=1e-6)
    for g, r in zip(grads, eager_grads):
        torch.testing.assert_close(g, r, rtol=1e-4, atol=1e-6)


def test_saved_tensor_report_runs_and_shows_the_composed_head():
    """benchmarks/saved_tensors.py on a tiny MiT: vitpe keeps less for the backward than SegFormer
    and makes no concatenated map in the forward."""
    pytest.importorskip("transformers")
    from script_modules import load_script

    bench = load_script("benchmarks/saved_tensors.py")
    args = bench.parse(["--variant", "b0", "--size", "64"])
    ours, theirs = (bench.analyse(side["model"], side["step"], side["names"]) for side in bench.build(args))
    assert sum(ours["saved"].values()) < sum(theirs["saved"].values())
    assert ours["ops"]["forward"]["cat"] == 0 and theirs["ops"]["forward"]["cat"] == 1
    assert ours["gflop"] < theirs["gflop"]
    assert theirs["saved"][("head", "cat")] > 0  # the names of both models meet in one vocabulary
    assert "| **total** |" in bench.saved_table(ours["saved"], theirs["saved"], 0.1)
    assert "| forward | cat | 0 | 1 |" in bench.ops_table(ours, theirs)


@pytest.mark.parametrize("size, new", [((16, 16), (128, 128)), ((7, 11), (30, 45)), ((30, 45), (7, 11)),
                                       ((1, 5), (4, 9)), ((5, 5), (5, 20))])
def test_bilinear_resize_as_products_is_f_interpolate(size, new):
    """``resize_bilinear`` (two products) gives ``F.interpolate(mode='bilinear')``'s values and
    gradients, up or down, in channels-first and channels-last layouts."""
    from vitpe.pos.functional import resize_bilinear

    x = torch.randn(2, 3, *size, dtype=torch.float64, requires_grad=True)
    ref = F.interpolate(x, size=new, mode="bilinear", align_corners=False)
    w = torch.randn_like(ref)
    ref_grad = torch.autograd.grad((ref * w).sum(), x)[0]
    for ours in (resize_bilinear(x, new), resize_bilinear(x.permute(0, 2, 3, 1), new, channels_last=True).permute(0, 3, 1, 2)):
        torch.testing.assert_close(ours, ref, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(torch.autograd.grad((ours * w).sum(), x)[0], ref_grad, rtol=1e-10, atol=1e-10)
    y = x.detach().float()
    # float32: the sampling positions rounded a little differently at non-integer scales
    torch.testing.assert_close(resize_bilinear(y, new), F.interpolate(y, size=new, mode="bilinear"), rtol=1e-4,
                               atol=1e-5)
