"""python -m training_export {train, ensure-default, bench-models, quantize, import-onnx, models}

Each command has its own --help."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from .recipe import MODEL_VERSION


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m training_export", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)

    train = commands.add_parser("train", help="train, export, verify and save the default model")
    train.add_argument(
        "--version", default=MODEL_VERSION, help="store version (default: %(default)s)"
    )
    train.add_argument("--force", action="store_true", help="replace an existing version")
    train.add_argument("--epochs", type=int, default=None)

    commands.add_parser("ensure-default", help="train the default model only if the store lacks it")

    bench = commands.add_parser("bench-models", help="build the benchmark-only models if missing")
    bench.add_argument("--force", action="store_true", help="rebuild them")

    quant = commands.add_parser("quantize", help="static INT8 of a stored model, gated, saved")
    quant.add_argument("tag", help="the fp32 model, as name:version")
    quant.add_argument("--out", default=None, help="default: name-int8:version")
    quant.add_argument("--force", action="store_true", help="replace an existing INT8 entry")

    imp = commands.add_parser("import-onnx", help="save your own ONNX classifier with its card")
    imp.add_argument("model", type=Path, help="the .onnx file (one self-contained file)")
    imp.add_argument("--name", required=True)
    imp.add_argument("--version", default=None, help="default: a generated id")
    imp.add_argument("--labels", type=Path, help="text file, one label per line, in output order")
    imp.add_argument("--config", type=Path, help="JSON with labels/preprocessing/output_kind")
    imp.add_argument("--input-size", type=int, nargs=2, metavar=("HEIGHT", "WIDTH"))
    imp.add_argument("--color-mode", choices=["L", "RGB"])
    imp.add_argument("--resize-mode", choices=["stretch", "center_crop", "letterbox"])
    imp.add_argument(
        "--resize-filter", choices=["nearest", "bilinear", "bicubic", "lanczos", "box"]
    )
    imp.add_argument("--scale", type=float)
    imp.add_argument("--mean", type=float, nargs="+")
    imp.add_argument("--std", type=float, nargs="+")
    imp.add_argument("--layout", choices=["NCHW", "NHWC"])
    imp.add_argument("--content-crop", action="store_true", default=None)
    imp.add_argument("--output-kind", choices=["auto", "logits", "probabilities"], default="auto")
    imp.add_argument("--description", default="")

    models = commands.add_parser("models", help="list model versions; promote, roll back, canary")
    versions = models.add_subparsers(dest="models_command", required=True)
    listing = versions.add_parser("list", help="every classifier version in the store")
    listing.add_argument("name", nargs="?", help="only this model name")
    versions.add_parser("show", help="one version's card").add_argument("tag")
    versions.add_parser("promote", help="serve this version (after a load check)").add_argument(
        "tag"
    )
    versions.add_parser("rollback", help="serve the version served before the current one")
    candidate = versions.add_parser("candidate", help="serve a version beside it (canary)")
    which = candidate.add_mutually_exclusive_group(required=True)
    which.add_argument("tag", nargs="?")
    which.add_argument("--clear", action="store_true", help="no candidate")
    return parser


def _preprocessing_flags(args: argparse.Namespace) -> dict:
    names = ("input_size", "color_mode", "resize_mode", "resize_filter", "scale", "mean", "std",
             "layout", "content_crop")  # fmt: skip
    return {name: getattr(args, name) for name in names if getattr(args, name) is not None}


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    # Imported here: `--help` stays fast, and torch is loaded only by the commands that train.
    from .export import ExportError
    from .model_versions import VersionError
    from .model_versions import run as run_models
    from .onnx_import import ModelImportError, import_onnx, read_config, read_labels
    from .pipeline import TrainingError, ensure_default_model, train_and_save

    try:
        if args.command == "train":
            extra = {"epochs": args.epochs} if args.epochs else {}
            print(train_and_save(args.version, force=args.force, **extra))
        elif args.command == "ensure-default":
            print(ensure_default_model())
        elif args.command == "bench-models":
            from .benchmark_models import BENCHMARK_MODELS, build_and_save

            for model in BENCHMARK_MODELS:
                build_and_save(model, force=args.force)
        elif args.command == "quantize":
            from .quantize import quantize_and_save

            quantize_and_save(args.tag, args.out, force=args.force)
        elif args.command == "models":
            run_models(args)
        else:
            tag = import_onnx(
                args.model,
                name=args.name,
                version=args.version,
                labels=read_labels(args.labels) if args.labels else None,
                config=read_config(args.config) if args.config else None,
                preprocessing=_preprocessing_flags(args),
                output_kind=args.output_kind,
                description=args.description,
            )
            print(f"imported {args.model} as {tag}")
    except (TrainingError, ExportError, ModelImportError, VersionError, OSError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
