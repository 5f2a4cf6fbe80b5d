"""`part-fast eval`: its parser and the command, with both protocols: the attacks table on the run's test
set, and RobustBench's evaluation with the leaderboard's model_info JSON."""
from __future__ import annotations

import sys
import time
from pathlib import Path

from ..devices import AUTO, parse_device
from ..errors import ConfigError
from ..eps_text import validate_budget
from ..robustbench_protocol import BATCH_SIZE as RB_BATCH_SIZE
from ..robustbench_protocol import DATASETS as RB_DATASETS
from ..robustbench_protocol import N_EXAMPLES as RB_N_EXAMPLES
from .common import (DEVICE_HELP, add_weights_flag, announced_device, fraction, load_announced, run_test_loader,
                     validate_positive, with_default, write_json)

PROTOCOLS = ("attacks", "robustbench")
DEFAULT_ATTACKS = ("natural", "pgd20", "mma", "aa")


def eval_parser(sub) -> None:
    p = sub.add_parser("eval", help="robust accuracy of a checkpoint (table + JSON); --protocol robustbench for "
                                    "the leaderboard's evaluation and its model_info JSON")
    p.add_argument("checkpoint", help="RUN_DIR/last.pt")
    p.add_argument("--protocol", choices=PROTOCOLS, default="attacks",
                   help=with_default("attacks: the --attacks table on the run's test set; robustbench: "
                                     "RobustBench's benchmark() (first 10000 CIFAR test images in file order, "
                                     "original AutoAttack standard, its batching) and the leaderboard's "
                                     "model_info JSON", "attacks"))
    p.add_argument("--attacks", default=None,
                   help=with_default("comma-separated: natural, pgd20, mma, aa (original AutoAttack), aa-release "
                                     "(torchattacks' AA as released: 10 iterations, weaker); --protocol attacks "
                                     "only", ",".join(DEFAULT_ATTACKS)))
    p.add_argument("--dataset", choices=tuple(RB_DATASETS), default=None,
                   help=with_default("the test set of --protocol robustbench (the model must have as many "
                                     "classes)", "the run's dataset when it is one of these"))
    p.add_argument("--data-dir", default=None, help=with_default("dataset folder", "the run's"))
    p.add_argument("--test-subset", type=int, default=None,
                   help=with_default("first N test examples", f"the run's; {RB_N_EXAMPLES} with --protocol "
                                                              "robustbench"))
    p.add_argument("--batch-size", type=int, default=None,
                   help=with_default("evaluation batch (part of the RobustBench protocol: AutoAttack reseeds per "
                                     "batch)", f"256; {RB_BATCH_SIZE} with --protocol robustbench"))
    p.add_argument("--eps", type=fraction, default=8 / 255, help=with_default("L-inf budget, e.g. 8/255", "8/255"))
    p.add_argument("--step-size", type=fraction, default=None, help=with_default("PGD/MMA step", "the run's"))
    p.add_argument("--device", default=AUTO, help=with_default(DEVICE_HELP, AUTO))
    p.add_argument("--seed", type=int, default=0, help=with_default("seed of the attacks' random starts "
                                                                    "(AutoAttack's seed too)", 0))
    add_weights_flag(p)
    p.add_argument("--json", default=None,
                   help=with_default("where to write the JSON (its folder is created)",
                                     "eval.json next to the checkpoint; with --protocol robustbench, "
                                     "robustbench-<dataset>-Linf.eval.json, and the model_info record "
                                     "robustbench-<dataset>-Linf.json beside it"))


def _validate_eval_numbers(args) -> None:
    """Both protocols: the device name first (names before numbers), then the budget and the counts."""
    parse_device(args.device)
    validate_budget("--eps", args.eps)
    validate_positive("--batch-size", args.batch_size)
    validate_positive("--test-subset", args.test_subset)


def cmd_eval(args) -> int:
    from ..evaluation import ATTACK_LABELS, ATTACKS, evaluate

    if args.protocol == "robustbench":
        return _eval_robustbench(args)
    if args.dataset is not None:
        raise ConfigError("--dataset belongs to --protocol robustbench; --protocol attacks uses the run's test set")
    attacks = tuple(a.strip() for a in (args.attacks or ",".join(DEFAULT_ATTACKS)).split(",") if a.strip())
    unknown = [a for a in attacks if a not in ATTACKS]
    if unknown:
        raise ConfigError(f"--attacks: unknown {unknown}; choose from {', '.join(ATTACKS)}")
    _validate_eval_numbers(args)
    if args.step_size is not None:
        validate_budget("--step-size", args.step_size)
    device = announced_device("eval", args.device)
    model, config = load_announced("eval", args.checkpoint, device, args.weights)
    loader, _, _ = run_test_loader(config, args.data_dir, args.test_subset, args.batch_size or 256)
    step = args.step_size if args.step_size is not None else config.resolved().step_size
    result = evaluate(model, loader, attacks=attacks, eps=args.eps, alpha=step, device=device, seed=args.seed,
                      progress=sys.stderr.isatty(), on_audit=_print_verdicts)
    result.update({"checkpoint": str(args.checkpoint), "eps": args.eps, "step_size": step, "device": str(device),
                   "date": time.strftime("%Y-%m-%d %H:%M:%S"), "labels": {a: ATTACK_LABELS[a] for a in attacks}})
    lines = ["| attack | accuracy | seconds |", "|---|---|---|"]
    lines += [f"| {ATTACK_LABELS[a]} | {result[a]:.2f}% | {result['seconds'][a]:.1f} |" for a in attacks]
    print("\n".join(lines))
    print(f"({result['examples']} test examples)")
    write_json(Path(args.json) if args.json else Path(args.checkpoint).with_name("eval.json"), result, "--json")
    return 0


def _print_verdicts(verdicts) -> None:
    """One line per AutoAttack check, then a warning when any failed (the number is then not to be trusted)."""
    for verdict in verdicts:
        print(verdict.line())
    failed = [v.check for v in verdicts if not v.passed]
    if failed:
        print(f"WARNING: AutoAttack check(s) failed ({', '.join(failed)}): its accuracy is not a reliable "
              "measure of this model's robustness", file=sys.stderr)
    sys.stdout.flush()


def _eval_robustbench(args) -> int:
    from ..evaluation import num_classes_of
    from ..robustbench_protocol import evaluate_robustbench, load_test_set, model_info

    if args.attacks is not None:
        raise ConfigError("--attacks does not apply to --protocol robustbench: it runs the original AutoAttack, "
                          "version standard")
    if args.step_size is not None:
        raise ConfigError("--step-size does not apply to --protocol robustbench: AutoAttack sets its own steps")
    _validate_eval_numbers(args)
    device = announced_device("eval", args.device)
    model, config = load_announced("eval", args.checkpoint, device, args.weights)
    dataset = args.dataset or (config.dataset if config.dataset in RB_DATASETS else None)
    if dataset is None:
        raise ConfigError(f"--protocol robustbench: this run trained on {config.dataset!r}; RobustBench's L-inf "
                          f"leaderboards are {', '.join(RB_DATASETS)}: pass --dataset")
    classes = num_classes_of(model)
    if classes != RB_DATASETS[dataset]:
        raise ConfigError(f"--dataset {dataset} has {RB_DATASETS[dataset]} classes, the model {classes}")
    n_examples = args.test_subset or RB_N_EXAMPLES
    x, y = load_test_set(dataset, args.data_dir or config.data_dir, n_examples)
    batch_size = args.batch_size or RB_BATCH_SIZE
    print(f"RobustBench protocol: {dataset}, first {n_examples} test images, L-inf eps {args.eps:.6g}, original "
          f"AutoAttack standard, batch {batch_size}, seed {args.seed}", flush=True)
    result = evaluate_robustbench(model, x, y, dataset=dataset, eps=args.eps, batch_size=batch_size, device=device,
                                  seed=args.seed, on_audit=_print_verdicts)
    print(f"clean accuracy: {100 * result.clean_acc:.2f}% | AutoAttack accuracy: {100 * result.autoattack_acc:.2f}%"
          f" ({result.n_examples} examples, {result.autoattack})")
    run = Path(args.checkpoint).resolve().parent
    details = Path(args.json) if args.json else run / f"robustbench-{dataset}-Linf.eval.json"
    record = model_info(result, name=run.name, arch=config.arch,
                        footnote=f"{config.method.upper()} trained with part_fast; evaluated with {result.autoattack}, "
                        f"seed {result.seed}, batch {batch_size}")
    write_json(run / f"robustbench-{dataset}-Linf.json", record, "checkpoint folder")
    write_json(details, {**result.to_json(), "checkpoint": str(args.checkpoint), "device": str(device),
                         "date": time.strftime("%Y-%m-%d %H:%M:%S"), "model_info": record}, "--json")
    return 0
