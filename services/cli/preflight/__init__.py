"""The checks `hetserve up` runs on a topology before it starts a process, and `hetserve
check` runs alone: every problem is one line naming the file, the field and the fix."""

from services.cli.preflight.report import Problem, Report
from services.cli.preflight.run import check_topology

__all__ = ["Problem", "Report", "check_topology"]
