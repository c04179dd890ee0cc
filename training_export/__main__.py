"""python -m training_export {train, ensure-default, ensure-served, bench-models, import-onnx,
export-torch, evaluate, quantize, compare, models}

Each command has its own --help; docs/your-model.md walks from a PyTorch module to a served INT8
model."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from .cli import build_parser, preprocessing_flags


def _say_to(json_output: bool):  # noqa: ANN202
    """With --json, stdout holds the one JSON object; everything else goes to stderr."""
    return (lambda line: print(line, file=sys.stderr)) if json_output else print


def _run(args: argparse.Namespace) -> None:
    from .onnx_import import import_onnx, read_config, read_labels

    if args.command == "train":
        from .pipeline import train_and_save

        extra = {"epochs": args.epochs} if args.epochs else {}
        print(train_and_save(args.version, force=args.force, **extra))
    elif args.command in ("ensure-default", "ensure-served"):
        from .store import served_tag_unless_default

        served = served_tag_unless_default() if args.command == "ensure-served" else None
        if served:
            print(f"serving {served}: the default model is not needed")
            return
        from .pipeline import ensure_default_model

        print(ensure_default_model())
    elif args.command == "bench-models":
        from .benchmark_models import BENCHMARK_MODELS, build_and_save

        for model in BENCHMARK_MODELS:
            build_and_save(model, force=args.force)
    elif args.command == "import-onnx":
        tag = import_onnx(
            args.model,
            name=args.name,
            version=args.version,
            labels=read_labels(args.labels) if args.labels else None,
            config=read_config(args.config) if args.config else None,
            preprocessing=preprocessing_flags(args),
            output_kind=args.output_kind,
            description=args.description,
            preset=args.preset,
            output=args.output,
        )
        print(f"imported {args.model} as {tag}")
    elif args.command == "export-torch":
        from .torch_export import DEFAULT_TOLERANCE, export_torch

        if args.labels is None:
            raise ValueError("--labels FILE is required (one label per line, in output order)")
        tag = export_torch(
            args.module,
            args.factory,
            args.weights,
            args.name,
            args.version,
            labels=read_labels(args.labels),
            preprocessing=preprocessing_flags(args),
            preset=args.preset,
            images=args.images,
            tolerance=DEFAULT_TOLERANCE if args.tolerance is None else args.tolerance,
            output_kind=args.output_kind,
            description=args.description,
        )
        print(f"exported {args.module}:{args.factory} as {tag}")
    elif args.command == "evaluate":
        _evaluate(args)
    elif args.command == "quantize":
        _quantize(args)
    elif args.command == "compare":
        from .compare import compare, comparison_lines

        result = compare(args.tag_a, args.tag_b, args.images, args.skip_unknown)
        print(json.dumps(result) if args.json else "\n".join(comparison_lines(result)))
    else:
        from .model_versions import run as run_models

        run_models(args)


def _evaluate(args: argparse.Namespace) -> None:
    from .evaluation import evaluate, summary_lines

    say = _say_to(args.json)
    report = args.report or Path("reports") / args.tag.replace(":", "-")
    result, folder = evaluate(args.tag, args.images, report, args.save, args.skip_unknown)
    if args.json:
        print(json.dumps(result))
    for line in [] if args.json else summary_lines(result, folder.describe_skipped()):
        say(line)
    if args.json and folder.describe_skipped():
        say(folder.describe_skipped())
    say(f"report: {report}/ (confusion_matrix.png, reliability_diagram.png, evaluation.json)")
    if args.save:
        say(f"saved in {result['saved_to']}: the drift baseline of {args.tag} from its next start")


def _quantize(args: argparse.Namespace) -> None:
    if args.calibration is None:
        if args.images is not None:
            raise ValueError("--images needs --calibration DIR (the pictures to calibrate on)")
        from .quantize import quantize_and_save

        limits = {} if args.max_drop is None else {"max_accuracy_drop": args.max_drop}
        quantize_and_save(args.tag, args.out, force=args.force, **limits)
        return
    from .quantize_folders import quantize_with_folders

    quantize_with_folders(
        args.tag,
        args.calibration,
        args.images,
        args.max_drop,
        args.out,
        args.force,
        args.skip_unknown,
    )


def main(argv: list[str] | None = None) -> int:
    args = build_parser(__doc__).parse_args(argv)
    import onnxruntime as ort
    from pydantic import ValidationError

    from .export import ExportError
    from .model_versions import VersionError
    from .onnx_import import invalid_fields
    from .pipeline import TrainingError

    ort.set_default_logger_severity(4)  # its own log lines would come before our one line
    try:
        _run(args)
    except ValidationError as exc:  # a card or preprocessing field: which one, and why
        print(f"error: {_one_line(invalid_fields(exc))}", file=sys.stderr)
        return 1
    except (TrainingError, ExportError, VersionError, OSError, ValueError) as exc:
        print(f"error: {_one_line(str(exc))}", file=sys.stderr)
        return 1
    except Exception as exc:  # a user's model or files failing somewhere unforeseen: one line
        print(f"error: {type(exc).__name__}: {_one_line(str(exc))}", file=sys.stderr)
        return 1
    return 0


def _one_line(message: str) -> str:
    return " ".join(message.split())[:1000]


if __name__ == "__main__":
    sys.exit(main())
