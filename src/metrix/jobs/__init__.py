"""The job layer: what each command does, as functions that take typed arguments and return results.

One module per command group (``train``: train / evaluate / embed / index; ``verification``: gallery and OOD;
``classical``: fit-linear / transform-linear; ``recommend``, ``fewshot``, ``selfsup``, ``text``). Jobs never
print and never exit: they return dicts or dataclasses (long ones report progress through an ``echo``
callback), raise the library's exceptions, and take a :class:`metrix.runs.Run` or a path wherever a trained
run is involved. The command line (:mod:`metrix.cli`) and the service call them.
"""
