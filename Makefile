# make demo: virtual environment, install, then the whole job on a synthetic sample.
# make test: the test suite (what CI runs).
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
DEMO_DIR ?= demo_output

.PHONY: venv install demo test lint bench clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip

$(VENV)/.installed: pyproject.toml setup.cfg | $(BIN)/python
	$(BIN)/pip install --quiet -e ".[test,baseline,dicom,serving]"
	touch $@

venv: $(BIN)/python
install: $(VENV)/.installed

demo: install
	rm -rf $(DEMO_DIR)
	$(BIN)/cxr-make-sample --output_dir=$(DEMO_DIR)/images --num_images=240 --seed=0
	$(BIN)/cxr-build-tfrecords --input_dir=$(DEMO_DIR)/images --output_dir=$(DEMO_DIR)/records \
		--image_size=64 --num_shards=2
	$(BIN)/cxr-verify-tfrecords --data_dir=$(DEMO_DIR)/records
	$(BIN)/cxr-train --data_dir=$(DEMO_DIR)/records --model_dir=$(DEMO_DIR)/model \
		--weights=none --train_base --image_size=64 --stage=both --frozen_epochs=2 --finetune_epochs=5 \
		--frozen_batch_size=32 --finetune_batch_size=16 --mixed_precision=auto
	$(BIN)/cxr-evaluate --model=$(DEMO_DIR)/model/final.keras --data_dir=$(DEMO_DIR)/records \
		--split=test --output_dir=$(DEMO_DIR)/eval
	$(BIN)/cxr-evaluate --model=$(DEMO_DIR)/model/final.keras --images_dir=$(DEMO_DIR)/images/test \
		--output_dir=$(DEMO_DIR)/eval_images
	$(BIN)/cxr-predict --model=$(DEMO_DIR)/model/final.keras --output_csv=$(DEMO_DIR)/predictions.csv \
		--gradcam_dir=$(DEMO_DIR)/gradcam $(DEMO_DIR)/images/test
	$(BIN)/cxr-export --model=$(DEMO_DIR)/model/final.keras --output_dir=$(DEMO_DIR)/export
	$(BIN)/cxr-export --model=$(DEMO_DIR)/model/final.keras --output_dir=$(DEMO_DIR)/export_openvino --format=openvino
	$(BIN)/cxr-predict --model=$(DEMO_DIR)/export_openvino --output_csv=$(DEMO_DIR)/predictions_openvino.csv \
		$(DEMO_DIR)/images/test
	@echo "demo outputs in $(DEMO_DIR)/: records, model, eval/ (report.md, MODEL_CARD.md, metrics.json), eval_images/, predictions.csv, gradcam/, export (SavedModel), export_openvino, predictions_openvino.csv"

test: install
	$(BIN)/ruff check cxr_tfdata tfrecords_builder tests benchmarks
	$(BIN)/python -m pytest -q -n auto --dist loadfile

lint: install
	$(BIN)/ruff check cxr_tfdata tfrecords_builder tests benchmarks

clean:
	rm -rf $(DEMO_DIR) build dist *.egg-info .pytest_cache .ruff_cache
