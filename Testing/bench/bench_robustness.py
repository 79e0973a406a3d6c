"""Adversarial robustness of ROG on a built-in 3-class task: APGD vs PGD, FAB-T, Free AT vs clean.

Reproduces the qualitative findings the ROG paper reports for AutoAttack on segmentation
(Daza et al. 2021, sections 3.1 and 4.1) on data anyone can regenerate:

* a clean ROG is trained on synthetic CT-like blob volumes (liver + kidney, 40^3), then
  fine-tuned for the same number of optimizer steps twice from the same checkpoint: once clean,
  once with Free adversarial training (eps 8/255 of the valid range, m = 5 replays);
* both models are attacked on held-out volumes of other seeds at eps 0, 4, 8, 12, 16 (/255 of
  each channel's [p0.5, p99.5] range), every attack on every case on its own (the paper's
  Table 1): PGD and APGD-CE with the same iterations, APGD-DLR, FAB-T and Square;
* it reports Dice per attack and eps, the Dice-vs-eps AUCs (APGD-CE vs PGD: lower is stronger),
  robust Dice (worst attack per case) of clean vs Free AT, and the cost of one attack on one case
  against one training step at the same patch size.

Not part of ``make test``: ``python Testing/bench/bench_robustness.py [--quick] [--out DIR]``
(about 40 minutes on one CPU thread; ``--quick`` is an 8-minute smoke run).
"""

import argparse
import json
import time
from pathlib import Path

import torch

from deepimaging.core.imageio import write_image
from deepimaging.robustness.report import markdown_table, write_report
from deepimaging.robustness.rog import evaluate_rog_robustness
from deepimaging.rog.plan import plan_dataset
from deepimaging.rog.synthetic import cpu_friendly, make_blob_case, write_blob_dataset
from deepimaging.rog.train import train_rog

ATTACKS = ["pgd", "apgd-ce", "apgd-dlr", "fab-t", "square"]


def held_out(root, count, shape, seed=1000):
    (root / "imagesTs").mkdir(exist_ok=True)
    (root / "labelsTs").mkdir(exist_ok=True)
    cases = []
    for index in range(count):
        image, label = make_blob_case(shape, seed=seed + index)
        name = f"test_{index:03d}.nii.gz"
        write_image(image, root / "imagesTs" / name)
        write_image(label, root / "labelsTs" / name)
        cases.append((root / "imagesTs" / name, root / "labelsTs" / name))
    return cases


def time_training_step(checkpoint, plan, repeats=5):
    """Seconds of one optimizer step (forward, Dice+CE backward, Adam) on a batch of 2 patches."""
    from monai.losses import DiceCELoss

    from deepimaging.rog.infer import load_rog

    model = load_rog(checkpoint, "cpu").model.train()
    optimizer = torch.optim.Adam(model.parameters(), 1e-4)
    loss_fn = DiceCELoss(to_onehot_y=True, softmax=True)
    x = torch.randn(2, len(plan.channels), *plan.patch_size)
    y = torch.randint(0, len(plan.labels), (2, 1, *plan.patch_size))
    times = []
    for _ in range(repeats + 1):
        start = time.perf_counter()
        optimizer.zero_grad()
        loss_fn(model(x), y).backward()
        optimizer.step()
        times.append(time.perf_counter() - start)
    return sorted(times[1:])[len(times[1:]) // 2]


def time_attacks(checkpoint, case, eps, iterations, queries):
    """Seconds per attack on one case at one eps (each attack alone)."""
    seconds = {}
    for attack in ATTACKS:
        start = time.perf_counter()
        evaluate_rog_robustness(checkpoint, [case], [eps], attacks=[attack], iterations=iterations,
                                square_queries=queries, cascade=False, device="cpu")
        seconds[attack] = time.perf_counter() - start
    return seconds


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("bench-output/robustness"))
    parser.add_argument("--quick", action="store_true", help="small budgets: a smoke run, not the README numbers")
    args = parser.parse_args()
    torch.set_num_threads(1)
    quick = args.quick
    epochs, steps = (4, 8) if quick else (20, 12)
    tune_epochs = 2 if quick else 10
    iterations, queries = (3, 40) if quick else (10, 100)
    eps = [0, 8, 16] if quick else [0, 4, 8, 12, 16]
    n_test = 2 if quick else 3
    out = args.out
    out.mkdir(parents=True, exist_ok=True)

    root = write_blob_dataset(out / "data", cases=6, shape=(40, 40, 40))
    cases = held_out(root, n_test, (40, 40, 40))
    plan = cpu_friendly(plan_dataset(root), (32, 32, 32))
    start = time.perf_counter()
    clean = train_rog(root, out / "pretrained", epochs, plan=plan, steps_per_epoch=steps, resume=False, device="cpu")
    clean_seconds = time.perf_counter() - start
    runs = {}
    for name, folder, free in (("clean fine-tune", "clean_finetune", False), ("Free AT fine-tune", "freeat_finetune", True)):
        start = time.perf_counter()
        result = train_rog(root, out / folder, tune_epochs, plan=plan, steps_per_epoch=steps,
                           resume=False, init_from=clean.best_path, free_at=free, device="cpu")
        runs[name] = (result, time.perf_counter() - start, folder)

    summary = {"settings": {"train_epochs": epochs, "steps_per_epoch": steps, "fine_tune_epochs": tune_epochs,
                            "iterations": iterations, "square_queries": queries, "eps_255": eps,
                            "test_cases": n_test, "patch": list(plan.patch_size)},
               "clean_training_seconds": round(clean_seconds, 1), "models": {}}
    tables = []
    for name, (run, seconds, folder) in runs.items():
        result, _ = evaluate_rog_robustness(run.best_path, cases, eps, attacks=ATTACKS, iterations=iterations,
                                            square_queries=queries, cascade=False, device="cpu")
        write_report(result, out / folder / "report")
        summary["models"][name] = {"fine_tune_seconds": round(seconds, 1), "clean_dice": result.clean_dice,
                                   "attacks": result.attacks, "auc": result.auc, "robust_dice": result.robust_dice,
                                   "robust_auc": result.robust_auc, "warnings": result.warnings,
                                   "benchmark_seconds": result.settings["seconds"]}
        tables.append(f"### {name}\n\n{markdown_table(result)}")
        print(f"{name}: clean Dice {result.clean_dice:.3f}; AUC " + ", ".join(
            f"{k} {v:.3f}" for k, v in result.auc.items()) + f"; robust AUC {result.robust_auc:.3f}")

    step = time_training_step(runs["clean fine-tune"][0].best_path, plan)  # both fine-tunes start from pretrained/
    attack_seconds = time_attacks(runs["clean fine-tune"][0].best_path, cases[0], 8, iterations, queries)
    summary["cost"] = {"training_step_seconds": step, "attack_seconds_per_case": attack_seconds,
                       "ratio_to_training_step": {k: v / step for k, v in attack_seconds.items()}}
    print(f"one training step (batch 2, patch {plan.patch_size}): {step:.3f} s; one attack on one 40^3 case at "
          "8/255: " + ", ".join(f"{k} {v:.1f} s ({v / step:.0f} steps)" for k, v in attack_seconds.items()))
    (out / "robustness_summary.json").write_text(json.dumps(summary, indent=2))
    (out / "robustness_tables.md").write_text("\n\n".join(tables) + "\n")
    print(f"wrote {out / 'robustness_summary.json'} and {out / 'robustness_tables.md'}")


if __name__ == "__main__":
    main()
