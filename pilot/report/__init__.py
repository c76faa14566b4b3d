"""`pilot report`: what a run did, from its logs alone, as one HTML page, PNG figures and summary.json.

    logs.py      the run-log contract: read RUN_DIR/logs/*.jsonl, errors that name file:line
    spans.py     interval algebra on simulated-time spans
    summary.py   the run's structure, learning curves, energy and emissions: every number of the page
    figures.py   the timeline, learning-curve and energy figures (matplotlib)
    html.py      the page, rendered from the summary, and its screenshot (headless Chromium)
    cli.py       `pilot report RUN_DIR` (python -m pilot.report)
"""
