"""Data: the warehouse (every SQL statement), ingest, the polarity rules, prompt templates, token
sequences, and the examples / preference pairs training reads."""
