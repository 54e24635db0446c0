"""``fcaformer detect train | eval | predict``: Mask / Faster R-CNN + FPN on FcaFormer, COCO-format data."""

from __future__ import annotations

import argparse
import logging
from typing import Any

from ._dense_args import (
    add_common_train_args,
    common_train_config,
    json_dict,
    report_metrics,
    report_training,
    report_written,
)


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
        data_root=args.data_root, ann_file=args.ann, arch=args.arch, backbone_mode=args.backbone_mode,
        detector_kwargs=args.detector_kwargs, min_size=tuple(args.min_size), max_size=args.max_size,
        val_root=args.val_root, val_ann_file=args.val_ann, **common_train_config(args),
    )
    return report_training(train_detector(config))


def run_eval(args: argparse.Namespace) -> int:
    from ..detection.data import CocoDetection
    from ..detection.engine import evaluate_detector, load_detector

    model, raw = load_detector(args.checkpoint, args.device)
    dataset = CocoDetection(args.data_root, args.ann, masks=raw["builder"]["arch"] == "mask_rcnn")
    metrics: dict[str, Any] = evaluate_detector(model, dataset, args.batch_size)
    return report_metrics(f"COCO AP on {len(dataset)} images", metrics, args.json_out)


def run_predict(args: argparse.Namespace) -> int:
    from ..detection.engine import load_detector, predict_files

    model, raw = load_detector(args.checkpoint, args.device)
    written = predict_files(model, args.images, args.out, raw["class_names"], raw.get("label_to_cat"),
                            args.score_threshold)
    return report_written(written)
