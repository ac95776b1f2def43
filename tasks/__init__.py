"""The pipeline's six steps, one module each, in the order a generation runs them:

    fetch.py     resolve a model (zoo, local folder or hub id + commit) and fingerprint it
    delta.py     stream the delta parameters (model - base) from safetensors
    kinship.py   PCC, CS and ED of the deltas: a pair, or a whole population in one pass
    merge.py     merge two parents through mergekit into the content-addressed store
    evaluate.py  score a model with lm-eval on the configured benchmark
    select.py    Algorithm 1 (Top-k Greedy Merging with Model Kinship), pure and replayable

Each is plain functions plus one thin Prefect `@task` at the end of the file. Helpers live in
named subpackages: core/ (store, devices, errors), outputs/ (cards, tables, plots, MLflow),
study/ (the multi-run analysis), zoo/ (the embedded model zoo), scoring/ (the leaderboard's
normalisation of lm-eval's results), and lmeval.py, the one adapter over lm-eval. Nothing
here imports flows/.
"""
