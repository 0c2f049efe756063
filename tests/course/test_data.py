import re

import pytest

from minipeft.course import data
from minipeft.course.data import bag_of_words_accuracy, make_sentiment

SENTIMENT_WORDS = {
    "train": set(data.TRAIN_POSITIVE + data.TRAIN_NEGATIVE),
    "test": set(data.TEST_POSITIVE + data.TEST_NEGATIVE),
}


def words(text: str) -> set[str]:
    return set(re.findall(r"[a-z]+", text.lower()))


def test_bag_of_words_learns_what_words_can_tell():
    """The baseline is a real classifier: on plain sentences, words are enough and it learns
    them."""
    plain = make_sentiment(n_train=400, n_validation=100, n_test=100)
    only_simple = lambda split: split.filter(lambda row: " not " not in row["text"]
                                             and "," not in row["text"]
                                             and "never" not in row["text"]
                                             and ";" not in row["text"])
    assert bag_of_words_accuracy(only_simple(plain["train"]),
                                 only_simple(plain["validation"])) > 0.9


def test_deterministic_and_sized(sentiment):
    again = make_sentiment()
    for split, n in (("train", 2000), ("validation", 300), ("test", 500)):
        assert len(sentiment[split]) == n
        assert sentiment[split]["text"] == again[split]["text"]
        assert sentiment[split]["label"] == again[split]["label"]
    assert make_sentiment(seed=1)["train"]["text"] != sentiment["train"]["text"]


def test_splits_balanced_and_disjoint(sentiment):
    texts = [set(sentiment[s]["text"]) for s in ("train", "validation", "test")]
    assert not (texts[0] & texts[1]) and not (texts[0] & texts[2]) and not (texts[1] & texts[2])
    for split in sentiment.values():
        assert abs(sum(split["label"]) - len(split) / 2) <= 1
    assert sentiment["train"].features["label"].names == ["negative", "positive"]


def test_test_words_are_held_out(sentiment):
    for text in list(sentiment["train"]["text"]) + list(sentiment["validation"]["text"]):
        assert not words(text) & SENTIMENT_WORDS["test"], text
    for text in sentiment["test"]["text"]:
        assert (words(text) & SENTIMENT_WORDS["test"]
                and not words(text) & SENTIMENT_WORDS["train"]), text


def test_labels_follow_negation_and_contrast(sentiment):
    by_text = dict(zip(sentiment["train"]["text"], sentiment["train"]["label"]))
    checked = 0
    for text, label in by_text.items():
        m = re.fullmatch(r"The (\w+(?: \w+)?) was not (\w+)\.", text)
        if m:
            assert label == (m.group(2) in data.TRAIN_NEGATIVE), text
            checked += 1
        m = re.fullmatch(r".* was (\w+), but .* was (?:\w+ )?(\w+)\.", text)
        if m:
            assert label == (m.group(2) in data.TRAIN_POSITIVE), text
            checked += 1
    assert checked > 100


def test_bag_of_words_is_not_enough(sentiment):
    in_domain = bag_of_words_accuracy(sentiment["train"], sentiment["validation"])
    held_out = bag_of_words_accuracy(sentiment["train"], sentiment["test"])
    assert in_domain < 0.85, f"bag of words reaches {in_domain:.2f}: the data set is too easy"
    assert held_out < 0.65, f"bag of words reaches {held_out:.2f} on held-out words"


def test_too_small_or_too_many_examples_is_a_clear_error():
    with pytest.raises(ValueError, match="at least 2"):
        make_sentiment(n_train=1)


def test_paraphrase_pairs_are_distinct():
    pairs = data.paraphrase_pairs()
    assert len(pairs) >= 20
    assert len({a for a, _ in pairs}) == len(pairs) and all(a != b for a, b in pairs)
