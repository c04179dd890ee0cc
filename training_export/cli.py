"""The command line of `python -m training_export`: every subcommand, its flags and --help."""

from __future__ import annotations

import argparse
from pathlib import Path

from .recipe import MODEL_VERSION


def _add_model_description_flags(parser: argparse.ArgumentParser) -> None:
    """import-onnx's and export-torch's: labels, preprocessing, output kind."""
    parser.add_argument("--name", required=True, help="model name in the store")
    parser.add_argument("--version", default=None, help="store version (default: a generated id)")
    parser.add_argument(
        "--labels", type=Path, help="text file, one label per line, in output order"
    )
    parser.add_argument(
        "--preset",
        choices=["imagenet"],
        help="imagenet: RGB 224x224, shorter side to 256 then centre crop, "
        "ImageNet mean/std; flags below override it",
    )
    parser.add_argument(
        "--input-size",
        type=int,
        nargs=2,
        metavar=("HEIGHT", "WIDTH"),
        help="model input size (read from the file when it is static)",
    )
    parser.add_argument(
        "--color-mode",
        choices=["L", "RGB"],
        help="L: one grey channel, RGB: three (read from the file when static)",
    )
    parser.add_argument("--resize-mode", choices=["stretch", "center_crop", "letterbox"])
    parser.add_argument(
        "--resize-filter", choices=["nearest", "bilinear", "bicubic", "lanczos", "box"]
    )
    parser.add_argument("--scale", type=float, help="pixel multiplier before mean/std (1/255)")
    parser.add_argument("--mean", type=float, nargs="+", help="per-channel mean (after scale)")
    parser.add_argument("--std", type=float, nargs="+", help="per-channel std (after scale)")
    parser.add_argument("--layout", choices=["NCHW", "NHWC"], help="read from the file if clear")
    parser.add_argument(
        "--content-crop",
        action="store_true",
        default=None,
        help="crop to the ink (documents, digits)",
    )
    parser.add_argument(
        "--output-kind",
        choices=["auto", "logits", "probabilities"],
        default="auto",
        help="auto: probabilities when rows are in [0, 1] and "
        "sum to 1 on sample inputs, else logits; a kind the rows contradict is refused",
    )
    parser.add_argument("--description", default="")


def build_parser(description: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m training_export", description=description)
    commands = parser.add_subparsers(dest="command", required=True)

    train = commands.add_parser(
        "train",
        help="train, export, verify and save the default model",
        description="Train the default digits CNN, export it to ONNX, "
        "verify it against torch and save it with its card.",
    )
    train.add_argument(
        "--version", default=MODEL_VERSION, help="store version (default: %(default)s)"
    )
    train.add_argument("--force", action="store_true", help="replace an existing version")
    train.add_argument("--epochs", type=int, default=None, help="training epochs")

    commands.add_parser(
        "ensure-default",
        help="train the default model only if the store lacks it",
        description="Train the default model only if the store lacks it.",
    )
    commands.add_parser(
        "ensure-served",
        help="ensure-default, when the served model (MODEL_TAG or served_model.json) is it",
        description="What make serve and make build run first: train the default model when it "
        "is the one served and the store lacks it; nothing when another model is served.",
    )

    bench = commands.add_parser(
        "bench-models",
        help="build the benchmark-only models if missing",
        description="Build the MobileNetV2/ResNet-50-class models with "
        "random weights (for timing only).",
    )
    bench.add_argument("--force", action="store_true", help="rebuild them")

    imp = commands.add_parser(
        "import-onnx",
        help="save your own ONNX classifier with its card",
        description="Check an ONNX image classifier (one input, one class "
        "vector output) and save it with its card. Static input size, "
        "layout and channels are read from the file; a fixed batch axis is "
        "made dynamic when the graph allows it.",
    )
    imp.add_argument("model", type=Path, help="the .onnx file (one self-contained file)")
    imp.add_argument("--config", type=Path, help="JSON with labels/preprocessing/output_kind")
    imp.add_argument(
        "--output",
        default=None,
        help="the output holding the class scores, for a file with several (the rest dropped)",
    )
    _add_model_description_flags(imp)

    exp = commands.add_parser(
        "export-torch",
        help="export your PyTorch module, verified, saved",
        description="Build your module (FILE.py, factory NAME, optional "
        "state dict), export ONNX with a dynamic batch axis, check it "
        "(onnx.checker; torch vs ONNX Runtime on random tensors and on "
        "--images), then save it like import-onnx.",
    )
    exp.add_argument("--module", type=Path, required=True, help="the Python file defining it")
    exp.add_argument("--factory", required=True, help="function or class in it: NAME() -> module")
    exp.add_argument("--weights", type=Path, help="a state dict saved with torch.save")
    exp.add_argument("--images", type=Path, help="pictures to check parity on (any folder)")
    exp.add_argument(
        "--tolerance",
        type=float,
        default=None,
        help="largest max-abs difference of outputs accepted (default 1e-3)",
    )
    _add_model_description_flags(exp)

    ev = commands.add_parser(
        "evaluate",
        help="figures of a stored model on a labelled folder",
        description="Accuracy, per-class precision/recall/F1, confusion "
        "matrix, expected calibration error and mean top-1 confidence on a "
        "labelled folder (one subfolder per label), through the service's own "
        "decode and preprocess; writes a report folder with PNGs.",
    )
    ev.add_argument("tag", help="the stored model, as name:version")
    _add_folder_flags(ev, required=True)
    ev.add_argument("--json", action="store_true", help="print the figures as one JSON object")
    ev.add_argument(
        "--save",
        action="store_true",
        help="record them (model_evaluations.json beside served_model.json): the "
        "served model's drift baseline, and what `models promote` compares",
    )
    ev.add_argument(
        "--report", type=Path, default=None, help="report folder (default: reports/NAME-VERSION)"
    )

    quant = commands.add_parser(
        "quantize",
        help="static INT8 of a stored model, gated, saved",
        description="Static INT8 (ONNX Runtime QDQ) of a stored model. "
        "With --calibration: calibrated on your pictures, gated on "
        "--images (accuracy drop <= --max-drop) or else on top-1 agreement "
        ">= 99% with fp32 on every 4th calibration picture, held back. "
        "Without: the built-in models' own data and gates.",
    )
    quant.add_argument("tag", help="the fp32 model, as name:version")
    quant.add_argument("--calibration", type=Path, help="any folder of your pictures")
    _add_folder_flags(quant, required=False)
    quant.add_argument(
        "--max-drop",
        type=_fraction,
        default=None,
        help="largest accuracy drop accepted on --images (default 0.01)",
    )
    quant.add_argument("--out", default=None, help="default: name-int8:version")
    quant.add_argument("--force", action="store_true", help="replace an existing INT8 entry")

    comp = commands.add_parser(
        "compare",
        help="two stored versions side by side",
        description="Two versions on the same labelled folder: accuracy, "
        "calibration, per-class changes, top-1 agreement and in-process "
        "latency per picture.",
    )
    comp.add_argument("tag_a", help="name:version (usually the served one)")
    comp.add_argument("tag_b", help="name:version (the candidate)")
    _add_folder_flags(comp, required=True)
    comp.add_argument("--json", action="store_true", help="print the comparison as JSON")

    _add_models_parser(commands)
    return parser


def _fraction(text: str) -> float:
    """A share between 0 and 1 (an accuracy drop of 0.01 is one point)."""
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not 0 <= value <= 1:
        raise argparse.ArgumentTypeError(f"a share between 0 and 1, got {text!r}")
    return value


def _add_folder_flags(parser: argparse.ArgumentParser, required: bool) -> None:
    parser.add_argument(
        "--images",
        type=Path,
        required=required,
        help="labelled folder: one subfolder per label, named as the label",
    )
    parser.add_argument(
        "--skip-unknown",
        action="store_true",
        help="leave out (and count) subfolders that are not labels of the model",
    )


def _add_models_parser(commands) -> None:  # noqa: ANN001 - argparse's subparsers action
    models = commands.add_parser(
        "models",
        help="list model versions; promote, roll back, canary",
        description="The versions in the store and which is served (served_model.json).",
    )
    versions = models.add_subparsers(dest="models_command", required=True)
    listing = versions.add_parser("list", help="every classifier version in the store")
    listing.add_argument("name", nargs="?", help="only this model name")
    versions.add_parser("show", help="one version's card and saved evaluations").add_argument("tag")
    promote = versions.add_parser(
        "promote",
        help="serve this version (after a load check)",
        description="Serve this version from the next start. Refused "
        "when its last saved evaluation is worse than the served "
        "version's on the same pictures.",
    )
    promote.add_argument("tag")
    promote.add_argument("--force", action="store_true", help="promote even if it is worse")
    versions.add_parser("rollback", help="serve the version served before the current one")
    candidate = versions.add_parser("candidate", help="serve a version beside it (canary)")
    which = candidate.add_mutually_exclusive_group(required=True)
    which.add_argument("tag", nargs="?")
    which.add_argument("--clear", action="store_true", help="no candidate")


def preprocessing_flags(args: argparse.Namespace) -> dict:
    names = (
        "input_size",
        "color_mode",
        "resize_mode",
        "resize_filter",
        "scale",
        "mean",
        "std",
        "layout",
        "content_crop",
    )
    return {name: getattr(args, name) for name in names if getattr(args, name) is not None}
