import copy

import pytest
import torch
from transformers import BertConfig, BertForSequenceClassification

from minipeft import course
from minipeft.course import data
from minipeft.course.training import (evaluate, linear_warmup_decay, make_loader,
                                      paraphrase_retrieval, sentence_embeddings, train)


@pytest.fixture
def tiny(bert):
    """A small randomly initialised BERT with the course tokenizer: fast enough to train in a
    test."""
    _, tokenizer = bert
    torch.manual_seed(0)
    config = BertConfig(vocab_size=tokenizer.vocab_size, hidden_size=32, num_hidden_layers=1,
                        num_attention_heads=2, intermediate_size=64, num_labels=2)
    return BertForSequenceClassification(config), tokenizer


def test_loader_pads_and_keeps_labels(sentiment, bert):
    _, tokenizer = bert
    batch = next(iter(make_loader(sentiment["train"].select(range(5)), tokenizer, batch_size=5)))
    assert batch["input_ids"].shape == batch["attention_mask"].shape
    assert batch["labels"].tolist() == list(sentiment["train"]["label"][:5])


def test_training_fits_a_small_set(tiny, sentiment):
    model, tokenizer = tiny
    subset = sentiment["train"].select(range(32))
    before = evaluate(model, tokenizer, subset)
    result = train(model, tokenizer, subset, eval_data=subset, epochs=30, batch_size=8, lr=3e-3,
                   warmup_ratio=0.0)
    assert result.steps == 30 * 4 and len(result.losses) == result.steps
    assert sum(result.losses[-4:]) < 0.5 * sum(result.losses[:4])
    assert result.val_accuracy[-1][1] > max(before, 0.8)
    assert result.seconds > 0 and result.peak_memory_bytes > 0


def test_training_is_reproducible(tiny, sentiment):
    model, tokenizer = tiny
    subset = sentiment["train"].select(range(16))
    losses = []
    for _ in range(2):
        course.seed_everything(0)
        losses.append(train(copy.deepcopy(model), tokenizer, subset, batch_size=8, epochs=2).losses)
    assert losses[0] == losses[1]


def test_only_trainable_parameters_change(tiny, sentiment):
    model, tokenizer = tiny
    for p in model.bert.parameters():
        p.requires_grad_(False)
    frozen = copy.deepcopy(model.bert.state_dict())
    train(model, tokenizer, sentiment["train"].select(range(16)), batch_size=8, lr=1e-2)
    assert all(torch.equal(v, model.bert.state_dict()[k]) for k, v in frozen.items())


def test_nothing_to_train_is_a_clear_error(tiny, sentiment):
    model, tokenizer = tiny
    model.requires_grad_(False)
    with pytest.raises(ValueError, match="no trainable parameters"):
        train(model, tokenizer, sentiment["train"].select(range(4)))


def test_schedule_warms_up_then_decays():
    values = [linear_warmup_decay(s, total=10, warmup=2) for s in range(11)]
    assert values[:2] == [0.5, 1.0] and values[-1] == 0.0
    assert all(a >= b for a, b in zip(values[1:], values[2:]))


def test_pretrained_encoder_finds_paraphrases_and_random_does_not(bert):
    pretrained, tokenizer = bert
    pairs = data.paraphrase_pairs()
    known = paraphrase_retrieval(pretrained, tokenizer, pairs)
    assert known.top1 >= 0.9
    course.seed_everything(0)
    random, _ = course.load_model("bert", pretrained=False, profile="offline")
    unknown = paraphrase_retrieval(random, tokenizer, pairs)  # shared words alone find some pairs
    assert unknown.top1 < known.top1 - 0.2 and unknown.margin < known.margin / 2
    embeddings = sentence_embeddings(pretrained, tokenizer, ["a", "b c"])
    assert torch.allclose(embeddings.norm(dim=-1), torch.ones(2))


@pytest.fixture(scope="module")
def smollm2_tokenizer():
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(course.model_source("llm", "offline"))


def test_prompt_answer_batches_score_the_answer_only(sentiment, smollm2_tokenizer):
    from minipeft.course.training import prompt_answer_batch
    tokenizer = smollm2_tokenizer
    tokenizer.padding_side = "left"          # as generation leaves it: batches pad right anyway
    rows = data.as_prompts(sentiment["train"].select(range(4)))
    batch = prompt_answer_batch(tokenizer, rows["prompt"], rows["answer"])
    for labels, answer in zip(batch["labels"], rows["answer"]):
        scored = labels[labels != -100]
        # " positive" / " negative", nothing else
        assert tokenizer.decode(scored) == answer
    assert (batch["attention_mask"][:, 0] == 1).all()         # padded on the right


class AlwaysSays(torch.nn.Module):
    """A stand-in causal LM whose next token is always `token`."""

    def __init__(self, token: int, vocab: int) -> None:
        super().__init__()
        self.token, self.vocab, self.weight = token, vocab, torch.nn.Parameter(torch.zeros(1))

    def forward(self, input_ids, attention_mask=None):
        logits = torch.zeros(*input_ids.shape, self.vocab)
        logits[..., self.token] = 1.0
        return type("Output", (), {"logits": logits})


def test_answer_accuracy_reads_the_first_word_whatever_its_case(sentiment, smollm2_tokenizer):
    from minipeft.course.training import answer_accuracy
    tokenizer = smollm2_tokenizer
    rows = data.as_prompts(sentiment["validation"].select(range(20)))
    positive_share = sum(rows["label"]) / 20
    for word in (" positive", " Positive"):
        token = tokenizer(word, add_special_tokens=False)["input_ids"][0]
        model = AlwaysSays(token, len(tokenizer))
        assert answer_accuracy(model, tokenizer, rows, batch_size=8) == positive_share
    nothing = AlwaysSays(tokenizer(" the", add_special_tokens=False)["input_ids"][0],
                         len(tokenizer))
    assert answer_accuracy(nothing, tokenizer, rows) == 0.0
