"""--init from the official releases: each method's RELEASE puts every tensor of its official
checkpoint layout where the official model uses it. The official models are restated (here, or in
the test_official_* files, each cited by repo/file), their weights saved under the official layout
(names, nesting, the non-tensor entries), loaded by the method's main (--init, --epochs 0); then
the restated official model and the project's give the same features and head outputs (eval mode),
and the memory bank / centre is the file's where it fits. A file with one tensor removed, and
another method's file, fail in one line naming a key."""

import argparse

import pytest
import torch
import torch.nn.functional as F
import torchvision
from helpers import close_rel, one_thread, tiny_args  # noqa: F401 (one_thread: autouse)
from test_official_cmc import CMCResNet50
from test_official_dino import DINOHead, MultiCropWrapper, VisionTransformer
from test_official_instdisc import CifarResNet18
from test_official_swav import OfficialResNet50
from torch import nn

import barlow_twins
import cmc
import common as C
import dino
import instdisc
import swav

N, RUN = 32, ["--subset", 32, "--batch-size", 8, "--epochs", 0]  # N: training images, bank rows
# each method's flags: small heads; ResNets at 72 px, above 64 px (the 7x7 stem and max-pool)
SWAV = ["--arch", "resnet50", "--img-size", 72, "--hidden-dim", 64, "--dim", 16]
SWAV += ["--n-prototypes", 32, "--n-local", 0]
BARLOW = ["--arch", "resnet50", "--img-size", 72, "--projector", "64-64-32"]
DINO_HEAD = {"hidden_dim": 32, "bottleneck_dim": 16, "out_dim": 64}
DINO = ["--hidden-dim", 32, "--bottleneck-dim", 16, "--out-dim", 64, "--n-local", 0]
DINO_VIT = ["--arch", "vit_tiny", "--img-size", 32, "--patch-size", 4, *DINO]
DINO_RN = ["--arch", "resnet18", "--img-size", 72, *DINO]
INSTDISC = ["--dim", 16, "--nce-k", 8]
CMC = ["--arch", "resnet50", "--width", 0.5, "--img-size", 72, "--dim", 16, "--nce-k", 8]


def scrambled(net: nn.Module, seed: int = 0) -> nn.Module:
    """Every BN's affine and running statistics made distinct (1 / 0 at init): a tensor loaded into
    another layer, or not at all, changes the eval-mode output."""
    g = torch.Generator().manual_seed(seed)
    for m in net.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            for t in [m.running_var] + ([m.weight] if m.affine else []):
                t.data.uniform_(0.5, 1.5, generator=g)
            for t in [m.running_mean] + ([m.bias] if m.affine else []):
                t.data.normal_(0.0, 0.1, generator=g)
            m.num_batches_tracked.fill_(1000)
    return net.eval()


def sgd_state(net: nn.Module) -> dict:
    """An SGD state dict (param_groups; momentum buffers, here of the last two parameters only:
    any optimizer state is dropped, and the files stay small)."""
    opt = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9)
    for p in list(net.parameters())[-2:]:
        opt.state[p]["momentum_buffer"] = torch.randn_like(p)
    return opt.state_dict()


def prefixed(prefix: str, state: dict) -> dict:
    return {prefix + k: v for k, v in state.items()}


def init_run(module, tmp_path, monkeypatch, state: dict, *flags):
    """state saved as the official file; module.main(--init it, --epochs 0) -> the model as --init
    left it (eval mode). neighbours.png is not drawn (seconds of ResNet-50 features)."""
    path = tmp_path / "official.pth"
    torch.save(state, path)
    got, real = {}, C.resume

    def spy(*a):  # the real C.resume; the model kept
        got["model"] = a[1]
        return real(*a)

    monkeypatch.setattr(C, "resume", spy)
    monkeypatch.setattr(C, "neighbours", lambda *a: None, raising=False)  # its figure: not here
    module.main(tiny_args(module, tmp_path / "run", "--init", path, *RUN, *flags))
    return C.unwrap(got["model"]).eval()


def tensor_keys(d: dict, pre: str = "") -> list[str]:  # nested dicts -> dotted keys of tensors
    keys = [f"{pre}{k}" for k, v in d.items() if torch.is_tensor(v)]
    nested = [tensor_keys(v, f"{pre}{k}.") for k, v in d.items() if isinstance(v, dict)]
    return keys + [k for ks in nested for k in ks]


def fails_naming(module, tmp_path, state: dict, key, *flags):
    """module.main(--init state's file) ends in one error line that names key; key None (another
    method's file): among the unexpected keys it names, one of the file's (or its end)."""
    path = tmp_path / "bad.pth"
    torch.save(state, path)
    with pytest.raises(SystemExit) as e:
        module.main(tiny_args(module, tmp_path / "bad", "--init", path, *RUN, *flags))
    msg = str(e.value)
    assert msg.startswith("error: --init") and "\n" not in msg, msg
    if key:
        assert key in msg, msg
    else:
        named = msg.split("unexpected ")[1].split(";")[0].split(")")[0].split(", ")
        named = [n.removesuffix(" ...") for n in named]
        keys = tensor_keys(state)
        assert any(k.endswith(n) for n in named for k in keys), (named, msg)


# ==== SwAV ==================================================================================


@pytest.mark.parametrize("layout", ["checkpoint", "release"])
def test_swav_official_files(tmp_path, monkeypatch, layout):
    """main_swav.py's checkpoint.pth.tar {epoch, state_dict (DDP: module.), optimizer} and the
    released swav_800ep_pretrain.pth.tar (that state dict alone) [ref: main_swav.py, hubconf.py]:
    the official ResNet-50 (its padding layer + 7x7 conv with padding 2), projection_head and
    prototypes give the project's h, z and scores."""
    torch.manual_seed(0)
    net = scrambled(OfficialResNet50(64, 16, 32))
    state = prefixed("module.", net.state_dict())
    if layout == "checkpoint":
        state = {"epoch": 800, "state_dict": state, "optimizer": sgd_state(net)}
    model = init_run(swav, tmp_path, monkeypatch, state, *SWAV)
    x = torch.randn(2, 3, 72, 72)
    with torch.no_grad():
        h = net.forward_backbone(x)
        close_rel(model.backbone(x), h, "h")
        z = F.normalize(net.projection_head(h), dim=1, p=2)  # [ref: resnet50.py forward_head]
        close_rel(F.normalize(model.projector(h), dim=1), z, "z")
        close_rel(model.prototypes(z), net.prototypes(z), "scores")
    if layout == "checkpoint":
        state["state_dict"].pop("module.prototypes.weight")
        fails_naming(swav, tmp_path, state, "prototypes.weight", *SWAV)
        fails_naming(dino, tmp_path, state, None, *DINO_VIT)  # foreign


# ==== Barlow Twins ==========================================================================


class OfficialBarlowTwins(nn.Module):
    """[ref: barlowtwins main.py BarlowTwins] torchvision resnet50(zero_init_residual=True) with
    fc = Identity; projector (Linear without bias, BN, ReLU) per width but the last, then a Linear
    without bias; bn = BatchNorm1d(affine=False) on the projector output (the loss's)."""

    def __init__(self, widths):
        super().__init__()
        self.backbone = torchvision.models.resnet50(zero_init_residual=True)
        self.backbone.fc = nn.Identity()
        sizes, layers = [2048, *widths], []
        for i in range(len(sizes) - 2):
            layers += [nn.Linear(sizes[i], sizes[i + 1], bias=False), nn.BatchNorm1d(sizes[i + 1])]
            layers.append(nn.ReLU(inplace=True))
        self.projector = nn.Sequential(*layers, nn.Linear(sizes[-2], sizes[-1], bias=False))
        self.bn = nn.BatchNorm1d(sizes[-1], affine=False)


@pytest.mark.parametrize("layout", ["checkpoint", "resnet50.pth"])
def test_barlow_twins_official_files(tmp_path, monkeypatch, layout):
    """main.py's checkpoint.pth {epoch, model (DDP: module.), optimizer}: backbone and projector
    land (the loss's bn statistics are not used); the released resnet50.pth (the backbone's state
    dict, torchvision names) loads as a backbone file [ref: barlowtwins main.py, hubconf.py]."""
    torch.manual_seed(0)
    net = scrambled(OfficialBarlowTwins([64, 64, 32]))
    state = {"epoch": 1000, "model": prefixed("module.", net.state_dict())}
    state["optimizer"] = sgd_state(net)
    if layout == "resnet50.pth":
        state = net.backbone.state_dict()
    model = init_run(barlow_twins, tmp_path, monkeypatch, state, *BARLOW)
    x = torch.randn(2, 3, 72, 72)
    with torch.no_grad():
        h = net.backbone(x)
        close_rel(model.backbone(x), h, "h")
        if layout == "checkpoint":
            close_rel(model.projector(model.backbone(x)), net.projector(h), "z")
    if layout == "checkpoint":
        state["model"].pop("module.projector.3.weight")
        fails_naming(barlow_twins, tmp_path, state, "projector.3.weight", *BARLOW)
        fails_naming(dino, tmp_path, state, None, *DINO_VIT)  # foreign


# ==== DINO ==================================================================================


def official_dino(vit: bool, seed: int) -> MultiCropWrapper:
    """[ref: main_dino.py] MultiCropWrapper(vit_tiny(patch 4) or torchvision resnet18, DINOHead),
    the weight-normed last layer's g away from 1 (as with norm_last_layer False)."""
    torch.manual_seed(seed)
    backbone = VisionTransformer(32, 4, 192, 12, 3) if vit else torchvision.models.resnet18()
    net = MultiCropWrapper(backbone, DINOHead(192 if vit else 512, DINO_HEAD))
    net.head.last_layer.weight_g.data.uniform_(0.5, 1.5)
    net.head.last_layer.weight_v.data.normal_()  # (the restatement leaves it to a load)
    return scrambled(net, seed)


@pytest.mark.parametrize("arch", ["vit_tiny", "resnet18"])
def test_dino_official_checkpoint(tmp_path, monkeypatch, arch):
    """main_dino.py's checkpoint.pth {student (DDP: module.), teacher (DDP for ResNets only,
    another EMA state), optimizer, epoch, args, dino_loss (center), fp16_scaler}: the student and
    the teacher land apart, the weight-normed last layers' weight_g / weight_v included, the
    centre is the file's [ref: main_dino.py save_dict, vision_transformer.py]."""
    vit = arch == "vit_tiny"
    student, teacher = official_dino(vit, 0), official_dino(vit, 1)
    center = torch.randn(1, 64)
    state = {"student": prefixed("module.", student.state_dict()), "epoch": 100}
    state["teacher"] = prefixed("" if vit else "module.", teacher.state_dict())
    state["optimizer"] = sgd_state(student)
    state["args"] = argparse.Namespace(arch=arch, out_dim=64, norm_last_layer=False)
    state["dino_loss"] = {"center": center}
    state["fp16_scaler"] = {"scale": 65536.0, "growth_factor": 2.0, "_growth_tracker": 0}
    flags = DINO_VIT if vit else DINO_RN
    model = init_run(dino, tmp_path, monkeypatch, state, *flags)
    x = torch.randn(2, 3, *(2 * [32 if vit else 72]))
    with torch.no_grad():
        for mine, net, who in ((model.student, student, "student"), (model.teacher, teacher, "t")):
            close_rel(mine.backbone(x), net.backbone(x), f"{who} h")
            close_rel(mine([x]), net([x]), f"{who} logits")
    close_rel(model.center, center, "center")
    if not vit:
        return
    state["teacher"].pop("head.last_layer.weight_g")
    fails_naming(dino, tmp_path, state, "teacher.head.last_layer.parametrizations", *flags)
    flags = ["--arch", "resnet18", "--img-size", 32, *INSTDISC]
    fails_naming(instdisc, tmp_path, state, None, *flags)  # foreign


def test_dino_released_vit_backbone(tmp_path, monkeypatch):
    """dino_deitsmall16_pretrain.pth and the like: the ViT's state dict alone, timm names
    (patch_embed.proj, attn.qkv, mlp.fc1) [ref: hubconf.py, vision_transformer.py]: student and
    teacher backbones both load it."""
    net = official_dino(True, 0)
    model = init_run(dino, tmp_path, monkeypatch, net.backbone.state_dict(), *DINO_VIT)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        close_rel(model.student.backbone(x), net.backbone(x), "student h")
        close_rel(model.teacher.backbone(x), net.backbone(x), "teacher h")


# ==== InstDisc ==============================================================================


def lemniscate(rows: int) -> dict:
    """[ref: lemniscate lib/NCEAverage.py] the state dict of NCEAverage: params [K, T, Z, momentum],
    memory. (main.py and cifar.py pickle the module itself, which a weights-only load refuses.)"""
    return {"params": torch.tensor([8, 0.07, 123.0, 0.5]), "memory": torch.randn(rows, 16)}


@pytest.mark.parametrize("script", ["main.py", "cifar.py"])
def test_instdisc_official_checkpoints(tmp_path, monkeypatch, script, capsys):
    """main.py's checkpoint {epoch, arch, state_dict (DataParallel: module.) of models/resnet.py
    with fc -> 128-d, lemniscate, best_prec1, optimizer} and cifar.py's {net (resnet_cifar.py:
    linear, shortcut), lemniscate, acc, epoch}: h, the l2-normalised embedding and the memory
    bank; a bank of another data set's size keeps its init, with a note."""
    torch.manual_seed(0)
    size, rows = (72, N) if script == "main.py" else (32, N + 1)
    if script == "main.py":  # torchvision's ResNet-18 [ref: models/resnet.py; AvgPool2d(7): 224 px]
        net = scrambled(torchvision.models.resnet18(num_classes=16))
        state = {"epoch": 200, "arch": "resnet18", "best_prec1": 40.0}
        state.update(state_dict=prefixed("module.", net.state_dict()), optimizer=sgd_state(net))
        fc, net.fc = net.fc, nn.Identity()
    else:
        net = scrambled(CifarResNet18(16))
        state = {"net": prefixed("module.", net.state_dict()), "acc": 80.0, "epoch": 199}
        fc = net.linear
    state["lemniscate"] = lemniscate(rows)
    flags = ["--arch", "resnet18", "--img-size", size, *INSTDISC]
    model = init_run(instdisc, tmp_path, monkeypatch, state, *flags)
    x = torch.randn(2, 3, size, size)
    with torch.no_grad():
        h = net(x) if script == "main.py" else F.avg_pool2d(cifar_trunk(net, x), 4).flatten(1)
        close_rel(model.backbone(x), h, "h")
        close_rel(F.normalize(model.projector(model.backbone(x))), F.normalize(fc(h)), "z")
    if script == "main.py":
        close_rel(model.bank, state["lemniscate"]["memory"], "bank")
        state["state_dict"].pop("module.fc.bias")
        fails_naming(instdisc, tmp_path, state, "projector.bias", *flags)
        fails_naming(dino, tmp_path, state, None, *DINO_VIT)  # foreign
    else:
        assert model.bank.shape == (N, 16)
        note = [x for x in capsys.readouterr().err.splitlines() if x.startswith("note: --init")]
        assert len(note) == 1 and "bank" in note[0], note


def cifar_trunk(net: CifarResNet18, x: torch.Tensor) -> torch.Tensor:
    """[ref: lemniscate models/resnet_cifar.py ResNet.forward] up to layer4."""
    out = F.relu(net.bn1(net.conv1(x)))
    return net.layer4(net.layer3(net.layer2(net.layer1(out))))


# ==== CMC ===================================================================================


def cmc_pooled(net: CMCResNet50, x: torch.Tensor) -> torch.Tensor:
    """[ref: CMC models/resnet.py ResNet.forward(layer=6)]: the pooled features before fc."""
    x = net.maxpool(F.relu(net.bn1(net.conv1(x))))
    return net.layer4(net.layer3(net.layer2(net.layer1(x)))).mean((2, 3))


def test_cmc_official_checkpoint(tmp_path, monkeypatch):
    """train_CMC.py's checkpoint {opt, model (MyResNetsCMC('resnet50v1'): encoder, a DataParallel
    of ResNetV1: l_to_ab on L and ab_to_l on ab, half width, fc -> 128-d each), contrast
    (NCEAverage: params, memory_l, memory_ab), optimizer, epoch}: each view's h and embedding,
    both banks [ref: CMC train_CMC.py, models/resnet.py, NCE/NCEAverage.py]."""
    torch.manual_seed(0)
    l_to_ab, ab_to_l = scrambled(CMCResNet50(1, 0.5, 16), 0), scrambled(CMCResNet50(2, 0.5, 16), 1)
    encoder = nn.ModuleDict({"l_to_ab": l_to_ab, "ab_to_l": ab_to_l})
    contrast = {"params": torch.tensor([8, 0.07, 11.0, 12.0, 0.5])}
    contrast.update(memory_l=torch.randn(N, 16), memory_ab=torch.randn(N, 16))
    state = {"opt": argparse.Namespace(model="resnet50v1", feat_dim=16), "epoch": 240}
    state["model"] = prefixed("encoder.module.", encoder.state_dict())
    state.update(contrast=contrast, optimizer=sgd_state(encoder))
    model = init_run(cmc, tmp_path, monkeypatch, state, *CMC)
    l, ab = torch.randn(2, 1, 72, 72), torch.randn(2, 2, 72, 72)
    with torch.no_grad():
        for view, x, net, h in zip(("l", "ab"), (l, ab), (l_to_ab, ab_to_l), model.backbone(l, ab)):
            close_rel(h, cmc_pooled(net, x), f"h_{view}")
            close_rel(F.normalize(model.projector[view](h)), net(x), f"z_{view}")
    close_rel(model.bank_l, contrast["memory_l"], "bank_l")
    close_rel(model.bank_ab, contrast["memory_ab"], "bank_ab")
    state["model"].pop("encoder.module.ab_to_l.fc.weight")
    fails_naming(cmc, tmp_path, state, "projector.ab.weight", *CMC)
    fails_naming(dino, tmp_path, state, None, *DINO_VIT)  # foreign
