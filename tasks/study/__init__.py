"""Many runs compared: kinship vs merge gain and strategy against strategy (analysis.py), its
plots (plots.py) and report (report.py); the paper's published tables ship in paper/."""
