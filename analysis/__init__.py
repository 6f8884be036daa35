"""Analysis of a finished run: predictions on its test split, then pictures and tables from them.

`analysis.report.analyze(run_dir)` does it all (`fastcifar analyze RUN_DIR`); the pieces
(`predictions`, `curves`, `gallery`, `gradcam`, `confusion`, and `schedule`, which rebuilds a run's optimizer and
the LR of every step from its config) are usable on their own. `analysis.compare` draws several runs side by
side (`fastcifar compare RUN...`, and a sweep after every run).
This package reads `train` and `fastloader`; nothing there imports it.
"""
