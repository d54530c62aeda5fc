"""Conversion to and from other ecosystems' formats; the only place that knows Hugging Face names."""
