"""Mirrors modules/errors.py: report() prints '*** message' lines and the traceback to stderr, nothing is raised.

Stand-in addition: every report is also appended to `reported` as (message, exception or None) so tests can assert
that a hook failed "silently" the way the WebUI lets it.
"""
import sys
import textwrap
import traceback

exception_records = []
reported = []


def format_exception(e, tb):
    return {"exception": str(e), "traceback": [[f"{f.filename}, line {f.lineno}, {f.name}", f.line] for f in traceback.extract_tb(tb)]}


def record_exception():
    _, e, tb = sys.exc_info()
    if e is None:
        return
    if exception_records and exception_records[-1] == e:
        return
    exception_records.append(format_exception(e, tb))
    if len(exception_records) > 5:
        exception_records.pop(0)


def report(message: str, *, exc_info: bool = False) -> None:
    """Print an error message to stderr, with optional traceback (as the WebUI does for failing hooks)."""
    record_exception()
    reported.append((message, sys.exc_info()[1] if exc_info else None))
    for line in message.splitlines():
        print("***", line, file=sys.stderr)
    if exc_info:
        print(textwrap.indent(traceback.format_exc(), "    "), file=sys.stderr)
        print("---", file=sys.stderr)


def print_error_explanation(message):
    record_exception()
    lines = message.strip().split("\n")
    max_len = max(len(x) for x in lines)
    print('=' * max_len, file=sys.stderr)
    for line in lines:
        print(line, file=sys.stderr)
    print('=' * max_len, file=sys.stderr)


def display(e: Exception, task, *, full_traceback=False):
    record_exception()
    reported.append((f"{task or 'error'}: {type(e).__name__}", e))
    print(f"{task or 'error'}: {type(e).__name__}", file=sys.stderr)
    print(traceback.format_exc(), file=sys.stderr)


already_displayed = {}


def display_once(e: Exception, task):
    record_exception()
    if task in already_displayed:
        return
    display(e, task)
    already_displayed[task] = 1


def run(code, task):
    try:
        code()
    except Exception as e:
        display(e, task)
