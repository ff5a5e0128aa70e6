"""nn.Modules built on fastbridge.ops."""
from .adapter import PRESETS as ADAPTER_PRESETS
from .adapter import BottleneckAdapter

__all__ = ["BottleneckAdapter", "ADAPTER_PRESETS"]
