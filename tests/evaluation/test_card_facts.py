"""Tests of cxr_tfdata.evaluation.card_facts: model_card.json is built from metrics.json and the contract
alone, without TensorFlow, stays strict JSON, and survives the incomplete inputs older or degraded
models give."""

from __future__ import annotations

import copy
import importlib.metadata
import json
import math
import re
import subprocess
import sys

import pytest

from cxr_tfdata.evaluation import card_facts, card_markdown
from tests.evaluation.card_inputs import (
    VERSIONS,
    degraded_metrics,
    full_contract,
    full_metrics,
    make_card,
)
from tests.helpers import REPO_ROOT


def test_the_date_is_an_iso_date_under_its_own_key():
    card = make_card(full_metrics(), full_contract())
    assert re.fullmatch(r"\d{4}-\d{2}-\d{2}", card[card_facts.DATE_KEY])
    assert card[card_facts.DATE_KEY] in card_markdown.markdown(card)


CARD_SECTIONS = ("Intended use", "Out-of-scope uses", "Model", "Data", "Metrics", "Calibration",
                 "Known limitations", "Library versions")


def _assert_a_whole_card(card: dict) -> None:
    """Every part of a card, as strict JSON, and a Markdown card with every section, rebuilt from that JSON."""
    assert set(card) == set(make_card(full_metrics(), full_contract()))
    from_json = json.loads(json.dumps(card, allow_nan=False))
    md = card_markdown.markdown(from_json)
    assert md == card_markdown.markdown(card)
    for title in CARD_SECTIONS:
        assert f"\n## {title}\n" in md, title


@pytest.mark.parametrize("key", sorted(full_contract()))
def test_any_missing_or_none_contract_key_still_gives_a_card(key):
    missing, none = full_contract(), full_contract()
    missing.pop(key)
    none[key] = None
    card = make_card(full_metrics(), missing)
    _assert_a_whole_card(card)
    undated = {k: v for k, v in card.items() if k != card_facts.DATE_KEY}
    assert {k: v for k, v in make_card(full_metrics(), none).items() if k != card_facts.DATE_KEY} == undated


@pytest.mark.parametrize("key", sorted(full_metrics()))
def test_any_missing_metrics_key_still_gives_a_card(key):
    metrics = full_metrics()
    metrics.pop(key)
    _assert_a_whole_card(make_card(metrics, full_contract()))


def test_the_card_is_strict_json_even_when_inputs_hold_nan():
    metrics = full_metrics()
    metrics["calibration"]["raw"]["ece"] = math.nan
    metrics["operating_point"]["ci"]["recall"] = [math.nan, 0.9]
    contract = copy.deepcopy(full_contract())
    contract["training"]["frozen"]["learning_rate"] = math.inf
    for card in (make_card(metrics, contract), make_card(degraded_metrics(), None)):
        text = json.dumps(card, allow_nan=False)
        assert json.loads(text) == card
    card = make_card(metrics, contract)
    assert card["calibration"]["on_evaluation_data"]["raw"]["ece"] is None
    assert card["metrics"]["operating_point"]["values"]["recall"]["ci"] is None


def test_versions_come_from_the_argument_when_given():
    assert make_card(full_metrics(), full_contract())["library_versions"] == VERSIONS
    assert "| numpy | 9.9.9 |" in card_markdown.markdown(make_card(full_metrics(), full_contract()))
    default = card_facts.build(full_metrics(), full_contract())["library_versions"]
    assert list(default) == list(card_facts.LIBRARIES)


def test_library_versions_reads_installed_metadata():
    versions = card_facts.library_versions()
    assert versions["numpy"] == importlib.metadata.version("numpy")
    assert re.match(r"\d+\.\d+", versions["numpy"])
    assert card_facts.library_versions(("cxr-no-such-package",)) == {
        "cxr-no-such-package": card_facts.NOT_INSTALLED}


def test_the_card_is_built_without_tensorflow():
    """The card's facts come from metrics.json and the contract's dict; library versions from package
    metadata, not from importing the libraries."""
    code = ("from cxr_tfdata.evaluation import card_facts, card_markdown; card_facts.library_versions(); "
            "import sys; print('tensorflow' in sys.modules, 'keras' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, capture_output=True, text=True,
                         check=True, timeout=120)
    assert out.stdout.split() == ["False", "False"]
