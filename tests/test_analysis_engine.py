"""The analysis pipeline with the committed models, in-process and over gRPC."""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

import grpc
import numpy as np
import pytest
from PIL import Image
from skimage import data as skdata

from protos.retinal.v1 import analysis_pb2, analysis_pb2_grpc, common_pb2
from services.analysis.engine.analyzer import Analyzer
from services.analysis.settings import AnalysisSettings
from services.lesion.engine.detector import DEFAULT_WEIGHTS as LESION_WEIGHTS
from shared import findings, pixels
from shared.imaging import ingest
from shared.synthetic import SyntheticFundusSpec, generate_fundus
from tests.conftest import DATASETS, Stack


@pytest.fixture(scope="module")
def analyzer() -> Analyzer:
    return Analyzer.load(AnalysisSettings().weights_dir)


def _png(rgb: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(rgb).save(buffer, format="PNG")
    return buffer.getvalue()


def _states(found: findings.Findings) -> dict[str, str]:
    return {s.stage: s.state.value for s in found.stages if s.state is not None}


@pytest.fixture(scope="module")
def drive_image() -> bytes:
    path = DATASETS / "DRIVE" / "test" / "images" / "01_test.tif"
    if not path.exists():
        pytest.skip("datasets are absent")
    return path.read_bytes()


def test_a_real_photograph_gets_every_stage_and_feature(
    analyzer: Analyzer, drive_image: bytes
) -> None:
    image = ingest(drive_image)
    result = analyzer.analyze(image.rgb, image.info)
    found = result.findings
    assert found.quality is not None and found.quality.grade != findings.QualityGrade.REJECT
    states = _states(found)
    assert states["quality"] == states["vessels"] == states["features"] == "ok"
    assert found.vessels is not None
    whole = next(
        f
        for f in found.vessels.features
        if f.vessel_type == findings.VesselType.ALL and f.region == findings.Region.WHOLE
    )
    assert whole.fractal_dimension is not None and 1.3 < whole.fractal_dimension < 1.8
    assert whole.vessel_density is not None and 0.05 < whole.vessel_density < 0.2
    assert {m.name for m in found.models} >= {"quality", "vessel-av-unet"}
    assert all(len(m.sha256) == 64 for m in found.models)
    assert result.layers["vessel"].shape == image.rgb.shape[:2]


@pytest.mark.parametrize("name", ["coffee", "rocket", "clock", "brick", "page"])
def test_non_fundus_photographs_are_rejected_with_reasons_and_nothing_measured(
    analyzer: Analyzer, name: str
) -> None:
    photo = getattr(skdata, name)()
    if photo.ndim == 2:
        photo = np.stack([photo] * 3, axis=-1)
    image = ingest(_png(photo[..., :3].astype(np.uint8)))
    found = analyzer.analyze(image.rgb, image.info).findings
    assert found.quality is not None
    assert found.quality.grade == findings.QualityGrade.REJECT
    assert found.quality.reasons
    assert found.vessels is None and found.disc is None and found.fovea is None
    assert {_states(found)[s] for s in ("vessels", "disc", "fovea", "features")} == {"skipped"}


def test_a_heavily_blurred_photograph_is_rejected_as_blurred(
    analyzer: Analyzer, drive_image: bytes
) -> None:
    from scipy import ndimage

    rgb = np.asarray(Image.open(io.BytesIO(drive_image)).convert("RGB")).astype(np.float32)
    blurred = ndimage.gaussian_filter(rgb, (14, 14, 0)).astype(np.uint8)
    image = ingest(_png(blurred))
    found = analyzer.analyze(image.rgb, image.info).findings
    assert found.quality is not None
    assert found.quality.grade == findings.QualityGrade.REJECT
    assert any("blur" in reason or "contrast" in reason for reason in found.quality.reasons)
    assert found.vessels is None


def test_the_service_returns_findings_models_and_overlays(backends: Stack) -> None:
    fundus = generate_fundus(SyntheticFundusSpec(), seed=3)
    image = ingest(_png(fundus.rgb))
    request = analysis_pb2.AnalyzeRequest(
        image=pixels.to_message(image.rgb, image.info), overlays=["combined", "vessels"]
    )
    with grpc.insecure_channel(backends.address("analysis")) as channel:
        stub = analysis_pb2_grpc.AnalysisServiceStub(channel)
        reply = stub.Analyze(request, timeout=120)
        cards = stub.ListModels(common_pb2.ListModelsRequest(), timeout=10)
        with pytest.raises(grpc.RpcError) as error:
            stub.Analyze(
                analysis_pb2.AnalyzeRequest(image=request.image, overlays=["nope"]), timeout=10
            )
    assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert reply.findings.image.content_sha256 == image.info.content_sha256
    assert [o.layer for o in reply.overlays] == ["combined", "vessels"]
    overlay = Image.open(io.BytesIO(reply.overlays[0].png))
    assert overlay.size == (image.rgb.shape[1], image.rgb.shape[0])
    names = {card.name for card in cards.models}
    assert {"quality", "vessel-av-unet"} <= names
    assert {m.name for m in reply.findings.models} == names


def test_retinal_analyze_writes_jsonl_csv_and_input_sized_masks(
    tmp_path: Path, drive_image: bytes
) -> None:
    from typer.testing import CliRunner

    from cli.main import app

    folder = tmp_path / "in"
    folder.mkdir()
    (folder / "eye.tif").write_bytes(drive_image)
    (folder / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really")
    out, table, masks = tmp_path / "f.jsonl", tmp_path / "f.csv", tmp_path / "masks"
    run = CliRunner().invoke(
        app,
        [
            "analyze",
            str(folder),
            "--output",
            str(out),
            "--csv",
            str(table),
            "--save-masks",
            str(masks),
        ],
    )
    assert run.exit_code == 0, run.output
    records = {Path(r["source"]).name: r for r in map(json.loads, out.read_text().splitlines())}
    assert records["broken.jpg"]["error"]["code"] in {"truncated", "corrupt"}
    assert records["eye.tif"]["findings"]["vessels"]["features"]
    header = table.read_text().splitlines()[0].split(",")
    assert {"source", "Fractal_dimension", "Artery_Average_width", "CRAE_Knudtson_zone_b"} <= set(
        header
    )
    vessel = Image.open(masks / "eye_vessel.png")
    assert vessel.size == (565, 584)
    assert set(np.unique(np.asarray(vessel))) <= {0, 255}
    assert (masks / "eye_vessel_prob.png").exists() and (masks / "eye_artery.png").exists()
    found = records["eye.tif"]["findings"]
    # Only the types the served lesion model reports are counted, masked and put in the CSV.
    manifest = json.loads(LESION_WEIGHTS.with_suffix(".json").read_text())
    reported = manifest.get("reported_types", ["ma", "he", "ex", "se"])
    names = {"ma": "microaneurysm", "he": "haemorrhage", "ex": "hard_exudate", "se": "soft_exudate"}
    assert [c["type"] for c in found["lesion_counts"]] == [names[short] for short in reported]
    assert found["assessment"]["reasons"]
    assert {"lesion-unet"} <= {m["name"] for m in found["models"]}
    row = {Path(r["source"]).name: r for r in csv.DictReader(table.open())}["eye.tif"]
    counts = {c["type"]: c["count"] for c in found["lesion_counts"]}
    for short, name in names.items():
        if short in reported:
            assert int(row[f"{short}_count"]) == counts[name]
            lesion_mask = Image.open(masks / f"eye_{short}.png")
            assert lesion_mask.size == (565, 584)
            assert set(np.unique(np.asarray(lesion_mask))) <= {0, 255}
        else:  # not assessed: no number and no mask, never a zero
            assert row[f"{short}_count"] == ""
            assert not (masks / f"eye_{short}.png").exists()
    grade = found["assessment"].get("dr_grade")
    assert row["dr_grade"] == ("" if grade is None else str(grade))


def test_retinal_features_measures_given_masks(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from cli.main import app

    fundus = generate_fundus(SyntheticFundusSpec(cdr_vertical=0.6), seed=1)
    paths = {}
    for name in ("vessel", "artery", "vein", "disc", "cup"):
        paths[name] = tmp_path / f"{name}.png"
        mask = getattr(fundus, f"{name}_mask")
        Image.fromarray(mask.astype(np.uint8) * 255).save(paths[name])
    args = ["features"] + [
        item for name, path in paths.items() for item in (f"--{name}-mask", str(path))
    ]
    run = CliRunner().invoke(app, args)
    assert run.exit_code == 0, run.output
    columns = json.loads(run.stdout)["columns"]
    assert columns["CDR_vertical"] == pytest.approx(fundus.cdr_vertical_drawn, abs=0.02)
    assert columns["Artery_Fractal_dimension"] is not None
