"""training/vlm/label_formats.py: small label files in each dataset's format (with tiny image
files) map into RetinalGPT's words; malformed rows and missing images are reported by row."""

from __future__ import annotations

from pathlib import Path

import pytest

from training.vlm.label_formats import FORMAT_READERS, RFMID_DISEASES, read_aptos
from training.vlm.records import LabeledImage

PNG = bytes.fromhex(
    "89504e470d0a1a0a0000000d4948445200000001000000010802000000907753de"
    "0000000c4944415478da63f8cfc000000301010018dd8db00000000049454e44ae426082"
)


def _write(root: Path, labels: str, images: list[str], name: str = "labels.csv") -> Path:
    (root / "images").mkdir(exist_ok=True)
    for image in images:
        (root / "images" / image).write_bytes(PNG)
    (root / name).write_text(labels, encoding="utf-8")
    return root / name


def _by_id(records: list[LabeledImage]) -> dict[str, LabeledImage]:
    return {record.image_id: record for record in records}


def test_registry_names_every_reader() -> None:
    assert set(FORMAT_READERS) == {"aptos", "idrid", "messidor", "eyeq", "eyepacs", "odir", "rfmid"}


def test_aptos(tmp_path: Path) -> None:
    labels = _write(
        tmp_path,
        "id_code,diagnosis\n000c1434d8d7,2\n001639a390f0,0\n",
        ["000c1434d8d7.png", "001639a390f0.PNG"],
    )
    records = _by_id(FORMAT_READERS["aptos"](labels, tmp_path / "images"))
    assert records["000c1434d8d7"] == LabeledImage(
        "aptos",
        "000c1434d8d7",
        tmp_path / "images" / "000c1434d8d7.png",
        {"dr_grade": "2", "diagnosis": "moderate non-proliferative diabetic retinopathy"},
    )
    assert records["001639a390f0"].path.name == "001639a390f0.PNG"  # upper-case extension
    assert records["001639a390f0"].diagnoses["diagnosis"] == "no diabetic retinopathy"


def test_idrid_headers_with_trailing_spaces_and_empty_rows(tmp_path: Path) -> None:
    labels = _write(
        tmp_path,
        "Image name,Retinopathy grade,Risk of macular edema ,,\n"
        "IDRiD_001,3,2,,\nIDRiD_002,4,0,,\n,,,,\n",
        ["IDRiD_001.jpg", "IDRiD_002.jpg"],
    )
    records = _by_id(FORMAT_READERS["idrid"](labels, tmp_path / "images"))
    assert records["IDRiD_001"].diagnoses == {
        "dr_grade": "3",
        "diagnosis": "severe non-proliferative diabetic retinopathy",
        "macular_edema_risk": "2",
    }
    assert records["IDRiD_002"].diagnoses["dr_grade"] == "4"


def test_messidor_semicolon_csv_and_excel_refused(tmp_path: Path) -> None:
    labels = _write(
        tmp_path,
        "Image name;Ophthalmologic department;Retinopathy grade;Risk of macular edema \n"
        "20051019_38557_0100_PP.tif;Service Ophtalmologie Lariboisiere;0;0\n"
        "20051020_43808_0100_PP.tif;Service Ophtalmologie Lariboisiere;3;1\n",
        ["20051019_38557_0100_PP.tif", "20051020_43808_0100_PP.png"],  # one re-encoded as PNG
    )
    records = _by_id(FORMAT_READERS["messidor"](labels, tmp_path / "images"))
    assert records["20051020_43808_0100_PP"].diagnoses == {
        "messidor_grade": "3",
        "macular_edema_risk": "1",
        "diagnosis": "diabetic retinopathy (Messidor grade 3)",
    }
    assert records["20051020_43808_0100_PP"].path.suffix == ".png"
    assert records["20051019_38557_0100_PP"].diagnoses["messidor_grade"] == "0"
    excel = tmp_path / "Annotation_Base11.xls"
    excel.write_bytes(b"\xd0\xcf\x11\xe0")
    with pytest.raises(ValueError, match=r"Annotation_Base11\.xls: Excel files are not read"):
        FORMAT_READERS["messidor"](excel, tmp_path / "images")
    with pytest.raises(
        ValueError,
        match="row 2: column 'Retinopathy grade': Input should be less than or equal to 3",
    ):
        FORMAT_READERS["messidor"](
            _write(
                tmp_path,
                "Image name,Retinopathy grade,Risk of macular edema\na.tif,4,0\n",
                ["a.tif"],
                "bad.csv",
            ),
            tmp_path / "images",
        )


def test_eyeq_quality(tmp_path: Path) -> None:
    labels = _write(
        tmp_path,
        ",image,quality,DR_grade\n0,10_left.jpeg,0,0\n1,10_right.jpeg,1,2\n2,13_left.jpeg,2,4\n",
        ["10_left.jpeg", "10_right.jpeg", "13_left.jpeg"],
    )
    records = _by_id(FORMAT_READERS["eyeq"](labels, tmp_path / "images"))
    assert [records[i].diagnoses["image_quality"] for i in ("10_left", "10_right", "13_left")] == [
        "good",
        "usable",
        "reject",
    ]
    assert records["13_left"].diagnoses["dr_grade"] == "4"


def test_eyepacs(tmp_path: Path) -> None:
    labels = _write(
        tmp_path, "image,level\n10_left,0\n15_right,4\n", ["10_left.jpeg", "15_right.jpg"]
    )
    records = _by_id(FORMAT_READERS["eyepacs"](labels, tmp_path / "images"))
    assert records["15_right"].diagnoses == {
        "dr_grade": "4",
        "diagnosis": "proliferative diabetic retinopathy",
    }
    assert records["15_right"].path.name == "15_right.jpg"


def test_odir_one_record_per_eye(tmp_path: Path) -> None:
    header = (
        "ID,Patient Age,Patient Sex,Left-Fundus,Right-Fundus,Left-Diagnostic Keywords,"
        "Right-Diagnostic Keywords,N,D,G,C,A,H,M,O\n"
    )
    labels = _write(
        tmp_path,
        header
        + "0,69,Female,0_left.jpg,0_right.jpg,cataract,normal fundus,0,0,0,1,0,0,0,0\n"
        + '1,57,Male,1_left.jpg,1_right.jpg,"moderate non proliferative retinopathy\uff0c'
        + 'glaucoma",suspected glaucoma,0,1,1,0,0,0,0,0\n',
        ["0_left.jpg", "0_right.jpg", "1_left.jpg", "1_right.jpg"],
    )
    records = _by_id(FORMAT_READERS["odir"](labels, tmp_path / "images"))
    assert len(records) == 4
    assert records["1_left"].diagnoses == {
        "diagnosis": "moderate non proliferative retinopathy, glaucoma",
        "glaucoma": "yes",
        "patient_diagnosis": "diabetic retinopathy, glaucoma",
    }
    assert records["1_right"].diagnoses["glaucoma"] == "suspected"
    assert records["0_right"].diagnoses == {
        "diagnosis": "normal fundus",
        "glaucoma": "no",
        "patient_diagnosis": "cataract",  # ODIR's flags are per patient
    }


def test_rfmid(tmp_path: Path) -> None:
    codes = list(RFMID_DISEASES)
    assert len(codes) == 45
    flags = dict.fromkeys(codes, "0")
    row1 = {**flags, "DR": "1", "ODC": "1"}
    header = ",".join(["ID", "Disease_Risk", *codes])
    labels = _write(
        tmp_path,
        f"{header}\n1,1,{','.join(row1.values())}\n2,0,{','.join(flags.values())}\n",
        ["1.png", "2.png"],
    )
    records = _by_id(FORMAT_READERS["rfmid"](labels, tmp_path / "images"))
    assert records["1"].diagnoses == {
        "disease_risk": "yes",
        "diabetic_retinopathy": "yes",
        "diagnosis": "diabetic retinopathy, optic disc cupping",
    }
    assert records["2"].diagnoses == {
        "disease_risk": "no",
        "diabetic_retinopathy": "no",
        "diagnosis": "normal",
    }


def test_every_problem_is_reported_with_file_and_row(tmp_path: Path) -> None:
    labels = _write(
        tmp_path,
        "id_code,diagnosis\na,2\nb,7\nc,two\nmissing,1\na,0\n,1\n",
        ["a.png", "b.png", "c.png"],
    )
    with pytest.raises(ValueError) as raised:
        read_aptos(labels, tmp_path / "images")
    message = str(raised.value)
    assert message.startswith(f"{labels}: 5 bad row(s)")
    assert "row 3: column 'diagnosis': Input should be less than or equal to 4 (got '7')" in message
    assert "row 4: column 'diagnosis': Input should be a valid integer" in message
    assert (
        f"row 5: no image 'missing' in {tmp_path / 'images'} (tried missing.png, missing.PNG)"
        in message
    )
    assert "row 6: image 'a' is listed twice" in message
    assert "row 7: column 'id_code': String should have at least 1 character" in message


def test_wrong_file_and_missing_folder(tmp_path: Path) -> None:
    labels = _write(tmp_path, "image,level\n10_left,0\n", ["10_left.jpeg"])
    with pytest.raises(
        ValueError, match=r"not a aptos label file: no \['id_code', 'diagnosis'\] column"
    ):
        read_aptos(labels, tmp_path / "images")
    with pytest.raises(ValueError, match="no such image folder"):
        FORMAT_READERS["eyepacs"](labels, tmp_path / "nowhere")
    latin = tmp_path / "latin.csv"
    latin.write_bytes("id_code,diagnosis\nb\xe9,1\n".encode("latin-1"))
    with pytest.raises(ValueError, match="not UTF-8"):
        read_aptos(latin, tmp_path / "images")
