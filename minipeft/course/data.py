"""The course's own data: a sentiment task and sentence pairs, made here, deterministic, offline.

The sentiment set is built so that the easy shortcut fails and transfer learning is measured:

- **Negation** ("the plot was not good") and **contrast** ("the acting was awful, but the story was
  wonderful") put positive and negative words in sentences of either label, so counting words is
  not enough: a bag-of-words model tops out well below a model that reads the sentence.
- The **test split uses sentiment words that never occur in training** ("superb", "dreadful", ...).
  A randomly initialised model has never seen them and must guess; a pretrained model knows from
  pre-training that "superb" is close to "great". The gap between the two is transfer learning.

The sentence pairs (`paraphrase_pairs`) have nothing to do with sentiment: they measure how much a
model's general sentence understanding survives fine-tuning (catastrophic forgetting).
"""
from __future__ import annotations

import random
import re
from itertools import product

import torch

from datasets import ClassLabel, Dataset, DatasetDict, Features, Value

LABELS = ("negative", "positive")

# Sentiment words, split so that test words never appear in train or validation.
TRAIN_POSITIVE = ("good", "great", "excellent", "wonderful", "enjoyable", "amazing", "lovely",
                  "beautiful", "charming", "fun", "nice", "perfect")
TRAIN_NEGATIVE = ("bad", "terrible", "awful", "boring", "dull", "poor", "horrible",
                  "disappointing", "weak", "ugly", "annoying", "stupid")
TEST_POSITIVE = ("superb", "fantastic", "delightful", "brilliant", "marvelous", "outstanding",
                 "splendid", "terrific", "pleasant", "magnificent")
TEST_NEGATIVE = ("dreadful", "lousy", "tedious", "mediocre", "atrocious", "pathetic", "bland",
                 "clumsy", "miserable", "lame")

ASPECTS = ("the movie", "the film", "the plot", "the acting", "the story", "the soundtrack",
           "the ending", "the cast", "the script", "the dialogue", "the direction", "the pacing",
           "the camera work", "the lead actor", "the second half", "the humor")
INTENSIFIERS = ("", "really ", "truly ", "very ", "quite ", "absolutely ", "rather ")

# Each template: (text with {a}/{b} aspects and {x}/{y} words, how the label follows from the
# words). "x" means the label is x's polarity, "not x" its opposite; y (when present) always has
# the opposite polarity of x, so a contrast sentence holds one positive and one negative word.
TEMPLATES = (
    ("{a} was {i}{x}.", "x"),
    ("I thought {a} was {i}{x}.", "x"),
    ("Honestly, {a} is {i}{x}.", "x"),
    ("{a} was not {x}.", "not x"),
    ("{a} was never {x}.", "not x"),
    ("I would not say {a} was {x}.", "not x"),
    ("{a} is not {i}{x} at all.", "not x"),
    ("{a} was {y}, but {b} was {i}{x}.", "x"),
    ("Although {a} was {y}, {b} was {i}{x}.", "x"),
    ("{a} was {i}{x}, even if {b} was {y}.", "x"),
    ("{a} was not {y}; in fact it was {i}{x}.", "x"),
    ("Some found {a} {y}, but I found it {i}{x}.", "x"),
)

# Paraphrase pairs on everyday topics, far from film reviews: a model that can still tell that each
# sentence is closest to its own paraphrase has kept its general sentence understanding.
PARAPHRASE_PAIRS = (
    ("A man is playing a guitar.", "Someone is strumming a guitar."),
    ("A woman is slicing an onion.", "A lady cuts an onion into pieces."),
    ("The cat is sleeping on the sofa.", "A cat naps on the couch."),
    ("Two children are playing football in the park.", "Kids kick a ball around in a park."),
    ("The train to Berlin was delayed by an hour.", "The Berlin train arrived sixty minutes late."),
    ("She is reading a book in the library.", "A woman reads in the library."),
    ("The stock market fell sharply today.", "Share prices dropped steeply today."),
    ("He is cooking pasta for dinner.", "A man makes spaghetti for his evening meal."),
    ("It is raining heavily in the city.", "There is a downpour in town."),
    ("The doctor examined the patient.", "A physician checked the sick person."),
    ("A dog is running across the beach.", "A dog races along the sand by the sea."),
    ("The company hired fifty new employees.", "The firm took on fifty new workers."),
    ("The children are swimming in the lake.", "Kids swim in the lake."),
    ("The old bridge was repaired last year.", "Last year the aging bridge was fixed."),
    ("A pilot is landing the plane.", "The aircraft is being brought down by its pilot."),
    ("The baby is crying loudly.", "An infant wails."),
    ("The team won the championship.", "The squad took the title."),
    ("He forgot his keys at home.", "He left his keys in the house."),
    ("The bakery sells fresh bread every morning.",
     "Each morning the bakery offers freshly baked loaves."),
    ("The students are taking an exam.", "The pupils sit a test."),
    ("A bird is building a nest in the tree.", "A bird makes its nest among the branches."),
    ("The price of oil went up.", "Oil became more expensive."),
    ("She is painting a picture of the mountains.", "A woman paints the mountains."),
    ("The museum is closed on Mondays.", "On Mondays the museum does not open."),
)


def _polarity(word: str) -> int:
    return 1 if word in TRAIN_POSITIVE or word in TEST_POSITIVE else 0


def _examples(positive: tuple[str, ...], negative: tuple[str, ...],
              rng: random.Random) -> list[tuple[str, int]]:
    """Every sentence the templates make from these words, with its label, in a shuffled order."""
    out = []
    for (template, rule), x in product(TEMPLATES, positive + negative):
        opposite = negative if _polarity(x) else positive
        a, b = rng.sample(ASPECTS, 2)
        text = template.format(a=a, b=b, x=x, y=rng.choice(opposite), i=rng.choice(INTENSIFIERS))
        label = _polarity(x) if rule == "x" else 1 - _polarity(x)
        out.append((text[0].upper() + text[1:], label))
    return out


def _sample(rng: random.Random, make, n: int, taken: set[str]) -> list[tuple[str, int]]:
    """n distinct, label-balanced examples not already in `taken` (which this adds them to)."""
    chosen: list[tuple[str, int]] = []
    per_label = [n // 2, n - n // 2]
    for _ in range(1000):
        if not any(per_label):
            break
        for text, label in make():
            if per_label[label] and text not in taken:
                taken.add(text)
                chosen.append((text, label))
                per_label[label] -= 1
    else:
        raise ValueError(f"cannot make {n} distinct examples from these templates; ask for fewer")
    rng.shuffle(chosen)
    return chosen


def _to_dataset(examples: list[tuple[str, int]]) -> Dataset:
    features = Features({"text": Value("string"), "label": ClassLabel(names=list(LABELS))})
    return Dataset.from_dict({"text": [t for t, _ in examples], "label": [y for _, y in examples]},
                             features=features)


def make_sentiment(n_train: int = 2000, n_validation: int = 300, n_test: int = 500,
                   seed: int = 0) -> DatasetDict:
    """The offline sentiment set: train/validation use the train words, test only held-out words.

    Deterministic: the same arguments give the same data set on every machine.
    """
    if min(n_train, n_validation, n_test) < 2:
        raise ValueError(f"each split needs at least 2 examples, got "
                         f"{n_train}/{n_validation}/{n_test}")
    rng = random.Random(seed)
    taken: set[str] = set()
    in_domain = lambda: _examples(TRAIN_POSITIVE, TRAIN_NEGATIVE, rng)  # noqa: E731
    held_out = lambda: _examples(TEST_POSITIVE, TEST_NEGATIVE, rng)  # noqa: E731
    return DatasetDict(
        train=_to_dataset(_sample(rng, in_domain, n_train, taken)),
        validation=_to_dataset(_sample(rng, in_domain, n_validation, taken)),
        test=_to_dataset(_sample(rng, held_out, n_test, taken)),
    )


# The sentiment task for a causal LM: the model reads the prompt and should continue with the label.
PROMPT_TEMPLATE = "Review: {text}\nSentiment:"
ANSWERS = (" negative", " positive")   # a leading space: how the word follows "Sentiment:"


def as_prompts(dataset: Dataset) -> Dataset:
    """The same examples as prompt/answer text for a causal LM: "Review: the plot was not good.
    / Sentiment:" answered " negative". Its label column stays, for scoring."""
    return dataset.map(lambda row: {"prompt": PROMPT_TEMPLATE.format(text=row["text"]),
                                    "answer": ANSWERS[row["label"]]})


def paraphrase_pairs() -> list[tuple[str, str]]:
    """Sentence pairs with the same meaning, for measuring forgetting (see
    `training.paraphrase_retrieval`).
    """
    return list(PARAPHRASE_PAIRS)


def _words(text: str) -> set[str]:
    return set(re.findall(r"[a-z]+", text.lower()))


def bag_of_words_accuracy(train: Dataset, test: Dataset, steps: int = 300) -> float:
    """Accuracy on `test` of a logistic regression on word presence trained on `train`.

    The classic baseline, and the shortcut this data set is built to defeat: it sees which words
    occur, not in what order, so "not good" and "good, not bad" look alike to it.
    """
    vocab = {w: i for i, w in enumerate(sorted(set().union(*map(_words, train["text"]))))}

    def featurize(texts) -> torch.Tensor:
        x = torch.zeros(len(texts), len(vocab))
        for row, text in enumerate(texts):
            for w in _words(text) & vocab.keys():
                x[row, vocab[w]] = 1
        return x

    x, y = featurize(train["text"]), torch.tensor(list(train["label"]), dtype=torch.float32)
    weight = torch.zeros(len(vocab), requires_grad=True)
    bias = torch.zeros(1, requires_grad=True)
    optimizer = torch.optim.Adam([weight, bias], lr=0.1)
    for _ in range(steps):
        optimizer.zero_grad()
        torch.nn.functional.binary_cross_entropy_with_logits(x @ weight + bias, y).backward()
        optimizer.step()
    with torch.no_grad():
        predicted = (featurize(test["text"]) @ weight + bias > 0).long()
    return (predicted == torch.tensor(list(test["label"]))).float().mean().item()
