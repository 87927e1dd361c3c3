"""Data: sources (Code Alpaca, MBPP, local files, offline demo), splits, mixing, batches."""
from .collate import IGNORE_INDEX, DataCollator, PackingCollator
from .config import DataConfig, SourceConfig
from .formatting import Example, alpaca_prompt
from .pipeline import DataBundle, Examples, build_datasets, load_examples
from .tokenize import build_demo_tokenizer, tokenize_examples

__all__ = ["DataCollator", "PackingCollator", "DataConfig", "SourceConfig", "Example", "DataBundle", "Examples", "build_datasets",
           "load_examples", "build_demo_tokenizer", "tokenize_examples", "alpaca_prompt", "IGNORE_INDEX"]
