"""``fcaformer detect train | eval | predict``: Mask / Faster R-CNN + FPN on FcaFormer, COCO-format data."""

from __future__ import annotations

import argparse

from ._dense_args import (
    add_action,
    add_command,
    add_common_train_args,
    add_min_usable,
    common_train_config,
    eval_summary,
    guarded,
    json_dict,
    print_per_class,
    report_metrics,
    report_training,
    report_written,
    train_description,
)


def register(subparsers: argparse._SubParsersAction) -> None:
    actions = add_command(subparsers, "detect", "object detection / instance segmentation (Mask R-CNN)",
                          "Mask R-CNN / Faster R-CNN with an FPN on FcaFormer, COCO-format data. Guide: "
                          "docs/detection.md.")

    train = add_action(actions, "train", "train on a COCO-format dataset",
                       description=train_description("a COCO-format dataset", "images and annotations",
                                                     "--min-size", "docs/detection.md"))
    train.add_argument("--data-root", required=True, help="folder the annotation file_names are relative to")
    train.add_argument("--ann", required=True, help="COCO instances .json")
    train.add_argument("--arch", default="mask_rcnn", choices=("mask_rcnn", "faster_rcnn"),
                       help="mask_rcnn: boxes and instance masks; faster_rcnn: boxes only")
    train.add_argument("--backbone-mode", default="windowed", choices=("windowed", "global", "dense"),
                       help="windowed: release's Fca windows (14, 7); global: global attention; dense: windowed "
                            "+ the release's projection heads (loads mmdet checkpoints in full)")
    train.add_argument("--detector-kwargs", type=json_dict, default={},
                       help='JSON of extra builder args, e.g. \'{"fpn_channels": 128, "box_head_dim": 512}\'')
    train.add_argument("--min-size", type=int, nargs="+", default=[800],
                       help="shorter side in pixels; several values = multi-scale training (one drawn per batch)")
    train.add_argument("--max-size", type=int, default=1333, help="longer-side cap in pixels")
    train.add_argument("--val-root", help="validation image folder (default: --data-root)")
    train.add_argument("--val-ann", help="validation COCO json: box/mask AP after training (and every --eval-every)")
    add_common_train_args(train, batch_size=2)
    train.set_defaults(func=run_train)

    evaluate = add_action(actions, "eval", "COCO box / mask AP of a trained detector, overall and per class")
    evaluate.add_argument("--checkpoint", required=True,
                          help="model.pt of detect train, or one of its training states (checkpoints/state-*.pt)")
    evaluate.add_argument("--data-root", required=True, help="folder the annotation file_names are relative to")
    evaluate.add_argument("--ann", required=True, help="COCO instances .json with the model's categories")
    evaluate.add_argument("--batch-size", type=int, default=2, help="images per forward pass")
    evaluate.add_argument("--device", default="cpu", help="cpu / cuda")
    evaluate.add_argument("--json-out", help="also write the metrics (with per-class AP) to this JSON file")
    add_min_usable(evaluate)
    evaluate.set_defaults(func=run_eval)

    predict = add_action(actions, "predict", "draw boxes, class names and masks on images",
                         description="Draw boxes, class names and masks on images; write predictions.json (boxes, "
                                     "scores, class names, masks as COCO RLE).")
    predict.add_argument("--checkpoint", required=True,
                         help="model.pt of detect train, or one of its training states (checkpoints/state-*.pt)")
    predict.add_argument("images", nargs="+", help="image files or folders (a folder: the images directly in it)")
    predict.add_argument("--out", required=True, help="output folder for the drawings and predictions.json")
    predict.add_argument("--score-threshold", type=float, default=0.5, help="keep detections scoring at least this")
    predict.add_argument("--device", default="cpu", help="cpu / cuda")
    predict.set_defaults(func=run_predict)


@guarded
def run_train(args: argparse.Namespace) -> int:
    from ..detection.engine import DetectTrainConfig, train_detector

    config = DetectTrainConfig(
        data_root=args.data_root, ann_file=args.ann, arch=args.arch, backbone_mode=args.backbone_mode,
        detector_kwargs=args.detector_kwargs, min_size=tuple(args.min_size), max_size=args.max_size,
        val_root=args.val_root, val_ann_file=args.val_ann, **common_train_config(args),
    )
    return report_training(train_detector(config))


@guarded
def run_eval(args: argparse.Namespace) -> int:
    from ..detection.data import CocoDetection
    from ..detection.engine import evaluate_detector, load_detector

    model, raw = load_detector(args.checkpoint, args.device)
    dataset = CocoDetection(args.data_root, args.ann, masks=raw["builder"]["arch"] == "mask_rcnn",
                            min_usable=args.min_usable, progress=True)
    if list(raw["class_names"]) != dataset.class_names:
        raise ValueError(f"{args.checkpoint} detects {len(raw['class_names']) - 1} classes "
                         f"({', '.join(raw['class_names'][1:6])}, ...) but {args.ann} defines "
                         f"{len(dataset.class_names) - 1} ({', '.join(dataset.class_names[1:6])}, ...): evaluate on "
                         "annotations with the categories the model was trained on")
    metrics = evaluate_detector(model, dataset, args.batch_size)
    columns = {f"{kind} AP": metrics[f"{iou}_per_class_AP"] for iou, kind in (("bbox", "box"), ("segm", "mask"))
               if f"{iou}_per_class_AP" in metrics}
    print_per_class("AP per class (IoU 0.50:0.95)", metrics["class_names"], columns)
    return report_metrics(eval_summary("COCO AP", metrics, dataset), metrics, args.json_out)


@guarded
def run_predict(args: argparse.Namespace) -> int:
    from ..detection.engine import load_detector, predict_files

    model, raw = load_detector(args.checkpoint, args.device)
    written = predict_files(model, args.images, args.out, raw["class_names"], raw.get("label_to_cat"),
                            args.score_threshold)
    return report_written(written)
