"""Evaluation of subject-driven generation: the metrics of the SSR-Encoder paper's Table 2.

``python -m trainer.evaluate`` (see ``cli``) runs two steps that also run separately:
``generate`` (SSR-Encoder images for a bench) and ``score`` (metrics from folders of images
alone, so any method's images can be scored). Modules, one concern each:

- ``benches``: DreamBench (published layout) and our multi-subject JSONL bench
- ``loaders``: CLIP, DINO and aesthetic-head weights from the files users have (safe loading)
- ``metrics``: CLIP-T, CLIP-I, DINO, CLIP-ES, DINO-M, aesthetic score from embeddings
- ``scoring``: a bench + a folder of images -> one row of scores per image
- ``generate``: the generation step (resumable, fixed seeds)
- ``reports``: metrics.json, per-image CSV, Markdown table, HTML/PNG contact sheets
- ``training_callback``: scores a small fixed eval set during training (TensorBoard)
- ``cli``: the command line

Definitions of every metric: docs/evaluation.md.
"""
