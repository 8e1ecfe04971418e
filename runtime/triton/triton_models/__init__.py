"""``model.py`` sources that ``ugsep triton`` copies into model repositories.

They run inside Triton's Python backend (they import ``triton_python_backend_utils``),
never in this process; they import the ugsep runtime vendored next to them.
"""
