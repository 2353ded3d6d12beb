"""The stdlib docstring corpus: reproducible, prose only, and split without overlap."""

from __future__ import annotations

import sys

import pytest

from modelpress.errors import ConfigError
from modelpress.data.corpus import (
    CorpusSplits,
    corpus_splits,
    is_prose,
    split_sentences,
    stdlib_sentences,
)


def reads_as_prose(s: str) -> bool:
    """The prose rules, written out again independently of the module."""
    letters_and_spaces = sum(1 for c in s if c.isalpha() or c == " ")
    return (
        40 <= len(s) <= 300
        and s[0].isupper()
        and s[-1] == "."
        and letters_and_spaces / len(s) >= 0.9
        and len(s.split()) >= 6
        and not any(bad in s for bad in (">>>", "::", "{", "}", "=", "__", "://"))
    )


def test_same_seed_same_sentences_in_same_order():
    assert stdlib_sentences(seed=0) == stdlib_sentences(seed=0)


def test_seed_changes_order_but_not_content():
    a, b = stdlib_sentences(seed=0), stdlib_sentences(seed=1)
    assert a != b
    assert sorted(a) == sorted(b)


def test_returns_a_fresh_list_each_call():
    stdlib_sentences().clear()
    assert len(stdlib_sentences()) > 0


def test_enough_sentences():
    assert len(stdlib_sentences()) >= 3500


def test_every_sentence_is_prose():
    rejected = [s for s in stdlib_sentences() if not reads_as_prose(s)]
    assert rejected == []


def test_no_case_insensitive_duplicates():
    sentences = stdlib_sentences()
    assert len({s.casefold() for s in sentences}) == len(sentences)


def test_stdlib_modules_are_parsed_not_imported():
    stdlib_sentences()
    assert "antigravity" not in sys.modules
    assert "this" not in sys.modules


def test_splits_are_the_leading_disjoint_slices():
    splits = corpus_splits(n_eval=300, n_calib=100, seed=3)
    sentences = stdlib_sentences(seed=3)
    assert splits == CorpusSplits(evaluation=tuple(sentences[:300]), calibration=tuple(sentences[300:400]))
    assert not set(splits.evaluation) & set(splits.calibration)


def test_default_split_sizes():
    splits = corpus_splits()
    assert (len(splits.evaluation), len(splits.calibration)) == (2000, 512)


def test_too_many_sentences_names_the_limit():
    available = len(stdlib_sentences())
    with pytest.raises(ConfigError, match=f"at most {available}"):
        corpus_splits(n_eval=available, n_calib=1)


def test_exactly_all_sentences_is_allowed():
    available = len(stdlib_sentences())
    splits = corpus_splits(n_eval=available - 1, n_calib=1)
    assert len(splits.evaluation) + len(splits.calibration) == available


@pytest.mark.parametrize(("n_eval", "n_calib", "name"), [(0, 10, "n_eval"), (10, 0, "n_calib"), (-1, 10, "n_eval")])
def test_sizes_below_one_are_refused(n_eval, n_calib, name):
    with pytest.raises(ConfigError, match=f"{name}={min(n_eval, n_calib)} is too small"):
        corpus_splits(n_eval=n_eval, n_calib=n_calib)


@pytest.mark.parametrize(
    ("sentence", "expected"),
    [
        ("Return the number of items that are stored in the queue.", True),
        ("Return the number of items.", False),  # too short
        ("return the number of items that are stored in the queue.", False),  # lower-case start
        ("Return the number of items that are stored in the queue", False),  # no full stop
        ("Return the number of items that are stored in the queue?", False),
        ("Set x = 1 and then return the number of items in the queue.", False),
        ("Call the __init__ method of the base class before doing anything.", False),
        ("See https://example.org for the details of the protocol used.", False),
        ("Use the following to build the list of items in the queue::", False),
        ("Sixty-seven characters, of which almost none are words: 1, 2, 3, 4, 5, 6, 7, 8.", False),
        ("Supercalifragilistic expialidocious antidisestablishmentarianism words.", False),  # 5 words
        ("A" + " word" * 70 + ".", False),  # over 300 characters
    ],
)
def test_is_prose(sentence, expected):
    assert is_prose(sentence) is expected
    assert reads_as_prose(sentence) is expected


def test_split_joins_wrapped_lines_and_drops_code():
    doc = (
        "Return the sum of the items.\n"
        "\n"
        "The items are added from left to right. Wrapped lines\n"
        "are joined into one sentence.\n"
        "\n"
        ">>> add(1, 2)\n"
        "3\n"
        ".. versionadded:: 3.2\n"
        "add(a, b) -> number\n"
        "Args:\n"
        "    a: the first item to add to the other one\n"
    )
    assert split_sentences(doc) == [
        "Return the sum of the items.",
        "The items are added from left to right.",
        "Wrapped lines are joined into one sentence.",
        "3",
        "Args:",
    ]


def test_split_keeps_abbreviations_inside_a_sentence():
    doc = "Some platforms, e.g. Linux, do this. Others do not."
    assert split_sentences(doc) == ["Some platforms, e.g. Linux, do this.", "Others do not."]
