"""Integrations with other libraries' model classes (transformers, PEFT, ...).

``builtin`` registers the integrations ``fastbridge.patch`` uses; ``adapters`` inserts fastbridge
adapters into Hugging Face models (``fastbridge.add_adapters``).
"""
