"""The release record (`served_model.json`): which model versions the service answers with.

One small JSON file beside the code says which version is served (`model_tag`), which one runs
beside it as a candidate (`candidate_tag`, optional) and which versions were served before
(`history`, newest last). `python -m training_export models promote|rollback|candidate` write it;
the service reads it at start; `MODEL_TAG` / `CANDIDATE_MODEL_TAG` override it for one process.
The file is included in the bento, so a built image serves what was promoted when it was built.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from pydantic import BaseModel, Field, ValidationError

DEFAULT_MODEL_NAME = "digits-cnn"
# The default model, pinned by version: the training recipe writes exactly this tag, so a bento
# built from a clean checkout always packages the same model. Bump the version with the recipe.
DEFAULT_MODEL_TAG = f"{DEFAULT_MODEL_NAME}:v1"
RECORD_ENV = "SERVED_MODEL_FILE"
DEFAULT_RECORD_PATH = Path(__file__).resolve().parents[2] / "served_model.json"


class ReleaseRecord(BaseModel):
    model_tag: str = DEFAULT_MODEL_TAG
    candidate_tag: str | None = None
    history: list[str] = Field(default_factory=list, description="served before, newest last")


def record_path(environ: dict[str, str] | os._Environ | None = None) -> Path:
    environ = os.environ if environ is None else environ
    given = environ.get(RECORD_ENV, "").strip()
    return Path(given) if given else DEFAULT_RECORD_PATH


def read_record(path: Path) -> ReleaseRecord:
    """The record, or the defaults when none was written yet (`models promote` writes it there).
    A damaged or unreadable file, or a missing folder (a typo, a volume not mounted), is an
    error in one line that names the variable."""
    where = f"{RECORD_ENV}={path}"
    try:
        return ReleaseRecord.model_validate_json(path.read_bytes())
    except FileNotFoundError:
        if not path.parent.is_dir():
            raise ValueError(f"{where}: its folder does not exist") from None
        return ReleaseRecord()
    except OSError as exc:  # a folder, no permission
        raise ValueError(f"{where} cannot be read: {exc.strerror}") from None
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(map(str, error['loc'])) or 'file'}: {error['msg']}"
            for error in exc.errors()
        )
        raise ValueError(f"{where} is not a valid served-model record: {problems}") from None


def write_record(path: Path, record: ReleaseRecord) -> None:
    """Atomic replace: a server starting at the same moment reads the old or the new record."""
    temporary = path.with_name(path.name + ".tmp")
    temporary.write_text(json.dumps(record.model_dump(), indent=2) + "\n")
    os.replace(temporary, path)
