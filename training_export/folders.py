"""Folders of pictures a user brings: labelled (one subfolder per label, the usual layout) or not
(calibration). Pictures are found by extension, at any depth below a label folder; everything
left out is counted and named, never dropped silently.
"""

from __future__ import annotations

import difflib
import unicodedata
import urllib.parse
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image

from image_classifier.core.decoding import DecodeLimits

NOT_PICTURES = "not pictures (by extension)"
OUTSIDE_LABELS = "files outside any label folder"
EMPTY_LABELS = "label folders without pictures"
UNKNOWN_LABELS = "pictures in folders that are not labels of the model"
UNREADABLE = "unreadable pictures"
HIDDEN = "hidden entries"


class ImageFolderError(ValueError):
    """The folder cannot be used as asked (nothing in it, or not laid out as a labelled set)."""


@dataclass(frozen=True)
class Picture:
    path: Path
    label: int | None  # index into the model's labels; None for unlabelled pictures


@dataclass
class PictureFolder:
    root: Path
    pictures: list[Picture]
    skipped: dict[str, list[str]] = field(default_factory=lambda: defaultdict(list))

    def skip(self, reason: str, what: str) -> None:
        self.skipped[reason].append(what)

    def skipped_counts(self) -> dict[str, int]:
        return {reason: len(items) for reason, items in self.skipped.items() if items}

    def describe_skipped(self) -> str:
        """`skipped: 3 unreadable pictures (a.jpg, b.png, ...); ...` or ``."""
        parts = [
            f"{len(items)} {reason} ({_examples(items)})"
            for reason, items in self.skipped.items()
            if items
        ]
        return "skipped: " + "; ".join(parts) if parts else ""


def picture_extensions(formats: tuple[str, ...] = DecodeLimits.allowed_formats) -> set[str]:
    """Extensions Pillow (with pillow-heif) reads as one of the allowed formats."""
    import image_classifier.core.decoding  # noqa: F401 - registers the HEIF opener

    allowed = {fmt.upper() for fmt in formats} | ({"MPO"} if "JPEG" in formats else set())
    return {ext for ext, fmt in Image.registered_extensions().items() if fmt in allowed}


def _files_below(folder: Path, found: PictureFolder) -> list[Path]:
    """The files below `folder`, but those in or under a hidden entry (`.ipynb_checkpoints`
    copies, `.DS_Store`), which are noted as skipped."""
    files = []
    for path in sorted(folder.rglob("*")):
        if not path.is_file():
            continue
        if any(part.startswith(".") for part in path.relative_to(folder).parts):
            found.skip(HIDDEN, _relative(path, found.root))
        else:
            files.append(path)
    return files


def _relative(path: Path, root: Path) -> str:
    return str(path.relative_to(root))


def scan_pictures(folder: Path) -> PictureFolder:
    """Every picture below `folder`, at any depth (calibration: labels do not matter)."""
    root = _existing_folder(folder)
    found = PictureFolder(root, [])
    extensions = picture_extensions()
    for path in _files_below(root, found):
        if path.suffix.lower() in extensions:
            found.pictures.append(Picture(path, None))
        else:
            found.skip(NOT_PICTURES, _relative(path, root))
    _require_some(found)
    return found


def scan_labelled(folder: Path, labels: list[str], skip_unknown: bool = False) -> PictureFolder:
    """Pictures below `folder/<label>/`, labelled by their top subfolder's name (exactly, once
    both are composed: `_composed`)."""
    root = _existing_folder(folder)
    found = PictureFolder(root, [])
    index = {_composed(label): i for i, label in enumerate(labels)}
    extensions = picture_extensions()
    unknown: dict[str, int] = {}
    for entry in sorted(root.iterdir()):
        if entry.name.startswith(".") and not (
            entry.is_dir() and _label_index(entry.name, index) is not None
        ):  # .DS_Store, .ipynb_checkpoints; a label may begin with a dot (".net")
            found.skip(HIDDEN, entry.name)
            continue
        if entry.is_file():
            found.skip(OUTSIDE_LABELS, entry.name)
            continue
        files = _files_below(entry, found)
        pictures = [p for p in files if p.suffix.lower() in extensions]
        for path in files:
            if path.suffix.lower() not in extensions:
                found.skip(NOT_PICTURES, _relative(path, root))
        label = _label_index(entry.name, index)
        if label is None:
            if pictures:
                unknown[entry.name] = len(pictures)
            continue
        if not pictures:
            found.skip(EMPTY_LABELS, entry.name)
        found.pictures += [Picture(path, label) for path in pictures]
    if unknown and not skip_unknown:
        raise ImageFolderError(_unknown_message(root, unknown, labels))
    for name, count in unknown.items():
        found.skipped[UNKNOWN_LABELS] += [f"{name}/"] * count
    _require_some(found, labelled=True)
    return found


def _label_index(folder_name: str, index: dict[str, int]) -> int | None:
    """The label a folder is named for: exactly, or percent-encoded (`T-shirt%2Ftop` for
    Fashion-MNIST's `T-shirt/top`: no folder name can hold a `/`)."""
    found = index.get(_composed(folder_name))
    if found is None and "%" in folder_name:
        found = index.get(_composed(urllib.parse.unquote(folder_name)))
    return found


def _composed(name: str) -> str:
    """A name in one Unicode spelling (NFC): macOS writes file names decomposed ('u' and a
    combining diaeresis), labels files hold 'ü' as one character; both read 'grün'."""
    return unicodedata.normalize("NFC", name)


def _existing_folder(folder: Path) -> Path:
    root = Path(folder)
    if not root.is_dir():
        raise ImageFolderError(f"{root} is not a folder")
    return root


def _require_some(found: PictureFolder, labelled: bool = False) -> None:
    if found.pictures:
        return
    layout = " (one subfolder per label, named exactly as the label)" if labelled else ""
    skipped = found.describe_skipped()
    raise ImageFolderError(
        f"no pictures found in {found.root}{layout}" + (f"; {skipped}" if skipped else "")
    )


def _unknown_message(root: Path, unknown: dict[str, int], labels: list[str]) -> str:
    described = []
    for name, count in unknown.items():
        close = difflib.get_close_matches(_composed(name), labels, n=1)
        hint = f", did you mean {_folder_name_for(close[0])!r}?" if close else ""
        described.append(f"{name!r} ({count} pictures{hint})")
    shown = ", ".join(repr(label) for label in labels[:12]) + (", ..." if len(labels) > 12 else "")
    return (
        f"{len(unknown)} subfolders of {root} are not labels of the model: "
        f"{'; '.join(described)}. Its labels: {shown}. Rename or remove them, or pass "
        "--skip-unknown to leave their pictures out (they are counted)."
    )


def _folder_name_for(label: str) -> str:
    """What a folder for `label` is named: the label, its `/` and `%` percent-encoded."""
    return label.replace("%", "%25").replace("/", "%2F")


def _examples(items: list[str], shown: int = 3) -> str:
    distinct = list(dict.fromkeys(items))
    return ", ".join(distinct[:shown]) + (", ..." if len(distinct) > shown else "")
