"""The question sets shipped inside the package, addressed as `bundled[:name]`.

Users (and the demo) should be able to run an evaluation without downloading anything, so a few
small sets live in src/clinqa/data/bundled/ and are installed with the package:

- `clinical`: the clinical questions, one native JSONL file per specialty (clinical_<specialty>.jsonl);
  `bundled` alone means this set, and `bundled:clinical_<specialty>` picks one file;
- `control`: a control set of non-clinical questions in the same native format;
- `statements`: true/false clinical statements (the `statements` format);
- `taxonomy`: training questions for the nine taxonomy specialties outside the six experiment
  specialties (endocrinology ... emergency medicine), one file per specialty in bundled/taxonomy/,
  kept apart so `bundled` (what the demo evaluates) stays the same 204 questions;
- `all`: `clinical` plus `taxonomy`, questions of all fifteen specialties (what the MiniLM
  annotator trains on: `clinqa annotate X --train bundled` uses it).

This module only resolves names to files; clinqa.data.loaders reads them.
"""

from __future__ import annotations

from importlib.resources import files
from pathlib import Path

from clinqa.errors import ClinqaError

PREFIX = "bundled"

# name -> (file pattern, format, what it is)
BUNDLED_SETS: dict[str, tuple[str, str, str]] = {
    "clinical": ("clinical_*.jsonl", "clinqa", "all bundled clinical questions, one file per specialty"),
    "control": ("control.jsonl", "clinqa", "the control set of non-clinical questions"),
    "statements": ("statements.jsonl", "statements", "true/false clinical statements"),
}
BUNDLED_NAMES: tuple[str, ...] = tuple(BUNDLED_SETS)
# Sets made of several globs, listed by bundled_names() only when bundled/taxonomy/ is present.
TAXONOMY_DIR = "taxonomy"
TAXONOMY_SETS: dict[str, tuple[tuple[str, ...], str]] = {
    "taxonomy": (
        (f"{TAXONOMY_DIR}/*.jsonl",),
        "questions of the nine other taxonomy specialties, one file per specialty",
    ),
    "all": (
        ("clinical_*.jsonl", f"{TAXONOMY_DIR}/*.jsonl"),
        "clinical + taxonomy: questions of all fifteen specialties",
    ),
}


def bundled_dir() -> Path:
    """The folder holding the bundled files (clinqa is never installed zipped, so it is a real path)."""
    return Path(str(files("clinqa.data") / "bundled"))


def is_bundled_spec(spec: object) -> bool:
    """True for `bundled` and `bundled:<name>` (a local folder called bundled needs `./bundled`)."""
    return isinstance(spec, str) and (spec == PREFIX or spec.startswith(PREFIX + ":"))


def parse_bundled_spec(spec: str) -> str:
    """`bundled` -> 'clinical', `bundled:control` -> 'control'."""
    if not is_bundled_spec(spec):
        raise ClinqaError(
            f"{spec!r} is not a bundled question set: use bundled or bundled:<name> ({', '.join(bundled_names())})"
        )
    name = spec[len(PREFIX) + 1 :].strip() if spec != PREFIX else "clinical"
    return name or "clinical"


def bundled_names() -> list[str]:
    """The set names (clinical, control, statements) and each clinical_<specialty> file present."""
    folder = bundled_dir()
    per_specialty = sorted(p.stem for p in folder.glob("clinical_*.jsonl")) if folder.is_dir() else []
    taxonomy = list(TAXONOMY_SETS) if (folder / TAXONOMY_DIR).is_dir() else []
    return [*BUNDLED_NAMES, *taxonomy, *per_specialty]


def bundled_format(name: str) -> str:
    """The loader format of a bundled set: 'statements' for the statements, else native 'clinqa'."""
    return BUNDLED_SETS[name][1] if name in BUNDLED_SETS else "clinqa"


def bundled_files(name: str) -> list[Path]:
    """All files of a bundled set, sorted; a ClinqaError for an unknown name or missing files."""
    folder = bundled_dir()
    if name in TAXONOMY_SETS:
        globs = TAXONOMY_SETS[name][0]
        found = [p for g in globs for p in sorted(folder.glob(g))] if folder.is_dir() else []
        if not found or not (folder / TAXONOMY_DIR).is_dir():
            raise ClinqaError(
                f"the bundled question set {name!r} is missing from {folder} (expected {', '.join(globs)}): reinstall clinqa"
            )
        return found
    if name in BUNDLED_SETS:
        found = sorted(folder.glob(BUNDLED_SETS[name][0])) if folder.is_dir() else []
    elif name.startswith("clinical_"):
        found = [p for p in [folder / f"{name}.jsonl"] if p.is_file()]
        if not found:
            raise ClinqaError(f"unknown bundled question set {name!r}: use one of {', '.join(bundled_names())}")
    else:
        raise ClinqaError(f"unknown bundled question set {name!r}: use one of {', '.join(bundled_names())}")
    if not found:
        raise ClinqaError(
            f"the bundled question set {name!r} is missing from {folder} (expected {BUNDLED_SETS[name][0]}): reinstall clinqa"
        )
    return found


def bundled_path(name: str) -> Path:
    """The one file of a single-file bundled set (control, statements, clinical_<specialty>).

    `clinical`, `taxonomy` and `all` are several files: use bundled_files(name) for them.
    """
    if name in ("clinical", *TAXONOMY_SETS):
        raise ClinqaError(f"the bundled set {name!r} is several files, not one: use bundled_files({name!r})")
    return bundled_files(name)[0]
