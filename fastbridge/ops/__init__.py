"""fastbridge.ops: the fused ops of API.md, each a torch.library custom op (torch.ops.fastbridge.*)."""
from .adapter_block import adapter_block
from .gated_attention import gated_attention
from .qformer_cross_attention import qformer_cross_attention

__all__ = ["adapter_block", "gated_attention", "qformer_cross_attention"]
