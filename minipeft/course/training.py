"""The small training and evaluation loop every lesson reuses.

The recipe is the standard one for fine-tuning a pretrained transformer: AdamW, a small learning
rate, a short linear warm-up then linear decay, cross-entropy on the classifier's logits. Only the
parameters with `requires_grad=True` go to the optimizer, so the same loop trains a whole model
(lesson 1) or only an adapter (every later lesson).

The same loop trains a causal LM on prompt/answer pairs (`data.as_prompts`): the loss is the
model's own next-token cross-entropy, on the answer's tokens only (the prompt's labels are -100).
"""
from __future__ import annotations

import os
import time
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader
from tqdm import tqdm

from minipeft.memory import peak_memory
from minipeft.prompts import IGNORE_INDEX


def prompt_answer_batch(tokenizer, prompts: list[str], answers: list[str],
                        max_length: int = 128) -> dict[str, torch.Tensor]:
    """Prompt + answer as one sequence per example (padded on the right), with labels that score
    the answer only: -100 on the prompt's tokens and on padding."""
    batch = tokenizer([p + a for p, a in zip(prompts, answers)], padding=True, truncation=True,
                      max_length=max_length, padding_side="right", return_tensors="pt")
    labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, IGNORE_INDEX)
    for row, prompt in enumerate(prompts):
        labels[row, :len(tokenizer(prompt)["input_ids"])] = IGNORE_INDEX
    return dict(batch, labels=labels)


def make_loader(dataset, tokenizer, batch_size: int = 32, shuffle: bool = False, seed: int = 0,
                max_length: int = 128) -> DataLoader:
    """Batches of tokenized text (padded to the longest in the batch) with their labels; for a
    data set with prompt/answer columns, causal-LM batches (`prompt_answer_batch`)."""
    def collate(rows: list[dict]) -> dict[str, torch.Tensor]:
        if "answer" in rows[0]:
            return prompt_answer_batch(tokenizer, [r["prompt"] for r in rows],
                                       [r["answer"] for r in rows], max_length)
        batch = tokenizer([r["text"] for r in rows], padding=True, truncation=True,
                          max_length=max_length, return_tensors="pt")
        batch["labels"] = torch.tensor([r["label"] for r in rows])
        return dict(batch)

    generator = torch.Generator().manual_seed(seed)
    return DataLoader(dataset, batch_size=batch_size, shuffle=shuffle, collate_fn=collate,
                      generator=generator)


def _model_device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def by_length(dataset) -> tuple[object, list[int]]:
    """The rows of a text data set sorted by length (characters), and their original indices.
    Batches of similar lengths pad less: on the course's test set, a quarter fewer tokens go
    through the model. Padding under an attention mask does not change a real token's output
    (up to float rounding), so an evaluation gives the same predictions in less time."""
    order = sorted(range(len(dataset)), key=lambda i: len(dataset[i]["text"]))
    return dataset.select(order), order


def evaluate(model: nn.Module, tokenizer, dataset, batch_size: int = 64) -> float:
    """Accuracy of a sequence classifier on a labelled data set (`evaluation.predict`'s)."""
    from minipeft.course import evaluation     # it batches with this module's loader

    return evaluation.predict(model, tokenizer, dataset, batch_size).accuracy


@torch.no_grad()
def answer_accuracy(model: nn.Module, tokenizer, dataset, batch_size: int = 32) -> float:
    """Share of prompts (a data set with prompt/answer columns) whose greedy next token starts the
    answer, ignoring case and spaces (" Positive" starts " positive"): the accuracy of a causal
    LM that answers in one word."""
    was_training = model.training
    model.eval()
    device, correct = _model_device(model), 0
    for start in range(0, len(dataset), batch_size):
        rows = dataset[start:start + batch_size]
        batch = tokenizer(rows["prompt"], padding=True, padding_side="left",  # all end at -1
                          return_tensors="pt").to(device)
        predicted = [tokenizer.decode(t).strip().lower()
                     for t in model(**batch).logits[:, -1].argmax(-1).tolist()]
        correct += sum(bool(p) and a.strip().lower().startswith(p)
                       for p, a in zip(predicted, rows["answer"]))
    model.train(was_training)
    return correct / len(dataset)


@dataclass
class TrainResult:
    losses: list[float] = field(default_factory=list)                       # one per step
    val_accuracy: list[tuple[int, float]] = field(default_factory=list)     # (step, accuracy)
    steps: int = 0
    seconds: float = 0.0
    peak_memory_bytes: int = 0      # CUDA allocator peak on a GPU, process peak RSS on CPU
    start_memory_bytes: int = 0

    @property
    def seconds_per_step(self) -> float:
        return self.seconds / max(self.steps, 1)


def linear_warmup_decay(step: int, total: int, warmup: int) -> float:
    """Learning-rate multiplier: 0 -> 1 over `warmup` steps, then 1 -> 0 at `total`."""
    if step < warmup:
        return (step + 1) / warmup
    return max(0.0, (total - step) / max(1, total - warmup))


def train_step(model: nn.Module, batch: dict[str, torch.Tensor],
               optimizer: torch.optim.Optimizer) -> float:
    """One optimisation step on a batch (input_ids, attention_mask, labels); returns the loss.

    Forward in training mode, cross-entropy of the logits (in fp32, also for a bf16 model),
    backward, update, and clear the gradients so that the next step does not add to them.
    A label per token (a causal LM) is the model's own shifted next-token loss.
    """
    model.train()
    if batch["labels"].dim() == 2:
        loss = model(**batch).loss
    else:
        inputs = {k: v for k, v in batch.items() if k != "labels"}
        loss = F.cross_entropy(model(**inputs).logits.float(), batch["labels"])
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return loss.item()


PROGRESS_MODES = ("live", "summary")


def progress_mode() -> str:
    """How `train` reports progress: `MINIPEFT_PROGRESS`, "live" (the default: a live loss curve
    in a notebook with widgets, a bar elsewhere) or "summary".

    "summary" prints one line when training ends: what runs that keep their output (a committed
    notebook, CI logs) want instead of dozens of bar frames. `make test` and `make lessons` set it.
    """
    mode = os.environ.get("MINIPEFT_PROGRESS", "live").strip().lower()
    if mode not in PROGRESS_MODES:
        raise ValueError(f"MINIPEFT_PROGRESS={mode!r} is not a progress mode: use one of "
                         f"{PROGRESS_MODES}")
    return mode


def train(model: nn.Module, tokenizer, train_data, *, eval_data=None, epochs: int = 1,
          batch_size: int = 32, lr: float = 5e-5, weight_decay: float = 0.01,
          warmup_ratio: float = 0.1, eval_every: int | None = None, seed: int = 0,
          desc: str = "training", progress: str | None = None) -> TrainResult:
    """Fine-tune `model` in place on `train_data`; return losses, validation curve, time and peak
    memory. `progress`: "live" or "summary" (default: `progress_mode()`)."""
    progress = progress or progress_mode()
    if progress not in PROGRESS_MODES:
        raise ValueError(f"progress={progress!r}: use one of {PROGRESS_MODES}")
    trainable = [p for p in model.parameters() if p.requires_grad]
    if not trainable:
        raise ValueError("the model has no trainable parameters: unfreeze some (or add an "
                         "adapter) first")
    device = _model_device(model)
    loader = make_loader(train_data, tokenizer, batch_size, shuffle=True, seed=seed)
    total = epochs * len(loader)
    optimizer = torch.optim.AdamW(trainable, lr=lr, weight_decay=weight_decay)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: linear_warmup_decay(step, total, max(1, int(warmup_ratio * total))))
    result = TrainResult()
    if eval_data is not None and eval_every:
        result.val_accuracy.append((0, evaluate(model, tokenizer, eval_data)))
    view = None
    if progress == "live":                  # in a notebook, a live loss curve instead of a bar
        from minipeft.course import widgets
        if widgets.interactive():
            view = widgets.TrainingView(desc, total)
    model.train()
    start = time.perf_counter()
    with peak_memory(device) as memory, tqdm(total=total, desc=desc, unit="step", mininterval=1.0,
                                             disable=progress != "live" or view is not None) as bar:
        for _ in range(epochs):
            for batch in loader:
                loss = train_step(model, {k: v.to(device) for k, v in batch.items()}, optimizer)
                schedule.step()
                result.steps += 1
                result.losses.append(loss)
                bar.set_postfix(loss=f"{loss:.3f}", refresh=False)
                bar.update()
                if view is not None:
                    view.update(result.losses, result.val_accuracy)
                if eval_data is not None and eval_every and result.steps % eval_every == 0:
                    result.val_accuracy.append((result.steps,
                                                evaluate(model, tokenizer, eval_data)))
    result.seconds = time.perf_counter() - start
    if progress == "summary":
        final = f", final loss {result.losses[-1]:.3f}" if result.losses else ""
        print(f"{desc}: {result.steps} steps in {result.seconds:.1f} s{final}")
    result.peak_memory_bytes = memory.peak_bytes
    result.start_memory_bytes = memory.start_bytes
    if eval_data is not None and (not result.val_accuracy
                                  or result.val_accuracy[-1][0] != result.steps):
        result.val_accuracy.append((result.steps, evaluate(model, tokenizer, eval_data)))
    if view is not None:
        view.update(result.losses, result.val_accuracy, force=True)
    return result


@dataclass(frozen=True)
class ParaphraseScore:
    top1: float     # share of sentences whose nearest neighbour is their own paraphrase
    margin: float   # mean cosine of paraphrases minus mean cosine of non-paraphrases


@torch.no_grad()
def sentence_embeddings(model: nn.Module, tokenizer, texts: list[str]) -> torch.Tensor:
    """Mean-pooled, L2-normalised last hidden states of the model's encoder (as
    sentence-transformers does).
    """
    encoder = model.base_model
    was_training = encoder.training
    encoder.eval()
    batch = tokenizer(texts, padding=True, return_tensors="pt").to(_model_device(model))
    hidden = encoder(**batch).last_hidden_state
    mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
    pooled = (hidden * mask).sum(1) / mask.sum(1)
    encoder.train(was_training)
    return F.normalize(pooled.float(), dim=-1)


def paraphrase_retrieval(model: nn.Module, tokenizer,
                         pairs: list[tuple[str, str]]) -> ParaphraseScore:
    """How well the encoder still finds each sentence's paraphrase among all candidates."""
    left = sentence_embeddings(model, tokenizer, [a for a, _ in pairs])
    right = sentence_embeddings(model, tokenizer, [b for _, b in pairs])
    similarity = left @ right.T
    n = len(pairs)
    hits = (similarity.argmax(1) == torch.arange(n, device=similarity.device)).float().mean() + \
           (similarity.argmax(0) == torch.arange(n, device=similarity.device)).float().mean()
    diagonal = similarity.diagonal().mean()
    off_diagonal = (similarity.sum() - similarity.diagonal().sum()) / (n * n - n)
    return ParaphraseScore(top1=hits.item() / 2, margin=(diagonal - off_diagonal).item())
