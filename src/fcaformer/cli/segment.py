"""``fcaformer segment train | eval | predict``: UperNet on FcaFormer, ADE20K-format data."""

from __future__ import annotations

import argparse
import logging

from ._dense_args import add_common_train_args, common_train_config, report_metrics, report_training, report_written


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
    parser.add_argument("--mode", default="whole", choices=("whole", "slide"), help="whole-image or sliding window")
    parser.add_argument("--crop-size", type=_pair, default=(512, 512), help="sliding-window size, HxW")
    parser.add_argument("--test-size", type=int, default=None,
                        help="shorter side at test time (default: the training base size; 0 = native)")
    parser.add_argument("--device", default="cpu")


def _test_size(args: argparse.Namespace, raw: dict) -> int:
    return int(raw.get("config", {}).get("base_size", 0)) if args.test_size is None else args.test_size


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("segment", help="semantic segmentation (UperNet)")
    actions = parser.add_subparsers(dest="action", metavar="ACTION", required=True)

    train = actions.add_parser("train", help="train on an image folder + PNG label folder (ADE20K layout)")
    train.add_argument("--img-dir", required=True)
    train.add_argument("--ann-dir", required=True, help="PNG label maps with the images' stems (255 = ignore)")
    train.add_argument("--num-classes", type=int, required=True, help="classes (after --reduce-zero-label)")
    train.add_argument("--reduce-zero-label", action="store_true", help="ADE20K: label 0 ignored, others - 1")
    train.add_argument("--backbone-mode", default="windowed", choices=("windowed", "global"))
    train.add_argument("--decoder-channels", type=int, default=512)
    train.add_argument("--decoder-norm", default="batchnorm", choices=("batchnorm", "identity"),
                       help="UperNet norm; identity for tiny per-process batches")
    train.add_argument("--crop-size", type=_pair, default=(512, 512), help="train crop HxW (multiples of 32)")
    train.add_argument("--base-size", type=int, default=512, help="shorter side before random scaling")
    train.add_argument("--scale-range", type=float, nargs=2, default=(0.5, 2.0), metavar=("LOW", "HIGH"),
                       help="multi-scale training factors")
    train.add_argument("--single-scale", action="store_true", help="no random scaling")
    train.add_argument("--class-names", help="text file, one class name per line (stored in the checkpoint)")
    train.add_argument("--val-img-dir")
    train.add_argument("--val-ann-dir")
    train.add_argument("--val-mode", default="whole", choices=("whole", "slide"))
    add_common_train_args(train, batch_size=8)
    train.set_defaults(func=run_train)

    evaluate = actions.add_parser("eval", help="mIoU and pixel accuracy of a trained segmentor")
    evaluate.add_argument("--checkpoint", required=True)
    evaluate.add_argument("--img-dir", required=True)
    evaluate.add_argument("--ann-dir", required=True)
    evaluate.add_argument("--json-out", help="also write the metrics to this JSON file")
    _add_inference_args(evaluate)
    evaluate.set_defaults(func=run_eval)

    predict = actions.add_parser("predict", help="write colour masks blended over the images")
    predict.add_argument("--checkpoint", required=True)
    predict.add_argument("images", nargs="+")
    predict.add_argument("--out", required=True)
    predict.add_argument("--alpha", type=float, default=0.5, help="mask opacity")
    _add_inference_args(predict)
    predict.set_defaults(func=run_predict)


def run_train(args: argparse.Namespace) -> int:
    from ..segmentation.engine import SegmentTrainConfig, train_segmentor

    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    class_names = None
    if args.class_names:
        with open(args.class_names) as handle:
            class_names = [line.strip() for line in handle if line.strip()]
    config = SegmentTrainConfig(
        img_dir=args.img_dir, ann_dir=args.ann_dir, num_classes=args.num_classes, backbone_mode=args.backbone_mode,
        decoder_channels=args.decoder_channels, decoder_norm=args.decoder_norm,
        reduce_zero_label=args.reduce_zero_label, crop_size=tuple(args.crop_size), base_size=args.base_size,
        scale_range=None if args.single_scale else tuple(args.scale_range), class_names=class_names,
        val_img_dir=args.val_img_dir, val_ann_dir=args.val_ann_dir, val_mode=args.val_mode,
        **common_train_config(args),
    )
    return report_training(train_segmentor(config))


def run_eval(args: argparse.Namespace) -> int:
    from ..segmentation.data import SegmentationFolder
    from ..segmentation.engine import evaluate_segmentor, load_segmentor

    model, raw = load_segmentor(args.checkpoint, args.device)
    dataset = SegmentationFolder(args.img_dir, args.ann_dir, raw["builder"]["num_classes"],
                                 reduce_zero_label=bool(raw.get("reduce_zero_label")))
    metrics = evaluate_segmentor(model, dataset, args.mode, args.crop_size, test_size=_test_size(args, raw))
    return report_metrics(f"segmentation on {len(dataset)} images ({args.mode})", metrics, args.json_out)


def run_predict(args: argparse.Namespace) -> int:
    from ..segmentation.engine import load_segmentor, predict_files

    model, raw = load_segmentor(args.checkpoint, args.device)
    written = predict_files(model, args.images, args.out, raw["builder"]["num_classes"], args.mode,
                            args.crop_size, args.alpha, test_size=_test_size(args, raw))
    return report_written(written)
