"""A Llama whose blocks may lack their attention or their MLP (Nemotron-NAS's "DeciLM" layout, read from
`config.block_configs`). sleb writes this file beside a checkpoint it saved with sub-layers removed; it needs
only torch and transformers.

A block without its attention adds nothing to the residual stream there, and holds no attention weights, no
input norm and no KV-cache entries; a block without its MLP likewise. Everything else is transformers' Llama.
"""

import torch
from torch import nn
from transformers import LlamaForCausalLM

from .configuration_decilm import DeciLMConfig


class Absent(nn.Module):
    """A sub-layer that is not there: zeros where its output went (an attention's with no weights beside)."""

    def __init__(self, attention: bool):
        super().__init__()
        self.attention = attention

    def forward(self, hidden_states, *args, **kwargs):
        zeros = torch.zeros_like(hidden_states)
        return (zeros, None) if self.attention else zeros


class DeciLMForCausalLM(LlamaForCausalLM):
    config_class = DeciLMConfig

    def __init__(self, config: DeciLMConfig):
        super().__init__(config)
        for layer, block in zip(self.model.layers, config.block_configs):
            if block.attention.no_op:
                layer.self_attn, layer.input_layernorm = Absent(True), nn.Identity()
            if block.ffn.no_op:
                layer.mlp, layer.post_attention_layernorm = Absent(False), nn.Identity()
