"""Every preset value of every method file against the official value, pinned by value in the
OFFICIAL table of its tests/test_official_<method>.py (each value cited), or a listed deviation."""

import importlib

import pytest
from helpers import assert_official

METHODS = ("instdisc", "invaspread", "cpc", "cmc", "moco", "simclr", "swav", "byol", "simsiam")
METHODS += ("barlow_twins", "dino")


@pytest.mark.parametrize("method", METHODS)
def test_every_preset_value_is_the_official_one(method):
    table = importlib.import_module(f"test_official_{method}").OFFICIAL
    assert_official(importlib.import_module(method), table)
