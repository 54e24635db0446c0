"""``fcaformer detect train | eval | predict``: Mask / Faster R-CNN + FPN on FcaFormer, COCO-format data."""

from __future__ import annotations

import argparse
import json
import logging
import os
from typing import Any

from ._dense_args import add_common_train_args, json_dict, print_metrics


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("detect", help="object detection / instance segmentation (Mask R-CNN)")
    actions = parser.add_subparsers(dest="action", metavar="ACTION", required=True)

    train = actions.add_parser("train", help="train on a COCO-format dataset")
    train.add_argument("--data-root", required=True, help="folder the annotation file_names are relative to")
    train.add_argument("--ann", required=True, help="COCO instances .json")
    train.add_argument("--arch", default="mask_rcnn", choices=("mask_rcnn", "faster_rcnn"))
    train.add_argument("--backbone-mode", default="windowed", choices=("windowed", "global", "dense"),
                       help="windowed: release's Fca windows (14, 7); global: global attention; dense: windowed "
                            "+ the release's projection heads (loads mmdet checkpoints in full)")
    train.add_argument("--detector-kwargs", type=json_dict, default={},
                       help='JSON of extra builder args, e.g. \'{"fpn_channels": 128, "box_head_dim": 512}\'')
    train.add_argument("--min-size", type=int, nargs="+", default=[800],
                       help="shorter side; several values = multi-scale training (one drawn per batch)")
    train.add_argument("--max-size", type=int, default=1333, help="longer-side cap")
    train.add_argument("--val-root", help="validation image folder (default: --data-root)")
    train.add_argument("--val-ann", help="validation COCO json: box/mask AP after training")
    add_common_train_args(train, batch_size=2)
    train.set_defaults(func=run_train)

    evaluate = actions.add_parser("eval", help="COCO box / mask AP of a trained detector")
    evaluate.add_argument("--checkpoint", required=True, help="model.pt or last.pt of detect train")
    evaluate.add_argument("--data-root", required=True)
    evaluate.add_argument("--ann", required=True, help="COCO instances .json")
    evaluate.add_argument("--batch-size", type=int, default=2)
    evaluate.add_argument("--device", default="cpu")
    evaluate.add_argument("--json-out", help="also write the metrics to this JSON file")
    evaluate.set_defaults(func=run_eval)

    predict = actions.add_parser("predict", help="draw boxes, labels and masks on images")
    predict.add_argument("--checkpoint", required=True)
    predict.add_argument("images", nargs="+", help="image files")
    predict.add_argument("--out", required=True, help="output folder for <stem>.png and predictions.json")
    predict.add_argument("--score-threshold", type=float, default=0.5)
    predict.add_argument("--device", default="cpu")
    predict.set_defaults(func=run_predict)


def run_train(args: argparse.Namespace) -> int:
    from ..detection.engine import DetectTrainConfig, train_detector

    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    config = DetectTrainConfig(
        data_root=args.data_root, ann_file=args.ann, out_dir=args.out, arch=args.arch, variant=args.model,
        backbone_mode=args.backbone_mode, backbone_kwargs=args.backbone_kwargs,
        backbone_weights=args.backbone_weights, detector_kwargs=args.detector_kwargs,
        min_size=tuple(args.min_size), max_size=args.max_size, iterations=args.iterations,
        batch_size=args.batch_size, lr=args.lr, weight_decay=args.weight_decay, layer_decay=args.layer_decay,
        warmup_iters=args.warmup_iters, clip_grad=args.clip_grad, checkpoint_every=args.checkpoint_every,
        resume=args.resume, workers=args.workers, seed=args.seed, device=args.device, val_root=args.val_root,
        val_ann_file=args.val_ann,
    )
    result = train_detector(config)
    if int(os.environ.get("RANK", "0")):  # under torchrun only rank 0 reports
        return 0
    losses = result["losses"]
    if losses:
        print(f"trained {len(losses)} iterations: loss {losses[0]:.4f} -> {losses[-1]:.4f}")
    if result.get("metrics"):
        print_metrics("validation", result["metrics"])
    print(f"checkpoint: {result['checkpoint']}")
    return 0


def run_eval(args: argparse.Namespace) -> int:
    from ..detection.data import CocoDetection
    from ..detection.engine import evaluate_detector, load_detector
    from ..io import atomic_json_dump

    model, raw = load_detector(args.checkpoint, args.device)
    dataset = CocoDetection(args.data_root, args.ann, masks=raw["builder"]["arch"] == "mask_rcnn")
    metrics: dict[str, Any] = evaluate_detector(model, dataset, args.batch_size)
    print_metrics(f"COCO AP on {len(dataset)} images", metrics)
    if args.json_out:
        atomic_json_dump(metrics, args.json_out)
    return 0


def run_predict(args: argparse.Namespace) -> int:
    from ..detection.engine import load_detector, predict_files

    model, raw = load_detector(args.checkpoint, args.device)
    written = predict_files(model, args.images, args.out, raw["class_names"], raw.get("label_to_cat"),
                            args.score_threshold)
    print(json.dumps([str(p) for p in written]))
    return 0
