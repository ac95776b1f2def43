"""What reaches the terminal: one line per model from the recorder, warnings, and the project's own
INFO lines; every library's INFO lines go only to the run's log file. Kept apart from runtime.py
so a Dask worker's preload (flows/run/worker.py) can apply it without importing the runtime."""

from __future__ import annotations

import logging

NOISY_LOGGERS = (
    "httpx",
    "httpcore",
    "urllib3",
    "mlflow",
    "alembic",
    "filelock",
    "datasets",
    "transformers",
    "distributed",
)
# lm-eval warns on every call that we pass it a loaded model, which we do on purpose
SILENT_LOGGERS = ("lm_eval.models.huggingface",)
CONSOLE_LOGGER = "evolve.console"  # lines the recorder prints; logged too, for the log file


# loggers whose INFO lines are the project's own; other libraries' (mergekit's "Skipping
# optional weight lm_head.weight" on the root logger) reach the terminal only from WARNING
OWN_LOGGERS = ("flows", "tasks", "__main__")


class ConsoleFilter(logging.Filter):
    """What reaches the terminal. Prefect's per-run lines and its reports of a failed run stay in
    its database (the UI) and the run's log file, as do other libraries' INFO lines: the console
    gets one line per model from the recorder, and the entry point reports an error once."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.name == CONSOLE_LOGGER:
            return False  # already printed
        if record.name.startswith("prefect"):
            return record.levelno == logging.WARNING
        return record.levelno >= logging.WARNING or record.name.split(".")[0] in OWN_LOGGERS


class NotTheUsers(logging.Filter):
    """Deprecation notices one library gives for another's calls, which a user cannot act on:
    transformers 5 warns once per process that `torch_dtype` is deprecated when mergekit (0.1.x)
    sets `PretrainedConfig.torch_dtype` on a merge's config."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "`torch_dtype` is deprecated" not in record.getMessage()


def quiet_logs() -> None:
    # Hydra sets the root logger to INFO, which would log every Prefect API call.
    for name in NOISY_LOGGERS:
        logging.getLogger(name).setLevel(logging.WARNING)
    for name in SILENT_LOGGERS:
        logging.getLogger(name).setLevel(logging.ERROR)
    logging.getLogger(CONSOLE_LOGGER).setLevel(logging.INFO)
    # "Finished in state Completed()" per task run: the flow's log in Prefect's UI has the
    # recorder's line per model instead (a task's warnings and errors still show)
    logging.getLogger("prefect.task_runs").setLevel(logging.WARNING)
    # transformers logs through a handler of its own, not the console filter below
    config_log = logging.getLogger("transformers.configuration_utils")
    if not any(isinstance(f, NotTheUsers) for f in config_log.filters):
        config_log.addFilter(NotTheUsers())
    for handler in logging.getLogger().handlers:
        is_console = isinstance(handler, logging.StreamHandler) and not isinstance(
            handler, logging.FileHandler
        )
        if is_console and not any(isinstance(f, ConsoleFilter) for f in handler.filters):
            handler.addFilter(ConsoleFilter())
