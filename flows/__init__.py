"""Commands, one file each (`python -m flows.NAME`): evolve (the main one), study, zoo, kinship,
export, report, params. The machinery of one evolution run sits in flows/run/."""
