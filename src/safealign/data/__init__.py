"""Paired safety datasets (CoProV2-style), from concepts to images.

- :mod:`.taxonomy`  categories -> concepts (+ benign counterparts): the world's built in, or a YAML/CSV file
- :mod:`.prompts`   paired prompts (templates, OpenAI-compatible endpoint, local LM), dedup, drift filter
- :mod:`.splits`    leakage-free train/test splits and the leakage check
- :mod:`.images`    paired images: same seed, batched, resumable, distributed, judge filter
- :mod:`.coprov2`   the official CoProV2 CSVs -> our format
- :mod:`.dataset`   the on-disk dataset (pairs.parquet + images/ + safealign.json)
"""
