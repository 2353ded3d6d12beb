"""The stdlib docstring corpus: reproducible, prose only, and split without overlap.

The pipeline's rules (which files, which docstrings, which sentences, which spelling of a
duplicate, the order per seed, the split) are checked exactly on a small fake stdlib written to a
temporary folder, so they run in the fast suite. The tests marked slow read the real stdlib (a
few seconds to parse; its sentence count depends on the Python version, so only bounds are
checked there).
"""

from __future__ import annotations

import random
import sys
import textwrap

import pytest

from modelpress.data import corpus
from modelpress.errors import ConfigError
from modelpress.data.corpus import (
    CorpusSplits,
    corpus_splits,
    is_prose,
    split_sentences,
    stdlib_sentences,
)

real_stdlib = pytest.mark.slow  # parses every stdlib source file (seconds), once per session


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


# --- the pipeline on a fake stdlib: exact results -------------------------------------------------

# The prose sentences of the fake tree below, each spelt once, in sorted (code point) order. Two
# spellings of one sentence differ only in case: the one that sorts first ("Number" < "number") is kept.
FAKE_SENTENCES = (
    "A nested function has a docstring of its own as well.",
    "Fetch the next block of bytes from the open file handle.",
    "Read every file of the folder in sorted order.",
    "Return the Number of Items that are stored in the queue.",
    "Some platforms, e.g. Linux, keep the bytes in the page cache.",
    "The reader never imports a module, it only parses it.",
)

FAKE_TREE = {
    "alpha.py": '''
        """Read every file of the folder in sorted order.

        The reader never imports a module, it only parses it. Too short here.
        >>> read("folder")
        ['Return the number of items that are stored in the queue.']
        """


        class Reader:
            """Return the number of items that are stored in the queue.

            Some platforms, e.g. Linux, keep the bytes in the page cache.
            """

            async def fetch(self):
                """Fetch the next block of bytes from the open file handle."""
        ''',
    "pkg/beta.py": '''
        def outer():
            """Return the Number of Items that are stored in the queue."""

            def inner():
                """A nested function has a docstring of its own as well."""

            return inner


        x = "This string is no docstring, so it is never read as a sentence."
        ''',
    "pkg/gamma.py": '''
        def same():
            """Read every file of the folder in sorted order."""
        ''',
    "test/test_alpha.py": '"""Sentences in a test folder are skipped, like this one is."""\n',
    "site-packages/third.py": '"""Sentences of third party packages are skipped as well."""\n',
    "pkg/__pycache__/cached.py": '"""Sentences in a cache folder are skipped as well as that."""\n',
    "broken.py": '"""This file does not parse, so its sentences are dropped."""\ndef (:\n',
    "notes.txt": '"""Only Python source files are read, never a text file."""\n',
}


@pytest.fixture
def fake_stdlib(tmp_path, monkeypatch):
    """A small stdlib folder in place of the real one; the real corpus's cache is left alone."""
    for name, text in FAKE_TREE.items():
        path = tmp_path / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(textwrap.dedent(text).lstrip())
    big = '"""This file is too large to read, so its sentences are dropped."""\n'
    (tmp_path / "big.py").write_text(big + "#" * corpus.MAX_FILE_BYTES + "\n")
    monkeypatch.setattr(corpus.sysconfig, "get_paths", lambda: {"stdlib": str(tmp_path)})
    sentences = corpus._sorted_sentences.__wrapped__()  # the uncached pipeline, on the fake folder
    monkeypatch.setattr(corpus, "_sorted_sentences", lambda: sentences)
    return tmp_path


def test_fake_stdlib_gives_exactly_its_prose_sentences(fake_stdlib):
    assert corpus._sorted_sentences() == FAKE_SENTENCES


def test_only_py_files_outside_skipped_folders_are_listed_in_sorted_order(fake_stdlib):
    files = [p.relative_to(fake_stdlib).as_posix() for p in corpus._stdlib_files(fake_stdlib)]
    assert files == ["alpha.py", "big.py", "broken.py", "pkg/beta.py", "pkg/gamma.py"]


@pytest.mark.parametrize("seed", [0, 1, 7])
def test_seed_fixes_the_order_of_the_sorted_sentences(fake_stdlib, seed):
    expected = list(FAKE_SENTENCES)
    random.Random(seed).shuffle(expected)
    assert stdlib_sentences(seed=seed) == expected


def test_seeds_give_different_orders_of_the_same_sentences(fake_stdlib):
    orders = {tuple(stdlib_sentences(seed=seed)) for seed in range(5)}
    assert len(orders) == 5
    assert {tuple(sorted(order)) for order in orders} == {FAKE_SENTENCES}


@pytest.mark.parametrize(("n_eval", "n_calib", "seed"), [(2, 3, 5), (1, 5, 0), (5, 1, 2), (3, 3, 9)])
def test_splits_are_the_first_n_eval_then_the_next_n_calib_of_the_shuffle(fake_stdlib, n_eval, n_calib, seed):
    shuffled = list(FAKE_SENTENCES)
    random.Random(seed).shuffle(shuffled)
    splits = corpus_splits(n_eval=n_eval, n_calib=n_calib, seed=seed)
    assert splits.evaluation == tuple(shuffled[:n_eval])
    assert splits.calibration == tuple(shuffled[n_eval:n_eval + n_calib])
    assert len(set(splits.evaluation + splits.calibration)) == n_eval + n_calib  # disjoint


def test_split_of_all_sentences_is_allowed_and_one_more_is_refused(fake_stdlib):
    splits = corpus_splits(n_eval=4, n_calib=2, seed=0)
    assert sorted(splits.evaluation + splits.calibration) == list(FAKE_SENTENCES)
    with pytest.raises(ConfigError, match="hold only 6 prose sentences: ask for at most 6 in total"):
        corpus_splits(n_eval=4, n_calib=3)


def test_returns_a_fresh_list_each_call(fake_stdlib):
    first = stdlib_sentences(seed=3)
    expected = list(first)
    first.clear()
    first.append("Changing the returned list must not change the corpus at all.")
    assert stdlib_sentences(seed=3) == expected and len(expected) == len(FAKE_SENTENCES)


# --- the real stdlib ----------------------------------------------------------------------------


@real_stdlib
def test_same_seed_same_sentences_in_same_order():
    assert stdlib_sentences(seed=0) == stdlib_sentences(seed=0)


@real_stdlib
def test_seed_changes_order_but_not_content():
    a, b = stdlib_sentences(seed=0), stdlib_sentences(seed=1)
    assert a != b
    assert sorted(a) == sorted(b)


@real_stdlib
def test_enough_sentences():
    assert len(stdlib_sentences()) >= 3500


@real_stdlib
def test_every_sentence_is_prose():
    rejected = [s for s in stdlib_sentences() if not reads_as_prose(s)]
    assert rejected == []


@real_stdlib
def test_no_case_insensitive_duplicates():
    sentences = stdlib_sentences()
    assert len({s.casefold() for s in sentences}) == len(sentences)


@real_stdlib
def test_stdlib_modules_are_parsed_not_imported():
    stdlib_sentences()
    assert "antigravity" not in sys.modules
    assert "this" not in sys.modules


@real_stdlib
def test_splits_are_the_leading_disjoint_slices():
    splits = corpus_splits(n_eval=300, n_calib=100, seed=3)
    sentences = stdlib_sentences(seed=3)
    assert splits == CorpusSplits(evaluation=tuple(sentences[:300]), calibration=tuple(sentences[300:400]))
    assert not set(splits.evaluation) & set(splits.calibration)


@real_stdlib
def test_default_split_sizes():
    splits = corpus_splits()
    assert (len(splits.evaluation), len(splits.calibration)) == (2000, 512)


@real_stdlib
def test_too_many_sentences_names_the_limit():
    available = len(stdlib_sentences())
    with pytest.raises(ConfigError, match=f"at most {available}"):
        corpus_splits(n_eval=available, n_calib=1)


@real_stdlib
def test_exactly_all_sentences_is_allowed():
    available = len(stdlib_sentences())
    splits = corpus_splits(n_eval=available - 1, n_calib=1)
    assert len(splits.evaluation) + len(splits.calibration) == available


# --- the rules, on given strings ----------------------------------------------------------------


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
