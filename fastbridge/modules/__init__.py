"""nn.Modules built on fastbridge.ops."""
from .adapter import PRESETS as ADAPTER_PRESETS
from .adapter import BottleneckAdapter
from .adaption_prompt import AdaptionPromptAttention, DynamicPromptGenerator

__all__ = ["BottleneckAdapter", "ADAPTER_PRESETS"]
__all__ += ["AdaptionPromptAttention", "DynamicPromptGenerator"]
