"""Official-loop parity: cpc.py's train_step beside a restatement of CPC v2's objective and the
optimizer the preset cites. CPC v2 released no code: the objective is the pseudocode of the
paper's appendix (Hénaff et al. 2020, App. A, functions CPC() and pixelCNN()), applied per
prediction direction to the patch grid rotated; the optimizer is pl_bolts' CPC_v2
configure_optimizers (Lightning-AI/lightning-bolts src/pl_bolts/models/self_supervised/cpc/
cpc_module.py): Adam(self.parameters(), lr, betas=(0.8, 0.999), weight_decay=1e-5, eps=1e-7), no
scheduler. Both sides start from the same initialised networks and see the same images (per-patch
augmentation off: random, and outside the pseudocode; tested in test_cpc.py); the project side
is main()'s real optimizer and args.sched and the real train_step. Compared: every step's loss,
Adam's moments and the update at every step, then every parameter."""

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from helpers import built_by_main, one_thread  # noqa: F401 (autouse fixture)

import cpc

N, B, STEPS = 32, 8, 4  # 16 px images, 4 px patches at stride 2: a 7 x 7 grid as in the paper
SMALL = ["--context-dim", "16", "--context-blocks", "2", "--target-dim", "16"]
NO_AUG = ["--no-color-drop", "--no-patch-flip", "--no-patch-crop"]


def project_run(tmp_path, monkeypatch, flags):
    """main() up to fit(): the real model, optimizer and args.sched."""
    base = ["--subset", N, "--batch-size", B, "--epochs", 1, *SMALL, *NO_AUG]
    return built_by_main(cpc, monkeypatch, tmp_path, *base, *flags)[:3]


def conv(x, layer, padding=0):  # NHWC in and out, as the pseudocode's Conv2D
    return F.conv2d(x.permute(0, 3, 1, 2), layer.weight, layer.bias, padding=padding).permute(
        0, 2, 3, 1
    )


def pixel_cnn(latents, blocks):
    """CPC v2 App. A pixelCNN(latents): latents [B, H, W, D]; per block 1x1 -> ReLU -> 1x3 (SAME)
    -> pad one row on top -> 2x1 VALID -> ReLU -> 1x1 back to D, residual; a final ReLU."""
    cres = latents
    for c1, c13, c21, c1b in blocks:
        c = F.relu(conv(cres, c1))
        c = conv(c, c13, padding=(0, 1))
        c = F.pad(c, (0, 0, 0, 0, 1, 0))  # Pad(c, [[0, 0], [1, 0], [0, 0], [0, 0]])
        c = F.relu(conv(c, c21))
        cres = cres + conv(c, c1b)
    return F.relu(cres)


def cpc_objective(latents, target, context_blocks, pred_convs, emb_scale, steps_to_ignore):
    """CPC v2 App. A CPC(latents, target_dim, emb_scale, steps_to_ignore, steps_to_predict)."""
    loss = 0.0
    context = pixel_cnn(latents, context_blocks)
    targets = conv(latents, target)
    batch_dim, col_dim, rows = targets.shape[:-1]
    targets = targets.reshape(-1, targets.shape[-1])
    for i, pred in enumerate(pred_convs, start=steps_to_ignore):  # range(ignore, predict)
        col_dim_i = col_dim - i - 1
        total_elements = batch_dim * col_dim_i * rows
        preds_i = conv(context, pred)[:, : -(i + 1), :, :] * emb_scale
        preds_i = preds_i.reshape(-1, preds_i.shape[-1])
        logits = preds_i @ targets.T
        b = torch.arange(total_elements) // (col_dim_i * rows)
        col = torch.arange(total_elements) % (col_dim_i * rows)
        labels = b * col_dim * rows + (i + 1) * rows + col
        loss = loss + F.cross_entropy(logits, labels)
    return loss


class OfficialCPC:
    def __init__(self, model, args, steps_to_ignore):
        self.net = copy.deepcopy(model)  # the same initialised encoder, context nets, 1x1 convs
        self.patch, self.turns = args.patch_size, cpc.CPC.ROTATIONS[: args.directions]
        self.emb_scale, self.ignore = 0.1, steps_to_ignore  # the pseudocode's emb_scale=0.1
        # pl_bolts configure_optimizers: torch Adam over self.parameters(): L2 wd on every param
        self.params = list(self.net.parameters())
        self.lr, (self.b1, self.b2), self.eps, self.wd = 4e-5, (0.8, 0.999), 1e-7, 1e-5
        self.m = [torch.zeros_like(p) for p in self.params]
        self.v = [torch.zeros_like(p) for p in self.params]
        self.t = 0

    def latents(self, x):
        """The image cut into overlapping patches (stride patch / 2), each encoded on its own:
        [B, H, W, D] [CPC v1 §3.2; CPC v2 §4]."""
        p, s = self.patch, self.patch // 2
        g = (x.shape[-1] - p) // s + 1
        patches = [
            x[:, :, i * s : i * s + p, j * s : j * s + p] for i in range(g) for j in range(g)
        ]
        h = self.net.backbone(torch.stack(patches, dim=1).flatten(0, 1))  # [B * g * g, D]
        return h.view(len(x), g, g, -1)

    def step(self, x):
        lat = self.latents(x)
        loss = 0.0
        for d, turn in enumerate(self.turns):  # one direction: the grid rotated, its own nets
            blocks = self.net.context[d].blocks
            rot = torch.rot90(lat, turn, dims=(1, 2))
            loss = loss + cpc_objective(
                rot, self.net.target, blocks, self.net.predictors[d], self.emb_scale, self.ignore
            )
        for p in self.params:
            p.grad = None
        loss.backward()
        self.t += 1
        with torch.no_grad():  # torch.optim.Adam (L2: weight_decay added to the gradient)
            bc1, bc2 = 1 - self.b1**self.t, 1 - self.b2**self.t
            for p, m, v in zip(self.params, self.m, self.v):
                g = p.grad + self.wd * p
                m.mul_(self.b1).add_((1 - self.b1) * g)
                v.mul_(self.b2).add_((1 - self.b2) * g * g)
                p.sub_(self.lr / bc1 * m / (v.sqrt() / math.sqrt(bc2) + self.eps))
        return loss


def close(got, ref, what, scale=1e-6):
    atol = scale * max(ref.abs().max().item(), 1e-30)
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=atol, msg=lambda m: f"{what}: {m}")


VARIANTS = {  # flags, the pseudocode's steps_to_ignore (steps_to_predict: the predictors)
    "paper": ([], 2),  # 4 directions, steps_to_ignore=2, steps_to_predict=3: offset 3 only
    "two_steps": (["--directions", 2, "--min-step", 2, "--max-step", 3], 1),  # offsets 2, 3
}


@pytest.mark.parametrize("name", list(VARIANTS))
def test_train_step_matches_the_official_loop(tmp_path, monkeypatch, name):
    flags, steps_to_ignore = VARIANTS[name]
    model, opt, args = project_run(tmp_path, monkeypatch, flags)
    assert args.total_steps >= STEPS and args.patch_size == 4
    ref = OfficialCPC(model, args, steps_to_ignore)
    named_ref, index = (
        dict(ref.net.named_parameters()),
        {id(p): i for i, p in enumerate(ref.params)},
    )
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    g = torch.Generator().manual_seed(1)
    for step in range(STEPS):
        x = torch.randn(B, 3, 16, 16, generator=g)  # normalised images
        old = {n: p.detach().clone() for n, p in model.named_parameters()}
        stats = cpc.train_step(model, ([x], None, None), opt, scaler, step, args)
        loss = ref.step(x)
        close(stats["loss"], loss.detach(), f"loss at step {step}")
        assert stats["lr"] == ref.lr  # constant: pl_bolts returns no scheduler
        # the gradients, through Adam's moments (L2 wd inside), against the independent
        # restatement: to 1e-5 of each tensor's largest entry, with a floor of 1e-6 of the largest
        # over the model (target.bias: its exact gradient is 0, a shift shared by all targets
        # cancels in the softmax; what remains is wd x p plus float noise)
        m_max = max(m.abs().max().item() for m in ref.m)
        v_max = max(v.abs().max().item() for v in ref.v)
        for n, p in model.named_parameters():
            st, i = opt.state[p], index[id(named_ref[n])]
            assert st["step"].item() == ref.t == step + 1
            for key, r, top in (("exp_avg", ref.m[i], m_max), ("exp_avg_sq", ref.v[i], v_max)):
                atol = max(1e-5 * r.abs().max().item(), 1e-6 * top)
                torch.testing.assert_close(
                    st[key], r, rtol=1e-5, atol=atol, msg=lambda m: f"{n} {key} @{step}: {m}"
                )
            # the update from these moments: Adam's formula with pl_bolts' lr, betas and eps
            bc1, bc2 = 1 - ref.b1**ref.t, 1 - ref.b2**ref.t
            upd = (
                ref.lr / bc1 * st["exp_avg"] / (st["exp_avg_sq"].sqrt() / math.sqrt(bc2) + ref.eps)
            )
            rounding = 2 * torch.finfo(torch.float32).eps * old[n].abs().max().item()
            atol = 1e-3 * upd.abs().max().item() + rounding
            torch.testing.assert_close(p.detach(), old[n] - upd, rtol=0, atol=atol)
    # the two runs side by side: Adam divides by sqrt(v) + 1e-7, so an element whose gradient is
    # ~0 turns float noise into an update of up to ~lr (target.bias: its exact gradient is 0, a
    # shift shared by all targets cancels in the softmax); measured <= 1% of lr x steps
    for n, p in model.named_parameters():
        q = named_ref[n].detach()
        atol = 1e-6 * q.abs().max().item() + 0.1 * ref.lr * STEPS
        torch.testing.assert_close(p.detach(), q, rtol=1e-5, atol=atol, msg=lambda m: f"{n}: {m}")
    assert not list(model.buffers())  # no method state: no bank, queue or BN statistics
