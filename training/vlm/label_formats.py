"""Readers of public fundus datasets' diagnostic label files, into `LabeledImage` records.

    read_<name>(labels_file, images_dir) -> list[LabeledImage];  FORMAT_READERS[name]

- aptos: APTOS 2019 `train.csv` (id_code, diagnosis 0-4); images `<id_code>.png`.
- idrid: IDRiD disease grading CSV (Image name, Retinopathy grade 0-4, Risk of macular
  edema 0-2); images `<Image name>.jpg`.
- messidor: Messidor `Annotation_Base*.xls` saved as CSV (Image name, Retinopathy grade 0-3,
  Risk of macular edema 0-2); images `<Image name>` (`.tif`).
- eyeq: EyeQ `Label_EyeQ_train.csv` / `_test.csv` (image, quality 0-2, DR_grade 0-4); images
  `<image>` (`.jpeg`).
- eyepacs: EyePACS (Kaggle DR) `trainLabels.csv` (image, level 0-4); images `<image>.jpeg`.
- odir: ODIR-5K training annotations saved as CSV (ID, Left-Fundus, Right-Fundus,
  Left-/Right-Diagnostic Keywords, N, D, G, C, A, H, M, O); the two named images, one record
  per eye.
- rfmid: RFMiD `RFMiD_Training_Labels.csv` or its validation/test files (ID, Disease_Risk and
  45 disease flags); images `<ID>.png`.

Excel files (Messidor's `.xls`, ODIR's `.xlsx`) are not read: save the sheet as CSV (UTF-8;
comma, semicolon or tab separated) and pass that. Header names are compared with surrounding
spaces removed (IDRiD's and Messidor's headers carry trailing ones); empty rows are skipped.
An image is looked up under the name the file gives and with the dataset's usual extensions
(lower and upper case), so re-encoded copies (`.png` for `.jpeg`) are found too.

`diagnoses` uses RetinalGPT's words:

- `dr_grade`: "0".."4" on the international (ICDR) scale: none, mild, moderate, severe
  non-proliferative, proliferative (APTOS, IDRiD, EyePACS, EyeQ).
- `messidor_grade`: "0".."3", Messidor's own retinopathy scale (counts of microaneurysms and
  haemorrhages, neovessels); it does not map exactly to ICDR, so it is kept apart.
- `macular_edema_risk`: "0" no exudates, "1" exudates further than one disc diameter from the
  macula centre, "2" within one disc diameter (IDRiD, Messidor: the same scheme).
- `image_quality`: "good" / "usable" / "reject" (EyeQ).
- `glaucoma`: "yes" / "suspected" / "no", from the eye's own keywords (ODIR).
- `diabetic_retinopathy`, `disease_risk`: "yes" / "no" (RFMiD).
- `diagnosis`: readable names, joined by ", " ("normal" when a multi-label set has none).
- `patient_diagnosis` (ODIR): the names of the N-O flags, which ODIR sets per patient, i.e.
  for both eyes together; the per-eye `diagnosis` comes from that eye's keywords.

Every problem of a file (a missing column, a bad value, a missing image, an image listed
twice) is reported in one ValueError naming the file and each row, numbered as a spreadsheet
shows them (the header is row 1).
"""

from __future__ import annotations

import csv
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, TypeVar

from pydantic import BaseModel, ConfigDict, Field, ValidationError, create_model

from training.vlm.records import LabeledImage

MAX_REPORTED = 20
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp"}

ICDR_NAMES = {
    0: "no diabetic retinopathy",
    1: "mild non-proliferative diabetic retinopathy",
    2: "moderate non-proliferative diabetic retinopathy",
    3: "severe non-proliferative diabetic retinopathy",
    4: "proliferative diabetic retinopathy",
}
EYEQ_QUALITY = {0: "good", 1: "usable", 2: "reject"}
ODIR_FLAGS = {
    "N": "normal",
    "D": "diabetic retinopathy",
    "G": "glaucoma",
    "C": "cataract",
    "A": "age-related macular degeneration",
    "H": "hypertensive retinopathy",
    "M": "pathological myopia",
    "O": "other abnormalities",
}
RFMID_DISEASES = {
    "DR": "diabetic retinopathy",
    "ARMD": "age-related macular degeneration",
    "MH": "media haze",
    "DN": "drusen",
    "MYA": "myopia",
    "BRVO": "branch retinal vein occlusion",
    "TSLN": "tessellation",
    "ERM": "epiretinal membrane",
    "LS": "laser scars",
    "MS": "macular scar",
    "CSR": "central serous retinopathy",
    "ODC": "optic disc cupping",
    "CRVO": "central retinal vein occlusion",
    "TV": "tortuous vessels",
    "AH": "asteroid hyalosis",
    "ODP": "optic disc pallor",
    "ODE": "optic disc oedema",
    "ST": "optociliary shunt",
    "AION": "anterior ischaemic optic neuropathy",
    "PT": "parafoveal telangiectasia",
    "RT": "retinal traction",
    "RS": "retinitis",
    "CRS": "chorioretinitis",
    "EDN": "exudation",
    "RPEC": "retinal pigment epithelium changes",
    "MHL": "macular hole",
    "RP": "retinitis pigmentosa",
    "CWS": "cotton-wool spots",
    "CB": "coloboma",
    "ODPM": "optic disc pit maculopathy",
    "PRH": "preretinal haemorrhage",
    "MNF": "myelinated nerve fibres",
    "HR": "haemorrhagic retinopathy",
    "CRAO": "central retinal artery occlusion",
    "TD": "tilted disc",
    "CME": "cystoid macular oedema",
    "PTCR": "post-traumatic choroidal rupture",
    "CF": "choroidal folds",
    "VH": "vitreous haemorrhage",
    "MCA": "macroaneurysm",
    "VS": "vasculitis",
    "BRAO": "branch retinal artery occlusion",
    "PLQ": "plaque",
    "HPED": "haemorrhagic pigment epithelial detachment",
    "CL": "collaterals",
}

Grade4 = Annotated[int, Field(ge=0, le=4)]
Grade3 = Annotated[int, Field(ge=0, le=3)]
Grade2 = Annotated[int, Field(ge=0, le=2)]
Flag = Annotated[int, Field(ge=0, le=1)]
Name = Annotated[str, Field(min_length=1)]
Row = TypeVar("Row", bound=BaseModel)


class _Problem(Exception):
    """What is wrong with one row."""


class _Schema(BaseModel):
    model_config = ConfigDict(extra="ignore")


@dataclass(frozen=True)
class _Images:
    dataset: str
    directory: Path
    extensions: tuple[str, ...]

    def find(self, name: str) -> Path:
        suffix = Path(name).suffix
        stem = name.removesuffix(suffix) if suffix.lower() in IMAGE_SUFFIXES else name
        tried = [name] if stem != name else []
        tried += [stem + e for ext in self.extensions for e in (ext, ext.upper())]
        for candidate in dict.fromkeys(tried):
            if (self.directory / candidate).is_file():
                return self.directory / candidate
        raise _Problem(f"no image {name!r} in {self.directory} (tried {', '.join(tried)})")

    def record(self, image_id: str, name: str, diagnoses: dict[str, str]) -> LabeledImage:
        return LabeledImage(self.dataset, image_id, self.find(name), diagnoses)


def _table(labels_file: Path) -> tuple[list[str], Iterator[tuple[int, dict[str, str]]]]:
    """The header and the non-empty rows (with their spreadsheet row numbers)."""
    if labels_file.suffix.lower() in (".xls", ".xlsx"):
        raise ValueError(
            f"{labels_file}: Excel files are not read; save the sheet as CSV (UTF-8) and pass that"
        )
    try:
        text = labels_file.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError:
        raise ValueError(f"{labels_file}: not UTF-8 text; save it as CSV (UTF-8)") from None
    lines = text.splitlines()
    if not lines:
        raise ValueError(f"{labels_file}: empty file")
    try:
        dialect = csv.Sniffer().sniff(lines[0], delimiters=",;\t")
    except csv.Error:
        dialect = csv.excel  # a single column
    reader = csv.reader(lines, dialect)
    header = [name.strip() for name in next(reader)]

    def rows() -> Iterator[tuple[int, dict[str, str]]]:
        for values in reader:
            if any(value.strip() for value in values):
                cells = dict(zip(header, (v.strip() for v in values), strict=False))
                yield reader.line_num, cells

    return header, rows()


def _describe(error: ValidationError) -> str:
    return "; ".join(
        f"column {'.'.join(map(str, e['loc']))!r}: {e['msg']} (got {e['input']!r})"
        for e in error.errors()
    )


def _read(
    labels_file: Path,
    images: _Images,
    schema: type[Row],
    to_records: Callable[[Row], list[LabeledImage]],
) -> list[LabeledImage]:
    if not images.directory.is_dir():
        raise ValueError(f"{images.directory}: no such image folder")
    header, rows = _table(labels_file)
    required = [field.alias or name for name, field in schema.model_fields.items()]
    missing = [column for column in required if column not in header]
    if missing:
        raise ValueError(f"{labels_file}: not a {images.dataset} label file: no {missing} column")
    records: list[LabeledImage] = []
    seen: set[str] = set()
    problems: list[str] = []
    for number, cells in rows:
        try:
            for record in to_records(schema.model_validate(cells)):
                if record.image_id in seen:
                    raise _Problem(f"image {record.image_id!r} is listed twice")
                seen.add(record.image_id)
                records.append(record)
        except ValidationError as error:
            problems.append(f"row {number}: {_describe(error)}")
        except _Problem as problem:
            problems.append(f"row {number}: {problem}")
    if problems:
        shown = problems[:MAX_REPORTED]
        if len(problems) > MAX_REPORTED:
            shown.append(f"... and {len(problems) - MAX_REPORTED} more")
        raise ValueError(f"{labels_file}: {len(problems)} bad row(s)\n" + "\n".join(shown))
    return records


def _icdr(grade: int) -> dict[str, str]:
    return {"dr_grade": str(grade), "diagnosis": ICDR_NAMES[grade]}


class _Aptos(_Schema):
    id_code: Name
    diagnosis: Grade4


def read_aptos(labels_file: Path, images_dir: Path) -> list[LabeledImage]:
    images = _Images("aptos", images_dir, (".png",))
    return _read(
        labels_file,
        images,
        _Aptos,
        lambda r: [images.record(r.id_code, r.id_code, _icdr(r.diagnosis))],
    )


class _Idrid(_Schema):
    image: Name = Field(alias="Image name")
    grade: Grade4 = Field(alias="Retinopathy grade")
    edema_risk: Grade2 = Field(alias="Risk of macular edema")


class _Messidor(_Schema):
    image: Name = Field(alias="Image name")
    grade: Grade3 = Field(alias="Retinopathy grade")
    edema_risk: Grade2 = Field(alias="Risk of macular edema")


def read_idrid(labels_file: Path, images_dir: Path) -> list[LabeledImage]:
    images = _Images("idrid", images_dir, (".jpg", ".jpeg", ".png", ".tif"))

    def records(row: _Idrid) -> list[LabeledImage]:
        labels = _icdr(row.grade) | {"macular_edema_risk": str(row.edema_risk)}
        return [images.record(Path(row.image).stem, row.image, labels)]

    return _read(labels_file, images, _Idrid, records)


def read_messidor(labels_file: Path, images_dir: Path) -> list[LabeledImage]:
    images = _Images("messidor", images_dir, (".tif", ".tiff", ".png", ".jpg"))

    def records(row: _Messidor) -> list[LabeledImage]:
        labels = {
            "messidor_grade": str(row.grade),
            "macular_edema_risk": str(row.edema_risk),
            "diagnosis": "no diabetic retinopathy"
            if row.grade == 0
            else f"diabetic retinopathy (Messidor grade {row.grade})",
        }
        return [images.record(Path(row.image).stem, row.image, labels)]

    return _read(labels_file, images, _Messidor, records)


class _EyeQ(_Schema):
    image: Name
    quality: Grade2
    dr_grade: Grade4 = Field(alias="DR_grade")


def read_eyeq(labels_file: Path, images_dir: Path) -> list[LabeledImage]:
    images = _Images("eyeq", images_dir, (".jpeg", ".jpg", ".png"))

    def records(row: _EyeQ) -> list[LabeledImage]:
        labels = _icdr(row.dr_grade) | {"image_quality": EYEQ_QUALITY[row.quality]}
        return [images.record(Path(row.image).stem, row.image, labels)]

    return _read(labels_file, images, _EyeQ, records)


class _EyePacs(_Schema):
    image: Name
    level: Grade4


def read_eyepacs(labels_file: Path, images_dir: Path) -> list[LabeledImage]:
    images = _Images("eyepacs", images_dir, (".jpeg", ".jpg", ".png"))
    return _read(
        labels_file, images, _EyePacs, lambda r: [images.record(r.image, r.image, _icdr(r.level))]
    )


class _Odir(_Schema):
    id: Name = Field(alias="ID")
    left: Name = Field(alias="Left-Fundus")
    right: Name = Field(alias="Right-Fundus")
    left_keywords: Name = Field(alias="Left-Diagnostic Keywords")
    right_keywords: Name = Field(alias="Right-Diagnostic Keywords")
    n: Flag = Field(alias="N")
    d: Flag = Field(alias="D")
    g: Flag = Field(alias="G")
    c: Flag = Field(alias="C")
    a: Flag = Field(alias="A")
    h: Flag = Field(alias="H")
    m: Flag = Field(alias="M")
    o: Flag = Field(alias="O")


def _odir_eye(keywords: str) -> dict[str, str]:
    """ODIR's keywords are separated by full-width or ASCII commas."""
    words = [w.strip() for w in re.split(r"[,\uff0c]", keywords) if w.strip()]
    glaucoma = (
        "yes" if "glaucoma" in words else "suspected" if "suspected glaucoma" in words else "no"
    )
    return {"diagnosis": ", ".join(words), "glaucoma": glaucoma}


def read_odir(labels_file: Path, images_dir: Path) -> list[LabeledImage]:
    images = _Images("odir", images_dir, (".jpg", ".jpeg", ".png"))

    def records(row: _Odir) -> list[LabeledImage]:
        flags: dict[str, Any] = row.model_dump(by_alias=True)
        patient = ", ".join(name for code, name in ODIR_FLAGS.items() if flags[code])
        return [
            images.record(
                Path(name).stem, name, _odir_eye(keywords) | {"patient_diagnosis": patient}
            )
            for name, keywords in ((row.left, row.left_keywords), (row.right, row.right_keywords))
        ]

    return _read(labels_file, images, _Odir, records)


_RFMiD = create_model(
    "_RFMiD",
    __base__=_Schema,
    id=(Name, Field(alias="ID")),
    disease_risk=(Flag, Field(alias="Disease_Risk")),
    **{code: (Flag, Field(alias=code)) for code in RFMID_DISEASES},  # type: ignore[call-overload]
)


def read_rfmid(labels_file: Path, images_dir: Path) -> list[LabeledImage]:
    images = _Images("rfmid", images_dir, (".png", ".jpg", ".tif"))

    def records(row: BaseModel) -> list[LabeledImage]:
        flags: dict[str, Any] = row.model_dump(by_alias=True)
        found = [name for code, name in RFMID_DISEASES.items() if flags[code]]
        labels = {
            "disease_risk": "yes" if flags["Disease_Risk"] else "no",
            "diabetic_retinopathy": "yes" if flags["DR"] else "no",
            "diagnosis": ", ".join(found) or "normal",
        }
        return [images.record(flags["ID"], flags["ID"], labels)]

    return _read(labels_file, images, _RFMiD, records)


FORMAT_READERS: dict[str, Callable[[Path, Path], list[LabeledImage]]] = {
    "aptos": read_aptos,
    "idrid": read_idrid,
    "messidor": read_messidor,
    "eyeq": read_eyeq,
    "eyepacs": read_eyepacs,
    "odir": read_odir,
    "rfmid": read_rfmid,
}
