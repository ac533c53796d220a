"""The OpenAPI document (stable operation ids, examples, links) and Schemathesis against the service
with its API key: stateless requests to every operation, schema-valid and schema-violating, with
generated valid and hostile feature files; and stateful scenarios that follow the OpenAPI links from
a created job to its heatmaps and Deep Zoom tiles. Any status but 5xx passes."""

from __future__ import annotations

import io
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import h5py
import hypothesis
import numpy as np
import pytest
import schemathesis
from fastapi import FastAPI
from hypothesis import HealthCheck, given
from hypothesis import strategies as st
from hypothesis.errors import Unsatisfiable
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error

from wsi_mil.demo.synthetic import write_synthetic_slide
from wsi_mil.service import ServiceSettings, create_app

KEY = "fuzz-key"
#: examples per operation and mode in the stateless runs (the slow run takes ten times as many)
EXAMPLES_PER_OPERATION = 8
#: stateful scenarios and their longest length
SCENARIOS, STEPS = 25, 6
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
OPEN_OPERATIONS = {"GET /healthz", "GET /readyz", "GET /metrics", "GET /v1/jobs/{job_id}/viewer"}
#: the fuzz's small slide (36 tiles of 128 level-0 px), so that a job takes about a second
FUZZ_SLIDE = "small.tiff"
MODELS = ("lesion_abmil", "random_abmil")
TYPED_ATTRIBUTES = (
    "feature_dim",
    "tile_size_level0",
    "patch_size",
    "patch_size_level0",
    "downsample",
    "target_mpp",
    "slide_width",
    "encoder",
    "wsi_mil_format_version",
)
ATTRIBUTE_VALUES = st.one_of(
    st.integers(-3, 10**6),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=6),
    st.booleans(),
    st.lists(st.floats(0.25, 4.0), max_size=3),
)


@st.composite
def built_feature_files(draw: st.DrawFn) -> bytes:
    """An HDF5 bag of drawn shape and dtype, with or without coords, and drawn (often mistyped)
    attributes: what a careless or hostile client might send."""
    rows = draw(st.integers(0, 24))
    dim = draw(st.sampled_from((1, 31, 32, 64)))
    dtype = draw(st.sampled_from(("f2", "f4", "f8", "i4", "S4", "bool")))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    buffer = io.BytesIO()
    with h5py.File(buffer, "w") as handle:
        handle["features"] = rng.normal(size=(rows, dim)).astype(dtype)
        coords = draw(st.sampled_from(("grid", "none", "float", "short")))
        if coords != "none":
            count = rows - 1 if coords == "short" and rows else rows
            grid = np.stack([np.arange(count) % 6, np.arange(count) // 6], axis=1) * 128
            handle["coords"] = grid.astype("f4" if coords == "float" else "i8")
        for key in draw(st.lists(st.sampled_from(TYPED_ATTRIBUTES), unique=True, max_size=4)):
            target = handle["coords"] if "patch" in key and "coords" in handle else handle
            target.attrs[key] = draw(ATTRIBUTE_VALUES)
    return buffer.getvalue()


def feature_file_contents(valid: list[bytes], hostile: list[bytes]) -> st.SearchStrategy[bytes]:
    """Feature file bodies: valid files, the hostile ones, drawn ones, and valid files cut short."""
    return st.one_of(
        st.sampled_from(valid),
        st.sampled_from(hostile),
        built_feature_files(),
        st.tuples(st.sampled_from(valid), st.floats(0, 1)).map(
            lambda pair: pair[0][: int(len(pair[0]) * pair[1])]
        ),
    )


def install_strategies(
    schema: schemathesis.BaseSchema, files: st.SearchStrategy[bytes]
) -> None:
    """Give generated requests the served model names, the fuzz slide and feature files part of
    the time, and Deep Zoom addresses inside the pyramid, so they reach past the first 4xx."""

    def models(drawn: Any) -> st.SearchStrategy[Any]:
        return st.one_of(st.sampled_from(MODELS), st.just(drawn))

    @schema.hook
    def flatmap_body(context: schemathesis.HookContext, body: Any) -> st.SearchStrategy[Any]:
        label = context.operation.label if context.operation is not None else ""
        if not isinstance(body, dict):
            return st.just(body)
        if label == "POST /v1/predictions":
            return st.fixed_dictionaries(
                {**{k: st.just(v) for k, v in body.items()}, "file": files, "model": models(body.get("model"))}
            )
        if label == "POST /v1/jobs":  # half the time a job that runs
            runs = st.fixed_dictionaries({"model": st.sampled_from(MODELS), "slide_path": st.just(FUZZ_SLIDE)})
            return st.one_of(runs, st.just(body))
        return st.just(body)

    @schema.hook
    def flatmap_path_parameters(
        context: schemathesis.HookContext, path_parameters: dict[str, Any]
    ) -> st.SearchStrategy[dict[str, Any]]:
        if context.operation is None or "dzi_files" not in context.operation.path:
            return st.just(path_parameters)
        # the 768-px slide's pyramid: levels 0..10, tile 0_0 on each, 4 x 4 tiles on the last
        inside = st.one_of(
            st.fixed_dictionaries({"level": st.integers(0, 10), "col": st.just(0), "row": st.just(0)}),
            st.fixed_dictionaries({"level": st.just(10), "col": st.integers(0, 3), "row": st.integers(0, 3)}),
        )
        return st.one_of(st.just(path_parameters), inside.map(lambda a: {**path_parameters, **a}))


@pytest.fixture(scope="module")
def fuzz_app(
    tmp_path_factory: pytest.TempPathFactory, lesion_models_dir: Path, job_waiter
) -> Iterator[FastAPI]:
    """The service with an API key, a small slide under its slide root and one finished job on it."""
    slides = tmp_path_factory.mktemp("fuzz_slides")
    write_synthetic_slide(
        slides / FUZZ_SLIDE, width=768, height=768, mpp=0.5, seed=3, lesion_box=(256, 256, 256, 256)
    )
    settings = ServiceSettings(
        models_dir=lesion_models_dir,
        data_dir=tmp_path_factory.mktemp("fuzz_data"),
        slide_root=slides,
        api_key=KEY,
        workers=1,
        device="cpu",
        heatmap_max_size=256,
    )
    app = create_app(settings)
    # Schemathesis runs the app's lifespan once for the process; a second one (a TestClient's)
    # would start a second worker pool on the same data folder, which the service does not allow.
    with schemathesis.python.asgi.get_client(app) as client:
        client.headers["X-API-Key"] = KEY
        response = client.post("/v1/jobs", json={"model": "lesion_abmil", "slide_path": FUZZ_SLIDE})
        app.state.fuzz_job = job_waiter(client, response.json()["id"])
        assert app.state.fuzz_job["state"] == "done", app.state.fuzz_job
        yield app
    schemathesis.python.asgi.shutdown_lifespans()


@pytest.fixture(scope="module")
def fuzz_schema(fuzz_app: FastAPI, lesion_features: Path, hostile_files: dict) -> schemathesis.BaseSchema:
    schema = schemathesis.openapi.from_asgi("/openapi.json", fuzz_app)
    install_strategies(
        schema,
        feature_file_contents(
            [lesion_features.read_bytes()], [hostile.content for hostile in hostile_files.values()]
        ),
    )
    return schema


def test_operation_ids_are_stable_and_documented(fuzz_app: FastAPI) -> None:
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
    # a created, fetched or listed job links to every operation on it
    on_a_job = {
        method["operationId"]
        for path, item in spec["paths"].items()
        if path.startswith("/v1/jobs/{job_id}")
        for method in item.values()
    }
    for operation, status in (("jobs-create_job", "202"), ("jobs-get_job", "200"), ("jobs-list_jobs", "200")):
        links = operations[operation]["responses"][status]["links"]
        assert {link["operationId"] for link in links.values()} == on_a_job, operation


def _stateless_run(
    app: FastAPI, schema: schemathesis.BaseSchema, mode: GenerationMode, examples: int
) -> tuple[Counter[tuple[str, int]], set[str]]:
    """Every operation with the key (and again without it: refused), and in positive mode every
    operation on a job once more on the finished fuzz job. Returns the statuses seen, and the
    operations without inputs to vary."""
    statuses: Counter[tuple[str, int]] = Counter()
    without_inputs = set()
    done_job = {"job_id": app.state.fuzz_job["id"]}
    for result in schema.get_all_operations():
        operation = result.ok()
        passes: list[dict[str, str] | None] = [None]
        if mode is GenerationMode.POSITIVE and "{job_id}" in operation.path and operation.method != "delete":
            passes.append(done_job)
        for path_parameters in passes:

            @given(case=operation.as_strategy(generation_mode=mode, path_parameters=path_parameters))
            @hypothesis.settings(
                max_examples=examples,
                deadline=None,
                suppress_health_check=list(HealthCheck),
                database=None,
                derandomize=True,
            )
            def call(case: schemathesis.Case) -> None:
                response = case.call_and_validate(headers={"X-API-Key": KEY}, checks=[not_a_server_error])
                statuses[(case.operation.label, response.status_code)] += 1
                if case.operation.label not in OPEN_OPERATIONS:  # a generated key, or none, is refused
                    anonymous = case.call()
                    unrouted = anonymous.status_code == 404 and anonymous.json()["detail"] == "Not Found"
                    assert anonymous.status_code in (401, 403) or unrouted, case.operation.label

            try:
                call()
            except Unsatisfiable:  # nothing to vary in an operation without inputs
                without_inputs.add(operation.label)
    return statuses, without_inputs


@pytest.mark.parametrize(
    "mode", [GenerationMode.POSITIVE, GenerationMode.NEGATIVE], ids=["positive", "negative"]
)
def test_fuzzed_requests_never_get_a_server_error(
    fuzz_app: FastAPI, fuzz_schema: schemathesis.BaseSchema, mode: GenerationMode
) -> None:
    statuses, without_inputs = _stateless_run(fuzz_app, fuzz_schema, mode, EXAMPLES_PER_OPERATION)
    assert without_inputs <= {"GET /healthz", "GET /readyz", "GET /metrics", "GET /v1/models"}
    if mode is GenerationMode.POSITIVE:  # feature files reached the model or were refused; the job's outputs were drawn
        for label, status in (
            ("POST /v1/predictions", 200),
            ("POST /v1/predictions", 422),
            ("GET /v1/jobs/{job_id}/heatmap.png", 200),
            ("GET /v1/jobs/{job_id}/dzi_files/{level}/{col}_{row}.jpeg", 200),
            ("GET /v1/jobs/{job_id}/top-tiles/{rank}.png", 200),
        ):
            assert statuses[(label, status)], (label, status, sorted(statuses.items()))


def _wait_for(store: Any, job_id: str) -> None:
    deadline = time.monotonic() + 60
    while (job := store.get(job_id)) is not None and job.state in ("queued", "running"):
        assert time.monotonic() < deadline, job
        time.sleep(0.05)


def _stateful_run(
    app: FastAPI, schema: schemathesis.BaseSchema, scenarios: int, steps: int
) -> Counter[tuple[str, int]]:
    """Scenarios on the job operations (but delete) that follow the OpenAPI links from a created,
    listed or fetched job to its outputs. Each created job is waited for, so the links after it meet a
    finished job, and each scenario starts from the same state: the fuzz job alone (made again if
    a scenario deleted it). Returns the statuses seen."""
    statuses: Counter[tuple[str, int]] = Counter()

    def reset() -> None:
        # the client (re)starts the app's lifespan if Schemathesis ended it; the store is that run's
        with schemathesis.python.asgi.get_client(app) as client:
            client.headers["X-API-Key"] = KEY
            store = app.state.store
            jobs = store.list_jobs(limit=1000)
            for job in jobs:
                if job.id != app.state.fuzz_job["id"] and job.state in ("queued", "running"):
                    store.request_cancel(job.id, ttl_seconds=0)
            if app.state.fuzz_job["id"] not in {job.id for job in jobs}:
                created = client.post("/v1/jobs", json={"model": "lesion_abmil", "slide_path": FUZZ_SLIDE})
                app.state.fuzz_job = created.json()
            for job in store.list_jobs(limit=1000):
                _wait_for(store, job.id)
                if job.id != app.state.fuzz_job["id"]:
                    store.delete(job.id)

    # deleting is fuzzed statelessly; here it would only turn the links after it into 404s
    on_jobs = schema.include(path_regex=r"^/v1/jobs").exclude(method="DELETE")

    class ServiceScenarios(on_jobs.as_state_machine()):  # type: ignore[misc]
        def setup(self) -> None:
            reset()

        def before_call(self, case: schemathesis.Case) -> None:
            case.headers = {**(case.headers or {}), "X-API-Key": KEY}

        def after_call(self, response: schemathesis.Response, case: schemathesis.Case) -> None:
            statuses[(case.operation.label, response.status_code)] += 1
            if case.operation.label == "POST /v1/jobs" and response.status_code == 202:
                _wait_for(app.state.store, response.json()["id"])

        def validate_response(
            self, response: schemathesis.Response, case: schemathesis.Case, **kwargs: Any
        ) -> None:
            case.validate_response(response, checks=[not_a_server_error])

    ServiceScenarios.run(
        settings=hypothesis.settings(
            max_examples=scenarios,
            stateful_step_count=steps,
            deadline=None,
            suppress_health_check=list(HealthCheck),
            database=None,
            derandomize=True,
            phases=[hypothesis.Phase.generate],
        )
    )
    return statuses


def test_stateful_scenarios_follow_links_from_new_jobs_without_a_server_error(
    fuzz_app: FastAPI, fuzz_schema: schemathesis.BaseSchema
) -> None:
    statuses = _stateful_run(fuzz_app, fuzz_schema, SCENARIOS, STEPS)
    reached = {label for (label, status), _ in statuses.items() if status < 300}
    outputs = {label for label in reached if label.startswith("GET /v1/jobs/{job_id}/")}
    report = "\n".join(f"{label} {status}: {n}" for (label, status), n in sorted(statuses.items()))
    assert "POST /v1/jobs" in reached and len(outputs) >= 4, report


@pytest.mark.slow
@pytest.mark.parametrize(
    "mode", [GenerationMode.POSITIVE, GenerationMode.NEGATIVE], ids=["positive", "negative"]
)
def test_fuzz_at_ten_times_the_examples(
    fuzz_app: FastAPI, fuzz_schema: schemathesis.BaseSchema, mode: GenerationMode
) -> None:
    """`make test-slow` (or `pytest -m slow tests/service/test_openapi.py`): the same, ten times longer."""
    _stateless_run(fuzz_app, fuzz_schema, mode, 10 * EXAMPLES_PER_OPERATION)
    if mode is GenerationMode.POSITIVE:
        _stateful_run(fuzz_app, fuzz_schema, 10 * SCENARIOS, 2 * STEPS)


def test_fuzz_does_not_leave_files_behind(fuzz_app: FastAPI) -> None:
    data_dir = Path(fuzz_app.state.settings.data_dir)
    leftovers = (
        [p for p in (data_dir / "tmp").rglob("*") if p.is_file()]
        if (data_dir / "tmp").exists()
        else []
    )
    assert leftovers == []

