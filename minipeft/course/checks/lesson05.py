"""Lesson 5's exercises: the prompt-tuning input (virtual tokens, mask, labels), attention with a
prefix (grouped-query, causal or not), and what prefix tuning trains."""
from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from minipeft.course.checks import (Case, Draw, Exercise, Inputs, Mistake, Outputs, Question,
                                    register)
from minipeft.prompts import (IGNORE_INDEX, PREFIX_SLOT, PromptEncoder, _prepend_prompt,
                              prefix_attention)

# --------------------------------------------------------------------------------------------------
# 1. The prompt-tuning input
# --------------------------------------------------------------------------------------------------


def _prompt_cases(draw: Draw) -> list[Case]:
    def case(name: str, batch: int, length: int, n: int, d: int, padded: int = 0) -> Case:
        mask = torch.ones(batch, length, dtype=torch.long)
        if padded:
            mask[-1, length - padded:] = 0               # the last example is shorter
        labels = torch.randint(0, 50, (batch, length), generator=draw.generator)
        return Case(name, {"P": draw.tensor(n, d), "embeds": draw.tensor(batch, length, d),
                           "attention_mask": mask,
                           "labels": labels.masked_fill(mask == 0, IGNORE_INDEX)})

    return [case("one example", 1, 5, 3, 8),
            case("a padded batch", 3, 6, 4, 8, padded=2),
            case("a single virtual token", 2, 4, 1, 16),
            case("more virtual tokens than input tokens", 2, 2, 6, 4)]


def _run_prompt(prompt_inputs: Callable, inputs: Inputs) -> Outputs:
    i = inputs
    embeds, mask, labels = prompt_inputs(i["P"], i["embeds"], i["attention_mask"], i["labels"])
    return {"inputs_embeds": embeds, "attention_mask": mask, "labels": labels}


@torch.no_grad()
def _reference_prompt(P, embeds, attention_mask, labels):
    """minipeft's forward pre-hook, on a stand-in model holding only the prompt."""
    model = nn.Module()
    model.prompt_encoder = PromptEncoder()
    model.prompt_encoder.prompts["default"] = nn.Parameter(P.clone())
    model.prompt_encoder.set_active("default")
    _, kwargs = _prepend_prompt(model, (), {"inputs_embeds": embeds,
                                            "attention_mask": attention_mask, "labels": labels})
    return kwargs["inputs_embeds"], kwargs["attention_mask"], kwargs["labels"]


def _prompt_with(P, embeds, mask, labels, *, prompt_first=True, mask_fill=1,
                 label_fill=IGNORE_INDEX, extend_mask=True, extend_labels=True):
    """The input written with the usual slips as options."""
    batch, n = embeds.shape[0], P.shape[0]
    prompts = P.expand(batch, -1, -1)
    parts = [prompts, embeds] if prompt_first else [embeds, prompts]
    new_mask = mask.new_full((batch, n), mask_fill)
    new_labels = labels.new_full((batch, n), label_fill)
    return (torch.cat(parts, dim=1),
            (torch.cat([new_mask, mask] if prompt_first else [mask, new_mask], dim=1)
             if extend_mask else mask),
            (torch.cat([new_labels, labels] if prompt_first else [labels, new_labels], dim=1)
             if extend_labels else labels))


register(Exercise(
    name="prompt_inputs",
    notebook="05_prompt_tuning",
    make_cases=_prompt_cases,
    run=_run_prompt,
    reference=_reference_prompt,
    mistakes=(
        Mistake("The prompt goes in front of the input, [P ; E(x)]: a causal LM reads left to "
                "right, so the input must come after what steers it.",
                lambda *a: _prompt_with(*a, prompt_first=False)),
        Mistake("The mask must grow with the input: n more columns, one per virtual token.",
                lambda *a: _prompt_with(*a, extend_mask=False)),
        Mistake("The new mask columns are ones: every token attends to the prompt. Zeros would "
                "hide it, and the prompt would change nothing.",
                lambda *a: _prompt_with(*a, mask_fill=0)),
        Mistake("The labels must grow too, with one label per virtual token.",
                lambda *a: _prompt_with(*a, extend_labels=False)),
        Mistake("The prompt's labels are -100, the value the loss skips; 0 is a real token id, and "
                "the model would be trained to predict it.",
                lambda *a: _prompt_with(*a, label_fill=0)),
    ),
    error_hints=((r"Sizes of tensors must match|Tensors must have same number of dimensions",
                  "P is (n, d) and the input (batch, length, d): expand P to (batch, n, d) "
                  "before concatenating along dimension 1."),),
    hint="See lesson 5, section 2: [P ; E(x)], the mask with n ones in front, the labels with n "
         "times -100 in front.",
))

# --------------------------------------------------------------------------------------------------
# 2. Attention with a prefix
# --------------------------------------------------------------------------------------------------


def _attention_cases(draw: Draw) -> list[Case]:
    def case(name: str, heads: int, kv_heads: int, length: int, n: int, causal: bool,
             batch: int = 2, d: int = 8) -> Case:
        return Case(name, {"q": draw.tensor(batch, heads, length, d),
                           "k": draw.tensor(batch, kv_heads, length, d),
                           "v": draw.tensor(batch, kv_heads, length, d),
                           "prefix_k": draw.tensor(kv_heads, n, d),
                           "prefix_v": draw.tensor(kv_heads, n, d), "causal": causal})

    return [case("a decoder (causal) where 4 heads share 2 key/value heads", 4, 2, 5, 3, True),
            case("a decoder with one key/value head per head", 2, 2, 4, 2, True),
            case("an encoder (BERT: not causal)", 2, 2, 5, 3, False),
            case("one token and one prefix position", 3, 1, 1, 1, True, batch=1)]


def _run_attention(attention_with_prefix: Callable, inputs: Inputs) -> Outputs:
    i = inputs
    return {"output": attention_with_prefix(i["q"], i["k"], i["v"], i["prefix_k"], i["prefix_v"],
                                            i["causal"])}


@torch.no_grad()
def _reference_attention(q, k, v, prefix_k, prefix_v, causal):
    """minipeft's attention function, on a stand-in attention module."""
    module = nn.Module().eval()
    module.is_causal = causal
    module.num_key_value_groups = q.shape[1] // k.shape[1]
    setattr(module, PREFIX_SLOT, (prefix_k, prefix_v))
    out, _ = prefix_attention(module, q, k, v, None, scaling=q.shape[-1] ** -0.5, dropout=0.0)
    return out.transpose(1, 2)                    # (B, T, heads, d) -> (B, heads, T, d)


def _attention_with(q, k, v, prefix_k, prefix_v, causal, *, prefix_first=True,
                    prefix_values=True, scale=True, prefix_hidden=False, tile=False):
    """Attention with a prefix, written with the usual slips as options."""
    batch, n, length = q.shape[0], prefix_k.shape[1], q.shape[2]
    pk, pv = (p.unsqueeze(0).expand(batch, -1, -1, -1) for p in (prefix_k, prefix_v))
    K = torch.cat([pk, k] if prefix_first else [k, pk], dim=2)
    V = (torch.cat([pv, v] if prefix_first else [v, pv], dim=2) if prefix_values
         else torch.cat([torch.zeros_like(pv), v], dim=2))
    groups = q.shape[1] // K.shape[1]
    K, V = ((K.repeat(1, groups, 1, 1), V.repeat(1, groups, 1, 1)) if tile else
            (K.repeat_interleave(groups, dim=1), V.repeat_interleave(groups, dim=1)))
    inputs = torch.ones(length, length, dtype=torch.bool)
    inputs = inputs.tril() if causal else inputs
    seen = torch.ones(length, n, dtype=torch.bool)
    if prefix_hidden:     # one causal triangle over [prefix ; input]
        visible = torch.ones(length, n + length, dtype=torch.bool).tril() if causal else None
    else:
        visible = torch.cat([seen, inputs] if prefix_first else [inputs, seen], dim=1)
    scores = q @ K.transpose(-2, -1) / (q.shape[-1] ** 0.5 if scale else 1)
    if visible is not None:
        scores = scores.masked_fill(~visible, float("-inf"))
    return scores.softmax(dim=-1) @ V


register(Exercise(
    name="attention_with_prefix",
    notebook="05_prompt_tuning",
    make_cases=_attention_cases,
    run=_run_attention,
    reference=_reference_attention,
    mistakes=(
        Mistake("The prefix must be visible to every query: a causal triangle over [prefix ; "
                "input] hides most of it from the first tokens. Mask only the input's later "
                "tokens, and keep n columns of 'visible' in front.",
                lambda *a: _attention_with(*a, prefix_hidden=True)),
        Mistake("Divide the scores by sqrt(d_head), the head size (the last dimension of q).",
                lambda *a: _attention_with(*a, scale=False)),
        Mistake("The values need their prefix too: V = [P_V ; V], as K = [P_K ; K].",
                lambda *a: _attention_with(*a, prefix_values=False)),
        Mistake("With grouped-query attention, query heads 0 and 1 share key/value head 0: "
                "repeat each key/value head in place (repeat_interleave), not the whole set "
                "(repeat).",
                lambda *a: _attention_with(*a, tile=True)),
    ),
    error_hints=((r"Sizes of tensors must match|must match the size|size of tensor a",
                  "The prefixes are (kv heads, n, d): expand them to the batch, (B, kv heads, n, "
                  "d), and put them in front of k and v along dimension 2 (the positions). With "
                  "grouped-query attention, k and v have fewer heads than q: repeat them."),),
    hint="See lesson 5, section 5: K = [P_K ; K], V = [P_V ; V], scores / sqrt(d), the prefix "
         "visible to all, causal over the input only when `causal` is True.",
))

# --------------------------------------------------------------------------------------------------
# 3. What prefix tuning trains
# --------------------------------------------------------------------------------------------------


def _count_cases(draw: Draw) -> list[Case]:
    def case(name: str, layers: int, n: int, heads: int, kv_heads: int, head_dim: int) -> Case:
        return Case(name, {"layers": layers, "num_virtual_tokens": n, "heads": heads,
                           "kv_heads": kv_heads, "head_dim": head_dim})

    return [case("the course bert with 16 tokens", 6, 16, 12, 12, 32),
            case("SmolLM2-135M (9 heads share 3 key/value heads) with 8 tokens", 30, 8, 9, 3, 64),
            case("Llama-2-7B with 20 tokens", 32, 20, 32, 32, 128),
            case("a random grouped-query model", draw.integer(2, 40), draw.integer(1, 50), 8, 2,
                 draw.integer(8, 128))]


def _run_count(prefix_param_count: Callable, inputs: Inputs) -> Outputs:
    i = inputs
    return {"count": prefix_param_count(i["layers"], i["num_virtual_tokens"], i["heads"],
                                        i["kv_heads"], i["head_dim"])}


def _reference_count(layers, num_virtual_tokens, heads, kv_heads, head_dim) -> int:
    """The shape of minipeft's prefixes: one row per virtual token, every layer's keys and
    values."""
    from minipeft.prompts import PrefixEncoder
    encoder = PrefixEncoder([nn.Module()] * layers, kv_heads, head_dim)
    return num_virtual_tokens * len(encoder.attentions) * 2 * encoder.heads * encoder.head_dim


register(Exercise(
    name="prefix_param_count",
    notebook="05_prompt_tuning",
    make_cases=_count_cases,
    run=_run_count,
    reference=_reference_count,
    mistakes=(
        Mistake("Keys and values: each layer has n prefix keys and n prefix values.",
                lambda L, n, h, kv, d: L * n * kv * d),
        Mistake("The prefixes have the key/value heads: with grouped-query attention that is "
                "kv_heads, fewer than the query heads.",
                lambda L, n, h, kv, d: L * 2 * n * h * d),
        Mistake("Every layer has its own prefix: multiply by the layers.",
                lambda L, n, h, kv, d: 2 * n * kv * d),
    ),
    hint="Per layer: n keys and n values, each kv_heads x head_dim numbers.",
))

# --------------------------------------------------------------------------------------------------
# Concept checks
# --------------------------------------------------------------------------------------------------

register(Question(
    name="first_input_position",
    notebook="05_prompt_tuning",
    text="With prefix tuning, n = 10 virtual tokens and a 5-token input: at which position (0 = "
         "the first) does the input's first token sit, in minipeft and peft?",
    answer=10,
    why="The prefix takes positions 0 to 9, as if 10 tokens came before the input (Li and "
        "Liang's setting, and peft's): the input starts at 10.",
    wrong={0: "That numbers the input as if there were no prefix; minipeft and peft place the "
              "prefix at 0 .. n-1 and the input after it.",
           9: "Positions start at 0: the prefix takes 0 .. 9, so the input starts at 10.",
           11: "Positions start at 0: the prefix takes 0 .. 9, so the input starts at 10."},
    otherwise="The prefix occupies the first n positions.",
))

register(Question(
    name="longer_sequences",
    notebook="05_prompt_tuning",
    text="With the same n, which method makes each training step do more work, and why?",
    options={"a": "Prompt tuning: the n virtual tokens go through every layer as positions of "
                  "their own (queries, attention, feed-forward).",
             "b": "Prefix tuning: it adds n keys and values to every layer, so it must cost more.",
             "c": "Neither: both only add n trainable vectors per layer."},
    answer="a",
    why="Prompt tuning lengthens the sequence: every layer computes n more positions in full. "
        "Prefix tuning adds n keys and values per layer, but no queries and no feed-forward work "
        "(lesson 5's table: prompt tuning's step was the slowest).",
    wrong={"b": "Prefix tuning's extra keys and values are only read by the input's queries; "
                "prompt tuning's tokens are processed by every layer like input tokens.",
           "c": "Prompt tuning adds n vectors once, at the input, and they become n positions "
                "that every layer processes."},
))

register(Question(
    name="prompt_labels",
    notebook="05_prompt_tuning",
    text="Why do the virtual tokens get the label -100 when a causal LM is trained with prompt "
         "tuning?",
    options={"a": "-100 is the label the loss skips: the model is not asked to predict the "
                  "virtual tokens, which are not words.",
             "b": "-100 is the id of the padding token.",
             "c": "It makes the prompt learn faster by pushing its logits down."},
    answer="a",
    why="cross_entropy(..., ignore_index=-100) leaves those positions out of the loss: only the "
        "real tokens (here, the answer) are scored.",
    wrong={"b": "-100 is not a token id at all; that is why it is safe as the 'skip' label.",
           "c": "Positions labelled -100 contribute nothing to the loss or its gradient."},
))
