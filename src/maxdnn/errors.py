"""One base class for every error maxdnn reports to its user.

Every problem with a user's input (a file, a spec, an assignment, a model, a run directory) is raised as a
subclass of ``MaxdnnError`` whose message is one line naming the file and the problem. The command line
prints it as ``maxdnn: error: <message>`` with exit code 2; a Python caller catches the base class:

>>> import maxdnn
>>> try:
...     maxdnn.get_multiplier("roup-p9r9")
... except maxdnn.MaxdnnError as e:
...     print(type(e).__name__)
SpecError

Subclasses that were ``ValueError`` (or ``RuntimeError``) before keep that base too, so existing
``except ValueError`` code still catches them.
"""


class MaxdnnError(Exception):
    """Base class of maxdnn's user-facing errors: the message is one line naming the file and the problem.

    Example:

    >>> from maxdnn import MaxdnnError
    >>> from maxdnn.data import DataError
    >>> issubclass(DataError, MaxdnnError)
    True
    """


class ModelError(MaxdnnError):
    """A problem with a model file, as one line naming the file (front ends and the zoo raise it).

    Example:

    >>> from maxdnn.errors import ModelError
    >>> str(ModelError("net.pt2: empty file"))
    'net.pt2: empty file'
    """
