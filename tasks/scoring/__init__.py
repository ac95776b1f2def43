"""How lm-eval's per-task results become our scores: the Open LLM Leaderboard v2 normalisation
(leaderboard.py)."""
