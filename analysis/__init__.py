"""Analysis of a finished run: predictions on its test split, then pictures and tables from them.

`analysis.report.analyze(run_dir)` does it all (`fastcifar analyze RUN_DIR`); the pieces
(`predictions`, `curves`, `gallery`, `gradcam`, `confusion`) are usable on their own.
This package reads `train` and `fastloader`; nothing there imports it.
"""
