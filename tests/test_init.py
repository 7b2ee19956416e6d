"""--init: a new run (step 0) from weights. Backbone files (this project's backbone.pth) in every
method, the momentum / student copies included; a checkpoint in --out-dir wins and the resume
stays exact; a missing, unexpected or mis-shaped key and a foreign file fail in one line naming
it; the official MoCo v1/v2, v3 (ResNet-50, ViT-S) and SimSiam checkpoint layouts, each saved from
a restatement of the official model, land where the official model uses each tensor."""

import copy
import importlib
import json
from types import SimpleNamespace

import pytest
import torch
import torchvision
from helpers import VARIANTS, assert_same_tree, close_rel, one_thread, tiny_args  # noqa: F401
from test_official_moco import v3_build_mlp as build_mlp  # [ref: moco-v3 builder.py]
from torch import nn

import common as C
import moco
import simsiam

# where each method file keeps a copy of the exported backbone
COPIES = {"moco": "momentum_backbone", "byol": "momentum_backbone", "dino": "student.backbone"}
FLAGS = {module: flags for module, flags in reversed(VARIANTS.values())}  # moco: v1's (queue 32)


def run(module, out, monkeypatch, *flags):
    """module.main(tiny args + flags) -> the model and optimizer fit ran with."""
    got, fit = {}, module.fit
    monkeypatch.setattr(module, "fit", lambda m, o, d, a: got.update(m=m, o=o) or fit(m, o, d, a))
    small = ["--batch-size", "16", "--subset", "32", *FLAGS[module.__name__]]
    module.main(tiny_args(module, out, *small, *map(str, flags)))
    return got["m"], got["o"]


def trained_like(state: dict, seed: int) -> dict:
    """Other values under the same names and shapes (BN statistics too; counters + 3)."""
    g = torch.Generator().manual_seed(seed)
    noise = lambda v: torch.rand(v.shape, generator=g).to(v.dtype)
    return {k: v + noise(v) if v.is_floating_point() else v + 3 for k, v in state.items()}


def init(path, model, release=moco.RELEASE, main=False):
    C.init_weights(str(path), model, model.backbone, release, SimpleNamespace(is_main=main))


def fails(tmp_path, model, obj, release=moco.RELEASE) -> str:
    """--init of obj saved to a file -> its error, one line."""
    torch.save(obj, tmp_path / "w.pth")
    with pytest.raises(SystemExit) as e:
        init(tmp_path / "w.pth", model, release)
    assert str(e.value).startswith("error: --init ") and "\n" not in str(e.value)
    return str(e.value)


@pytest.mark.parametrize("name", sorted(FLAGS))
def test_a_backbone_file_goes_into_the_backbone_and_its_copies_at_step_0(
    tmp_path, monkeypatch, capsys, name
):
    """--epochs 0: backbone.pth (the exported backbone) is the file, the momentum copy / DINO's
    student backbone too; no optimizer state; one note says what was loaded."""
    module = importlib.import_module(name)
    model, _ = run(module, tmp_path / "a", monkeypatch, "--epochs", 0)
    weights = trained_like(module.encoder(model).state_dict(), seed=1)
    torch.save(weights, tmp_path / "w.pth")
    capsys.readouterr()
    model, opt = run(
        module, tmp_path / "b", monkeypatch, "--epochs", 0, "--init", tmp_path / "w.pth"
    )
    assert_same_tree(torch.load(tmp_path / "b" / "backbone.pth"), weights, "backbone.pth")
    if name in COPIES:
        assert_same_tree(model.get_submodule(COPIES[name]).state_dict(), weights, COPIES[name])
    assert not opt.state
    note = [x for x in capsys.readouterr().err.splitlines() if x.startswith("note: --init")]
    assert len(note) == 1 and f"loaded ({len(weights)} tensors); step 0, a new optimizer" in note[0]


def test_a_checkpoint_wins_over_init_and_the_resume_stays_exact(tmp_path, monkeypatch, capsys):
    """4 steps straight == 2 steps + 2 resumed with --init, which is noted as ignored."""
    flags = ["--subset", 64, "--batch-size", 16, "--epochs", 2]
    model, _ = run(moco, tmp_path / "w", monkeypatch, "--epochs", 0)
    torch.save(trained_like(moco.encoder(model).state_dict(), seed=1), tmp_path / "w.pth")
    run(moco, tmp_path / "a", monkeypatch, *flags, "--max-steps", 4)
    run(moco, tmp_path / "b", monkeypatch, *flags, "--max-steps", 2)
    capsys.readouterr()
    run(moco, tmp_path / "b", monkeypatch, *flags, "--max-steps", 4, "--init", tmp_path / "w.pth")
    assert f"note: --init ignored: {tmp_path / 'b' / 'ckpt.pth'} resumes" in capsys.readouterr().err
    a, b = (torch.load(tmp_path / o / "ckpt.pth", weights_only=False) for o in "ab")
    for key in ("model", "optimizer", "scaler", "ranks"):
        assert_same_tree(a[key], b[key], key)


def test_init_evaluates_the_loaded_weights_and_trains_from_them(tmp_path, monkeypatch):
    """--epochs 0 --init a/backbone.pth: the kNN record at step 0 is a's final one (the same
    weights evaluated); --epochs 1: that kNN at step 0, then training moves the weights."""
    knn = ["--subset", 64, "--batch-size", 16, "--knn-every", 1, "--knn-subset", 32]
    records = lambda o: [json.loads(x) for x in (tmp_path / o / "metrics.jsonl").open()]
    top1 = lambda o: {r["step"]: r["knn_top1"] for r in records(o) if "knn_top1" in r}
    run(moco, tmp_path / "a", monkeypatch, *knn, "--epochs", 1)
    init_a = ["--init", tmp_path / "a" / "backbone.pth"]
    run(moco, tmp_path / "b", monkeypatch, *knn, "--epochs", 0, *init_a)
    run(moco, tmp_path / "c", monkeypatch, *knn, "--epochs", 1, *init_a)
    assert top1("a")[0] != top1("a")[4]  # else the check below could not fail
    assert top1("b") == {0: top1("a")[4]} and top1("c") == {0: top1("a")[4], 4: top1("c")[4]}
    a, c = (torch.load(tmp_path / o / "backbone.pth") for o in "ac")
    assert any(not torch.equal(a[k], c[k]) for k in a)


# ---- mismatches and foreign files: one line naming the key ----------------------------------
@pytest.fixture(scope="module")
def v2():
    """A MoCo v2 model (small CNN, queue 32), other backbone weights for it, and those with a
    projector in the official layout (ResNet fc: the head) [ref: moco main_moco.py]."""
    flags = ["--arch", "smallcnn", "--img-size", "16", "--queue-size", "32", "--batch-size", "16"]
    model = moco.MoCo(C.parse_args(moco.Args, flags))
    w = trained_like(model.backbone.state_dict(), seed=2)
    fc = {f"fc.{k}": v for k, v in model.projector.state_dict().items()}
    return model, w, {f"state_dict.module.encoder_q.{k}": v for k, v in {**w, **fc}.items()}


def test_a_missing_unexpected_or_misshaped_key_fails_in_one_line_naming_it(tmp_path, v2):
    model, w, official = v2
    drop = lambda d, key: {k: v for k, v in d.items() if k != key}
    conv, fc2 = "3.weight", "state_dict.module.encoder_q.fc.2.weight"
    assert "backbone (missing 3.weight); pass" in fails(tmp_path, model, drop(w, conv))
    assert "backbone (unexpected extra); pass" in fails(tmp_path, model, {**w, "extra": w[conv]})
    short = {**w, conv: w[conv][..., :1]}
    shape = "shape of 3.weight: checkpoint [64, 32, 3, 1], model [64, 32, 3, 3]"
    assert f"backbone ({shape}); pass" in fails(tmp_path, model, short)
    # the official layout: named as this model names them
    bias = "state_dict.module.encoder_q.fc.0.bias"
    assert "model: missing projector.0.bias; see" in fails(tmp_path, model, drop(official, bias))
    odd = {**official, "state_dict.module.encoder_q.extra": w[conv], "other": w[conv]}
    assert "model: unexpected other, backbone.extra; see" in fails(tmp_path, model, odd)
    short = {**official, fc2: official[fc2][:64]}
    shape = "shape of projector.2.weight: checkpoint [64, 256], model [128, 256]"
    assert f"model: {shape}; see" in fails(tmp_path, model, short)


def test_a_foreign_file_fails_in_one_line(tmp_path, v2):
    model, w, _ = v2
    simsiam_layout = {"state_dict": {f"module.encoder.{k}": v for k, v in w.items()}}
    pass_ = "; pass a backbone file or an official release (README)"
    assert f"(missing 0.weight, 1.weight, 1.bias ...; unexpected a){pass_}" in fails(
        tmp_path, model, {"a": torch.zeros(3)}
    )
    assert f"(missing 0.weight, 1.weight, 1.bias ...){pass_}" in fails(tmp_path, model, [1, 2])
    missing = (
        "missing backbone.0.weight, backbone.1.weight, backbone.1.bias ...; unexpected encoder."
    )
    assert missing in fails(tmp_path, model, simsiam_layout)
    ckpt = {"model": model.state_dict(), "step": 3}  # this project's checkpoint: for --resume
    assert "unexpected model.queue, model.queue_ptr, model.backbone.0.weight" in fails(
        tmp_path, model, ckpt
    )
    no_release = fails(tmp_path, model, {**w, "x": w["0.weight"]}, release={})
    assert no_release.endswith("(unexpected x); pass a backbone file (README: no PyTorch release)")
    (tmp_path / "text.pth").write_text("not a checkpoint")
    for path in (tmp_path / "text.pth", tmp_path / "none.pth"):
        with pytest.raises(SystemExit) as e:
            init(path, model)
        assert str(e.value).startswith(f"error: cannot read checkpoint {path} (")


# ---- the official layouts: restated official models, saved as their main_*.py save them ------
S = 72  # px: the ImageNet stem (7x7 conv, max-pool), as the official ResNet-50
X = torch.randn(2, 3, S, S, generator=torch.Generator().manual_seed(0))  # the images compared


def resnet50(fc: nn.Module, seed: int, **kw) -> nn.Module:
    """A torchvision ResNet-50 whose fc is the official head [ref: moco/moco-v3/simsiam
    builder.py], randomized."""
    torch.manual_seed(seed)
    net = torchvision.models.resnet50(**kw)
    net.fc = fc
    return randomized(net, seed)


def randomized(net: nn.Module, seed: int) -> nn.Module:
    """Norm affines and BN statistics off their init, positions and cls token drawn: a tensor
    loaded into the wrong place, or not at all, shows in the forward."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for k, t in net.state_dict().items():
            if k.endswith("running_var"):
                t.copy_(torch.rand(t.shape, generator=g) + 0.5)
            elif t.is_floating_point() and (t.dim() == 1 or k in ("cls_token", "pos_embed")):
                t.add_(torch.randn(t.shape, generator=g) * 0.1)
    return net


class TimmBlock(nn.Module):
    """[ref: timm vision_transformer.py Block, Attention, Mlp; moco-v3 vits.py: qkv_bias=True,
    LayerNorm eps 1e-6] pre-norm attention and MLP (GELU), timm's names."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads, self.attn, self.mlp = heads, nn.Module(), nn.Module()
        self.norm1, self.norm2 = nn.LayerNorm(dim, eps=1e-6), nn.LayerNorm(dim, eps=1e-6)
        self.attn.qkv, self.attn.proj = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)
        self.mlp.fc1, self.mlp.fc2 = nn.Linear(dim, 4 * dim), nn.Linear(4 * dim, dim)

    def forward(self, x):
        B, N, D = x.shape
        qkv = self.attn.qkv(self.norm1(x)).reshape(B, N, 3, self.heads, D // self.heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4)  # [B, heads, N, D / heads] each
        a = (q @ k.transpose(-2, -1) * (D // self.heads) ** -0.5).softmax(dim=-1)
        x = x + self.attn.proj((a @ v).transpose(1, 2).reshape(B, N, D))
        return x + self.mlp.fc2(nn.functional.gelu(self.mlp.fc1(self.norm2(x))))


class TimmViT(nn.Module):
    """[ref: timm VisionTransformer forward_features (the final-norm cls token) and head; moco-v3
    vits.py vit_small: dim 384, depth 12, 12 heads; the head: the projector (builder.py)]"""

    def __init__(self, img: int, patch: int, head: nn.Module, seed: int):
        super().__init__()
        torch.manual_seed(seed)
        self.patch_embed, dim = nn.Module(), 384
        self.patch_embed.proj = nn.Conv2d(3, dim, patch, patch)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, 1 + (img // patch) ** 2, dim))
        self.blocks = nn.Sequential(*[TimmBlock(dim, 12) for _ in range(12)])
        self.norm, self.head = nn.LayerNorm(dim, eps=1e-6), head
        randomized(self, seed)

    def features(self, x):
        x = self.patch_embed.proj(x).flatten(2).transpose(1, 2)  # [B, N, dim]
        x = torch.cat([self.cls_token.expand(len(x), -1, -1), x], dim=1) + self.pos_embed
        return self.norm(self.blocks(x))[:, 0]

    def forward(self, x):
        return self.head(self.features(x))


def trunk(net: nn.Module):
    """The official encoder without its head: the cls token (ViT), the pooled features (ResNet)."""
    if isinstance(net, TimmViT):
        return net.features
    body = nn.Sequential(*list(net.children())[:-1])  # up to the average pool
    return lambda x: body(x).flatten(1)


def saved(tmp_path, modules: dict, buffers=None, **extra) -> str:
    """{"epoch", "arch", "state_dict": DDP(model).state_dict(), ...} [ref: main_moco.py,
    main_simsiam.py save_checkpoint]: the DDP wrapper prefixes "module."."""
    state = {f"module.{n}.{k}": v for n, m in modules.items() for k, v in m.state_dict().items()}
    state.update({f"module.{k}": v for k, v in (buffers or {}).items()})
    path = str(tmp_path / "official.pth.tar")
    torch.save({"epoch": 100, "arch": "resnet50", "state_dict": state, **extra}, path)
    return path


def assert_same_chain(official: nn.Module, ours: list, heads: list, x: torch.Tensor):
    """official's trunk, then its heads in turn == this model's modules `ours` in turn: each
    output agrees (the mode each is in)."""
    with torch.no_grad():
        a, b = trunk(official)(x), x
        for i, (f, g) in enumerate(zip([None, *heads], ours)):
            a, b = a if f is None else f(a), g(b)
            close_rel(b, a, f"output {i}")


def loaded(tmp_path, monkeypatch, capsys, module, path, *flags) -> tuple[nn.Module, str]:
    """module.main(... --init path --epochs 0) -> the model in eval mode, the --init note."""
    capsys.readouterr()
    monkeypatch.setattr(C, "neighbours", lambda *a: None)  # the ResNet-50 forwards it costs
    flags = ["--batch-size", 8, "--subset", 8, "--epochs", 0, *flags, "--init", path]
    model, _ = run(module, tmp_path / "run", monkeypatch, *flags)
    note = [x for x in capsys.readouterr().err.splitlines() if x.startswith("note: --init")]
    assert len(note) == 1
    return model.eval(), note[0]


def test_moco_v1_v2_official_layouts(tmp_path, monkeypatch, capsys):
    """v2 as released (encoder_q only: the momentum encoder starts as its copy, as builder.py
    starts it; the queue keeps its init); v1 as main_moco.py saves it in training (encoder_k, the
    queue [dim, K] (here [K, dim]: its init), queue_ptr and the optimizer)."""
    q = resnet50(nn.Sequential(nn.Linear(2048, 2048), nn.ReLU(), nn.Linear(2048, 128)), 1).eval()
    path = saved(tmp_path, {"encoder_q": q})
    flags = ["--version", "v2", "--arch", "resnet50", "--img-size", S, "--queue-size", 32]
    model, note = loaded(tmp_path, monkeypatch, capsys, moco, path, *flags)
    assert_same_chain(q, [model.backbone, model.projector], [q.fc], X)
    assert_same_chain(q, [model.momentum_backbone, model.momentum_projector], [q.fc], X)
    copies = "momentum_backbone copied from backbone (not in the file); momentum_projector"
    assert copies in note and note.endswith("; at init: queue, queue_ptr; step 0, a new optimizer")
    q, k = (resnet50(nn.Linear(2048, 128), seed).eval() for seed in (2, 3))
    queue = {"queue": torch.randn(128, 32), "queue_ptr": torch.zeros(1, dtype=torch.long)}
    optimizer = {"state": {0: {"momentum_buffer": torch.ones(3)}}, "param_groups": []}
    path = saved(tmp_path, {"encoder_q": q, "encoder_k": k}, queue, optimizer=optimizer)
    model, note = loaded(tmp_path, monkeypatch, capsys, moco, path, "--version", "v1", *flags[2:])
    assert_same_chain(q, [model.backbone, model.projector], [q.fc], X)
    assert_same_chain(k, [model.momentum_backbone, model.momentum_projector], [k.fc], X)
    assert "copied" not in note and "; at init: queue, queue_ptr;" in note


def v3_official(arch: str, img: int, seed: int) -> nn.Module:
    """[ref: moco-v3 builder.py MoCo_ResNet / MoCo_ViT] the ResNet's fc, the ViT's head: the
    projector (mlp_dim 64, dim 32 here)."""
    if arch == "vit_small":
        return TimmViT(img, 16, build_mlp(3, 384, 64, 32), seed).eval()
    return resnet50(build_mlp(2, 2048, 64, 32), seed, zero_init_residual=True).eval()


def test_moco_v3_official_layouts_resnet50_and_vit_small(tmp_path, monkeypatch, capsys):
    """As main_moco.py saves them in training: base_encoder, momentum_encoder, predictor, the
    optimizer and the scaler; the ViT in timm's names."""
    for arch, x in (("resnet50", X), ("vit_small", X[..., :32, :32])):
        base, momentum = (v3_official(arch, x.shape[-1], seed) for seed in (4, 5))
        predictor = randomized(build_mlp(2, 32, 64, 32, last_bn=arch == "vit_small"), 6).eval()
        extra = {"optimizer": {"state": {}, "param_groups": []}, "scaler": {"scale": 65536.0}}
        modules = {"base_encoder": base, "momentum_encoder": momentum, "predictor": predictor}
        path = saved(tmp_path, modules, **extra)
        flags = ["--version", "v3", "--arch", arch, "--img-size", x.shape[-1], "--patch-size", 16]
        flags += ["--hidden-dim", 64, "--dim", 32, "--queue-size", 0]
        model, note = loaded(tmp_path, monkeypatch, capsys, moco, path, *flags)
        head = base.head if arch == "vit_small" else base.fc
        assert_same_chain(
            base, [model.backbone, model.projector, model.predictor], [head, predictor], x
        )
        head = momentum.head if arch == "vit_small" else momentum.fc
        assert_same_chain(momentum, [model.momentum_backbone, model.momentum_projector], [head], x)
        assert "copied" not in note and "; at init: -;" in note, arch


def test_simsiam_official_layout(tmp_path, monkeypatch, capsys):
    """encoder (ResNet-50, its fc: the projector) and predictor [ref: simsiam builder.py] as
    main_simsiam.py saves them. The projector's frozen output bias is dropped (simsiam.py
    projection_mlp): eval mode gives the official outputs of a zero bias; training (BN on batch
    statistics) those of the official bias."""
    fc = [nn.Linear(2048, 2048, bias=False), nn.BatchNorm1d(2048), nn.ReLU(inplace=True)]
    fc += [nn.Linear(2048, 2048, bias=False), nn.BatchNorm1d(2048), nn.ReLU(inplace=True)]
    fc += [nn.Linear(2048, 64), nn.BatchNorm1d(64, affine=False)]
    encoder = resnet50(nn.Sequential(*fc), 7, zero_init_residual=True).eval()
    predictor = [nn.Linear(64, 16, bias=False), nn.BatchNorm1d(16), nn.ReLU(inplace=True)]
    predictor = randomized(nn.Sequential(*predictor, nn.Linear(16, 64)), 8).eval()
    path = saved(tmp_path, {"encoder": encoder, "predictor": predictor})
    flags = ["--arch", "resnet50", "--img-size", S, "--dim", 64, "--pred-dim", 16]
    flags += ["--proj-hidden", 2048, "--proj-layers", 3]
    model, note = loaded(tmp_path, monkeypatch, capsys, simsiam, path, *flags)
    ours = [model.backbone, model.projector, model.predictor]
    no_bias = copy.deepcopy(encoder.fc)
    assert no_bias[6].bias.abs().max() > 0  # else the two cases below were one
    with torch.no_grad():
        no_bias[6].bias.zero_()
    assert_same_chain(encoder, ours, [no_bias, predictor], X)
    assert "; at init: -;" in note
    for net in (encoder, predictor, model):
        net.train()
    assert_same_chain(encoder, ours, [encoder.fc, predictor], X)
