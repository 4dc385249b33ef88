"""A reader's Python session for one document: runs the document's python blocks in order,
in one namespace, and answers each with ok or the traceback.

Started by ``tests/docs/session.py`` with the venv's python. Protocol: one JSON line per block
on stdin (``{"code", "filename", "line"}``), one JSON line per answer on the original stdout.
What the blocks print (and Ray's own output on fds 1 and 2) goes to the log file in argv[1],
so the runner can show each block's output.
"""

import json
import os
import sys
import traceback


def main() -> None:
    answers = os.fdopen(os.dup(1), "w", buffering=1)
    log = os.open(sys.argv[1], os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    os.dup2(log, 1)
    os.dup2(log, 2)
    sys.stdout = open(1, "w", buffering=1, closefd=False)
    sys.stderr = open(2, "w", buffering=1, closefd=False)
    sys.path.insert(0, os.getcwd())          # as in an interpreter started in this directory
    namespace = {"__name__": "__main__", "__builtins__": __builtins__}
    for line in sys.stdin:
        request = json.loads(line)
        # pad with newlines so tracebacks name the document's own line numbers
        code = "\n" * (request["line"] - 1) + request["code"]
        try:
            exec(compile(code, request["filename"], "exec"), namespace)
        except BaseException as e:   # noqa: BLE001  (SystemExit too: report it, keep serving)
            sys.stdout.flush()
            sys.stderr.flush()
            tb = e.__traceback__.tb_next if e.__traceback__ else None   # not this file's frame
            text = "".join(traceback.format_exception(type(e), e, tb))
            answers.write(json.dumps({"ok": False, "error": text}) + "\n")
            continue
        sys.stdout.flush()
        sys.stderr.flush()
        answers.write(json.dumps({"ok": True}) + "\n")


if __name__ == "__main__":
    main()
