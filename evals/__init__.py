"""Eval sets shipped with Yanray (data only): `core.jsonl` is what `yanray eval` runs by
default. Installed as `yanray.evals` so a wheel carries it; the schema is in
`yanray.bot.evalset`."""
