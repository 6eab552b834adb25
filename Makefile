# rlft: the README's two commands are `make demo` and `make test`.
VENV   ?= .venv
PY     := $(VENV)/bin/python
# torch/torchvision pinned to the builds that work on this project's machines (CUDA build, runs on CPU).
TORCH  ?= torch==2.14.1 torchvision==0.29.1
PYTEST_ARGS ?=

.PHONY: demo test bench install install-dev clean

$(PY):
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip

$(VENV)/.installed: pyproject.toml | $(PY)
	$(PY) -m pip install -q $(TORCH)
	$(PY) -m pip install -q -e .
	touch $@

$(VENV)/.installed-dev: pyproject.toml $(VENV)/.installed
	$(PY) -m pip install -q -e '.[dev]'
	touch $@

install: $(VENV)/.installed
install-dev: $(VENV)/.installed-dev

# Embedded quickstarts: SFT warm-up (cached) then GRPO, on arithmetic (text) and shapes detection
# (vision, Visual-RFT rewards, COCO mAP); then the diffusion one (pre-trained tiny pipeline, PRDP) and
# an RLG sweep between its base and its RL checkpoint. Each prints its summary.
demo: install
	$(VENV)/bin/rlft train configs/llm/arithmetic_grpo.yaml
	$(VENV)/bin/rlft train configs/vision/shapes_detection_grpo.yaml
	$(VENV)/bin/rlft train configs/diffusion/shapes_prdp.yaml
	$(VENV)/bin/rlft sample configs/diffusion/shapes_prdp.yaml checkpoint=latest 'ws=[0,0.5,1,1.5,2,3]'

test: install-dev
	$(PY) -m pytest -q $(PYTEST_ARGS)

# Speed/memory ratios against baselines measured in the same run (tables printed, JSON in benchmarks/results/),
# then the README's benchmark table regenerated from those JSONs. bench_grpo_step.py compares with TRL, a
# benchmark-only dependency (pip install -e '.[bench]'); without it that row says "skipped".
bench: install
	$(PY) benchmarks/bench_logprobs.py
	$(PY) benchmarks/bench_diffusion.py
	$(PY) benchmarks/bench_sandbox.py
	$(PY) benchmarks/bench_packing.py
	$(PY) benchmarks/bench_shared_prompt.py
	$(PY) benchmarks/bench_grpo_step.py
	$(PY) benchmarks/bench_rollout.py
	$(PY) benchmarks/bench_vlm_rollout.py
	$(PY) scripts/bench_readme.py

clean:
	rm -rf runs/.cache
