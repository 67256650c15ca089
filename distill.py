"""RepFusion (Yang & Wang, ICCV 2023; RECIPE.md s8, read from the authors' code): a frozen
pretrain.py model is the teacher; its features at a noise level t, which a policy trained by
REINFORCE picks per image, supervise a student network (OUTPUT_DIR/student.pt).

  python distill.py --teacher out/tiny/checkpoint.pt --student vit_tiny --output-dir out/student
  python distill.py --teacher CKPT --student vit_tiny --t-policy fixed --t 10 ...   # the baseline
  torchrun --nproc_per_node=8 distill.py --teacher out/vit_b/checkpoint.pt --student resnet18 \\
      --dataset imagefolder --data-path IMNET --input-size 256 --output-dir out/repfusion
  python linprobe.py out/student/student.pt --protocol cached --compare        # probe the student
"""
import json
import math
import os

import torch
import torch.nn as nn
import torch.nn.functional as F

import ldae
from tokenizer_pca import PatchPCA
from util import checkpoint, cli, datasets, distributed, files, registry, transforms
from util.cli import UserError
from util.engine import Engine, train_one_epoch
from util.resnet import ResNetStudent
from util.train_flags import add_training_args

STUDENTS = ("resnet18", "vit_tiny", "vit_small")


def build_student(name, teacher, img_size):
    """A student that sees the raw image: a ViT student is an l-DAE on the teacher's PCA basis with
    d = D (clean input V^T V x = x), so that its checkpoint is an ordinary l-DAE checkpoint."""
    if name == "resnet18":
        return ResNetStudent(img_size)
    patch = ldae.MODELS[name]["patch_size"]
    pca = teacher.pca
    if pca is None or pca.patch_size != patch:
        pca = PatchPCA.empty(patch, 3, img_size)          # orthonormal identity basis
    D = pca.patch_size ** 2 * pca.channels
    student = ldae.build_model(name, pca, img_size=img_size, latent_dim=D, latent_norm="none",
                               latent_scale=1.0)
    # the decoder half: frozen (DDP fails on parameters without gradients), kept (an l-DAE's file)
    for block in student.blocks[student.depth // 2:]:
        block.requires_grad_(False)
    student.final_layer.requires_grad_(False)
    return student


def to_grid(tokens, length):
    """Teacher tokens (B, L, D) on a square grid average-pooled (or repeated) to `length` tokens."""
    side = math.isqrt(tokens.shape[1])
    grid = tokens.transpose(1, 2).reshape(tokens.shape[0], -1, side, side)
    return F.adaptive_avg_pool2d(grid, math.isqrt(length)).flatten(2).transpose(1, 2)


class Frozen:
    """Hides the teacher from state dict, parameters and DDP; the EMA copy shares it (frozen)."""

    def __init__(self, model):
        self.model = model.eval().requires_grad_(False)

    def __deepcopy__(self, memo):
        return self


class PolicyNet(nn.Module):
    """pi(t | x): the authors' LeNet-5-sized CIFAR policy; an adaptive pool takes any image size."""

    def __init__(self, num_levels):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 6, 5), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(6, 16, 5), nn.ReLU(), nn.MaxPool2d(2), nn.AdaptiveAvgPool2d(5))
        self.classifier = nn.Sequential(
            nn.Flatten(), nn.Linear(16 * 5 * 5, 120), nn.ReLU(), nn.Linear(120, 84), nn.ReLU(),
            nn.Linear(84, num_levels))

    def forward(self, images):
        return self.classifier(self.features(images))


class RepFusion(nn.Module):
    """What the engine trains. Per image x, y: t ~ pi(.|x), z = the teacher's feature at t, and
    loss = MSE(adaptor(student(x)), z) + CE(head(z), y) - mean(log pi(t|x) (r - b)) - lambda H(pi)
    with the reward r = -CE(head(z), y) and the baseline b of advantage()."""

    def __init__(self, teacher, student, num_classes, t_policy, fixed_t, teacher_depth,
                 entropy_reg, teacher_source, match="pooled", baseline="batch"):
        super().__init__()
        self.teacher, self.student = Frozen(teacher), student
        self.fixed_t, self.teacher_depth, self.baseline = fixed_t, teacher_depth, baseline
        self.pool = match == "pooled"
        # --whiten-target: (target - mean) @ zca, identity until fit_whitening; saved with the run
        width = teacher.config["hidden_size"]
        self.register_buffer("target_mean", torch.zeros(width))
        self.register_buffer("target_zca", torch.eye(width))
        self.num_levels = teacher.config.get("num_steps", 1000)
        student_dim = getattr(student, "dim", None) or student.config["hidden_size"]
        # on pooled features = the authors' 1 x 1 conv before the pooling; on tokens, that conv
        self.adaptor = nn.Linear(student_dim, width)
        self.head = nn.Sequential(nn.Linear(width, width), nn.ReLU(), nn.Linear(width, width),
                                  nn.ReLU(), nn.Linear(width, num_classes))
        self.policy = PolicyNet(self.num_levels) if t_policy == "rl" else None
        # the entropy weight lambda, set every step by the run (a tensor: no recompiles)
        self.register_buffer("entropy_weight", torch.tensor(float(entropy_reg)), persistent=False)
        self.pca = teacher.pca
        self.config = dict(family="repfusion", student=student.config, teacher=teacher_source,
                           t_policy=t_policy, fixed_t=fixed_t, teacher_depth=teacher_depth,
                           num_classes=num_classes, match=match, policy_baseline=baseline)

    def choose_t(self, images):
        """-> (t (B,), the policy's distribution or None)."""
        if self.policy is None:
            return torch.full((images.shape[0],), self.fixed_t, device=images.device), None
        levels = torch.distributions.Categorical(logits=self.policy(images).float())
        return levels.sample(), levels

    @torch.no_grad()
    def teacher_target(self, images, t):
        """The teacher's feature at t of the clean image (no noise, as the authors' code), fp32."""
        return self.teacher.model.forward_features(images, t=t, depth=self.teacher_depth,
                                                   pool=self.pool).float()

    @torch.no_grad()
    def fit_whitening(self, images, generator):
        """ZCA of the target (t fixed, or uniform as the starting policy): ~99 % of the raw target's
        variance is in 3 directions, matched (R^2 0.9996) without what separates the classes."""
        t = torch.full((images.shape[0],), self.fixed_t, device=images.device)
        if self.policy is not None:
            t = torch.randint(self.num_levels, t.shape, generator=generator).to(images.device)
        target = self.teacher_target(images, t).reshape(-1, self.target_mean.numel())
        mean = target.mean(dim=0)
        values, vectors = torch.linalg.eigh(torch.cov((target - mean).T).double())
        # directions below 1e-6 of the largest variance are noise: left at that floor
        values = values.clamp_min(values.max() * 1e-6)
        self.target_mean.copy_(mean)
        self.target_zca.copy_((vectors @ torch.diag(values.rsqrt()) @ vectors.T).float())

    def loss(self, images, labels):
        t, levels = self.choose_t(images)
        target = self.teacher_target(images, t)
        mimic = self.adaptor(self.student.forward_features(images, pool=self.pool)).float()
        pooled_target = target
        if not self.pool:
            target = to_grid(target, mimic.shape[1])
            pooled_target = target.mean(dim=1)
        target = (target - self.target_mean) @ self.target_zca
        label_loss = F.cross_entropy(self.head(pooled_target), labels, reduction="none")  # (B,)
        loss = F.mse_loss(mimic, target) + label_loss.mean()
        if levels is not None:
            reward = -label_loss.detach()          # informative teacher features: a high reward
            loss = loss - (levels.log_prob(t) * self.advantage(reward)).mean()
            loss = loss - self.entropy_weight * levels.entropy().mean()
        return loss

    def advantage(self, reward):
        """r minus the leave-one-out mean r (unbiased). Without it (none, the authors') every r < 0
        pushes each sampled t down: the policy drifts onto levels it did not sample (RESULTS.md)."""
        if self.baseline == "none" or reward.numel() < 2:
            return reward
        others = (reward.sum() - reward) / (reward.numel() - 1)
        return reward - others


def get_args_parser():
    num = cli.bounded
    p = cli.ArgumentParser(prog="distill.py", description="RepFusion: distil a denoising model's "
                           "features (a pretrain.py checkpoint) into a student network, with the "
                           "noise level chosen per image by a learned policy (RECIPE.md s8).")
    g = p.add_argument_group("teacher and student")
    g.add_argument("--teacher", required=True, help="a pretrain.py checkpoint (l-DAE or DiT)")
    g.add_argument("--teacher-weights", default="ema", choices=["ema", "raw"],
                   help="the teacher checkpoint's EMA or raw weights")
    g.add_argument("--teacher-depth", type=num(int, 1), help="teacher block whose "
                   "pooled tokens are the target (default: the last encoder block, the probe's)")
    g.add_argument("--random-teacher", action="store_true", help="baseline: the teacher's network "
                   "with fresh weights (active blocks, as linprobe --random-init), its PCA kept")
    g.add_argument("--student", default="resnet18", choices=STUDENTS,
                   help="resnet18: RepFusion's (3x3 stem, no max-pool); vit_*: a registry ViT")
    g.add_argument("--match", default="pooled", choices=["pooled", "tokens"],
                   help="what the MSE compares: pooled features (the authors' code) or every "
                   "token of the teacher's block, pooled to the student's grid")
    g.add_argument("--whiten-target", type=num(int, 0), default=0, metavar="N",
                   help="N > 0: whiten the target (one ZCA map fitted on the first N training "
                   "images) so that every direction of the teacher's feature counts alike in the "
                   "MSE; 0: the raw target (the authors')")
    g = p.add_argument_group("noise level t (RepFusion's policy)")
    g.add_argument("--t-policy", default="rl", choices=["rl", "fixed"],
                   help="rl: a policy over t trained by REINFORCE; fixed: --t for every image")
    g.add_argument("--t", type=num(int, 0),
                   help="--t-policy fixed: the level (default: the teacher's probe level, 10)")
    g.add_argument("--policy-baseline", default="batch", choices=["batch", "none"],
                   help="batch: REINFORCE with the leave-one-out mean reward of the micro-batch "
                   "as baseline (learns reliably); none: the authors' form, no baseline")
    g.add_argument("--entropy-reg", type=num(float, 0), default=0.1,
                   help="initial weight of the policy's entropy bonus (the authors': 0.1)")
    g.add_argument("--entropy-epochs", type=num(float, 0), help="epochs over which "
                   "that weight decays linearly to 0 (default: half the run)")
    add_training_args(p)
    datasets.add_data_args(p)
    # RepFusion trains from scratch for longer than a probe; small-data defaults that run on CPU
    p.set_defaults(epochs=10, batch_size=64, blr=0.004, warmup_epochs=1, ema=0.999, save_every=5,
                   grid_every=1000, log_every=10, input_size=None, output_dir="out/student")
    return p


def main(args):
    return distributed.run_distributed(train, args)


def train(args, rank, world, device):
    """Teacher -> data -> student + policy -> the epoch loop -> student.pt."""
    is_main = rank == 0
    distributed.check_layout(args, world)
    cli.refuse_ignored(args, get_args_parser().parse_args(["--teacher", args.teacher]), [
        (args.t_policy != "fixed", ["t"], "by --t-policy rl (the policy picks t)"),
        (args.t_policy != "rl", ["policy_baseline", "entropy_reg", "entropy_epochs"],
         "by --t-policy fixed (no policy)")])
    teacher, depth, fixed_t, teacher_ckpt = load_teacher(args, device)
    args.input_size = args.input_size or teacher.config["img_size"]
    if args.input_size != teacher.config["img_size"]:
        raise UserError(f"the teacher takes {teacher.config['img_size']} px images, not "
                        f"--input-size {args.input_size}")
    transform = transforms.build_transform(args.aug, args.input_size)
    source, ckpt, train_set, changed, data = checkpoint.open_run(
        args, is_main, world, (), lambda: datasets.build_dataset(args, "train", transform),
        inputs=[args.teacher])
    teacher_sum = registry.checksum(teacher)          # the teacher a resume must find again
    if ckpt is not None and ckpt["model_config"].get("teacher_checksum") != teacher_sum:
        raise UserError(f"--resume: the teacher {args.teacher} is not the one this run was "
                        f"trained with (its weights changed); pass that teacher")

    torch.manual_seed(args.seed)                   # the same init on every rank
    student = build_student(args.student, teacher, args.input_size)
    model = RepFusion(teacher, student, datasets.num_classes(train_set), args.t_policy, fixed_t,
                      depth, args.entropy_reg, os.path.abspath(args.teacher), args.match,
                      args.policy_baseline).to(device)
    model.config["teacher_checksum"] = teacher_sum
    if args.whiten_target and ckpt is None:        # a resumed run has the map in its weights
        n = min(args.whiten_target, len(train_set))
        images = torch.stack([train_set[i][0] for i in range(n)]).to(device)
        model.fit_whitening(images, torch.Generator().manual_seed(args.seed))
    engine = Engine(model, args, rank, world, device)
    start = checkpoint.restore(engine, ckpt, model.config)
    entropy_steps = (args.entropy_epochs or args.epochs / 2) * (len(train_set) // args.batch_size)

    def entropy_weight(step):                      # lambda: --entropy-reg decaying linearly to 0
        weight = args.entropy_reg * max(0.0, 1.0 - step / max(entropy_steps, 1e-9))
        model.entropy_weight.fill_(weight)

    run = checkpoint.Run(args, engine, len(train_set),
                         lambda: {"model_config": model.config, "pca": teacher_ckpt["pca"]},
                         start, source, changed, data, on_step=entropy_weight)
    loader = distributed.make_loader(train_set, args, world, rank, device)
    if is_main:
        print_settings(args, teacher, depth, fixed_t, len(train_set), run)

    with distributed.StopSignal(world) as stop, run:
        for epoch in range(run.first_epoch, run.epochs):
            signum = train_one_epoch(engine, loader, epoch, run, stop)
            run.end_epoch(signum)                  # the log and the checkpoint
            if signum:
                run.stop(signum)
    if not is_main:
        return None
    res = run.result()
    res["student"] = save_student(model, engine, os.path.join(args.output_dir, "student.pt"),
                                  args, run.step)
    res["policy_t"] = policy_report(model, distributed.first_images(loader, 64, device))
    print(f"[distill] done. student: {res['student']} (python linprobe.py {res['student']} "
          f"--protocol cached --compare)")
    print(json.dumps(res), flush=True)
    return res


def load_teacher(args, device):
    ckpt = registry.load(args.teacher)
    if ckpt["model_config"]["family"] not in ("ldae", "dit"):
        raise UserError(f"{args.teacher} holds a {ckpt['model_config']['family']} network, not a "
                        f"denoising model: a teacher is a pretrain.py checkpoint (l-DAE or DiT)")
    teacher = registry.model_from_checkpoint(ckpt, args.teacher_weights, device)
    if args.random_teacher:
        torch.manual_seed(args.seed)               # drawn before the student's (which re-seeds)
        teacher.init_weights(active=True)
        teacher.requires_grad_(False)
    if teacher.config.get("input") == "latents":
        raise UserError("a DiT teacher on --latents-file latents reads no images; distil from an "
                        "l-DAE or a DiT on the PCA latent")
    depth = args.teacher_depth or teacher.depth // 2
    if not 1 <= depth <= teacher.depth:
        raise UserError(f"--teacher-depth {depth} is outside 1..{teacher.depth}")
    levels = teacher.config.get("num_steps", 1000)
    t = teacher.probe_t if args.t is None else args.t
    if not 0 <= t < levels:
        raise UserError(f"--t {t} is outside the teacher's noise levels 0..{levels - 1}")
    return teacher, depth, t, ckpt


def save_student(model, engine, path, args, step):
    """OUTPUT_DIR/student.pt: the student alone, raw and EMA, as a checkpoint of its family."""
    def student_part(state):
        return {k[len("student."):]: v for k, v in state.items() if k.startswith("student.")}
    state = engine.state()
    ema = student_part(state["ema"]) if state["ema"] is not None else None
    student = model.student
    pca = student.pca.to_dict() if student.pca is not None else None
    primitives = (int, float, str, bool, type(None))
    keep = {k: v for k, v in vars(args).items() if isinstance(v, primitives)}
    files.save_torch({"model": student_part(state["model"]), "ema": ema, "step": step,
                      "model_config": student.config, "pca": pca, "args": keep,
                      "distilled_from": args.teacher, "version": 1}, path)
    return path


@torch.no_grad()
def policy_report(model, images):
    """Quantiles of the t the (EMA-free, current) policy picks for some training images."""
    if model.policy is None:
        return {"fixed": model.fixed_t}
    model.eval()
    t = model.choose_t(images)[0].float()
    model.train()
    q = torch.quantile(t, torch.tensor([0.1, 0.5, 0.9], device=t.device)).tolist()
    return {"p10": round(q[0]), "median": round(q[1]), "p90": round(q[2])}


def print_settings(args, teacher, depth, fixed_t, n_images, run):
    how = f"fixed t = {fixed_t}"
    if args.t_policy == "rl":
        how = (f"policy over t = 0..{teacher.config.get('num_steps', 1000) - 1} (REINFORCE, "
               f"baseline {args.policy_baseline}), entropy {args.entropy_reg:g} -> 0")
    weights = ("RANDOM weights (--random-teacher)" if args.random_teacher
               else f"{args.teacher_weights} weights")
    whitening = (f"target whitened (ZCA of {args.whiten_target} images)" if args.whiten_target
                 else "raw target")
    cli.print_settings("distill", [
        f"teacher     {args.teacher} ({teacher.config['name']}, {weights}), block {depth}, "
        f"clean input",
        f"t           {how}",
        f"student     {args.student}, MSE on {args.match} features, {whitening}",
        f"data        {args.dataset}: {n_images} train images, {args.input_size} px, "
        f"aug {args.aug}",
        f"lr          peak {run.base_lr:.4g}, warmup {args.warmup_epochs:g} of {args.epochs:g} "
        f"epochs",
        *run.settings_lines()])


if __name__ == "__main__":
    cli.run_cli(main, get_args_parser())
