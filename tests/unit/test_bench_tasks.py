"""bench/tasks: the pure scoring of bench_tasks.py and the consistency of its offline data."""

from __future__ import annotations

import pytest

from bench.tasks import data
from bench.tasks.scoring import (
    char_accuracy,
    contains_answer,
    detection_accuracy,
    edit_distance,
    percentile,
    recall_at_1,
    share,
    top_k_hit,
    words,
)


def test_words_keep_numbers_whole_and_drop_punctuation() -> None:
    assert words("Total: $42.50, call 555-0199!") == ["total", "42.50", "call", "555-0199"]
    assert words("Population 1,000 in Paris.") == ["population", "1000", "in", "paris"]
    assert words("  ") == []


@pytest.mark.parametrize(("reply", "accepted", "expected"), [
    ("The capital of France is Paris.", ("Paris",), True),
    ("PARIS", ("paris",), True),
    ("It is a Parisian city.", ("Paris",), False),  # a longer word is not the answer
    ("2 plus 2 is four", ("4", "four"), True),
    ("2 plus 2 is 22", ("4", "four"), False),
    ("Plants take in carbon dioxide.", ("carbon dioxide",), True),
    ("Plants take in carbon and dioxide.", ("carbon dioxide",), False),  # a phrase, in order
    ("The total is $42.50.", ("42.50",), True),
    ("The total is $42.", ("42.50",), False),
    ("", ("Paris",), False),
    ("anything", (), False),
])
def test_contains_answer(reply: str, accepted: tuple[str, ...], expected: bool) -> None:
    assert contains_answer(reply, accepted) is expected


def test_share() -> None:
    assert share([True, False, True, True]) == 0.75
    assert share([]) == 0.0


def test_top_k_hit_counts_only_the_first_k() -> None:
    predicted = [" the", "Paris,", "a", "London", "one", "Rome"]
    assert not top_k_hit(predicted, "Paris", 1)
    assert top_k_hit(predicted, "Paris", 2)
    assert top_k_hit(predicted, "paris", 5)
    assert not top_k_hit(predicted, "Rome", 5)  # sixth


def test_recall_at_1_finds_each_partner_by_cosine() -> None:
    queries = [[1.0, 0.0], [0.0, 2.0], [1.0, 1.0]]
    keys = [[3.0, 0.1], [0.1, 1.0], [0.9, 1.0]]  # scale does not matter: cosine
    assert recall_at_1(queries, keys) == 1.0
    swapped = [keys[1], keys[0], keys[2]]
    assert recall_at_1(queries, swapped) == pytest.approx(1 / 3)
    tied = [[1.0, 0.0], [1.0, 0.0]]
    assert recall_at_1(tied, tied) == 0.0  # a tie is not a hit
    with pytest.raises(ValueError, match="2 queries but 1 keys"):
        recall_at_1(tied, tied[:1])


def test_detection_accuracy_counts_misses_and_false_alarms() -> None:
    said_and_heard = [(True, True), (False, False)]
    assert detection_accuracy(said_and_heard) == 1.0
    assert detection_accuracy([(True, False), (False, False)]) == 0.5  # a miss
    assert detection_accuracy([(True, True), (False, True)]) == 0.5  # a false alarm


def test_char_accuracy_over_a_corpus() -> None:
    assert edit_distance("kitten", "sitting") == 3
    assert char_accuracy(["Hello world"], ["Hello world"]) == 1.0
    # one substitution over 10 reference characters, summed over both pairs
    assert char_accuracy(["Hello", "World"], ["Hello", "Word!"]) == pytest.approx(1 - 2 / 10)
    assert char_accuracy(["ab"], ["xxxxxx"]) < 0
    with pytest.raises(ValueError, match="no characters"):
        char_accuracy([""], [""])


def test_percentile_interpolates_as_numpy() -> None:
    values = [40.0, 10.0, 20.0, 30.0]
    assert percentile(values, 50) == 25.0
    assert percentile(values, 95) == pytest.approx(38.5)
    assert percentile([7.0], 95) == 7.0
    assert percentile([], 50) is None


def test_the_datasets_are_consistent() -> None:
    for dataset in (data.QUESTIONS, data.COMPLETIONS, data.NEXT_WORDS, data.PARAPHRASES,
                    data.TOPIC_TEXTS, data.SPOKEN, data.NOTICES):
        assert len(dataset) >= 32
    assert {topic for _, topic in data.TOPIC_TEXTS} == set(data.TOPICS)
    assert len(set(data.SHAPE_ITEMS)) == len(data.COLOURS) * len(data.SHAPES)  # all pairs once
    for sentence, _, _ in data.SPOKEN:  # the absent keywords are absent
        assert not set(words(sentence)) & set(data.ABSENT_KEYWORDS), sentence
    for lines, _, answers in data.NOTICES:  # every answer can be read off the notice
        assert any(contains_answer(" ".join(lines), [a]) for a in answers), lines
