"""Your PyTorch module -> a verified ONNX file -> a store entry with its card (`export-torch`).

The module comes from your own file and factory (the code of your notebook), its weights from a
state dict. The export gets a dynamic batch axis (the service merges requests into one run);
ONNX Runtime must then give torch's outputs on random tensors and, with --images, on your
pictures through the service's own decode and preprocess, within a tolerance. The file is then
imported like any ONNX file (`onnx_import`): the same checks, the same card. torch is needed
here only, never by the service.
"""

from __future__ import annotations

import importlib.util
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from image_classifier.core.decoding import DecodeLimits, decode_image
from image_classifier.core.errors import ClassifierError
from image_classifier.core.preprocessing import PreprocessSpec, preprocess

from .export import ExportError
from .folders import UNREADABLE, PictureFolder, scan_pictures
from .onnx_facts import InputFacts
from .onnx_import import import_onnx, resolve_spec
from .store import new_tag

RANDOM_TENSORS = 8
DEFAULT_TOLERANCE = 1e-3  # max abs difference of raw outputs: fp32 kernels differ in order of sums


def build_module(module_file: Path, factory: str, weights: Path | None):  # noqa: ANN201
    """Import `module_file`, call `factory()`, load the state dict; eval mode."""
    import torch

    module_file = Path(module_file)
    if not module_file.is_file():
        raise ExportError(f"{module_file} is not a file")
    spec = importlib.util.spec_from_file_location(f"user_model_{module_file.stem}", module_file)
    code = importlib.util.module_from_spec(spec)
    sys.path.insert(0, str(module_file.resolve().parent))  # its own imports of sibling files
    try:
        spec.loader.exec_module(code)
        if not callable(getattr(code, factory, None)):
            raise ExportError(f"{module_file} has no function or class {factory!r}")
        module = getattr(code, factory)()
    except ExportError:
        raise
    except Exception as exc:
        raise ExportError(
            f"building the module with {module_file}:{factory}() failed: "
            f"{type(exc).__name__}: {exc}"
        ) from None
    finally:
        sys.path.remove(str(module_file.resolve().parent))
    if not isinstance(module, torch.nn.Module):
        raise ExportError(f"{factory}() returned {type(module).__name__}, not a torch.nn.Module")
    if weights is not None:
        _load_weights(module, Path(weights))
    return module.eval()


def _load_weights(module, weights: Path) -> None:  # noqa: ANN001 - a torch.nn.Module
    import torch

    try:
        state = torch.load(weights, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise ExportError(f"{weights} is not a loadable state dict: {exc}") from None
    for key in ("state_dict", "model_state_dict"):  # a training checkpoint
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict):
        raise ExportError(f"{weights} holds a {type(state).__name__}, not a state dict")
    if all(k.startswith("module.") for k in state) and not any(
        k.startswith("module.") for k in module.state_dict()
    ):  # saved from DataParallel
        state = {k.removeprefix("module."): v for k, v in state.items()}
    try:
        module.load_state_dict(state)
    except RuntimeError as exc:
        raise ExportError(f"{weights} does not fit the module: {str(exc)[:600]}") from None


def parity(
    onnx_path: Path,
    module,
    inputs: np.ndarray,
    tolerance: float,  # noqa: ANN001
) -> float:
    """Max abs difference between torch and ONNX Runtime on `inputs`, run as one batch."""
    import onnxruntime as ort
    import torch

    try:
        with torch.no_grad():
            expected = module(torch.from_numpy(inputs)).numpy()
    except Exception as exc:
        raise ExportError(
            f"the module itself fails on a batch of {len(inputs)} ({type(exc).__name__}: "
            f"{str(exc)[:200]}): it must take any batch size (flatten(1), not view(1, -1))"
        ) from None
    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    try:
        actual = session.run(None, {session.get_inputs()[0].name: inputs})[0]
    except Exception as exc:
        raise ExportError(
            f"ONNX Runtime cannot run a batch of {len(inputs)} ({str(exc).splitlines()[0]}): "
            "does the module fix the batch size (view(1, -1))? use flatten(1)"
        ) from None
    if actual.shape != expected.shape:
        raise ExportError(f"ONNX Runtime answers shape {actual.shape}, torch {expected.shape}")
    difference = float(np.abs(actual - expected).max())
    if not difference <= tolerance:
        raise ExportError(
            f"ONNX Runtime differs from torch by {difference:.2e} (max abs, at "
            f"most {tolerance:g}): not saved"
        )
    return difference


def picture_tensors(folder: PictureFolder, spec: PreprocessSpec) -> np.ndarray:
    """The folder's pictures as the service would see them (decode as `Classifier.prepare`)."""
    limits = DecodeLimits()
    tensors = []
    for picture in folder.pictures:
        try:
            image = decode_image(picture.path.read_bytes(), limits, None, spec.decode_size_hint)
        except (OSError, ClassifierError) as exc:
            folder.skip(UNREADABLE, f"{picture.path.relative_to(folder.root)}: {exc}")
            continue
        tensors.append(preprocess(image, spec))
    if not tensors:
        raise ExportError(
            f"none of the pictures in {folder.root} could be read; " + folder.describe_skipped()
        )
    return np.stack(tensors)


def export_torch(
    module_file: Path,
    factory: str,
    weights: Path | None,
    name: str,
    version: str | None,
    labels: list[str],
    preprocessing: dict[str, Any],
    preset: str | None = None,
    images: Path | None = None,
    tolerance: float = DEFAULT_TOLERANCE,
    output_kind: str = "auto",
    description: str = "",
    say: Callable[[str], None] = print,
) -> str:
    """Build, export, check parity, import with a card; returns the tag."""
    from .export import export_onnx

    new_tag(name, version)  # a name the store refuses: said before the export, not after it
    module = build_module(module_file, factory, weights)
    spec = resolve_spec(InputFacts(None, None, None, None), preset, None, preprocessing, say)
    rng = np.random.default_rng(0)
    checks = {"random tensors": rng.normal(size=(RANDOM_TENSORS, *spec.tensor_shape))}
    if images is not None:
        folder = scan_pictures(images)
        checks["pictures"] = picture_tensors(folder, spec)
        if skipped := folder.describe_skipped():
            say(f"{images}: {skipped}")
    with tempfile.TemporaryDirectory(prefix="export-torch-") as staging:
        onnx_path = Path(staging) / "model.onnx"
        try:
            export_onnx(module, onnx_path, checks["random tensors"].astype(np.float32))
        except ExportError:
            raise
        except Exception as exc:
            raise ExportError(
                f"torch.onnx.export failed: {type(exc).__name__}: {str(exc)[:600]}"
            ) from None
        differences = {}
        for what, inputs in checks.items():
            differences[what] = parity(onnx_path, module, inputs.astype(np.float32), tolerance)
            say(
                f"parity with torch on {len(inputs)} {what}: max abs difference "
                f"{differences[what]:.2e} (at most {tolerance:g})"
            )
        figures = {
            "max_abs_difference": max(differences.values()),
            "tolerance": tolerance,
            "inputs": {what: len(inputs) for what, inputs in checks.items()},
        }
        return import_onnx(
            onnx_path,
            name,
            version,
            labels=labels,
            preprocessing=spec.model_dump(),
            output_kind=output_kind,
            description=description,
            source="exported",
            extra_metrics={"export_parity": figures},
            say=say,
        )
