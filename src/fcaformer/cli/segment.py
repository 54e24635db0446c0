"""``fcaformer segment train | eval | predict``: UperNet on FcaFormer, ADE20K-format data."""

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
    print_per_class,
    report_metrics,
    report_training,
    report_written,
    train_description,
)


def _pair(text: str) -> tuple[int, int]:
    parts = text.lower().replace(",", "x").split("x")
    try:
        values = tuple(int(p) for p in parts)
    except ValueError as error:
        raise argparse.ArgumentTypeError(f"expected HxW or a single size, got {text!r}") from error
    if len(values) == 1:
        return values[0], values[0]
    if len(values) != 2:
        raise argparse.ArgumentTypeError(f"expected HxW or a single size, got {text!r}")
    return values  # type: ignore[return-value]


def _add_inference_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--checkpoint", required=True,
                        help="model.pt of segment train, or one of its training states (checkpoints/state-*.pt)")
    parser.add_argument("--mode", default="whole", choices=("whole", "slide"), help="whole-image or sliding window")
    parser.add_argument("--crop-size", type=_pair, default=(512, 512),
                        help="sliding-window size, HxW (default: 512x512)")
    parser.add_argument("--test-size", type=int, default=None,
                        help="shorter side at test time (default: the training --base-size; 0 = native)")
    parser.add_argument("--class-names",
                        help="text file, one class name per line (default: the names stored at training)")
    parser.add_argument("--device", default="cpu", help="cpu / cuda")


def _test_size(args: argparse.Namespace, raw: dict) -> int:
    return int(raw.get("config", {}).get("base_size", 0)) if args.test_size is None else args.test_size


def _class_names(args: argparse.Namespace, raw: dict) -> list[str]:
    from ..segmentation.engine import class_names_of, read_class_names

    num_classes = raw["builder"]["num_classes"]
    return read_class_names(args.class_names, num_classes) if args.class_names else class_names_of(raw)


def register(subparsers: argparse._SubParsersAction) -> None:
    actions = add_command(subparsers, "segment", "semantic segmentation (UperNet)",
                          "UperNet on FcaFormer, ADE20K-format data (an image folder and a folder of PNG label "
                          "maps). Guide: docs/segmentation.md.")

    train = add_action(actions, "train", "train on an image folder + PNG label folder (ADE20K layout)",
                       description=train_description("<img-dir>/<stem>.jpg|png with <ann-dir>/<stem>.png label maps",
                                                     "images and label maps", "--crop-size", "docs/segmentation.md"))
    train.add_argument("--img-dir", required=True, help="folder of training images")
    train.add_argument("--ann-dir", required=True, help="PNG label maps with the images' stems (255 = ignore)")
    train.add_argument("--num-classes", type=int, required=True, help="classes (after --reduce-zero-label)")
    train.add_argument("--reduce-zero-label", action="store_true", help="ADE20K: label 0 ignored, others - 1")
    train.add_argument("--backbone-mode", default="windowed", choices=("windowed", "global"),
                       help="windowed: the release's Fca windows (14, 7); global: global attention")
    train.add_argument("--decoder-channels", type=int, default=512, help="UperNet width")
    train.add_argument("--decoder-norm", default="batchnorm", choices=("batchnorm", "identity"),
                       help="UperNet norm; identity for tiny per-process batches")
    train.add_argument("--crop-size", type=_pair, default=(512, 512),
                       help="train crop HxW, multiples of 32 (default: 512x512)")
    train.add_argument("--base-size", type=int, default=512, help="shorter side before random scaling")
    train.add_argument("--scale-range", type=float, nargs=2, default=(0.5, 2.0), metavar=("LOW", "HIGH"),
                       help="multi-scale training factors")
    train.add_argument("--single-scale", action="store_true", help="no random scaling")
    train.add_argument("--class-names",
                       help="text file, one class name per line, exactly --num-classes lines (stored in the "
                            "checkpoint; eval and predict show them)")
    train.add_argument("--val-img-dir", help="validation images: mIoU after training (and every --eval-every)")
    train.add_argument("--val-ann-dir", help="validation label maps")
    train.add_argument("--val-mode", default="whole", choices=("whole", "slide"), help="validation inference")
    add_common_train_args(train, batch_size=8)
    train.set_defaults(func=run_train)

    evaluate = add_action(actions, "eval", "mIoU, pixel accuracy and per-class IoU of a trained segmentor")
    evaluate.add_argument("--img-dir", required=True, help="folder of images")
    evaluate.add_argument("--ann-dir", required=True, help="PNG label maps with the images' stems")
    evaluate.add_argument("--json-out", help="also write the metrics (with per-class IoU) to this JSON file")
    _add_inference_args(evaluate)
    add_min_usable(evaluate)
    evaluate.set_defaults(func=run_eval)

    predict = add_action(actions, "predict", "write colour masks blended over the images, with a legend",
                         description="Write <name>.png (class colours over the image), <name>_labels.png (class "
                                     "indices), legend.png (colour and name of each predicted class) and "
                                     "predictions.json.")
    predict.add_argument("images", nargs="+", help="image files or folders (a folder: the images directly in it)")
    predict.add_argument("--out", required=True, help="output folder")
    predict.add_argument("--alpha", type=float, default=0.5, help="mask opacity")
    _add_inference_args(predict)
    predict.set_defaults(func=run_predict)


@guarded
def run_train(args: argparse.Namespace) -> int:
    from ..segmentation.engine import SegmentTrainConfig, read_class_names, train_segmentor

    class_names = read_class_names(args.class_names, args.num_classes) if args.class_names else None
    config = SegmentTrainConfig(
        img_dir=args.img_dir, ann_dir=args.ann_dir, num_classes=args.num_classes, backbone_mode=args.backbone_mode,
        decoder_channels=args.decoder_channels, decoder_norm=args.decoder_norm,
        reduce_zero_label=args.reduce_zero_label, crop_size=tuple(args.crop_size), base_size=args.base_size,
        scale_range=None if args.single_scale else tuple(args.scale_range), class_names=class_names,
        val_img_dir=args.val_img_dir, val_ann_dir=args.val_ann_dir, val_mode=args.val_mode,
        **common_train_config(args),
    )
    return report_training(train_segmentor(config))


@guarded
def run_eval(args: argparse.Namespace) -> int:
    from ..segmentation.data import SegmentationFolder
    from ..segmentation.engine import evaluate_segmentor, load_segmentor

    model, raw = load_segmentor(args.checkpoint, args.device)
    names = _class_names(args, raw)
    dataset = SegmentationFolder(args.img_dir, args.ann_dir, raw["builder"]["num_classes"],
                                 reduce_zero_label=bool(raw.get("reduce_zero_label")), min_usable=args.min_usable,
                                 progress=True)
    metrics = evaluate_segmentor(model, dataset, args.mode, args.crop_size, test_size=_test_size(args, raw))
    metrics["class_names"] = names
    print_per_class("IoU per class", names,
                    {"IoU": metrics["per_class_iou"]})
    return report_metrics(eval_summary(f"segmentation ({args.mode})", metrics, dataset), metrics, args.json_out)


@guarded
def run_predict(args: argparse.Namespace) -> int:
    from ..segmentation.engine import load_segmentor, predict_files

    model, raw = load_segmentor(args.checkpoint, args.device)
    written = predict_files(model, args.images, args.out, raw["builder"]["num_classes"], args.mode,
                            args.crop_size, args.alpha, test_size=_test_size(args, raw),
                            class_names=_class_names(args, raw))
    return report_written(written)
