"""Tiny randomly initialised transformers models (BERT and Llama families) for fast tests, and
trained-looking values for what a method adds to them."""
import torch
from torch import nn
from transformers import (BertConfig, BertForSequenceClassification, LlamaConfig, LlamaForCausalLM,
                          Qwen2Config, Qwen2ForCausalLM)


def tiny_bert(seed: int = 0, hidden: int = 32) -> nn.Module:
    torch.manual_seed(seed)
    config = BertConfig(vocab_size=100, hidden_size=hidden, num_hidden_layers=2,
                        num_attention_heads=2, intermediate_size=2 * hidden,
                        max_position_embeddings=64, num_labels=2,
                        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    return BertForSequenceClassification(config).eval()


def tiny_llama(seed: int = 0, hidden: int = 32) -> nn.Module:
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=100, hidden_size=hidden, intermediate_size=2 * hidden,
                         num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    return LlamaForCausalLM(config).eval()


def tiny_qwen2(seed: int = 0) -> nn.Module:
    """Qwen2's differences from Llama that loaders trip on: biases on q, k and v, and a head tied
    to the embedding."""
    torch.manual_seed(seed)
    config = Qwen2Config(vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                         tie_word_embeddings=True)
    return Qwen2ForCausalLM(config).eval()


def trained(model: nn.Module, seed: int = 1, scale: float = 0.1) -> nn.Module:
    """Random values (N(0, scale^2), seeded) in every trainable tensor, as if trained: a fresh
    adapter (LoRA's B = 0, an identity adapter) would hide most mistakes. Returns `model`."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.copy_(scale * torch.randn(p.shape, generator=generator))
    return model
