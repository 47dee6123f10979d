"""Using a trained model: loading it with its adapter and prompt format (load.py), and lm-eval over it
(evaluation.py, eval_data.py and the offline tasks in eval_tasks/).
"""
