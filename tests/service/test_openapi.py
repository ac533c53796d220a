"""The OpenAPI document: stable operation ids, examples, and a bounded Schemathesis fuzz with no 5xx."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import schemathesis
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, given, settings
from hypothesis.errors import Unsatisfiable
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error

from wsi_mil.service import ServiceSettings, create_app

EXAMPLES_PER_OPERATION = 10
EXAMPLES_ON_THE_DONE_JOB = 30
EXPECTED_OPERATIONS = {
    "models-list_models",
    "models-get_model",
    "predictions-create_prediction",
    "jobs-create_job",
    "jobs-list_jobs",
    "jobs-get_job",
    "jobs-cancel_job",
    "jobs-delete_job",
    "heatmaps-get_heatmap_png",
    "heatmaps-get_heatmap_legend",
    "heatmaps-get_heatmap_geojson",
    "heatmaps-get_scores",
    "heatmaps-list_top_tiles",
    "heatmaps-get_top_tile_png",
    "viewer-get_dzi",
    "viewer-get_dzi_tile",
    "viewer-get_viewer",
    "health-healthz",
    "health-readyz",
    "health-metrics",
}


@pytest.fixture(scope="module")
def fuzz_app(
    tmp_path_factory: pytest.TempPathFactory, lesion_models_dir: Path, lesion_slide, job_waiter
) -> Iterator:
    """The app with one finished job, whose id the fuzz also uses (so heatmap options meet real data)."""
    settings = ServiceSettings(
        models_dir=lesion_models_dir,
        data_dir=tmp_path_factory.mktemp("fuzz_data"),
        slide_root=lesion_slide.root,
        workers=1,
        device="cpu",
    )
    app = create_app(settings)
    with TestClient(app) as client:
        response = client.post(
            "/v1/jobs", json={"model": "lesion_abmil", "slide_path": "lesion.tiff"}
        )
        app.state.fuzz_job = job_waiter(client, response.json()["id"])
        assert app.state.fuzz_job["state"] == "done"
        yield app


@pytest.fixture(scope="module")
def fuzz_schema(fuzz_app) -> schemathesis.BaseSchema:
    return schemathesis.openapi.from_asgi("/openapi.json", fuzz_app)


def test_operation_ids_are_stable_and_documented(fuzz_app) -> None:
    spec = fuzz_app.openapi()
    operations = {op["operationId"]: op for path in spec["paths"].values() for op in path.values()}
    assert set(operations) == EXPECTED_OPERATIONS
    assert all(op.get("summary") for op in operations.values())
    schemas = spec["components"]["schemas"]
    for name in ("PredictionPublic", "JobPublic", "ModelPublic", "ErrorPublic", "ScoresPublic"):
        assert schemas[name].get("examples"), f"{name} has no example"
    body = operations["jobs-create_job"]["requestBody"]["content"]
    assert set(body) == {
        "application/json",
        "multipart/form-data",
        "application/x-www-form-urlencoded",
    }
    assert body["application/json"]["schema"]["examples"]
    assert "X-API-Key" in str(spec["components"]["securitySchemes"])


@pytest.mark.parametrize(
    "mode", [GenerationMode.POSITIVE, GenerationMode.NEGATIVE], ids=["positive", "negative"]
)
def test_fuzzed_requests_never_get_a_server_error(
    fuzz_app, fuzz_schema: schemathesis.BaseSchema, mode: GenerationMode
) -> None:
    """Schema-valid and schema-violating requests to every operation: any status but 5xx."""
    operations = [result.ok() for result in fuzz_schema.get_all_operations()]
    assert len(operations) == len(EXPECTED_OPERATIONS)
    done_job = {"job_id": fuzz_app.state.fuzz_job["id"]}
    without_inputs = set()
    for operation in operations:
        passes: list[tuple[dict | None, dict | None, int]] = [(None, None, EXAMPLES_PER_OPERATION)]
        if (
            mode is GenerationMode.POSITIVE
            and "{job_id}" in operation.path
            and operation.method != "delete"
        ):
            # the finished job too, with small images so rendering stays fast
            query = {"max_size": 128} if operation.path.endswith("heatmap.png") else None
            passes.append((done_job, query, EXAMPLES_ON_THE_DONE_JOB))
        for path_parameters, query, examples in passes:

            @given(
                case=operation.as_strategy(
                    generation_mode=mode, path_parameters=path_parameters, query=query
                )
            )
            @settings(
                max_examples=examples,
                deadline=None,
                suppress_health_check=list(HealthCheck),
                database=None,
            )
            def call(case: schemathesis.Case) -> None:
                case.call_and_validate(checks=[not_a_server_error])

            try:
                call()
            except Unsatisfiable:  # nothing to break in an operation without inputs
                without_inputs.add(operation.label)
    assert without_inputs <= {"GET /healthz", "GET /readyz", "GET /metrics", "GET /v1/models"}


def test_fuzz_does_not_leave_files_behind(fuzz_app) -> None:
    data_dir = Path(fuzz_app.state.settings.data_dir)
    leftovers = (
        [p for p in (data_dir / "tmp").rglob("*") if p.is_file()]
        if (data_dir / "tmp").exists()
        else []
    )
    assert leftovers == []
