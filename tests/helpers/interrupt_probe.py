"""Run as ``python -m helpers.interrupt_probe``: the CLI's `main` with one extra command whose
Ctrl-C reaches code evaluated from a string by C (``PyRun_String``, as pybind11 modules do while
they are imported), the case in which CPython under ``-m`` ends the process by SIGINT whatever
its exit code. tests/cli/test_cli.py expects exit 130 and one line."""

import ctypes
import sys

from rwkv2rknn.cli import app


@app.cli.command("probe-interrupt")
@app.handle_errors
def probe_interrupt():
    run = ctypes.pythonapi.PyRun_String
    run.restype = ctypes.py_object
    run.argtypes = [ctypes.c_char_p, ctypes.c_int, ctypes.py_object, ctypes.py_object]
    run(b"raise KeyboardInterrupt", 257, {}, {})  # 257: Py_file_input


if __name__ == "__main__":
    sys.argv = ["rwkv2rknn", "probe-interrupt"]
    app.main()
