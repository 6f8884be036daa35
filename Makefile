# Two commands do everything on a fresh Debian machine: `make run` and `make test`.
# Each first installs what is missing (apt packages FFCV builds against, a
# virtualenv in .venv with fastcifar and its extras), then does its job;
# re-running them skips what is already installed.

VENV := .venv
PY := $(VENV)/bin/python
FASTCIFAR := $(VENV)/bin/fastcifar
STAMP := $(VENV)/.fastcifar-installed
APT_PACKAGES := pkg-config libturbojpeg0-dev libopencv-dev
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
# A local CIFAR-10 copy (cifar-10-batches-py folder or tarball); empty: look under $FASTCIFAR_DATA, then download.
CIFAR_SOURCE ?= $(wildcard ../shared/data/cifar-10-batches-py)
export FASTCIFAR_DATA ?= $(CURDIR)/data

.PHONY: run test setup system-deps betons bench clean gpu-wheels gpu-data gpu-check-dry

# The main job: betons, then the speed recipe under an 8-minute training budget (as many of its 8 epochs as
# fit on this machine), then its analysis; a complete run is kept, a partial one resumed.
run: betons
	$(FASTCIFAR) sweep configs/speed94.yaml --set train.budget=8m --out runs/make_run

test: setup
	$(PY) -m pytest -q -n 2 --dist loadfile --no-loadscope-reorder --durations=10

setup: $(STAMP)

betons: setup
	@if [ -f $(FASTCIFAR_DATA)/cifar10/manifest.json ]; then \
		echo "betons present in $(FASTCIFAR_DATA)/cifar10"; \
	else \
		$(FASTCIFAR) beton write --dataset cifar10 $(if $(CIFAR_SOURCE),--source $(CIFAR_SOURCE)) --force; \
	fi

system-deps:
	@if pkg-config --exists libturbojpeg 2>/dev/null && (pkg-config --exists opencv4 || pkg-config --exists opencv); then \
		echo "system packages present"; \
	else \
		$(SUDO) apt-get update -qq && DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq $(APT_PACKAGES); \
	fi

$(STAMP): pyproject.toml | system-deps
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip setuptools wheel
	# torch first, pinned: the build served from this machine's disk
	$(PY) -m pip install -q torch==2.14.1 torchvision==0.29.1
	$(PY) -m pip install -q -e '.[dev,bench]'
	touch $(STAMP)

clean:
	rm -rf $(VENV) *.egg-info .pytest_cache

# The GPU check (docs/gpu.md, "Running the GPU check"): what travels to a GPU machine that has torch but no
# FFCV, grad-cam or ttach and no network. gpu-wheels: FFCV built for GPU_PYTHON (its Python version) with
# libturbojpeg and OpenCV inside, grad-cam, ttach and fastcifar, into .whl/; gpu-data: the first
# GPU_TRAIN training and GPU_TEST test images of CIFAR-10, compressed, into .gpu/ (the whole set is too large
# to travel); gpu-check-dry: the check's dry run on this machine's CPU.
GPU_PYTHON ?= $(firstword $(wildcard /root/.pyenv/versions/3.12.*/bin/python) python3.12)
GPU_TRAIN ?= 12000
GPU_TEST ?= 4000
GPU_DATA := .gpu/cifar10_$(GPU_TRAIN)_$(GPU_TEST).npz

gpu-wheels: system-deps
	scripts/gpu_wheels.sh $(GPU_PYTHON) .whl

gpu-data: $(GPU_DATA)

$(GPU_DATA): | setup
	$(PY) scripts/gpu_check.py --pack $(or $(CIFAR_SOURCE),$(FASTCIFAR_DATA)) $@ --pack-train $(GPU_TRAIN) --pack-test $(GPU_TEST)

gpu-check-dry: setup
	$(PY) scripts/gpu_check.py --device cpu --synthetic --out runs/gpu_check_dry
