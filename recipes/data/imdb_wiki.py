"""IMDB-WIKI (Rothe et al.) for age and gender classification, as the paper sets it up.

Files: ``imdb_crop/imdb.mat`` (or ``wiki_crop/wiki.mat``) beside the face crops it names. The
``.mat`` holds a 1×1 struct ``imdb`` (``wiki``) whose fields are 1×N arrays:

* ``dob``: date of birth, a Matlab serial date number (datenum 1 = 0000-01-01, so
  Python ordinal = datenum − 366);
* ``photo_taken``: the year the photo was taken;
* ``full_path``: cell array of image paths relative to the ``.mat``'s folder;
* ``gender``: 1 male, 0 female, NaN unknown;
* ``name``, ``face_location`` (cell of 1×4), ``face_score`` (−inf: no face found),
  ``second_face_score`` (NaN: no second face); ``imdb.mat`` also ``celeb_names``, ``celeb_id``.

Setup of the paper (Sec. 5.2, IMDB part: 460,723 images of 20,284 subjects): keep images with a
single face (``face_score`` finite and ``second_face_score`` NaN), a known gender and an age in
0..99, where age = ``photo_taken`` − birth year and the birth year comes from the standard
conversion ``datetime.fromordinal(int(dob)) + timedelta(days=dob % 1) − timedelta(days=366)``
(187,103 images of 12,325 subjects in the paper); test on all images of 2,000 randomly chosen
held-out subjects, train on the rest (subject-disjoint). The subject is ``celeb_id`` for IMDB and
``name`` for WIKI (the path for nameless WIKI entries). Age is a 100-way, gender a 2-way label.

Example:
    >>> import tempfile
    >>> tmp = tempfile.TemporaryDirectory()
    >>> mat = write_synthetic_faces(tmp.name, num_subjects=4, images_per_subject=2)
    >>> records = filter_records(read_imdb_wiki_mat(mat))
    >>> train, test = subject_split(records, test_subjects=1, seed=0)
    >>> len(records), len(train) + len(test), {r.subject for r in train} & {r.subject for r in test}
    (8, 8, set())
    >>> tmp.cleanup()
"""

from __future__ import annotations

import math
import os
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from ..errors import ConfigError, DatasetFormatError, DatasetNotFoundError
from .transforms import sample_generator

__all__ = [
    "FaceRecord",
    "matlab_datenum_to_datetime",
    "birth_year",
    "read_imdb_wiki_mat",
    "write_imdb_wiki_mat",
    "reject_reason",
    "filter_records",
    "filter_report",
    "subject_split",
    "IMDBWiki",
    "write_synthetic_faces",
    "NUM_AGES",
]

#: Ages 0..99 as a 100-way classification.
NUM_AGES = 100
_SOURCES = ("imdb", "wiki")
_HINT = (
    "download the faces-only archive (imdb_crop.tar or wiki_crop.tar) from "
    "https://data.vision.ee.ethz.ch/cvl/rrothe/imdb-wiki/, extract it and pass the folder holding "
    "{source}.mat (e.g. .../{source}_crop) as root, or write a small one with "
    f"{__name__}.write_synthetic_faces(...)"
)
_REQUIRED_FIELDS = ("dob", "photo_taken", "full_path", "gender", "face_score", "second_face_score")


def matlab_datenum_to_datetime(datenum: float) -> datetime | None:
    """Matlab serial date number → ``datetime``, or None when it is not a representable date.

    Example:
        >>> matlab_datenum_to_datetime(730486.5)  # datenum(2000, 1, 1) = 730486
        datetime.datetime(2000, 1, 1, 12, 0)
    """
    if not math.isfinite(datenum):
        return None
    try:
        return (
            datetime.fromordinal(int(datenum)) + timedelta(days=datenum % 1) - timedelta(days=366)
        )
    except (ValueError, OverflowError):
        return None


def birth_year(dob: float) -> int | None:
    """Year of a Matlab datenum (None when invalid).

    Example:
        >>> birth_year(730485.75), birth_year(730486.0)  # 1999-12-31 18:00, 2000-01-01
        (1999, 2000)
    """
    date = matlab_datenum_to_datetime(dob)
    return None if date is None else date.year


@dataclass(frozen=True, eq=False)
class FaceRecord:
    """One entry of ``imdb.mat`` / ``wiki.mat``.

    Example:
        >>> FaceRecord("01/a.jpg", dob=730486.0, photo_taken=2009, gender=1.0, face_score=3.2,
        ...            second_face_score=float("nan"), name="A", celeb_id=7).age
        9
    """

    full_path: str
    dob: float
    photo_taken: int
    gender: float
    face_score: float
    second_face_score: float
    name: str = ""
    celeb_id: int | None = None
    face_location: tuple[float, float, float, float] | None = None

    def _key(self) -> tuple[Any, ...]:
        # NaN marks "unknown" / "no second face" in the files: equal records compare equal.
        return tuple(
            "nan" if isinstance(value, float) and math.isnan(value) else value
            for value in (
                self.full_path,
                self.dob,
                self.photo_taken,
                self.gender,
                self.face_score,
                self.second_face_score,
                self.name,
                self.celeb_id,
                self.face_location,
            )
        )

    def __eq__(self, other: object) -> bool:
        return isinstance(other, FaceRecord) and self._key() == other._key()

    def __hash__(self) -> int:
        return hash(self._key())

    @property
    def age(self) -> int | None:
        """``photo_taken`` − birth year (None when the date of birth is invalid)."""
        year = birth_year(self.dob)
        return None if year is None else int(self.photo_taken) - year

    @property
    def subject(self) -> str:
        """Subject id: ``celeb_id`` (IMDB), else ``name`` (WIKI), else the path."""
        if self.celeb_id is not None:
            return str(self.celeb_id)
        return self.name if self.name else f"path:{self.full_path}"


def _cell_text(value: Any) -> str:
    if isinstance(value, np.ndarray):
        return "" if value.size == 0 else str(value.ravel()[0])
    return str(value)


def _locate_struct(mat: dict[str, Any], path: Path, source: str | None) -> tuple[str, Any]:
    names = [source] if source is not None else [s for s in _SOURCES if s in mat]
    if not names or names[0] not in mat:
        raise DatasetFormatError(
            f"{path} holds no '{source or ' or '.join(_SOURCES)}' struct (variables: "
            f"{sorted(k for k in mat if not k.startswith('__'))}): expected the IMDB-WIKI metadata"
        )
    struct = mat[names[0]]
    if not isinstance(struct, np.ndarray) or struct.dtype.names is None or struct.size != 1:
        raise DatasetFormatError(
            f"{path}: '{names[0]}' is not a 1×1 struct: expected the IMDB-WIKI metadata layout"
        )
    return names[0], struct.ravel()[0]


def read_imdb_wiki_mat(path: str | os.PathLike[str], source: str | None = None) -> list[FaceRecord]:
    """Read every entry of ``imdb.mat`` / ``wiki.mat`` (unfiltered). ``source`` names the struct
    (``"imdb"`` or ``"wiki"``; found automatically when None).

    Example:
        >>> read_imdb_wiki_mat("/no/such/imdb.mat")
        Traceback (most recent call last):
        ...
        recipes.errors.DatasetNotFoundError: expected /no/such/imdb.mat: download ...
    """
    from scipy.io import loadmat

    path = Path(path).expanduser()
    if not path.is_file():
        raise DatasetNotFoundError(
            f"expected {path}: " + _HINT.format(source=source or path.stem or "imdb")
        )
    try:
        mat = loadmat(path)
    except NotImplementedError as error:  # MATLAB v7.3 (HDF5) files
        raise DatasetFormatError(
            f"{path} is a MATLAB v7.3 file: re-save it with save(..., '-v7') ({error})"
        ) from error
    except Exception as error:  # loadmat raises many types on damaged files
        raise DatasetFormatError(f"{path} is not a readable MATLAB .mat file: {error}") from error
    name, entry = _locate_struct(mat, path, source)
    fields = entry.dtype.names
    missing = [field for field in _REQUIRED_FIELDS if field not in fields]
    if missing:
        raise DatasetFormatError(
            f"{path}: struct '{name}' lacks field(s) {missing} (has {list(fields)})"
        )
    columns = {field: np.asarray(entry[field]).ravel() for field in fields}
    count = columns["dob"].size
    lengths = {field: columns[field].size for field in _REQUIRED_FIELDS}
    if any(length != count for length in lengths.values()):
        raise DatasetFormatError(f"{path}: fields of '{name}' differ in length: {lengths}")
    numeric = {}
    for field in ("dob", "photo_taken", "gender", "face_score", "second_face_score"):
        try:
            numeric[field] = columns[field].astype(np.float64)
        except (TypeError, ValueError) as error:
            raise DatasetFormatError(f"{path}: field '{field}' is not numeric") from error
    names = columns.get("name")
    celeb_ids = columns.get("celeb_id")
    locations = columns.get("face_location")
    records = []
    for i in range(count):
        location = None
        if locations is not None and locations.size == count:
            values = np.asarray(locations[i], dtype=np.float64).ravel()
            location = tuple(values.tolist()) if values.size == 4 else None
        photo_taken = numeric["photo_taken"][i]
        records.append(
            FaceRecord(
                full_path=_cell_text(columns["full_path"][i]),
                dob=float(numeric["dob"][i]),
                photo_taken=int(photo_taken) if math.isfinite(photo_taken) else -1,
                gender=float(numeric["gender"][i]),
                face_score=float(numeric["face_score"][i]),
                second_face_score=float(numeric["second_face_score"][i]),
                name=_cell_text(names[i]) if names is not None and names.size == count else "",
                celeb_id=(
                    int(celeb_ids[i]) if celeb_ids is not None and celeb_ids.size == count else None
                ),
                face_location=location,  # type: ignore[arg-type]
            )
        )
    return records


def write_imdb_wiki_mat(
    records: Sequence[FaceRecord], path: str | os.PathLike[str], source: str | None = None
) -> Path:
    """Write records as a real ``imdb.mat`` / ``wiki.mat`` (MATLAB v5): a 1×1 struct with 1×N
    fields in the original order, cell arrays for ``full_path``, ``name`` and ``face_location``,
    doubles (NaN / −inf kept) for the rest; ``imdb`` also gets ``celeb_names`` and ``celeb_id``.
    ``source`` defaults to the file's stem. Returns the path.

    Example:
        >>> import tempfile, pathlib
        >>> tmp = tempfile.TemporaryDirectory()
        >>> path = pathlib.Path(tmp.name) / "wiki.mat"
        >>> rec = FaceRecord("00/x.jpg", 730486.0, 2009, 0.0, 1.5, float("nan"), name="X")
        >>> read_imdb_wiki_mat(write_imdb_wiki_mat([rec], path))[0] == rec
        True
        >>> tmp.cleanup()
    """
    from scipy.io import savemat

    path = Path(path).expanduser()
    source = source or path.stem
    if source not in _SOURCES:
        raise ConfigError(f"source={source!r}: use 'imdb' or 'wiki' (or name the file so)")
    count = len(records)

    def cell(values: Iterable[Any]) -> np.ndarray:
        array = np.empty((1, count), dtype=object)
        for i, value in enumerate(values):
            array[0, i] = value
        return array

    def row(values: Iterable[float]) -> np.ndarray:
        return np.asarray(list(values), dtype=np.float64).reshape(1, count)

    fields: dict[str, np.ndarray] = {
        "dob": row(r.dob for r in records),
        "photo_taken": row(r.photo_taken for r in records),
        "full_path": cell(r.full_path for r in records),
        "gender": row(r.gender for r in records),
        "name": cell(r.name for r in records),
        "face_location": cell(
            np.asarray(r.face_location or (), dtype=np.float64).reshape(1, -1) for r in records
        ),
        "face_score": row(r.face_score for r in records),
        "second_face_score": row(r.second_face_score for r in records),
    }
    if source == "imdb":
        ids = [r.celeb_id if r.celeb_id is not None else 0 for r in records]
        names_by_id = {r.celeb_id: r.name for r in records if r.celeb_id is not None}
        celeb_names = np.empty((1, max(ids, default=0)), dtype=object)
        celeb_names[0, :] = ""
        for celeb, name in names_by_id.items():
            if celeb >= 1:
                celeb_names[0, celeb - 1] = name
        fields["celeb_names"] = celeb_names
        fields["celeb_id"] = row(ids)
    struct = np.empty((1, 1), dtype=[(name, object) for name in fields])
    for name, value in fields.items():
        struct[0, 0][name] = value
    path.parent.mkdir(parents=True, exist_ok=True)
    savemat(path, {source: struct})
    return path


def reject_reason(record: FaceRecord, min_age: int = 0, max_age: int = NUM_AGES - 1) -> str | None:
    """Why the paper's filter drops ``record`` (``"no_face"``, ``"multiple_faces"``,
    ``"unknown_gender"``, ``"age_out_of_range"``), or None when it is kept.

    Example:
        >>> rec = FaceRecord("a.jpg", 730486.0, 2009, 1.0, 2.0, 1.7)
        >>> reject_reason(rec)
        'multiple_faces'
    """
    if not math.isfinite(record.face_score):
        return "no_face"
    if not math.isnan(record.second_face_score):
        return "multiple_faces"
    if record.gender not in (0.0, 1.0):
        return "unknown_gender"
    age = record.age
    if age is None or not min_age <= age <= max_age:
        return "age_out_of_range"
    return None


def filter_records(
    records: Iterable[FaceRecord], min_age: int = 0, max_age: int = NUM_AGES - 1
) -> list[FaceRecord]:
    """The records the paper keeps: single face, known gender, age in ``min_age..max_age``.

    Example:
        >>> good = FaceRecord("a.jpg", 730486.0, 2009, 1.0, 2.0, float("nan"))
        >>> bad = FaceRecord("b.jpg", 730486.0, 2009, float("nan"), 2.0, float("nan"))
        >>> [r.full_path for r in filter_records([good, bad])]
        ['a.jpg']
    """
    return [r for r in records if reject_reason(r, min_age, max_age) is None]


def filter_report(
    records: Iterable[FaceRecord], min_age: int = 0, max_age: int = NUM_AGES - 1
) -> dict[str, int]:
    """Counts of kept records and of each rejection reason (first failing test), plus
    ``"subjects"`` kept.

    Example:
        >>> filter_report([FaceRecord("a.jpg", 730486.0, 2009, 1.0, float("-inf"), float("nan"))])
        {'kept': 0, 'subjects': 0, 'no_face': 1}
    """
    counts: Counter[str] = Counter()
    subjects = set()
    for record in records:
        reason = reject_reason(record, min_age, max_age)
        counts[reason or "kept"] += 1
        if reason is None:
            subjects.add(record.subject)
    return {
        "kept": counts.pop("kept", 0),
        "subjects": len(subjects),
        **dict(sorted(counts.items())),
    }


def subject_split(
    records: Sequence[FaceRecord], test_subjects: int = 2000, seed: int = 0
) -> tuple[list[FaceRecord], list[FaceRecord]]:
    """Subject-disjoint split: all images of ``test_subjects`` randomly chosen subjects (torch
    ``randperm`` seeded with ``seed`` over the sorted subject ids) form the test set, the rest
    the training set; both keep the input order.

    Example:
        >>> recs = [FaceRecord(f"{i}.jpg", 730486.0, 2009, 1.0, 2.0, float("nan"), celeb_id=i % 3)
        ...         for i in range(6)]
        >>> train, test = subject_split(recs, test_subjects=1)
        >>> len(train), len(test), len({r.subject for r in test})
        (4, 2, 1)
    """
    subjects = sorted({record.subject for record in records})
    if not 0 <= test_subjects < len(subjects):
        raise ConfigError(
            f"test_subjects={test_subjects}: there are {len(subjects)} subjects, choose between 0 "
            f"and {max(len(subjects) - 1, 0)} (the paper holds out 2000 of 12,325)"
        )
    order = torch.randperm(len(subjects), generator=torch.Generator().manual_seed(seed))
    held_out = {subjects[i] for i in order[:test_subjects].tolist()}
    train = [r for r in records if r.subject not in held_out]
    test = [r for r in records if r.subject in held_out]
    return train, test


def _find_mat(root: Path, source: str) -> Path:
    for candidate in (root / f"{source}.mat", root / f"{source}_crop" / f"{source}.mat"):
        if candidate.is_file():
            return candidate
    raise DatasetNotFoundError(
        f"expected {source}.mat under {root} (or {source}_crop/{source}.mat): "
        + _HINT.format(source=source)
    )


class IMDBWiki(Dataset):
    """Face images with age and gender labels, filtered and split as in the paper.

    Args:
        root: the folder holding ``imdb.mat`` / ``wiki.mat`` and the images (``.../imdb_crop``),
            or its parent.
        source: ``"imdb"`` (the paper's data) or ``"wiki"``.
        split: ``"train"``, ``"test"`` or ``"all"`` (every kept record).
        transform: optional callable applied to the raw sample.
        test_subjects: held-out subjects (2000 in the paper).
        seed: seed of the subject split.

    Raw sample: ``image`` uint8 H×W×3 RGB, ``age`` int64 (0..99), ``gender`` int64
    (0 female, 1 male).

    Example:
        >>> import tempfile
        >>> tmp = tempfile.TemporaryDirectory()
        >>> mat = write_synthetic_faces(tmp.name, num_subjects=3, images_per_subject=2)
        >>> data = IMDBWiki(mat.parent, split="test", test_subjects=1)
        >>> len(data), sorted(data[0])
        (2, ['age', 'gender', 'image'])
        >>> tmp.cleanup()
    """

    def __init__(
        self,
        root: str | os.PathLike[str],
        source: str = "imdb",
        split: str = "train",
        transform: Callable[..., Any] | None = None,
        test_subjects: int = 2000,
        seed: int = 0,
        min_age: int = 0,
        max_age: int = NUM_AGES - 1,
    ) -> None:
        if source not in _SOURCES:
            raise ConfigError(f"source={source!r}: use 'imdb' or 'wiki'")
        if split not in ("train", "test", "all"):
            raise ConfigError(f"split={split!r}: use 'train', 'test' or 'all'")
        root_path = Path(root).expanduser()
        if not root_path.is_dir():
            raise DatasetNotFoundError(
                f"IMDB-WIKI root {root_path} is not a directory: " + _HINT.format(source=source)
            )
        self.mat_path = _find_mat(root_path, source)
        self.image_root = self.mat_path.parent
        all_records = read_imdb_wiki_mat(self.mat_path, source)
        self.report = filter_report(all_records, min_age, max_age)
        kept = filter_records(all_records, min_age, max_age)
        if split == "all":
            self.records = kept
        else:
            train, test = subject_split(kept, test_subjects, seed)
            self.records = train if split == "train" else test
        self.source = source
        self.split = split
        self.transform = transform

    def __len__(self) -> int:
        return len(self.records)

    def read_raw(self, index: int) -> dict[str, torch.Tensor]:
        """The raw sample ``index`` (no transform)."""
        record = self.records[index]
        path = self.image_root / record.full_path
        if not path.is_file():
            raise DatasetNotFoundError(
                f"{path} (listed in {self.mat_path.name}) is missing: "
                + _HINT.format(source=self.source)
            )
        try:
            with Image.open(path) as image:
                array = np.asarray(image.convert("RGB"))
        except OSError as error:
            raise DatasetFormatError(f"{path} is not a readable image: {error}") from error
        return {
            "image": torch.from_numpy(array.copy()),
            "age": torch.tensor(record.age, dtype=torch.int64),
            "gender": torch.tensor(int(record.gender), dtype=torch.int64),
        }

    def __getitem__(self, index: int) -> Any:
        sample = self.read_raw(index)
        return self.transform(sample) if self.transform is not None else sample

    def __repr__(self) -> str:
        return (
            f"IMDBWiki(root={str(self.image_root)!r}, source={self.source!r}, "
            f"split={self.split!r}, len={len(self)})"
        )


def _datenum(year: int, month: int, day: int) -> float:
    return float(datetime(year, month, day).toordinal() + 366)


def write_synthetic_faces(
    root: str | os.PathLike[str],
    num_subjects: int = 12,
    images_per_subject: int = 4,
    size: int = 32,
    seed: int = 0,
    source: str = "imdb",
    distractors: bool = True,
) -> Path:
    """Write a small IMDB-WIKI look-alike in the real formats: ``root/{source}.mat`` and JPEG
    crops ``root/NN/nm…_rm…_<birth>_<year>.jpg``. Each image is a face-like ellipse whose
    brightness grows with the age and whose hair colour shows the gender, so a small classifier
    can learn both. With ``distractors`` each subject also gets images the paper's filter drops
    (a second face, no face) and one extra subject has an unknown gender. Returns the ``.mat``.

    Example:
        >>> import tempfile
        >>> tmp = tempfile.TemporaryDirectory()
        >>> path = write_synthetic_faces(tmp.name, num_subjects=2, images_per_subject=1)
        >>> report = filter_report(read_imdb_wiki_mat(path))
        >>> report["kept"], report["multiple_faces"], report["no_face"], report["unknown_gender"]
        (2, 2, 2, 1)
        >>> tmp.cleanup()
    """
    if source not in _SOURCES:
        raise ConfigError(f"source={source!r}: use 'imdb' or 'wiki'")
    root = Path(root).expanduser()
    rng = sample_generator(seed, 7)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / max(size - 1, 1)
    face = ((xx - 0.5) / 0.32) ** 2 + ((yy - 0.55) / 0.4) ** 2 <= 1.0
    hair = (yy < 0.3) & ~face
    records: list[FaceRecord] = []

    def add(subject: int, number: int, gender: float, born: int, taken: int, kind: str) -> None:
        age = taken - born
        noise = torch.randn(size, size, 3, generator=rng).numpy() * 6.0
        image = np.full((size, size, 3), 90.0, dtype=np.float32)
        skin = 60.0 + 1.8 * min(max(age, 0), 99)
        image[face] = (skin, skin * 0.85, skin * 0.7)
        image[hair] = (40.0, 40.0, 200.0) if gender == 1.0 else (200.0, 40.0, 40.0)
        folder = f"{subject % 100:02d}"
        name = f"Person {subject}"
        path = f"{folder}/nm{subject:07d}_rm{number:07d}_{born}-6-15_{taken}.jpg"
        (root / folder).mkdir(parents=True, exist_ok=True)
        pixels = np.clip(image + noise, 0, 255).round().astype(np.uint8)
        Image.fromarray(pixels).save(root / path, quality=95)
        records.append(
            FaceRecord(
                full_path=path,
                dob=_datenum(born, 6, 15) + 0.5,
                photo_taken=taken,
                gender=gender,
                face_score=float("-inf") if kind == "no_face" else 2.0 + float(number % 3),
                second_face_score=1.5 if kind == "multiple_faces" else float("nan"),
                name=name,
                celeb_id=subject + 1 if source == "imdb" else None,
                face_location=(1.0, 1.0, float(size), float(size)),
            )
        )

    extra_subject = num_subjects if distractors else None
    for subject in range(num_subjects + (1 if distractors else 0)):
        gender = (
            float(torch.randint(0, 2, (), generator=rng))
            if subject != extra_subject
            else (float("nan"))
        )
        born = int(torch.randint(1930, 2000, (), generator=rng))
        kinds = ["single"] * images_per_subject
        if distractors and subject != extra_subject:
            kinds += ["multiple_faces", "no_face"]
        for number, kind in enumerate(kinds):
            taken = min(born + int(torch.randint(3, 80, (), generator=rng)), 2015)
            add(subject, number, gender, born, taken, kind)
    return write_imdb_wiki_mat(records, root / f"{source}.mat", source)
