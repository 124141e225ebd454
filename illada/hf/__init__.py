"""Hugging Face interop: import released LLaDA-format weights as an illada checkpoint, and
export a checkpoint in that format (convert: the format as data; source: reading a HF
directory; importer / exporter: the two directions; cli: the commands)."""
