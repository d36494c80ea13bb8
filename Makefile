# Two commands do all the set-up: `make demo` and `make test` (see README.md).
PYTHON ?= python3
VENV   ?= .venv
PY      = $(VENV)/bin/python
PIP     = $(PY) -m pip
# The CPU build of torch; installing it first stops pip from pulling a multi-GB CUDA build.
TORCH  ?= torch==2.13.0

.PHONY: demo demo-tf test install install-tf install-models install-test system-deps clean

$(VENV)/bin/python:
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip

$(VENV)/.installed: $(VENV)/bin/python pyproject.toml
	$(PIP) install --quiet "$(TORCH)"
	$(PIP) install --quiet -e .
	touch $@

# System packages: Pango for WeasyPrint's PDF reports, and Chromium + poppler for the tests that open the
# report in a real browser and as PDF pages. Installed with apt-get when we are root on Debian/Ubuntu (as in
# CI); elsewhere install them yourself, or the browser test is skipped with its reason.
SYSTEM_PACKAGES = libpango-1.0-0 libpangoft2-1.0-0 libharfbuzz-subset0 fonts-dejavu-core chromium poppler-utils

system-deps:
	@if command -v apt-get >/dev/null 2>&1 && [ "$$(id -u)" = 0 ]; then \
	  missing=$$(for p in $(SYSTEM_PACKAGES); do dpkg -s $$p >/dev/null 2>&1 || echo $$p; done); \
	  if [ -n "$$missing" ]; then echo "apt-get install $$missing"; \
	    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $$missing >/dev/null) \
	    || echo "could not install $$missing: PDF or browser tests will be skipped"; fi; \
	else echo "not root with apt-get: install $(SYSTEM_PACKAGES) yourself for PDF reports and the browser test"; fi

# The tf backend (optional): TensorFlow from the extra, then tf-keras and TF-Privacy without their declared
# requirements, which are stale (they would pull TF < 2.16 and numpy < 2, or a Keras 3 TF-Privacy cannot import).
TF_NODEPS ?= tf-keras==2.21.0 tensorflow-privacy==0.9.0

$(VENV)/.installed-tf: $(VENV)/.installed
	$(PIP) install --quiet -e ".[tf]"
	$(PIP) install --quiet --no-deps $(TF_NODEPS)
	touch $@

# The tests cover the tf backend and the models extra (torchvision, timm, onnxruntime) too, so the test set-up
# installs them. torch stays the one installed above: the extra pins torchvision to its build. JAX-Privacy is the
# reference for the one-run bounds; without its declared requirements (JAX), which that comparison does not use.
JAX_PRIVACY ?= jax-privacy==2.0.0

$(VENV)/.installed-test: $(VENV)/.installed $(VENV)/.installed-tf
	$(PIP) install --quiet -e ".[test,models]" "$(TORCH)"
	$(PIP) install --quiet --no-deps $(JAX_PRIVACY)
	$(PY) -c 'import sys, torch; v = torch.__version__.split("+")[0]; want = "$(TORCH)".split("==")[-1]; sys.exit(0 if v == want else f"torch {torch.__version__} replaced torch {want}")'
	touch $@

install: $(VENV)/.installed

install-tf: $(VENV)/.installed-tf

# Architectures by name (torchvision:, timm:), .safetensors and ONNX models: pip install "privaudit[models]".
$(VENV)/.installed-models: $(VENV)/.installed
	$(PIP) install --quiet -e ".[models]" "$(TORCH)"
	touch $@

install-models: $(VENV)/.installed-models

install-test: $(VENV)/.installed-test

demo: install
	$(VENV)/bin/privaudit train-and-audit cxr --backend opacus

demo-tf: install-tf
	$(VENV)/bin/privaudit train-and-audit cxr --backend tf

test: system-deps install-test
	$(PY) -m pytest -n 2 --dist loadfile -q

clean:
	rm -rf $(VENV) runs .pytest_cache
