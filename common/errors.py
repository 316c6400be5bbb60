"""Error types and the one exit-code registry.

Every error that a person reads names the field (or file), what was expected, what was
received and the fix. Errors that cross the site boundary carry only a code from
:data:`EXIT_CODES` and an exception type, never file names or patient data.
"""

from __future__ import annotations

import difflib
import re
from dataclasses import dataclass
from enum import IntEnum


class ExitCode(IntEnum):
    """Process exit codes of every fedpacs command (and codes in error replies)."""

    OK = 0
    FAILURE = 1
    USAGE = 2
    CONFIG = 3
    DATA = 4
    UPDATE = 5
    TIMEOUT = 6
    PROCESS = 7
    AUTH = 8
    PACS = 9
    POLICY = 10
    SIMULATION = 11
    NO_UPDATE = 12
    INTERRUPTED = 130


EXIT_CODES: dict[ExitCode, str] = {
    ExitCode.OK: "Success: the command finished what it was asked to do.",
    ExitCode.FAILURE: "Unexpected failure; the log named in the message has the traceback.",
    ExitCode.USAGE: "Wrong command-line usage; run the command with --help.",
    ExitCode.CONFIG: "A config file or run setting is invalid; the message names each "
    "field, what was expected, what was given and the fix.",
    ExitCode.DATA: "A data file could not be read or has the wrong content; the message "
    "names the file (locally only) and the fix.",
    ExitCode.UPDATE: "A model update did not match the model (keys, shapes, dtypes) or "
    "held NaN/Inf values.",
    ExitCode.TIMEOUT: "A wait ran past its deadline (a process did not start, a port did "
    "not open, a run did not finish).",
    ExitCode.PROCESS: "A child process (SuperLink, SuperNode, flwr) exited unexpectedly; "
    "its log file is named in the message.",
    ExitCode.AUTH: "Authentication failed or a key/certificate is missing or invalid.",
    ExitCode.PACS: "The PACS could not be reached or refused the association/request; "
    "check the [pacs] host, port and AE titles and that the PACS knows this site's AE.",
    ExitCode.POLICY: "A site refused what the coordinator asked because its own [security] "
    "policy forbids it (e.g. SecAgg+ with fewer sites or a lower reconstruction threshold "
    "than the site's floor, or a SecAgg+ request inconsistent with the round); the site's "
    "log names each rule and the fix.",
    ExitCode.SIMULATION: "The simulation engine could not run the virtual sites: its Ray "
    "cluster could not be reached (the message names the address and the fix), or the "
    "virtual sites ran out of memory (the message names the site count, the memory per "
    "virtual site measured and the fix).",
    ExitCode.NO_UPDATE: "A run ended with the model it started from: no round aggregated any "
    "site's update (every site refused, failed or was screened out, or no site answered in "
    "time), so nothing was published; the round records (metrics.json: train_sites, "
    "rejected) and the sites' logs say why.",
    ExitCode.INTERRUPTED: "Interrupted by the user (Ctrl-C); child processes were stopped.",
}


def describe(code: int) -> str:
    """Help text for an exit code (also used for error codes in Flower error replies)."""
    try:
        return EXIT_CODES[ExitCode(code)]
    except ValueError:
        return f"unknown code {code}"


# a site's error reply: only this, never a file name or an exception's message
CODED_REASON = re.compile(r"^FP(\d{3}) ([A-Za-z_][A-Za-z0-9_]*): (.*)$")


def coded_reason(code: int, type_name: str) -> str:
    """The reason of a site's error reply: a code, an exception type name and the code's
    help text."""
    return f"FP{int(code):03d} {type_name}: {describe(code)}"


def parse_coded(reason: str) -> tuple[int, str] | None:
    """(code, type name) of a reason :func:`coded_reason` wrote; None for any other text
    (the help text must be the code's own, so that nothing else rides along)."""
    m = CODED_REASON.match(reason)
    if m is None or m.group(3) != describe(int(m.group(1))):
        return None
    return int(m.group(1)), m.group(2)


def did_you_mean(given: str, choices: tuple[str, ...] | list[str]) -> str:
    """' (did you mean X?)' for a near miss, else ''."""
    close = difflib.get_close_matches(given.lower(), list(choices), n=1, cutoff=0.6)
    return f" (did you mean {close[0]!r}?)" if close else ""


@dataclass(frozen=True)
class FieldError:
    """One invalid field: where, what was expected, what was received, and the fix."""

    field: str
    expected: str
    got: str
    fix: str

    def __str__(self) -> str:
        return f"{self.field}: expected {self.expected}, got {self.got}. Fix: {self.fix}"


class FedpacsError(Exception):
    """Base class: every fedpacs error carries an exit code."""

    code: ExitCode = ExitCode.FAILURE


class ConfigError(FedpacsError):
    """All the problems found in one config source, reported together."""

    code = ExitCode.CONFIG

    def __init__(self, source: str, errors: list[FieldError]) -> None:
        self.source = source
        self.errors = list(errors)
        lines = "\n".join(f"  - {e}" for e in self.errors)
        super().__init__(f"invalid config in {source} ({len(self.errors)} problem(s)):\n{lines}")


class DataError(FedpacsError):
    """A data file that cannot be used; names the file and the fix (site-local only)."""

    code = ExitCode.DATA

    def __init__(self, path: str, problem: str, fix: str, *, kind: str = "invalid-data") -> None:
        self.path = path
        self.problem = problem
        self.fix = fix
        self.kind = kind  # a short code safe to count and send (e.g. "missing-slices")
        super().__init__(f"{path}: {problem}. Fix: {fix}")


class UpdateError(FedpacsError):
    """A weight update that does not fit the model."""

    code = ExitCode.UPDATE

    def __init__(self, errors: list[FieldError]) -> None:
        self.errors = list(errors)
        lines = "\n".join(f"  - {e}" for e in self.errors[:20])
        more = f"\n  ... and {len(self.errors) - 20} more" if len(self.errors) > 20 else ""
        super().__init__(f"model update rejected ({len(self.errors)} problem(s)):\n{lines}{more}")


class DeadlineError(FedpacsError):
    """A wait ran past its deadline."""

    code = ExitCode.TIMEOUT


class ProcessError(FedpacsError):
    """A child process exited unexpectedly."""

    code = ExitCode.PROCESS


class AuthError(FedpacsError):
    """Missing/invalid key material or a refused identity."""

    code = ExitCode.AUTH


class PacsError(FedpacsError):
    """The PACS was unreachable or refused a request; names the PACS and the fix."""

    code = ExitCode.PACS


class SimulationError(FedpacsError):
    """The Simulation Engine's Ray cluster is unreachable, or its virtual sites ran out of
    memory; names the address (or site count and memory per site) and the fix."""

    code = ExitCode.SIMULATION


class PolicyError(FedpacsError):
    """A request from the coordinator that this site's own policy refuses; names each rule
    broken (what the site requires, what was asked) and the fix."""

    code = ExitCode.POLICY

    def __init__(self, source: str, errors: list[FieldError]) -> None:
        self.source = source
        self.errors = list(errors)
        lines = "\n".join(f"  - {e}" for e in self.errors)
        super().__init__(f"{source} refused by this site's policy ({len(self.errors)} "
                         f"problem(s)):\n{lines}")


class NoUpdateError(FedpacsError):
    """No round of a run changed the global model: nothing to publish; names the rounds
    and what the round records say of the sites."""

    code = ExitCode.NO_UPDATE
