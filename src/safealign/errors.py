"""User-facing errors: one line saying what is wrong and what to do; the CLI exits 2."""


class SafealignError(ValueError):
    """Bad input from the user (paths, configs, data). The CLI prints it on one line and exits 2."""

    exit_code = 2


class TrainingDiverged(SafealignError):
    """The loss became NaN/Inf; training stopped and the last good checkpoint was kept."""
