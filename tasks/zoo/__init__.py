"""The embedded model zoo: a tiny base and one fine-tune per skill, built offline on a CPU, with
lm-eval tasks on local data (build.py)."""
