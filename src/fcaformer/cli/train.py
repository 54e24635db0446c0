"""``fcaformer train | eval | predict``."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path


def _add_train(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "train", help="train a classifier (no arguments: the embedded digits demo)",
        description="Train an image classifier from a preset or YAML config; flags override the config. "
                    "With no arguments: a small FcaFormer on scikit-learn's handwritten digits (no download).",
    )
    p.add_argument("--config", "-c", default=None,
                   help="preset name (default, imagenet, imagenette, finetune, repro) or YAML file (default: "
                        "'finetune' with --pretrained, 'imagenette' with --data, else 'default')")
    p.add_argument("--data", help="dataset root: an ImageFolder tree (root/train, root/val), a CIFAR folder or a "
                                  "packed .npz file (fcaformer pack)")
    p.add_argument("--dataset", choices=["digits", "imagefolder", "cifar10", "cifar100", "packed"],
                   help="dataset type (default: from the config, or guessed from --data)")
    p.add_argument("--model", help="timm model name, e.g. fcaformer_l1")
    p.add_argument("--epochs", type=int)
    p.add_argument("--batch-size", type=int, help="per process")
    p.add_argument("--lr", type=float, help="lr for a batch of optim.lr_base_batch images (the lr used scales "
                                            "linearly with the global batch; --print-config shows both)")
    p.add_argument("--img-size", type=int)
    p.add_argument("--output", "-o", help="run folder (default: the config's run.output; with --data, "
                                           "runs/<the data folder's name>)")
    p.add_argument("--seed", type=int)
    p.add_argument("--device", help="auto, cpu, cuda, cuda:1 ...")
    p.add_argument("--amp", choices=["none", "bf16", "fp16"])
    p.add_argument("--workers", type=int, help="data-loader worker processes")
    p.add_argument("--threads", type=int, help="torch intra-op CPU threads (0: torch's default)")
    p.add_argument("--accum-steps", type=int, help="gradient accumulation steps")
    p.add_argument("--clip-grad", type=float, help="clip the gradient norm to this value")
    p.add_argument("--ckpt-every-steps", type=int, help="also checkpoint every N optimizer steps")
    p.add_argument("--ckpt-every-minutes", type=float,
                   help="also checkpoint when this many minutes have passed since the last state (default 10; 0: off)")
    p.add_argument("--deterministic", action="store_true", help="deterministic algorithms (exact resume)")
    p.add_argument("--channels-last", action="store_true")
    p.add_argument("--compile", action="store_true", help="torch.compile the model")
    p.add_argument("--tensorboard", action="store_true", help="also log to <output>/tensorboard")
    p.add_argument("--no-progress", action="store_true", help="no progress bars (logs still print per epoch)")
    tune = p.add_argument_group("fine-tuning")
    tune.add_argument("--pretrained", metavar="SOURCE",
                      help="start from these weights: a release checkpoint, a project checkpoint (model.pt, "
                           ".safetensors, a training state), a safetensors/state-dict file, a timm hub folder "
                           "(local-dir:PATH) or hf-hub:NAME; the classifier is re-initialised when the classes differ")
    tune.add_argument("--head-init-scale", type=float,
                      help="factor on the re-initialised classifier's initial weights (default 1)")
    tune.add_argument("--layer-decay", type=float,
                      help="layer-wise lr decay: each earlier layer group trains at this factor times the next one's "
                           "lr (e.g. 0.75)")
    tune.add_argument("--freeze-backbone", action="store_true",
                      help="linear probe: train only the classifier on the frozen (eval-mode) backbone")
    p.add_argument("--set", nargs="+", default=[], metavar="KEY=VALUE",
                   help="any config value, e.g. optim.weight_decay=0.1 model.kwargs.depths=[1,1,3,1]")
    p.add_argument("--resume", nargs="?", const="", default=None, metavar="auto|RUN_OR_STATE",
                   help="continue a run from its newest good checkpoint (default folder: --output or the config's). "
                        "'auto': continue the run folder's run if it has a state, else start it (the same command "
                        "for the first start and every restart, e.g. under torchrun --max-restarts)")
    p.add_argument("--print-config", action="store_true", help="print the resolved config as YAML and exit")
    p.set_defaults(func=run_train)


def data_preset(args: argparse.Namespace) -> str:
    """The preset the data calls for: ``imagenette`` for an ImageFolder given with ``--data``, else ``default``
    (the digits)."""
    return "imagenette" if args.data and not args.dataset else "default"


def default_preset(args: argparse.Namespace) -> str:
    """The preset when no ``--config`` is given: with ``--pretrained`` ``finetune`` (the measured fine-tuning
    recipe, applied over :func:`data_preset`), else :func:`data_preset`."""
    return "finetune" if args.pretrained else data_preset(args)


def _guess_dataset(root: str) -> str:
    path = Path(root)
    if path.suffix == ".npz":
        return "packed"
    if (path / "cifar-10-batches-py").is_dir():
        return "cifar10"
    if (path / "cifar-100-python").is_dir():
        return "cifar100"
    return "imagefolder"


def _overrides(args: argparse.Namespace) -> list[str]:
    flags = {
        "data.root": args.data, "model.name": args.model, "run.epochs": args.epochs,
        "run.batch_size": args.batch_size, "optim.lr": args.lr, "data.img_size": args.img_size,
        "run.output": args.output, "run.seed": args.seed, "run.device": args.device, "run.amp": args.amp,
        "data.workers": args.workers, "run.threads": args.threads, "optim.accum_steps": args.accum_steps,
        "optim.clip_grad": args.clip_grad, "run.ckpt_every_steps": args.ckpt_every_steps,
        "run.ckpt_every_minutes": args.ckpt_every_minutes,
        "model.pretrained": args.pretrained, "model.head_init_scale": args.head_init_scale,
        "optim.layer_decay": args.layer_decay,
    }
    out = [f"{k}={json.dumps(v)}" for k, v in flags.items() if v is not None]
    if args.data or args.dataset:
        out.append(f"data.dataset={args.dataset or _guess_dataset(args.data)}")
    for flag, key in (("deterministic", "run.deterministic"), ("channels_last", "run.channels_last"),
                      ("compile", "run.compile"), ("tensorboard", "run.tensorboard"),
                      ("freeze_backbone", "model.freeze_backbone")):
        if getattr(args, flag):
            out.append(f"{key}=true")
    if args.no_progress:
        out.append("run.progress=false")
    return out + list(args.set)


def run_train(args: argparse.Namespace) -> int:
    import yaml

    from ..errors import CheckpointError
    from ..train import ConfigError, load_config
    from ..train.config import RESUMABLE_KEYS
    from ..train.data import DataError
    from ..train.engine import AUTO, TrainingDiverged, train

    try:
        if args.head_init_scale is not None and not args.pretrained:
            raise ConfigError("--head-init-scale only applies when fine-tuning: add --pretrained SOURCE, or drop it")
        preset = args.config or default_preset(args)
        overrides = _overrides(args)
        # the recipe has no data of its own: it goes over the preset the data calls for
        config = load_config(preset, overrides, base=data_preset(args) if preset == "finetune" else None)
        if args.print_config:
            print(yaml.safe_dump(config.to_dict(), sort_keys=False))
            return 0
        resume = args.resume
        if resume is not None and resume != AUTO:
            resume = resume or config.run.output
            ignored = [key for key in (o.split("=", 1)[0] for o in overrides) if key not in RESUMABLE_KEYS]
            if ignored:
                print(f"note: resuming uses the run's saved config; ignoring {', '.join(ignored)}", file=sys.stderr)
        summary = train(config, resume=resume, overrides=overrides)
    except (ConfigError, DataError, CheckpointError, FileNotFoundError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except TrainingDiverged as error:
        print(f"error: training diverged: {error}", file=sys.stderr)
        return 3
    if int(os.environ.get("RANK", "0")) != 0:  # under torchrun only rank 0 reports
        return 0
    val = summary["val"]
    print(f"done: {summary['model']}: top-1 {val['top1']:.2f}%, top-5 {val['top5']:.2f}%, val loss {val['loss']:.4f} "
          f"({summary['val_images']} val images); {summary['skipped_files']} unreadable files skipped; "
          f"run folder: {config.run.output if resume in (None, AUTO) else resume}")
    return 0


def _add_faithful_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--faithful", action="store_true",
                        help="FcaFormer models: run the unfused computation that mirrors the release instead of "
                             "the fast path (same outputs within 1e-5)")


def _add_eval(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "eval", help="evaluate a checkpoint or timm model: top-1/5, loss, images/s, per-class, confusion",
        description="MODEL is a project checkpoint (fcaformer train's model.pt or .safetensors), an official "
                    "FcaFormer release checkpoint, a timm hub folder (local-dir:PATH), or a timm model name. "
                    "Without --data, a project checkpoint is evaluated on the validation split it was trained with.",
    )
    p.add_argument("model", metavar="MODEL")
    p.add_argument("--data", help="dataset root (ImageFolder with val/, or a CIFAR folder)")
    p.add_argument("--dataset", choices=["digits", "imagefolder", "cifar10", "cifar100"])
    p.add_argument("--weights", help="state_dict file for a timm model name")
    p.add_argument("--use-ema", action="store_true", help="official checkpoints: take model_ema if present")
    p.add_argument("--img-size", type=int,
                   help="evaluate at this size (release weights with the release's preprocessing: resize + centre "
                        "crop 0.875 below 384 px, a bicubic warp from 384 px on)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--workers", type=int, default=0)
    p.add_argument("--val-per-class", type=int, help="evaluate on at most N images per class")
    p.add_argument("--device", default="auto")
    p.add_argument("--amp", choices=["none", "bf16", "fp16"], default="none")
    p.add_argument("--output", "-o", help="folder for eval.json and confusion.png")
    _add_faithful_flag(p)
    p.add_argument("--json", action="store_true", help="print JSON instead of tables")
    p.set_defaults(func=run_eval)


def run_eval(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.table import Table

    from ..errors import CheckpointError
    from ..files import atomic_json_dump, path_label
    from ..train.config import DataConfig, config_from_dict
    from ..train.data import DataError, ImageDataset, eval_loader, eval_transform
    from ..train.datasets import load_image_lists
    from ..train.distributed import resolve_device
    from ..train.evaluate import evaluate
    from ..train.inference import SelectOutputs, class_index_map, load_any_model
    from ..train.metrics import plot_confusion

    try:
        loaded = load_any_model(args.model, args.weights, args.use_ema, fast=not args.faithful)
        if args.data:
            data = DataConfig(dataset=args.dataset or _guess_dataset(args.data), root=args.data)
        elif loaded.train_config is not None:
            data = config_from_dict(loaded.train_config).data
        else:
            raise DataError(f"--data is required to evaluate {args.model} (it carries no dataset)")
        data.val_per_class, data.train_per_class, data.cache = args.val_per_class, None, False
        _, val = load_image_lists(data)
        dc = loaded.data_config_at(args.img_size)
        dataset = ImageDataset(val, eval_transform(dc))
        model = loaded.model
        index_map = class_index_map(loaded, val.class_ids or val.class_names)
        if index_map is not None:
            model = SelectOutputs(model, index_map)
        elif len(val.class_names) != len(loaded.class_names):
            raise DataError(f"the model has {len(loaded.class_names)} classes but the dataset has "
                            f"{len(val.class_names)}; evaluate on the dataset the model was trained for")
        device = resolve_device(args.device)
        model.to(device)
        result = evaluate(model, eval_loader(dataset, args.batch_size, args.workers), len(val.class_names),
                          device, args.amp, progress=not args.json, desc="eval")
    except (CheckpointError, DataError, FileNotFoundError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    source = path_label(loaded.source) if Path(loaded.source).exists() else loaded.source  # no absolute paths
    report = {"model": source, "kind": loaded.kind, "fast_path": loaded.fused, "img_size": dc["img_size"],
              "preprocessing": dc,
              **result.summary(),
              "per_class_acc": dict(zip(val.class_names, result.per_class_acc)),
              "class_names": val.class_names, "confusion": result.confusion,
              "restricted_to_dataset_classes": index_map is not None}
    if args.output:
        out = Path(args.output)
        atomic_json_dump(report, out / "eval.json")
        import numpy as np

        plot_confusion(np.array(result.confusion), val.class_names, out / "confusion.png",
                       title=f"{Path(loaded.source).name}: top-1 {result.top1:.2f}%")
    if args.json:
        print(json.dumps({k: v for k, v in report.items() if k != "confusion"}, indent=2))
        return 0
    console = Console()
    table = Table(title=f"{loaded.source} ({loaded.kind}) on {result.images} images at {dc['img_size']}px")
    for column in ("top-1 (%)", "top-5 (%)", "loss", "images/s"):
        table.add_column(column, justify="right")
    table.add_row(f"{result.top1:.2f}", f"{result.top5:.2f}", f"{result.loss:.4f}", f"{result.images_per_s:.1f}")
    console.print(table)
    per_class = Table(title="per-class accuracy")
    per_class.add_column("class")
    per_class.add_column("top-1 (%)", justify="right")
    for name, acc in report["per_class_acc"].items():
        per_class.add_row(name, f"{acc:.2f}")
    console.print(per_class)
    if index_map is not None:
        console.print("(1000-class ImageNet model: logits restricted to the dataset's classes)")
    return 0


def _add_predict(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "predict", help="top-k labels of images with class names and probabilities",
        description="IMAGE: image files, folders (their images, sub-folders included) or glob patterns. Files "
                    "that cannot be read as images are skipped and named (in --json output with an 'error').")
    p.add_argument("images", nargs="+", metavar="IMAGE")
    p.add_argument("--model", "-m", required=True,
                   help="project checkpoint, official release checkpoint, timm hub folder (local-dir:PATH) or timm "
                        "model name")
    p.add_argument("--weights", help="state_dict file for a timm model name")
    p.add_argument("--topk", "--top-k", "-k", type=int, default=5, metavar="K", help="labels per image (default 5)")
    p.add_argument("--device", default="auto")
    _add_faithful_flag(p)
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.set_defaults(func=run_predict)


def run_predict(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.table import Table

    from ..errors import CheckpointError
    from ..train.predict import predict_images

    try:
        predictions = predict_images(args.model, args.images, topk=args.topk, device=args.device,
                                     weights=args.weights, fast=not args.faithful)
    except (CheckpointError, FileNotFoundError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    skipped = [item for item in predictions if "error" in item]
    for item in skipped:
        print(f"warning: skipped {item['image']}: {item['error']}", file=sys.stderr)
    if args.json:
        print(json.dumps(predictions, indent=2))
        return 0
    table = Table(title=f"top-{args.topk} predictions of {args.model}"
                        + (f" ({len(skipped)} unreadable files skipped)" if skipped else ""))
    for column in ("image", "rank", "label", "probability"):
        table.add_column(column, justify="right" if column in ("rank", "probability") else "left")
    for item in predictions:
        for rank, top in enumerate(item.get("top", []), 1):
            table.add_row(item["image"] if rank == 1 else "", str(rank), top["label"], f"{top['prob']:.4f}")
    Console().print(table)
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add ``train``, ``eval`` and ``predict``."""
    _add_train(subparsers)
    _add_eval(subparsers)
    _add_predict(subparsers)
