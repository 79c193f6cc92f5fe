"""Tests of cxr_tfdata.core.config: every bad value names its flag; configs serialise to JSON and back."""

from __future__ import annotations

import dataclasses
import json

import pytest

from cxr_tfdata.core import config as config_lib
from cxr_tfdata.core.config import AugmentConfig, DataConfig, ModelConfig, StageConfig, TrainConfig


def _train(**overrides) -> TrainConfig:
    return TrainConfig(**{"model_dir": "m", "data": DataConfig(data_dir="d"), **overrides})


@pytest.mark.parametrize("build, flag", [
    (lambda: AugmentConfig(placement="gpu"), "--augment"),
    (lambda: AugmentConfig(rotation_range=200), "--rotation_range"),
    (lambda: AugmentConfig(zoom_range=1.0), "--zoom_range"),
    (lambda: AugmentConfig(fill_mode="mirror"), "--fill_mode"),
    (lambda: DataConfig(data_dir=""), "--data_dir"),
    (lambda: DataConfig(data_dir="d", image_size=16), "--image_size"),
    (lambda: DataConfig(data_dir="d", cache="disk"), "--cache"),
    (lambda: DataConfig(data_dir="d", cache="file"), "--cache_dir"),
    (lambda: DataConfig(data_dir="d", shuffle_buffer=0), "--shuffle_buffer"),
    (lambda: DataConfig(data_dir="d", data_service="localhost:5050"), "--data_service_address"),
    (lambda: ModelConfig(dropout_rate=1.0), "--dropout_rate"),
    (lambda: ModelConfig(fine_tune_at=""), "--fine_tune_at"),
    (lambda: StageConfig(name="frozen", batch_size=0), "--frozen_batch_size"),
    (lambda: StageConfig(name="finetune", learning_rate=2.0), "--finetune_learning_rate"),
    (lambda: StageConfig(name="finetune", lr_decay_per_epoch=1.5), "--finetune_lr_decay_per_epoch"),
    (lambda: StageConfig(name="frozen", learning_rate=1e-4, min_learning_rate=1e-3), "--frozen_min_learning_rate"),
    (lambda: _train(model_dir=""), "--model_dir"),
    (lambda: _train(stage="all"), "--stage"),
    (lambda: _train(jit_compile="yes"), "--jit_compile"),
    (lambda: _train(distribution="cluster"), "--distribution"),
    (lambda: _train(steps_per_loop=0), "--steps_per_loop"),
    (lambda: _train(steps_per_epoch=-1), "--steps_per_epoch"),
])
def test_a_bad_value_names_its_flag(build, flag):
    with pytest.raises(ValueError, match=f"^{flag}: "):
        build()


def test_defaults_are_the_notebooks_stages():
    frozen, finetune = StageConfig(), config_lib.default_finetune_stage()
    assert (frozen.batch_size, frozen.epochs, frozen.early_stopping_patience, frozen.reduce_lr_patience) == (128, 50, 5, 2)
    assert (finetune.batch_size, finetune.early_stopping_patience, finetune.reduce_lr_patience) == (32, 15, 5)
    assert finetune.learning_rate < frozen.learning_rate and finetune.lr_decay_per_epoch < 1.0


def test_a_train_config_round_trips_through_json():
    config = TrainConfig(model_dir="m", data=DataConfig(data_dir="d", image_size=64, data_service="grpc://h:1"),
                         stage="finetune", jit_compile="true", steps_per_loop=4)
    restored = json.loads(config_lib.to_json(config))
    assert restored == json.loads(json.dumps(dataclasses.asdict(config)))
    rebuilt = TrainConfig(**{**restored, "data": DataConfig(**restored["data"]),
                             "augment": AugmentConfig(**restored["augment"]), "model": ModelConfig(**restored["model"]),
                             "frozen": StageConfig(**restored["frozen"]), "finetune": StageConfig(**restored["finetune"])})
    assert rebuilt == config


def test_stages_and_weights_path():
    assert _train().stages == ("frozen", "finetune")
    assert _train(stage="finetune").stages == ("finetune",)
    assert ModelConfig(weights="imagenet").weights_path is None and ModelConfig(weights="none").weights_path is None
    assert ModelConfig(weights="/w/notop.h5").weights_path == "/w/notop.h5"
