"""fastbridge.ops: the fused ops of API.md, each a torch.library custom op (torch.ops.fastbridge.*)."""
from .adapter_block import adapter_block

__all__ = ["adapter_block"]
