"""clinqa: clinical question answering with language models, run privately."""

__version__ = "0.1.0"
