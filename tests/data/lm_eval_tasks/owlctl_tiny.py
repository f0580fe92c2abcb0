"""Loader for the owlctl_tiny test task: the .jsonl beside this file as a one-split DatasetDict."""

import json
from pathlib import Path


def load(**_kwargs):
    import datasets

    lines = Path(__file__).with_suffix(".jsonl").read_text().splitlines()
    rows = [json.loads(line) for line in lines if line.strip()]
    return datasets.DatasetDict({"test": datasets.Dataset.from_list(rows)})
