# Set-up is part of every target: uv is installed if missing, the locked environment is synced.
SHELL := /bin/bash
# Install packages with their bytecode compiled (once, ~30 s on 2 cores): where Python may not write
# .pyc files (PYTHONDONTWRITEBYTECODE, read-only installs) every process would otherwise compile
# torch, timm and the rest from source again, several seconds per start.
export UV_COMPILE_BYTECODE := 1
UV := $(shell command -v uv 2>/dev/null || echo "python3 -m uv")
DEMO_DIR ?= demo_out

.PHONY: demo test test-slow docker-smoke lint bench-preprocess bench-models bench-service bench-training bench-mil bench-scmil mil-checks uv

uv:
	@command -v uv >/dev/null 2>&1 || python3 -m uv --version >/dev/null 2>&1 || \
	  python3 -m pip install -q uv 2>/dev/null || python3 -m pip install -q --user uv 2>/dev/null || \
	  python3 -m pip install -q --user --break-system-packages uv

demo: uv
	@bash scripts/setup-extras.sh
	$(UV) run --locked wsi-mil demo --out $(DEMO_DIR)

test: uv
	@bash scripts/setup-extras.sh --browser
	$(UV) run --locked --extra dev pytest -q

test-slow: uv
	$(UV) run --locked --extra dev pytest -q -m slow

# Build docker/Dockerfile (CPU), run it and check it from outside; needs podman or docker.
docker-smoke: uv
	bash scripts/docker-smoke.sh

lint: uv
	$(UV) run --locked --extra dev ruff check wsi_mil tests benchmarks

bench-preprocess: uv
	uptime
	$(UV) run --locked python benchmarks/bench_preprocess.py --workers-sweep 256 --rss
	$(UV) run --locked python benchmarks/bench_allocators.py
	uptime

bench-models: uv
	$(UV) run --locked python benchmarks/bench_models.py

bench-training: uv
	$(UV) run --locked python benchmarks/bench_training.py

bench-mil: uv
	$(UV) run --locked python benchmarks/bench_mil_benchmarks.py

bench-scmil: uv
	$(UV) run --locked python benchmarks/bench_scmil.py --jobs 2

bench-service: uv
	$(UV) run --locked python benchmarks/bench_service.py

mil-checks: uv
	$(UV) run --locked python benchmarks/mil_checks_table.py --json benchmarks/results/mil_checks.json --doc docs/mil-checks.md
