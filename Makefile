# Developer entry points. `make test` builds .venv on first use (then reuses it).
#   make venv                    .venv with the CPU torch 2.13.0 and requirements(-dev).txt
#   make TORCH_SPEC=torch test   the same with another torch (e.g. a CUDA build on a GPU machine)
#   make test | demo | bench     run the tests / the embedded demo / the benchmark (bench-quick: < 5 min)
#   make test-all                every test, the slow ones too (make test leaves out -m slow)
#   make demo-t2i                the text-conditional default: per prompt, vanilla vs balanced
#   make demo-dit                the same for the text-conditional transformer (DiT) default
#   make clean                   remove .venv and caches (outputs/ and runs/ are kept)
PYTHON ?= python3
TORCH_SPEC ?= torch==2.13.0
VENV := .venv
STAMP := $(VENV)/.deps-installed

.PHONY: venv test test-all demo demo-t2i demo-dit bench bench-quick clean

venv: $(STAMP)

# torch comes from TORCH_SPEC; requirements.txt's own torch pin is filtered out so that a
# TORCH_SPEC override is not replaced by the CPU pin. Delete the stamp (or `make clean`) to redo.
$(STAMP): requirements.txt requirements-dev.txt
	test -x $(VENV)/bin/python || $(PYTHON) -m venv $(VENV)
	$(VENV)/bin/python -m pip install --quiet "$(TORCH_SPEC)"
	grep -v '^torch\b' requirements.txt > $(VENV)/requirements-no-torch.txt
	$(VENV)/bin/python -m pip install --quiet -r $(VENV)/requirements-no-torch.txt -r requirements-dev.txt
	$(VENV)/bin/python -c 'import pathlib, sysconfig; pathlib.Path(sysconfig.get_paths()["purelib"], "balancing_act.pth").write_text("$(CURDIR)\n")'
	touch $(STAMP)

test: venv
	HF_HUB_OFFLINE=1 $(VENV)/bin/python -m pytest -q -m "not slow"

test-all: venv
	HF_HUB_OFFLINE=1 $(VENV)/bin/python -m pytest -q

demo: venv
	$(VENV)/bin/python main.py --demo --overwrite

demo-t2i: venv
	HF_HUB_OFFLINE=1 $(VENV)/bin/python main.py --config configs/digits16_t2i.yml --demo --overwrite --exp runs/demo_t2i

demo-dit: venv
	HF_HUB_OFFLINE=1 $(VENV)/bin/python main.py --config configs/digits16_dit.yml --demo --overwrite --exp runs/demo_dit

# bench: every run-list under bench/lists/ (every table the docs quote, the full-size ones too: many
# hours on a CPU). Entries whose output exists are skipped, so an interrupted run resumes; rerun one
# with `.venv/bin/python bench/run.py LIST --only ENTRY --overwrite`. bench-quick: bench/lists/quick.yml.
bench: venv
	HF_HUB_OFFLINE=1 $(VENV)/bin/python bench/run.py bench/lists/*.yml

bench-quick: venv
	HF_HUB_OFFLINE=1 $(VENV)/bin/python bench/run.py bench/lists/quick.yml

clean:
	rm -rf $(VENV) .pytest_cache
	find . -path ./.git -prune -o -type d -name __pycache__ -prune -exec rm -rf {} +
