"""Lineage in MLflow: from any checkpoint back to its raw data.

Recording (written while things run):
    pipeline.py   a run per pipeline, a nested run per stage: config, counts, datasets
    training.py   a training run's mix, shard sets and parent; a LoggedModel per checkpoint
    record.py     what both share: names, code version, redaction, datasets by digest

Audit (read back by `illada lineage`):
    graph.py      the lineage graph of a checkpoint or run, from MLflow and storage
    render.py     the graph as text, JSON, Mermaid or a picture
    mix.py        tokens consumed per source against the target mix
    verify.py     re-hash the shards and checkpoints and report what changed
    cli.py        `illada lineage show|mix|verify`
"""
