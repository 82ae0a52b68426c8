"""Benchmarks: sweeps of settings over prompts and seeds (resumable, on Ray past one machine), their
HTML report, and the GPU check of the real models' widths."""
