"""Lesson 1's exercises: one full fine-tuning step, and the 16-bytes-per-parameter rule."""
from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from minipeft.course import training
from minipeft.course.checks import (TINY_BERT, Case, Draw, Exercise, Inputs, Mistake, Outputs,
                                    Question, register, tiny_bert, tiny_bert_weights)
from minipeft.memory import training_state_bytes

def _train_step_cases(draw: Draw) -> list[Case]:
    def case(name: str, optimizer: str, steps: int, padded: bool) -> Case:
        inputs: Inputs = tiny_bert_weights(draw, TINY_BERT)
        for step in range(steps):
            batch, length = 4, 6
            ids = torch.randint(1, TINY_BERT["vocab_size"], (batch, length),
                                generator=draw.generator)
            mask = torch.ones(batch, length, dtype=torch.long)
            if padded:
                mask[1:, 3:] = 0
                ids[mask == 0] = 0
            inputs |= {f"batch{step}.input_ids": ids, f"batch{step}.attention_mask": mask,
                       f"batch{step}.labels": torch.randint(0, 2, (batch,),
                                                            generator=draw.generator)}
        return Case(name, inputs | {"config": TINY_BERT, "optimizer": optimizer, "steps": steps,
                                    "seed": draw.seed()})

    return [case("one AdamW step", "adamw", 1, False),
            case("two steps in a row", "adamw", 2, False),
            case("SGD with momentum", "sgd", 2, False),
            case("padded batch", "adamw", 1, True)]


def _run_train_step(train_step: Callable, inputs: Inputs) -> Outputs:
    """Build the model, batches and optimizer of a case; call train_step on each batch; collect
    losses and weights.
    """
    model = tiny_bert(inputs)
    if inputs["optimizer"] == "adamw":
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.01)
    else:
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    torch.manual_seed(inputs["seed"])  # the same dropout masks for every solution
    outputs: Outputs = {}
    for step in range(inputs["steps"]):
        batch = {k.split(".", 1)[1]: v for k, v in inputs.items() if k.startswith(f"batch{step}.")}
        loss = train_step(model, batch, optimizer)
        if not isinstance(loss, float):  # the contract: a Python float, not a tensor
            raise TypeError(f"train_step returned a {type(loss).__name__}, not a float")
        outputs[f"loss returned by step {step + 1}"] = loss
    return outputs | {f"{name} after training": p for name, p in model.named_parameters()}


def _step_without_zero_grad(model, batch, optimizer):
    model.train()
    loss = model(**batch).loss
    loss.backward()
    optimizer.step()
    return loss.item()


def _step_without_optimizer_step(model, batch, optimizer):
    model.train()
    loss = model(**batch).loss
    loss.backward()
    optimizer.zero_grad()
    return loss.item()


def _step_returning_the_loss_after_the_update(model, batch, optimizer):
    model.train()
    model(**batch).loss.backward()
    optimizer.step()
    optimizer.zero_grad()
    with torch.no_grad():
        return model(**batch).loss.item()


def _step_in_eval_mode(model, batch, optimizer):
    loss = model(**batch).loss
    loss.backward()
    optimizer.step()
    optimizer.zero_grad()
    return loss.item()


register(Exercise(
    name="train_step",
    notebook="01_full_finetuning",
    make_cases=_train_step_cases,
    run=_run_train_step,
    reference=training.train_step,
    mistakes=(
        Mistake("The weights did not change. After loss.backward() (which fills each "
                "parameter's .grad), optimizer.step() is what updates the weights.",
                _step_without_optimizer_step),
        Mistake("The first step is right but the second is not: gradients add up across "
                "backward() calls. Call optimizer.zero_grad() after optimizer.step() (or before "
                "backward()).",
                _step_without_zero_grad),
        Mistake("The loss differs from a training step's: call model.train() first. A pretrained "
                "model comes in eval mode, and training switches dropout on.", _step_in_eval_mode),
        Mistake("The weights are right but the loss is not the step's: return the loss the step "
                "was computed from (before optimizer.step()), not a new forward pass of the "
                "updated model.", _step_returning_the_loss_after_the_update),
    ),
    error_hints=(
        (r"train_step returned a Tensor, not a float",
         "Return the loss as a Python float: loss.item(). A tensor would keep the whole "
         "computation graph of the step alive."),
        (r"train_step returned a \w+, not a float",
         "Return the loss of the step as a Python float: loss.item()."),
        (r"unexpected keyword argument",
         "The batch is a dict of input_ids, attention_mask and labels: "
         "model(**batch) passes them all, labels included."),
    ),
    hint="A full step is: model.train(), loss = cross-entropy of model(...).logits against the "
         "labels (or model(**batch).loss), loss.backward(), optimizer.step(), "
         "optimizer.zero_grad(), return loss.item(). "
         "Use the optimizer you are given: making a new one inside the step loses its state.",
    tolerance=1e-4,
))


def _training_bytes_cases(draw: Draw) -> list[Case]:
    def case(name: str, n_params: int, n_trainable: int, bytes_per_weight: int) -> Case:
        return Case(name, {"n_params": n_params, "n_trainable": n_trainable,
                           "bytes_per_weight": bytes_per_weight})

    bert = draw.integer(100_000_000, 120_000_000)
    llama = draw.integer(6_500_000_000, 7_500_000_000)
    small = draw.integer(20_000_000, 30_000_000)
    return [case("full fine-tuning in fp32", bert, bert, 4),
            case("full fine-tuning of a 7B model", llama, llama, 4),
            case("PEFT: 1% trainable", small, small // 100, 4),
            case("bf16 weights with half trainable", llama, llama // 2, 2),
            case("nothing trainable", small, 0, 4)]


def _run_training_bytes(training_bytes: Callable, inputs: Inputs) -> Outputs:
    return {"bytes": training_bytes(inputs["n_params"], inputs["n_trainable"],
                                    inputs["bytes_per_weight"])}


WEIGHT_DTYPES = {4: torch.float32, 2: torch.bfloat16}


def _reference_training_bytes(n_params: int, n_trainable: int, bytes_per_weight: int = 4) -> int:
    """`minipeft.memory.training_state_bytes` of a model of that size, built on the meta device (no
    memory).
    """
    dtype = WEIGHT_DTYPES[bytes_per_weight]
    model = nn.Module()
    model.frozen = nn.Parameter(torch.empty(n_params - n_trainable, dtype=dtype, device="meta"),
                                requires_grad=False)
    model.trainable = nn.Parameter(torch.empty(n_trainable, dtype=dtype, device="meta"))
    return training_state_bytes(model).total


register(Exercise(
    name="training_bytes",
    notebook="01_full_finetuning",
    make_cases=_training_bytes_cases,
    run=_run_training_bytes,
    reference=_reference_training_bytes,
    mistakes=(
        Mistake("16 bytes per parameter holds for fp32 weights with every parameter trainable. "
                "Here weights take bytes_per_weight bytes, and only the n_trainable parameters "
                "have gradients and Adam state.",
                lambda n, t, w=4: 16 * n),
        Mistake("Frozen parameters have no gradient and no optimizer state: only the n_trainable "
                "parameters pay for those.",
                lambda n, t, w=4: n * w + n * w + n * 8),
        Mistake("Frozen parameters have no gradient: count gradients for the n_trainable "
                "parameters only.",
                lambda n, t, w=4: n * w + n * w + t * 8),
        Mistake("Frozen parameters have no optimizer state: Adam's m and v exist for trainable "
                "parameters only.",
                lambda n, t, w=4: n * w + t * w + n * 8),
        Mistake("The gradients are missing: every trainable parameter has one, the size of its "
                "weight.",
                lambda n, t, w=4: n * w + t * 8),
        Mistake("Adam keeps two numbers per trainable parameter, m and v: you counted one.",
                lambda n, t, w=4: n * w + t * w + t * 4),
        Mistake("Adam's m and v are kept in fp32 (4 bytes each) even when the weights are bf16.",
                lambda n, t, w=4: n * w + t * w + t * 2 * w),
        Mistake("A gradient has the dtype of its weight: bytes_per_weight, not always 4.",
                lambda n, t, w=4: n * w + t * 4 + t * 8),
    ),
    hint="Weights: n_params x bytes_per_weight. Gradients: n_trainable x bytes_per_weight. "
         "Adam: n_trainable x 2 moments x 4 bytes (fp32). In fp32 with everything trainable that "
         "is 16 bytes per parameter.",
))


# --------------------------------------------------------------------------------------------------
# Concept checks
# --------------------------------------------------------------------------------------------------

register(Question(
    name="bytes_bf16_adam",
    notebook="01_full_finetuning",
    text="A parameter trains with bf16 weights and gradients, and AdamW keeps its two moments in "
         "float32. How many bytes does it hold (activations aside)?",
    answer=12,
    why="2 (bf16 weight) + 2 (bf16 gradient) + 4 + 4 (the moments m and v in float32) = 12.",
    wrong={16: "16 is the float32 figure: here the weight and its gradient are bf16, 2 bytes each.",
           4: "That is the weight and its gradient; AdamW's two float32 moments add 8 bytes.",
           8: "That is AdamW's two moments alone; add the bf16 weight and its gradient.",
           2: "That is the weight alone: training also keeps a gradient and AdamW's two moments."},
    otherwise="Add up the weight (bf16), its gradient (same dtype as the weight) and AdamW's two "
              "moments (float32 each).",
))

register(Question(
    name="zero_grad_forgotten",
    notebook="01_full_finetuning",
    text="A training loop never calls optimizer.zero_grad(). What happens?",
    options={"a": "The loss cannot be computed after the first step.",
             "b": "Each step's gradient is added to all the earlier ones, so every update uses "
                  "their running sum.",
             "c": "The weights stop changing after the first step.",
             "d": "Nothing: optimizer.step() clears the gradients itself."},
    answer="b",
    why="backward() adds into .grad; without zero_grad() the old gradients pile up and the "
        "updates grow and point the wrong way.",
    wrong={"a": "The forward pass does not use .grad at all: the loss is computed as usual.",
           "c": "They keep changing, by the wrong amounts: backward() adds each new gradient to "
                "the old ones.",
           "d": "step() only reads the gradients; clearing them is zero_grad()'s job."},
))

register(Question(
    name="eval_mode",
    notebook="01_full_finetuning",
    text="Why does the accuracy measurement call model.eval() first?",
    options={"a": "It stops PyTorch from computing gradients.",
             "b": "It freezes the weights.",
             "c": "It switches dropout off, so that predictions are deterministic and use the "
                  "whole network.",
             "d": "It moves the model to half precision."},
    answer="c",
    why="BERT's dropout zeroes random activations in training mode; eval() turns it off "
        "(torch.no_grad() is what skips the gradients).",
    wrong={"a": "That is torch.no_grad(): eval() changes how layers such as dropout behave.",
           "b": "Weights are frozen with requires_grad_(False); eval() only changes layer "
                "behaviour (dropout).",
           "d": "eval() changes no dtype; .half() or .to(torch.bfloat16) would."},
))

register(Question(
    name="new_head",
    notebook="01_full_finetuning",
    text="Loading BERT for two-label classification reports that the classifier's weights are "
         "newly initialised. Why?",
    options={"a": "The download failed and random weights were used instead.",
             "b": "The pretrained checkpoint has no head for our two labels: it is created with "
                  "random weights and must be trained.",
             "c": "transformers re-initialises every layer when num_labels is given."},
    answer="b",
    why="Pretraining taught the encoder, not our task: the 384 x 2 head is new, which is why it "
        "always trains (in lesson 3 too, with LoRA).",
    wrong={"a": "The encoder's pretrained weights loaded fine; only the head is missing from the "
                "checkpoint.",
           "c": "Only the head is new: the encoder keeps its pretrained weights (lesson 1's "
                "comparison with a randomly initialised BERT shows the difference)."},
))
