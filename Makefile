# radstream: two commands from nothing.  `make demo` runs the whole job on the
# phantom; `make test` runs the suite.  Both create .venv on first use and
# reinstall only when pyproject.toml changes (stamp file).
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
# torch is pinned to the release this machine serves from its local store; on
# a GPU box the same pins fetch the matching CUDA build.
TORCH_PINS ?= torch==2.14.1 torchvision==0.29.1
DEMO_RAW ?= data/phantom
DEMO_SHARDS ?= shards/demo
DEMO_PER_CLASS ?= 300
DEMO_ARGS ?=
PYTEST_ARGS ?=

.PHONY: setup lint format test test-fast demo shortcut-demo robust-demo lungs-demo soak gpu-check mutation clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q $(TORCH_PINS)
	$(PY) -m pip install -q -e '.[dev]'
	touch $@

# Lint, format and structure (ruff; import-linter's contracts; sizes), all configured in pyproject.toml and
# tools/structure.py; `make test` runs it first, so CI enforces it.
lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/lint-imports --no-cache
	$(PY) -m tools.structure

format: $(STAMP)
	$(VENV)/bin/ruff check --fix .
	$(VENV)/bin/ruff format .

# pytest exits 5 when it collected nothing: that is a broken selection, not a pass.
test: lint
	$(PY) -m pytest -q $(PYTEST_ARGS); rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "pytest collected no tests: failing"; exit 1; fi; exit $$rc

test-fast: $(STAMP)
	$(PY) -m pytest -q -m "not slow" $(PYTEST_ARGS)

# The whole product on the phantom: films -> shards -> training -> report.
demo: $(STAMP)
	$(PY) -m sharding phantom --out $(DEMO_RAW) --per-class $(DEMO_PER_CLASS) --seed 0 --workers 2 --quiet
	$(PY) -m sharding build --raw $(DEMO_RAW) --out $(DEMO_SHARDS) --include-masks --shard-size 200 --workers 2
	rm -rf runs/demo  # the demo starts afresh; training refuses a folder that holds another run
	$(VENV)/bin/accelerate launch --cpu --num_processes 1 --num_machines 1 --mixed_precision no \
	  --dynamo_backend no train/main.py --config configs/demo.yaml $(DEMO_ARGS)
	@echo "demo: report runs/demo/report.md, figures runs/demo/*.png, model runs/demo/models/best_model.pth"

# Shortcut check: the same training on a phantom whose films carry class-correlated
# corner markers; the Grad-CAM lung share should fall against the clean demo.
shortcut-demo: $(STAMP)
	@test -f runs/demo/report.json || $(MAKE) demo
	$(PY) -m sharding phantom --out data/phantom_markers --per-class $(DEMO_PER_CLASS) --seed 0 --workers 2 --quiet --markers
	$(PY) -m sharding build --raw data/phantom_markers --out shards/demo_markers --include-masks --shard-size 200 --workers 2
	rm -rf runs/demo_markers
	$(VENV)/bin/accelerate launch --cpu --num_processes 1 --num_machines 1 --mixed_precision no \
	  --dynamo_backend no train/main.py --config configs/demo.yaml data.shards=shards/demo_markers \
	  train.output_dir=runs/demo_markers $(DEMO_ARGS)
	$(PY) -m evaluation --compare runs/demo runs/demo_markers

# The unseen-site ablation (docs/robustness.md): the phantom with sites, one run per recipe component and
# configs/robust.yaml's components together, each tested internally and at an unseen hospital. ~15 min, 2 cores.
robust-demo: $(STAMP)
	$(PY) -m tools.robust_demo --out runs/robust_demo $(ROBUST_ARGS)

# The lung segmenter on the phantom with sites: its Dice inside and at an unseen hospital, and the robust
# recipe there with drawn and with predicted masks (docs/robustness.md; about 9 minutes on 2 CPU cores).
lungs-demo: $(STAMP)
	$(PY) -m tools.lungs_demo --out runs/lungs_demo $(LUNGS_ARGS)

SOAK_RAW ?= data/soak
SOAK_SHARDS ?= shards/soak
SOAK_ARGS ?=

# 10 epochs on the full-size phantom (21,165 films) at 32 px on one CPU process: per-epoch RSS,
# open fds and steps must stay flat (tests/helpers/soak.py). About 25 min on 2 cores, plus ~5 min of data prep.
soak: $(STAMP)
	$(PY) -m sharding phantom --out $(SOAK_RAW) --full-size --seed 0 --workers 2 --quiet
	$(PY) -m sharding build --raw $(SOAK_RAW) --out $(SOAK_SHARDS) --workers 2 --quiet
	PYTHONPATH=tests $(PY) -m helpers.soak --shards $(SOAK_SHARDS) --out runs/soak --epochs 10 --image-size 32 \
	  --num-workers 1 --json runs/soak/soak.json $(SOAK_ARGS)

# One command on a fresh GPU machine (docs/gpu.md): full-size phantom -> shards -> tools.bench_pipeline (1/4/8
# workers) -> tools.bench_train (299 px; bf16, fp16; compile off/on) -> two bf16 epochs -> pytest -m gpu, every
# figure in runs/gpu_check/gpu_check.{json,md}; under 8 minutes on one H100. It runs with the Python that has
# the dependencies (the GPU image's, or .venv when present) and no setup stamp, which would reinstall torch.
# On a CPU: make gpu-check GPU_CHECK_ARGS=--dry-run (toy sizes, about a minute).
GPU_PYTHON ?= $(if $(wildcard $(PY)),$(PY),python3)
GPU_CHECK_ARGS ?=

# Mutation testing of the core modules (pyproject's [tool.mutmut]); not part of `make test` (an hour on 2
# cores). MODULE=sharding/split.py runs one module. Scores and equivalent mutants: docs/testing.md.
mutation: $(STAMP)
	.venv/bin/mutmut run $(if $(MODULE),"$(subst /,.,$(basename $(MODULE))).*")
	$(PY) -m tools.mutation_report $(if $(MODULE),--module $(MODULE)) --survivors

gpu-check:
	$(GPU_PYTHON) -m tools.gpu_check $(GPU_CHECK_ARGS)

clean:
	rm -rf data runs shards/*/ .pytest_cache mutants
