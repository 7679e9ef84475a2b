"""Sample-quality metrics: detectors (TF-ported Inception v3, a small demo classifier), float64 feature
statistics that all-reduce across ranks, Fréchet distance, Inception Score, precision/recall.

The command-line tool over these is tools/fid.py.
"""
