"""The one domain exception of `wit.evaluate`: a task, suite or dataset that cannot be evaluated.

It subclasses ``ValueError`` so the CLI's domain-error handler turns it into a one-line message;
its message is always one line that names the file or task at fault.
"""

from __future__ import annotations


class EvalError(ValueError):
    """A suite, task or dataset that cannot be evaluated as asked (missing class names, empty split...)."""


class DatasetMissing(EvalError):
    """A task's dataset is not where the suite says (a mirror without it): the task is reported
    as missing and the rest of the suite runs. Anything else wrong with a dataset stays an
    :class:`EvalError`, which stops the run before any work."""
