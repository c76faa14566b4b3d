"""Data fixtures (real text from packaged corpora as parquet shards, a trained tokenizer): see issue 4."""
