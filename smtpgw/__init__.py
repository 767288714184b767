"""smtpgw: an SMTP filtering relay (anti-virus via clamd, built-in anti-spam).

The package follows the pipeline, one folder per stage:
receive/ → spool/ → scan/ (with spam/) → deliver/, around the shared
net/, mail/, rules/ and reports/; update/, console/ and app/ (the gateway
process, the command line, the control directory) sit beside them.
ARCHITECTURE.md at the project root walks one message through the tree.
"""

import os
import sys
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import ctypes

__version__ = "0.1.0"
PRODUCT = "smtpgw"

# The folder of the package: shipped data (bases/, templates/, keys/) lives here.
PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__))
# The folder that holds the package (a source tree or an install's prefix).
PACKAGE_ROOT = os.path.dirname(PACKAGE_DIR)

# The interpreter options of every Python process the gateway starts itself (its scanner
# workers, incoming processes, keepup2date run; the launcher re-executes the main process with
# them): -S leaves out the site module, so this installation's site-packages and the .pth files
# there, which import whatever their packages want into every interpreter (about 5 MiB RSS a
# process), and -s the user's own site folder. The gateway needs the standard library only; its
# package is found through PYTHONPATH (``child_environment``). Not -E or -I: they would drop
# PYTHONPATH and the PYTHON* settings an administrator gave the gateway (PYTHONTRACEMALLOC,
# PYTHONDONTWRITEBYTECODE), which its processes share.
CHILD_OPTIONS = ("-S", "-s")


def child_command(module: str, *args: str) -> list[str]:
    """The command line of a process of this gateway: ``python3 -S -s -m MODULE ARGS`` with
    the interpreter running now (``child_environment`` is its environment)."""
    return [sys.executable, *CHILD_OPTIONS, "-m", module, *args]


def child_environment() -> dict[str, str]:
    """This process's environment with the folder holding this package first on PYTHONPATH,
    so that a child started with ``child_command`` imports the same smtpgw wherever it is
    installed (a source tree, a tarball install) and whatever its working folder."""
    path = os.environ.get("PYTHONPATH", "")
    return dict(os.environ, PYTHONPATH=PACKAGE_ROOT + (os.pathsep + path if path else ""))


def without_site(argv: list[str]) -> None:
    """Run this process again without site packages (``CHILD_OPTIONS``): ``argv`` is
    ``sys.orig_argv`` (the interpreter, its options, the script and its arguments), so the
    interpreter's own options stay and the process keeps its ID, descriptors and working
    folder. Returns at once when site packages are already out, when PYTHONPATH would not
    be read (-E, -I: the package may have been found in site-packages) or the interpreter
    cannot be run again (no ``sys.executable``, exec refused): the process then goes on as
    it is."""
    if sys.flags.no_site or sys.flags.ignore_environment or not sys.executable or len(argv) < 2:
        return
    try:
        os.execve(sys.executable, [sys.executable, *CHILD_OPTIONS, *argv[1:]], child_environment())
    except OSError:
        return


RELEASE_INTERVAL = 60.0  # seconds between two release_heap calls of a process that runs a loop
_libc: "ctypes.CDLL | None | bool" = False  # False: not looked up yet; None: no glibc here


def release_heap() -> None:
    """Give the pages of freed heap blocks back to the system (glibc's ``malloc_trim(0)``: glibc
    keeps the pages of freed blocks inside its heap resident and gives back only the top). Does
    nothing where there is no glibc. A process calls it when it has nothing to do (a scanner
    worker without a job) or now and then (the main process, once a minute): the pages it hands
    back are faulted in again by the next allocations."""
    global _libc
    if _libc is False:
        import ctypes
        import ctypes.util

        try:
            _libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
            _libc.malloc_trim.argtypes = [ctypes.c_size_t]
        except (OSError, AttributeError):  # not glibc
            _libc = None
    if _libc is not None:
        _libc.malloc_trim(0)
