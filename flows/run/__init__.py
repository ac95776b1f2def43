"""One evolution run, as flows/evolve.py drives it: schema.py validates the config, inputs.py
resolves models and benchmarks, runtime.py and cluster.py place steps (threads or Dask), lab.py
answers Algorithm 1's questions with Prefect tasks, record.py writes MLflow, tables and cards,
console.py decides what reaches the terminal, pipeline.py is the `@flow` that ties them, and
worker.py preloads a Dask worker."""
