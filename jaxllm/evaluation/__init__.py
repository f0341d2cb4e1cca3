"""Evaluation: the run report and its judges (`report.py`), training curves (`plots.py`).

`jaxllm eval --run RUN_DIR` calls `evaluate_run`, which writes `report.md` and `report.json`.
"""

from jaxllm.evaluation.report import POLICIES, STAGES, default_config, evaluate_run, stage_summary, write_report

__all__ = ["POLICIES", "STAGES", "default_config", "evaluate_run", "stage_summary", "write_report"]
