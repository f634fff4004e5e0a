# Two set-up commands: `make demo` and `make test`. Both create .venv first.
VENV   ?= .venv
PY     := $(VENV)/bin/python
PYTHON ?= python3
# CPU build of torch (a wheel already on disk here) unless the machine has a GPU;
# GPU users get pip's default CUDA build, or set TORCH=... themselves.
TORCH  ?= $(shell command -v nvidia-smi >/dev/null 2>&1 && echo torch || echo torch==2.13.0)
PYTEST_ARGS ?=
# Nodes of the local test cluster (slurm/cluster.sh); the multi-node tests need 2.
SLURM_NODES ?= 2

.PHONY: env demo test test-serial test-lanes test-fast cluster-up cluster-down bench clean

env: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check "$(TORCH)"
	$(PY) -m pip install -q --disable-pip-version-check -e ".[train,dev,wandb,tensorboard]"
	$(PY) -m pip install -q --disable-pip-version-check --no-deps "lm-eval==0.4.13"
	# DeepSpeed compiles its CPU communication op on first use (~60 s): do it once here,
	# not inside the first job.
	command -v nvidia-smi >/dev/null 2>&1 || DS_ACCELERATOR=cpu $(PY) -c "from deepspeed.accelerator \
	  import get_accelerator as a; a().create_op_builder('ShareMemCommBuilder').load()" >/dev/null
	touch $@

demo: env
	$(VENV)/bin/budgetlab --ledger runs/demo/ledger.db --workdir runs/demo run jobs/quickstart.toml

cluster-up:
	BUDGETLAB_SLURM_NODES=$(SLURM_NODES) bash slurm/cluster.sh up

cluster-down:
	BUDGETLAB_SLURM_NODES=$(SLURM_NODES) bash slurm/cluster.sh down

# The whole suite, real SLURM included: the cluster is started first, then the tests run in
# two lanes side by side (tests/lanes.sh): the SLURM and fault tests on this cluster; the
# fault campaign on a second cluster the script starts, then the CPU tests. The CPUs were
# idle a third of a serial run (SLURM's waits); the lanes fill that.
test: env cluster-up
	set -a; eval "$$(BUDGETLAB_SLURM_NODES=$(SLURM_NODES) bash slurm/cluster.sh env)"; set +a; \
	bash tests/lanes.sh $(PY) $(PYTEST_ARGS)

# The same tests in one pytest run, one after the other (slower; a single log, -x works).
test-serial: env cluster-up
	set -a; eval "$$(BUDGETLAB_SLURM_NODES=$(SLURM_NODES) bash slurm/cluster.sh env)"; set +a; \
	DS_ACCELERATOR=cpu $(PY) -m pytest -q -rs $(PYTEST_ARGS)

# Former name of `make test`.
test-lanes: test

# Without the cluster and the slow tests: the inner loop while editing.
test-fast: env
	DS_ACCELERATOR=cpu $(PY) -m pytest -q -m "not slow and not slurm and not fault" $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) runs ledger.db
