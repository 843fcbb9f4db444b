"""uniil: continual learning of CLIP vision-language models guided by LLM-generated attributes."""

__version__ = "0.1.0"
