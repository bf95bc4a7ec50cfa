"""Evaluation of a trained model: predictions, statistics, audits, explanations and the report.

    run.py        the command (`python -m evaluation`): internal and external evaluations
    statistics/   metrics, bootstrap intervals, operating points applied to test
    audits/       per-source results, copies of training films, shortcut probes, data facts
    explain/      Grad-CAM maps and the report's gallery
    report/       report.json and report.md, their sections and figures
    predict.py    prediction for new films (`python -m evaluation.predict`)

It reads what training wrote (the model card, the weights, metrics.jsonl) and imports
`train` for the model and its presets; `train` never imports this package.
"""
