"""DINO official-loop parity: facebookresearch/dino main_dino.py's training step (train_one_epoch
with DINOLoss, utils.MultiCropWrapper, vision_transformer.DINOHead, utils.get_params_groups,
clip_gradients, cancel_gradients_last_layer, cosine_scheduler and the optimizer main_dino.py
builds), restated here in plain PyTorch from the official code (cited per block), runs beside
dino.train_step with the optimizer and schedules that dino.main builds, from the same initial
weights on the same multi-crop batches: losses, every student and teacher parameter, every
buffer (the centre, BN statistics) and the optimizer state agree to float precision. The
reference calls nothing of dino.py's loss, head, centre, EMA, clipping, optimizer or schedule
code; it shares only deep copies of the initial backbone and head MLP (and their weights)."""

import copy
import math

import helpers
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import common as C
import dino

B, LOCAL, STEPS = 8, 2, 5
# 2 steps per epoch (16 images / batch 8): lr warm-up at steps 0-3 (np.linspace(0, lr, 4)), the
# cosine from step 4; tau_t 0.04, 0.055, 0.07 in epochs 0-2; the last layer frozen in epoch 0
BASE = ["--preset", "imagenet", "--subset", 16, "--batch-size", B, "--epochs", 10]
BASE += ["--hidden-dim", 32, "--bottleneck-dim", 16, "--out-dim", 64, "--n-local", LOCAL]
BASE += ["--warmup-epochs", 2, "--tau-t", 0.07, "--tau-t-warmup-epochs", 3]
ADAMW = ["--optimizer", "adamw", "--lr", 5e-4, "--wd", 0.04, "--wd-end", 0.4]  # ViT preset
VARIANTS = {  # clip 3.0 is the preset; 0.01 makes the per-parameter clipping bite
    "adamw": ["--arch", "smallcnn", *ADAMW],
    # lr x100 so that the decoupled weight decay moves the weights beyond float noise
    "adamw-big-lr-clip-g": ["--arch", "smallcnn", *ADAMW, "--lr", 0.05, "--clip-grad", 0.01]
    + ["--no-norm-last-layer"],
    "sgd-rn50": ["--arch", "smallcnn"],  # the RN50 recipe: SGD 0.03, wd 1e-4
    "lars": ["--arch", "smallcnn", "--optimizer", "lars", "--lr", 0.3, "--clip-grad", 0.01],
}


def built_by_main(monkeypatch, tmp_path, *flags, spe=0):
    """dino.main as it runs, stopped where it calls fit: the model, optimizer and args (spe:
    steps per epoch of a full dataset, set where main reads the data size)."""
    prepare = C.prepare_run

    def prepare_run(args):
        prepare(args)
        if spe:
            args.steps_per_epoch, args.total_steps = spe, spe * args.epochs

    monkeypatch.setattr(C, "prepare_run", prepare_run)
    return helpers.built_by_main(dino, monkeypatch, tmp_path, *flags)[:3]


# ==== the official code, restated ===========================================================
def cosine_scheduler(base_value, final_value, epochs, niter_per_ep, warmup_epochs=0, start=0):
    """[ref: utils.py cosine_scheduler] np.linspace warm-up over warmup_epochs x niter_per_ep
    iterations, then the cosine over the remaining iterations, per iteration."""
    warmup_iters = warmup_epochs * niter_per_ep
    warm = np.linspace(start, base_value, warmup_iters) if warmup_epochs > 0 else np.array([])
    iters = np.arange(epochs * niter_per_ep - warmup_iters)
    cos = final_value + 0.5 * (base_value - final_value) * (1 + np.cos(np.pi * iters / len(iters)))
    schedule = np.concatenate((warm, cos))
    assert len(schedule) == epochs * niter_per_ep
    return schedule


def teacher_temp_schedule(a):
    """[ref: main_dino.py DINOLoss.__init__] linspace over the warm-up epochs, then constant."""
    W = a.tau_t_warmup_epochs
    return np.concatenate(
        (np.linspace(a.tau_t_warmup, a.tau_t, W), np.ones(a.epochs - W) * a.tau_t)
    )


class WeightNormLinear(nn.Module):
    """[ref: vision_transformer.py DINOHead.last_layer = nn.utils.weight_norm(Linear(bottleneck,
    out_dim, bias=False)), weight_g filled with 1]: weight = g * v / ||v|| per output row."""

    def __init__(self, g, v, norm_last_layer):
        super().__init__()
        self.weight_g, self.weight_v = nn.Parameter(g.clone()), nn.Parameter(v.clone())
        self.weight_g.requires_grad = not norm_last_layer  # [ref: DINOHead.__init__]

    def forward(self, x):
        return F.linear(x, self.weight_g * self.weight_v / self.weight_v.norm(dim=1, keepdim=True))


class OfficialHead(nn.Module):
    """[ref: vision_transformer.py DINOHead.forward] mlp, l2-normalise, weight-normed layer."""

    def __init__(self, mlp, last_layer):
        super().__init__()
        self.mlp, self.last_layer = mlp, last_layer

    def forward(self, x):
        return self.last_layer(F.normalize(self.mlp(x), dim=-1, p=2))


class MultiCropWrapper(nn.Module):
    """[ref: utils.py MultiCropWrapper.forward] runs of equal width (unique_consecutive counts,
    cumsum) through the backbone, outputs concatenated, one head pass."""

    def __init__(self, backbone, head):
        super().__init__()
        self.backbone, self.head = backbone, head

    def forward(self, x):
        widths = torch.tensor([inp.shape[-1] for inp in x])
        idx_crops = torch.cumsum(torch.unique_consecutive(widths, return_counts=True)[1], 0)
        start_idx, output = 0, torch.empty(0)
        for end_idx in idx_crops.tolist():
            output = torch.cat((output, self.backbone(torch.cat(x[start_idx:end_idx]))))
            start_idx = end_idx
        return self.head(output)


class DINOLoss:
    """[ref: main_dino.py DINOLoss] forward: student / student_temp chunked into ncrops; teacher
    softmax((t - center) / temp of this epoch), detached, chunked in 2; the mean over the batch
    of -sum q log_softmax(s_v) for iq != v, summed and divided by the number of terms; then
    update_center (one process: the all_reduce is the identity, world size 1)."""

    def __init__(self, a):
        self.a, self.ncrops, self.center = a, LOCAL + 2, torch.zeros(1, a.out_dim)
        self.teacher_temp_schedule = teacher_temp_schedule(a)

    def __call__(self, student_output, teacher_output, epoch):
        student_out = (student_output / self.a.tau_s).chunk(self.ncrops)
        temp = self.teacher_temp_schedule[epoch]
        teacher_out = F.softmax((teacher_output - self.center) / temp, dim=-1).detach().chunk(2)
        total_loss, n_loss_terms = 0, 0
        for iq, q in enumerate(teacher_out):
            for v in range(len(student_out)):
                if v == iq:
                    continue
                loss = torch.sum(-q * F.log_softmax(student_out[v], dim=-1), dim=-1)
                total_loss += loss.mean()
                n_loss_terms += 1
        total_loss /= n_loss_terms
        self.update_center(teacher_output)
        return total_loss

    @torch.no_grad()
    def update_center(self, teacher_output):
        batch_center = torch.sum(teacher_output, dim=0, keepdim=True) / len(teacher_output)
        cm = self.a.center_m
        self.center = self.center * cm + batch_center * (1 - cm)


def get_params_groups(model):
    """[ref: utils.py get_params_groups] trainable params; biases and 1-D params unregularised."""
    regularized, not_regularized = [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        if name.endswith(".bias") or len(param.shape) == 1:
            not_regularized.append(param)
        else:
            regularized.append(param)
    return [{"params": regularized}, {"params": not_regularized, "weight_decay": 0.0}]


class Optimizer:
    """The optimizers main_dino.py builds on get_params_groups(student), their updates written
    out: adamw [torch.optim.AdamW(params_groups): betas (0.9, 0.999), eps 1e-8, decoupled decay
    p *= 1 - lr wd, bias-corrected moments], sgd [torch.optim.SGD(lr=0, momentum=0.9): d = g +
    wd p, buf = d at first then 0.9 buf + d, p -= lr buf], lars [utils.py LARS: for ndim != 1,
    d = g + wd p scaled by eta |p| / |d| (1 where a norm is 0), eta 0.001; mu = 0.9 mu + d;
    p -= lr mu]. Params whose grad is None are skipped."""

    def __init__(self, kind, groups):
        self.kind, self.param_groups, self.state = kind, groups, {}
        for g in groups:
            g.setdefault("weight_decay", 0.01 if kind == "adamw" else 0.0)  # torch defaults

    @torch.no_grad()
    def step(self):
        for g in self.param_groups:
            lr, wd = g["lr"], g["weight_decay"]
            for p in (p for p in g["params"] if p.grad is not None):
                st, d = self.state.setdefault(p, {}), p.grad
                if self.kind == "adamw":
                    st["step"] = st.get("step", 0) + 1
                    m = st.setdefault("exp_avg", torch.zeros_like(p))
                    v = st.setdefault("exp_avg_sq", torch.zeros_like(p))
                    p.mul_(1 - lr * wd)
                    m.mul_(0.9).add_(d, alpha=0.1)
                    v.mul_(0.999).addcmul_(d, d, value=0.001)
                    bc1, bc2 = 1 - 0.9 ** st["step"], 1 - 0.999 ** st["step"]
                    denom = (v.sqrt() / math.sqrt(bc2)).add_(1e-8)
                    p.addcdiv_(m, denom, value=-lr / bc1)
                elif self.kind == "sgd":
                    d = d.add(p, alpha=wd) if wd != 0 else d
                    if "momentum_buffer" not in st:
                        st["momentum_buffer"] = d.clone()
                    else:
                        st["momentum_buffer"].mul_(0.9).add_(d)
                    p.add_(st["momentum_buffer"], alpha=-lr)
                else:
                    if p.ndim != 1:
                        d = d.add(p, alpha=wd)
                        pn, dn, one = torch.norm(p), torch.norm(d), torch.ones(())
                        q = torch.where(pn > 0, torch.where(dn > 0, 0.001 * pn / dn, one), one)
                        d = d.mul(q)
                    mu = st.setdefault("mu", torch.zeros_like(p))
                    mu.mul_(0.9).add_(d)
                    p.add_(mu, alpha=-lr)


class OfficialLoop:
    """[ref: main_dino.py train_dino + train_one_epoch] the student, the teacher (built apart,
    loaded with the student's state dict, no gradients), DINOLoss, the optimizer on
    get_params_groups(student) and the per-iteration schedules."""

    def __init__(self, backbone, mlp, g, v, a):
        head = OfficialHead(mlp, WeightNormLinear(g, v, a.norm_last_layer))
        self.student, self.a = MultiCropWrapper(backbone, head), a
        self.teacher = copy.deepcopy(self.student)
        for p in self.teacher.parameters():
            p.requires_grad = False
        self.dino_loss = DINOLoss(a)
        self.optimizer = Optimizer(a.optimizer, get_params_groups(self.student))
        spe, bs = a.steps_per_epoch, a.batch_size  # global batch: batch_size_per_gpu x world
        self.lr_schedule = cosine_scheduler(
            a.lr * bs / 256.0, a.min_lr, a.epochs, spe, warmup_epochs=a.warmup_epochs
        )
        self.wd_schedule = cosine_scheduler(a.wd, a.wd_end, a.epochs, spe)
        self.momentum_schedule = cosine_scheduler(a.m, 1, a.epochs, spe)
        self.n_clipped = 0

    def step(self, images, it):
        a, student = self.a, self.student
        epoch = it // a.steps_per_epoch
        # [ref: train_one_epoch] "update weight decay and learning rate according to their
        # schedule": lr in every group, weight decay in the first (regularised) only
        for i, param_group in enumerate(self.optimizer.param_groups):
            param_group["lr"] = self.lr_schedule[it]
            if i == 0:
                param_group["weight_decay"] = self.wd_schedule[it]
        # [ref: train_one_epoch] teacher on the 2 global views, student on all, dino_loss
        teacher_output = self.teacher(images[:2])
        student_output = student(images)
        loss = self.dino_loss(student_output, teacher_output, epoch)
        # [ref: train_one_epoch] student update (fp32 path): zero_grad, backward, clip,
        # cancel the last layer's gradients, step
        for p in student.parameters():  # torch 1.7 zero_grad: zeros, not None
            if p.grad is not None:
                p.grad.zero_()
        loss.backward()
        if a.clip_grad:
            self.clip_gradients(a.clip_grad)
        self.cancel_gradients_last_layer(epoch)
        self.optimizer.step()
        # [ref: train_one_epoch] "EMA update for the teacher", parameters only
        with torch.no_grad():
            m = self.momentum_schedule[it]
            for param_q, param_k in zip(student.parameters(), self.teacher.parameters()):
                param_k.data.mul_(m).add_((1 - m) * param_q.detach().data)
        return loss.detach()

    def clip_gradients(self, clip):
        """[ref: utils.py clip_gradients] each parameter's gradient on its own."""
        for _, p in self.student.named_parameters():
            if p.grad is not None:
                clip_coef = clip / (p.grad.data.norm(2) + 1e-6)
                if clip_coef < 1:
                    p.grad.data.mul_(clip_coef)
                    self.n_clipped += 1

    def cancel_gradients_last_layer(self, epoch):
        """[ref: utils.py cancel_gradients_last_layer]"""
        if epoch >= self.a.freeze_last_layer:
            return
        for n, p in self.student.named_parameters():
            if "last_layer" in n:
                p.grad = None


# ==== parity ================================================================================
def close(actual, expected, what, atol_rel=1e-6, atol_abs=0.0):
    if not expected.is_floating_point():
        assert torch.equal(actual, expected), what
        return
    atol = atol_rel * expected.abs().max().item() + atol_abs if expected.numel() else 0.0
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=atol, msg=lambda m: f"{what}: {m}")


def official_name(name):
    """project name -> (student|teacher, the official name inside MultiCropWrapper)"""
    net, name = name.split(".", 1)
    name = name.replace("parametrizations.weight.original0", "weight_g")
    return net, name.replace("parametrizations.weight.original1", "weight_v")


@pytest.mark.parametrize("variant", VARIANTS)
def test_train_step_matches_the_official_loop(monkeypatch, tmp_path, variant):
    model, optimizer, args = built_by_main(monkeypatch, tmp_path, *BASE, *VARIANTS[variant])
    assert args.steps_per_epoch == 2 and args.amp == "off" and args.img_size == 16
    assert args.optimizer == {"sgd-rn50": "sgd", "lars": "lars"}.get(variant, "adamw")
    head = model.student.head
    wn = head.last_layer.parametrizations.weight
    ref = OfficialLoop(
        copy.deepcopy(model.student.backbone),
        copy.deepcopy(head.mlp),
        wn.original0.detach(),
        wn.original1.detach(),
        args,
    )
    nets = {"student": ref.student, "teacher": ref.teacher}
    p_ref = {n: dict(net.named_parameters()) for n, net in nets.items()}
    b_ref = {n: dict(net.named_buffers()) for n, net in nets.items()}
    scaler = torch.amp.GradScaler("cpu", enabled=False)  # as fit builds it (no fp16)
    taus = teacher_temp_schedule(args)
    g = torch.Generator().manual_seed(0)
    for step in range(STEPS):
        views = [torch.randn(B, 3, 16, 16, generator=g) for _ in range(2)]
        views += [torch.randn(B, 3, 8, 8, generator=g) for _ in range(LOCAL)]
        stats = dino.train_step(model, (views, None, None), optimizer, scaler, step, args)
        loss = ref.step([v.clone() for v in views], step)
        close(stats["loss"], loss, f"loss at step {step}")
        # the schedules: the official numpy values, to float64 rounding
        want = (ref.lr_schedule[step], ref.wd_schedule[step], ref.momentum_schedule[step])
        got = (stats["lr"], stats["wd"], stats["m"], stats["tau_t"])
        assert got == pytest.approx((*want, taus[step // 2]), rel=1e-12, abs=1e-15)
        for grp, grp_ref in zip(optimizer.param_groups, ref.optimizer.param_groups, strict=True):
            assert grp["lr"] == grp_ref["lr"] and grp["weight_decay"] == grp_ref["weight_decay"]
        # AdamW divides by sqrt(v) + 1e-8: a gradient element that is mostly rounding (a sum
        # that cancels) moves its weight by up to lr x its relative rounding; a zero-initialised
        # bias is made of such steps, so weights get an extra 1e-4 x (the lr summed so far)
        lr_sum = sum(ref.lr_schedule[: step + 1]) if args.optimizer == "adamw" else 0.0
        for n, p in model.named_parameters():
            net, name = official_name(n)
            q = p_ref[net][name]
            close(p.detach(), q.detach(), f"{n} after step {step}", atol_abs=1e-4 * lr_sum)
            assert p.requires_grad == q.requires_grad, n
            st = optimizer.state.get(p, {})
            st_ref = ref.optimizer.state.get(q, {})
            assert {k for k in st if k != "step"} == {k for k in st_ref if k != "step"}, n
            for k in (k for k in st_ref if k != "step"):  # gradient sums: their rounding
                close(st[k], st_ref[k], f"{k} of {n} after step {step}", atol_rel=1e-5)
        for n, b in model.named_buffers():
            net, name = official_name(n) if n != "center" else (None, None)
            want = ref.dino_loss.center if n == "center" else b_ref[net][name]
            close(b, want, f"{n} after step {step}")
    # the test covered what it claims: warm-up from 0, the last layer frozen in epoch 0 only
    assert ref.lr_schedule[0] == 0 and ref.lr_schedule[3] == ref.lr_schedule[4]
    v_ref = p_ref["student"]["head.last_layer.weight_v"]
    assert v_ref in ref.optimizer.state  # trained from epoch 1; g only if not norm_last_layer
    assert (wn.original0 in optimizer.state) == (not args.norm_last_layer) == (variant[-1] == "g")
    assert ref.n_clipped > 0 or variant in ("adamw", "sgd-rn50")
    assert taus[2] == pytest.approx(0.07) and taus[0] == pytest.approx(0.04)


@pytest.mark.parametrize("arch", ["vit_tiny", "resnet18"])
def test_schedules_are_the_official_ones_at_the_presets(monkeypatch, tmp_path, arch):
    """The whole per-step lr / wd / momentum / tau_t schedules of the ImageNet preset (ViT: the
    README's vanilla run, 8 x 64; convnets: the RN50 command, 8 x 64) at ImageNet's real steps
    per epoch (1281167 // 512) against main_dino.py's numpy ones; the teacher-temperature
    warm-up of the paper (0.04 -> 0.07 in 30 epochs) too."""
    flags = ["--preset", "imagenet", "--arch", arch, "--subset", 512, "--hidden-dim", 32]
    flags += ["--out-dim", 64, "--bottleneck-dim", 16, "--img-size", 16, "--local-size", 16]
    for extra in ([], ["--tau-t", 0.07, "--tau-t-warmup-epochs", 30]):
        spe = 1281167 // 512
        model, opt, a = built_by_main(
            monkeypatch, tmp_path / str(len(extra)), *flags, *extra, spe=spe
        )
        assert a.batch_size == 512 and a.epochs == 100 and a.warmup_epochs == 10
        lr = cosine_scheduler(a.lr * 512 / 256, a.min_lr, a.epochs, spe, a.warmup_epochs)
        want = {
            "lr": lr,
            "wd": cosine_scheduler(a.wd, a.wd_end, a.epochs, spe),
            "m": cosine_scheduler(a.m, 1, a.epochs, spe),
            "tau_t": np.repeat(teacher_temp_schedule(a), spe),
        }
        for k, v in want.items():
            got = np.array(a.sched[k])
            assert got.shape == v.shape == (a.total_steps,), k
            np.testing.assert_allclose(got, v, rtol=1e-12, atol=1e-15, err_msg=k)
        w = spe * a.warmup_epochs  # the peak AT the last warm-up step, and again after it
        assert a.sched["lr"][0] == 0 and a.sched["lr"][w - 1] == a.sched["lr"][w]
        assert (a.optimizer, type(opt).__name__) == (
            ("adamw", "AdamW") if arch.startswith("vit") else ("sgd", "SGD")
        )
        # get_params_groups: the same tensors in the same two groups (ViT: cls_token and
        # pos_embed are 3-D, so regularised; LayerNorm and biases not)
        official = get_params_groups(model.student)
        for grp, grp_ref in zip(opt.param_groups, official, strict=True):
            assert [id(p) for p in grp["params"]] == [id(p) for p in grp_ref["params"]]
        assert opt.param_groups[1]["weight_decay"] == 0.0
