"""The one exception the planner raises for inputs or problems it cannot serve."""


class PlannerError(Exception):
    """A bad input or an infeasible problem; the message names what and why.

    The CLI prints the message and exits non-zero; nothing else catches it.
    """
