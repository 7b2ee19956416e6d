"""Official-loop parity: cmc.py's train_step beside a restatement of HobbitLong/CMC's training
step (train_CMC.py train(), NCE/NCEAverage.py, NCE/NCECriterion.py, util.py), written here from
the official source. Both sides start from the same initialised networks and memory banks and see
the same images, dataset indices and noise rows; the project side is main()'s real optimizer and
args.sched and the real train_step. Compared: the loss of every step, then every parameter, every
buffer (both banks, the Z constants, BN statistics) and SGD's momentum buffers."""

import copy

import pytest
import torch
import torch.nn.functional as F
from helpers import built_by_main, one_thread  # noqa: F401 (autouse fixture)

import cmc

N, B, STEPS = 32, 16, 5  # 32 images, batch 16: 2 steps per epoch, lr milestones at epochs 1, 2


def project_run(tmp_path, monkeypatch, flags):
    """main() up to fit(): the real model, optimizer and args.sched."""
    base = ["--subset", N, "--batch-size", B, "--epochs", 3, "--lr-milestones", 1, 2]
    return built_by_main(cmc, monkeypatch, tmp_path, *base, "--lr", 0.05, "--wd", 1e-3, *flags)[:3]


def l2norm(x):  # models/resnet.py Normalize(2)
    return x.div(x.pow(2).sum(1, keepdim=True).pow(0.5))


class OfficialCMC:
    """train_CMC.py set_model / set_optimizer / train, one step per call."""

    def __init__(self, model, n_data, K, T, momentum, softmax, lr, decay_epochs, wd, spe):
        self.net = copy.deepcopy(model)  # the same initialised encoders and fc heads
        # NCEAverage.__init__: memory_l, memory_ab, params [K, T, Z_l = -1, Z_ab = -1, momentum]
        self.memory_l = model.bank_l.clone()
        self.memory_ab = model.bank_ab.clone()
        self.K, self.T, self.Z_l, self.Z_ab, self.momentum = K, T, -1.0, -1.0, momentum
        self.n_data, self.softmax = n_data, softmax
        # set_optimizer: SGD(model.parameters(), lr, momentum 0.9, weight_decay): every param
        self.params = list(self.net.parameters())
        self.buf = [None] * len(self.params)
        self.base_lr, self.decay_epochs, self.wd, self.spe = lr, decay_epochs, wd, spe
        self.lr = lr

    def model(self, x):
        # models/resnet.py ResNetV1.forward: split the Lab image into L and ab, one encoder each,
        # fc + l2norm. The Lab conversion and normalisation of dataset.py RGB2Lab + train_CMC.py
        # get_train_loader are cmc.lab_views (tested against skimage's formulas in test_cmc.py)
        l, ab = cmc.lab_views(x)
        feat_l = l2norm(self.net.projector["l"](self.net.backbone["l"](l)))
        feat_ab = l2norm(self.net.projector["ab"](self.net.backbone["ab"](ab)))
        return feat_l, feat_ab

    def contrast(self, l, ab, y, noise):
        """NCEAverage.forward(l, ab, y); noise: [B, K] rows (AliasMethod over uniform unigrams)."""
        bsz, D = l.shape
        if self.K == 0:  # no such path in CMC: lemniscate lib/LinearAverage.py (exact softmax;
            # its backward takes the gradient with the memory BEFORE it writes the rows)
            out_l = torch.mm(l, self.memory_ab.clone().t()) / self.T
            out_ab = torch.mm(ab, self.memory_l.clone().t()) / self.T
        else:
            idx = torch.cat([y[:, None], noise], dim=1)  # draw(B * (K + 1)); idx[:, 0] = y
            weight_l = torch.index_select(self.memory_l, 0, idx.view(-1)).detach()
            out_ab = torch.bmm(weight_l.view(bsz, self.K + 1, D), ab.view(bsz, D, 1))
            weight_ab = torch.index_select(self.memory_ab, 0, idx.view(-1)).detach()
            out_l = torch.bmm(weight_ab.view(bsz, self.K + 1, D), l.view(bsz, D, 1))
            if self.softmax:
                out_ab, out_l = out_ab / self.T, out_l / self.T
            else:
                out_ab, out_l = torch.exp(out_ab / self.T), torch.exp(out_l / self.T)
                if self.Z_l < 0:  # set on the first batch, a constant afterwards
                    self.Z_l = (out_l.mean() * self.n_data).item()
                if self.Z_ab < 0:
                    self.Z_ab = (out_ab.mean() * self.n_data).item()
                out_l, out_ab = out_l / self.Z_l, out_ab / self.Z_ab
        with torch.no_grad():  # update memory, still inside forward (before the loss)
            for memory, feat in ((self.memory_l, l), (self.memory_ab, ab)):
                pos = torch.index_select(memory, 0, y.view(-1))
                pos.mul_(self.momentum).add_(torch.mul(feat, 1 - self.momentum))
                memory.index_copy_(0, y, pos.div(pos.pow(2).sum(1, keepdim=True).pow(0.5)))
        return out_l, out_ab

    def criterion(self, x, y):
        if self.K == 0:  # lemniscate: nn.CrossEntropyLoss on the [B, N] scores, target y
            return F.cross_entropy(x, y)
        if self.softmax:  # NCECriterion.py NCESoftmaxLoss: CE at label 0
            return F.cross_entropy(x.squeeze(), torch.zeros(len(x), dtype=torch.long))
        # NCECriterion.forward, eps 1e-7, Pn = 1 / n_data, m = K
        bsz, m, Pn = x.shape[0], x.size(1) - 1, 1 / float(self.n_data)
        P_pos = x.select(1, 0)
        log_D1 = torch.div(P_pos, P_pos.add(m * Pn + 1e-7)).log_()
        P_neg = x.narrow(1, 1, m)
        log_D0 = torch.div(P_neg.clone().fill_(m * Pn), P_neg.add(m * Pn + 1e-7)).log_()
        return -(log_D1.sum(0) + log_D0.view(-1, 1).sum(0)) / bsz

    def step(self, step, x, y, noise):
        if step % self.spe == 0:  # util.py adjust_learning_rate at each (1-based) epoch start
            epoch = step // self.spe + 1
            steps = sum(epoch > e for e in self.decay_epochs)
            if steps > 0:
                self.lr = self.base_lr * 0.1**steps  # --lr_decay_rate 0.1
        feat_l, feat_ab = self.model(x)
        out_l, out_ab = self.contrast(feat_l, feat_ab, y, noise)
        loss = self.criterion(out_l, y) + self.criterion(out_ab, y)
        for p in self.params:
            p.grad = None
        loss.backward()
        with torch.no_grad():  # torch.optim.SGD(momentum=0.9, weight_decay=wd), dampening 0
            for i, p in enumerate(self.params):
                d_p = p.grad + self.wd * p
                self.buf[i] = d_p.clone() if self.buf[i] is None else self.buf[i] * 0.9 + d_p
                p.sub_(self.lr * self.buf[i])
        return loss.reshape(())


def close(got, ref, what, scale=1e-6, extra=0.0):
    """rtol 1e-5, atol scale x the largest |ref|. Gradient-like tensors (momentum buffers, sums of
    partly cancelling terms; the official NCE divides where the project works in log space)
    take scale 1e-5: the measured differences are ~1e-6 of the largest entry."""
    atol = scale * max(ref.abs().max().item(), 1e-12) + extra
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=atol, msg=lambda m: f"{what}: {m}")


VARIANTS = {
    "nce": ["--nce-k", 8, "--tau", 0.07],  # the README commands: NCE, K noise rows
    # --softmax: NCESoftmaxLoss; --nce_m other than 0.5 (where old and new weigh the same)
    "softmax": ["--nce-k", 8, "--tau", 0.07, "--softmax", "--bank-m", 0.7],
    "full_bank": ["--nce-k", 0],  # the CIFAR preset: softmax over the whole bank
}


@pytest.mark.parametrize("name", list(VARIANTS))
def test_train_step_matches_the_official_loop(tmp_path, monkeypatch, name):
    model, opt, args = project_run(tmp_path, monkeypatch, VARIANTS[name])
    spe = args.steps_per_epoch
    assert spe == 2 and args.total_steps == 6
    ref = OfficialCMC(
        model, N, args.nce_k, args.tau, args.bank_m, args.softmax, args.lr, (1, 2), args.wd, spe
    )
    init = {n: p.detach().clone() for n, p in model.named_parameters()}
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    g = torch.Generator().manual_seed(1)
    for step in range(STEPS):
        x, idx = torch.rand(B, 3, 16, 16, generator=g), torch.randperm(N, generator=g)[:B]
        torch.manual_seed(100 + step)  # the project draws its noise rows from the global RNG
        stats = cmc.train_step(model, ([x], None, idx), opt, scaler, step, args)
        torch.manual_seed(100 + step)  # the same uniform rows for the official side
        noise = torch.randint(N, (B, args.nce_k)) if args.nce_k else None
        loss = ref.step(step, x, idx, noise)
        close(stats["loss"], loss.detach(), f"loss at step {step}")
        assert stats["lr"] == pytest.approx(ref.lr, rel=1e-12)
    assert ref.lr == pytest.approx(args.lr * 0.01)  # both decays were passed
    named_ref = dict(ref.net.named_parameters())
    for n, p in model.named_parameters():
        q = named_ref[n].detach()  # + 1e-5 of the change: BN biases start at 0 (measured 8e-7)
        close(p.detach(), q, n, extra=1e-5 * (q - init[n]).abs().max().item())
        i = [id(q) for q in ref.params].index(id(named_ref[n]))
        close(opt.state[p]["momentum_buffer"], ref.buf[i], n + " momentum", scale=1e-5)
    ref_buffers = dict(ref.net.named_buffers())
    ref_buffers.update(bank_l=ref.memory_l, bank_ab=ref.memory_ab)
    ref_buffers["nce_z"] = torch.tensor([ref.Z_l, ref.Z_ab], dtype=torch.float64)
    for n, b in model.named_buffers():
        close(b, ref_buffers[n].to(b.dtype), n)
    moved = (model.bank_l - ref.net.bank_l).abs().amax(1) > 0  # the rows of the batches moved
    assert moved.sum() >= B
    if name == "nce":  # Z set on step 0 and logged
        assert (model.nce_z > 0).all() and stats["nce_z_l"].item() == model.nce_z[0].item()
