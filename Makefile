# Two commands do everything on a fresh machine: `make demo` and `make test`.
# Both depend on `make install`, which is idempotent (a stamp file guards it).
PYTHON ?= python3
VENV ?= .venv
# A CPU machine here gets torch 2.13.0 from local disk in seconds. On a GPU machine,
# the same pin from PyPI is a CUDA build; to choose another, e.g.:
#   make install TORCH_SPEC="torch==2.11.0 --index-url https://download.pytorch.org/whl/cu128"
TORCH_SPEC ?= torch==2.13.0
STAMP := $(VENV)/.installed
BIN := $(VENV)/bin

RECIPES := $(basename $(notdir $(filter-out recipes/tiny.yaml,$(wildcard recipes/*.yaml))))

.PHONY: install demo test bench-install clean $(addprefix recipe-,$(RECIPES))

install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/python -m pip install -q $(TORCH_SPEC)
	$(BIN)/python -m pip install -q -e ".[test]"
	touch $(STAMP)

demo: install
	$(BIN)/distill run recipes/tiny.yaml
	@sed -n '/^## Comparison/,/^## Differences/p' runs/tiny/report.md | sed '$$d'
	@echo "Full report: runs/tiny/report.md"

test: install
	$(BIN)/python -m pytest tests

bench-install: install
	$(BIN)/python -m pip install -q -e ".[bench]"

# make recipe-NAME runs recipes/NAME.yaml on real checkpoints (mistral-to-qwen,
# llama3.1-8b-to-qwen2.5-7b, qwen3-8b-to-llama3.1-8b, one-gpu-fast); each stops at once, naming what is missing.
$(addprefix recipe-,$(RECIPES)): recipe-%: install
	$(BIN)/distill run recipes/$*.yaml

clean:
	rm -rf $(VENV) runs build *.egg-info
