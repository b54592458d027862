"""KD fidelity of the stored targets: the stored-top-k loss vs the exact coarsened KL and vs dense KD.

Prints one JSON object. Several minutes on 2 CPU cores with the defaults (the bf16 forward dominates).

Teachers: 1000-class logits of two realistic shapes, `sharp` (top-1 p ~0.93, top-10 mass ~0.98, the
trained-teacher figures of issue 9) and `flat` (top-1 p ~0.4, top-10 mass ~0.7): a Gaussian background,
a boost on the label and smaller boosts on a few confusable classes per view. Students: `early`
(near-uniform), `mid` (a noisy, shrunk copy of the teacher) and `late` (the teacher plus noise: ~90 %
top-1 agreement with it, as a well-trained student); each case reports its top-1 agreement.

Every stored number goes through the real store: encode_topk + encode_rest, written with the writer
`pipeline teach` uses (fixed-point log p, the tempered rest per tau) and read back with LogitStore.lookup_tau,
the student's path. For each stored tau and each (teacher, student) case:
  rel_err_vs_coarsened  |stored loss - exact coarsened KL| / coarsened KL (float64 brute force on the
                        same top-k classes): what the store gets wrong, target <= 1e-3;
  grad_rel_err_vs_coarsened  ||grad stored - grad exact|| / ||grad exact|| wrt the student logits;
  rel_err_vs_dense      |stored loss - dense KD| / dense KD: the price of keeping top-k only;
  grad_cos_vs_dense     cosine of the gradients wrt the student logits, stored loss vs dense KD;
  flat_tail_rel_err_vs_coarsened  the same error for the old flat-tail model (what --flat-tail gives).
The top level reports the worst case over teachers and students; "cases" has each.

near: students close to the teacher (teacher + 0.5 N(0,1) and + 0.2 N(0,1) on the logits), where the KL
is small and a rounded target costs most: loss rel_err <= 1e-3 and gradient rel_err <= 1e-2 at every tau.
ensemble: two teachers (the sharp one and a flat one on the same labels), weights 1:1 and 3:1, each
through its own store, against the float64 coarsened KL of the TRUE weighted mixture of the tempered
softmaxes on the stated partition (intersection of the top-k sets + rest): rel_err <= 1e-3.

bf16: what `teach --amp bf16` costs. A random-init timm teacher (--bf16-model) on smooth random images
has near-uniform logits, which hide the cost, so its classifier is scaled to each --bf16-logit-std (the
per-image std of the fp32 logits, 3-10 for trained ImageNet teachers): per std, the mean and max
KL(softmax(fp32) || softmax(bf16 autocast)), the top-1 agreement and the share of images whose top-10
SET is unchanged (what the store keeps). Under --amp the teacher pass (pipeline.teachers.Forward) casts the
bf16 logits to float32 before top-k and lse: the store gets bf16-computed logits in f32, not fp32 logits.
"""

import argparse
import json
import tempfile
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from pipeline.codec import encode_rest, encode_topk
from pipeline.data.views import ViewPlan, view_params
from pipeline.defaults import DEFAULT_TEMPERATURES, DEFAULT_VALUES
from pipeline.distill import bucket_kl, ensemble_target, teacher_target
from pipeline.store import bytes_on_disk, create_or_open, open_store

C, K = 1000, 10
TEACHERS = {"sharp": dict(std=1.0, boost=11.4, confusers=4, confuser_boost=8.0),
            "flat": dict(std=1.0, boost=7.8, confusers=6, confuser_boost=6.8)}


def teacher_logits(n, num_views, shape, seed):
    """[n * num_views, C]: views of one sample share the label and confusers, with per-view noise."""
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(n, 1, C, generator=g) * shape["std"]
    z = base + 0.5 * torch.randn(n, num_views, C, generator=g)
    label = torch.randint(0, C, (n,), generator=g)
    rows = torch.arange(n)
    for j in range(shape["confusers"]):
        z[rows, :, torch.randint(0, C, (n,), generator=g)] += shape["confuser_boost"] * (0.6 + 0.4 * j / shape["confusers"])
    z[rows, :, label] += shape["boost"]
    return z.reshape(n * num_views, C), label


def student_logits(teacher, stage, seed):
    g = torch.Generator().manual_seed(seed)
    noise = torch.randn(teacher.shape, generator=g)
    return {"early": 0.1 * noise, "mid": 0.5 * teacher + 1.0 * noise, "late": 0.9 * teacher + 0.8 * noise}[stage]


def through_store(tmp, name, logits, labels, num_views, values):
    """Write the logits as `pipeline teach` does and open the store the way the student does."""
    n = len(labels)
    plan = ViewPlan()
    params = np.stack([[view_params(plan, f"n{i:07d}", v) for v in range(num_views)] for i in range(n)])
    logp, idx, lse = encode_topk(logits, K, values)
    rest = encode_rest(logits, K, DEFAULT_TEMPERATURES)
    path = Path(tmp) / f"{name}.zarr"
    writer = create_or_open(path, {"key": name, "plan": plan.to_dict()}, num_samples=n, num_views=num_views, k=K,
                            params_dim=plan.params_dim, num_classes=C, shard_rows=n, values=values,
                            temperatures=DEFAULT_TEMPERATURES)
    shape = (n, num_views)
    writer.write_shard(0, logp.reshape(*shape, K), idx.reshape(*shape, K), lse.reshape(shape), params, labels.numpy(),
                       rest=rest.reshape(*shape, -1))
    per_array = {a.name: round(bytes_on_disk(a) / (n * num_views), 2) for a in path.iterdir() if a.is_dir()}
    return open_store(path), bytes_on_disk(path) / (n * num_views), per_array


def coarsened_kl(student, teacher, classes, tau):
    """tau^2 * KL of the tempered dense softmaxes coarsened onto (stored classes, rest), float64."""
    p, logq = F.softmax(teacher.double() / tau, 1), F.log_softmax(student / tau, 1)
    known = torch.zeros_like(p, dtype=torch.bool).scatter_(1, classes, True)
    pk, r = p.gather(1, classes), (p * ~known).sum(1)
    qk = logq.gather(1, classes)
    q_rest = torch.logsumexp(logq.masked_fill(known, float("-inf")), 1)
    kl = (pk * (pk.log() - qk)).sum(1) + torch.xlogy(r, r) - r * q_rest
    return tau**2 * kl.mean()


def dense_kd(student, teacher, tau):
    return tau**2 * F.kl_div(F.log_softmax(student / tau, 1), F.softmax(teacher.double() / tau, 1),
                             reduction="batchmean")


def stored_kd(student, stored, tau, flat_tail=False):
    z, classes, lse, lse_tau = stored
    target = teacher_target(z, classes, lse, C, tau, None if flat_tail else lse_tau, flat_tail=flat_tail)
    return tau**2 * bucket_kl(student, target, tau)


def grad(loss_fn, student):
    s = student.detach().double().clone().requires_grad_()
    loss_fn(s).backward()
    return s.grad.flatten()


def rel(a, b):
    return float((a - b).norm() / b.norm())


def case(student, teacher, stored, tau):
    classes = stored[1]
    exact = float(coarsened_kl(student.double(), teacher, classes, tau))
    g_exact = grad(lambda s: coarsened_kl(s, teacher, classes, tau), student)
    dense = float(dense_kd(student.double(), teacher, tau))
    got = float(stored_kd(student.float(), stored, tau))
    flat = float(stored_kd(student.float(), stored, tau, flat_tail=True))
    g_stored = grad(lambda s: stored_kd(s, stored, tau), student)
    g_dense = grad(lambda s: dense_kd(s, teacher, tau), student)
    return {"rel_err_vs_coarsened": abs(got - exact) / exact, "abs_err_vs_coarsened": abs(got - exact),
            "grad_rel_err_vs_coarsened": rel(g_stored, g_exact),
            "rel_err_vs_dense": abs(got - dense) / dense,
            "grad_cos_vs_dense": float(F.cosine_similarity(g_stored, g_dense, 0)),
            "flat_tail_rel_err_vs_coarsened": abs(flat - exact) / exact, "kd": got, "coarsened": exact, "dense": dense,
            "top1_agreement": float((student.argmax(1) == teacher.argmax(1)).float().mean())}


def near_case(student, teacher, stored, tau):
    """Loss and gradient of the stored targets vs the float64 coarsened KL, for a student near the teacher."""
    classes = stored[1]
    exact = float(coarsened_kl(student.double(), teacher, classes, tau))
    got = float(stored_kd(student.float(), stored, tau))
    g_stored = grad(lambda s: stored_kd(s, stored, tau), student)
    g_exact = grad(lambda s: coarsened_kl(s, teacher, classes, tau), student)
    return {"rel_err_vs_coarsened": abs(got - exact) / exact, "abs_err_vs_coarsened": abs(got - exact),
            "grad_rel_err_vs_coarsened": rel(g_stored, g_exact), "coarsened": exact,
            "top1_agreement": float((student.argmax(1) == teacher.argmax(1)).float().mean())}


def mixture_kl(student, teachers, weights, classes, tau):
    """float64 tau^2 KL of the TRUE weighted mixture of tempered softmaxes, coarsened onto the intersection of
    the teachers' stored top-k sets (one bucket per class) + one rest bucket."""
    w = torch.tensor(weights, dtype=torch.float64) / sum(weights)
    m = sum(wj * F.softmax(t.double() / tau, 1) for wj, t in zip(w, teachers))
    inter = torch.ones_like(m, dtype=torch.bool)
    for c in classes:
        inter &= torch.zeros_like(inter).scatter_(1, c, True)
    logq = F.log_softmax(student / tau, 1)
    r = (m * ~inter).sum(1)
    q_rest = torch.logsumexp(logq.masked_fill(inter, float("-inf")), 1)
    kl = (torch.xlogy(m, m) - m * logq).masked_fill(~inter, 0).sum(1) + torch.xlogy(r, r) - r * q_rest
    return tau**2 * kl.mean()


def ensemble_case(student, teachers, stored, weights, tau):
    classes = [s[1] for s in stored]
    exact = float(mixture_kl(student.double(), teachers, weights, classes, tau))

    def loss(s):
        return tau**2 * bucket_kl(s, ensemble_target(stored, C, tau, weights), tau)

    got = float(loss(student.float()))
    g_stored = grad(loss, student)
    g_exact = grad(lambda s: mixture_kl(s, teachers, weights, classes, tau), student)
    return {"rel_err_vs_coarsened": abs(got - exact) / exact, "grad_rel_err_vs_coarsened": rel(g_stored, g_exact),
            "coarsened": exact, "known_classes": float(ensemble_target(stored, C, tau, weights).known.sum(1).double().mean())}


def bf16_teacher_cost(model_name, batch, size, batches, logit_stds, k=10):
    """Per target logit std: KL, top-1 and top-k set agreement of bf16-autocast vs fp32 logits."""
    import timm

    torch.manual_seed(0)
    model = timm.create_model(model_name, num_classes=C).eval()
    g = torch.Generator().manual_seed(0)
    images = [F.interpolate(torch.randn(batch, 3, 8, 8, generator=g), size=size, mode="bicubic")
              for _ in range(batches)]  # smooth random images (upsampled 8x8 noise), normalised like ImageNet
    with torch.inference_mode():
        pooled = {"fp32": [], "bf16": []}  # features before the classifier, which is then scaled per std
        for x in images:
            pooled["fp32"].append(model.forward_head(model.forward_features(x), pre_logits=True).float())
            with torch.autocast("cpu", dtype=torch.bfloat16):
                pooled["bf16"].append(model.forward_head(model.forward_features(x), pre_logits=True))
        fc = model.get_classifier()
        raw_std = float(fc(torch.cat(pooled["fp32"])).std(1).mean())
        result = {"model": model_name, "images": batch * batches, "raw_logit_std": raw_std, "by_logit_std": {}}
        for std in logit_stds:
            scale = std / raw_std
            fp32 = torch.cat([F.linear(f, fc.weight * scale, fc.bias * scale) for f in pooled["fp32"]]).double()
            with torch.autocast("cpu", dtype=torch.bfloat16):  # the classifier runs in bf16 too, as under --amp
                bf16 = torch.cat([F.linear(f, fc.weight * scale, fc.bias * scale) for f in pooled["bf16"]])
            bf16 = bf16.double()
            kl = F.kl_div(F.log_softmax(bf16, 1), F.log_softmax(fp32, 1), log_target=True, reduction="none").sum(1)
            same_set = (fp32.topk(k).indices.sort(1).values == bf16.topk(k).indices.sort(1).values).all(1)
            result["by_logit_std"][f"{std:g}"] = {
                "mean_kl": float(kl.mean()), "max_kl": float(kl.max()),
                "top1_agreement": float((fp32.argmax(1) == bf16.argmax(1)).double().mean()),
                f"top{k}_set_agreement": float(same_set.double().mean()),
                "top1_p": float(fp32.softmax(1).max(1).values.mean())}
    return result


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=4096, help="samples per teacher store (x --num-views views)")
    parser.add_argument("--loss-samples", type=int, default=256, help="of which the losses are measured on")
    parser.add_argument("--num-views", type=int, default=4)
    parser.add_argument("--values", default=DEFAULT_VALUES, help="value encoding of the store (pipeline teach --values)")
    parser.add_argument("--bf16-model", default="resnet18")
    parser.add_argument("--bf16-batches", type=int, default=8, help="batches of 16 images at 224 px")
    parser.add_argument("--bf16-logit-std", default="1,3,5,10", help="classifier scaled to these fp32 logit stds")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    cases, shapes, sizes, near, ensemble = {}, {}, [], {}, {}
    with tempfile.TemporaryDirectory() as tmp:
        for t, (name, shape) in enumerate(TEACHERS.items()):
            teacher, labels = teacher_logits(args.samples, args.num_views, shape, seed=t)
            probs = F.softmax(teacher, 1)
            shapes[name] = {"top1_p": round(float(probs.max(1).values.mean()), 3),
                            "top10_mass": round(float(probs.topk(K).values.sum(1).mean()), 3)}
            store, per_view, per_array = through_store(tmp, name, teacher, labels, args.num_views, args.values)
            sizes.append(per_view)
            shapes[name]["bytes_by_array"] = per_array
            n = min(args.loss_samples, args.samples)
            index = torch.arange(n).repeat_interleave(args.num_views)
            view = torch.arange(args.num_views).repeat(n)
            teacher = teacher[: n * args.num_views]
            noise = torch.randn(teacher.shape, generator=torch.Generator().manual_seed(20 + t))
            for tau in DEFAULT_TEMPERATURES:
                stored = store.lookup_tau(index, view, tau)
                for s, stage in enumerate(("early", "mid", "late")):
                    student = student_logits(teacher, stage, seed=10 + s)
                    cases.setdefault(f"{tau:g}", {})[f"{name}/{stage}"] = case(student, teacher, stored, tau)
                for sigma in (0.5, 0.2):
                    near.setdefault(f"{tau:g}", {})[f"{name}/teacher+{sigma:g}N"] = near_case(
                        teacher + sigma * noise, teacher, stored, tau)
        # ensemble: the sharp teacher and a flat one on the same samples (seed 0: same labels), each its own store
        n = min(args.loss_samples, args.samples)
        index = torch.arange(n).repeat_interleave(args.num_views)
        view = torch.arange(args.num_views).repeat(n)
        pair = []
        for name, seed, extra in (("sharp", 0, 0.0), ("flat", 0, 0.5)):
            logits, labels = teacher_logits(n, args.num_views, TEACHERS[name], seed=seed)
            logits = logits + extra * torch.randn(logits.shape, generator=torch.Generator().manual_seed(7))
            store, _, _ = through_store(tmp, f"ens-{name}", logits, labels, args.num_views, args.values)
            pair.append((logits, store))
        teachers = [p[0] for p in pair]
        center = sum(teachers) / 2
        for tau in DEFAULT_TEMPERATURES:
            stored = [s.lookup_tau(index, view, tau) for _, s in pair]
            for weights in ((1.0, 1.0), (3.0, 1.0)):
                for s, stage in enumerate(("early", "mid", "late")):
                    student = student_logits(center, stage, seed=30 + s)
                    ensemble.setdefault(f"{tau:g}", {})[f"{weights[0]:g}:{weights[1]:g}/{stage}"] = ensemble_case(
                        student, teachers, stored, list(weights), tau)
    stds = [float(v) for v in args.bf16_logit_std.split(",")]
    bf16 = bf16_teacher_cost(args.bf16_model, 16, 224, args.bf16_batches, stds) if args.bf16_batches else None
    worst = {tau: {"rel_err_vs_coarsened": max(c["rel_err_vs_coarsened"] for c in per.values()),
                   "abs_err_vs_coarsened": max(c["abs_err_vs_coarsened"] for c in per.values()),
                   "rel_err_vs_dense": max(c["rel_err_vs_dense"] for c in per.values()),
                   "grad_cos_vs_dense": min(c["grad_cos_vs_dense"] for c in per.values()),
                   "flat_tail_rel_err_vs_coarsened": max(c["flat_tail_rel_err_vs_coarsened"] for c in per.values())}
             for tau, per in cases.items()}
    def worst_of(section):
        return {tau: {key: max(c[key] for c in per.values()) for key in ("rel_err_vs_coarsened",
                                                                       "grad_rel_err_vs_coarsened")}
                for tau, per in section.items()}

    for tau, per in cases.items():
        worst[tau]["grad_rel_err_vs_coarsened"] = max(c["grad_rel_err_vs_coarsened"] for c in per.values())
    result = {"tau": worst, "bytes_per_view_k10": round(max(sizes), 2), "values_encoding": args.values,
              "near": {"worst": worst_of(near), "bounds": {"rel_err_vs_coarsened": 1e-3, "grad_rel_err_vs_coarsened": 1e-2},
                       "cases": {tau: {n: {k: float(f"{v:.4g}") for k, v in c.items()} for n, c in per.items()}
                                 for tau, per in near.items()}},
              "ensemble": {"worst": worst_of(ensemble), "bounds": {"rel_err_vs_coarsened": 1e-3},
                           "partition": "intersection of the teachers' top-k sets + one rest bucket",
                           "cases": {tau: {n: {k: float(f"{v:.4g}") for k, v in c.items()} for n, c in per.items()}
                                     for tau, per in ensemble.items()}},
              "temperatures": list(DEFAULT_TEMPERATURES), "teachers": shapes,
              "bf16": bf16,
              "teach_keeps_fp32_logits": False,
              "teach_logits_note": "under --amp the teacher runs in autocast and its logits are cast to float32 "
                                   "before top-k/lse (pipeline.teachers.Forward): bf16-computed values in f32",
              "cases": {tau: {n: {k: float(f"{v:.4g}") for k, v in c.items()} for n, c in per.items()}
                        for tau, per in cases.items()}}
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
