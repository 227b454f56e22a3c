"""The configuration of a Llama whose blocks may lack their attention or their MLP: Nemotron-NAS's ("DeciLM")
layout, as vLLM's nemotron_nas model reads it. sleb writes this file beside a checkpoint it saved with
sub-layers removed; it needs only transformers.

`block_configs` holds one entry per block: {"attention": {"no_op", "replace_with_linear", "n_heads_in_group"},
"ffn": {"no_op", "replace_with_linear", "ffn_mult" or "intermediate_size"}}, read as attributes
(`config.block_configs[3].attention.no_op`) and written to config.json as plain JSON.
"""

from transformers import LlamaConfig


class Fields(dict):
    """A dict whose keys read as attributes too; a missing one is an AttributeError (hasattr works)."""

    def __getattr__(self, name):
        try:
            return self[name]
        except KeyError:
            raise AttributeError(name) from None


def _fields(value):
    if isinstance(value, dict):
        return Fields({key: _fields(item) for key, item in value.items()})
    return value


class DeciLMConfig(LlamaConfig):
    model_type = "nemotron-nas"

    def __init__(self, block_configs=None, **kwargs):
        super().__init__(**kwargs)
        self.block_configs = [_fields(block) for block in block_configs or []]
